"""Two ways to run slice tasks behind one interface: in this process, or on Ray actors.

``executor.run(tasks, ctx, on_report, on_retry)`` runs every task (any order), calls
``on_report`` on the driver for each finished one and ``on_retry`` for each failed attempt that
is tried again, raises the first error the retry policy gives up on, and returns the integer
statistics summed over all tasks (each worker sums its own; see ``SliceWorker.drain``).
"""

from __future__ import annotations

import functools
import logging
import os
from collections import deque
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Any, Callable, Protocol

import numpy as np
import torch

from distmerge.engine.retry import RetryPolicy
from distmerge.engine.worker import Job, Report, SliceWorker, Task

log = logging.getLogger(__name__)

# How far into the queue an actor looks for a slice of its own (see RayExecutor.run).
HOME_WINDOW = 64
# How often a run whose workers wait for room on the cluster says so (RayExecutor.start).
STARTUP_WARN_SECONDS = 30.0

OnReport = Callable[[Task, Report], None]
OnRetry = Callable[[Task, BaseException], None]
Counts = dict[str, np.ndarray]


@functools.cache
def _actor_class() -> Any:
    """The Ray actor class of :class:`SliceActor`, made once per process: Ray exports a class
    (and disassembles it for its identity, ~50 ms) each time ``ray.remote`` wraps it anew."""
    import ray

    from distmerge.engine.actor import SliceActor

    return ray.remote(SliceActor)


def _resources(res: dict[str, float]) -> str:
    """Ray resources as a reader wants them: CPU, GPU, then memory in GB."""
    parts = [f"{res[k]:g} {k}" for k in ("CPU", "GPU") if res.get(k)]
    if res.get("memory"):
        parts.append(f"{res['memory'] / 1e9:.1f} GB memory")
    return ", ".join(parts) or "nothing"


def add_counts(into: Counts, part: Counts) -> None:
    for key, arr in part.items():
        into[key] = into[key] + arr if key in into else arr    # integers: exact in any order


class Executor(Protocol):
    workers: int

    def launch(self) -> None: ...
    def start(self, job: Job) -> None: ...
    def run(self, tasks: list[Task], ctx: dict[str, Any], on_report: OnReport,
            on_retry: OnRetry | None = None) -> Counts: ...
    def shutdown(self) -> None: ...


