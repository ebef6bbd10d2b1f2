"""frank_wolfe's sketched scoring (``objective.scoring: sketch``): the hash and the sketch against
direct computations, the error statement against exact scores computed with torch, slice and
placement invariance of the trace and the output, the bytes later iterations read, the
``auto`` choice (local files: exact; a pool on a real S3 server that does not fit the resident
budget: sketch) and the refusals."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from distmerge.config import load_pipeline
from distmerge.engine.driver import Run, run_pipeline
from distmerge.engine.executors import RayExecutor
from distmerge.errors import ConfigError
from distmerge.methods import build
from distmerge.reduce import exact_value
from distmerge.select.sketch import (
    PoolSketch,
    bucket_sign,
    buckets,
    choose_scoring,
    sketch_bytes_for,
    sketch_pool,
    sketch_rows,
    sketched_products,
)
from tests.conftest import make_pipeline, sha256_tree
from tests.test_frank_wolfe import _data_spec, _mlp_data, _mlp_pool

MASK = (1 << 64) - 1


def _ref_hash(tensor: str, index: int, q: int) -> tuple[int, int]:
    """splitmix64 with Python integers: (bucket, sign) of flat index ``index``."""
    seed = int.from_bytes(hashlib.blake2b(tensor.encode(), digest_size=8).digest(), "little")
    z = (seed + (index + 1) * 0x9E3779B97F4A7C15) & MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
    z ^= z >> 31
    return ((z >> 32) * q) >> 32, 1 - 2 * (z & 1)


# -- the hash and the sketch ---------------------------------------------------------------------

def test_bucket_and_sign_against_python_integers():
    cols, q = 37, buckets(37, 4)
    assert q == 10 and buckets(3, 16) == 1 and buckets(32, 16) == 2
    h, s = bucket_sign("model.layers.0.mlp.up_proj.weight", cols, q, 5, 9)       # rows 5..8
    for r in range(4):
        for c in range(cols):
            b, sign = _ref_hash("model.layers.0.mlp.up_proj.weight", (5 + r) * cols + c, q)
            assert (h[r, c], s[r, c]) == (b, sign)
    # a usable hash: buckets near uniform and signs balanced over many entries
    h, s = bucket_sign("w", 4096, 16, 0, 64)
    counts = np.bincount(h.ravel(), minlength=16)
    assert counts.min() > 0.9 * counts.mean() and counts.max() < 1.1 * counts.mean()
    assert abs(s.mean()) < 0.01
    # another tensor name: other buckets
    assert (bucket_sign("v", 4096, 16, 0, 64)[0] != h).mean() > 0.8


def test_the_sketch_of_a_block_against_a_loop():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 21, generator=g).double().numpy()                         # [m, rows, cols]
    q = buckets(21, 4)
    h, s = bucket_sign("t", 21, q, 7, 11)
    want = np.zeros((3, 4, q))
    for i in range(3):
        for r in range(4):
            for c in range(21):                              # columns in order, in fp64
                want[i, r, h[r, c]] += s[r, c] * x[i, r, c]
    got = sketch_rows(x, h, s, q)
    assert np.array_equal(got, want)                         # bit for bit: the same order


def _pool_block(seed: int, n: int, rows: int, cols: int):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(rows, cols, generator=g)
    pool = base + 0.3 * torch.randn(n, rows, cols, generator=g)
    grad = torch.randn(rows, cols, generator=g)
    return base, pool, grad


def test_sketched_products_against_a_direct_computation_and_any_row_split():
    base, pool, grad = _pool_block(1, 3, 6, 40)
    k = sketch_pool("w", 10, base, pool, ratio=8)                                    # rows 10..15
    assert k.q == 5 and k.y.dtype == np.float32 and k.y.shape == (4, 6, 5)
    assert k.nbytes == 4 * 6 * 5 * 4 + 7 * 6 * 8
    got = sketched_products("w", 10, k, grad)
    vals = np.array([exact_value(int(v)) for v in got])
    x = torch.cat([base[None], pool - base[None]]).double()                         # [4, rows, cols]
    h, s = bucket_sign("w", 40, 5, 10, 16)
    sx = np.zeros((4, 6, 5))
    sg = np.zeros((6, 5))
    for r in range(6):
        for c in range(40):
            sx[:, r, h[r, c]] += s[r, c] * x[:, r, c].numpy()
            sg[r, h[r, c]] += s[r, c] * float(grad[r, c])
    est = (sg.astype(np.float32).astype(np.float64)[None] * sx.astype(np.float32).astype(np.float64)).sum((1, 2))
    np.testing.assert_allclose(vals[:4], est, rtol=1e-12)
    g64 = grad.double()
    assert vals[4] == pytest.approx(float((g64 ** 2).sum()), rel=1e-14)             # ‖g‖² exact
    gr = (g64 ** 2).sum(1)                                                           # [rows]
    xs = torch.cat([x, pool.double()])                                               # θ₀, τ_j, θ_j
    want_var = (2 * gr[None] * (xs ** 2).sum(2) / 5).sum(1).numpy()
    np.testing.assert_allclose(vals[5:], want_var, rtol=1e-12)
    # rows are never split: any row split gives the same exact integers
    parts = [sketched_products("w", 10 + a, sketch_pool("w", 10 + a, base[a:b], pool[:, a:b], ratio=8),
                               grad[a:b]) for a, b in ((0, 1), (1, 4), (4, 6))]
    assert [int(v) for v in got] == [sum(int(p[i]) for p in parts) for i in range(len(got))]


def test_the_error_statement_over_independent_hashes():
    """Over many tensor names (independent hashes) the estimate of ⟨g, τ⟩ is unbiased and its
    mean squared error stays within the stated bound Σ_r 2‖g_r‖²‖τ_r‖²/q."""
    base, pool, grad = _pool_block(2, 1, 4, 64)
    tau = (pool[0] - base).double()
    exact = float((grad.double() * tau).sum())
    errs, bounds = [], []
    for k in range(400):
        name = f"layer{k}.weight"
        v = sketched_products(name, 0, sketch_pool(name, 0, base, pool, ratio=8), grad)
        errs.append(exact_value(int(v[1])) - exact)
        bounds.append(exact_value(int(v[4])))                                      # V_τ_1
    errs = np.array(errs)
    bound = float(np.mean(bounds))
    assert abs(errs.mean()) < 4 * np.sqrt(bound / len(errs))                       # unbiased
    ratio = float(np.mean(errs ** 2)) / bound
    assert 0.2 < ratio < 1.2, ratio                                                # ≤ 1 up to sampling


# -- the choice -----------------------------------------------------------------------------------

def test_auto_chooses_by_the_bytes_a_score_round_would_reread():
    shapes = [(64, 256), (256,)]
    kept = sketch_bytes_for(shapes, 4, 16)
    assert kept == 64 * (5 * 16 * 4 + 9 * 8) + 1 * (5 * 16 * 4 + 9 * 8)
    pool = 5 * (64 * 256 + 256) * 2
    common = dict(applicable=None, ratio=16, shapes=shapes, n=4, pool_bytes=pool)
    local = choose_scoring("auto", remote_bytes=0, resident_budget=10**9, **common)
    assert local.scoring == "exact" and "local" in local.reason and local.reread_bytes == 0
    fits = choose_scoring("auto", remote_bytes=pool, resident_budget=pool, **common)
    assert fits.scoring == "exact" and fits.reread_bytes == 0
    small = choose_scoring("auto", remote_bytes=pool, resident_budget=kept, **common)
    assert small.scoring == "sketch" and small.reread_bytes == pool - kept and small.sketch_bytes == kept
    tiny = choose_scoring("auto", remote_bytes=pool, resident_budget=kept - 1, **common)
    assert tiny.scoring == "exact" and "does not fit" in tiny.reason
    asked = choose_scoring("sketch", remote_bytes=0, resident_budget=0, **common)
    assert asked.scoring == "sketch"
    ties = choose_scoring("auto", remote_bytes=pool, resident_budget=kept, **{**common, "applicable": "ties"})
    assert ties.scoring == "exact"
    assert small.rel_error == (np.sqrt(2 / 16), np.sqrt(2 / 16))
    assert small.tensor_error == (np.sqrt(2 / (16 * 64)), np.sqrt(2 / 16))   # q·rows: 1024 and 16


# -- end to end -----------------------------------------------------------------------------------

def _trace(root: Path) -> dict:
    return json.loads((root / "out" / "frank_wolfe_trace.json").read_text())


def _spec(tasks, scoring: str, ratio: int = 2, **kw) -> dict:
    spec = _data_spec(tasks, iterations=4, **kw)
    spec["objective"].update(scoring=scoring, sketch_ratio=ratio)
    return spec


def _run(root: Path, models, spec, executor="local", slice_size="4KB", workers=1, **changes):
    """One run; 4 KB slices hold the test models' tensors whole."""
    pipe = make_pipeline(root, models, method=spec, output={"path": str(root / "out")},
                         resources={"slice_size": slice_size, "workers": workers, "memory_per_worker": "2GB"},
                         **changes)
    summary = run_pipeline(load_pipeline(pipe), executor=executor, show_progress=False)
    return summary, _trace(root), sha256_tree(root / "out")


