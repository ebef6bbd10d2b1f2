"""``distmerge bench`` end to end on a tiny shape with the local executor."""

from __future__ import annotations

import json
import os
import resource
import sys
import time

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
    assert "cpu s" in printed
    assert "distmerge run task_arithmetic, whole command:" in printed   # --compare times it too
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
    assert rows["ties"]["passes"] == 3            # scope model: 2 statistics rounds + merge
    for r in rows.values():
        assert len(r["runs"]) == 2
        w = r["wall_seconds"]
        assert 0 < w["min"] <= w["median"] <= w["max"]
        assert r["input_gbps"] > 0 and r["peak_worker_rss"] > 0
        assert r["stage_seconds"]["merge"] > 0
        assert all(v > 0 for v in r["worker_seconds"].values())
        assert r["remerged_slices"] == 0              # the guessed sign was right here
        if sys.platform == "linux":                   # the whole machine's CPU during each run
            assert all(run["machine_cpu_seconds"] >= 0 for run in r["runs"])   # ticks of 10 ms
            assert r["machine_cpu_seconds"]["median"] >= 0
        assert all(b == r["passes"] * input_bytes for b in r["bytes_read_per_run"])
        assert r["bytes_read"] == r["passes"] * input_bytes
        whole = r["whole_command"]                    # distmerge run in a child, with its start-up
        assert len(whole["seconds"]) == 2 and whole["wall_seconds"]["median"] > 0, whole
    assert rows["ties"]["stage_seconds"]["stats"] > 0

    # outputs went to temporary folders beside the cache and were removed; inputs were kept
    assert sorted(p.name for p in out.parent.iterdir()) == ["tiny"]
    assert (out / "base").is_dir() and (out / "expert-2").is_dir()


def test_bench_rejects_unknown_method(tmp_path, capsys):
    code = main(["bench", *TINY_ARGS, "--out", str(tmp_path / "x"), "--methods", "nope"])
    assert code == 2
    assert "unknown method 'nope'" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def _results(**changes) -> dict:
    """A bench result for render(), with ``changes`` over a Ray run of no method."""
    return {
        "shape": {"experts": 2, "params_per_model": 1e6, "dtype": "bfloat16", "hidden": 8,
                  "layers": 1, "intermediate": 16, "vocab": 8, "heads": 2, "kv_heads": 2},
        "inputs": {"folder": "/x", "files": 3, "file_bytes": 30, "tensor_bytes": 24,
                   "prepare_seconds": 0.1},
        "executor": "ray", "workers": 2, "memory_per_worker": 4e9, "runs": 1,
        "read_bound": {"bytes": 30, "median": 0.5, "min": 0.5, "max": 0.5, "gbps": 6e-8},
        "ray": {"started_by_bench": True, "startup_seconds": 3.0}, "methods": [], "compare": None,
        **changes,
    }


def test_render_mentions_missing_mergekit():
    results = _results(compare={"tool": "mergekit", "installed": False, "install": "pip install mergekit"})
    text = bench.render(results)
    assert "ray: started once" in text
    assert "mergekit: not installed" in text and "pip install mergekit" in text


@pytest.mark.skipif(sys.platform != "linux", reason="/proc/stat")
def test_machine_cpu_seconds_counts_at_least_this_process():
    def own() -> float:
        ru = resource.getrusage(resource.RUSAGE_SELF)
        return ru.ru_utime + ru.ru_stime

    machine0, own0 = bench.machine_cpu_seconds(), own()
    x = 0
    while own() - own0 < 0.3:                        # busy: about 0.3 s of this process's CPU
        x += 1
    machine, mine = bench.machine_cpu_seconds() - machine0, own() - own0
    assert machine >= mine - 0.05                    # /proc/stat counts in ticks of 10 ms

    cores, asleep = os.cpu_count() or 1, 0.5          # idle time is not counted: nearly all of
    machine0 = bench.machine_cpu_seconds()            # the machine idles while this sleeps
    time.sleep(asleep)
    assert bench.machine_cpu_seconds() - machine0 < 0.75 * asleep * cores


