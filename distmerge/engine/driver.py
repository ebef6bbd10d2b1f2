"""The driver: one run as an explicit state machine.

    VALIDATE → PLAN → STATS (one pass per statistics round) → MERGE → GATHER → PUBLISH → DONE

Each step returns the next state. The driver holds headers, the plan and small reduced
statistics, never tensors. If any step fails, the staging folder is removed and the
destination is left as it was; the error propagates unchanged.
"""

from __future__ import annotations

import enum
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from distmerge.checkpoint.compat import check_compatible
from distmerge.checkpoint.header import DTYPE_BY_NAME, DTYPE_SIZES
from distmerge.checkpoint.source import ModelHeaders, read_model_headers
from distmerge.checkpoint.writer import StagedOutput, check_destination
from distmerge.config import Pipeline
from distmerge.engine.executors import Executor, LocalExecutor, RayExecutor
from distmerge.engine.worker import Job, Report, Task
from distmerge.errors import MergeFailedError
from distmerge.methods import MethodSet, build
from distmerge.metrics import RunEvents
from distmerge.plan import Plan, make_plan, slice_elements_for
from distmerge.reduce import StatsAccumulator

log = logging.getLogger(__name__)


class State(enum.Enum):
    VALIDATE = "validate"
    PLAN = "plan"
    STATS = "stats"
    MERGE = "merge"
    GATHER = "gather"
    PUBLISH = "publish"
    DONE = "done"


@dataclass(kw_only=True)
class Summary:
    output: str
    tensors: int
    shards: int
    slices: int
    passes: int
    bytes_read: int
    bytes_written: int
    seconds: float
    stage_seconds: dict[str, float]
    worker_peak_rss: dict[str, int]
    memory_per_worker: int
    worker_seconds: dict[str, float] = field(default_factory=dict)
    retries: int = 0

    @property
    def read_gbps(self) -> float:
        return self.bytes_read / 1e9 / self.seconds if self.seconds else 0.0

    def lines(self) -> list[str]:
        peak = max(self.worker_peak_rss.values(), default=0)
        return [
            f"merged checkpoint: {self.output}",
            f"  tensors {self.tensors} in {self.shards} shard(s), {self.slices} slices, "
            f"{self.passes} pass(es) over the inputs, {self.retries} slice(s) retried",
            f"  read {self.bytes_read / 1e9:.3f} GB, wrote {self.bytes_written / 1e9:.3f} GB "
            f"in {self.seconds:.2f} s ({self.read_gbps:.2f} GB/s read)",
            "  stages: " + ", ".join(f"{k} {v:.2f}s" for k, v in self.stage_seconds.items()),
            f"  peak worker memory {peak / 1e9:.2f} GB of {self.memory_per_worker / 1e9:.2f} GB budget",
        ]


@dataclass(frozen=True, kw_only=True)
class Validated:
    base: ModelHeaders
    experts: list[ModelHeaders]
    methods: MethodSet


def validate(pipeline: Pipeline) -> Validated:
    """Check everything that can be checked without reading a tensor byte: method parameters,
    the destination, every model's shards and headers, and their agreement.

    Raises:
        ConfigError, SourceNotFoundError, UnsafeCheckpointError, IncompatibleModelsError,
        DestinationError
    """
    methods = build(pipeline.method.name, pipeline.method.params(),
                    [(o.match, o.params()) for o in pipeline.overrides])
    methods.check_weights(tuple(e.weight for e in pipeline.experts))
    urls = [pipeline.base] + [e.path for e in pipeline.experts]
    check_destination(pipeline.output.path, overwrite=pipeline.output.overwrite, sources=urls)
    with ThreadPoolExecutor(max_workers=16) as pool:
        models = [read_model_headers(u, pool=pool) for u in urls]
    check_compatible(models[0], models[1:])
    return Validated(base=models[0], experts=models[1:], methods=methods)