class LocalExecutor:
    """Runs slices in this process (tests, debugging, one machine with or without a GPU):
    ``in_flight`` slices at a time on threads of one :class:`SliceWorker`, like an actor's
    ``max_concurrency``, so one slice's reads and writes overlap another's compute. Reports
    reach ``on_report`` on the calling thread, one at a time, in the order slices finish."""

    workers = 1

    def __init__(self, *, device: str | None = None, in_flight: int = 2):
        self.device = device
        self.in_flight = max(1, in_flight)
        self.worker: SliceWorker | None = None
        self.pool: ThreadPoolExecutor | None = None
        self._torch_threads: int | None = None     # torch's own setting, restored at shutdown

    def launch(self) -> None:
        """Nothing to start ahead: the worker is this process."""

    def start(self, job: Job) -> None:
        self.worker = SliceWorker(job, device=self.device, worker_id="local")
        self.pool = ThreadPoolExecutor(max_workers=self.in_flight, thread_name_prefix="slice")
        if self.worker.device.type == "cpu":
            # The slices in flight share the cores, as a Ray actor's do (Ray gives it one thread
            # per CPU it reserves); left at all cores, every op of every slice would spread over
            # all of them at once (measured on 2 cores, task_arithmetic of the bench shape:
            # 1.07 s and 1.44 CPU-s against 1.62 s and 2.48 CPU-s). The bytes do not change
            # (sha256 of all nine methods on that shape; tests/test_engine.py).
            self._torch_threads = torch.get_num_threads()
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // self.in_flight))

    def run(self, tasks: list[Task], ctx: dict[str, Any], on_report: OnReport,
            on_retry: OnRetry | None = None) -> Counts:
        """In-process errors are not retried: the same process would fail the same way. On an
        error (of a slice, or raised by ``on_report``) no new slice starts and the ones in
        flight are waited for before it propagates."""
        assert self.worker is not None and self.pool is not None, "start() first"
        pending = deque(tasks)
        running: dict[Future, Task] = {}
        try:
            while pending or running:
                while pending and len(running) < self.in_flight:
                    task = pending.popleft()
                    running[self.pool.submit(self.worker.process, task, ctx)] = task
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for fut in sorted(done, key=lambda f: running[f].slice.index):
                    on_report(running.pop(fut), fut.result())
        finally:
            for fut in running:
                fut.cancel()
            wait(running)
        return self.worker.drain()

    def shutdown(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()
            self.pool = None
        if self.worker is not None:
            self.worker.close()
            self.worker = None
        if self._torch_threads is not None:
            torch.set_num_threads(self._torch_threads)
            self._torch_threads = None


class RayExecutor:
    """Slices on ``workers`` Ray actors, each with ``gpus_per_worker`` GPUs and a memory
    reservation; at most ``in_flight`` tasks queued per actor; a failed task goes to another
    actor (a dead actor is replaced) as the retry policy decides."""

    def __init__(self, *, workers: int, gpus_per_worker: float = 0, memory_per_worker: int = 0,
                 in_flight: int = 2, policy: RetryPolicy = RetryPolicy()):
        self.workers = workers
        self.gpus = gpus_per_worker
        self.memory = memory_per_worker
        self.in_flight = in_flight
        self.policy = policy
        self.actors: list[Any] = []
        self._job_ref = None

    def _asks(self) -> dict[str, float]:
        """The Ray resources one actor reserves."""
        return {"CPU": 1, "GPU": self.gpus, "memory": self.memory}

    def _new_actor(self, i: int, job_ref: Any = None):
        """Actor ``i``: given the job when ``job_ref`` is set (a replacement), else waiting for
        it (``SliceActor.setup``)."""
        asks = self._asks()
        # max_concurrency = in_flight: while one slice computes, the next one reads
        opts: dict[str, Any] = {"num_cpus": asks["CPU"], "num_gpus": asks["GPU"], "max_restarts": 0,
                                "max_concurrency": self.in_flight}
        if asks["memory"]:
            opts["memory"] = asks["memory"]
        return _actor_class().options(**opts).remote(f"worker{i}", job_ref)

    def launch(self) -> None:
        """Create the actors before the job is known: each one's process start and imports
        (about a second of CPU, mostly ``import torch``) then overlap the driver's planning."""
        if not self.actors:
            self.actors = [self._new_actor(i) for i in range(self.workers)]

    def start(self, job: Job) -> None:
        import ray

        self.launch()
        self._job_ref = ray.put(job)
        self._wait_started([a.setup.remote(self._job_ref) for a in self.actors])

    def _wait_started(self, refs: list[Any]) -> None:
        """Wait for every actor's setup, raising its error; while some wait (for the cluster
        to have room for them: Ray queues an actor it cannot place, silently), say every
        STARTUP_WARN_SECONDS what each asks for and what the cluster has."""
        import ray

        pending, waited = list(refs), 0.0
        while pending:
            done, pending = ray.wait(pending, num_returns=len(pending), timeout=STARTUP_WARN_SECONDS)
            ray.get(done)                                   # an actor that failed to start
            if pending:
                waited += STARTUP_WARN_SECONDS
                log.warning("%d of %d workers not started after %g s; each asks for %s; free on "
                            "the cluster: %s (of %s in total). Still waiting (an autoscaler may "
                            "add nodes); stop the run if it cannot.", len(pending), len(refs),
                            waited, _resources(self._asks()), _resources(ray.available_resources()),
                            _resources(ray.cluster_resources()))

    def run(self, tasks: list[Task], ctx: dict[str, Any], on_report: OnReport,
            on_retry: OnRetry | None = None) -> Counts:
        import ray
        from ray.exceptions import RayActorError, RayTaskError

        ctx_ref = ray.put(ctx)
        queue: deque[tuple[Task, int, int]] = deque((t, 0, -1) for t in tasks)  # task, attempts, avoid
        running: dict[Any, tuple[Task, int, int, int]] = {}     # ref -> task, attempts, actor, generation
        # Statistics tasks whose counts sit in an actor until it is drained: lost if it dies.
        # An actor slot's generation changes when its actor is replaced, so a result that
        # arrives from a dead generation is recognised (its counts died with it).
        undrained: list[list[Task]] = [[] for _ in self.actors]
        generation = [0] * len(self.actors)
        load = [0] * len(self.actors)
        total: Counts = {}
        next_actor = 0

        def pick(avoid: int) -> int:
            nonlocal next_actor
            order = [(next_actor + k) % len(self.actors) for k in range(len(self.actors))]
            free = [i for i in order if load[i] < self.in_flight]
            choice = next((i for i in free if i != avoid), free[0] if free else -1)
            next_actor = (choice + 1) % len(self.actors)
            return choice

        def take_for(i: int) -> tuple[Task, int, int]:
            """Remove from the queue, among its first HOME_WINDOW entries, one whose slice lives
            on actor ``i`` (slice index mod actors: the same actor in every pass, so a worker
            finds the inputs it kept resident) and that does not avoid ``i``; else the first."""
            for k in range(min(HOME_WINDOW, len(queue))):
                t, _, avoid = queue[k]
                if t.slice.index % len(self.actors) == i and avoid != i:
                    entry = queue[k]
                    del queue[k]
                    return entry
            return queue.popleft()

        def redo(task: Task, i: int, err: BaseException) -> None:
            queue.append((task, 0, i))
            if on_retry is not None:
                on_retry(task, err)

        def replace(i: int, err: BaseException) -> None:
            log.warning("worker%d died; starting a replacement", i)
            self.actors[i] = self._new_actor(i, self._job_ref)
            generation[i] += 1
            for t in undrained[i]:
                redo(t, i, err)
            undrained[i] = []

        while queue or running:
            while queue or running:
                while queue:
                    i = pick(queue[0][2])
                    if i < 0:
                        break
                    task, attempts, avoid = take_for(i)
                    ref = self.actors[i].process.remote(task, ctx_ref)
                    running[ref] = (task, attempts, i, generation[i])
                    load[i] += 1
                done, _ = ray.wait(list(running), num_returns=1)
                ref = done[0]
                task, attempts, i, gen = running.pop(ref)
                load[i] -= 1
                try:
                    report = ray.get(ref)
                except (RayTaskError, RayActorError) as err:
                    cause = err.cause if isinstance(err, RayTaskError) and err.cause is not None else err
                    if isinstance(err, RayActorError) and gen == generation[i]:
                        replace(i, err)
                    decision = self.policy.decide(cause, attempts + 1)
                    if not decision.retry:
                        for r in running:
                            ray.cancel(r)
                        raise cause from None
                    log.warning("slice %d: %s", task.slice.index, decision.reason)
                    if on_retry is not None:
                        on_retry(task, cause)
                    queue.append((task, attempts + 1, i))
                    continue
                if task.round is not None:
                    if gen != generation[i]:
                        redo(task, i, RuntimeError(f"worker{i} died holding this slice's counts"))
                        continue
                    undrained[i].append(task)
                on_report(task, report)
            drains = [actor.drain.remote() for actor in self.actors]   # all at once
            for i, ref in enumerate(drains):
                try:
                    add_counts(total, ray.get(ref))
                    undrained[i] = []
                except RayActorError as err:
                    replace(i, err)
        return total

    def shutdown(self) -> None:
        import ray

        for a in self.actors:
            try:
                ray.kill(a)
            except Exception:  # noqa: BLE001 - best effort at shutdown
                pass
        self.actors = []