def _float_bytes(model: Path, itemsize: int | None = None) -> int:
    t = load_file(str(model / "model.safetensors"))
    return sum(v.numel() * (itemsize or v.element_size()) for v in t.values() if v.is_floating_point())


@pytest.fixture(scope="module")
def mlp(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlp")
    return _mlp_pool(root / "m"), _mlp_data(root)


@pytest.mark.ray
def test_sketched_trace_is_slice_invariant_local_vs_ray(ray_session, tmp_path, mlp):
    models, tasks = mlp
    spec = _spec(tasks, "sketch", granularity="tensor", score="cosine")
    _, a, ha = _run(tmp_path / "whole", models, spec)
    _, b, hb = _run(tmp_path / "sliced", models, spec, executor=RayExecutor(workers=2), slice_size="16B", workers=2)
    assert a["iterations"] == b["iterations"] and a["coefficients"] == b["coefficients"]
    assert ha == hb
    assert [r["scoring"] for r in a["iterations"]] == ["exact", "sketch", "sketch", "sketch"]
    assert all(isinstance(r["sigma"], dict) for r in a["iterations"][1:])
    pool = sum(_float_bytes(m) for m in models)
    grad = _float_bytes(models[0], itemsize=4)
    # each slice's home actor kept its sketch; a slice another actor took is read there again
    # (observed: 468, 212, 212 bytes for a 848-byte pool and a 212-byte gradient)
    later = b["stats_pass_bytes_read"][1:]
    assert all(grad <= x < grad + pool for x in later) and sum(later) < 3 * grad + pool, later


def test_placement_and_a_kept_sketch_change_nothing(tmp_path, mlp, monkeypatch):
    """Kept sketches (whole tensors), none kept (resident budget 0: every round reads the pool
    and sketches it again), and tiny slices: the same trace and bytes; only the bytes read differ."""
    models, tasks = mlp
    spec = _spec(tasks, "sketch")
    _, kept, h_kept = _run(tmp_path / "kept", models, spec)
    _, sliced, h_sliced = _run(tmp_path / "sliced", models, spec, slice_size="16B")
    monkeypatch.setattr(Run, "_resident_bytes", lambda self: 0)
    _, none, h_none = _run(tmp_path / "none", models, spec)
    assert kept["iterations"] == none["iterations"] == sliced["iterations"]
    assert h_kept == h_none == h_sliced
    pool = sum(_float_bytes(m) for m in models)
    grad = _float_bytes(models[0], itemsize=4)
    assert none["stats_pass_bytes_read"] == [pool + grad] * 4                       # re-read, re-sketched
    assert kept["stats_pass_bytes_read"] == sliced["stats_pass_bytes_read"] == [pool + grad] + [grad] * 3


def test_later_iterations_read_only_the_gradient(tmp_path, mlp):
    models, tasks = mlp
    s_sketch, sketch, _ = _run(tmp_path / "sketch", models, _spec(tasks, "sketch"), slice_size="64B")
    s_exact, exact, _ = _run(tmp_path / "exact", models, _spec(tasks, "exact"), slice_size="64B")
    pool = sum(_float_bytes(m) for m in models)
    grad = _float_bytes(models[0], itemsize=4)
    assert exact["stats_pass_bytes_read"] == [pool + grad] * 4
    assert sketch["stats_pass_bytes_read"] == [pool + grad] + [grad] * 3
    assert s_exact.bytes_read - s_sketch.bytes_read == 3 * pool                    # the merge pass alike
    assert exact["scoring"]["scoring"] == "exact" and sketch["scoring"]["scoring"] == "sketch"
    assert [r["scoring"] for r in exact["iterations"]] == ["exact"] * 4
    assert exact["iterations"][0] == sketch["iterations"][0]                       # t = 0 is exact


# -- the error statement on a wider model ---------------------------------------------------------

class WideMLP(torch.nn.Module):
    """24 → 40 → 40 → 4: rows of 24 and 40 columns (q = 12 and 20 at sketch_ratio 2)."""

    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(24, 40)
        self.fc2 = torch.nn.Linear(40, 40)
        self.fc3 = torch.nn.Linear(40, 4)

    def forward(self, x):
        return self.fc3(torch.tanh(self.fc2(torch.tanh(self.fc1(x)))))


def wide_mlp() -> WideMLP:
    return WideMLP()


def _wide_pool(folder: Path, data: dict, n: int = 4) -> list[Path]:
    """Base and n experts; expert 1 is "fine-tuned" on the data (its task vector has a part
    along −∇f(θ₀), as large as its noise), the others are noise: some picks are clear-cut."""
    g = torch.Generator().manual_seed(11)
    base = {k: torch.randn(v.shape, generator=g) * 0.3 for k, v in WideMLP().state_dict().items()}
    theta = {k: v.clone().requires_grad_() for k, v in base.items()}
    grads = dict(zip(theta, torch.autograd.grad(_wide_loss(theta, data), list(theta.values()))))
    paths = []
    for i in range(n + 1):
        d = folder / (f"e{i}" if i else "base")
        d.mkdir(parents=True)
        tensors = {}
        for k, v in base.items():
            noise = torch.randn(v.shape, generator=g) * 0.2
            if i == 1:
                noise -= grads[k] * (3 * noise.norm() / grads[k].norm())
            tensors[k] = v + noise if i else v
        save_file(tensors, str(d / "model.safetensors"))
        paths.append(d)
    return paths


def _wide_loss(state, data) -> torch.Tensor:
    logits = torch.func.functional_call(WideMLP().eval(), state, (data["inputs"],))
    return torch.nn.functional.cross_entropy(logits, data["labels"])


def test_sketched_scores_are_within_their_stated_error_of_the_exact_ones(tmp_path):
    """Every sketched score against ⟨∇f(θ^t), τ_j⟩ computed with autograd on the whole model at
    the run's own θ^t (replayed from its trace): within 4σ, and the mean of err²/σ² plausible
    for an upper bound on the variance (≤ 1 up to sampling, and not vanishingly small). The
    exact run's iteration 1 (the same θ^1) agrees with autograd, and with the sketch within 4σ."""
    g = torch.Generator().manual_seed(12)
    data = {"inputs": torch.randn(64, 24, generator=g), "labels": torch.randint(0, 4, (64,), generator=g)}
    models = _wide_pool(tmp_path / "m", data)
    save_file(data, str(tmp_path / "d.safetensors"))
    spec = {"name": "frank_wolfe", "iterations": 5, "step": 0.02, "scale": 0.5, "granularity": "tensor", "init": "base",
            "objective": {"kind": "data", "model": "tests.test_fw_sketch:wide_mlp", "batch_size": 64,
                          "tasks": [{"data": str(tmp_path / "d.safetensors"), "loss": "cross_entropy"}],
                          "scoring": "sketch", "sketch_ratio": 2}}
    _, sk, _ = _run(tmp_path / "sketch", models, spec, slice_size="256B")
    exact_spec = {**spec, "objective": {**spec["objective"], "scoring": "exact"}}
    _, ex, _ = _run(tmp_path / "exact", models, exact_spec, slice_size="256B")
    pool = [load_file(str(m / "model.safetensors")) for m in models]
    names = sorted(pool[0])
    tau = {k: [(e[k] - pool[0][k]).double() for e in pool[1:]] for k in names}
    c = {k: np.zeros(4) for k in names}                                             # init: base
    z, certain = [], 0
    for t, rec in enumerate(sk["iterations"]):
        theta = {k: (pool[0][k] + sum((e[k] - pool[0][k]) * float(cj) for e, cj in zip(pool[1:], c[k])))
                 .requires_grad_() for k in names}
        grads = dict(zip(names, torch.autograd.grad(_wide_loss(theta, data), [theta[k] for k in names])))
        want = {k: np.array([float((grads[k].double() * tj).sum()) for tj in tau[k]]) for k in names}
        if t == 1:
            for k in names:
                np.testing.assert_allclose(ex["iterations"][1]["scores"][k], want[k], rtol=1e-4, atol=1e-7)
                diff = np.abs(np.array(ex["iterations"][1]["scores"][k]) - rec["scores"][k])
                assert (diff < 4 * np.array(rec["sigma"][k])).all(), k
        if t >= 1:
            assert rec["scoring"] == "sketch"
            for k in names:
                err = np.array(rec["scores"][k]) - want[k]
                sigma = np.array(rec["sigma"][k])
                assert (np.abs(err) < 4 * sigma).all(), (t, k, err, sigma)
                z.extend((err / sigma).tolist())
                if k not in rec["uncertain_tensors"]:                               # "certain": the exact pick
                    certain += 1
                    assert rec["picked"][k].endswith(f"e{int(np.argmin(want[k])) + 1}"), (t, k)
        for k in names:
            if k not in rec["held"]:
                c[k] = (1 - rec["eta"]) * c[k]
                c[k][int(Path(rec["picked"][k]).name[1:]) - 1] += rec["eta"]
    z = np.array(z)
    assert len(z) == 4 * 6 * 4 and certain > 0
    assert 0.05 < float(np.mean(z ** 2)) < 1.3, float(np.mean(z ** 2))


# -- auto ------------------------------------------------------------------------------------------

def test_auto_stays_exact_for_local_files(tmp_path, mlp):
    models, tasks = mlp
    _, auto, h_auto = _run(tmp_path / "auto", models, _spec(tasks, "auto"))
    _, exact, h_exact = _run(tmp_path / "exact", models, _spec(tasks, "exact"))
    assert auto["scoring"]["scoring"] == "exact" and "local" in auto["scoring"]["reason"]
    assert auto["iterations"] == exact["iterations"] and h_auto == h_exact


def _by_name(its: list[dict]) -> list[dict]:
    """The trace with each picked expert named by its folder's name (s3:// or local)."""
    return [{**r, "picked": r["picked"].rsplit("/", 1)[1]} for r in its]


def test_auto_sketches_a_pool_on_s3_that_does_not_fit_the_resident_budget(tmp_path, mlp, monkeypatch):
    pytest.importorskip("s3fs")
    pytest.importorskip("moto")
    from tests.s3server import S3Server

    models, tasks = mlp
    pool = sum(_float_bytes(m) for m in models)
    kept = sketch_bytes_for([v.shape for v in load_file(str(models[0] / "model.safetensors")).values()
                             if v.is_floating_point()], len(models) - 1, 16)
    assert kept < pool
    server = S3Server()
    try:
        server.create_bucket("pool")
        remote = [server.upload_folder(m, "pool", m.name) for m in models]
        monkeypatch.setenv("DM_KEY", "testing")
        monkeypatch.setenv("DM_SECRET", "testing")
        storage = {"s3": {"endpoint_url": server.endpoint, "region": "us-east-1",
                          "key_env": "DM_KEY", "secret_env": "DM_SECRET"}}
        monkeypatch.setattr(Run, "_resident_bytes", lambda self: (kept + pool) // 2)   # sketch fits, pool not
        _, auto, h_auto = _run(tmp_path / "auto", remote, _spec(tasks, "auto", ratio=16), storage=storage)
        monkeypatch.setattr(Run, "_resident_bytes", lambda self: 10**9)                # the pool fits
        _, fits, _ = _run(tmp_path / "fits", remote, _spec(tasks, "auto", ratio=16), storage=storage)
    finally:
        server.stop()
    _, local, h_local = _run(tmp_path / "local", models, _spec(tasks, "sketch", ratio=16))
    s = auto["scoring"]
    assert s["scoring"] == "sketch" and s["requested"] == "auto"
    assert s["remote_pool_bytes"] == pool and s["sketch_bytes"] == kept
    assert s["reread_bytes_per_iteration"] == pool - (kept + pool) // 2
    grad = _float_bytes(models[0], itemsize=4)
    assert auto["stats_pass_bytes_read"] == [pool + grad] + [grad] * 3
    assert _by_name(auto["iterations"]) == _by_name(local["iterations"]) and h_auto == h_local
    # a pool that stays resident is re-read from memory: exact, and later rounds read the gradient
    assert fits["scoring"]["scoring"] == "exact" and fits["scoring"]["reread_bytes_per_iteration"] == 0
    assert fits["stats_pass_bytes_read"] == [pool + grad] + [grad] * 3


# -- refusals ---------------------------------------------------------------------------------------

def _data_obj(**kw) -> dict:
    return {"kind": "data", "model": "a:b", "tasks": [{"data": "x"}], **kw}


@pytest.mark.parametrize("params, where", [
    ({"objective": _data_obj(sketch_ratio=1)}, "method.objective.sketch_ratio"),
    ({"objective": _data_obj(sketch_ratio=2.5)}, "method.objective.sketch_ratio"),
    ({"objective": _data_obj(sketch_ratio=True)}, "method.objective.sketch_ratio"),
    ({"objective": _data_obj(sketch_ratio="16")}, "method.objective.sketch_ratio"),
    ({"objective": _data_obj(scoring="fast")}, "method.objective.scoring"),
    ({"objective": _data_obj(scoring="sketch"), "local_merge": "ties"}, "method.objective.scoring"),
    ({"objective": {"kind": "data_free", "scoring": "exact"}}, "method.objective.scoring"),
    ({"objective": {"kind": "data_free", "sketch_ratio": 8}}, "method.objective.sketch_ratio"),
])
def test_bad_scoring_parameters_are_refused(params, where):
    with pytest.raises(ConfigError) as info:
        build("frank_wolfe", params)
    assert str(info.value).startswith(where + ":"), str(info.value)


def test_good_scoring_parameters_pass():
    m = build("frank_wolfe", {"objective": _data_obj(scoring="sketch", sketch_ratio=2)}).default
    assert m.scoring == "sketch" and m.sketch_ratio == 2 and m.can_sketch() is None
    ties = build("frank_wolfe", {"local_merge": "ties", "objective": _data_obj(scoring="auto")}).default
    assert ties.can_sketch() is not None                                            # auto: always exact
    assert isinstance(sketch_pool("w", 0, torch.zeros(1, 3), torch.ones(2, 1, 3), 2), PoolSketch)


def test_a_crash_between_sketched_iterations_resumes_to_the_same_trace_and_bytes(tmp_path, mlp):
    """The resumed run holds no sketch: its first round reads the pool and sketches it again."""
    from tests.test_resume import Crash, CrashesAfter

    models, tasks = mlp
    spec = _spec(tasks, "sketch")
    _, straight, h_straight = _run(tmp_path / "straight", models, spec, slice_size="64B")
    root = tmp_path / "resumed"
    pipe = make_pipeline(root, models, method=spec, output={"path": str(root / "out")},
                         resources={"slice_size": "64B", "workers": 1, "memory_per_worker": "2GB"})
    with pytest.raises(Crash):
        run_pipeline(load_pipeline(pipe), executor=CrashesAfter(1, 2), show_progress=False)
    s = run_pipeline(load_pipeline(pipe), executor="local", show_progress=False, resume=True)
    assert s.stats_rounds_restored == 2
    resumed = _trace(root)
    assert resumed["iterations"] == straight["iterations"] and sha256_tree(root / "out") == h_straight
    pool = sum(_float_bytes(m) for m in models)
    grad = _float_bytes(models[0], itemsize=4)
    assert resumed["stats_pass_bytes_read"] == [pool + grad, grad]                  # this process's rounds 2, 3