def plan_for(pipeline: Pipeline, validated: Validated) -> Plan:
    tensors = [(n, info.dtype, info.shape) for n, (_, info) in validated.base.tensors.items()]
    n_models = 1 + len(validated.experts)
    if pipeline.resources.slice_size is not None:
        elements = max(1, pipeline.resources.slice_size // 4)
    else:
        itemsize = max((DTYPE_SIZES[d] for _, d, _ in tensors), default=4)
        elements = slice_elements_for(pipeline.resources.memory_per_worker,
                                      n_models=n_models, in_itemsize=itemsize)
    out = DTYPE_BY_NAME[pipeline.output.dtype] if pipeline.output.dtype else None
    return make_plan(tensors, out_dtype=out, shard_size=pipeline.output.shard_size,
                     slice_elements=elements)


def ensure_ray(address: str | None, workers: int) -> bool:
    """Connect to Ray (an embedded local instance when ``address`` is None). Returns True when
    this call started it (so the caller shuts it down)."""
    import ray

    if ray.is_initialized():
        return False
    if address is None:
        ray.init(num_cpus=max(workers, os.cpu_count() or 1), include_dashboard=False,
                 logging_level=logging.WARNING, configure_logging=False)
    else:
        ray.init(address=address, logging_level=logging.WARNING, configure_logging=False)
    return True


def make_executor(pipeline: Pipeline, kind: str = "ray") -> Executor:
    if kind == "local":
        return LocalExecutor()
    r = pipeline.resources
    return RayExecutor(workers=r.workers, gpus_per_worker=r.gpus_per_worker,
                       memory_per_worker=r.memory_per_worker if pipeline.ray.address else 0)


class Run:
    """One merge, from a validated pipeline to a published checkpoint."""

    def __init__(self, pipeline: Pipeline, *, executor: Executor,
                 events: RunEvents | None = None, validated: Validated | None = None):
        self.pipeline = pipeline
        self.executor = executor
        self.events = events or RunEvents(pipeline.name)
        self.validated = validated
        self.plan: Plan | None = None
        self.output: StagedOutput | None = None
        self.ctx: dict[str, Any] = {}
        self.round = 0
        self.checksums: dict[int, int] = {}
        self.bytes_read = 0
        self.bytes_written = 0
        self.peak_rss: dict[str, int] = {}
        self.worker_seconds: dict[str, float] = {}
        self.retries = 0

    # -- the state machine ------------------------------------------------------------------
    def execute(self) -> Summary:
        start = time.perf_counter()
        state = State.VALIDATE
        steps = {
            State.VALIDATE: self._validate, State.PLAN: self._plan, State.STATS: self._stats,
            State.MERGE: self._merge, State.GATHER: self._gather, State.PUBLISH: self._publish,
        }
        try:
            while state is not State.DONE:
                self.events.stage(state.value)
                state = steps[state]()
        except BaseException:
            if self.output is not None:
                self.output.abort()
            raise
        finally:
            self.events.finish()
            self.executor.shutdown()
        assert self.plan is not None and self.validated is not None
        return Summary(
            output=self.output.dest, tensors=len(self.plan.tensors),
            shards=len(self.plan.shards), slices=len(self.plan.slices),
            passes=self.validated.methods.rounds + 1,
            bytes_read=self.bytes_read, bytes_written=self.bytes_written,
            seconds=time.perf_counter() - start, stage_seconds=dict(self.events.stage_seconds),
            worker_peak_rss=dict(self.peak_rss),
            memory_per_worker=self.pipeline.resources.memory_per_worker,
            worker_seconds=dict(self.worker_seconds), retries=self.retries,
        )

    def _validate(self) -> State:
        if self.validated is None:
            self.validated = validate(self.pipeline)
        return State.PLAN

    def _plan(self) -> State:
        assert self.validated is not None
        self.plan = plan_for(self.pipeline, self.validated)
        self.output = StagedOutput(self.pipeline.output.path)
        self.output.create(self.plan)
        v = self.validated
        self.executor.start(Job(
            tensors=self.plan.tensors,
            shard_paths=tuple(self.output.shard_path(s.filename) for s in self.plan.shards),
            sources=tuple({n: t for n, t in m.tensors.items()} for m in [v.base, *v.experts]),
            model_names=tuple(m.url for m in [v.base, *v.experts]),
            weights=tuple(e.weight for e in self.pipeline.experts),
            methods=v.methods,
        ))
        self.events.set_passes(v.methods.rounds + 1)
        return State.STATS if v.methods.rounds else State.MERGE

    def _on_report(self, task: Task, report: Report) -> None:
        self.bytes_read += report.bytes_read
        self.bytes_written += report.bytes_written
        self.peak_rss[report.worker] = max(self.peak_rss.get(report.worker, 0), report.peak_rss)
        for k, v in report.seconds.items():
            self.worker_seconds[k] = self.worker_seconds.get(k, 0.0) + v
        self.events.slice_done(report)

    def _on_retry(self, task: Task, error: BaseException) -> None:
        self.retries += 1
        self.events.slice_failed()

    def _stats_slices(self) -> list[Task]:
        """The slices holding at least one tensor that this round has statistics for."""
        assert self.plan is not None and self.validated is not None
        ms = self.validated.methods
        return [
            Task(slice=s, round=self.round)
            for s in self.plan.slices
            if any(self.plan.tensors[p.tensor].merged and self.round < ms.for_tensor(p.tensor).rounds
                   for p in s.pieces)
        ]

    def _stats(self) -> State:
        assert self.validated is not None and self.plan is not None
        acc = StatsAccumulator()

        def on_report(task: Task, report: Report) -> None:
            acc.add(task.slice.index, report.partial)
            self._on_report(task, report)

        tasks = self._stats_slices()
        self.events.pass_start(f"stats {self.round + 1}/{self.validated.methods.rounds}", len(tasks))
        acc.add_counts(self.executor.run(tasks, self.ctx, on_report, self._on_retry))
        self.events.pass_end()
        self.ctx = self.validated.methods.reduce(self.round, acc.totals(), self.ctx,
                                                 list(self.plan.tensors))
        self.round += 1
        return State.STATS if self.round < self.validated.methods.rounds else State.MERGE

    def _merge(self) -> State:
        assert self.plan is not None
        tasks = [Task(slice=s, round=None) for s in self.plan.slices]

        def on_report(task: Task, report: Report) -> None:
            if report.checksum is None:
                raise MergeFailedError(f"slice {task.slice.index} reported no checksum")
            self.checksums[task.slice.index] = report.checksum
            self._on_report(task, report)

        self.events.pass_start("merge", len(tasks))
        self.executor.run(tasks, self.ctx, on_report, self._on_retry)
        self.events.pass_end()
        return State.GATHER

    def _gather(self) -> State:
        assert self.plan is not None and self.output is not None
        self.output.finalize(self.plan, base_url=self.pipeline.base, out_dtype=self.pipeline.output.dtype)
        self.output.verify(self.plan, self.checksums)
        return State.PUBLISH

    def _publish(self) -> State:
        assert self.output is not None
        self.output.publish(overwrite=self.pipeline.output.overwrite)
        return State.DONE


def run_pipeline(pipeline: Pipeline, *, executor: str | Executor = "ray",
                 show_progress: bool = True) -> Summary:
    """Validate, plan, merge and publish ``pipeline``. With ``executor="ray"`` an embedded local
    Ray is started when ``ray.address`` is null and none is running (and stopped after).

    Raises:
        DistmergeError subclasses for every problem a user can fix; the destination is then
        unchanged.
    """
    validated = validate(pipeline)    # fail fast, before starting Ray
    started = False
    if isinstance(executor, str):
        if executor == "ray":
            started = ensure_ray(pipeline.ray.address, pipeline.resources.workers)
        executor = make_executor(pipeline, executor)
    try:
        return Run(pipeline, executor=executor, validated=validated,
                   events=RunEvents(pipeline.name, show_progress=show_progress)).execute()
    finally:
        if started:
            import ray

            ray.shutdown()
