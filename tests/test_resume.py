"""Resumable runs: a run that dies keeps its staging folder (manifest of finished slices with
their crc32, saved statistics); ``--resume`` re-verifies and skips what was finished and
publishes bytes identical to an uninterrupted run. The headline test kills the driver process
of a real ``distmerge run`` (its own embedded Ray) mid-merge with SIGKILL and resumes it.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from distmerge.checkpoint.writer import (
    MANIFEST_FILE,
    PLAN_FILE,
    STATS_FILE,
    StagedOutput,
    staging_folders,
)
from distmerge.checkpoint.state import decode_state, encode_state
from distmerge.cli import main
from distmerge.config import load_pipeline
from distmerge.demo import Shape, generate
from distmerge.engine.driver import keeps_staging, run_pipeline
from distmerge.engine.executors import LocalExecutor
from distmerge.errors import DestinationError, MergeFailedError, NonFiniteError
from tests.conftest import make_pipeline, sha256_tree

REPO = Path(__file__).resolve().parents[1]

# ~180K parameters, 39 tensors, written into 4 shards of at most 120 KB
SHAPE = Shape(hidden=64, layers=4, intermediate=128, vocab=256, heads=4, kv_heads=2,
              dtype="bfloat16", shard_size=100_000)
SLICE = "4KB"            # in-process tests: ~100 slices
RAY_SLICE = "256B"       # the kill test: ~2600 slices, a merge pass of a few seconds on Ray


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> list[Path]:
    return generate(tmp_path_factory.mktemp("resume-models") / "m", experts=3, shape=SHAPE)


def pipeline(root: Path, models: list[Path], slice_size: str = SLICE, **changes) -> Path:
    args = {"output": {"path": str(root / "out"), "dtype": "bfloat16", "shard_size": "120KB"},
            "resources": {"workers": 2, "slice_size": slice_size}}
    args.update(changes)
    return make_pipeline(root, models, **args)


_REFERENCE: dict[tuple, dict[str, str]] = {}


@pytest.fixture(scope="module")
def reference(models, tmp_path_factory):
    """sha256 of every shard of an uninterrupted in-process run of the same pipeline."""
    def digests(slice_size: str = SLICE, **changes) -> dict[str, str]:
        key = (slice_size, json.dumps(changes, sort_keys=True))
        if key not in _REFERENCE:
            root = tmp_path_factory.mktemp("reference")
            run_pipeline(load_pipeline(pipeline(root, models, slice_size, **changes)),
                         executor="local", show_progress=False)
            _REFERENCE[key] = sha256_tree(root / "out")
            assert len(_REFERENCE[key]) > 1
        return _REFERENCE[key]
    return digests


class Crash(RuntimeError):
    """Stands for a run dying for a reason a resume can get past (a lost cluster, a disk)."""


class CrashesAfter(LocalExecutor):
    """Runs in-process and raises :class:`Crash` after ``n`` reports of pass ``round`` (a
    statistics round, or None for the merge pass)."""

    def __init__(self, n: int, round: int | None = None):
        super().__init__()
        self.n, self.round, self.seen = n, round, 0

    def run(self, tasks, ctx, on_report, on_retry=None):
        def hook(task, report):
            on_report(task, report)
            if task.round == self.round:
                self.seen += 1
                if self.seen >= self.n:
                    raise Crash(f"crashed after {self.n} slices")
        return super().run(tasks, ctx, hook, on_retry)


def _staging(root: Path) -> Path:
    found = staging_folders(str(root / "out"))
    assert len(found) == 1, found
    return Path(found[0])


def _manifest(staging: Path) -> list[dict]:
    return [json.loads(line) for line in (staging / MANIFEST_FILE).read_text().splitlines() if line.strip()]


def interrupted(root: Path, models, *, n: int = 20, round: int | None = None, **changes) -> Path:
    """Run ``pipeline(root)`` until it crashes; returns its (kept) staging folder."""
    pipe = pipeline(root, models, **changes)
    with pytest.raises(Crash):
        run_pipeline(load_pipeline(pipe), executor=CrashesAfter(n, round), show_progress=False)
    assert not (root / "out").exists()
    return _staging(root)


def resume(root: Path, **kw):
    return run_pipeline(load_pipeline(root / "pipeline.yaml"), executor="local",
                        show_progress=False, resume=True, **kw)


def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.iterdir())}


def assert_published_like(root: Path, want: dict[str, str]) -> None:
    out = root / "out"
    assert sha256_tree(out) == want
    assert not {PLAN_FILE, MANIFEST_FILE, STATS_FILE} & {p.name for p in out.iterdir()}
    assert staging_folders(str(out)) == []


# -- in-process ---------------------------------------------------------------------------------

def test_crash_in_merge_keeps_staging_and_resume_skips_finished_slices(tmp_path, models, reference):
    staging = interrupted(tmp_path, models, n=30)
    plan = json.loads((staging / PLAN_FILE).read_text())
    assert [r["slice"] for r in _manifest(staging)] and len(_manifest(staging)) == 30
    assert json.loads((staging / STATS_FILE).read_text())["round"] == 2     # ties scope model: 2 rounds saved
    summary = resume(tmp_path)
    assert summary.resumed and summary.resumed_slices == 30 and summary.redone_slices == 0
    assert summary.stats_rounds_restored == 2
    assert summary.slices == plan["slices"]
    assert 0 < summary.bytes_written < sum(p.stat().st_size for p in (tmp_path / "out").glob("*.safetensors"))
    assert "resumed: 30 of" in "\n".join(summary.lines())
    assert_published_like(tmp_path, reference())


def test_crash_in_a_statistics_round_resumes_from_the_next_round(tmp_path, models, reference):
    staging = interrupted(tmp_path, models, n=5, round=1)
    assert json.loads((staging / STATS_FILE).read_text())["round"] == 1
    assert _manifest(staging) == []
    summary = resume(tmp_path)
    assert summary.stats_rounds_restored == 1 and summary.resumed_slices == 0
    assert_published_like(tmp_path, reference())


def test_crash_before_any_work_leaves_nothing(tmp_path, models):
    pipe = pipeline(tmp_path, models)
    with pytest.raises(Crash):
        run_pipeline(load_pipeline(pipe), executor=CrashesAfter(3, round=0), show_progress=False)
    assert staging_folders(str(tmp_path / "out")) == [] and not (tmp_path / "out").exists()


@pytest.mark.parametrize("change, what", [
    (lambda root, m: {"method": {"name": "ties", "density": 0.5, "scope": "model"}}, "method"),
    (lambda root, m: {"experts": [{"path": str(p), "weight": w} for p, w in zip(m[1:], [1, 2, 1])]},
     "experts or weights"),
    (lambda root, m: {"resources": {"workers": 2, "slice_size": "8KB"}}, "slice plan"),
    (lambda root, m: {"output": {"path": str(root / "out"), "dtype": "float16", "shard_size": "120KB"}},
     "output dtype"),
    ("touch", "input files of"),
], ids=["method", "weights", "slice-size", "dtype", "input-touched"])
def test_resume_after_the_pipeline_changed_is_refused(tmp_path, models, reference, change, what):
    models = [Path(shutil.copytree(m, tmp_path / "models" / m.name)) for m in models]
    staging = interrupted(tmp_path, models)
    before = snapshot(staging)
    if change == "touch":
        shard = sorted(models[2].glob("*.safetensors"))[0]
        os.utime(shard, ns=(shard.stat().st_atime_ns, shard.stat().st_mtime_ns + 10**9))
    else:
        pipeline(tmp_path, models, **change(tmp_path, models))
    with pytest.raises(DestinationError) as err:
        resume(tmp_path)
    msg = str(err.value)
    assert "cannot resume" in msg and "different pipeline" in msg and what in msg, msg
    assert str(staging) in msg and "delete" in msg
    assert snapshot(staging) == before and not (tmp_path / "out").exists()
    if change != "touch":                       # the pipeline restored: the resume goes on
        pipeline(tmp_path, models)
        assert resume(tmp_path).resumed_slices == 20
        assert_published_like(tmp_path, reference())


def test_corrupted_finished_slice_is_redone(tmp_path, models, reference):
    staging = interrupted(tmp_path, models, n=25)
    plan = json.loads((staging / PLAN_FILE).read_text())
    rec = _manifest(staging)[7]
    shard = staging / plan["shards"][rec["shard"]]
    with open(shard, "r+b") as f:                 # flip one byte in the middle of the slice
        at = (rec["start"] + rec["stop"]) // 2
        f.seek(at)
        b = f.read(1)
        f.seek(at)
        f.write(bytes([b[0] ^ 0x40]))
    summary = resume(tmp_path)
    assert summary.redone_slices == 1 and summary.resumed_slices == 24
    assert_published_like(tmp_path, reference())


def test_torn_manifest_line_is_ignored(tmp_path, models, reference):
    staging = interrupted(tmp_path, models, n=10)
    with open(staging / MANIFEST_FILE, "ab") as f:
        f.write(b'{"slice":11,"shard":0,"sta')          # the driver died mid-line
    summary = resume(tmp_path)
    assert summary.resumed_slices == 10
    assert_published_like(tmp_path, reference())


def test_run_without_resume_is_refused_and_touches_nothing(tmp_path, models, capsys):
    staging = interrupted(tmp_path, models)
    before = snapshot(staging)
    with pytest.raises(DestinationError, match="--resume"):
        run_pipeline(load_pipeline(tmp_path / "pipeline.yaml"), executor="local", show_progress=False)
    code = main(["run", str(tmp_path / "pipeline.yaml"), "--executor", "local", "--no-progress"])
    err = capsys.readouterr().err
    assert code == DestinationError.exit_code, err
    assert str(staging) in err and "--resume" in err and "delete it" in err
    assert snapshot(staging) == before and not (tmp_path / "out").exists()


def test_resume_with_nothing_to_resume_starts_a_new_run(tmp_path, models, reference):
    pipeline(tmp_path, models)
    summary = resume(tmp_path)
    assert not summary.resumed and summary.resumed_slices == 0
    assert_published_like(tmp_path, reference())


def test_unencodable_statistics_are_recomputed_on_resume(tmp_path, models, reference, monkeypatch):
    monkeypatch.setattr(StagedOutput, "save_stats", lambda self, r, ctx: False)
    staging = interrupted(tmp_path, models, n=15)
    assert not (staging / STATS_FILE).exists()
    monkeypatch.undo()
    summary = resume(tmp_path)
    assert summary.stats_rounds_restored == 0 and summary.resumed_slices == 15
    assert_published_like(tmp_path, reference())


def test_failure_policy():
    assert keeps_staging(Crash(), slices_recorded=1, stats_saved=0)
    assert keeps_staging(KeyboardInterrupt(), slices_recorded=0, stats_saved=2)
    assert keeps_staging(MergeFailedError("x"), slices_recorded=5, stats_saved=3)
    assert not keeps_staging(Crash(), slices_recorded=0, stats_saved=0)
    assert not keeps_staging(NonFiniteError("nan"), slices_recorded=5, stats_saved=3)


def test_state_codec_is_exact_and_code_free():
    ctx = {
        "g/a": {"bucket": [3, -1], "rank": [2**80, 0], "threshold": [0.1, -0.0, math.inf, 1e-310]},
        "g/b": {"coef": (np.float32(0.25).item(), 1 / 3), "nan": math.nan, "flag": True, "s": "x"},
        "arr": np.arange(6, dtype=np.int64).reshape(2, 3), "f32": np.float32(1.5), "i8": np.int8(-3),
        "obj": np.array([2**70, -5], dtype=object), 7: None,
    }
    back = decode_state(json.loads(json.dumps(encode_state(ctx))))
    assert set(back) == set(ctx)
    assert back["g/a"]["rank"][0] == 2**80 and type(back["g/b"]["coef"]) is tuple
    for x, y in zip(ctx["g/a"]["threshold"], back["g/a"]["threshold"]):
        assert x.hex() == y.hex()
    assert math.isnan(back["g/b"]["nan"]) and back["g/b"]["flag"] is True
    assert back["arr"].dtype == np.int64 and np.array_equal(back["arr"], ctx["arr"])
    assert type(back["f32"]) is np.float32 and back["f32"] == 1.5 and type(back["i8"]) is np.int8
    assert back["obj"].dtype == object and list(back["obj"]) == [2**70, -5]
    with pytest.raises(TypeError):
        encode_state({"x": object()})
    for hostile in ({"$nd": "|O", "shape": [1], "data": ""}, {"__reduce__": "os.system"}, 1.5):
        with pytest.raises(ValueError):
            decode_state(hostile)


# -- the driver killed on a real local Ray --------------------------------------------------------

def _processes_with(tag: bytes) -> list[int]:
    found = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/environ", "rb") as f:
                    if tag in f.read():
                        found.append(int(d))
            except OSError:
                pass
    return found


def _kill_all(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.mark.ray
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds leftover processes in /proc")
def test_killed_driver_resumes_to_identical_bytes(tmp_path, models, reference, capsys):
    """``distmerge run`` in a subprocess (its own embedded Ray, its own session) is SIGKILLed,
    with its whole process group, once the manifest holds some but not all slices; every
    process it started is gone; ``distmerge run --resume`` publishes the same bytes."""
    pipe = pipeline(tmp_path, models, RAY_SLICE)
    tag = uuid.uuid4().hex
    ray_tmp = tempfile.mkdtemp(prefix="dmr-", dir="/tmp")       # short: Ray's socket paths
    env = {**os.environ, "DISTMERGE_TEST_RUN": tag, "RAY_TMPDIR": ray_tmp}
    env.pop("RAY_ADDRESS", None)
    argv = [sys.executable, "-m", "distmerge.cli", "run", str(pipe), "--no-progress"]
    try:
        proc = subprocess.Popen(argv, env=env, cwd=tmp_path, start_new_session=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 240
        done = total = 0
        while proc.poll() is None and time.monotonic() < deadline:
            found = staging_folders(str(tmp_path / "out"))
            if found and (Path(found[0]) / PLAN_FILE).exists():
                total = json.loads((Path(found[0]) / PLAN_FILE).read_text())["slices"]
                done = len((Path(found[0]) / MANIFEST_FILE).read_bytes().splitlines())
                if done >= total // 5:
                    break
            time.sleep(0.02)
        assert proc.poll() is None, f"the run ended before it could be killed:\n{proc.stdout.read()}"
        os.killpg(proc.pid, signal.SIGKILL)      # the driver and every process of its group
        proc.wait(timeout=30)
        # Ray's worker processes put themselves in process groups of their own (same session):
        # they are ours too; kill them by pid, then nothing carrying the tag may be left.
        _kill_all([p for p in _processes_with(tag.encode()) if p != os.getpid()])
        for _ in range(100):
            if not _processes_with(tag.encode()):
                break
            time.sleep(0.1)
        assert _processes_with(tag.encode()) == [], "processes of the killed run are still running"
        assert proc.returncode == -signal.SIGKILL
        assert not (tmp_path / "out").exists()
        staging = _staging(tmp_path)
        finished = len(_manifest(staging))
        assert total // 5 <= finished < total, (finished, total)

        t0 = time.perf_counter()
        resumed = subprocess.run(argv + ["--resume"], env=env, cwd=tmp_path, capture_output=True,
                                 text=True, timeout=300)
        wall = time.perf_counter() - t0
        assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
        m = re.search(r"resumed: (\d+) of (\d+) slices verified and skipped, (\d+) redone, "
                      r"(\d+) statistics pass\(es\) restored, in ([0-9.]+) s", resumed.stdout)
        assert m, resumed.stdout
        assert int(m[1]) == finished and int(m[2]) == total and int(m[3]) == 0 and int(m[4]) == 2
        with capsys.disabled():
            print(f"\nresume overhead: {m[5]} s to re-verify {finished} of {total} finished slices "
                  f"and restore {m[4]} statistics passes; resumed run {wall:.1f} s wall")
        assert_published_like(tmp_path, reference(RAY_SLICE))
        assert _processes_with(tag.encode()) == []
    finally:
        _kill_all([p for p in _processes_with(tag.encode()) if p != os.getpid()])
        shutil.rmtree(ray_tmp, ignore_errors=True)
