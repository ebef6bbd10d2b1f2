"""The conformance suite: every registered method, one parametrised set of checks.

- hand-computed cases (tests/cases/<method>.py), whole and in row blocks;
- every parameter matters: each field of the method's dataclass is set away from its default
  in some case whose expected result differs from what the default gives;
- slice invariance: in memory (whole vs 1-row and 3-row blocks) on bf16 data full of ties,
  and through the engine (in-process whole tensors vs Ray with 2 actors and tiny slices);
- dtypes in and out, 1-D and 0-D tensors, a tensor with fewer rows than workers, integer
  buffers copied from the base.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from safetensors.torch import load_file, save_file

from distmerge.config import load_pipeline
from distmerge.engine.driver import run_pipeline
from distmerge.engine.executors import RayExecutor
from distmerge.methods import REGISTRY, build
from tests.cases import cases_for
from tests.conftest import make_pipeline, sha256_tree
from tests.harness import merge_tensors

METHODS = sorted(REGISTRY)
ALL_CASES = [(m, c) for m in METHODS for c in cases_for(m)]


def _merge(method, case, rows=None, params=None):
    ms = build(method, case.params if params is None else params, case.overrides)
    return merge_tensors(ms, case.base, case.experts, case.weights, rows_per_block=rows)


def test_every_registered_method_has_cases():
    for m in METHODS:
        assert cases_for(m), f"add hand-computed cases in tests/cases/{m}.py"


@pytest.mark.parametrize("rows", [None, 1])
@pytest.mark.parametrize("method, case", ALL_CASES, ids=[f"{m}-{c.id}" for m, c in ALL_CASES])
def test_hand_computed(method, case, rows):
    got = _merge(method, case, rows)
    for name, want in case.expected.items():
        assert torch.equal(got[name], want), f"{name}: got {got[name]}, want {want}"


PARAMS = [(m, f.name) for m in METHODS for f in dataclasses.fields(REGISTRY[m])]


@pytest.mark.parametrize("method, param", PARAMS, ids=[f"{m}-{p}" for m, p in PARAMS])
def test_every_parameter_changes_a_result(method, param):
    default = getattr(REGISTRY[method](), param)
    for case in cases_for(method):
        if param in case.params and case.params[param] != default:
            without = {k: v for k, v in case.params.items() if k != param}
            got = _merge(method, case, params=without)
            if any(not torch.equal(got[n], case.expected[n]) for n in case.expected):
                return
    pytest.fail(f"no case shows that {method}.{param} changes the result: add one to tests/cases/{method}.py")


def _n_experts(method: str) -> int:
    return REGISTRY[method].exact_experts or 3


def _tie_heavy(method: str, seed: int = 0):
    """bf16 models whose task vectors take 7 values (ties at thresholds, exact cancellations),
    including a 1-D tensor and one with a single row."""
    g = torch.Generator().manual_seed(seed)
    shapes = {"a.weight": (13, 7), "b.weight": (1, 11), "norm": (9,)}
    base = {n: (torch.randint(-8, 8, s, generator=g) / 16).bfloat16().float() for n, s in shapes.items()}
    experts = [
        {n: (b + torch.randint(-3, 4, b.shape, generator=g) / 64).bfloat16().float() for n, b in base.items()}
        for _ in range(_n_experts(method))
    ]
    return base, experts


@pytest.mark.parametrize("method", METHODS)
def test_slice_invariance_in_memory(method):
    base, experts = _tie_heavy(method)
    params = cases_for(method)[0].params
    weights = [1.0, 0.5, 2.0][:len(experts)]
    whole = merge_tensors(build(method, params), base, experts, weights)
    for rows in (1, 3):
        blocks = merge_tensors(build(method, params), base, experts, weights, rows_per_block=rows)
        for n in whole:
            assert torch.equal(whole[n], blocks[n]), (n, rows)


def _save_models(folder, method, dtype):
    """Base and experts on disk: float tensors of several shapes in ``dtype`` (a 0-D one, a
    1-D one, one with a single row) and an integer buffer that differs between models."""
    base, experts = _tie_heavy(method, seed=1)
    base = {**base, "temperature": torch.tensor(0.5), "big.weight": torch.linspace(-1, 1, 40 * 6).view(40, 6)}
    experts = [{**e, "temperature": torch.tensor(0.25 * (i + 3)),
                "big.weight": base["big.weight"] + (i + 1) / 32} for i, e in enumerate(experts)]
    paths = []
    for i, tensors in enumerate([base, *experts]):
        d = folder / f"m{i}"
        d.mkdir(parents=True)
        t = {n: v.to(dtype) for n, v in tensors.items()}
        t["position_ids"] = torch.arange(6, dtype=torch.int64).view(2, 3) + 100 * i
        save_file(t, str(d / "model.safetensors"))
        paths.append(d)
    return paths


DTYPES = [(torch.bfloat16, "bfloat16"), (torch.float16, "float32"), (torch.float32, "float16")]


@pytest.mark.parametrize("dtype_in, dtype_out", DTYPES, ids=["bf16-bf16", "fp16-fp32", "fp32-fp16"])
@pytest.mark.parametrize("method", METHODS)
def test_engine_dtypes_and_odd_tensors(tmp_path, method, dtype_in, dtype_out):
    models = _save_models(tmp_path / "models", method, dtype_in)
    params = cases_for(method)[0].params
    pipe = make_pipeline(tmp_path, models, method={"name": method, **params},
                         output={"path": str(tmp_path / "out"), "dtype": dtype_out},
                         resources={"slice_size": "100B"})
    run_pipeline(load_pipeline(pipe), executor="local", show_progress=False)
    got = load_file(str(tmp_path / "out" / "model.safetensors"))
    loaded = [load_file(str(m / "model.safetensors")) for m in models]
    floats = {n for n, t in loaded[0].items() if t.is_floating_point()}
    want = merge_tensors(build(method, params), {n: loaded[0][n].float() for n in floats},
                         [{n: m[n].float() for n in floats} for m in loaded[1:]])
    for n in floats:
        assert got[n].dtype == getattr(torch, dtype_out)
        assert torch.equal(got[n], want[n].to(got[n].dtype)), n
    assert torch.equal(got["position_ids"], loaded[0]["position_ids"])


@pytest.mark.ray
@pytest.mark.parametrize("method", METHODS)
def test_engine_slice_invariance_on_ray(ray_session, tmp_path, method):
    models = _save_models(tmp_path / "models", method, torch.bfloat16)
    spec = {"name": method, **cases_for(method)[0].params}
    whole = make_pipeline(tmp_path / "whole", models, method=spec, resources={"slice_size": "1GB", "workers": 1})
    sliced = make_pipeline(tmp_path / "sliced", models, method=spec, resources={"slice_size": "64B", "workers": 2})
    run_pipeline(load_pipeline(whole), executor="local", show_progress=False)
    p = load_pipeline(sliced)
    run_pipeline(p, executor=RayExecutor(workers=2), show_progress=False)
    assert sha256_tree(tmp_path / "whole" / "out") == sha256_tree(tmp_path / "sliced" / "out")
