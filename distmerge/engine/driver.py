"""The driver: one run as an explicit state machine.

    VALIDATE → PLAN → [RESUME] → STATS (one pass per statistics round) → MERGE → GATHER → PUBLISH → DONE

Each step returns the next state. The driver holds headers, the plan and small reduced
statistics, never tensors. If any step fails, the destination is left as it was and the error
propagates unchanged.

Resuming (``run_pipeline(..., resume=True)``, ``distmerge run --resume``). The run's state lives
only in its staging folder beside the destination (see :mod:`distmerge.checkpoint.writer`):
every finished merge slice is appended to a manifest with its crc32, and the reduced statistics
are saved after each statistics round. Run again with ``resume`` (the same command, on this or a
new cluster), the RESUME step re-reads every recorded slice and checks its crc32 (a slice whose
bytes differ is redone), restores the statistics (only rounds not saved are recomputed), and
the merge pass runs the remaining slices: the result is byte-identical to an uninterrupted run.
A staging folder of a different pipeline (method, experts, weights, inputs' files, output dtype
or shard size, slice plan, distmerge version) is refused; without ``resume`` any staging folder
of the destination is refused. ``resume`` with nothing to resume starts a new run, so a job
that retries may always pass it.

When a run fails, :func:`keeps_staging` decides about its staging folder: it is kept (and a
warning says so) when it holds finished work, i.e. at least one merge slice recorded or one
statistics round saved, unless the error is one a resume would meet again (the pipeline, an
input's headers or its values are wrong: ConfigError, UnsafeCheckpointError,
IncompatibleModelsError, NonFiniteError); otherwise it is deleted. Validation and planning
failures never leave one. A killed driver leaves it as it was, which is the point.
"""

from __future__ import annotations

import enum
import hashlib
import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

import distmerge
from distmerge.checkpoint.compat import check_compatible
from distmerge.checkpoint.header import DTYPE_BY_NAME, DTYPE_SIZES
from distmerge.checkpoint.source import ModelHeaders, is_local, read_model_headers, resolve_models, use_storage
from distmerge.checkpoint.state import file_fingerprint
from distmerge.checkpoint.destination import check_output, prepare_output, refuse_staging, shape_plan
from distmerge.checkpoint.zero import default_cache
from distmerge.config import Pipeline
from distmerge.engine.executors import Executor, LocalExecutor, RayExecutor
from distmerge.engine.worker import Job, Report, Task
from distmerge.errors import (
    ConfigError,
    IncompatibleModelsError,
    MergeFailedError,
    NonFiniteError,
    UnsafeCheckpointError,
)
from distmerge.methods import MethodSet, build, merged_with_stale
from distmerge.metrics import RunEvents, serve_metrics
from distmerge.plan import Plan, make_plan, resident_bytes_for, slice_elements_for
from distmerge.reduce import StatsAccumulator
from distmerge.select.pool import Selection, bind_pool

log = logging.getLogger(__name__)


class State(enum.Enum):
    VALIDATE = "validate"
    PLAN = "plan"
    RESUME = "resume"
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
    resumed: bool = False
    resumed_slices: int = 0           # finished slices found, re-verified and skipped
    redone_slices: int = 0            # recorded slices whose bytes no longer matched
    remerged_slices: int = 0          # merged again: a speculated context was wrong for them
    stats_rounds_restored: int = 0
    resume_seconds: float = 0.0       # the RESUME step: read the manifest, re-verify, restore

    @property
    def read_gbps(self) -> float:
        return self.bytes_read / 1e9 / self.seconds if self.seconds else 0.0

    def lines(self) -> list[str]:
        peak = max(self.worker_peak_rss.values(), default=0)
        return [
            f"merged checkpoint: {self.output}",
            f"  tensors {self.tensors} in {self.shards} shard(s), {self.slices} slices, "
            f"{self.passes} pass(es) over the inputs, {self.retries} slice(s) retried, "
            f"{self.remerged_slices} merged again (mispredicted majority sign)",
            f"  read {self.bytes_read / 1e9:.3f} GB, wrote {self.bytes_written / 1e9:.3f} GB "
            f"in {self.seconds:.2f} s ({self.read_gbps:.2f} GB/s read)",
            "  stages: " + ", ".join(f"{k} {v:.2f}s" for k, v in self.stage_seconds.items()),
            f"  peak worker memory {peak / 1e9:.2f} GB of {self.memory_per_worker / 1e9:.2f} GB budget",
        ] + ([
            f"  resumed: {self.resumed_slices} of {self.slices} slices verified and skipped, "
            f"{self.redone_slices} redone, {self.stats_rounds_restored} statistics pass(es) "
            f"restored, in {self.resume_seconds:.3f} s"
        ] if self.resumed else [])