def test_render_compares_machine_cpu_with_mergekit():
    spread = {"median": 2.0, "min": 1.9, "max": 2.2}
    row = {"method": "task_arithmetic", "passes": 1, "wall_seconds": spread, "bytes_read": 3e9,
           "input_gbps": 1.5, "peak_worker_rss": 5e8, "memory_per_worker": 4e9,
           "total_peak_rss": 1.3e9, "machine_cpu_seconds": {"median": 4.0, "min": 3.9, "max": 4.1},
           "stage_seconds": {"plan": 1.0, "stats": 0.0, "merge": 1.0},
           "worker_seconds": {"read": 0.9, "compute": 1.8, "write": 0.6}}
    mk = {"wall_seconds": {"median": 10.0, "min": 9.0, "max": 11.0}, "peak_rss": 4.2e9,
          "machine_cpu_seconds": {"median": 12.0, "min": 11.0, "max": 13.0}}
    results = _results(runs=3, ray=None, methods=[row], compare={
        "tool": "mergekit", "installed": True, "methods": {"task_arithmetic": mk}})
    text = bench.render(results)
    table_row = next(line for line in text.splitlines() if line.startswith("task_arithmetic"))
    assert " 4.00 " in table_row                     # the cpu s column
    assert "= 5.00x distmerge's in-process wall" in text
    assert "machine CPU 12.00 s (measured as for distmerge) = 3.00x the in-process run's 4.00 s" in text
    assert "whole command" not in text

    row["whole_command"] = {"wall_seconds": {"median": 4.0, "min": 3.8, "max": 4.4},
                            "machine_cpu_seconds": {"median": 6.0, "min": 5.9, "max": 6.3}}
    text = bench.render(results)
    assert "distmerge run task_arithmetic, whole command: 4.00 s [3.80..4.40], machine CPU 6.00 s" in text
    assert "= 2.50x distmerge's whole command (both with their start-up), 5.00x distmerge's in-process wall" in text
    assert "= 2.00x the whole command's, 3.00x the in-process run's 4.00 s" in text


# -- the scale simulation ------------------------------------------------------------------------
SCALE_SHAPE = ["--hidden", "64", "--layers", "2", "--intermediate", "160", "--vocab", "256",
               "--heads", "4", "--kv-heads", "2", "--shard-size", "40000"]
# 600 MB of worker overhead plus room for ~2000 elements of 4 models: tensors get split
SCALE_MEMORY = str(600 * 10**6 + 2000 * (2 * 4 * 2 + 4 * 4 + 2 * 3 * 4 + 16))


def _covered_rows(plan) -> dict[str, list[tuple[int, int]]]:
    rows: dict[str, list[tuple[int, int]]] = {}
    for s in plan.slices:
        for p in s.pieces:
            rows.setdefault(p.tensor, []).append((p.row_start, p.row_stop))
    return rows


