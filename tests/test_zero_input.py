"""DeepSpeed ZeRO checkpoints as input (``format: deepspeed_zero``).

The checkpoints are real: DeepSpeed itself trains a tiny model on the CPU (a gloo process group
of one rank) under ZeRO stage 1, 2 and 3 and saves them with ``engine.save_checkpoint``, in a
subprocess (this file run as a script). Beside each it saves the engine's live fp32 weights as
safetensors (the "twin"), gathered from the ZeRO-3 partitions. A merge with ZeRO experts (or a
ZeRO base) must then write the same bytes as the merge of the twins.

The tests that need DeepSpeed are skipped when it is not installed (``pip install
'distmerge[deepspeed]'``); the one that checks the error for a missing DeepSpeed always runs.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
from importlib.util import find_spec
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from conftest import sha256_tree
from distmerge.checkpoint import zero
from distmerge.cli import main
from distmerge.config import TRUST_PICKLE_MESSAGE, load_pipeline
from distmerge.engine.driver import plan_for, run_identity, validate
from distmerge.errors import ConfigError, SourceNotFoundError, UnsafeCheckpointError

HAS_DEEPSPEED = find_spec("deepspeed") is not None
needs_deepspeed = pytest.mark.skipif(
    not HAS_DEEPSPEED, reason="DeepSpeed is not installed (pip install 'distmerge[deepspeed]')")

STAGES = (1, 2, 3)
CONFIG = {"architectures": ["TinyForCausalLM"], "hidden_size": 16, "torch_dtype": "bfloat16"}


# -- the checkpoints: made by DeepSpeed in a subprocess ----------------------------------------

def _tiny_model():
    from torch import nn

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.self_attn = nn.Module()
            self.self_attn.q_proj = nn.Linear(16, 16, bias=False)
            self.mlp = nn.Module()
            self.mlp.up_proj = nn.Linear(16, 32)
            self.mlp.down_proj = nn.Linear(32, 16)
            self.input_layernorm = nn.Parameter(torch.ones(16))

        def forward(self, x):
            h = x * self.input_layernorm + self.self_attn.q_proj(x)
            return h + self.mlp.down_proj(torch.relu(self.mlp.up_proj(h)))

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.model = nn.Module()
            self.model.embed_tokens = nn.Embedding(40, 16)
            self.model.layers = nn.ModuleList([Block(), Block()])
            self.model.norm = nn.Module()
            self.model.norm.weight = nn.Parameter(torch.ones(16))
            self.lm_head = nn.Linear(16, 40, bias=False)

        def forward(self, ids):
            h = self.model.embed_tokens(ids)
            for layer in self.model.layers:
                h = layer(h)
            return self.lm_head(h * self.model.norm.weight)

    return Tiny()


def _make_checkpoints(out: Path) -> None:
    """Run as a script: the base (safetensors), and per ZeRO stage a checkpoint trained from it
    plus its twin (the live weights, as safetensors)."""
    import deepspeed

    torch.manual_seed(0)
    model = _tiny_model()
    base = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    (out / "base").mkdir(parents=True)
    save_file(base, str(out / "base" / "model.safetensors"), metadata={"format": "pt"})
    (out / "base" / "config.json").write_text(json.dumps({**CONFIG, "torch_dtype": "float32"}))
    deepspeed.init_distributed(dist_backend="gloo")
    for stage in STAGES:
        torch.manual_seed(stage)
        m = _tiny_model()
        m.load_state_dict(base)
        if stage > 1:                  # stage 1 checkpoints do not record frozen parameters
            m.model.norm.weight.requires_grad_(False)
        cfg = {"train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": stage},
               "zero_allow_untested_optimizer": True, "steps_per_print": 10**9}
        opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.5)
        engine, *_ = deepspeed.initialize(model=m, optimizer=opt, config=cfg)
        for _ in range(3):
            ids = torch.randint(0, 40, (4, 6))
            loss = torch.nn.functional.cross_entropy(engine(ids).flatten(0, 1), ids.flatten())
            engine.backward(loss)
            engine.step()
        ckpt = out / f"zero{stage}"
        ckpt.mkdir()
        (ckpt / "config.json").write_text(json.dumps(CONFIG))      # as a Trainer checkpoint has
        engine.save_checkpoint(str(ckpt))
        params = list(engine.module.parameters())
        with deepspeed.zero.GatheredParameters(params, enabled=stage == 3):
            twin = {k: v.detach().clone().float().contiguous() for k, v in engine.module.state_dict().items()}
        (out / f"twin{stage}").mkdir()
        save_file(twin, str(out / f"twin{stage}" / "model.safetensors"), metadata={"format": "pt"})
        (out / f"twin{stage}" / "config.json").write_text(json.dumps({**CONFIG, "torch_dtype": "float32"}))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def zero_models(tmp_path_factory) -> Path:
    """base/, zero{1,2,3}/ (ZeRO checkpoints) and twin{1,2,3}/ (their weights as safetensors).
    Shared: never modify; copy first."""
    if not HAS_DEEPSPEED:
        pytest.skip("DeepSpeed is not installed (pip install 'distmerge[deepspeed]')")
    out = tmp_path_factory.mktemp("zero")
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(_free_port()), "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, __file__, str(out)], env=env, capture_output=True,
                          text=True, timeout=540)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return out


# -- helpers ----------------------------------------------------------------------------------

def zero_entry(path: Path, **extra) -> dict:
    return {"path": str(path), "format": "deepspeed_zero", "trust_pickle": True, **extra}


def write_pipeline(folder: Path, base, experts: list, **changes) -> Path:
    data = {
        "name": "zero",
        "base": base,
        "experts": experts,
        "method": {"name": "ties", "density": 0.5, "scope": "model"},
        "output": {"path": str(folder / "out")},
        "resources": {"workers": 2, "memory_per_worker": "1GB", "slice_size": "4KB"},
    }
    data.update(changes)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "pipeline.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def run_cli(capsys, pipeline: Path, *extra: str) -> tuple[int, str]:
    """``distmerge run`` in-process; returns (exit code, stdout + stderr)."""
    code = main(["run", str(pipeline), "--executor", "local", "--no-progress", *extra])
    out, err = capsys.readouterr()
    return code, err + out


def staged_folders(cache: Path) -> list[str]:
    return sorted(p.name for p in cache.iterdir()) if cache.exists() else []


def without_deepspeed(monkeypatch) -> None:
    """Make ``import deepspeed`` fail in this process, as where it is not installed."""
    for name in [m for m in sys.modules if m == "deepspeed" or m.startswith("deepspeed.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "deepspeed", None)


# -- the configuration: refused before any file is opened -------------------------------------

def test_without_trust_pickle_the_pipeline_is_refused_before_anything_is_opened(tmp_path, capsys):
    missing = tmp_path / "no-such-checkpoint"                 # never looked at
    entry = {"path": str(missing), "format": "deepspeed_zero", "weight": 1.0}
    pipeline = write_pipeline(tmp_path, str(tmp_path / "base"), [entry, {"path": str(tmp_path / "e")}])
    code, err = run_cli(capsys, pipeline)
    assert code == ConfigError.exit_code, err
    assert err.startswith("distmerge: error: ") and "experts.0:" in err and "Traceback" not in err
    for fragment in ("trust_pickle: true", "pickled torch files", "execute arbitrary code",
                     "only for checkpoints you made yourself"):
        assert fragment in err, err
    assert TRUST_PICKLE_MESSAGE in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pipeline.yaml"]     # nothing written


@pytest.mark.parametrize("entry, fragment", [
    ({"path": "m", "trust_pickle": True}, "experts.0: Value error, trust_pickle applies only to format: deepspeed_zero"),
    ({"path": "m", "tag": "global_step1"}, "experts.0: Value error, tag applies only to format: deepspeed_zero"),
    ({**zero_entry(Path("m")), "tag": "../elsewhere"}, "experts.0.tag: Value error, must be the name of a tag folder"),
    ({**zero_entry(Path("m")), "path": "s3://bucket/ckpt"}, "reads local paths only"),
    ({**zero_entry(Path("m")), "format": "pickle"}, "experts.0.format: Input should be 'safetensors' or 'deepspeed_zero'"),
])
def test_bad_model_entries_name_the_key(tmp_path, entry, fragment):
    pipeline = write_pipeline(tmp_path, "base", [entry, {"path": "other"}])
    with pytest.raises(ConfigError) as err:
        load_pipeline(pipeline)
    assert fragment in str(err.value)


def test_the_base_may_be_a_mapping_but_takes_no_weight(tmp_path):
    p = load_pipeline(write_pipeline(tmp_path, zero_entry(tmp_path / "z"), [{"path": "a"}, {"path": "b"}]))
    assert p.base_path == str(tmp_path / "z") and p.base_ref.format == "deepspeed_zero"
    assert [m.path for m in p.models()] == [str(tmp_path / "z"), "a", "b"]
    plain = load_pipeline(write_pipeline(tmp_path, "~/m", [{"path": "a"}, {"path": "b"}]))
    assert plain.base == str(Path("~/m").expanduser()) and plain.base_ref.format == "safetensors"
    with pytest.raises(ConfigError, match="base.weight: unknown key"):
        load_pipeline(write_pipeline(tmp_path, {"path": "x", "weight": 2.0}, [{"path": "a"}, {"path": "b"}]))


# -- conversion --------------------------------------------------------------------------------

@needs_deepspeed
@pytest.mark.parametrize("stage", STAGES)
def test_each_zero_stage_converts_to_the_engines_own_fp32_weights(zero_models, tmp_path, stage):
    [folder] = zero.stage_checkpoints([(str(zero_models / f"zero{stage}"), None)], cache=str(tmp_path / "cache"))
    got = load_file(os.path.join(folder, "model.safetensors"))
    twin = load_file(str(zero_models / f"twin{stage}" / "model.safetensors"))
    base = load_file(str(zero_models / "base" / "model.safetensors"))
    assert set(got) == set(twin)                 # frozen model.norm.weight too (stages 2, 3)
    for name, t in got.items():
        assert t.dtype == torch.float32
        assert torch.equal(t, twin[name]), name
    assert not torch.equal(got["lm_head.weight"], base["lm_head.weight"])    # it was trained
    desc = json.loads(Path(folder, zero.STAGED_FILE).read_text())
    assert desc["tag"] == "global_step3" and desc["dtype"] == "float32"
    assert set(desc["files"]) >= {"config.json", f"global_step3/{'zero_pp_rank_0_' if stage == 3 else ''}mp_rank_00_model_states.pt"}
    # the side files come along, with the dtype the weights now have
    assert json.loads(Path(folder, "config.json").read_text()) == {**CONFIG, "torch_dtype": "float32"}


@needs_deepspeed
def test_a_large_checkpoint_is_staged_as_an_indexed_sharded_model(zero_models, tmp_path, monkeypatch):
    from distmerge.checkpoint.source import INDEX_NAME, read_model_headers

    monkeypatch.setattr(zero, "SHARD_BYTES", 4096)
    [folder] = zero.stage_checkpoints([(str(zero_models / "zero3"), "global_step3")], cache=str(tmp_path))
    shards = sorted(n for n in os.listdir(folder) if n.endswith(".safetensors"))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    headers = read_model_headers(folder)           # the index agrees with every shard's header
    assert Path(folder, INDEX_NAME).exists() and len(headers.shards) == len(shards)
    twin = load_file(str(zero_models / "twin3" / "model.safetensors"))
    assert set(headers.tensors) == set(twin)
    for name, (shard, _) in headers.tensors.items():
        assert torch.equal(load_file(shard)[name], twin[name])


# -- merging -------------------------------------------------------------------------------------

@needs_deepspeed
def test_a_merge_of_zero_experts_is_byte_identical_to_the_merge_of_their_weights(zero_models, tmp_path, capsys, caplog):
    base = str(zero_models / "base")
    zeros = [zero_entry(zero_models / "zero2", weight=0.7), zero_entry(zero_models / "zero3", weight=1.3)]
    twins = [{"path": str(zero_models / "twin2"), "weight": 0.7}, {"path": str(zero_models / "twin3"), "weight": 1.3}]
    reference = write_pipeline(tmp_path / "twins", base, twins)
    assert run_cli(capsys, reference)[0] == 0

    with caplog.at_level(logging.INFO):
        code, err = run_cli(capsys, write_pipeline(tmp_path / "zero", base, zeros))
    assert code == 0, err
    expected = sha256_tree(tmp_path / "twins" / "out")
    assert sha256_tree(tmp_path / "zero" / "out") == expected
    assert (tmp_path / "zero" / "out" / "config.json").read_text() == (tmp_path / "twins" / "out" / "config.json").read_text()
    cache = tmp_path / "zero" / zero.DEFAULT_CACHE_NAME                    # beside the output
    assert staged_folders(cache) == [f for f in staged_folders(cache) if f.startswith(("zero-zero2-", "zero-zero3-"))]
    assert len(staged_folders(cache)) == 2
    assert "converting DeepSpeed ZeRO checkpoint" in caplog.text and "fp32" in caplog.text
    assert re.search(r"stages: validate [0-9.]+s, convert [0-9.]+s, plan", err), err   # the summary

    # a second run reuses the conversions, without DeepSpeed
    caplog.clear()
    stamps = {p: p.stat().st_mtime_ns for p in cache.rglob("*.safetensors")}
    with pytest.MonkeyPatch.context() as mp:
        without_deepspeed(mp)
        with caplog.at_level(logging.INFO):
            code, err = run_cli(capsys, write_pipeline(tmp_path / "zero", base, zeros,
                                                       output={"path": str(tmp_path / "zero" / "again")}))
    assert code == 0, err
    assert sha256_tree(tmp_path / "zero" / "again") == expected
    assert {p: p.stat().st_mtime_ns for p in cache.rglob("*.safetensors")} == stamps
    assert "converting" not in caplog.text and "using its safetensors conversion" in caplog.text


@needs_deepspeed
def test_a_zero_base_and_an_explicit_cache(zero_models, tmp_path, capsys):
    """The base as a ZeRO checkpoint: task arithmetic, the output keeps the inputs' fp32, and the
    output's config is the checkpoint's, with the dtype the weights have (float32)."""
    experts = [{"path": str(zero_models / "twin2")}, {"path": str(zero_models / "twin3")}]
    method = {"name": "task_arithmetic"}
    output = {"dtype": None}
    ref = write_pipeline(tmp_path / "twins", str(zero_models / "twin1"), experts, method=method,
                         output={**output, "path": str(tmp_path / "twins" / "out")})
    assert run_cli(capsys, ref)[0] == 0
    cache = tmp_path / "my-cache"
    pipeline = write_pipeline(tmp_path / "zero", zero_entry(zero_models / "zero1", tag="global_step3"), experts,
                              method=method, input_cache=str(cache),
                              output={**output, "path": str(tmp_path / "zero" / "out")})
    # the stage-1 checkpoint has every tensor: model.norm.weight was trained there
    code, err = run_cli(capsys, pipeline)
    assert code == 0, err
    assert sha256_tree(tmp_path / "zero" / "out") == sha256_tree(tmp_path / "twins" / "out")
    assert json.loads((tmp_path / "zero" / "out" / "config.json").read_text()) == {**CONFIG, "torch_dtype": "float32"}
    assert all(v.dtype == torch.float32 for v in load_file(str(tmp_path / "zero" / "out" / "model.safetensors")).values())
    assert len(staged_folders(cache)) == 1 and not (tmp_path / "zero" / zero.DEFAULT_CACHE_NAME).exists()


@needs_deepspeed
@pytest.mark.ray
def test_ray_workers_read_the_staged_conversion(zero_models, tmp_path, ray_session):
    """Two Ray actors merge from the staged folders (the driver converted; the workers only
    read safetensors) and write the bytes of the in-process merge of the twins."""
    from distmerge.engine.driver import run_pipeline
    from distmerge.engine.executors import RayExecutor

    base = str(zero_models / "base")
    twins = write_pipeline(tmp_path / "twins", base, [{"path": str(zero_models / f"twin{s}")} for s in (2, 3)])
    zeros = write_pipeline(tmp_path / "zero", base, [zero_entry(zero_models / f"zero{s}") for s in (2, 3)],
                           resources={"workers": 2, "slice_size": "512B"})
    run_pipeline(load_pipeline(twins), executor="local", show_progress=False)
    summary = run_pipeline(load_pipeline(zeros), executor=RayExecutor(workers=2), show_progress=False)
    assert summary.slices > 20 and len(summary.worker_peak_rss) == 2, "both actors should have merged"
    assert summary.stage_seconds["convert"] > 0
    assert sha256_tree(tmp_path / "zero" / "out") == sha256_tree(tmp_path / "twins" / "out")


@needs_deepspeed
def test_a_rerun_has_the_same_identity_so_resume_accepts_it(zero_models, tmp_path):
    pipeline = load_pipeline(write_pipeline(tmp_path, str(zero_models / "base"),
                                            [zero_entry(zero_models / "zero2"), zero_entry(zero_models / "zero3")]))
    first = validate(pipeline)
    identity = run_identity(pipeline, first, plan_for(pipeline, first))
    again = validate(pipeline)                                  # reuses the staged folders
    assert [m.url for m in again.experts] == [m.url for m in first.experts]
    assert all(m.url.startswith(str(tmp_path / zero.DEFAULT_CACHE_NAME)) for m in first.experts)
    assert run_identity(pipeline, again, plan_for(pipeline, again)) == identity


@needs_deepspeed
def test_compress_and_extract_with_a_zero_base(zero_models, tmp_path):
    """``distmerge compress`` reads a ZeRO base from its staged folder, and records that folder
    as the base ``extract`` reads: both give the bytes of the same work on the twins."""
    from distmerge import compress as C

    experts = [{"path": str(zero_models / "twin2")}, {"path": str(zero_models / "twin3")}]
    method = {"name": "consensus", "tall_lambda": 0.4}
    out = {}
    for kind, base in (("twins", str(zero_models / "twin1")), ("zero", zero_entry(zero_models / "zero1"))):
        pipeline = load_pipeline(write_pipeline(tmp_path / kind, base, experts, method=method))
        C.compress(pipeline)
        C.extract(str(tmp_path / kind / "out"), 1, str(tmp_path / kind / "expert1"))
        out[kind] = (sha256_tree(tmp_path / kind / "out"), sha256_tree(tmp_path / kind / "expert1"))
    assert out["zero"] == out["twins"]
    manifest = json.loads((tmp_path / "zero" / "out" / C.MANIFEST).read_text())
    assert manifest["base"].startswith(str(tmp_path / "zero" / zero.DEFAULT_CACHE_NAME / "zero-zero1-"))


@needs_deepspeed
def test_a_damaged_conversion_is_done_again(zero_models, tmp_path, caplog):
    cache = str(tmp_path / "cache")
    ckpt = [(str(zero_models / "zero2"), None)]
    [folder] = zero.stage_checkpoints(ckpt, cache=cache)
    shard = Path(folder, "model.safetensors")
    shard.write_bytes(shard.read_bytes()[:100])
    converted = []
    with caplog.at_level(logging.WARNING):
        assert zero.stage_checkpoints(ckpt, cache=cache, on_convert=lambda: converted.append(1)) == [folder]
    assert converted == [1] and "incomplete or damaged" in caplog.text
    twin = load_file(str(zero_models / "twin2" / "model.safetensors"))
    got = load_file(str(shard))
    assert set(got) == set(twin) and all(torch.equal(got[k], twin[k]) for k in got)
    assert os.listdir(cache) == [os.path.basename(folder)]                # no temporary left


# -- bad checkpoints -----------------------------------------------------------------------------

def _copy(zero_models: Path, tmp_path: Path, name: str) -> Path:
    return Path(shutil.copytree(zero_models / name, tmp_path / "models" / name))


@needs_deepspeed
@pytest.mark.parametrize("damage, error, fragments", [
    ("missing", SourceNotFoundError, ["DeepSpeed ZeRO checkpoint not found", "(no such folder)"]),
    ("no-latest", SourceNotFoundError, ["has no 'latest' file", "set tag: to one of its tag folders (global_step3)"]),
    ("tag-folder", SourceNotFoundError, ["it looks like a tag folder itself", "tag: global_step3"]),
    ("bad-tag", SourceNotFoundError, ["tag folder 'global_step9' not found"]),
    ("no-optimizer-states", SourceNotFoundError, ["global_step3: no optimizer state files", "not a complete"]),
    ("corrupt", UnsafeCheckpointError, ["DeepSpeed could not read this ZeRO checkpoint", "corrupt or truncated"]),
    ("truncated", UnsafeCheckpointError, ["DeepSpeed could not read this ZeRO checkpoint"]),
])
def test_a_missing_or_damaged_checkpoint_is_refused_naming_it(zero_models, tmp_path, capsys, damage, error, fragments):
    ckpt = _copy(zero_models, tmp_path, "zero2")
    entry = zero_entry(ckpt)
    step = ckpt / "global_step3"
    if damage == "missing":
        shutil.rmtree(ckpt)
    elif damage == "no-latest":
        (ckpt / "latest").unlink()
    elif damage == "tag-folder":
        entry = zero_entry(step)
    elif damage == "bad-tag":
        entry = zero_entry(ckpt, tag="global_step9")
    elif damage == "no-optimizer-states":
        (step / "zero_pp_rank_0_mp_rank_00_optim_states.pt").unlink()
    elif damage == "corrupt":
        (step / "mp_rank_00_model_states.pt").write_bytes(b"this is not a torch file" * 10)
    elif damage == "truncated":
        f = step / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    pipeline = write_pipeline(tmp_path / "run", str(zero_models / "base"),
                              [entry, {"path": str(zero_models / "twin3")}])
    code, err = run_cli(capsys, pipeline)
    assert code == error.exit_code, err
    assert "Traceback" not in err and str(entry["path"]) in err
    for fragment in fragments:
        assert fragment in err, err
    assert not (tmp_path / "run" / "out").exists()
    assert staged_folders(tmp_path / "run" / zero.DEFAULT_CACHE_NAME) == []   # no half conversion


def test_without_deepspeed_the_error_names_the_extra(tmp_path, capsys, monkeypatch):
    """A checkpoint laid out as DeepSpeed writes it (the layout is checked first, no file is
    unpickled); converting it needs DeepSpeed, which this process cannot import."""
    ckpt = tmp_path / "ckpt"
    (ckpt / "global_step7").mkdir(parents=True)
    (ckpt / "latest").write_text("global_step7")
    for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"):
        (ckpt / "global_step7" / name).write_bytes(b"never opened")
    base = tmp_path / "base"
    base.mkdir()
    save_file({"w": torch.zeros(2, 2)}, str(base / "model.safetensors"))
    without_deepspeed(monkeypatch)
    pipeline = write_pipeline(tmp_path / "run", str(base), [zero_entry(ckpt), {"path": str(base)}])
    code, err = run_cli(capsys, pipeline)
    assert code == ConfigError.exit_code, err
    assert "format deepspeed_zero needs DeepSpeed" in err and str(ckpt) in err
    assert "pip install 'distmerge[deepspeed]'" in err
    assert not (tmp_path / "run" / "out").exists()
    assert staged_folders(tmp_path / "run" / zero.DEFAULT_CACHE_NAME) == []


if __name__ == "__main__":
    _make_checkpoints(Path(sys.argv[1]))
