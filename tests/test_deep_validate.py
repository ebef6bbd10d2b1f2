"""Values, not headers: ``allow_nonfinite`` and ``distmerge validate --deep``.

``--deep`` samples a few rows of every tensor of base and experts (ranged reads, bounded bytes)
and reports NaN/Inf (exit 7) and experts that are not fine-tunes of the base (exit 5): attention
tensors scrambled as MergeLock-style protection does, or a model from another base. The models
here are small Llama-named checkpoints written with ``safetensors.torch.save_file``. The refusal
of a NaN by a run (tensor and expert named, nothing written) is in ``test_bad_inputs.py``;
here a run with ``allow_nonfinite: true`` lets NaN and Inf through where task arithmetic puts
them.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import make_pipeline
from distmerge.checkpoint import deep
from distmerge.checkpoint.deep import RATIO_THRESHOLD, deep_validate, is_attention, sample_ranges
from distmerge.checkpoint.reader import RangeReader
from distmerge.checkpoint.source import INDEX_NAME, read_model_headers
from distmerge.errors import ConfigError, IncompatibleModelsError, NonFiniteError
from test_bad_inputs import TENSOR, assert_fails, assert_nothing_published, cli, copy_models, rewrite_shard

HIDDEN, HEADS, KV_HEADS, INTER, VOCAB, LAYERS = 64, 4, 2, 128, 256, 2
HEAD_DIM = HIDDEN // HEADS
ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_UP = "model.layers.1.mlp.up_proj.weight"


# -- models -----------------------------------------------------------------------------------

def llama_shapes() -> dict[str, tuple[int, ...]]:
    kv = KV_HEADS * HEAD_DIM
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (VOCAB, HIDDEN),
                                          "model.norm.weight": (HIDDEN,),
                                          "lm_head.weight": (VOCAB, HIDDEN)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (HIDDEN,), p + "post_attention_layernorm.weight": (HIDDEN,),
            p + "self_attn.q_proj.weight": (HIDDEN, HIDDEN), p + "self_attn.k_proj.weight": (kv, HIDDEN),
            p + "self_attn.v_proj.weight": (kv, HIDDEN), p + "self_attn.o_proj.weight": (HIDDEN, HIDDEN),
            p + "mlp.gate_proj.weight": (INTER, HIDDEN), p + "mlp.up_proj.weight": (INTER, HIDDEN),
            p + "mlp.down_proj.weight": (HIDDEN, INTER),
        })
    return shapes


def fresh(seed: int) -> dict[str, torch.Tensor]:
    """Random weights of a Llama's scale: matrices N(0, 0.02), norms 1 + N(0, 0.05)."""
    gen = torch.Generator().manual_seed(seed)
    return {n: (1.0 + 0.05 * torch.randn(s, generator=gen)) if len(s) == 1
            else 0.02 * torch.randn(s, generator=gen) for n, s in llama_shapes().items()}


def fine_tune(base: dict[str, torch.Tensor], seed: int, size: float = 0.01) -> dict[str, torch.Tensor]:
    """``base`` plus a dense task vector of ``size`` times each tensor's scale (ratio ~ size)."""
    gen = torch.Generator().manual_seed(seed)
    return {n: w + size * w.std() * torch.randn(w.shape, generator=gen) for n, w in base.items()}


def random_orthogonal(n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r))).float()


