"""The LiNeS modifier (``method: {name: ..., lines: {alpha, beta}}``): hand-computed values on a
2-layer toy model, auto α, layer indices from tensor names, slice invariance, the engine against
the in-memory protocol, and the config errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from distmerge.config import load_pipeline
from distmerge.engine.driver import run_pipeline
from distmerge.engine.executors import RayExecutor
from distmerge.errors import ConfigError
from distmerge.methods import Block, build
from distmerge.methods.lines import Lines, layer_index
from distmerge.methods.ties import Ties
from tests.conftest import make_pipeline, sha256_tree
from tests.harness import merge_tensors

L0, L1, NORM = "model.layers.0.w", "model.layers.1.w", "model.norm"

# A 2-layer toy model (L = 2) and two experts, by their task vectors.
BASE = {L0: torch.tensor([[1.0, 2.0]]), L1: torch.tensor([[0.0, -1.0], [1.0, 1.0]]),
        NORM: torch.tensor([4.0, 4.0])}
TAU = [
    {L0: torch.tensor([[1.0, -2.0]]), L1: torch.tensor([[2.0, 2.0], [1.0, 1.0]]), NORM: torch.tensor([0.5, -1.0])},
    {L0: torch.tensor([[1.0, 0.0]]), L1: torch.tensor([[-4.0, 2.0], [1.0, -1.0]]), NORM: torch.tensor([0.5, 3.0])},
]
EXPERTS = [{n: BASE[n] + t[n] for n in BASE} for t in TAU]
# Σ_t τ_t = task arithmetic's τ_merged at λ = 1; ‖Σ_t τ_t‖₁ = 4 + 8 + 3 = 15
TAU_SUM = {L0: torch.tensor([[2.0, -2.0]]), L1: torch.tensor([[-2.0, 4.0], [2.0, 0.0]]), NORM: torch.tensor([1.0, 2.0])}


def _merge(method, params, rows=None, base=BASE, experts=EXPERTS, overrides=(), weights=None):
    return merge_tensors(build(method, params, list(overrides)), base, experts, weights, rows_per_block=rows)


def _expect(scales, tau_m, base=BASE):
    return {n: base[n] + tau_m[n] * scales[n] for n in base}


def _assert_equal(got, want):
    for n in want:
        assert torch.equal(got[n], want[n]), f"{n}: got {got[n]}, want {want[n]}"


@pytest.mark.parametrize("rows", [None, 1])
def test_explicit_alpha_beta_on_two_layers(rows):
    # α = 0.5, β = 1, L = 2: s(0) = 0.5, s(1) = 0.5 + 1·1/1 = 1.5, model.norm (no block): α.
    # θ = θ₀ + s·Σ τ: layer 0 [[1, 2]] + [[1, −1]] = [[2, 1]];
    # layer 1 [[0, −1], [1, 1]] + [[−3, 6], [3, 0]] = [[−3, 5], [4, 1]]; norm [4, 4] + [.5, 1]
    got = _merge("task_arithmetic", {"lines": {"alpha": 0.5, "beta": 1.0}}, rows)
    _assert_equal(got, {L0: torch.tensor([[2.0, 1.0]]), L1: torch.tensor([[-3.0, 5.0], [4.0, 1.0]]),
                        NORM: torch.tensor([4.5, 5.0])})


@pytest.mark.parametrize("rows", [None, 1])
def test_auto_alpha_task_arithmetic(rows):
    # τ_merged = Σ τ, so α = ‖Σ τ‖₁ / (T ‖Σ τ‖₁) = 15 / (2·15) = 1/2; β = 0.5 (default):
    # s(0) = 0.5, s(1) = 0.5 + 0.5 = 1, norm 0.5
    got = _merge("task_arithmetic", {"lines": {}}, rows)
    _assert_equal(got, {L0: torch.tensor([[2.0, 1.0]]), L1: torch.tensor([[-2.0, 3.0], [3.0, 1.0]]),
                        NORM: torch.tensor([4.5, 5.0])})


def test_auto_alpha_cancels_the_inner_scale_but_beta_does_not():
    # λ = 2: τ_merged = 2 Σ τ, α = 15 / (2·30) = 1/4: layer 0 and norm get 0.25·2 = 0.5 of Σ τ
    # as before; layer 1 gets (0.25 + 0.5)·2 = 1.5 of Σ τ (β multiplies the scaled vector)
    got = _merge("task_arithmetic", {"scale": 2.0, "lines": {"beta": 0.5}})
    _assert_equal(got, _expect({L0: 0.5, L1: 1.5, NORM: 0.5}, TAU_SUM))


def test_auto_alpha_ignores_expert_weights_and_counts_experts():
    # weights 2, 2: τ_merged = 2 Σ τ; α uses the unweighted Σ τ and T = 2 → α = 15 / (2·30)
    got = _merge("task_arithmetic", {"lines": {"beta": 0.0}}, weights=[2.0, 2.0])
    _assert_equal(got, _expect({L0: 0.5, L1: 0.5, NORM: 0.5}, TAU_SUM))


@pytest.mark.parametrize("rows", [None, 1])
def test_auto_alpha_around_ties(rows):
    # TIES, density 1 (nothing trimmed), scope model. Elected sums Σ τ: layer 0 [[2, −2]],
    # layer 1 [[−2, 4], [2, 0]], norm [1, 2]; the model-wide sum of elected signs is
    # 1 − 1 − 1 + 1 + 1 + 0 + 1 + 1 = 3 > 0, so the cancelled entry [1][1] elects + (keeps τ1 = 1).
    # Disjoint means: layer 0 [[1, −2]] (τ2's 0 does not agree), layer 1 [[−4, 2], [1, 1]],
    # norm [0.5, 3]; ‖τ_m‖₁ = 3 + 8 + 3.5 = 14.5, so α = 15 / (2·14.5) = 15/29 and with β = 0.5:
    # s(0) = s(norm) = 15/29, s(1) = 15/29 + 1/2 = 59/58, each rounded to fp32.
    got = _merge("ties", {"density": 1.0, "lines": {"beta": 0.5}}, rows)
    tau_m = {L0: torch.tensor([[1.0, -2.0]]), L1: torch.tensor([[-4.0, 2.0], [1.0, 1.0]]),
             NORM: torch.tensor([0.5, 3.0])}
    a = float(np.float32(15 / 29))
    _assert_equal(got, _expect({L0: a, L1: float(np.float32(59 / 58)), NORM: a}, tau_m))


def test_alpha_and_beta_each_change_the_result():
    base = _merge("task_arithmetic", {"lines": {"alpha": 0.75, "beta": 1.0}})
    for changed in ({"alpha": 0.25, "beta": 1.0}, {"alpha": 0.75, "beta": 0.5}, {"beta": 1.0}):   # auto α: 0.5
        got = _merge("task_arithmetic", {"lines": changed})
        assert any(not torch.equal(got[n], base[n]) for n in base), changed


def test_layer_count_is_the_largest_index_over_the_model():
    # layers 0 and 3 only: L = 4, so layer 3 gets α + β·3/3 and layer 0 gets α; s(1) is not used
    base = {"model.layers.0.w": torch.zeros(1, 2), "model.layers.3.w": torch.zeros(1, 2)}
    experts = [{n: torch.tensor([[1.0, 2.0]]) for n in base}, {n: torch.tensor([[3.0, -2.0]]) for n in base}]
    got = _merge("task_arithmetic", {"lines": {"alpha": 0.5, "beta": 2.0}}, base=base, experts=experts)
    assert torch.equal(got["model.layers.0.w"], torch.tensor([[2.0, 0.0]]))      # 0.5·[4, 0]
    assert torch.equal(got["model.layers.3.w"], torch.tensor([[10.0, 0.0]]))     # 2.5·[4, 0]


def test_a_single_layer_gets_alpha():
    base = {"model.layers.0.w": torch.zeros(1, 2)}
    experts = [{"model.layers.0.w": torch.tensor([[1.0, 2.0]])}] * 2
    got = _merge("task_arithmetic", {"lines": {"alpha": 0.5, "beta": 2.0}}, base=base, experts=experts)
    assert torch.equal(got["model.layers.0.w"], torch.tensor([[1.0, 2.0]]))      # 0.5·[2, 4]


def test_given_alpha_without_any_layer_scales_every_tensor_by_alpha():
    # no tensor name has a block index, so the statistics round reports nothing: s = α everywhere
    base = {"embed.weight": torch.zeros(1, 2), "norm.weight": torch.ones(2)}
    experts = [{"embed.weight": torch.tensor([[1.0, 2.0]]), "norm.weight": torch.tensor([2.0, 0.0])}] * 2
    got = _merge("task_arithmetic", {"lines": {"alpha": 0.25}}, base=base, experts=experts)
    assert torch.equal(got["embed.weight"], torch.tensor([[0.5, 1.0]]))          # 0.25·[2, 4]
    assert torch.equal(got["norm.weight"], torch.tensor([1.5, 0.5]))             # 1 + 0.25·[2, −2]


def test_zero_merged_task_vector_gives_the_base():
    # every expert equals the base: ‖τ_merged‖₁ = 0, α has no value, θ = θ₀
    got = _merge("ties", {"lines": {}}, experts=[BASE, BASE])
    _assert_equal(got, BASE)


@pytest.mark.parametrize("name, want", [
    ("model.layers.12.mlp.up_proj.weight", 12),
    ("layers.0.attention.wq.weight", 0),
    ("transformer.h.3.attn.c_attn.weight", 3),
    ("vit.blocks.7.norm1.weight", 7),
    ("model.layers.3.block_sparse_moe.experts.5.w1.weight", 3),    # the first index
    ("model.embed_tokens.weight", None),
    ("model.norm.weight", None),
    ("lm_head.weight", None),
    ("model.xlayers.1.w", None),          # not a `layers` component
    ("transformer.h.3", None),            # no component after the index
    ("model.layers.x.w", None),
])
def test_layer_index_from_names(name, want):
    assert layer_index(name) == want


def test_auto_alpha_equals_the_formula_on_random_data():
    # α from the exact statistics equals the fp64 formula over the whole model; the result is
    # θ₀ + fp32(s)·(θ_TIES − θ₀)
    g = torch.Generator().manual_seed(3)
    names = ["model.embed_tokens.weight", "model.layers.0.q.weight", "model.layers.1.q.weight",
             "model.layers.2.q.weight", "model.norm.weight"]
    base = {n: torch.randn(6, 5, generator=g) for n in names}
    experts = [{n: b + torch.randn(b.shape, generator=g) / 8 for n, b in base.items()} for _ in range(3)]
    ties = merge_tensors(build("ties", {"density": 0.4}), base, experts)
    got = merge_tensors(build("ties", {"density": 0.4, "lines": {"beta": 0.3}}), base, experts)
    sum_l1 = sum(float(sum(e[n] - base[n] for e in experts).abs().double().sum()) for n in names)
    merged_l1 = sum(float((ties[n] - base[n]).abs().double().sum()) for n in names)
    alpha = sum_l1 / (3 * merged_l1)
    for n in names:
        ell = layer_index(n)
        s = alpha + (0.3 * ell / 2 if ell is not None else 0.0)
        assert torch.equal(got[n], base[n] + (ties[n] - base[n]) * float(np.float32(s))), n


def _tie_heavy(names, n_experts=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(13, 7), (1, 11), (9,), (5, 4)]
    base = {n: (torch.randint(-8, 8, shapes[i % 4], generator=g) / 16).bfloat16().float()
            for i, n in enumerate(names)}
    experts = [{n: (b + torch.randint(-3, 4, b.shape, generator=g) / 64).bfloat16().float()
                for n, b in base.items()} for _ in range(n_experts)]
    return base, experts


SPECS = [
    ("ties", {"density": 0.3, "lines": {"beta": 0.5}}, []),
    ("ties", {"density": 0.3, "scope": "tensor", "lines": {"alpha": 0.3, "beta": 0.7}}, []),
    ("ties", {"density": 0.3, "lines": {}}, [("model.layers.1.*", {"density": 0.6, "scope": "tensor"})]),
    ("task_arithmetic", {"scale": 0.5, "lines": {"beta": 1.5}}, [("model.norm*", {"scale": 2.0})]),
]


@pytest.mark.parametrize("method, params, overrides", SPECS, ids=lambda x: str(x)[:40])
def test_slice_invariance_in_memory(method, params, overrides):
    names = ["model.embed_tokens.weight", "model.layers.0.a.weight", "model.layers.0.norm.weight",
             "model.layers.1.a.weight", "model.layers.1.b.weight", "model.layers.2.a.weight", "model.norm.weight"]
    base, experts = _tie_heavy(names)
    weights = [1.0, 0.5, 2.0]
    whole = _merge(method, params, base=base, experts=experts, overrides=overrides, weights=weights)
    plain = _merge(method, {k: v for k, v in params.items() if k != "lines"}, base=base,
                   experts=experts, overrides=overrides, weights=weights)
    assert any(not torch.equal(whole[n], plain[n]) for n in names)       # lines did something
    for rows in (1, 3):
        blocks = _merge(method, params, rows, base=base, experts=experts, overrides=overrides, weights=weights)
        for n in names:
            assert torch.equal(whole[n], blocks[n]), (n, rows)


def test_statistics_keys_are_prefixed_and_rounds_add_one():
    inner = Ties(density=0.3)
    lines = Lines(inner=inner)
    assert lines.rounds == inner.rounds + 1
    assert lines.group("model.layers.0.w") == "lines:" + inner.group("model.layers.0.w")
    ms = build("ties", {"density": 0.3, "lines": {}})
    base, experts = _tie_heavy([L0, NORM])
    ctx: dict = {}
    for rnd in range(ms.rounds):
        totals = {}
        for n in base:
            b2 = base[n].reshape(base[n].shape[0], -1) if base[n].dim() == 2 else base[n].reshape(1, -1)
            block = Block(name=n, base=b2, experts=torch.stack([e[n].reshape(b2.shape) for e in experts]),
                          weights=(1.0, 1.0, 1.0), row_start=0)
            part = ms.for_tensor(n).stats(rnd, block, ctx)
            assert part and all(k.startswith("lines:") for k in part), part.keys()
            totals.update(part)
        ctx = ms.reduce(rnd, totals, ctx, sorted(base))
    assert set(ctx["lines:model"]) == {"sum_l1", "merged_l1", "layers"}
    assert ctx["lines:model"]["layers"] == 1


@pytest.mark.parametrize("method, params, bad", [
    ("linear", {"lines": {}}, "method.lines:"),
    ("model_stock", {"lines": {"beta": 0.5}}, "method.lines:"),
    ("slerp", {"lines": {}}, "method.lines:"),
    ("ties", {"lines": 0.5}, "method.lines:"),
    ("ties", {"lines": None}, "method.lines:"),
    ("ties", {"lines": {"gamma": 1}}, "method.lines.gamma:"),
    ("ties", {"lines": {"alpha": "auto"}}, "method.lines.alpha:"),
    ("ties", {"lines": {"alpha": True}}, "method.lines.alpha:"),
    ("ties", {"lines": {"alpha": float("inf")}}, "method.lines.alpha:"),
    ("ties", {"lines": {"beta": None}}, "method.lines.beta:"),
    ("ties", {"lines": {"beta": float("nan")}}, "method.lines.beta:"),
    ("ties", {"lines": {"beta": 10 ** 400}}, "method.lines:"),
    ("ties", {"density": 2.0, "lines": {}}, "method.density:"),
])
def test_config_errors_name_the_key(method, params, bad):
    with pytest.raises(ConfigError, match=f"^{bad.replace('.', '[.]')}"):
        build(method, params)


def test_lines_is_set_once_not_per_override():
    with pytest.raises(ConfigError, match=r"^overrides\[0\]\.lines:"):
        build("ties", {"lines": {}}, [("*.norm*", {"lines": {"beta": 1.0}})])
    ms = build("ties", {"lines": {"alpha": 0.25}}, [("*.norm*", {"density": 0.5})])
    assert all(isinstance(m, Lines) and m.alpha == 0.25 for m in ms.all())
    assert ms.for_tensor("model.norm.weight").inner.density == 0.5


def test_integer_alpha_and_beta_are_numbers():
    m = build("ties", {"lines": {"alpha": 1, "beta": 0}}).default
    assert (m.alpha, m.beta) == (1.0, 0.0) and isinstance(m.alpha, float)


# -- through the engine ---------------------------------------------------------------------

def _load_model(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


ENGINE = [
    ({"name": "ties", "density": 0.3, "lines": {"beta": 0.5}}, [{"match": "model.layers.1.*", "density": 0.6}]),
    ({"name": "ties", "density": 0.3, "scope": "tensor", "lines": {"alpha": 0.4, "beta": 1.0}}, []),
]


@pytest.mark.parametrize("method, overrides", ENGINE, ids=["ties-model-auto-override", "ties-tensor-alpha"])
def test_engine_output_equals_the_in_memory_protocol(tmp_path, tiny_models, method, overrides):
    weights = [1.0, 0.5, 2.0]
    pipe = make_pipeline(tmp_path, tiny_models, method=method, overrides=overrides,
                         experts=[{"path": str(m), "weight": w} for m, w in zip(tiny_models[1:], weights)],
                         resources={"workers": 1, "slice_size": "2KB"})
    run_pipeline(load_pipeline(pipe), executor="local", show_progress=False)
    base = _load_model(tiny_models[0])
    experts = [_load_model(m) for m in tiny_models[1:]]
    params = {k: v for k, v in method.items() if k != "name"}
    ms = build(method["name"], params, [(o["match"], {k: v for k, v in o.items() if k != "match"})
                                         for o in overrides])
    want = merge_tensors(ms, base, experts, weights)
    plain = merge_tensors(build(method["name"], {k: v for k, v in params.items() if k != "lines"}),
                          base, experts, weights)
    got = _load_model(tmp_path / "out")
    assert set(got) == set(want)
    for name in want:
        assert torch.equal(got[name], want[name].bfloat16()), name
    assert not torch.equal(got["model.layers.1.mlp.up_proj.weight"],
                           plain["model.layers.1.mlp.up_proj.weight"].bfloat16())


@pytest.mark.ray
def test_engine_slice_invariance_on_ray(ray_session, tmp_path, tiny_models):
    spec = {"name": "ties", "density": 0.3, "lines": {"beta": 0.5}}
    whole = make_pipeline(tmp_path / "whole", tiny_models, method=spec,
                          resources={"slice_size": "1GB", "workers": 1})
    sliced = make_pipeline(tmp_path / "sliced", tiny_models, method=spec,
                           resources={"slice_size": "64B", "workers": 2})
    run_pipeline(load_pipeline(whole), executor="local", show_progress=False)
    run_pipeline(load_pipeline(sliced), executor=RayExecutor(workers=2), show_progress=False)
    assert sha256_tree(tmp_path / "whole" / "out") == sha256_tree(tmp_path / "sliced" / "out")
