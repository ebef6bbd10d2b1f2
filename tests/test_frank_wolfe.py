"""frank_wolfe (FW-Merging): hand-computed iterations, the Gram path against a direct
computation, the data path's gradient against autograd, slice invariance of the selection trace
(in-process whole tensors vs Ray with tiny slices), and the refusals before any work.

(Hand-computed merged tensors for the data-free path are in tests/cases/frank_wolfe.py, run by
the conformance suite.)
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from distmerge.config import load_pipeline
from distmerge.engine.driver import run_pipeline, validate
from distmerge.engine.executors import RayExecutor
from distmerge.errors import ConfigError, IncompatibleModelsError
from distmerge.methods import build
from distmerge.reduce import exact_sum, exact_value, row_sums
from distmerge.select.frank_wolfe import GroupScores, Params, fw_step, gamma
from distmerge.select.gram import block_gram, cross_products, exact_sums, pairs, unpack
from distmerge.select.objectives import DataFree
from tests.conftest import make_pipeline, sha256_tree


def _p(**kw) -> Params:
    base = dict(iterations=10, step=1.0, scale=1.0, granularity="model", score="inner")
    return Params(**{**base, **kw})


# -- the iteration, by hand -------------------------------------------------------------------

def test_step_sizes_follow_the_authors_rule():
    assert [gamma(t, 0.1) for t in range(3)] == [0.1 * 2 / 2, 0.1 * 2 / 3, 0.1 * 2 / 4]


def _two_tensors():
    # a: inner [−3, 1, −3] (a tie, first wins), ∇·θ₀ = 0, ‖∇‖² = 4, ‖θ_j‖² = [9, 1, 36]
    # b: inner [2, −1, 0],  ∇·θ₀ = 1, ‖∇‖² = 1, ‖θ_j‖² = [4, 4, 1]
    return {
        "a": GroupScores(inner=np.array([-3.0, 1.0, -3.0]), grad_base=0.0, grad_sq=4.0,
                         weight_sq=np.array([9.0, 1.0, 36.0])),
        "b": GroupScores(inner=np.array([2.0, -1.0, 0.0]), grad_base=1.0, grad_sq=1.0,
                         weight_sq=np.array([4.0, 4.0, 1.0])),
    }


def test_model_granularity_inner_by_hand():
    c = {"a": np.array([0.5, 0.0, 0.0]), "b": np.array([0.5, 0.0, 0.0])}
    # summed inner [−1, 0, −3] → expert 2; gap = c·Σinner − min = .5·(−1) − (−3) = 2.5
    # t = 1, step .75, scale 1: γ = .75·2/3 = .5, c = .5 c + .5 e2 = [.25, 0, .5]
    new, st = fw_step(1, _two_tensors(), c, _p(step=0.75))
    assert st.picked == {"a": 2, "b": 2}
    assert st.gamma == 0.5 and st.eta == 0.5
    assert st.gap == 2.5
    assert new["a"].tolist() == [0.25, 0.0, 0.5] and new["b"].tolist() == [0.25, 0.0, 0.5]


def test_model_granularity_cosine_by_hand():
    c = {"a": np.zeros(3), "b": np.zeros(3)}
    # cos_a = (0 + inner)/(2·‖θ_j‖) = [−3/6, 1/2, −3/12] = [−.5, .5, −.25]
    # cos_b = (1 + inner)/(1·‖θ_j‖) = [3/2, 0/2, 1/1] = [1.5, 0, 1]
    # summed [1, .5, .75] → expert 1 (the inner score would pick expert 2)
    # scale .5, step 1, t = 0: η = .5
    new, st = fw_step(0, _two_tensors(), c, _p(score="cosine", scale=0.5))
    assert st.picked == {"a": 1, "b": 1}
    assert st.eta == 0.5
    assert st.gap == 3.0             # the textbook gap: 0 − min(summed inner) = 3
    assert new["a"].tolist() == [0.0, 0.5, 0.0]


def test_tensor_granularity_by_hand():
    c = {"a": np.array([0.0, 1.0, 0.0]), "b": np.array([1.0, 0.0, 0.0])}
    # inner: a → expert 0 (tie with 2, first wins), b → expert 1
    # gap = (1 − (−3)) + (2 − (−1)) = 7
    new, st = fw_step(0, _two_tensors(), c, _p(scale=0.25, granularity="tensor"))
    assert st.picked == {"a": 0, "b": 1}
    assert st.gap == 7.0
    assert new["a"].tolist() == [0.25, 0.75, 0.0] and new["b"].tolist() == [0.75, 0.25, 0.0]
    # cosine: a → [−.5, .5, −.25] → 0; b → [1.5, 0, 1] → 1
    _, st = fw_step(0, _two_tensors(), c, _p(score="cosine", granularity="tensor"))
    assert st.picked == {"a": 0, "b": 1}


def test_a_zero_gradient_has_cosine_zero_not_nan():
    g = GroupScores(inner=np.zeros(2), grad_base=0.0, grad_sq=0.0, weight_sq=np.array([1.0, 0.0]))
    _, st = fw_step(0, {"w": g}, {"w": np.zeros(2)}, _p(score="cosine"))
    assert st.picked == {"w": 0} and st.gap == 0.0


# -- the Gram path against a direct computation ------------------------------------------------

def test_exact_sums_match_the_reference():
    g = torch.Generator().manual_seed(0)
    v = (torch.randn(5, 333, generator=g, dtype=torch.float64) * 10.0 ** torch.randint(-30, 30, (5, 333), generator=g)).numpy()
    got = exact_sums(v)
    assert [int(x) for x in got] == [exact_sum(row) for row in v]


def test_block_gram_is_exact_and_slice_invariant():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 7, 5, generator=g)                                   # [m, rows, cols]
    whole = block_gram(x)
    parts = [block_gram(x[:, r:r + 2]) for r in range(0, 7, 2)]
    assert [int(a) for a in whole] == [sum(int(p[k]) for p in parts) for k in range(len(whole))]
    G = unpack(whole, 4)
    direct = torch.einsum("irc,jrc->ij", x.double(), x.double()).numpy()
    np.testing.assert_allclose(G, direct, rtol=1e-12, atol=1e-12)
    # the exact value: Σ of the fp64 row sums, added without rounding
    i, j = pairs(4)[5]
    assert G[i, j] == exact_value(exact_sum(row_sums(x[i].double() * x[j].double())))


def test_cross_products_against_direct():
    g = torch.Generator().manual_seed(2)
    grad, x = torch.randn(3, 4, generator=g), torch.randn(5, 3, 4, generator=g)
    got = np.array([exact_value(int(v)) for v in cross_products(grad, x)])
    want = np.concatenate([(x.double() * grad.double()).sum((1, 2)).numpy(), [(grad.double() ** 2).sum().item()]])
    np.testing.assert_allclose(got, want, rtol=1e-12)


def test_data_free_scores_against_the_gradient_computed_directly():
    g = torch.Generator().manual_seed(3)
    base = torch.randn(6, 4, generator=g, dtype=torch.float64)
    taus = torch.randn(3, 6, 4, generator=g, dtype=torch.float64)
    x = torch.cat([base[None], taus])
    G = torch.einsum("irc,jrc->ij", x, x).numpy()
    obj = DataFree(grams={"w": G}, targets=(0, 2))
    c = np.array([0.2, -0.1, 0.4])
    theta = base + torch.einsum("j,jrc->rc", torch.tensor(c), taus)
    targets = [base + taus[0], base + taus[2]]
    grad = theta - (targets[0] + targets[1]) / 2                           # ∇ of 1/(2|K|) Σ‖θ − θ_k‖²
    f = sum(((theta - t) ** 2).sum() for t in targets) / 4
    s = obj.scores({"w": c})["w"]
    np.testing.assert_allclose(s.inner, torch.einsum("rc,jrc->j", grad, taus).numpy(), rtol=1e-10)
    assert s.grad_base == pytest.approx(float((grad * base).sum()), rel=1e-10)
    assert s.grad_sq == pytest.approx(float((grad ** 2).sum()), rel=1e-10)
    np.testing.assert_allclose(s.weight_sq, ((base[None] + taus) ** 2).sum((1, 2)).numpy(), rtol=1e-10)
    assert obj.value({"w": c}) == pytest.approx(float(f), rel=1e-10)


# -- end to end: the trace, its slice invariance -------------------------------------------------

def _trace(folder: Path) -> dict:
    return json.loads((folder / "out" / "frank_wolfe_trace.json").read_text())


def _whole_vs_sliced(tmp_path: Path, models, spec: dict, slice_size: str,
                     dtype: str | None = "bfloat16") -> tuple[dict, dict]:
    """The same pipeline in-process on whole tensors and on Ray with 2 actors and
    ``slice_size`` slices (output ``dtype``; None: the inputs'): asserts the same output
    bytes, returns both traces."""
    runs = (("whole", "1GB", 1, "local"), ("sliced", slice_size, 2, RayExecutor(workers=2)))
    for name, size, workers, executor in runs:
        output = {"path": str(tmp_path / name / "out"), **({"dtype": dtype} if dtype else {})}
        pipe = make_pipeline(tmp_path / name, models, method=spec, output=output,
                             resources={"slice_size": size, "workers": workers})
        run_pipeline(load_pipeline(pipe), executor=executor, show_progress=False)
    assert sha256_tree(tmp_path / "whole" / "out") == sha256_tree(tmp_path / "sliced" / "out")
    return _trace(tmp_path / "whole"), _trace(tmp_path / "sliced")


FW_TENSOR_COSINE = {"name": "frank_wolfe", "granularity": "tensor", "score": "cosine", "iterations": 4,
                    "step": 1.0, "scale": 0.5, "init": "base"}


def test_trace_in_the_output_and_targets_by_path(tmp_path, tiny_models):
    spec = {"name": "frank_wolfe", "step": 1.0, "scale": 1.0, "init": "base", "iterations": 3,
            "objective": {"kind": "data_free", "targets": [str(tiny_models[2])]}}
    pipe = make_pipeline(tmp_path, tiny_models, method=spec, resources={"slice_size": "4KB", "workers": 1})
    run_pipeline(load_pipeline(pipe), executor="local", show_progress=False)
    trace = _trace(tmp_path)
    its = trace["iterations"]
    assert [r["iteration"] for r in its] == [0, 1, 2]
    # one target: the first step (γ0 = 1) lands on it; there ∇f = 0, every score ties (the
    # first expert is "picked") and the gap is 0, so the model stays
    assert [r["picked"] for r in its] == [str(tiny_models[2])] + [str(tiny_models[1])] * 2
    assert [r["moved"] for r in its] == [True, False, False]
    assert its[0]["objective"] > 0 and its[1]["objective"] == 0 and its[1]["fw_gap"] == 0
    assert [r["step"] for r in its] == [1.0, 2 / 3, 0.5]
    assert trace["coefficients"] == {str(m): (1.0 if m == tiny_models[2] else 0.0) for m in tiny_models[1:]}
    assert trace["method"]["objective"]["targets"] == [1]
    got = {}
    for p in (tmp_path / "out").glob("*.safetensors"):
        got.update(load_file(str(p)))
    want = {}
    for p in Path(tiny_models[2]).glob("*.safetensors"):
        want.update(load_file(str(p)))
    for n in want:                                    # θ₀ + 1·τ_target, in bf16: the target
        assert torch.equal(got[n], want[n]), n


@pytest.mark.ray
def test_trace_is_slice_invariant_local_vs_ray(ray_session, tmp_path, tiny_models):
    a, b = _whole_vs_sliced(tmp_path, tiny_models, FW_TENSOR_COSINE, "256B")
    assert a["iterations"] == b["iterations"] and a["coefficients"] == b["coefficients"]
    picks = {j for r in a["iterations"] for j in r["picked"].values()}
    assert len(picks) > 1, "tensor granularity picked one expert everywhere: a weak test"


@pytest.mark.ray
def test_ties_local_merge_is_slice_invariant_local_vs_ray(ray_session, tmp_path, tiny_models):
    spec = {**FW_TENSOR_COSINE, "local_merge": "ties", "init": "merge", "iterations": 2, "density": 0.4}
    a, b = _whole_vs_sliced(tmp_path, tiny_models, spec, "1KB")
    assert a["iterations"] == b["iterations"]
    assert len(a["stats_pass_bytes_read"]) == 3 + 3 * 2
    assert all(r["threshold"] > 0 for r in a["iterations"])


def test_metrics_export_the_last_iteration(tmp_path, tiny_models):
    from distmerge.metrics import RunEvents

    from distmerge.engine.driver import Run
    from distmerge.engine.executors import LocalExecutor

    pipe = load_pipeline(make_pipeline(tmp_path, tiny_models, method={**FW_TENSOR_COSINE, "iterations": 2}))
    events = RunEvents(pipe.name, show_progress=False)
    Run(pipe, executor=LocalExecutor(), events=events).execute()
    r = events.metrics.registry
    last = _trace(tmp_path)["iterations"][-1]
    assert r.get_sample_value("distmerge_fw_iteration", {"run": pipe.name}) == 1
    assert r.get_sample_value("distmerge_fw_objective", {"run": pipe.name}) == last["objective"]
    assert r.get_sample_value("distmerge_fw_gap", {"run": pipe.name}) == last["fw_gap"]


# -- refusals before any work -------------------------------------------------------------------

def _refused(tmp_path, models, err=ConfigError, **changes):
    pipe = make_pipeline(tmp_path, models, **changes)
    with pytest.raises(err) as info:
        validate(load_pipeline(pipe))
    assert not (tmp_path / "out").exists()
    return str(info.value)


def test_duplicate_expert_path_is_refused(tmp_path, tiny_models):
    models = [tiny_models[0], tiny_models[1], tiny_models[2], tiny_models[1]]
    msg = _refused(tmp_path, models, method={"name": "frank_wolfe"})
    assert "experts[2]" in msg and "experts[0] again" in msg


def test_duplicate_expert_through_a_link_is_refused(tmp_path, tiny_models):
    link = tmp_path / "same-as-expert-1"                 # another folder, the same files
    link.mkdir()
    for f in Path(tiny_models[1]).iterdir():
        (link / f.name).hardlink_to(f)
    msg = _refused(tmp_path / "p", [*tiny_models, link], method={"name": "frank_wolfe"})
    assert "same files" in msg


def test_a_copied_expert_is_refused_from_the_exact_gram(tmp_path, tiny_models):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_models[2], copy)
    pipe = make_pipeline(tmp_path / "p", [*tiny_models, copy], method={"name": "frank_wolfe"})
    with pytest.raises(ConfigError, match=r"experts\[3\] has the same weights as experts\[1\]"):
        run_pipeline(load_pipeline(pipe), executor="local", show_progress=False)
    assert not (tmp_path / "p" / "out").exists()


def test_expert_of_another_architecture_is_refused(tmp_path, tiny_models):
    other = tmp_path / "other"
    other.mkdir()
    save_file({"w": torch.zeros(3, 3)}, str(other / "model.safetensors"))
    _refused(tmp_path / "p", [*tiny_models, other], IncompatibleModelsError, method={"name": "frank_wolfe"})


def test_target_not_in_the_pool_is_refused(tmp_path, tiny_models):
    msg = _refused(tmp_path, tiny_models, method={"name": "frank_wolfe", "objective": {
        "kind": "data_free", "targets": [str(tmp_path / "elsewhere")]}})
    assert "targets[0]" in msg and "not one of the experts" in msg


@pytest.mark.parametrize("params, where", [
    ({"step": 0}, "method.step"),
    ({"iterations": 0}, "method.iterations"),
    ({"step": 1.0, "scale": 2.0}, "method.scale"),
    ({"granularity": "layer"}, "method.granularity"),
    ({"score": "dot"}, "method.score"),
    ({"local_merge": "dare"}, "method.local_merge"),
    ({"density": 1.5}, "method.density"),
    ({"objective": {"kind": "oracle"}}, "method.objective.kind"),
    ({"objective": {"kind": "data_free", "targets": []}}, "method.objective.targets"),
    ({"objective": {"kind": "data_free", "target": [0]}}, "method.objective.target"),
    ({"objective": {"kind": "data", "model": "nomodule", "tasks": [{"data": "x"}]}}, "method.objective.model"),
    ({"objective": {"kind": "data", "model": "a:b", "tasks": [{"data": "x", "loss": "mse"}]}},
     "method.objective.tasks[0].loss"),
    ({"stepsize": 1}, "method.stepsize"),
])
def test_bad_parameters_are_refused(params, where):
    with pytest.raises(ConfigError) as info:
        build("frank_wolfe", params)
    assert str(info.value).startswith(where + ":"), str(info.value)


def test_weights_and_overrides_are_refused(tmp_path, tiny_models):
    pipe = make_pipeline(tmp_path, tiny_models, method={"name": "frank_wolfe"})
    data = load_pipeline(pipe).model_dump()
    data["experts"][0]["weight"] = 2.0
    (tmp_path / "w.yaml").write_text(json.dumps(data))
    with pytest.raises(ConfigError, match="weight at 1"):
        validate(load_pipeline(tmp_path / "w.yaml"))
    msg = _refused(tmp_path / "o", tiny_models, method={"name": "frank_wolfe"},
                   overrides=[{"match": "*norm*", "iterations": 2}])
    assert "no overrides" in msg


# -- the data objective -----------------------------------------------------------------------

class TinyMLP(torch.nn.Module):
    """6 → 5 → 3 classes, with an integer buffer (copied from the base, no gradient)."""

    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(6, 5)
        self.fc2 = torch.nn.Linear(5, 3)
        self.register_buffer("version", torch.tensor([7], dtype=torch.int64))

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


def tiny_mlp() -> TinyMLP:
    return TinyMLP()


def _mlp_pool(folder: Path, n: int = 3) -> list[Path]:
    g = torch.Generator().manual_seed(5)
    base = {k: v.clone() for k, v in TinyMLP().state_dict().items()}
    for k in ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"):
        base[k] = torch.randn(base[k].shape, generator=g) * 0.5
    paths = []
    for i in range(n + 1):
        d = folder / (f"e{i}" if i else "base")
        d.mkdir(parents=True)
        t = {k: (v + torch.randn(v.shape, generator=g) * 0.3 if i and v.is_floating_point() else v)
             for k, v in base.items()}
        save_file(t, str(d / "model.safetensors"))
        paths.append(d)
    return paths


def _mlp_data(folder: Path) -> list[dict]:
    g = torch.Generator().manual_seed(6)
    x1, y1 = torch.randn(23, 6, generator=g), torch.randint(0, 3, (23,), generator=g)
    x2 = torch.randn(17, 6, generator=g)
    save_file({"inputs": x1, "labels": y1}, str(folder / "labelled.safetensors"))
    save_file({"inputs": x2}, str(folder / "unlabelled.safetensors"))
    return [{"data": str(folder / "labelled.safetensors"), "loss": "cross_entropy"},
            {"data": str(folder / "unlabelled.safetensors"), "loss": "entropy"}]


def _data_spec(tasks, **kw) -> dict:
    return {"name": "frank_wolfe", "iterations": 3, "step": 1.0, "scale": 0.5, **kw,
            "objective": {"kind": "data", "model": "tests.test_frank_wolfe:tiny_mlp",
                          "tasks": tasks, "batch_size": 7}}


def _direct_loss(state: dict[str, torch.Tensor], tasks) -> torch.Tensor:
    """f over the whole sets, on the whole model, for autograd."""
    model = TinyMLP().eval()
    losses = []
    for t in tasks:
        d = load_file(t["data"])
        logits = torch.func.functional_call(model, state, (d["inputs"],))
        if t["loss"] == "cross_entropy":
            losses.append(torch.nn.functional.cross_entropy(logits, d["labels"]))
        else:
            p = torch.softmax(logits, -1)
            losses.append(-(p * torch.log(p)).sum(-1).mean())
    return sum(losses) / len(losses)


def test_data_gradient_matches_autograd_on_the_whole_model(tmp_path):
    from distmerge.select.gradient import GradientStage

    models = _mlp_pool(tmp_path / "m")
    tasks = _mlp_data(tmp_path)
    pipe = load_pipeline(make_pipeline(tmp_path, models, method=_data_spec(tasks),
                                       output={"path": str(tmp_path / "out")}))
    v = validate(pipe)
    stage = GradientStage(v.methods.default, base=v.base, experts=v.experts, folder=str(tmp_path / "g"))
    ctx = stage.run(0, {})
    got = load_file(str(tmp_path / "g" / "model.safetensors"))
    # θ^0 (init: merge) = θ₀ + scale · Σ_j τ_j, in fp32 as the merge pass computes it
    pool = [load_file(str(m / "model.safetensors")) for m in models]
    theta = {}
    for k, b in pool[0].items():
        if b.is_floating_point():
            acc = (pool[1][k] - b) * 0.5
            for e in pool[2:]:
                acc += (e[k] - b) * 0.5
            theta[k] = (b + acc).requires_grad_()
        else:
            theta[k] = b
    f = _direct_loss(theta, tasks)
    floats = [k for k in theta if theta[k].is_floating_point()]
    grads = torch.autograd.grad(f, [theta[k] for k in floats])
    for k, gk in zip(floats, grads):
        torch.testing.assert_close(got[k], gk, rtol=1e-5, atol=1e-7)
    assert torch.equal(got["version"], torch.zeros(1))               # an integer buffer: 0
    assert ctx["frank_wolfe"]["objective_now"] == pytest.approx(float(f.detach()), rel=1e-6)
    stage.remove()
    assert not (tmp_path / "g").exists()


@pytest.mark.ray
@pytest.mark.parametrize("granularity, score, local_merge", [
    ("model", "inner", "task_arithmetic"), ("tensor", "cosine", "task_arithmetic"), ("tensor", "inner", "ties")])
def test_data_objective_end_to_end_local_vs_ray(ray_session, tmp_path, granularity, score, local_merge):
    models = _mlp_pool(tmp_path / "m")
    tasks = _mlp_data(tmp_path)
    ties = local_merge == "ties"
    spec = _data_spec(tasks, granularity=granularity, score=score, local_merge=local_merge,
                      **({"init": "base", "density": 0.5} if ties else {}))
    a, b = _whole_vs_sliced(tmp_path, models, spec, "16B", dtype=None)
    assert a["iterations"] == b["iterations"] and a["coefficients"] == b["coefficients"]
    assert not any(p.name == "frank_wolfe_gradient" for p in (tmp_path / "whole" / "out").iterdir())
    # iteration 0 against autograd: f(θ^0) and the pick from ⟨∇f, τ_j⟩ (or cos(∇f, θ_j))
    pool = [load_file(str(m / "model.safetensors")) for m in models]
    floats = [k for k, t in pool[0].items() if t.is_floating_point()]
    theta = {k: (pool[0][k] + (0 if ties else sum((e[k] - pool[0][k]) * 0.5 for e in pool[1:]))).requires_grad_()
             if k in floats else pool[0][k] for k in pool[0]}
    f = _direct_loss(theta, tasks)
    grads = dict(zip(floats, torch.autograd.grad(f, [theta[k] for k in floats])))
    first = a["iterations"][0]
    assert first["objective"] == pytest.approx(float(f.detach()), rel=1e-5)
    if granularity == "model":
        inner = [sum(float((grads[k] * (e[k] - pool[0][k])).sum()) for k in floats) for e in pool[1:]]
        assert first["picked"] == str(models[1 + int(np.argmin(inner))])
    else:
        for k in floats:
            cos = [float(torch.nn.functional.cosine_similarity(grads[k].flatten(), e[k].flatten(), dim=0))
                   for e in pool[1:]]
            assert first["picked"][k] == str(models[1 + int(np.argmin(cos))]), k
    # iteration 0's FW gap: Σ ⟨∇f, θ^0 − θ₀⟩ − min over the inner-score vertex of ⟨∇f, τ_v⟩
    # (per tensor for tensor granularity): it decides which tensors are held
    taus = [{k: e[k] - pool[0][k] for k in floats} for e in pool[1:]]
    shift = {k: theta[k].detach() - pool[0][k] for k in floats}
    dot = lambda k, x: float((grads[k].double() * x.double()).sum())           # noqa: E731
    if granularity == "model":
        gap = sum(dot(k, shift[k]) for k in floats) - min(sum(dot(k, tau[k]) for k in floats) for tau in taus)
    else:
        gap = sum(dot(k, shift[k]) - min(dot(k, tau[k]) for tau in taus) for k in floats)
    assert first["fw_gap"] == pytest.approx(gap, rel=1e-4, abs=1e-7)
    assert len(a["gradient_stage_bytes_read"]) == 4         # 3 iterations + the final objective
    assert len(a["stats_pass_bytes_read"]) == (9 if ties else 3) and min(a["stats_pass_bytes_read"]) > 0
    if ties:
        assert a["coefficients"] is None and all("threshold" in r for r in a["iterations"])
    assert "final_objective" in a


def test_data_objective_refusals(tmp_path):
    models = _mlp_pool(tmp_path / "m")
    tasks = _mlp_data(tmp_path)
    bad_model = _data_spec(tasks)
    bad_model["objective"]["model"] = "tests.test_frank_wolfe:_mlp_data"
    with pytest.raises(ConfigError, match="failed|torch.nn.Module"):
        validate(load_pipeline(make_pipeline(tmp_path / "a", models, method=bad_model)))
    other = _data_spec(tasks)
    other["objective"]["model"] = "torch.nn:Identity"
    with pytest.raises(ConfigError, match="does not match the checkpoint"):
        validate(load_pipeline(make_pipeline(tmp_path / "b", models, method=other)))
    no_labels = _data_spec([{"data": tasks[1]["data"], "loss": "cross_entropy"}])
    with pytest.raises(ConfigError, match="needs a tensor 'labels'"):
        validate(load_pipeline(make_pipeline(tmp_path / "c", models, method=no_labels)))
    missing = _data_spec([{"data": str(tmp_path / "nope.safetensors")}])
    with pytest.raises(ConfigError, match="is not a file"):
        validate(load_pipeline(make_pipeline(tmp_path / "d", models, method=missing)))


# -- resume -------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["data", "ties"])
def test_a_crash_mid_iterations_resumes_to_the_same_trace_and_bytes(tmp_path, tiny_models, kind):
    from tests.test_resume import Crash, CrashesAfter

    if kind == "data":
        models = _mlp_pool(tmp_path / "m")
        spec, crash_round = _data_spec(_mlp_data(tmp_path)), 1              # iteration 1's pass
    else:
        models = tiny_models
        spec = {**FW_TENSOR_COSINE, "local_merge": "ties", "iterations": 2, "density": 0.4}
        crash_round = 4                                                     # iteration 0's low trim round
    runs = {}
    for name in ("straight", "resumed"):
        root = tmp_path / name
        pipe = make_pipeline(root, models, method=spec, output={"path": str(root / "out")},
                             resources={"slice_size": "64B", "workers": 1})
        if name == "resumed":
            with pytest.raises(Crash):
                run_pipeline(load_pipeline(pipe), executor=CrashesAfter(1, crash_round), show_progress=False)
            assert not (root / "out").exists()
            s = run_pipeline(load_pipeline(pipe), executor="local", show_progress=False, resume=True)
            assert s.stats_rounds_restored == crash_round
        else:
            run_pipeline(load_pipeline(pipe), executor="local", show_progress=False)
        runs[name] = (_trace(root), sha256_tree(root / "out"))
    (a, ha), (b, hb) = runs["straight"], runs["resumed"]
    assert a["iterations"] == b["iterations"] and a["coefficients"] == b["coefficients"]
    assert ha == hb


def test_every_data_iteration_matches_an_autograd_replay(tmp_path):
    """Each iteration's f, pick and gap from a replay of the iteration with autograd on the
    whole model (catches a stale gradient checkpoint after the first iteration)."""
    models = _mlp_pool(tmp_path / "m")
    tasks = _mlp_data(tmp_path)
    spec = _data_spec(tasks, iterations=4)
    pipe = make_pipeline(tmp_path, models, method=spec, output={"path": str(tmp_path / "out")},
                         resources={"slice_size": "64B", "workers": 1})
    run_pipeline(load_pipeline(pipe), executor="local", show_progress=False)
    its = _trace(tmp_path)["iterations"]
    pool = [load_file(str(m / "model.safetensors")) for m in models]
    floats = [k for k, t in pool[0].items() if t.is_floating_point()]
    c = np.full(3, 0.5)                                                    # init merge, scale .5
    picks = set()
    for t, rec in enumerate(its):
        theta = {k: (pool[0][k] + sum((e[k] - pool[0][k]) * float(cj) for e, cj in zip(pool[1:], c))).requires_grad_()
                 if k in floats else pool[0][k] for k in pool[0]}
        f = _direct_loss(theta, tasks)
        grads = torch.autograd.grad(f, [theta[k] for k in floats])
        inner = np.array([sum(float((g * (e[k] - pool[0][k])).double().sum()) for k, g in zip(floats, grads))
                          for e in pool[1:]])
        j = int(np.argmin(inner))
        assert rec["objective"] == pytest.approx(float(f.detach()), rel=1e-5), t
        assert rec["picked"] == str(models[1 + j]), t
        assert rec["fw_gap"] == pytest.approx(float(c @ inner - inner.min()), rel=1e-4, abs=1e-7), t
        eta = 0.5 * gamma(t, 1.0)
        if rec["moved"]:
            c = (1 - eta) * c
            c[j] += eta
        picks.add(j)
    assert len(picks) > 1, "one expert picked throughout: a weak replay"