@dataclass(frozen=True, kw_only=True)
class Validated:
    base: ModelHeaders
    experts: list[ModelHeaders]
    methods: MethodSet


def worth_keeping(url: str) -> bool:
    """Whether workers keep a model's slices in memory between passes: for models behind a
    URL (object stores, the Hub), whose every pass costs requests and transfer; not for local
    files, which the operating system's page cache already keeps (measured here: keeping them
    too made a 3-pass TIES run no faster and tripled the workers' memory)."""
    return not is_local(url)


def input_cache(pipeline: Pipeline) -> str:
    """Where inputs in other formats (``deepspeed_zero``) are staged as safetensors."""
    return pipeline.input_cache or default_cache(pipeline.output.path)


def validate(pipeline: Pipeline, *, events: RunEvents | None = None) -> Validated:
    """Check everything that can be checked without reading a tensor byte: method parameters,
    the destination, every model's shards and headers, and their agreement. A model given as a
    DeepSpeed ZeRO checkpoint is first staged into safetensors (converted unless already done,
    in the ``convert`` stage of ``events``), and its headers are read from there.

    Raises:
        ConfigError, SourceNotFoundError, UnsafeCheckpointError, IncompatibleModelsError,
        DestinationError
    """
    methods = build(pipeline.method.name, pipeline.method.params(),
                    [(o.match, o.params()) for o in pipeline.overrides])
    methods.check_weights(tuple(e.weight for e in pipeline.experts))
    refs = pipeline.models()
    use_storage(pipeline.storage)           # this process's URLs: header reads, config copy
    sources = [r.path for r in refs]
    if any(r.format != "safetensors" for r in refs):
        sources.append(input_cache(pipeline))
    check_output(pipeline, sources)
    urls = resolve_models(refs, cache=input_cache(pipeline),
                          on_convert=(lambda: events.stage("convert")) if events else None)
    if events is not None:
        events.stage(State.VALIDATE.value)
    with ThreadPoolExecutor(max_workers=16) as pool:
        models = [read_model_headers(u, pool=pool) for u in urls]
    check_compatible(models[0], models[1:])
    methods = bind_pool(methods, pipeline, models[0], models[1:])    # frank_wolfe's pool checks
    return Validated(base=models[0], experts=models[1:], methods=methods)


def input_itemsize(validated: Validated) -> int:
    """Bytes per element of the widest input dtype (what sizes a worker's buffers)."""
    return max((DTYPE_SIZES[info.dtype] for _, info in validated.base.tensors.values()), default=4)


