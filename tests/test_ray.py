"""The Ray path on a real local Ray: byte-identical to the in-process run whatever the number
of actors and the slice size; a dead actor's slices are retried elsewhere; errors raised in
actors reach the driver as the same class."""

from __future__ import annotations

import pytest
from safetensors.torch import load_file, save_file

from distmerge.config import load_pipeline
from distmerge.engine.driver import run_pipeline
from distmerge.engine.executors import RayExecutor
from distmerge.errors import NonFiniteError
from tests.conftest import make_pipeline, sha256_tree

pytestmark = pytest.mark.ray


def _ray_executor(pipe, cls=RayExecutor):
    r = load_pipeline(pipe).resources
    return cls(workers=r.workers)


@pytest.mark.parametrize("method", [
    {"name": "ties", "density": 0.3, "scope": "model"},
    {"name": "ties", "density": 0.2, "scope": "tensor"},
    {"name": "task_arithmetic", "scale": 0.7},
], ids=["ties-model", "ties-tensor", "task_arithmetic"])
def test_ray_two_actors_tiny_slices_equal_in_process_whole_tensors(ray_session, tmp_path, tiny_models, method):
    whole = make_pipeline(tmp_path / "whole", tiny_models, method=method,
                          resources={"workers": 1, "slice_size": "1GB"})
    sliced = make_pipeline(tmp_path / "sliced", tiny_models, method=method,
                           resources={"workers": 2, "slice_size": "512B"})
    run_pipeline(load_pipeline(whole), executor="local", show_progress=False)
    summary = run_pipeline(load_pipeline(sliced), executor=_ray_executor(sliced), show_progress=False)
    assert summary.slices > 20
    assert len(summary.worker_peak_rss) == 2, "both actors should have merged slices"
    assert sha256_tree(tmp_path / "whole" / "out") == sha256_tree(tmp_path / "sliced" / "out")


class KillsAnActor(RayExecutor):
    """Kills actor 0 after the first report of a given pass (a statistics round or the merge
    pass, None), with work still queued on it."""

    kill_in_round: int | None = None
    killed = False

    def run(self, tasks, ctx, on_report, on_retry=None):
        import ray

        def hook(task, report):
            if task.round == self.kill_in_round and not self.killed:
                self.killed = True
                ray.kill(self.actors[0], no_restart=True)
            on_report(task, report)

        return super().run(tasks, ctx, hook, on_retry)


@pytest.mark.parametrize("kill_in_round", [0, 1, None], ids=["stats-round-0", "stats-round-1", "merge"])
def test_dead_actor_slices_are_retried_and_bytes_are_unchanged(ray_session, tmp_path, tiny_models, kill_in_round):
    """A worker dying mid-pass loses its in-flight slices and, in a statistics pass, the
    counts it had summed but not yet handed over: both are redone, exactly once."""
    ref = make_pipeline(tmp_path / "ref", tiny_models, resources={"workers": 1, "slice_size": "1KB"})
    run_pipeline(load_pipeline(ref), executor="local", show_progress=False)
    pipe = make_pipeline(tmp_path / "kill", tiny_models, resources={"workers": 2, "slice_size": "1KB"})
    executor = _ray_executor(pipe, KillsAnActor)
    executor.kill_in_round = kill_in_round
    summary = run_pipeline(load_pipeline(pipe), executor=executor, show_progress=False)
    assert executor.killed
    assert summary.retries >= 1
    assert sha256_tree(tmp_path / "ref" / "out") == sha256_tree(tmp_path / "kill" / "out")


def test_error_in_an_actor_reaches_the_driver_as_its_class(ray_session, tmp_path, tiny_models):
    import shutil

    bad = tmp_path / "expert-nan"
    shutil.copytree(tiny_models[2], bad)
    shard = sorted(bad.glob("*.safetensors"))[0]
    tensors = load_file(str(shard))
    name = sorted(tensors)[0]
    tensors[name][0, 0] = float("nan")
    save_file(tensors, str(shard), metadata={"format": "pt"})
    models = [tiny_models[0], tiny_models[1], bad]
    pipe = make_pipeline(tmp_path, models, resources={"workers": 2, "slice_size": "1KB"})
    with pytest.raises(NonFiniteError, match=name):
        run_pipeline(load_pipeline(pipe), executor=_ray_executor(pipe), show_progress=False)
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if "staging" in p.name]


def test_workers_the_cluster_cannot_place_are_reported_while_the_run_waits(ray_session, monkeypatch, caplog):
    """An actor asking for more than the cluster has (here a GPU on a CPU-only Ray) is queued
    by Ray without a word: the run says what it waits for, and for what the cluster has,
    until it is stopped."""
    import threading

    from distmerge.engine import executors

    monkeypatch.setattr(executors, "STARTUP_WARN_SECONDS", 0.5)
    ex = RayExecutor(workers=1, gpus_per_worker=1)
    ex.launch()
    failed: list[BaseException] = []

    def start():
        try:
            ex.start(None)                # never placed: the job is not looked at
        except BaseException as err:      # noqa: BLE001 - what stopping the run raises
            failed.append(err)

    with caplog.at_level("WARNING", logger="distmerge.engine.executors"):
        waiting = threading.Thread(target=start)
        waiting.start()
        for _ in range(100):
            if "not started" in caplog.text:
                break
            waiting.join(0.1)
        ex.shutdown()                     # what stopping the run does: kills the actors
        waiting.join(30)
    assert not waiting.is_alive() and failed, "stopping should end the wait with an error"
    assert "1 of 1 workers not started after" in caplog.text
    assert "each asks for 1 CPU, 1 GPU; free on the cluster: " in caplog.text and " CPU" in caplog.text


def test_the_actors_start_before_the_driver_plans(ray_session, tmp_path, tiny_models, monkeypatch):
    """The workers' start (process, imports) overlaps planning: by the time the driver plans,
    every actor has been created, and each gets the job afterwards."""
    from distmerge.engine import driver

    pipe = make_pipeline(tmp_path, tiny_models, method={"name": "task_arithmetic"})
    ex = _ray_executor(pipe)
    seen: list[int] = []
    plan_for = driver.plan_for
    monkeypatch.setattr(driver, "plan_for", lambda *a, **k: (seen.append(len(ex.actors)), plan_for(*a, **k))[1])
    summary = run_pipeline(load_pipeline(pipe), executor=ex, show_progress=False)
    assert seen == [2] and summary.slices > 0