def mergelock(weights: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """MergeLock-style protection: per head, Q and K rows rotated by one orthogonal A, V rows by
    B and O columns by B^T. Scores q.k and the attention output are unchanged (the model
    computes the same function), but the attention weights lie far from the base's."""
    a, b = random_orthogonal(HEAD_DIM, seed), random_orthogonal(HEAD_DIM, seed + 1)
    out = dict(weights)

    def rows(w: torch.Tensor, m: torch.Tensor) -> torch.Tensor:      # blockdiag(m) @ w
        return (m @ w.view(-1, HEAD_DIM, w.shape[1])).reshape(w.shape)

    for i in range(LAYERS):
        p = f"model.layers.{i}.self_attn."
        out[p + "q_proj.weight"] = rows(weights[p + "q_proj.weight"], a)
        out[p + "k_proj.weight"] = rows(weights[p + "k_proj.weight"], a)
        out[p + "v_proj.weight"] = rows(weights[p + "v_proj.weight"], b)
        o = weights[p + "o_proj.weight"]                               # o @ blockdiag(b^T)
        out[p + "o_proj.weight"] = (o.view(o.shape[0], -1, HEAD_DIM) @ b.T).reshape(o.shape)
    return out


def save_model(folder: Path, weights: dict[str, torch.Tensor], dtype=torch.bfloat16) -> Path:
    """Two shards and an index json, as the Hub stores models."""
    folder.mkdir(parents=True)
    names = sorted(weights)
    halves = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    weight_map = {}
    for fname, part in halves.items():
        save_file({n: weights[n].to(dtype).contiguous() for n in part}, str(folder / fname),
                  metadata={"format": "pt"})
        weight_map.update({n: fname for n in part})
    (folder / INDEX_NAME).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    return folder


@pytest.fixture
def family(tmp_path) -> dict[str, Path]:
    """A base, two ordinary fine-tunes, a MergeLock-protected fine-tune and a model of another
    base, all bf16 with Llama names."""
    root = tmp_path / "models"
    base = fresh(0)
    return {
        "base": save_model(root / "base", base),
        "ft1": save_model(root / "ft1", fine_tune(base, 1)),
        "ft2": save_model(root / "ft2", fine_tune(base, 2, size=0.04)),
        "locked": save_model(root / "locked", mergelock(fine_tune(base, 3), seed=7)),
        "other": save_model(root / "other", fresh(99)),
    }


def pipeline_for(tmp_path: Path, family: dict[str, Path], *experts: str, **changes) -> Path:
    return make_pipeline(tmp_path, [family["base"], *(family[e] for e in experts)],
                         method={"name": "task_arithmetic"}, **changes)


def attention_names() -> list[str]:
    return [f"model.layers.{i}.self_attn.{t}.weight" for i in range(LAYERS) for t in ATTN]


# -- the pieces -------------------------------------------------------------------------------

def test_mergelock_construction_preserves_attention_and_moves_weights():
    """The test's protected model is the real thing: same attention function, distant weights."""
    w = fine_tune(fresh(0), 3)
    locked = mergelock(w, seed=7)
    p = "model.layers.0.self_attn."
    x = torch.randn(5, HIDDEN)

    def scores(ws):   # per head q.k of head h with its kv head (GQA: 2 q heads per kv head)
        q = (x @ ws[p + "q_proj.weight"].T).view(5, HEADS, HEAD_DIM)
        k = (x @ ws[p + "k_proj.weight"].T).view(5, KV_HEADS, HEAD_DIM).repeat_interleave(2, 1)
        v = (x @ ws[p + "v_proj.weight"].T).view(5, KV_HEADS, HEAD_DIM).repeat_interleave(2, 1)
        return torch.einsum("ihd,jhd->hij", q, k), (v.reshape(5, -1) @ ws[p + "o_proj.weight"].T)
    for before, after in zip(scores(w), scores(locked)):
        torch.testing.assert_close(before, after, atol=1e-5, rtol=1e-4)
    ratio = (locked[p + "q_proj.weight"] - w[p + "q_proj.weight"]).norm() / w[p + "q_proj.weight"].norm()
    assert ratio > 1.0


@pytest.mark.parametrize("name, attention", [
    ("model.layers.0.self_attn.q_proj.weight", True),
    ("model.layers.3.self_attn.o_proj.bias", True),
    ("transformer.h.0.self_attention.query_key_value.weight", True),      # Falcon, Bloom
    ("h.0.attn.c_attn.weight", True),                                     # GPT-2
    ("encoder.layer.0.attention.self.query.weight", True),                # BERT
    ("layers.0.attention.wq.weight", True),                               # Meta Llama
    ("encoder.block.0.layer.0.SelfAttention.q.weight", True),             # T5
    ("model.layers.0.self_attn.qkv_proj.weight", True),                   # Phi-3
    ("model.layers.0.post_attention_layernorm.weight", False),
    ("model.layers.0.self_attn.q_norm.weight", False),                    # Qwen3
    ("encoder.layer.0.attention.output.LayerNorm.weight", False),
    ("h.0.ln_1.weight", False),
    ("model.layers.0.mlp.up_proj.weight", False),
    ("model.layers.0.block_sparse_moe.experts.0.w1.weight", False),
    ("model.embed_tokens.weight", False),
])
def test_attention_tensors_from_names(name, attention):
    assert is_attention(name) is attention


def test_sampled_rows_first_middle_last_and_bounded():
    from distmerge.checkpoint.header import TensorInfo

    info = TensorInfo(name="w", dtype="BF16", shape=(1000, 64), start=4096, stop=4096 + 128_000)
    ranges = sample_ranges(info, 8)
    rows = [r for r, _, _ in ranges]
    assert rows[0] == 0 and 499 in rows and rows[-1] == 999 and len(rows) == 9
    assert all(b - a == 128 for _, a, b in ranges)
    assert sample_ranges(info, 8) == ranges                                # deterministic
    small = sample_ranges(info, 8, max_bytes=300)                          # 33 elements per row
    assert sum(b - a for _, a, b in small) <= 300 and all((b - a) % 2 == 0 for _, a, b in small)
    tiny = sample_ranges(info, 8, max_bytes=6)                             # 3 elements: 3 rows
    assert [r for r, _, _ in tiny] == [0, 499, 999] and sum(b - a for _, a, b in tiny) == 6
    whole = TensorInfo(name="w", dtype="F32", shape=(5, 4), start=0, stop=80)
    assert sample_ranges(whole, 8) == [(0, 0, 80)]                         # every row, one read
    vector = TensorInfo(name="v", dtype="F32", shape=(10**6,), start=0, stop=4 * 10**6)
    assert sample_ranges(vector, 8, max_bytes=4096) == [(0, 0, 4096)]


# -- validate --deep through the CLI ----------------------------------------------------------

def test_fine_tunes_pass_deep_clean(family, tmp_path, capsys):
    pipeline = pipeline_for(tmp_path, family, "ft1", "ft2")
    code, out, err = cli(capsys, "validate", pipeline, "--deep")
    assert code == 0, err
    assert out.startswith("ok:") and "deep check:" in out
    assert "error" not in out and "warning" not in out
    assert out.count("looks like") == 0 and "no NaN/Inf" in out
    assert_nothing_published(tmp_path / "out")


def test_demo_experts_pass_deep_clean(tiny_models, tmp_path, capsys):
    """The generated demo experts (a noisy task vector, ratio ~0.25 on matrices) are fine-tunes."""
    pipeline = make_pipeline(tmp_path, tiny_models)
    code, out, err = cli(capsys, "validate", pipeline, "--deep")
    assert code == 0, err
    assert "error" not in out


def test_mergelock_protected_expert_is_flagged(family, tmp_path, capsys):
    pipeline = pipeline_for(tmp_path, family, "ft1", "locked")
    err = assert_fails(capsys, pipeline, IncompatibleModelsError, str(family["locked"]),
                       "MergeLock", "model.layers.0.self_attn.q_proj.weight",
                       verb="validate", extra=("--deep",), dest=tmp_path / "out")
    assert str(family["ft1"]) not in err
    report = deep_validate(*_headers(family, "ft1", "locked"))
    locked = report.experts[1]
    assert locked.kind == "attention-scrambled"
    assert sorted(t.name for t in locked.flagged) == sorted(attention_names())
    assert all(1.2 < t.ratio < 1.6 for t in locked.flagged)        # about sqrt(2)
    assert not any("mlp" in t.name or "embed" in t.name for t in locked.flagged)
    assert report.experts[0].kind is None and report.experts[0].max_ratio.ratio < 0.05


def test_mergelock_report_names_every_tensor(family, tmp_path, capsys):
    pipeline = pipeline_for(tmp_path, family, "ft1", "locked")
    code, out, err = cli(capsys, "validate", pipeline, "--deep")
    assert code == IncompatibleModelsError.exit_code
    flagged_lines = [line.strip() for line in out.splitlines() if line.startswith("    model.")]
    assert sorted(line.split(":")[0] for line in flagged_lines) == sorted(attention_names())
    assert f"expert 2 {family['locked']}" in out and "MergeLock-style protection" in out


def test_expert_of_another_base_is_flagged(family, tmp_path, capsys):
    pipeline = pipeline_for(tmp_path, family, "other", "ft1")
    assert_fails(capsys, pipeline, IncompatibleModelsError, str(family["other"]), "another base",
                 "self_attn", verb="validate", extra=("--deep",), dest=tmp_path / "out")
    report = deep_validate(*_headers(family, "other", "ft1"))
    other = report.experts[0]
    assert other.kind == "another-base" and other.median_ratio > 1.2
    flagged = {t.name for t in other.flagged}
    assert set(attention_names()) <= flagged and MLP_UP in flagged and "lm_head.weight" in flagged
    assert report.experts[1].kind is None


def test_nan_found_by_deep_before_any_merge(family, tmp_path, capsys):
    ws = load_file(str(_shard_of(family["ft2"], MLP_UP)))
    ws[MLP_UP][0, 3] = float("nan")                   # row 0 is always sampled
    save_file(ws, str(_shard_of(family["ft2"], MLP_UP)), metadata={"format": "pt"})
    pipeline = pipeline_for(tmp_path, family, "ft1", "ft2")
    err = assert_fails(capsys, pipeline, NonFiniteError, str(family["ft2"]), f"tensor {MLP_UP}",
                       "NaN", "allow_nonfinite", verb="validate", extra=("--deep",),
                       dest=tmp_path / "out")
    assert str(family["ft1"]) not in err
    # without --deep the headers are fine: validate reads no value
    code, out, _ = cli(capsys, "validate", pipeline)
    assert code == 0


def test_inf_in_the_base_found_and_allowed(family, tmp_path, capsys):
    name = "model.layers.0.self_attn.k_proj.weight"            # [32, 64]: middle row 15
    ws = load_file(str(_shard_of(family["base"], name)))
    ws[name][15, 0] = float("-inf")
    save_file(ws, str(_shard_of(family["base"], name)), metadata={"format": "pt"})
    pipeline = pipeline_for(tmp_path, family, "ft1", "ft2")
    assert_fails(capsys, pipeline, NonFiniteError, str(family["base"]), f"tensor {name} (row 15)",
                 verb="validate", extra=("--deep",), dest=tmp_path / "out")
    pipeline = pipeline_for(tmp_path, family, "ft1", "ft2", allow_nonfinite=True)
    code, out, err = cli(capsys, "validate", pipeline, "--deep")
    assert code == 0, err
    assert f"warning: base {family['base']}: tensor {name}" in out and "allow_nonfinite" in out


def test_nonfinite_wins_over_a_flagged_expert(family, tmp_path, capsys):
    ws = load_file(str(_shard_of(family["ft1"], MLP_UP)))
    ws[MLP_UP][-1, 0] = float("inf")
    save_file(ws, str(_shard_of(family["ft1"], MLP_UP)), metadata={"format": "pt"})
    pipeline = pipeline_for(tmp_path, family, "ft1", "locked")
    code, out, err = cli(capsys, "validate", pipeline, "--deep")
    assert code == NonFiniteError.exit_code, err
    assert "MergeLock" in out                           # still reported


class ReadLog:
    """Every RangeReader.read_range call, as (url, start, stop)."""

    def __init__(self, monkeypatch):
        self.calls: list[tuple[str, int, int]] = []
        real = RangeReader.read_range

        def spy(reader, url, start, stop, out):
            self.calls.append((url, start, stop))
            return real(reader, url, start, stop, out)
        monkeypatch.setattr(RangeReader, "read_range", spy)

    @property
    def bytes(self) -> int:
        return sum(b - a for _, a, b in self.calls)


def test_deep_reads_only_the_sampled_rows(family, tmp_path, capsys, monkeypatch):
    reads = ReadLog(monkeypatch)
    pipeline = pipeline_for(tmp_path, family, "ft1", "ft2")
    code, out, err = cli(capsys, "validate", pipeline, "--deep", "--sample-rows", "4")
    assert code == 0, err
    models = [read_model_headers(str(family[k])) for k in ("base", "ft1", "ft2")]
    total = sum(m.nbytes for m in models)
    assert reads.calls and reads.bytes < total / 8
    assert f"read {reads.bytes} bytes in {len(reads.calls)} ranged reads" in out
    # each read lies inside one tensor, at the start of a sampled row
    for m in models:
        for name, (shard, info) in m.tensors.items():
            mine = [(a, b) for u, a, b in reads.calls if u == shard and info.start <= a < info.stop]
            assert mine, name
            assert all(b <= info.stop and (a - info.start) % info.row_bytes == 0 for a, b in mine)
            rows = {(a - info.start) // info.row_bytes for a, _ in mine}
            assert {0, info.rows - 1, (info.rows - 1) // 2} <= rows
            assert sum(b - a for a, b in mine) <= 6 * info.row_bytes         # 4 + middle (+1)
    # a byte budget per tensor bounds every tensor, whatever its size
    reads.calls.clear()
    report = deep_validate(*_headers(family, "ft1", "ft2"), max_bytes=200)
    per_tensor: dict[tuple[str, str], int] = {}
    for m in models:
        for name, (shard, info) in m.tensors.items():
            per_tensor[(shard, name)] = sum(b - a for u, a, b in reads.calls
                                            if u == shard and info.start <= a < info.stop)
    assert max(per_tensor.values()) <= 200 and report.bytes_read == reads.bytes


def test_deep_reads_ranges_of_object_store_urls(family, tmp_path):
    """The same check on fsspec URLs (``memory://``): ranged reads through the storage layer."""
    import fsspec

    fs = fsspec.filesystem("memory")
    root = f"/deep-{tmp_path.name}"
    for key in ("base", "ft1", "locked"):
        for f in family[key].iterdir():
            fs.pipe(f"{root}/{key}/{f.name}", f.read_bytes())
    try:
        models = [read_model_headers(f"memory://{root}/{k}") for k in ("base", "ft1", "locked")]
        report = deep_validate(models[0], models[1:])
    finally:
        fs.rm(root, recursive=True)
    assert [e.kind for e in report.experts] == [None, "attention-scrambled"]
    assert 0 < report.bytes_read < sum(m.nbytes for m in models) / 8


def test_validate_without_deep_reads_no_tensor_bytes(family, tmp_path, capsys, monkeypatch):
    reads = ReadLog(monkeypatch)
    pipeline = pipeline_for(tmp_path, family, "ft1", "locked")
    code, out, err = cli(capsys, "validate", pipeline)
    assert code == 0, err
    assert reads.calls == [] and "deep check" not in out


@pytest.mark.parametrize("extra", [("--sample-rows", "4"), ("--deep", "--sample-rows", "0")],
                         ids=["without-deep", "zero"])
def test_sample_rows_needs_deep_and_a_positive_count(family, tmp_path, capsys, extra):
    pipeline = pipeline_for(tmp_path, family, "ft1", "ft2")
    assert_fails(capsys, pipeline, ConfigError, "--sample-rows", verb="validate", extra=extra,
                 dest=tmp_path / "out")


def _headers(family, *experts):
    return (read_model_headers(str(family["base"])),
            [read_model_headers(str(family[e])) for e in experts])


def _shard_of(model: Path, tensor: str) -> Path:
    return model / json.loads((model / INDEX_NAME).read_text())["weight_map"][tensor]


def test_thresholds_separate_fine_tunes_from_scrambled_weights():
    """The numbers the thresholds rest on (module docstring of distmerge.checkpoint.deep)."""
    w = 0.02 * torch.randn(256, 256, generator=torch.Generator().manual_seed(0))
    ratio = lambda x: float((x - w).norm() / w.norm())      # noqa: E731
    assert ratio(fine_tune({"w": w}, 1, size=0.05)["w"]) < 0.1 < RATIO_THRESHOLD
    assert ratio(0.02 * torch.randn(256, 256)) == pytest.approx(math.sqrt(2), rel=0.05)
    assert ratio(random_orthogonal(256, 3) @ w) == pytest.approx(math.sqrt(2), rel=0.05)
    assert RATIO_THRESHOLD == deep.RATIO_THRESHOLD == 0.5


# -- allow_nonfinite: a run lets NaN and Inf through ------------------------------------------

def _set(row: int, col: int, value: float):
    def change(ts):
        ts[TENSOR][row, col] = value
    return change


def _merged(folder: Path, name: str) -> torch.Tensor:
    index = json.loads((folder / INDEX_NAME).read_text())
    with safe_open(str(folder / index["weight_map"][name]), framework="pt") as f:
        return f.get_tensor(name).float()


def test_allow_nonfinite_must_be_a_boolean(tiny_models, tmp_path, capsys):
    pipeline = make_pipeline(tmp_path, tiny_models, allow_nonfinite="sometimes")
    assert_fails(capsys, pipeline, ConfigError, "allow_nonfinite", verb="validate",
                 dest=tmp_path / "out")


@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_allow_nonfinite_merges_and_propagates(tiny_models, tmp_path, capsys, value):
    """Task arithmetic: out = base + sum_t w_t (theta_t - base), so a NaN (an Inf) of one expert
    lands at the same element of the output as NaN (+Inf), and nowhere else."""
    clean = make_pipeline(tmp_path / "clean", tiny_models, method={"name": "task_arithmetic"})
    code, _, err = cli(capsys, "run", clean)
    assert code == 0, err

    models = copy_models(tiny_models, tmp_path)
    rewrite_shard(models[3], TENSOR, _set(5, 3, value))
    refused = make_pipeline(tmp_path / "refused", models, method={"name": "task_arithmetic"})
    assert_fails(capsys, refused, NonFiniteError, str(models[3]), f"tensor {TENSOR}",
                 dest=tmp_path / "refused" / "out")

    allowed = make_pipeline(tmp_path / "allowed", models, method={"name": "task_arithmetic"},
                            allow_nonfinite=True)
    code, out, err = cli(capsys, "run", allowed)
    assert code == 0, err
    got = _merged(tmp_path / "allowed" / "out", TENSOR)
    want = _merged(tmp_path / "clean" / "out", TENSOR)
    if math.isnan(value):
        assert torch.isnan(got[5, 3])
    else:
        assert got[5, 3] == float("inf")
    mask = torch.ones_like(got, dtype=torch.bool)
    mask[5, 3] = False
    assert torch.isfinite(got[mask]).all()
    assert torch.equal(got[mask], want[mask])
    # every other tensor is the clean run's
    for name in json.loads((tmp_path / "clean" / "out" / INDEX_NAME).read_text())["weight_map"]:
        if name != TENSOR:
            assert torch.equal(_merged(tmp_path / "allowed" / "out", name),
                               _merged(tmp_path / "clean" / "out", name)), name
