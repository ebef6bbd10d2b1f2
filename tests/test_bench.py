"""``distmerge bench`` end to end on a tiny shape with the local executor."""

from __future__ import annotations

import json

import pytest

from distmerge import bench
from distmerge.cli import main

TINY_ARGS = ["--experts", "2", "--hidden", "32", "--layers", "1", "--intermediate", "64",
             "--vocab", "64", "--heads", "4", "--kv-heads", "4", "--runs", "2",
             "--executor", "local"]


@pytest.mark.e2e
def test_bench_tiny_local(tmp_path, capsys):
    out = tmp_path / "cache" / "tiny"
    report = tmp_path / "bench.json"
    assert main(["bench", *TINY_ARGS, "--out", str(out), "--json", str(report),
                 "--compare", "mergekit"]) == 0

    printed = capsys.readouterr().out
    assert "read bound:" in printed and "warm page cache" in printed
    assert "task_arithmetic" in printed and "ties" in printed
    if not bench.mergekit_available():
        assert "mergekit: not installed" in printed and "pip install mergekit" in printed

    data = json.loads(report.read_text())
    input_bytes = data["inputs"]["tensor_bytes"]
    assert input_bytes > 0
    assert data["read_bound"]["bytes"] == data["inputs"]["file_bytes"] >= input_bytes
    assert data["read_bound"]["median"] > 0 and len(data["read_bound"]["seconds"]) == 2

    rows = {r["method"]: r for r in data["methods"]}
    assert list(rows) == ["task_arithmetic", "ties"]
    assert rows["task_arithmetic"]["passes"] == 1
    assert rows["ties"]["passes"] == 4            # scope model: 3 statistics rounds + merge
    for r in rows.values():
        assert len(r["runs"]) == 2
        w = r["wall_seconds"]
        assert 0 < w["min"] <= w["median"] <= w["max"]
        assert r["input_gbps"] > 0 and r["peak_worker_rss"] > 0
        assert r["stage_seconds"]["merge"] > 0
        assert all(v > 0 for v in r["worker_seconds"].values())
        assert all(b == r["passes"] * input_bytes for b in r["bytes_read_per_run"])
        assert r["bytes_read"] == r["passes"] * input_bytes
    assert rows["ties"]["stage_seconds"]["stats"] > 0

    # outputs went to temporary folders beside the cache and were removed; inputs were kept
    assert sorted(p.name for p in out.parent.iterdir()) == ["tiny"]
    assert (out / "base").is_dir() and (out / "expert-2").is_dir()


def test_bench_rejects_unknown_method(tmp_path, capsys):
    code = main(["bench", *TINY_ARGS, "--out", str(tmp_path / "x"), "--methods", "nope"])
    assert code == 2
    assert "unknown method 'nope'" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_render_mentions_missing_mergekit():
    results = {
        "shape": {"experts": 2, "params_per_model": 1e6, "dtype": "bfloat16", "hidden": 8,
                  "layers": 1, "intermediate": 16, "vocab": 8, "heads": 2, "kv_heads": 2},
        "inputs": {"folder": "/x", "files": 3, "file_bytes": 30, "tensor_bytes": 24,
                   "prepare_seconds": 0.1},
        "executor": "ray", "workers": 2, "memory_per_worker": 4e9, "runs": 1,
        "read_bound": {"bytes": 30, "median": 0.5, "min": 0.5, "max": 0.5, "gbps": 6e-8},
        "ray": {"started_by_bench": True, "startup_seconds": 3.0},
        "methods": [], "compare": {"tool": "mergekit", "installed": False,
                                   "install": "pip install mergekit"},
    }
    text = bench.render(results)
    assert "ray: started once" in text
    assert "mergekit: not installed" in text and "pip install mergekit" in text
