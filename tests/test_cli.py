"""The CLI end to end: the quickstart as a newcomer runs it (including a transformers load),
every pipeline under pipelines/, the verbs' output, and the frozen flag set."""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from distmerge.cli import build_parser, main
from distmerge.config import load_pipeline
from distmerge.methods import build
from tests.conftest import make_pipeline

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.e2e
def test_quickstart_end_to_end_loads_in_transformers(tmp_path):
    env = {**os.environ, "HOME": str(tmp_path), "DISTMERGE_CACHE": str(tmp_path / ".cache" / "distmerge")}
    env.pop("RAY_ADDRESS", None)
    for argv in (["demo"], ["run", str(REPO / "pipelines" / "quickstart.yaml")]):
        proc = subprocess.run([sys.executable, "-m", "distmerge.cli", *argv], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "merged" / "quickstart"
    assert f"merged checkpoint: {out}" in proc.stdout
    assert "GB/s read" in proc.stdout and "peak worker memory" in proc.stdout
    assert "merge 1" in proc.stderr or "merge" in proc.stderr       # progress lines (not a TTY)

    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)
    assert next(model.parameters()).dtype == torch.bfloat16
    logits = model(torch.tensor([[1, 17, 42, 7]])).logits
    assert logits.shape == (1, 4, model.config.vocab_size)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("path", sorted((REPO / "pipelines").glob("*.yaml")), ids=lambda p: p.name)
def test_every_pipeline_file_is_valid(path):
    p = load_pipeline(path)
    build(p.method.name, p.method.params(), [(o.match, o.params()) for o in p.overrides])


def test_validate_plan_inspect(tmp_path, tiny_models, capsys):
    pipe = make_pipeline(tmp_path, tiny_models, resources={"slice_size": "4KB"})
    assert main(["validate", str(pipe)]) == 0
    assert "ok: ties over 3 experts" in capsys.readouterr().out
    assert main(["plan", str(pipe), "--format", "json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert len(plan["slices"]) > 5 and plan["shards"][0]["filename"] == "model.safetensors"
    assert main(["plan", str(pipe), "--workers", "3"]) == 0
    assert "slices" in capsys.readouterr().out
    assert main(["inspect", str(tiny_models[0])]) == 0
    out = capsys.readouterr().out
    line = next(l for l in out.splitlines() if l.startswith("model.embed_tokens.weight "))
    assert line.split()[1:4] == ["BF16", "[96,", "32]"]
    assert not (tmp_path / "out").exists()


def test_cli_overrides_reach_the_pipeline(tmp_path, tiny_models):
    pipe = make_pipeline(tmp_path, tiny_models)
    p = load_pipeline(pipe, workers=5, memory_per_worker="3GB", slice_size="1MB", overwrite=True)
    assert (p.resources.workers, p.resources.memory_per_worker, p.resources.slice_size) == (5, 3 * 10**9, 10**6)
    assert p.output.overwrite is True


FROZEN_FLAGS = {
    "validate": ["--deep", "--memory-per-worker", "--overwrite", "--sample-rows", "--slice-size",
                 "--workers"],
    "plan": ["--format", "--memory-per-worker", "--overwrite", "--slice-size", "--workers"],
    "run": ["--executor", "--memory-per-worker", "--metrics-port", "--no-progress", "--overwrite",
            "--resume", "--slice-size", "--workers"],
    "inspect": ["--format"],
    "demo": ["--experts", "--out"],
    "import-mergekit": ["--output", "--output-path"],
    "compress": ["--memory-per-worker", "--overwrite", "--slice-size", "--workers"],
    "extract": ["--dtype", "--out", "--overwrite", "--reference"],
    "submit": ["--address", "--memory-per-worker", "--no-follow", "--overwrite", "--pip", "--resume",
               "--ship-source", "--slice-size", "--workers", "--working-dir"],
}


def test_cli_flag_set_changes_only_on_purpose():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "verb")
    got = {}
    for verb, p in sub.choices.items():
        got[verb] = sorted(o for a in p._actions for o in a.option_strings if o.startswith("--") and o != "--help")
    assert set(got) == set(FROZEN_FLAGS) | {"bench"}
    for verb, flags in FROZEN_FLAGS.items():
        assert got[verb] == flags, verb


@pytest.mark.parametrize("module, forbidden", [
    ("distmerge.config", {"torch", "ray", "fsspec"}),
    ("distmerge.plan", {"torch", "ray", "fsspec"}),
    ("distmerge.methods", {"ray", "fsspec"}),
    ("distmerge.reduce", {"ray", "fsspec"}),
    ("distmerge.checkpoint.source", {"ray", "torch"}),
    ("distmerge.engine.worker", {"ray"}),
    ("distmerge.engine.driver", {"ray"}),
    ("distmerge.metrics", {"ray", "torch"}),
    ("distmerge.cli", {"ray", "torch"}),
])
def test_each_module_imports_alone_and_dependencies_go_one_way(module, forbidden):
    code = f"import sys, {module}; print(sorted(m for m in {sorted(forbidden)!r} if m in sys.modules))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


@pytest.mark.parametrize("argv", [["--help"], ["-q", "inspect", "MODEL"], ["submit", "--help"]],
                         ids=["help", "inspect", "submit-help"])
def test_light_verbs_do_not_import_torch(tiny_models, argv):
    """Only the verbs that merge or generate pay for ``import torch`` (about a second); the
    parser adds bench's flags, whose modules import it, only for ``bench``."""
    argv = [str(tiny_models[0]) if a == "MODEL" else a for a in argv]
    code = ("import sys\nfrom distmerge.cli import main\ntry:\n    main(%r)\nexcept SystemExit:\n    pass\n"
            "print('torch' in sys.modules, file=sys.stderr)" % argv)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.stderr.strip().splitlines()[-1] == "False", proc.stderr
    bench = subprocess.run([sys.executable, "-m", "distmerge.cli", "bench", "--help"],
                           capture_output=True, text=True, timeout=120)
    assert bench.returncode == 0 and "--compare" in bench.stdout and "--scale" in bench.stdout


def test_console_script_exits_without_the_last_collections(tiny_models):
    """The installed ``distmerge`` and ``python -m distmerge.cli`` both go through ``entry``,
    which freezes the collector once the verb has returned (its exit code kept); ``main``, which
    tests call in-process, does not."""
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["distmerge"] == "distmerge.cli:entry"
    code = ("import atexit, gc, sys\n"
            "atexit.register(lambda: print('frozen', gc.get_freeze_count() > 0, file=sys.stderr))\n"
            "sys.argv = ['distmerge', '-q', 'inspect', sys.argv[1]]\n"
            "from distmerge.cli import entry\nentry()\n")
    ok = subprocess.run([sys.executable, "-c", code, str(tiny_models[0])],
                        capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0 and ok.stderr.strip().splitlines()[-1] == "frozen True", ok.stderr
    bad = subprocess.run([sys.executable, "-m", "distmerge.cli", "inspect", str(tiny_models[0] / "nope")],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "distmerge: error:" in bad.stderr
    assert gc.get_freeze_count() == 0
