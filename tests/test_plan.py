"""The planner on integer shapes: no files, no tensors."""

from __future__ import annotations

import json
import math

import pytest

from distmerge.checkpoint.header import DTYPE_SIZES, parse_header
from distmerge.errors import ConfigError
from distmerge.plan import MAX_SLICE_ELEMENTS, make_plan, slice_elements_for

TENSORS = [
    ("model.embed_tokens.weight", "BF16", (1000, 64)),
    ("model.layers.0.mlp.up_proj.weight", "BF16", (256, 64)),
    ("model.layers.0.input_layernorm.weight", "BF16", (64,)),
    ("model.norm.weight", "BF16", (64,)),
    ("model.position_ids", "I64", (1, 10)),
    ("lm_head.weight", "BF16", (1000, 64)),
]


def _plan(**kw):
    args = {"out_dtype": "BF16", "shard_size": 100_000, "slice_elements": 4096} | kw
    return make_plan(TENSORS, **args)


def test_every_output_byte_is_covered_once_by_slices():
    plan = _plan()
    for si, shard in enumerate(plan.shards):
        spans = sorted((s.start, s.stop) for s in plan.slices if s.shard == si)
        assert spans[0][0] == len(shard.header)
        assert all(a[1] == b[0] for a, b in zip(spans, spans[1:])), "gap or overlap"
        assert spans[-1][1] == shard.size


def test_slices_respect_the_budget_and_split_on_rows():
    plan = _plan(slice_elements=5000)
    for s in plan.slices:
        elems = 0
        for p in s.pieces:
            t = plan.tensors[p.tensor]
            assert 0 <= p.row_start < p.row_stop <= t.rows
            elems += (p.row_stop - p.row_start) * t.row_elements
        # a single row larger than the budget is the only allowed excess
        assert elems <= 5000 or (len(s.pieces) == 1 and s.pieces[0].row_stop - s.pieces[0].row_start == 1)
    emb = [s for s in plan.slices if s.pieces[0].tensor == "model.embed_tokens.weight"]
    assert [p.row_start for s in emb for p in s.pieces] == list(range(0, 1000, 78))  # 5000 // 64 = 78 rows


def test_small_tensors_are_grouped_and_big_ones_split():
    plan = _plan()
    grouped = [s for s in plan.slices if len(s.pieces) > 1]
    assert grouped, "the 1-D tensors and position ids should share a slice"
    assert len([s for s in plan.slices if s.pieces[0].tensor == "lm_head.weight"]) == math.ceil(1000 / 64)


def test_shard_headers_are_valid_and_match_layout():
    plan = _plan()
    for shard in plan.shards:
        n = int.from_bytes(shard.header[:8], "little")
        assert (8 + n) % 8 == 0
        tensors, meta = parse_header(shard.header[8:], file_size=shard.size, where=shard.filename)
        assert meta == {"format": "pt"}
        for name, info in tensors.items():
            t = plan.tensors[name]
            assert (info.start, info.stop, info.shape, info.dtype) == (t.start, t.stop, t.shape, t.out_dtype)
        # contiguous, no gaps, as safetensors requires
        spans = sorted((i.start, i.stop) for i in tensors.values())
        assert spans[0][0] == len(shard.header) and spans[-1][1] == shard.size
        assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))


def test_shards_respect_size_and_index_lists_every_tensor():
    plan = _plan(shard_size=150_000)
    assert len(plan.shards) > 1
    for shard in plan.shards:
        data = shard.size - len(shard.header)
        assert data <= 150_000 or len(shard.tensors) == 1
    index = plan.index_json()
    assert set(index["weight_map"]) == {n for n, _, _ in TENSORS}
    assert index["metadata"]["total_size"] == sum(
        math.prod(s) * (8 if d == "I64" else 2) for _, d, s in TENSORS)
    assert [s.filename for s in plan.shards][0] == f"model-00001-of-{len(plan.shards):05d}.safetensors"


def test_out_dtype_applies_to_float_tensors_only():
    plan = _plan(out_dtype="F32")
    assert plan.tensors["lm_head.weight"].out_dtype == "F32"
    assert plan.tensors["model.position_ids"].out_dtype == "I64"
    assert not plan.tensors["model.position_ids"].merged
    t = plan.tensors["lm_head.weight"]
    assert t.stop - t.start == 1000 * 64 * DTYPE_SIZES["F32"]


def test_plan_is_deterministic_and_json_serialisable():
    a, b = _plan(), make_plan(list(reversed(TENSORS)), out_dtype="BF16", shard_size=100_000, slice_elements=4096)
    assert a.to_json() == b.to_json()
    assert json.loads(a.to_json())["slices"][0]["index"] == 0


def test_slice_budget_follows_memory_and_refuses_too_little():
    small = slice_elements_for(700 * 10**6, n_models=9, in_itemsize=2)
    big = slice_elements_for(900 * 10**6, n_models=9, in_itemsize=2)
    assert 0 < small < big
    assert slice_elements_for(700 * 10**6, n_models=49, in_itemsize=2) < small
    assert slice_elements_for(10**12, n_models=9, in_itemsize=2) == MAX_SLICE_ELEMENTS
    with pytest.raises(ConfigError, match="memory_per_worker"):
        slice_elements_for(10**6, n_models=9, in_itemsize=2)