def plan_for(pipeline: Pipeline, validated: Validated) -> Plan:
    tensors = [(n, info.dtype, info.shape) for n, (_, info) in validated.base.tensors.items()]
    n_models = 1 + len(validated.experts)
    if pipeline.resources.slice_size is not None:
        elements = max(1, pipeline.resources.slice_size // 4)
    else:
        itemsize = input_itemsize(validated)
        elements = slice_elements_for(pipeline.resources.memory_per_worker,
                                      n_models=n_models, in_itemsize=itemsize)
    out = DTYPE_BY_NAME[pipeline.output.dtype] if pipeline.output.dtype else None
    return shape_plan(pipeline, make_plan(tensors, out_dtype=out, shard_size=pipeline.output.shard_size,
                                          slice_elements=elements))


def run_identity(pipeline: Pipeline, validated: Validated, plan: Plan) -> dict[str, Any]:
    """Everything that decides a run's output bytes, as JSON-able values; its digest names the
    staging folder and must match for a resume. Workers, memory (beyond the slice plan it
    gives), Ray address, overwrite and the run's name are not part of it."""
    v = validated
    models = [v.base, *v.experts]
    shards = sorted({s for m in models for s in m.shards})
    with ThreadPoolExecutor(max_workers=16) as pool:
        fingerprints = dict(zip(shards, pool.map(file_fingerprint, shards)))
    inputs = []
    for m in models:
        h = hashlib.sha256()
        for name in sorted(m.tensors):
            shard, info = m.tensors[name]
            h.update(json.dumps([name, shard, info.dtype, list(info.shape), info.start, info.stop]).encode())
        inputs.append({"url": m.url, "headers_sha256": h.hexdigest(),
                       "files": {s: fingerprints[s] for s in m.shards}})
    p = hashlib.sha256(plan.to_json().encode())
    for shard in plan.shards:
        p.update(shard.header)
    return {
        "format": 1,
        "distmerge": distmerge.__version__,
        "method": [repr(v.methods.default)] + [f"{pat}: {m!r}" for pat, m in v.methods.overrides],
        "experts": [{"path": e.path, "weight": e.weight.hex()} for e in pipeline.experts],
        "inputs": inputs,
        "output": {"dtype": pipeline.output.dtype, "shard_size": pipeline.output.shard_size},
        "plan": p.hexdigest(),
    }


# A resume would meet these again (the pipeline or an input is wrong; fixing it changes the
# run's identity anyway), so the staging folder of a run failing with them is deleted.
NOT_RESUMABLE = (ConfigError, UnsafeCheckpointError, IncompatibleModelsError, NonFiniteError)


def keeps_staging(error: BaseException, *, slices_recorded: int, stats_saved: int) -> bool:
    """Whether a failed run keeps its staging folder for ``--resume``: it holds finished work
    (``slices_recorded`` merge slices in the manifest, ``stats_saved`` statistics rounds saved)
    and the error is not one a resume would meet again (:data:`NOT_RESUMABLE`). Anything else
    (a slice failing beyond its retries, a lost Ray cluster, a full disk, Ctrl-C, a failed
    verification or publication) keeps it. The destination is untouched either way."""
    if slices_recorded <= 0 and stats_saved <= 0:
        return False
    return not isinstance(error, NOT_RESUMABLE)


def ray_address(pipeline: Pipeline) -> str | None:
    """The cluster to join: the pipeline's ``ray.address``; else ``auto`` when RAY_ADDRESS is
    set (inside a Ray job — ``ray job submit``, ``distmerge submit``, a KubeRay RayJob — or on a
    cluster node); else None, an embedded local Ray."""
    if pipeline.ray.address is None and os.environ.get("RAY_ADDRESS"):
        return "auto"
    return pipeline.ray.address


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
    # an embedded local Ray gets no memory reservation: its total is a guess of Ray's own
    return RayExecutor(workers=r.workers, gpus_per_worker=r.gpus_per_worker,
                       memory_per_worker=r.memory_per_worker if ray_address(pipeline) else 0)


class Run:
    """One merge, from a validated pipeline to a published checkpoint."""

    def __init__(self, pipeline: Pipeline, *, executor: Executor,
                 events: RunEvents | None = None, validated: Validated | None = None,
                 resume: bool = False):
        self.pipeline = pipeline
        self.resume = resume
        self.executor = executor
        self.events = events or RunEvents(pipeline.name)
        self.validated = validated
        self.plan: Plan | None = None
        self.output = None                # a destination's output (checkpoint.destination)
        self.ctx: dict[str, Any] = {}
        self.round = 0
        self.checksums: dict[int, int] = {}
        self.merge_stats: dict[int, dict[str, int]] = {}    # slice -> its exact merge statistics
        self.remerged_slices = 0
        self.bytes_read = 0
        self.bytes_written = 0
        self.peak_rss: dict[str, int] = {}
        self.worker_seconds: dict[str, float] = {}
        self.retries = 0
        self.recorded = 0                 # merge slices in the manifest (resumed or this run)
        self.stats_saved = 0              # statistics rounds saved in the staging folder
        self.resumed_slices = 0
        self.redone_slices = 0
        self.stats_rounds_restored = 0
        self._claimed: dict[int, int] = {}
        self._saved: tuple[int, dict[str, Any]] | None = None
        self.selection: Selection | None = None     # frank_wolfe's driver side (select/)

    # -- the state machine ------------------------------------------------------------------
    def execute(self) -> Summary:
        start = time.perf_counter()
        state = State.VALIDATE
        steps = {
            State.VALIDATE: self._validate, State.PLAN: self._plan, State.RESUME: self._resume,
            State.STATS: self._stats, State.MERGE: self._merge, State.GATHER: self._gather,
            State.PUBLISH: self._publish,
        }
        try:
            while state is not State.DONE:
                self.events.stage(state.value)
                state = steps[state]()
        except BaseException as err:
            self.events.finish(error=err)
            if self.output is not None:
                self._on_failure(err)
            raise
        finally:
            self.events.finish()          # succeeded (a no-op after a failure)
            if self.selection is not None:
                self.selection.close()    # the sharded gradient stage's ranks, after a failure too
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
            resumed=self.output.resumed, resumed_slices=self.resumed_slices,
            redone_slices=self.redone_slices, stats_rounds_restored=self.stats_rounds_restored,
            remerged_slices=self.remerged_slices,
            resume_seconds=self.events.stage_seconds.get(State.RESUME.value, 0.0),
        )

    def _on_failure(self, err: BaseException) -> None:
        assert self.output is not None
        if keeps_staging(err, slices_recorded=self.recorded, stats_saved=self.stats_saved):
            self.output.close()
            total = len(self.plan.slices) if self.plan is not None else 0
            log.warning("the run failed; its staging folder %s is kept (%d of %d merge slices and "
                        "%d statistics pass(es) done): run the same command with --resume to "
                        "continue, or delete the folder to start over", self.output.staging,
                        self.recorded, total, self.stats_saved)
        else:
            self.output.abort()

    def _validate(self) -> State:
        if self.validated is None:
            self.validated = validate(self.pipeline)
        return State.PLAN

    def _plan(self) -> State:
        assert self.validated is not None
        self.executor.launch()            # the workers boot while this plans (after validation)
        self.plan = plan_for(self.pipeline, self.validated)
        self.output = prepare_output(self.pipeline, self.plan,
                                     run_identity(self.pipeline, self.validated, self.plan),
                                     resume=self.resume)
        self.events.set_passes(self.validated.methods.rounds + 1)
        if self.output.resumed:
            # what the interrupted run claims to have finished; kept on failure until checked
            self._claimed = self.output.recorded_slices(self.plan)
            self._saved = self.output.load_stats() if self.validated.methods.rounds else None
            self.recorded = len(self._claimed)
            self.stats_saved = self._saved[0] if self._saved else 0
        self._start_executor()
        if self.output.resumed:
            return State.RESUME
        return State.STATS if self.validated.methods.rounds else State.MERGE

    def _start_executor(self) -> None:
        assert self.plan is not None and self.output is not None and self.validated is not None
        v = self.validated
        budget = self._resident_bytes()
        remote = tuple(i for i, m in enumerate([v.base, *v.experts]) if worth_keeping(m.url))
        self.selection = Selection.for_run(self.pipeline, v.methods, v.base, v.experts, remote=remote,
                                           resident_budget=budget * self.executor.workers)
        extra = self.selection.extra_sources(self.output.staging) if self.selection else []
        self.executor.start(Job(
            tensors=self.plan.tensors,
            shard_paths=tuple(self.output.shard_path(s.filename) for s in self.plan.shards),
            sources=tuple({n: t for n, t in m.tensors.items()} for m in [v.base, *v.experts, *extra]),
            model_names=tuple(m.url for m in [v.base, *v.experts, *extra]),
            weights=tuple(e.weight for e in self.pipeline.experts),
            methods=v.methods,
            allow_nonfinite=self.pipeline.allow_nonfinite,
            storage=self.pipeline.storage,
            sink=self.output.sink(),
            resident_bytes=budget,
            resident_sources=self.selection.resident_sources(remote) if self.selection else remote,
        ))

    def _resident_bytes(self) -> int:
        """Input bytes each worker keeps between passes: none for a one-pass method, else what
        its memory leaves beside the slices it is merging (see ``plan.resident_bytes_for``)."""
        assert self.plan is not None and self.validated is not None
        if self.validated.methods.rounds == 0:
            return 0
        v = self.validated
        return resident_bytes_for(self.pipeline.resources.memory_per_worker,
                                  n_models=1 + len(v.experts), in_itemsize=input_itemsize(v),
                                  slice_elements=self.plan.slice_elements)

    def _resume(self) -> State:
        """Take over an interrupted run's work: re-verify every slice its manifest records
        (those whose bytes differ are redone) and restore its statistics."""
        assert self.output is not None and self.plan is not None and self.validated is not None
        rounds = self.validated.methods.rounds
        good, bad = self.output.check_slices(self.plan, self._claimed)
        self.checksums.update(good)
        self.merge_stats.update({i: self.output.recorded_stats.get(i, {}) for i in good})
        self.recorded = self.resumed_slices = len(good)
        self.redone_slices = len(bad)
        if bad:
            log.warning("resume: %d recorded slice(s) no longer match their checksum and are "
                        "redone (first %s)", len(bad), bad[:5])
        if self._saved is not None and self._saved[0] <= rounds:
            self.round, self.ctx = self._saved
            self.stats_rounds_restored = self.round
        self.stats_saved = self.round
        self.events.set_passes(rounds - self.round + 1)
        log.info("resume: %d of %d slices verified and skipped, %d of %d statistics pass(es) restored",
                 len(good), len(self.plan.slices), self.round, rounds)
        return State.STATS if self.round < rounds else State.MERGE

    def _on_report(self, task: Task, report: Report) -> None:
        self.bytes_read += report.bytes_read
        self.bytes_written += report.bytes_written
        self.peak_rss[report.worker] = max(self.peak_rss.get(report.worker, 0), report.peak_rss)
        for k, v in report.seconds.items():
            self.worker_seconds[k] = self.worker_seconds.get(k, 0.0) + v
        self.events.slice_done(report, report.read_by_source or None)

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
        if self.selection is not None:
            self.ctx = self.selection.before_round(self.round, self.ctx)
        read_before = self.bytes_read
        self.events.pass_start(f"stats {self.round + 1}/{self.validated.methods.rounds}", len(tasks))
        acc.add_counts(self.executor.run(tasks, self.ctx, on_report, self._on_retry))
        self.events.pass_end()
        self.ctx = self.validated.methods.reduce(self.round, acc.totals(), self.ctx,
                                                 list(self.plan.tensors))
        if self.selection is not None:
            for record in self.selection.pass_done(self.ctx, self.bytes_read - read_before):
                self.events.fw_iteration(record)
        self.round += 1
        assert self.output is not None
        if self.output.save_stats(self.round, self.ctx):
            self.stats_saved = self.round
        return State.STATS if self.round < self.validated.methods.rounds else State.MERGE

    def _merge(self) -> State:
        assert self.plan is not None and self.output is not None and self.validated is not None
        tasks = [Task(slice=s, round=None) for s in self.plan.slices if s.index not in self.checksums]
        self._merge_pass("merge", tasks)
        # Settle what the context speculated (ties scope model: the majority sign) from the
        # merge statistics of every slice; merge again the slices merged with a wrong value.
        totals: dict[str, int] = {}
        for stats in self.merge_stats.values():
            for k, v in stats.items():
                totals[k] = totals.get(k, 0) + v
        arrays = {k: np.array([v], dtype=np.int64) for k, v in sorted(totals.items())}
        self.ctx, stale = self.validated.methods.settle(arrays, self.ctx, list(self.plan.tensors))
        again = [Task(slice=s, round=None) for s in self.plan.slices
                 if merged_with_stale(self.merge_stats.get(s.index, {}), stale)]
        if again:
            log.info("the speculated majority sign was wrong: %d of %d slice(s) merged again",
                     len(again), len(self.plan.slices))
            self._merge_pass("merge again", again)
            self.remerged_slices += len(again)
        return State.GATHER

    def _merge_pass(self, label: str, tasks: list[Task]) -> None:
        assert self.output is not None

        def on_report(task: Task, report: Report) -> None:
            if report.checksum is None:
                raise MergeFailedError(f"slice {task.slice.index} reported no checksum")
            stats = {k: int(v.sum()) for k, v in report.stats.items()}
            self.recorded += task.slice.index not in self.checksums    # merged again: counted once
            self.checksums[task.slice.index] = report.checksum
            self.merge_stats[task.slice.index] = stats
            self.output.record(task.slice, report.checksum, report.receipt, stats=stats)
            self._on_report(task, report)

        self.events.pass_start(label, len(tasks))
        self.executor.run(tasks, self.ctx, on_report, self._on_retry)
        self.events.pass_end()

    def _gather(self) -> State:
        assert self.plan is not None and self.output is not None and self.validated is not None
        # the base's side files (config, tokenizer) from the folder its tensors were read from
        self.output.finalize(self.plan, base_url=self.validated.base.url, out_dtype=self.pipeline.output.dtype)
        if self.selection is not None:
            self.selection.finish(self.output.staging, self.ctx)
        self.output.verify(self.plan, self.checksums)
        return State.PUBLISH

    def _publish(self) -> State:
        assert self.output is not None
        self.output.publish(overwrite=self.pipeline.output.overwrite)
        return State.DONE


