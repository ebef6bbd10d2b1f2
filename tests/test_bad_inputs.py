"""Bad inputs through the real CLI: every one fails with its error's exit code, a message naming
the key, file or tensor at fault, and nothing published (no destination, no staging folder).

Each test copies the session's tiny models into its own ``tmp_path`` before changing anything;
hostile safetensors files are written by hand (u64 length + JSON header + data).
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path
from typing import Callable

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import make_pipeline, sha256_tree
from distmerge.checkpoint.source import INDEX_NAME
from distmerge.cli import main
from distmerge.errors import (
    ConfigError,
    DestinationError,
    IncompatibleModelsError,
    NonFiniteError,
    SourceNotFoundError,
    UnsafeCheckpointError,
)

SHARD1 = "model-00001-of-00003.safetensors"
TENSOR = "model.layers.1.mlp.up_proj.weight"     # [64, 32] bf16 in the tiny models


# -- helpers ----------------------------------------------------------------------------------

def copy_models(tiny_models: list[Path], tmp_path: Path) -> list[Path]:
    """A private copy of base and experts (the fixture's folders are shared: never touch them)."""
    root = tmp_path / "models"
    return [Path(shutil.copytree(m, root / m.name)) for m in tiny_models]


def cli(capsys, verb: str, pipeline: Path, *extra: str) -> tuple[int, str, str]:
    """Run ``distmerge VERB PIPELINE`` in-process; returns (exit code, stdout, stderr)."""
    argv = [verb, str(pipeline), *extra]
    if verb == "run":
        argv += ["--executor", "local", "--no-progress"]
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def staging_leftovers(dest: Path) -> list[str]:
    parent = dest.parent
    if not parent.exists():
        return []
    return sorted(p.name for p in parent.iterdir()
                  if p.name.startswith(f".{dest.name}.distmerge-staging"))


def assert_nothing_published(dest: Path) -> None:
    assert not dest.exists(), f"{dest} was created by a failed run"
    assert staging_leftovers(dest) == []


def assert_fails(capsys, pipeline: Path, error: type, *fragments: str, verb: str = "run",
                 extra: tuple[str, ...] = (), dest: Path | None = None) -> str:
    """The CLI exits with ``error.exit_code``, one error message holding every fragment, and
    (unless ``dest`` is None) publishes nothing at ``dest``."""
    code, _, err = cli(capsys, verb, pipeline, *extra)
    assert code == error.exit_code, err
    assert err.startswith("distmerge: error: "), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in err, f"{fragment!r} not in {err!r}"
    if dest is not None:
        assert_nothing_published(dest)
    return err


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def shard_of(model: Path, tensor: str) -> Path:
    index = json.loads((model / INDEX_NAME).read_text())
    return model / index["weight_map"][tensor]


def rewrite_shard(model: Path, tensor: str, change: Callable[[dict[str, torch.Tensor]], None]) -> Path:
    """Load the shard holding ``tensor``, let ``change`` edit its tensors, save it back."""
    path = shard_of(model, tensor)
    tensors = load_file(str(path))
    change(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})
    return path


def data_start(raw: bytes) -> int:
    return 8 + struct.unpack("<Q", raw[:8])[0]


