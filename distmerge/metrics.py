"""Every metric and every progress event of a run, in one place.

The driver calls :class:`RunEvents`; it feeds both the progress display for people (a tqdm bar
on a terminal, a log line every 10% otherwise) and the Prometheus metrics for machines. The
metrics live in a per-run ``CollectorRegistry`` (no process-global state) labelled with the run
name, and are exported by the driver with ``prometheus-client``: the driver sees every slice
report, so it can count exactly, and a scrape of one endpoint gives the whole run (worker
processes come and go; the driver lives as long as the run).
"""

from __future__ import annotations

import logging
import sys
import time
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge

if TYPE_CHECKING:
    from distmerge.engine.worker import Report

log = logging.getLogger("distmerge")

STAGES = ("validate", "plan", "resume", "stats", "merge", "gather", "publish")


class RunMetrics:
    def __init__(self, run: str):
        self.run = run
        self.registry = CollectorRegistry()
        r = self.registry
        self.slices_total = Gauge("distmerge_slices_total", "Slices to process in the current pass", ["run", "stage"], registry=r)
        self.slices_done = Counter("distmerge_slices_done", "Slices finished", ["run", "stage"], registry=r)
        self.slices_failed = Counter("distmerge_slices_failed", "Slice attempts that failed", ["run"], registry=r)
        self.bytes_read = Counter("distmerge_read_bytes", "Bytes of tensor data read", ["run"], registry=r)
        self.bytes_written = Counter("distmerge_written_bytes", "Bytes of tensor data written", ["run"], registry=r)
        self.stage = Gauge("distmerge_stage", "1 for the stage the run is in", ["run", "stage"], registry=r)
        self.stage_seconds = Gauge("distmerge_stage_seconds", "Seconds spent in each stage", ["run", "stage"], registry=r)
        self.progress = Gauge("distmerge_progress_ratio", "Fraction of all passes done (0..1)", ["run"], registry=r)
        self.worker_rss = Gauge("distmerge_worker_peak_rss_bytes", "Peak resident memory of each worker", ["run", "worker"], registry=r)


class RunEvents:
    """Progress events of one run → progress display and metrics."""

    def __init__(self, run: str, *, show_progress: bool = True):
        self.metrics = RunMetrics(run)
        self.run = run
        self.show_progress = show_progress
        self._bar = None
        self._stage: str | None = None
        self._stage_start = 0.0
        self._passes_total = 1
        self._passes_done = 0
        self._done = 0
        self._total = 0
        self._next_log = 0.1
        self.stage_seconds: dict[str, float] = {}

    def set_passes(self, n: int) -> None:
        self._passes_total = max(1, n)

    def stage(self, name: str) -> None:
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
            self.metrics.stage_seconds.labels(self.run, self._stage).set(self.stage_seconds[self._stage])

    def pass_start(self, label: str, total: int) -> None:
        self._close_bar()
        self._done, self._total, self._next_log = 0, total, 0.1
        self.metrics.slices_total.labels(self.run, label).set(total)
        self._label = label
        if self.show_progress and sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=label, unit="slice", leave=True)

    def slice_done(self, report: "Report") -> None:
        m = self.metrics
        m.slices_done.labels(self.run, self._label).inc()
        m.bytes_read.labels(self.run).inc(report.bytes_read)
        m.bytes_written.labels(self.run).inc(report.bytes_written)
        m.worker_rss.labels(self.run, report.worker).set(report.peak_rss)
        self._done += 1
        frac = min(1.0, (self._passes_done + min(1.0, self._done / max(1, self._total))) / self._passes_total)
        m.progress.labels(self.run).set(frac)
        if self._bar is not None:
            self._bar.update(1)
        elif self.show_progress and self._done / max(1, self._total) >= self._next_log:
            log.info("%s: %s %d/%d slices (%.0f%% of the run)", self.run, self._label,
                     self._done, self._total, 100 * frac)
            while self._next_log <= self._done / max(1, self._total):
                self._next_log += 0.1

    def slice_failed(self) -> None:
        self.metrics.slices_failed.labels(self.run).inc()

    def pass_end(self) -> None:
        self._passes_done += 1
        self._close_bar()

    def _close_bar(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def finish(self) -> None:
        self._end_stage()
        self._stage = None
        self._close_bar()
        for s in STAGES:
            self.metrics.stage.labels(self.run, s).set(0)