def run_pipeline(pipeline: Pipeline, *, executor: str | Executor = "ray",
                 show_progress: bool = True, resume: bool = False) -> Summary:
    """Validate, plan, merge and publish ``pipeline``. With ``executor="ray"`` an embedded local
    Ray is started when ``ray.address`` is null and none is running (and stopped after).

    With ``resume``, an interrupted run of the same pipeline is continued from its staging
    folder (see the module docstring); without it, an existing staging folder of the
    destination is refused.

    With ``metrics.port`` set, the run's Prometheus metrics are served from before validation
    until the end of the run (and its linger; :mod:`distmerge.metrics`).

    Raises:
        DistmergeError subclasses for every problem a user can fix; the destination is then
        unchanged. A failed run may keep its staging folder for ``resume`` (:func:`keeps_staging`).
    """
    events = RunEvents(pipeline.name, show_progress=show_progress)
    kind = executor if isinstance(executor, str) else type(executor).__name__
    sources = [r.path for r in pipeline.models()]
    events.describe(method=pipeline.method.name, sources=sources, executor=kind,
                    version=distmerge.__version__)
    m = pipeline.metrics              # bound before any work: a port in use is a ConfigError
    exporter = serve_metrics(events, host=m.host, port=m.port, linger_seconds=m.linger_seconds)
    started = False
    try:
        events.stage(State.VALIDATE.value)
        validated = validate(pipeline, events=events)    # fail fast, before starting Ray
        if not resume:
            refuse_staging(pipeline)
        if isinstance(executor, str):
            if executor == "ray":
                events.stage("ray")           # connecting to (or starting) Ray, timed apart
                started = ensure_ray(ray_address(pipeline), pipeline.resources.workers)
            executor = make_executor(pipeline, executor)
        session = _ray_session() if kind in ("ray", "RayExecutor") else ""
        if session:
            events.describe(method=pipeline.method.name, sources=sources, executor=kind,
                            version=distmerge.__version__, ray_session=session)
        return Run(pipeline, executor=executor, validated=validated, resume=resume,
                   events=events).execute()
    except BaseException as err:
        events.finish(error=err)          # a no-op when the run already recorded it
        raise
    finally:
        try:
            if started:
                import ray

                ray.shutdown()
        finally:
            if exporter is not None:
                exporter.close()          # after the final values were scraped (linger)


def _ray_session() -> str:
    """Ray's ``SessionName`` (a label of Ray's own metrics: the GPU panels pick the run's
    cluster by it), or "" when this process has no Ray."""
    import sys

    ray = sys.modules.get("ray")
    try:
        return ray.get_runtime_context().get_session_name() if ray and ray.is_initialized() else ""
    except Exception:  # noqa: BLE001 - a label only
        return ""