def safetensors_bytes(header: dict | bytes, data: bytes = b"") -> bytes:
    """``[u64 LE length][header, space-padded to 8][data]``."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + data


# -- 1. the pipeline file ---------------------------------------------------------------------


def _weights(m, *weights):
    return [{"path": str(p), "weight": w} for p, w in zip(m[1:], weights)]


CONFIG_CASES = [
    # changes(tmp_path, models) for make_pipeline, extra CLI args, fragments of the message
    pytest.param(lambda t, m: {"bogus": 1}, (), ["pipeline.yaml", "bogus: unknown key"],
                 id="unknown-top-level-key"),
    pytest.param(lambda t, m: {"output": {"path": str(t / "out"), "compresion": "zstd"}}, (),
                 ["pipeline.yaml", "output.compresion: unknown key"], id="unknown-output-key"),
    pytest.param(lambda t, m: {"method": {"name": "tiez", "density": 0.3}}, (),
                 ["method.name", "'tiez'", "ties"], id="unknown-method"),
    pytest.param(lambda t, m: {"method": {"name": "ties", "densty": 0.3}}, (),
                 ["method.densty", "unknown parameter"], id="unknown-method-parameter"),
    pytest.param(lambda t, m: {"resources": {"workers": "two"}}, (),
                 ["pipeline.yaml", "resources.workers", "integer"], id="workers-wrong-type"),
    pytest.param(lambda t, m: {"method": {"name": "ties", "density": 1.5}}, (),
                 ["method.density", "between 0 and 1"], id="density-impossible"),
    pytest.param(lambda t, m: {"resources": {"workers": 0}}, (),
                 ["resources.workers", "greater than or equal to 1"], id="workers-zero"),
    pytest.param(lambda t, m: {}, ("--workers", "0"),
                 ["resources.workers", "greater than or equal to 1"], id="workers-zero-flag"),
    pytest.param(lambda t, m: {"overrides": [{"match": "*.norm.*", "density": -1}]}, (),
                 ["overrides[0].density"], id="override-parameter"),
    pytest.param(lambda t, m: {"experts": _weights(m, 1.0)}, (), ["experts", "at least 2"],
                 id="one-expert"),
    pytest.param(lambda t, m: {"experts": []}, (), ["experts", "at least 2"], id="no-experts"),
    # known bugs: accepted today, the run then publishes a wrong model or crashes mid-merge
    pytest.param(lambda t, m: {"experts": _weights(m, float("nan"), 1.0, 1.0)}, (),
                 ["experts.0.weight"], id="weight-nan"),
    pytest.param(lambda t, m: {"method": {"name": "ties", "scale": float("inf")}}, (),
                 ["method.scale"], id="ties-scale-inf"),
    pytest.param(lambda t, m: {"method": {"name": "linear"}, "experts": _weights(m, 1.0, -1.0, 0.0)},
                 (), ["weight"], id="linear-weights-sum-to-zero"),
]


@pytest.mark.parametrize("verb", ["run", "validate"])
@pytest.mark.parametrize("changes, extra, fragments", CONFIG_CASES)
def test_config_error_names_the_key(tiny_models, tmp_path, capsys, verb, changes, extra, fragments):
    models = copy_models(tiny_models, tmp_path)
    pipeline = make_pipeline(tmp_path, models, **changes(tmp_path, models))
    assert_fails(capsys, pipeline, ConfigError, *fragments, verb=verb, extra=extra,
                 dest=tmp_path / "out")


def test_missing_pipeline_file(tmp_path, capsys):
    assert_fails(capsys, tmp_path / "nope.yaml", ConfigError, "nope.yaml", dest=tmp_path / "out")


# -- 2. missing models and shards -------------------------------------------------------------

@pytest.mark.parametrize("which", [0, 2], ids=["base", "expert"])
def test_missing_model_folder(tiny_models, tmp_path, capsys, which):
    models = copy_models(tiny_models, tmp_path)
    missing = tmp_path / "models" / "no-such-model"
    models[which] = missing
    pipeline = make_pipeline(tmp_path, models)
    assert_fails(capsys, pipeline, SourceNotFoundError, str(missing), "not found",
                 dest=tmp_path / "out")


def test_shard_named_by_index_deleted(tiny_models, tmp_path, capsys):
    models = copy_models(tiny_models, tmp_path)
    shard = models[1] / "model-00002-of-00003.safetensors"
    shard.unlink()
    pipeline = make_pipeline(tmp_path, models)
    assert_fails(capsys, pipeline, SourceNotFoundError, str(models[1] / INDEX_NAME), shard.name,
                 "missing", dest=tmp_path / "out")


# -- 3. experts that do not match the base ----------------------------------------------------

def _drop(ts):
    del ts[TENSOR]


def _reshape(ts):
    ts[TENSOR] = ts[TENSOR][:32].clone()


def _retype(ts):
    ts[TENSOR] = ts[TENSOR].float()


@pytest.mark.parametrize("verb", ["run", "validate"])
@pytest.mark.parametrize("change, fragment", [
    (_drop, f"lacks 1 tensor(s) of the base: {TENSOR}"),
    (_reshape, f"{TENSOR} is BF16[32, 32] (base BF16[64, 32])"),
    (_retype, f"{TENSOR} is F32[64, 32] (base BF16[64, 32])"),
], ids=["missing-tensor", "other-shape", "other-dtype"])
def test_incompatible_expert(tiny_models, tmp_path, capsys, verb, change, fragment):
    models = copy_models(tiny_models, tmp_path)
    rewrite_shard(models[2], TENSOR, change)
    index_path = models[2] / INDEX_NAME
    index = json.loads(index_path.read_text())
    if change is _drop:                          # a consistent model that lacks the tensor
        del index["weight_map"][TENSOR]
        index_path.write_text(json.dumps(index))
    pipeline = make_pipeline(tmp_path, models)
    assert_fails(capsys, pipeline, IncompatibleModelsError, str(models[2]), fragment,
                 verb=verb, dest=tmp_path / "out")


def test_index_disagreeing_with_shard_headers(tiny_models, tmp_path, capsys):
    models = copy_models(tiny_models, tmp_path)
    rewrite_shard(models[2], TENSOR, _drop)     # the index still lists the tensor
    pipeline = make_pipeline(tmp_path, models)
    assert_fails(capsys, pipeline, UnsafeCheckpointError, str(models[2] / INDEX_NAME),
                 "disagrees with the shard headers", TENSOR, dest=tmp_path / "out")


# -- 4. pickle checkpoints --------------------------------------------------------------------

@pytest.mark.parametrize("point_at_file", [False, True], ids=["folder", "bin-file"])
def test_pickle_checkpoint_refused(tiny_models, tmp_path, capsys, point_at_file):
    models = copy_models(tiny_models, tmp_path)
    pickled = tmp_path / "models" / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text("{}")
    # never loaded: the bytes only have to exist (a real one would run code on torch.load)
    (pickled / "pytorch_model.bin").write_bytes(b"\x80\x04\x95 not really a pickle")
    models[1] = pickled / "pytorch_model.bin" if point_at_file else pickled
    pipeline = make_pipeline(tmp_path, models)
    err = assert_fails(capsys, pipeline, UnsafeCheckpointError, str(pickled), "pytorch_model.bin",
                       "pickle", dest=tmp_path / "out")
    assert "convert" in err.lower() and "safetensors" in err


# -- 5. corrupt or hostile shard headers ------------------------------------------------------

def _two_overlapping(orig: bytes) -> bytes:
    return safetensors_bytes({
        "a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
        "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]},
    }, bytes(24))


def _one_terabyte(orig: bytes) -> bytes:
    return safetensors_bytes(
        {"huge": {"dtype": "BF16", "shape": [2**19, 2**20], "data_offsets": [0, 2**40]}}, bytes(64))


def _unknown_dtype(orig: bytes) -> bytes:
    return safetensors_bytes({"w": {"dtype": "X9", "shape": [2], "data_offsets": [0, 4]}}, bytes(4))


def _list_dtype(orig: bytes) -> bytes:
    return safetensors_bytes({"w": {"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]}}, bytes(4))


def _truncated(orig: bytes) -> bytes:
    start = data_start(orig)
    return orig[: start + (len(orig) - start) // 2]        # cut in the middle of the data


HEADER_CASES = [
    # hostile bytes made from the original shard's bytes, fragments of the message
    pytest.param(lambda o: struct.pack("<Q", len(o)) + o[8:], ["runs past the end of the file"],
                 id="length-past-eof"),
    pytest.param(lambda o: struct.pack("<Q", 2**63) + o[8:], [str(2**63), "limit"], id="length-2**63"),
    pytest.param(lambda o: struct.pack("<Q", 100_000_001) + o[8:], ["100000001", "limit"],
                 id="header-over-100MB"),
    pytest.param(lambda o: b"\x10\x00\x00", ["shorter than 8 bytes"], id="shorter-than-8-bytes"),
    pytest.param(_two_overlapping, ["'a' and 'b' overlap"], id="overlapping-offsets"),
    pytest.param(_one_terabyte, ["'huge'", str(2**40), "outside the data section"],
                 id="offsets-outside-data"),
    pytest.param(_unknown_dtype, ["unknown dtype 'X9'"], id="unknown-dtype"),
    pytest.param(lambda o: safetensors_bytes(b'{"w": {"dtype": "F32",', bytes(8)), ["not UTF-8 JSON"],
                 id="invalid-json"),
    pytest.param(lambda o: safetensors_bytes(b"[1, 2]", bytes(8)), ["not a JSON object"],
                 id="not-an-object"),
    pytest.param(_truncated, ["data_offsets", "outside the data section"], id="truncated-data"),
    # known bugs: each escapes the CLI as a traceback instead of UnsafeCheckpointError
    pytest.param(_list_dtype, ["dtype"], id="dtype-not-a-string"),
    pytest.param(lambda o: safetensors_bytes(b"[" * 100_000 + b"]" * 100_000), ["JSON"],
                 id="json-nested-too-deep"),
    pytest.param(lambda o: safetensors_bytes(
        b'{"w": {"dtype": "F32", "shape": [' + b"9" * 5000 + b'], "data_offsets": [0, 4]}}', bytes(4)),
                 ["JSON"], id="json-int-too-long"),
]


@pytest.mark.parametrize("verb", ["run", "validate"])
@pytest.mark.parametrize("hostile, fragments", HEADER_CASES)
def test_hostile_shard_header(tiny_models, tmp_path, capsys, verb, hostile, fragments):
    models = copy_models(tiny_models, tmp_path)
    shard = models[1] / SHARD1
    shard.write_bytes(hostile(shard.read_bytes()))
    pipeline = make_pipeline(tmp_path, models)
    assert_fails(capsys, pipeline, UnsafeCheckpointError, str(shard), *fragments,
                 verb=verb, dest=tmp_path / "out")


# -- 6. reading outside the model folder ------------------------------------------------------

@pytest.mark.parametrize("kind", ["dotdot", "absolute"])
def test_index_pointing_outside_the_model(tiny_models, tmp_path, capsys, kind):
    models = copy_models(tiny_models, tmp_path)
    other = tmp_path / "models" / "other"
    other.mkdir()
    shutil.copy(models[1] / SHARD1, other / "model.safetensors")     # a real, valid file there
    name = "../other/model.safetensors" if kind == "dotdot" else str(other / "model.safetensors")
    index_path = models[1] / INDEX_NAME
    index = json.loads(index_path.read_text())
    index["weight_map"] = {t: (name if f == SHARD1 else f) for t, f in index["weight_map"].items()}
    index_path.write_text(json.dumps(index))
    (models[1] / SHARD1).unlink()
    pipeline = make_pipeline(tmp_path, models)
    assert_fails(capsys, pipeline, UnsafeCheckpointError, str(index_path), repr(name),
                 "outside", dest=tmp_path / "out")


def test_index_nested_too_deep(tiny_models, tmp_path, capsys):
    models = copy_models(tiny_models, tmp_path)
    index_path = models[1] / INDEX_NAME
    index_path.write_text("[" * 100_000 + "]" * 100_000)
    pipeline = make_pipeline(tmp_path, models)
    assert_fails(capsys, pipeline, UnsafeCheckpointError, str(index_path), "not a valid index",
                 dest=tmp_path / "out")


@pytest.mark.parametrize("with_index", [True, False], ids=["index", "no-index"])
def test_shard_symlink_escaping_the_model(tiny_models, tmp_path, capsys, with_index):
    models = copy_models(tiny_models, tmp_path)
    outside = tmp_path / "outside"
    outside.mkdir()
    shard = models[1] / SHARD1
    shutil.move(shard, outside / SHARD1)
    shard.symlink_to(outside / SHARD1)
    if not with_index:
        (models[1] / INDEX_NAME).unlink()
    pipeline = make_pipeline(tmp_path, models)
    assert_fails(capsys, pipeline, UnsafeCheckpointError, str(shard), str(outside / SHARD1),
                 "outside the model folder", dest=tmp_path / "out")


# -- 7. the destination -----------------------------------------------------------------------

def _output(path: Path) -> dict:
    return {"path": str(path), "dtype": "bfloat16"}


def test_destination_inside_a_source(tiny_models, tmp_path, capsys):
    models = copy_models(tiny_models, tmp_path)
    before = snapshot(models[0])
    dest = models[0] / "sub"
    pipeline = make_pipeline(tmp_path, models, output=_output(dest))
    assert_fails(capsys, pipeline, DestinationError, "output.path", str(dest), "overlaps",
                 str(models[0]), dest=dest)
    assert snapshot(models[0]) == before


def test_destination_is_an_expert(tiny_models, tmp_path, capsys):
    models = copy_models(tiny_models, tmp_path)
    before = snapshot(models[2])
    pipeline = make_pipeline(tmp_path, models, output=_output(models[2]))
    assert_fails(capsys, pipeline, DestinationError, "output.path", str(models[2]), "overlaps")
    assert snapshot(models[2]) == before
    assert staging_leftovers(models[2]) == []


def _existing_destination(tmp_path: Path) -> Path:
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "keep.txt").write_text("an earlier merge\n")
    (dest / "stale.safetensors").write_bytes(safetensors_bytes({}))
    return dest


@pytest.mark.parametrize("verb", ["run", "validate"])
def test_existing_destination_without_overwrite(tiny_models, tmp_path, capsys, verb):
    models = copy_models(tiny_models, tmp_path)
    dest = _existing_destination(tmp_path)
    before = snapshot(dest)
    pipeline = make_pipeline(tmp_path, models)
    assert_fails(capsys, pipeline, DestinationError, str(dest), "already exists", "overwrite",
                 verb=verb)
    assert snapshot(dest) == before
    assert staging_leftovers(dest) == []


def test_existing_destination_with_overwrite_is_replaced(tiny_models, tmp_path, capsys):
    models = copy_models(tiny_models, tmp_path)
    dest = _existing_destination(tmp_path)
    pipeline = make_pipeline(tmp_path, models)
    code, out, err = cli(capsys, "run", pipeline, "--overwrite")
    assert code == 0, err
    assert str(dest) in out
    assert not (dest / "keep.txt").exists() and not (dest / "stale.safetensors").exists()
    assert staging_leftovers(dest) == []
    index = json.loads((dest / INDEX_NAME).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert set(sha256_tree(dest)) == set(shards)
    names = set()
    for s in shards:
        with safe_open(str(dest / s), framework="pt") as f:
            names |= set(f.keys())
    assert names == set(json.loads((models[0] / INDEX_NAME).read_text())["weight_map"])


# -- 8. non-finite values ---------------------------------------------------------------------

def _poison(ts):
    ts[TENSOR][5, 3] = float("nan")


@pytest.mark.parametrize("method", [{"name": "ties", "density": 0.3, "scope": "model"},
                                    {"name": "linear"}], ids=["ties-stats-pass", "linear-merge-pass"])
def test_nan_in_an_expert(tiny_models, tmp_path, capsys, method):
    models = copy_models(tiny_models, tmp_path)
    rewrite_shard(models[3], TENSOR, _poison)
    pipeline = make_pipeline(tmp_path, models, method=method)
    assert_fails(capsys, pipeline, NonFiniteError, str(models[3]), f"tensor {TENSOR}", "NaN",
                 dest=tmp_path / "out")


# -- validate reads headers only --------------------------------------------------------------

def test_validate_reads_no_tensor_bytes(tiny_models, tmp_path, capsys):
    models = copy_models(tiny_models, tmp_path)
    shard = models[1] / SHARD1
    raw = shard.read_bytes()
    start = data_start(raw)
    shard.write_bytes(raw[:start] + b"\xff" * (len(raw) - start))    # every bf16 value is NaN
    pipeline = make_pipeline(tmp_path, models)

    code, out, err = cli(capsys, "validate", pipeline)
    assert code == 0, err
    assert out.startswith("ok:")
    assert_nothing_published(tmp_path / "out")

    # the corruption is real: a run reads those bytes and refuses them
    assert_fails(capsys, pipeline, NonFiniteError, str(models[1]), dest=tmp_path / "out")
