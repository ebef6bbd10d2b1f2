"""TALL-mask compression (distmerge.compress): the packed format byte by byte on hand-computed
values, compress → extract against the formula computed in memory, exact rebuilds of
disjoint experts, the storage ratio, refusals, and failures that leave nothing behind."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from distmerge import compress as C
from distmerge.checkpoint.reader import RangeReader
from distmerge.checkpoint.writer import ShardWriter
from distmerge.cli import main
from distmerge.config import load_pipeline
from distmerge.errors import ConfigError, DestinationError
from tests.conftest import make_pipeline


def load_folder(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for p in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(str(p)))
    return out


def consensus(tmp_path: Path, models: list[Path], *, name: str = "pipe", method=None, out="out",
              **changes) -> Path:
    """A consensus pipeline YAML over ``models`` in its own folder; output.dtype null (→ float32)."""
    changes.setdefault("output", {"path": str(tmp_path / out), "dtype": None})
    return make_pipeline(tmp_path / name, models,
                         method=method or {"name": "consensus", "tall_lambda": 0.6}, **changes)


def staging_left(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if "distmerge-staging" in p.name]


def expected_rebuild(models: list[Path], lam: float, store: torch.dtype, out: torch.dtype | None):
    """θ₀ + m_t ⊙ τ_MTL for every expert, computed in memory from whole (tiny) models; τ_MTL
    as stored (cast to ``store``), the sum cast to ``out`` (None: the base's dtype)."""
    base = load_folder(models[0])
    experts = [load_folder(m) for m in models[1:]]
    result: list[dict[str, torch.Tensor]] = [{} for _ in experts]
    tau_mtls, masks = {}, {}
    for name, b in base.items():
        if not b.is_floating_point():
            for r in result:
                r[name] = b
            continue
        taus = [e[name].float() - b.float() for e in experts]
        tau_mtl = taus[0].clone()
        for t in taus[1:]:
            tau_mtl += t
        ms = [t.abs() > (tau_mtl - t).abs() * lam for t in taus]
        stored = tau_mtl.to(store)
        tau_mtls[name], masks[name] = stored, ms
        for r, m in zip(result, ms):
            r[name] = (b.float() + stored.float() * m.float()).to(out or b.dtype)
    return result, tau_mtls, masks


# -- the format on hand-computed values ----------------------------------------------------------

def write_hand_models(root: Path) -> list[Path]:
    """A base and 2 F32 experts (base 1 everywhere, so every τ is exact):
    w [2, 10] (rows not a multiple of 8), b [5] (1-D), s [] (0-D), pos [3] I64."""
    tau1 = {
        "w": [[1, 0, 2, -1, 3, 0, 0, 1, 1, 4], [1, -3, 0, 0, 0, 0, 0, 0, 0, 2]],
        "b": [0.5, 0, -1, 2, 0],
        "s": 3.0,
    }
    tau2 = {
        "w": [[1, 2, -2, 0, 1, 0, 5, 0, -1, 0], [2, 1, 0, 0, 0, 0, 0, 0, 0, -4]],
        "b": [0, 0.25, 1, 0, 0],
        "s": 1.0,
    }
    base = {k: torch.ones_like(torch.tensor(v, dtype=torch.float32)) for k, v in tau1.items()}
    base["pos"] = torch.tensor([0, 1, 2], dtype=torch.int64)
    folders = []
    for i, tau in enumerate([None, tau1, tau2]):
        folder = root / ("base" if tau is None else f"expert-{i}")
        folder.mkdir(parents=True)
        weights = dict(base)
        if tau is not None:
            weights.update({k: base[k] + torch.tensor(v, dtype=torch.float32) for k, v in tau.items()})
            weights["pos"] = torch.tensor([7, 8, 9], dtype=torch.int64)    # never used: the base's is
        save_file(weights, str(folder / "model.safetensors"))
        (folder / "config.json").write_text(json.dumps({"model_type": "toy", "torch_dtype": "float32"}))
        folders.append(folder)
    return folders


def test_hand_computed_masks_and_tau_mtl_byte_by_byte(tmp_path):
    models = write_hand_models(tmp_path / "m")
    pipe = consensus(tmp_path, models, method={"name": "consensus", "tall_lambda": 0.5})
    summary = C.compress(load_pipeline(pipe))
    out = tmp_path / "out"
    got = load_folder(out)
    # λ = .5, two experts: m1 = |τ1| > .5 |τ2|, m2 = |τ2| > .5 |τ1| (τ_MTL − τ1 = τ2), strict.
    # w row 0: m1 = 1 0 1 1 1 0 0 1 | 1 1 → byte 0 = 1+4+8+16+128 = 157, byte 1 = 1+2 = 3
    #          m2 = 1 1 1 0 0 0 1 0 | 1 0 → byte 0 = 1+2+4+64 = 71,     byte 1 = 1
    # w row 1: col 0: 1 > 1 no (strict), 2 > .5; col 1: 3 > .5, 1 > 1.5 no; col 9: 2 > 2 no, 4 > 1
    #          m1 = 0 1 0 0 0 0 0 0 | 0 0 → 2, 0;  m2 = 1 0 0 0 0 0 0 0 | 0 1 → 1, 2
    assert got["w.tall_mask.0"].dtype == torch.uint8
    assert got["w.tall_mask.0"].tolist() == [[157, 3], [2, 0]]
    assert got["w.tall_mask.1"].tolist() == [[71, 1], [1, 2]]
    # b (1-D → one row): m1 = 1 0 1 1 0 → 1+4+8 = 13; m2 = 0 1 1 0 0 → 2+4 = 6 (entry 2 cancels
    # in τ_MTL, both masks hold)
    assert got["b.tall_mask.0"].tolist() == [[13]] and got["b.tall_mask.1"].tolist() == [[6]]
    # s (0-D → one row of one): 3 > .5 · 1 → 1; 1 > .5 · 3 no → 0
    assert got["s.tall_mask.0"].tolist() == [[1]] and got["s.tall_mask.1"].tolist() == [[0]]
    # τ_MTL = τ1 + τ2, float32 (output.dtype null)
    assert got["w"].dtype == torch.float32
    assert got["w"].tolist() == [[2, 2, 0, -1, 4, 0, 5, 1, 0, 4], [3, -2, 0, 0, 0, 0, 0, 0, 0, -2]]
    assert got["b"].tolist() == [0.5, 0.25, 0, 2, 0]
    assert got["s"].shape == () and got["s"].item() == 4.0
    assert "pos" not in got                                         # integers stay in the base
    assert set(got) == {"w", "b", "s"} | {f"{n}.tall_mask.{t}" for n in "wbs" for t in (0, 1)}

    manifest = json.loads((out / "compression.json").read_text())
    assert manifest["format"] == C.FORMAT and manifest["format_version"] == C.FORMAT_VERSION
    assert manifest["base"] == str(models[0]) and manifest["tall_lambda"] == 0.5
    assert [e["path"] for e in manifest["experts"]] == [str(m) for m in models[1:]]
    assert manifest["dtype"] == "float32" and manifest["integer_tensors"] == ["pos"]
    assert json.loads((out / "config.json").read_text())["model_type"] == "toy"
    # set bits: m1 = 7 (w row 0) + 1 (w row 1) + 3 (b) + 1 (s); m2 = 5 + 2 + 2 + 0
    assert summary.mask_ones == (7 + 1 + 3 + 1, 5 + 2 + 2 + 0)
    assert summary.tensors == 3 and summary.integer_tensors == 1

    # extract expert 1 ("expert-2"): θ₀ + m2 ⊙ τ_MTL, pos from the base
    res = C.extract(str(out), "expert-2", str(tmp_path / "e2"), reference=str(models[2]))
    e2 = load_folder(tmp_path / "e2")
    assert res.expert == 1
    assert e2["w"].tolist() == [[3, 3, 1, 1, 1, 1, 6, 1, 1, 1], [4, 1, 1, 1, 1, 1, 1, 1, 1, -1]]
    assert e2["b"].tolist() == [1, 1.25, 1, 1, 1] and e2["s"].item() == 1.0
    assert e2["pos"].tolist() == [0, 1, 2]
    # errors by hand: w: θ̂ − θ = m2 ⊙ τ_MTL − τ2
    #   row 0: (2−1, 2−2, 0+2, 0, 0−1, 0, 5−5, 0, 0+1, 0) → 1 + 4 + 1 + 1 = 7; ‖τ2 row 0‖² = 1+4+4+1+25+1 = 36
    #   row 1: (3−2, 0−1, ..., −2+4) → 1 + 1 + 4 = 6;                     ‖τ2 row 1‖² = 4+1+16 = 21
    assert (res.errors["w"].error_sq, res.errors["w"].delta_sq) == (13.0, 57.0)
    # b: m2 ⊙ τ_MTL = (0, .25, 0, 0, 0), τ2 = (0, .25, 1, 0, 0) → 1 / .0625 + 1
    assert (res.errors["b"].error_sq, res.errors["b"].delta_sq) == (1.0, 1.0625)
    assert (res.errors["s"].error_sq, res.errors["s"].delta_sq) == (1.0, 1.0)
    assert set(res.errors) == {"w", "b", "s"}
    assert res.relative_error == pytest.approx(math.sqrt(15.0 / 59.0625))
    assert res.errors["s"].relative == 1.0


def test_overrides_set_their_own_lambda(tmp_path):
    models = write_hand_models(tmp_path / "m")
    pipe = consensus(tmp_path, models, method={"name": "consensus", "tall_lambda": 0.5},
                     overrides=[{"match": "w", "tall_lambda": 0.0}])
    C.compress(load_pipeline(pipe))
    got = load_folder(tmp_path / "out")
    # λ = 0 on w: m_t = τ_t ≠ 0; row 1 of τ1 is nonzero at columns 0, 1, 9 → bytes 3, 2
    assert got["w.tall_mask.0"].tolist() == [[157, 3], [3, 2]]
    assert got["b.tall_mask.0"].tolist() == [[13]]                    # λ = .5 as before
    manifest = json.loads((tmp_path / "out" / "compression.json").read_text())
    assert manifest["tall_lambda_overrides"] == [{"match": "w", "tall_lambda": 0.0}]


def test_pack_unpack_round_trip_and_bit_order():
    gen = torch.Generator().manual_seed(0)
    for rows, cols in [(1, 1), (3, 7), (2, 8), (4, 9), (5, 17), (1, 0), (0, 5)]:
        m = torch.rand(rows, cols, generator=gen) > 0.5
        packed = C.pack_mask(m)
        assert packed.dtype == torch.uint8 and tuple(packed.shape) == (rows, (cols + 7) // 8)
        assert torch.equal(C.unpack_mask(packed, cols), m)
        for r in range(rows):                                  # entry c is bit c % 8 of byte c // 8
            for c in range(cols):
                assert bool(packed[r, c // 8] >> (c % 8) & 1) == bool(m[r, c])
            if cols % 8:
                assert packed[r, -1] >> (cols % 8) == 0      # padding bits are 0
    assert C.mask_shape(()) == (1, 1) and C.mask_shape((5,)) == (1, 1) and C.mask_shape((3, 4, 5)) == (3, 3)


# -- compress → extract on the fixture --------------------------------------------------------------

@pytest.mark.parametrize("store, out_dtype", [(None, None), ("bfloat16", "float32"), (None, "bfloat16")])
def test_compress_extract_reproduces_formula(tmp_path, tiny_models, store, out_dtype):
    lam = 0.4
    pipe = consensus(tmp_path, tiny_models, method={"name": "consensus", "tall_lambda": lam},
                     output={"path": str(tmp_path / "out"), "dtype": store, "shard_size": 30_000},
                     resources={"slice_size": "2KB"})
    summary = C.compress(load_pipeline(pipe))
    assert summary.shards > 1 and summary.dtype == (store or "float32")
    torch_store = getattr(torch, store or "float32")
    expected, tau_mtls, masks = expected_rebuild(tiny_models, lam, torch_store,
                                                 getattr(torch, out_dtype) if out_dtype else None)
    stored = load_folder(tmp_path / "out")
    for name, tau_mtl in tau_mtls.items():
        assert stored[name].dtype == torch_store and torch.equal(stored[name], tau_mtl), name
        for t, m in enumerate(masks[name]):
            packed = stored[C.mask_name(name, t)]
            rows, cols = C.rows_cols(tuple(m.shape))
            assert torch.equal(C.unpack_mask(packed, cols), m.reshape(rows, cols)), (name, t)
    for t in range(len(tiny_models) - 1):
        dest = tmp_path / f"e{t}"
        res = C.extract(str(tmp_path / "out"), t, str(dest), dtype=out_dtype, slice_size=1024)
        assert res.expert == t and res.reference is None and res.relative_error is None
        got = load_folder(dest)
        assert set(got) == set(expected[t])
        for name, want in expected[t].items():
            assert got[name].dtype == want.dtype and torch.equal(got[name], want), (t, name)
        assert (dest / "model.safetensors.index.json").exists()
        cfg = json.loads((dest / "config.json").read_text())
        assert cfg["torch_dtype"] == (out_dtype or "bfloat16")


def test_masks_are_the_consensus_merges(tmp_path, tiny_models):
    """With min_agree 1 and scale 1, the consensus merge is θ₀ + (∨_t m_t) ⊙ τ_MTL: the stored
    masks and τ_MTL must give exactly the merge's bytes."""
    from distmerge.engine.driver import run_pipeline

    method = {"name": "consensus", "tall_lambda": 0.3, "min_agree": 1}
    merged_pipe = consensus(tmp_path, tiny_models, name="merge", method=method, out="merged",
                            output={"path": str(tmp_path / "merged"), "dtype": "float32"})
    run_pipeline(load_pipeline(merged_pipe), executor="local", show_progress=False)
    C.compress(load_pipeline(consensus(tmp_path, tiny_models, method=method)))
    merged, stored, base = load_folder(tmp_path / "merged"), load_folder(tmp_path / "out"), load_folder(tiny_models[0])
    for name, b in base.items():
        cols = C.rows_cols(tuple(b.shape))[1]
        any_mask = torch.zeros(C.rows_cols(tuple(b.shape)), dtype=torch.bool)
        for t in range(3):
            any_mask |= C.unpack_mask(stored[C.mask_name(name, t)], cols)
        want = b.float() + stored[name] * any_mask.reshape(b.shape).float()
        assert torch.equal(merged[name], want), name


def test_disjoint_experts_rebuild_exactly_with_lambda_zero(tmp_path):
    """λ = 0 and every entry moved by exactly one expert: m_t = (τ_t ≠ 0) and τ_MTL = τ_t there,
    so every expert comes back bit for bit (bf16 values on a 1/64 grid: all differences exact)."""
    gen = torch.Generator().manual_seed(3)
    shapes = {"a.weight": (6, 11), "b.weight": (13,), "c.weight": (4, 3, 5)}
    base = {n: torch.randint(-64, 65, s, generator=gen).float() / 64 for n, s in shapes.items()}
    base["ids"] = torch.arange(4, dtype=torch.int32)
    T = 3
    folders = []
    for i in range(T + 1):
        w = {}
        for n, b in base.items():
            if n == "ids":
                w[n] = b
                continue
            owner = torch.arange(b.numel()).reshape(b.shape) % T            # the expert that moves it
            step = torch.randint(1, 33, b.shape, generator=gen).float() / 64
            sign = torch.where(torch.rand(b.shape, generator=gen) < 0.5, -1.0, 1.0)
            w[n] = (b + torch.where(owner == i - 1, sign * step, 0.0)) if i else b
        folder = tmp_path / "m" / (f"expert-{i}" if i else "base")
        folder.mkdir(parents=True)
        save_file({n: v.to(torch.bfloat16) if v.is_floating_point() else v for n, v in w.items()},
                  str(folder / "model.safetensors"))
        folders.append(folder)
    pipe = consensus(tmp_path, folders, method={"name": "consensus", "tall_lambda": 0.0},
                     resources={"slice_size": "64B"})
    C.compress(load_pipeline(pipe))
    for t in range(T):
        dest = tmp_path / f"e{t}"
        res = C.extract(str(tmp_path / "out"), str(folders[t + 1]), str(dest), reference=str(folders[t + 1]))
        assert res.expert == t and res.relative_error == 0.0
        assert all(e.error_sq == 0.0 and e.delta_sq > 0 for e in res.errors.values())
        assert res.error_stats() == (0.0, 0.0, 0.0)
        got, want = load_folder(dest), load_folder(folders[t + 1])
        assert set(got) == set(want) and all(torch.equal(got[n], want[n]) for n in want)


def test_storage_ratio_is_the_files_real_sizes(tmp_path, tiny_models):
    summary = C.compress(load_pipeline(consensus(tmp_path, tiny_models)))
    out = tmp_path / "out"
    real = sum(p.stat().st_size for p in out.iterdir())
    experts = sum(p.stat().st_size for m in tiny_models[1:] for p in m.glob("*.safetensors"))
    assert summary.compressed_bytes == real and summary.experts_bytes == experts
    assert summary.storage_ratio == real / experts
    # τ_MTL in fp32 (2x a bf16 model) + 3 masks of 1 bit per entry, vs 3 bf16 experts: 0.73,
    # plus the index json and compression.json, large beside these tiny weights
    assert 0.73 < summary.storage_ratio < 0.85
    assert summary.lines()[0] == f"compressed checkpoint: {out}"


def test_reads_stay_within_the_slice_budget(tmp_path, tiny_models, monkeypatch):
    seen = []
    original = RangeReader.read_rows

    def spy(self, slot, url, info, r0, r1):
        seen.append((info.name, (r1 - r0) * (info.numel // info.rows), info.numel // info.rows))
        return original(self, slot, url, info, r0, r1)

    monkeypatch.setattr(RangeReader, "read_rows", spy)
    C.compress(load_pipeline(consensus(tmp_path, tiny_models, resources={"slice_size": "1KB"})))
    budget = 1000 // 4
    assert seen and all(n <= max(budget, row) for _, n, row in seen)
    assert any(name == "model.embed_tokens.weight" for name, _, _ in seen)
    assert max(n for _, n, _ in seen) < 96 * 32                 # never a whole big tensor


# -- refusals and failures -------------------------------------------------------------------------

def test_refuses_other_methods_and_weights(tmp_path, tiny_models):
    pipe = consensus(tmp_path, tiny_models, method={"name": "ties", "density": 0.3})
    with pytest.raises(ConfigError, match="method.name: .*'ties'"):
        C.compress(load_pipeline(pipe))
    pipe = consensus(tmp_path, tiny_models, name="w",
                     experts=[{"path": str(m), "weight": w} for m, w in zip(tiny_models[1:], [1.0, 0.5, 1.0])])
    with pytest.raises(ConfigError, match=r"experts\[1\].weight: .*unweighted"):
        C.compress(load_pipeline(pipe))
    pipe = consensus(tmp_path, tiny_models, name="l", method={"name": "consensus", "lines": {}})
    with pytest.raises(ConfigError, match="lines"):
        C.compress(load_pipeline(pipe))
    assert not (tmp_path / "out").exists() and not staging_left(tmp_path)


def test_refuses_existing_destination_and_unknown_expert(tmp_path, tiny_models):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    pipe = consensus(tmp_path, tiny_models)
    with pytest.raises(DestinationError, match="already exists"):
        C.compress(load_pipeline(pipe))
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]

    C.compress(load_pipeline(pipe, overwrite=True))
    assert (tmp_path / "out" / "compression.json").exists() and not (tmp_path / "out" / "keep.txt").exists()
    with pytest.raises(ConfigError, match="unknown expert 'nope'.*0: .*expert-1"):
        C.extract(str(tmp_path / "out"), "nope", str(tmp_path / "e"))
    with pytest.raises(ConfigError, match="out of range"):
        C.extract(str(tmp_path / "out"), "7", str(tmp_path / "e"))
    assert not (tmp_path / "e").exists()
    (tmp_path / "e").mkdir()
    with pytest.raises(DestinationError, match="already exists"):
        C.extract(str(tmp_path / "out"), "expert-1", str(tmp_path / "e"))
    assert list((tmp_path / "e").iterdir()) == []
    # every way of naming an expert
    manifest = C.read_manifest(str(tmp_path / "out"))
    assert [C.resolve_expert(manifest, k) for k in (2, "2", "expert-3", str(tiny_models[3]),
                                                     str(tiny_models[3]) + "/")] == [2] * 5
    assert not staging_left(tmp_path)


def test_failure_mid_compress_leaves_nothing(tmp_path, tiny_models, monkeypatch):
    original, calls = ShardWriter.write, []

    def flaky(self, path, offset, data):
        calls.append(offset)
        if len(calls) > 1:
            raise OSError("disk on fire")
        return original(self, path, offset, data)

    monkeypatch.setattr(ShardWriter, "write", flaky)
    pipe = consensus(tmp_path, tiny_models, resources={"slice_size": "4KB"})
    with pytest.raises(OSError, match="disk on fire"):
        C.compress(load_pipeline(pipe))
    assert len(calls) == 2
    assert not (tmp_path / "out").exists() and not staging_left(tmp_path)
    # with an existing destination and overwrite: it stays as it was
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old").write_text("old")
    calls.clear()
    with pytest.raises(OSError):
        C.compress(load_pipeline(pipe, overwrite=True))
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["old"] and not staging_left(tmp_path)


def test_failure_mid_extract_leaves_nothing(tmp_path, tiny_models, monkeypatch):
    C.compress(load_pipeline(consensus(tmp_path, tiny_models)))

    def broken(self, path, offset, data):
        raise OSError("disk on fire")

    monkeypatch.setattr(ShardWriter, "write", broken)
    with pytest.raises(OSError):
        C.extract(str(tmp_path / "out"), 0, str(tmp_path / "e"))
    assert not (tmp_path / "e").exists() and not staging_left(tmp_path)


def test_extract_refuses_a_changed_base(tmp_path):
    models = write_hand_models(tmp_path / "m")
    C.compress(load_pipeline(consensus(tmp_path, models)))
    save_file({"w": torch.ones(2, 10)}, str(models[0] / "model.safetensors"))     # base replaced
    with pytest.raises(Exception, match="does not match the base"):
        C.extract(str(tmp_path / "out"), 0, str(tmp_path / "e"))
    assert not (tmp_path / "e").exists()


# -- the CLI ---------------------------------------------------------------------------------------

def test_cli_compress_and_extract(tmp_path, tiny_models, capsys):
    pipe = consensus(tmp_path, tiny_models)
    assert main(["compress", str(pipe), "--slice-size", "8KB"]) == 0
    out = capsys.readouterr().out
    assert f"compressed checkpoint: {tmp_path / 'out'}" in out and "storage ratio" in out
    assert main(["compress", str(pipe)]) == 6
    assert "already exists" in capsys.readouterr().err
    assert main(["extract", str(tmp_path / "out"), "expert-2", "--out", str(tmp_path / "e"),
                 "--dtype", "float32", "--reference", str(tiny_models[2])]) == 0
    out = capsys.readouterr().out
    assert "extracted expert 1" in out and "model.norm.weight" in out
    assert "per tensor: min" in out and "overall relative error" in out
    assert load_folder(tmp_path / "e")["model.norm.weight"].dtype == torch.float32
    assert main(["extract", str(tmp_path / "out"), "nobody", "--out", str(tmp_path / "f")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("distmerge: error: unknown expert 'nobody'") and not (tmp_path / "f").exists()
    bad = consensus(tmp_path, tiny_models, name="ties", out="t", method={"name": "ties"})
    assert main(["compress", str(bad)]) == 2
    assert "'ties'" in capsys.readouterr().err and not (tmp_path / "t").exists()
