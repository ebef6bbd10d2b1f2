"""Inputs kept resident between passes: later passes of a multi-pass method read a worker's
slices from memory (not storage) within the worker's memory, the same slice goes to the same
actor in every pass, and the output bytes do not change. Models behind URLs are kept; these
tests keep local ones too (``keep_local``), as a run does for remote ones."""

from __future__ import annotations

import pytest

from distmerge.config import load_pipeline
from distmerge.engine import driver
from distmerge.engine.driver import Run, run_pipeline
from distmerge.engine.executors import RayExecutor
from distmerge.plan import WORKER_OVERHEAD_BYTES, resident_bytes_for
from tests.conftest import make_pipeline, sha256_tree

TIES = {"name": "ties", "density": 0.3, "scope": "model"}
WORTH_KEEPING = driver.worth_keeping          # the run's own rule, before a test replaces it


def _run(root, models, executor, **changes):
    pipe = load_pipeline(make_pipeline(root, models, **changes))
    return run_pipeline(pipe, executor=executor, show_progress=False), sha256_tree(root / "out")


@pytest.fixture(autouse=True)
def keep_local(monkeypatch):
    monkeypatch.setattr(driver, "worth_keeping", lambda url: True)


@pytest.fixture
def no_resident(monkeypatch):
    def off():
        monkeypatch.setattr(Run, "_resident_bytes", lambda self: 0)
    return off


def test_later_passes_read_nothing_in_process_and_bytes_are_unchanged(tmp_path, tiny_models, no_resident):
    one_pass, _ = _run(tmp_path / "ta", tiny_models, "local", method={"name": "task_arithmetic"})
    kept, kept_sha = _run(tmp_path / "kept", tiny_models, "local", method=TIES,
                          resources={"workers": 1, "memory_per_worker": "2GB", "slice_size": "4KB"})
    no_resident()
    read, read_sha = _run(tmp_path / "read", tiny_models, "local", method=TIES,
                          resources={"workers": 1, "memory_per_worker": "2GB", "slice_size": "4KB"})
    assert kept.passes == read.passes == 3
    assert kept.bytes_read == one_pass.bytes_read                # statistics 2 and merge: memory
    assert read.bytes_read == 3 * one_pass.bytes_read
    assert kept_sha == read_sha


@pytest.mark.ray
def test_ray_actors_find_their_slices_again(ray_session, tmp_path, tiny_models, no_resident):
    resources = {"workers": 2, "memory_per_worker": "2GB", "slice_size": "512B"}
    kept, kept_sha = _run(tmp_path / "kept", tiny_models, RayExecutor(workers=2), method=TIES,
                          resources=resources)
    no_resident()
    read, read_sha = _run(tmp_path / "read", tiny_models, RayExecutor(workers=2), method=TIES,
                          resources=resources)
    one_pass = read.bytes_read // 3
    assert kept_sha == read_sha
    # every slice is read once from storage, plus the few a busy home actor let another take
    assert one_pass <= kept.bytes_read < 1.5 * one_pass, (kept.bytes_read, one_pass)


def test_the_kept_bytes_fit_beside_the_slices_being_merged():
    assert resident_bytes_for(0, n_models=9, in_itemsize=2, slice_elements=2**21) == 0
    small = resident_bytes_for(WORKER_OVERHEAD_BYTES + 10**6, n_models=9, in_itemsize=2,
                               slice_elements=2**21)
    assert small == 0                                            # no room: read every pass
    big = resident_bytes_for(4 * 10**9, n_models=9, in_itemsize=2, slice_elements=2**21)
    per_element = 2 * 9 * 2 + 9 * 4 + 2 * 8 * 4 + 16
    assert big == 4 * 10**9 - WORKER_OVERHEAD_BYTES - 2**21 * per_element


def test_a_budget_smaller_than_the_inputs_keeps_what_fits(tmp_path, tiny_models, monkeypatch):
    resources = {"workers": 1, "memory_per_worker": "2GB", "slice_size": "4KB"}
    full, full_sha = _run(tmp_path / "full", tiny_models, "local", method=TIES, resources=resources)
    one_pass = full.bytes_read
    monkeypatch.setattr(Run, "_resident_bytes", lambda self: one_pass // 3)
    part, part_sha = _run(tmp_path / "part", tiny_models, "local", method=TIES, resources=resources)
    assert part_sha == full_sha
    # a third kept: the two later passes read the other two thirds again (within a slice's rows)
    assert one_pass + 2 * (one_pass - one_pass // 3) <= part.bytes_read < 3 * one_pass


def test_local_files_are_left_to_the_page_cache(tmp_path):
    assert WORTH_KEEPING("s3://bucket/expert") and WORTH_KEEPING("hf://org/expert")
    assert not WORTH_KEEPING(str(tmp_path)) and not WORTH_KEEPING(f"file://{tmp_path}")


def test_bytes_read_by_source_count_storage_reads_only(tmp_path, tiny_models, monkeypatch):
    """The per-source read figures (the ``distmerge_read_bytes_total`` metric) come from what
    the workers read from storage: with the inputs kept between passes, the three passes of
    TIES count each source's bytes once, and every slice's split adds up to its bytes read."""
    from distmerge.metrics import RunEvents

    seen = []
    real = RunEvents.slice_done

    def spy(self, report, read_by_source=None):
        seen.append((report.bytes_read, list(read_by_source or [])))
        return real(self, report, read_by_source)

    monkeypatch.setattr(RunEvents, "slice_done", spy)
    one_pass, _ = _run(tmp_path / "ta", tiny_models, "local", method={"name": "task_arithmetic"})
    one = [0] * len(seen[0][1])
    for _, split in seen:
        one = [a + b for a, b in zip(one, split)]
    seen.clear()
    kept, _ = _run(tmp_path / "kept", tiny_models, "local", method=TIES,
                   resources={"workers": 1, "memory_per_worker": "2GB", "slice_size": "4KB"})
    assert all(sum(split) == n for n, split in seen)
    total = [0] * len(one)
    for _, split in seen:
        total = [a + b for a, b in zip(total, split)]
    assert kept.passes == 3
    assert total == one and sum(one) == one_pass.bytes_read == kept.bytes_read
    assert len(set(one)) == 1 and one[0] > 0                 # same shapes and dtypes
