"""Every metric and every progress event of a run, in one place.

The driver calls :class:`RunEvents`; it feeds both the progress display for people (a tqdm bar
on a terminal, a log line every 10% otherwise) and the Prometheus metrics for machines. The
metrics live in a per-run ``CollectorRegistry`` (no process-global state); every one is named
``distmerge_*`` and carries the label ``run`` (the pipeline's ``name``), so two runs scraped by
one Prometheus never mix.

Why the driver exports them (``prometheus-client``), not the workers through Ray's metric API:

- the driver sees every slice report, so it counts exactly (a retried slice is counted once
  done, a dead worker's slice is not lost); Ray's metrics are sampled per worker process and
  aggregated by Ray's agents, and an actor that dies takes its last values with it;
- one endpoint gives the whole run, with nothing to join: workers come and go, the driver lives
  as long as the run, and its state machine knows the stage, the passes and the run's outcome;
- it works the same with the in-process executor (tests, one machine) and with no Ray metrics
  pipeline configured; on Kubernetes a PodMonitor scrapes one port of the driver's pod;
- workers only report small numbers (bytes, seconds, peak RSS) that the driver already
  receives, so no extra traffic. What only the node sees (GPU use) stays with Ray's own
  exporter (``ray_node_gpus_utilization``...); ``distmerge_run_info`` carries the Ray session
  name so a dashboard can pick the run's cluster.

The exporter (:func:`serve_metrics`, ``metrics: {port, host, linger_seconds}`` in the pipeline,
``distmerge run --metrics-port``) is bound before any work starts, so a port in use is a
:class:`~distmerge.errors.ConfigError`, never a merge dying later. It is stopped at the end of
the run (it never outlives :func:`~distmerge.engine.driver.run_pipeline`), after lingering until
the final values (progress 1, state ``succeeded`` or ``failed``) were scraped once, or at most
``linger_seconds`` (default 30 s, above the usual 15-30 s scrape intervals; no linger after
Ctrl-C); without it a run shorter than a scrape interval, or its last seconds (100%, or the
failure), would never be seen. ``port: 0`` takes any free port (logged).

Metrics (labels besides ``run`` in brackets):

========================================  ======================================================
``distmerge_run_info`` [method, experts,  1; the run's description (``ray_session`` is Ray's
executor, version, ray_session]           ``SessionName``, empty without Ray)
``distmerge_run_state`` [state]           1 for the run's state: running, succeeded, failed
``distmerge_run_start_time_seconds``      Unix time the run started
``distmerge_run_elapsed_seconds``         seconds since the start (frozen at the end)
``distmerge_progress_ratio``              0..1 over all passes (slices done / slices); exactly
                                          1 once the merge pass ends
``distmerge_eta_seconds``                 estimated seconds left: time since the first pass
                                          started × (1 − p) / p; absent until p > 0 and after
                                          a failure, 0 at 1
``distmerge_stage`` [stage]               1 for the stage the run is in (validate, plan,
                                          resume, stats, merge, gather, publish)
``distmerge_stage_duration_seconds``      seconds spent in each stage, growing while in it
[stage]
``distmerge_pass_slices`` [pass]          slices of a pass (``stats1``.. ``statsN``, ``merge``;
                                          after a resume, those left to do)
``distmerge_slices_done_total`` [pass]    slices finished
``distmerge_slice_failures_total``        slice attempts that failed (retried or not)
[pass]
``distmerge_slice_retries_total`` [pass]  failed attempts tried again
``distmerge_read_bytes_total`` [source]   tensor bytes read from storage, by ``base``,
                                          ``expert0``.. (``extra0``..: a method's own source,
                                          e.g. frank_wolfe's gradient; blocks a worker kept
                                          in memory between passes are not counted)
``distmerge_source_info`` [source, host]  1; where each source is (URL host, bucket, ``local``)
``distmerge_written_bytes_total``         tensor bytes written
``distmerge_worker_slices_done_total``    slices finished by each worker
[worker]
``distmerge_worker_peak_rss_bytes``       peak resident memory of each worker process
[worker]
``distmerge_worker_seconds_total`` [part] worker seconds spent reading, computing, writing
``distmerge_fw_iteration``                frank_wolfe: the last finished iteration (0-based)
``distmerge_fw_objective``                frank_wolfe: the objective at that iteration's model
``distmerge_fw_gap``                      frank_wolfe: that iteration's Frank-Wolfe gap
``distmerge_fw_step``                     frank_wolfe: that iteration's step γ_t
========================================  ======================================================

Throughput is left to PromQL (``rate(distmerge_read_bytes_total[1m])``): the window is the
reader's choice, and counters survive scrapes missed. The dashboard
(``deploy/grafana/distmerge.json``) and alert rules (``deploy/prometheus/alerts.yaml``) use
these names; a test checks each name against a live scrape.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import TYPE_CHECKING, Iterable
from urllib.parse import urlsplit

from prometheus_client import CollectorRegistry, Counter, Gauge, Info
from prometheus_client.core import GaugeMetricFamily

from distmerge.errors import ConfigError

if TYPE_CHECKING:
    from distmerge.engine.worker import Report

log = logging.getLogger("distmerge")

STAGES = ("validate", "convert", "ray", "plan", "resume", "stats", "merge", "gather", "publish")
STATES = ("running", "succeeded", "failed")
WORKER_PARTS = ("read", "compute", "write")


class _RunRegistry(CollectorRegistry):
    """A run's registry that counts the scrapes which began after the run ended: those saw
    the final values (every metric is updated before ``finished`` is set)."""

    def __init__(self, events: "RunEvents"):
        super().__init__()
        self._events = events
        self.final_scrapes = 0

    def collect(self):
        final = self._events.finished
        yield from super().collect()
        if final:
            self.final_scrapes += 1


class _Live:
    """Values that depend on the clock, computed at scrape time."""

    def __init__(self, events: "RunEvents"):
        self.events = events

    def describe(self):
        return []          # registered without a name check; nothing else uses these names

    def collect(self):
        e, run = self.events, self.events.run
        elapsed = GaugeMetricFamily("distmerge_run_elapsed_seconds",
                                    "Seconds since the run started (frozen at its end)", labels=["run"])
        elapsed.add_metric([run], e.elapsed())
        stages = GaugeMetricFamily("distmerge_stage_duration_seconds",
                                   "Seconds spent in each stage (growing while in it)", labels=["run", "stage"])
        for s, v in e.stage_durations().items():
            stages.add_metric([run, s], v)
        eta = GaugeMetricFamily("distmerge_eta_seconds",
                                "Estimated seconds left: time since the first pass started x (1 - p) / p "
                                "for progress p (absent until a slice is done, and after a failure)", labels=["run"])
        left = e.eta()
        if left is not None:
            eta.add_metric([run], left)
        return [elapsed, stages, eta]


class RunMetrics:
    """The Prometheus metrics of one run, in their own registry."""

    def __init__(self, run: str, events: "RunEvents"):
        self.run = run
        self.registry = r = _RunRegistry(events)
        L = ["run"]
        self.info = Info("distmerge_run", "The run's description (1)", L, registry=r)
        self.state = Gauge("distmerge_run_state", "1 for the run's state: running, succeeded or failed",
                           L + ["state"], registry=r)
        self.start_time = Gauge("distmerge_run_start_time_seconds", "Unix time the run started", L, registry=r)
        self.progress = Gauge("distmerge_progress_ratio",
                              "Fraction of the run's slices done over all passes (0..1; exactly 1 at the end)",
                              L, registry=r)
        self.stage = Gauge("distmerge_stage", "1 for the stage the run is in", L + ["stage"], registry=r)
        self.pass_slices = Gauge("distmerge_pass_slices", "Slices of each pass (stats1..statsN, merge)",
                                 L + ["pass"], registry=r)
        self.slices_done = Counter("distmerge_slices_done", "Slices finished", L + ["pass"], registry=r)
        self.slice_failures = Counter("distmerge_slice_failures",
                                      "Slice attempts that failed (retried or not)", L + ["pass"], registry=r)
        self.slice_retries = Counter("distmerge_slice_retries", "Failed slice attempts tried again",
                                     L + ["pass"], registry=r)
        self.read_bytes = Counter("distmerge_read_bytes", "Tensor bytes read, by source (base, expertN)",
                                  L + ["source"], registry=r)
        self.source_info = Gauge("distmerge_source_info", "1; where each source's bytes are: URL host, bucket or local",
                                 L + ["source", "host"], registry=r)
        self.written_bytes = Counter("distmerge_written_bytes", "Tensor bytes written", L, registry=r)
        self.worker_slices = Counter("distmerge_worker_slices_done", "Slices finished by each worker",
                                     L + ["worker"], registry=r)
        self.worker_rss = Gauge("distmerge_worker_peak_rss_bytes", "Peak resident memory of each worker process",
                                L + ["worker"], registry=r)
        self.worker_seconds = Counter("distmerge_worker_seconds",
                                      "Worker seconds spent reading, computing and writing slices",
                                      L + ["part"], registry=r)
        self.fw_iteration = Gauge("distmerge_fw_iteration", "frank_wolfe: the last finished iteration",
                                  L, registry=r)
        self.fw_objective = Gauge("distmerge_fw_objective",
                                  "frank_wolfe: the objective at the last iteration's model", L, registry=r)
        self.fw_gap = Gauge("distmerge_fw_gap", "frank_wolfe: the last iteration's Frank-Wolfe gap",
                            L, registry=r)
        self.fw_step = Gauge("distmerge_fw_step", "frank_wolfe: the last iteration's step size", L, registry=r)
        r.register(_Live(events))
        # every series a dashboard or alert reads exists from the start, at 0
        for s in STATES:
            self.state.labels(run, s).set(1 if s == "running" else 0)
        for s in STAGES:
            self.stage.labels(run, s).set(0)
        for p in WORKER_PARTS:
            self.worker_seconds.labels(run, p)
        self.written_bytes.labels(run)
        self.progress.labels(run).set(0)
        self.start_time.labels(run).set(time.time())


def pass_label(label: str) -> str:
    """The ``pass`` label of a pass shown to people as ``label``: ``"stats 2/3"`` → ``stats2``."""
    return label.split("/", 1)[0].replace(" ", "")


_SCHEME_HOSTS = {"hf": "huggingface.co", "file": "local"}


def source_host(url: str) -> str:
    """Where a model's bytes come from, for a label: ``local`` for a path, the host of an
    http(s) URL, the bucket of an object store URL (``s3://bucket/...``), ``huggingface.co``
    for ``hf://`` (never the path or credentials: labels stay few and safe)."""
    if "://" not in url:
        return "local"
    parts = urlsplit(url)
    if parts.scheme in _SCHEME_HOSTS:
        return _SCHEME_HOSTS[parts.scheme]
    return parts.hostname or parts.scheme or "local"


class RunEvents:
    """Progress events of one run → progress display and metrics."""

    def __init__(self, run: str, *, show_progress: bool = True):
        self.run = run
        self.show_progress = show_progress
        self.finished = False
        self.interrupted = False                     # ended by Ctrl-C: no linger
        self.state = "running"
        self._t0 = time.perf_counter()
        self._t_end: float | None = None
        self._work_start: float | None = None      # the first pass's start, for the ETA
        self._bar = None
        self._stage: str | None = None
        self._stage_start = 0.0
        self._passes_total = 1
        self._passes_done = 0
        self._label = ""
        self._pass: str | None = None                # the open pass's metric label
        self._done = 0
        self._total = 0
        self._next_log = 0.1
        self._frac = 0.0
        self._sources: list[str] = []
        self._peak_rss: dict[str, int] = {}
        self.stage_seconds: dict[str, float] = {}
        self.metrics = RunMetrics(run, self)

    # -- what the driver reports -------------------------------------------------------------
    def describe(self, *, method: str, sources: Iterable[str], executor: str,
                 version: str = "", ray_session: str = "") -> None:
        """The run's description (``distmerge_run_info``) and its sources: the base's URL first,
        then the experts'."""
        urls = list(sources)
        self._sources = ["base"] + [f"expert{i}" for i in range(len(urls) - 1)]
        self.metrics.info.labels(self.run).info({
            "method": method, "experts": str(max(0, len(urls) - 1)), "executor": executor,
            "version": version, "ray_session": ray_session,
        })
        for name, url in zip(self._sources, urls):
            self.metrics.source_info.labels(self.run, name, source_host(url)).set(1)
            self.metrics.read_bytes.labels(self.run, name)

    def set_passes(self, n: int) -> None:
        self._passes_total = max(1, n)

    def stage(self, name: str) -> None:
        if name == self._stage:
            return
        self._end_stage()
        self._stage = name
        self._stage_start = time.perf_counter()
        for s in STAGES:
            self.metrics.stage.labels(self.run, s).set(1 if s == name else 0)
        log.info("%s: %s", self.run, name)

    def _end_stage(self) -> None:
        if self._stage is not None:
            dt = time.perf_counter() - self._stage_start
            self.stage_seconds[self._stage] = self.stage_seconds.get(self._stage, 0.0) + dt
            self._stage = None

    def pass_start(self, label: str, total: int) -> None:
        self._close_bar()
        if self._work_start is None:
            self._work_start = time.perf_counter()
        self._done, self._total, self._next_log = 0, total, 0.1
        self._label = label
        self._pass = p = pass_label(label)
        m = self.metrics
        m.pass_slices.labels(self.run, p).set(total)
        for c in (m.slices_done, m.slice_failures, m.slice_retries):
            c.labels(self.run, p)
        if self.show_progress and sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=label, unit="slice", leave=True)

    def slice_done(self, report: "Report", read_by_source: Iterable[int] | None = None) -> None:
        """A slice finished. ``read_by_source``: its bytes read from storage from each source
        (base first, then the experts, then sources a method adds, e.g. frank_wolfe's gradient,
        counted as ``extra0``...); without it, all of ``report.bytes_read`` counts as the
        base's."""
        m, run = self.metrics, self.run
        m.slices_done.labels(run, self._pass or "").inc()
        split = list(read_by_source) if read_by_source is not None else [report.bytes_read]
        names = self._sources or ["base"]
        for i, n in enumerate(split):
            if n:
                name = names[i] if i < len(names) else f"extra{i - len(names)}"
                m.read_bytes.labels(run, name).inc(n)
        m.written_bytes.labels(run).inc(report.bytes_written)
        worker = report.worker or "unknown"
        m.worker_slices.labels(run, worker).inc()
        self._peak_rss[worker] = max(self._peak_rss.get(worker, 0), report.peak_rss)
        m.worker_rss.labels(run, worker).set(self._peak_rss[worker])
        for part, sec in report.seconds.items():
            m.worker_seconds.labels(run, part).inc(max(0.0, sec))
        self._done += 1
        self._set_progress(self._passes_done + min(1.0, self._done / max(1, self._total)))
        if self._bar is not None:
            self._bar.update(1)
        elif self.show_progress and self._done / max(1, self._total) >= self._next_log:
            log.info("%s: %s %d/%d slices (%.0f%% of the run)", self.run, self._label,
                     self._done, self._total, 100 * self._frac)
            while self._next_log <= self._done / max(1, self._total):
                self._next_log += 0.1

    def fw_iteration(self, record: dict) -> None:
        """A Frank-Wolfe iteration finished (:mod:`distmerge.select`): its trace record."""
        m, run = self.metrics, self.run
        m.fw_iteration.labels(run).set(record["iteration"])
        m.fw_objective.labels(run).set(record["objective"])
        m.fw_gap.labels(run).set(record["fw_gap"])
        m.fw_step.labels(run).set(record["step"])

    def slice_failed(self) -> None:
        """A slice attempt failed and will be tried again."""
        p = self._pass or ""
        self.metrics.slice_failures.labels(self.run, p).inc()
        self.metrics.slice_retries.labels(self.run, p).inc()

    def pass_end(self) -> None:
        self._passes_done += 1
        self._pass = None
        self._set_progress(self._passes_done)
        self._close_bar()

    def finish(self, *, error: BaseException | None = None) -> None:
        """The run ended: it succeeded without ``error``. Only the first call counts. An
        ``Exception`` while a pass was open counts as that pass's last failed slice attempt."""
        if self.finished:
            return
        m = self.metrics
        self._end_stage()
        self._close_bar()
        if error is None:
            self._set_progress(self._passes_total)         # exactly 1
        elif self._pass is not None and isinstance(error, Exception):
            m.slice_failures.labels(self.run, self._pass).inc()
        for s in STAGES:
            m.stage.labels(self.run, s).set(0)
        self.state = "succeeded" if error is None else "failed"
        self.interrupted = isinstance(error, KeyboardInterrupt)
        for s in STATES:
            m.state.labels(self.run, s).set(1 if s == self.state else 0)
        self._t_end = time.perf_counter()
        self.finished = True                               # last: see _RunRegistry

    # -- derived values ------------------------------------------------------------------------
    def _set_progress(self, passes: float) -> None:
        self._frac = min(1.0, passes / self._passes_total)
        self.metrics.progress.labels(self.run).set(self._frac)

    @property
    def progress(self) -> float:
        return self._frac

    def elapsed(self) -> float:
        return (self._t_end if self._t_end is not None else time.perf_counter()) - self._t0

    def stage_durations(self) -> dict[str, float]:
        out = {s: self.stage_seconds.get(s, 0.0) for s in STAGES}
        stage, start = self._stage, self._stage_start      # one consistent read
        if stage is not None:
            out[stage] = out.get(stage, 0.0) + time.perf_counter() - start
        return out

    def eta(self) -> float | None:
        """Seconds left (None while unknown: before a slice is done, or after a failure)."""
        p = self._frac
        if p >= 1.0:
            return 0.0
        if self.state == "failed" or p <= 0.0 or self._work_start is None:
            return None
        return (time.perf_counter() - self._work_start) * (1.0 - p) / p

    def _close_bar(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


class MetricsExporter:
    """The HTTP endpoint serving one run's metrics (``/metrics``, any path), in a thread."""

    def __init__(self, events: RunEvents, *, host: str, port: int, linger_seconds: float = 0.0):
        from prometheus_client import start_http_server

        self.events = events
        self.linger_seconds = linger_seconds
        try:
            self._server, self._thread = start_http_server(port, addr=host, registry=events.metrics.registry)
        except OSError as err:
            raise ConfigError(
                f"metrics: cannot serve on {host}:{port} ({err.strerror or err}): choose another "
                f"metrics.port (or --metrics-port; 0 takes any free port), or stop what uses it"
            ) from None
        self.host = host
        self.port = int(self._server.server_port)
        self._closed = False

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}/metrics"

    def close(self) -> None:
        """Stop serving; after the run ended, first wait until its final values were scraped
        once (or ``linger_seconds``); not after Ctrl-C, and Ctrl-C cuts the wait short."""
        if self._closed:
            return
        self._closed = True
        registry = self.events.metrics.registry
        try:
            ev = self.events
            if ev.finished and not ev.interrupted and self.linger_seconds > 0 and registry.final_scrapes == 0:
                log.info("%s: metrics stay up at %s until scraped once more (at most %.0f s; "
                         "metrics.linger_seconds)", self.events.run, self.url, self.linger_seconds)
                deadline = time.monotonic() + self.linger_seconds
                while registry.final_scrapes == 0 and time.monotonic() < deadline:
                    time.sleep(0.05)
                if registry.final_scrapes:
                    time.sleep(min(0.5, max(0.0, deadline - time.monotonic())))  # let the reply go out
        except KeyboardInterrupt:
            pass
        finally:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(timeout=5)

    def __enter__(self) -> "MetricsExporter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def serve_metrics(events: RunEvents, *, host: str, port: int | None,
                  linger_seconds: float = 0.0) -> MetricsExporter | None:
    """Start exporting ``events``' metrics on ``host:port`` (None: not at all; 0: any free
    port). Call ``close()`` at the end of the run.

    Raises:
        ConfigError: the address cannot be bound (port in use, unknown host).
    """
    if port is None:
        return None
    exporter = MetricsExporter(events, host=host, port=port, linger_seconds=linger_seconds)
    log.info("%s: metrics at %s", events.run, exporter.url)
    return exporter

