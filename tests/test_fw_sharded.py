"""frank_wolfe's sharded gradient stage (torch FSDP2 across Ray actors, gloo on CPU) against the
single-process stage: the same gradient checkpoint bytes and f, the same trace end to end, the
choice of stage, and the refusals before work."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from distmerge.config import load_pipeline
from distmerge.engine.driver import run_pipeline, validate
from distmerge.engine.executors import RayExecutor
from distmerge.errors import ConfigError
from distmerge.select.gradient import GradientStage
from distmerge.select.sharded import ShardedGradientStage, choose, chunk_rows, param_bytes
from tests.conftest import make_pipeline
from tests.test_frank_wolfe import _data_spec, _mlp_data, _mlp_pool

# the GPU check (.gpu/fsdp_gpu.sh) sets DISTMERGE_FSDP_GPUS=1 (nccl, one rank per GPU) and
# DISTMERGE_FSDP_WORLD to the number of GPUs; the default is the CPU check: gloo, 2 ranks
WORLD = int(os.environ.get("DISTMERGE_FSDP_WORLD", "2"))
GPUS = float(os.environ.get("DISTMERGE_FSDP_GPUS", "0"))


def _validated(tmp_path: Path, **kw):
    models = _mlp_pool(tmp_path / "m")
    tasks = _mlp_data(tmp_path)
    spec = _data_spec(tasks, **kw)
    pipe = load_pipeline(make_pipeline(tmp_path, models, method=spec, output={"path": str(tmp_path / "out")}))
    return validate(pipe), models


def test_chunk_rows_follow_torch_chunk():
    for d0 in (0, 1, 3, 5, 8):
        for world in (1, 2, 3, 4):
            want = [c.shape[0] for c in torch.arange(d0).chunk(world)] if d0 else []
            got = [chunk_rows(d0, world, r) for r in range(world)]
            assert [b - a for a, b in got if b > a] == want
            assert got[0][0] == 0 and got[-1][1] == d0 and all(got[i][1] == got[i + 1][0] or got[i + 1][0] == d0
                                                               for i in range(world - 1))


@pytest.mark.ray
def test_sharded_gradient_equals_the_single_process_one(ray_session, tmp_path):
    v, models = _validated(tmp_path, granularity="tensor")
    fw = v.methods.default
    single = GradientStage(fw, base=v.base, experts=v.experts, folder=str(tmp_path / "g1"))
    sharded = ShardedGradientStage(fw, base=v.base, experts=v.experts, folder=str(tmp_path / "g2"),
                                   workers=WORLD, gpus_per_worker=GPUS)
    try:
        assert sharded.backend == ("nccl" if GPUS else "gloo")
        names = [n for n in sorted(v.base.tensors) if n != "version"]
        # θ^0 (init: merge) and a model with other coefficients per tensor (granularity tensor)
        rng = np.random.default_rng(3)
        ctxs = [{}, {"frank_wolfe": {"coefficients": {n: rng.uniform(0, 1, 3).tolist() for n in names}}}]
        for ctx in ctxs:
            a = single.run(0, ctx)["frank_wolfe"]["objective_now"]
            b = sharded.run(0, ctx)["frank_wolfe"]["objective_now"]
            g = load_file(str(tmp_path / "g2" / "model.safetensors"))
            assert single.objective(ctx) == pytest.approx(sharded.objective(ctx), rel=1e-5 if GPUS else 0)
            want = load_file(str(tmp_path / "g1" / "model.safetensors"))
            if GPUS:        # GPU kernels against the CPU: fp32 rounding of other summation orders
                assert b == pytest.approx(a, rel=1e-5)
                for n in want:
                    torch.testing.assert_close(g[n], want[n], rtol=1e-4, atol=1e-6)
                continue
            if WORLD > 2:
                # the mean of WORLD equal copies of a batch's gradient may round (≤ WORLD − 1 ulp
                # of the batch term before the division); 6 batches accumulated, so an entry
                # whose batch terms cancel has a larger relative error (seen: 2e-6 relative,
                # 4e-9 absolute at world 3): rtol 1e-5 with atol 1e-8 (|∇f| here ~1e-2..1e-1)
                assert a == b                                       # f: every rank the same sum
                for n in want:
                    torch.testing.assert_close(g[n], want[n], rtol=1e-5, atol=1e-8)
                continue
            assert a == b                                           # exact: see sharded.py
            # the whole file: header and every tensor's bytes (gradient rows written per rank)
            assert (tmp_path / "g1" / "model.safetensors").read_bytes() == \
                   (tmp_path / "g2" / "model.safetensors").read_bytes()
            assert all(g[n].abs().sum() > 0 for n in names)         # every tensor's rows written
            assert torch.equal(g["version"], torch.zeros(1))
        # the ranks read the rows of the ≥ 2-D tensors between them once (each its own) and
        # every 1-D tensor whole each; the single stage the whole pool once; both keep them
        whole = {n: sum(m.tensors[n][1].nbytes for m in [v.base, *v.experts]) for n in v.base.tensors}
        one_d = sum(b for n, b in whole.items() if len(v.base.tensors[n][1].shape) < 2)
        assert single.pass_bytes[0] == sum(whole.values())
        assert sharded.pass_bytes[0] == sum(whole.values()) + (WORLD - 1) * one_d
        assert single.pass_bytes[1:] == sharded.pass_bytes[1:] == [0] * 3
    finally:
        sharded.remove()
        single.remove()
    assert not (tmp_path / "g2").exists()


def _trace(folder: Path) -> dict:
    return json.loads((folder / "out" / "frank_wolfe_trace.json").read_text())


@pytest.mark.ray
@pytest.mark.parametrize("granularity, local_merge", [("model", "task_arithmetic"), ("tensor", "ties")])
def test_end_to_end_sharded_equals_single(ray_session, tmp_path, granularity, local_merge):
    models = _mlp_pool(tmp_path / "m")
    tasks = _mlp_data(tmp_path)
    extra = {"init": "base", "density": 0.5} if local_merge == "ties" else {}
    out = {}
    workers = WORLD if GPUS else 2                  # the GPU check: slice actors and ranks on the GPUs
    for mode in ("single", "sharded"):
        spec = _data_spec(tasks, granularity=granularity, local_merge=local_merge, **extra)
        spec["objective"]["gradient"] = mode
        root = tmp_path / mode
        pipe = make_pipeline(root, models, method=spec, output={"path": str(root / "out")},
                             resources={"slice_size": "64B", "workers": workers, "gpus_per_worker": GPUS})
        run_pipeline(load_pipeline(pipe), executor=RayExecutor(workers=workers, gpus_per_worker=GPUS),
                     show_progress=False)
        out[mode] = _trace(root)
    a, b = out["single"], out["sharded"]
    assert [r["picked"] for r in a["iterations"]] == [r["picked"] for r in b["iterations"]]
    if GPUS:            # ∇f from GPU kernels against the driver's CPU: the same picks and moves
        assert [r.get("moved") for r in a["iterations"]] == [r.get("moved") for r in b["iterations"]]
        assert [r["objective"] for r in b["iterations"]] == pytest.approx([r["objective"] for r in a["iterations"]], rel=1e-5)
        assert b["final_objective"] == pytest.approx(a["final_objective"], rel=1e-5)
    else:
        assert a["iterations"] == b["iterations"] and a["coefficients"] == b["coefficients"]
        assert a["final_objective"] == b["final_objective"]
    picks = {p for r in a["iterations"] for p in ([r["picked"]] if isinstance(r["picked"], str)
                                                   else r["picked"].values())}
    assert len(picks) > 1, "one expert picked throughout: a weak comparison"
    # the output folder differs only in the trace's byte counts: the merged tensors are equal
    sa = load_file(str(tmp_path / "single" / "out" / "model.safetensors"))
    sb = load_file(str(tmp_path / "sharded" / "out" / "model.safetensors"))
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert len(b["gradient_stage_bytes_read"]) == 4                 # 3 iterations + final f
    # the sharded stage ran: its ranks read each 1-D tensor (biases) once per rank
    if workers > 1:
        assert b["gradient_stage_bytes_read"][0] > a["gradient_stage_bytes_read"][0]


def test_auto_picks_the_sharded_stage_when_the_model_does_not_fit(tmp_path):
    v, _ = _validated(tmp_path)
    need = param_bytes(v.base) * 4
    assert param_bytes(v.base) == 4 * (6 * 5 + 5 + 5 * 3 + 3)      # float tensors only
    assert choose("auto", v.base, need) == "single"
    assert choose("auto", v.base, need - 1) == "sharded"
    assert choose("auto", v.base, 0) == "single"                   # 0: no limit
    assert choose("single", v.base, 1) == "single" and choose("sharded", v.base, 10**12) == "sharded"


def test_bad_gradient_settings_are_refused_before_work(tmp_path):
    models = _mlp_pool(tmp_path / "m")
    tasks = _mlp_data(tmp_path)
    bad = _data_spec(tasks)
    bad["objective"]["gradient"] = "fsdp"
    with pytest.raises(ConfigError, match="objective.gradient: must be one of auto | single | sharded"):
        validate(load_pipeline(make_pipeline(tmp_path / "a", models, method=bad)))
    free = _data_spec(tasks)
    free["objective"] = {"kind": "data_free", "gradient": "sharded"}
    with pytest.raises(ConfigError, match="objective.gradient: unknown key of a data_free"):
        validate(load_pipeline(make_pipeline(tmp_path / "b", models, method=free)))
    half = _data_spec(tasks)
    half["objective"]["gradient"] = "sharded"
    out = tmp_path / "c" / "out"
    with pytest.raises(ConfigError, match="gpus_per_worker: 0.5: the sharded gradient stage"):
        run_pipeline(load_pipeline(make_pipeline(tmp_path / "c", models, method=half, output={"path": str(out)},
                                                 resources={"gpus_per_worker": 0.5})),
                     executor="local", show_progress=False)
    assert not out.exists()
    # auto with a model that does not fit: the same refusal names the reason
    auto = _data_spec(tasks)
    with pytest.raises(ConfigError, match=r"gpus_per_worker: 0.5: the sharded gradient stage \(the model"):
        validate(load_pipeline(make_pipeline(tmp_path / "d", models, method=auto,
                                             resources={"gpus_per_worker": 0.5, "memory_per_worker": "100B"})))


@pytest.mark.ray
def test_nccl_ranks_need_a_gpu_each_and_leave_nothing_behind(ray_session, tmp_path):
    if GPUS:
        pytest.skip("the CPU check of the refusal")
    v, _ = _validated(tmp_path)
    gpus = int(ray_session.cluster_resources().get("GPU", 0))
    with pytest.raises(ConfigError, match=f"has {gpus} GPU\\(s\\) for {gpus + 1} ranks"):
        ShardedGradientStage(v.methods.default, base=v.base, experts=v.experts,
                             folder=str(tmp_path / "g"), workers=gpus + 1, gpus_per_worker=1)
    assert not (tmp_path / "g").exists()


@pytest.mark.ray
def test_a_failed_run_ends_the_sharded_ranks(ray_session, tmp_path, monkeypatch):
    """The ranks hold a GPU each: a run that fails after they started ends them too, instead of
    leaving them for as long as the driver's process lives (a notebook, a service)."""
    import ray
    from ray.exceptions import RayActorError

    from distmerge.select.pool import Selection

    ranks: list = []
    init = ShardedGradientStage.__init__

    def remember(self, *a, **k):
        init(self, *a, **k)
        ranks.extend(self.actors)

    def fail(self, *a, **k):
        raise RuntimeError("injected after the first pass")

    monkeypatch.setattr(ShardedGradientStage, "__init__", remember)
    monkeypatch.setattr(Selection, "pass_done", fail)
    spec = _data_spec(_mlp_data(tmp_path))
    spec["objective"]["gradient"] = "sharded"
    pipe = make_pipeline(tmp_path, _mlp_pool(tmp_path / "m"), method=spec,
                         output={"path": str(tmp_path / "out")},
                         resources={"slice_size": "64B", "workers": 2})
    with pytest.raises(RuntimeError, match="injected"):
        run_pipeline(load_pipeline(pipe), executor=RayExecutor(workers=2), show_progress=False)
    assert len(ranks) == 2
    for rank in ranks:                # ray.kill is asynchronous: a call may still be answered
        deadline = time.monotonic() + 60
        with pytest.raises(RayActorError):
            while time.monotonic() < deadline:
                ray.get(rank.address.remote(), timeout=60)
                time.sleep(0.2)
    assert not (tmp_path / "out").exists()