def test_scale_simulation_small(tmp_path, capsys):
    report = tmp_path / "scale.json"
    assert main(["bench", "--scale", "--experts", "3", *SCALE_SHAPE, "--runs", "1",
                 "--memory-per-worker", SCALE_MEMORY, "--scale-workers", "2,8",
                 "--worker-gbps", "0.5", "--json", str(report)]) == 0
    printed = capsys.readouterr().out
    assert "synthetic headers" in printed and "model of wall time (NOT measured)" in printed
    assert "make_plan" in printed and "pickle.dumps(Job)" in printed
    assert not list(tmp_path.glob("**/*.safetensors"))          # nothing written

    data = json.loads(report.read_text())
    s, c, b = data["shape"], data["counts"], data["bytes"]
    shape = bench.Shape(hidden=64, layers=2, intermediate=160, vocab=256, heads=4, kv_heads=2,
                        shard_size=40000)
    params = shape.params()
    assert s["params_per_model"] == params and s["experts"] == 3
    # bytes = params x 2 (bf16) x models; one output model written
    assert b["per_model"] == params * 2
    assert b["read_per_pass"] == params * 2 * 4
    assert b["written_tensors"] == params * 2 and b["written_files"] > b["written_tensors"]
    assert c["models"] == 4 and c["tensors"] == len(shape.tensor_shapes())
    assert c["input_shards_per_model"] > 1 and c["output_shards"] > 1
    assert c["slice_elements"] < 16384 and c["slices"] > c["tensors"] // 4  # the embedding is split
    assert c["slice_elements_uncapped"] == c["slice_elements"]             # budget below the cap
    assert c["ranged_requests_per_pass"] >= c["slices"] * 4
    assert c["job_pickle_bytes"] > 0 and c["task_pickle_bytes_per_pass"] > 0

    m = data["methods"]
    assert m["task_arithmetic"]["passes"] == 1 and m["ties"]["passes"] == 3
    assert m["task_arithmetic"]["ray_tasks"] == c["slices"]
    assert m["ties"]["ray_tasks"] == 2 * c["stats_slices"] + c["slices"]
    assert m["ties"]["bytes_read"] == 3 * b["read_per_pass"]

    rounds = data["ties_stats_traffic"]["rounds"]
    # the second round also drains the guessed sign sum (the sign round's 8 bytes)
    assert [r["drain_bytes_per_worker"] for r in rounds] == [3 * 65536 * 8, 3 * 65536 * 8 + 8]
    for row, n in zip(data["model"], [2, 8]):
        assert row["workers"] == n
        assert row["seconds_per_pass"] == pytest.approx(b["read_per_pass"] / (n * 0.5e9))
        ta = row["methods"]["task_arithmetic"]["wall_seconds"]
        ti = row["methods"]["ties"]["wall_seconds"]
        assert ta == pytest.approx(row["seconds_per_pass"] + data["planning_seconds"])
        assert ti == pytest.approx(3 * row["seconds_per_pass"] + data["planning_seconds"])
        assert row["methods"]["ties"]["driver_drain_bytes"] == n * (2 * 3 * 65536 * 8 + 8)
    for step in ("headers", "check_compatible", "plan", "job", "job_pickle"):
        assert data["steps"][step]["seconds"] >= 0 and data["steps"][step]["peak_bytes"] > 0


def test_scale_plan_covers_every_tensor():
    from distmerge import scale
    from distmerge.config import parse_size

    shape = bench.Shape(hidden=64, layers=2, intermediate=160, vocab=256, heads=4, kv_heads=2,
                        shard_size=40000)
    state, _ = scale.measure_steps(shape, 3, parse_size(SCALE_MEMORY), ("ties", {"density": 0.2}), 1)
    base = state["headers"][0]
    plan = state["plan"]
    assert set(plan.tensors) == set(base.tensors)
    for name, spans in _covered_rows(plan).items():
        spans.sort()
        assert spans[0][0] == 0 and spans[-1][1] == plan.tensors[name].rows
        assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))       # no gap, no overlap
    assert set(_covered_rows(plan)) == set(plan.tensors)
    # every slice fits the slice budget (a single row may exceed it; none here)
    assert all(sum((p.row_stop - p.row_start) * plan.tensors[p.tensor].row_elements
                   for p in s.pieces) <= plan.slice_elements for s in plan.slices)
    # the synthetic headers lie like a safetensors file: in-bounds, contiguous per shard
    for shard in base.shards:
        infos = sorted((i for u, i in base.tensors.values() if u == shard), key=lambda i: i.start)
        assert infos[0].start > 8
        assert all(a.stop == b.start for a, b in zip(infos, infos[1:]))
    # the Job carries one source table per model, as the driver builds it
    assert len(state["job"].sources) == 4 and state["job"].sources[1] == state["headers"][1].tensors
