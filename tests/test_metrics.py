"""The run's metrics: a real Prometheus scrapes a running local merge and reads its progress
to 100% through its HTTP API; the values a finished, failed or retried run exports (scraped
from the exporter itself); the exporter's life (a port in use is a ConfigError before any
work, it never outlives the run, the final values are scraped before it stops); the events
behind progress bars and metrics.

The helpers here (:class:`Prometheus`, :class:`GatedExecutor`, :class:`BackgroundRun`,
:func:`scrape`) are also used by ``tests/test_dashboard.py``."""

from __future__ import annotations

import json
import logging
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from distmerge.cli import main
from distmerge.config import load_pipeline
from distmerge.engine.driver import run_pipeline
from distmerge.engine.executors import LocalExecutor
from distmerge.engine.worker import Report
from distmerge.errors import ConfigError
from distmerge.metrics import STAGES, RunEvents, pass_label, serve_metrics, source_host
from tests.conftest import make_pipeline
from tests.tools import require

RUN = "metrics-test"


# -- helpers (shared with test_dashboard.py) ------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_is_closed(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) != 0


def wait_for(what: str, check, timeout: float = 60.0, every: float = 0.1):
    """Call ``check`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(every)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what} (last: {last!r})")


Samples = dict[tuple[str, frozenset], float]


def scrape(url: str) -> Samples:
    """Every sample the exporter at ``url`` serves: {(name, labels): value}."""
    with urllib.request.urlopen(url, timeout=10) as r:
        text = r.read().decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def value(samples: Samples, name: str, **labels: str) -> float | None:
    want = set(labels.items())
    found = [v for (n, ls), v in samples.items() if n == name and want <= ls]
    assert len(found) <= 1, (name, labels, found)
    return found[0] if found else None


def try_scrape(url: str) -> Samples | None:
    try:
        return scrape(url)
    except (urllib.error.URLError, ConnectionError, OSError):
        return None


class Prometheus:
    """A real Prometheus on 127.0.0.1 (free port, storage in ``folder``), scraping ``targets``
    every 0.5 s; started and always killed by the context manager."""

    def __init__(self, folder: Path, targets: list[str], *, rule_files: list[str] = (),
                 interval: str = "500ms"):
        self.binary = require("prometheus")
        self.folder = Path(folder)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.folder.mkdir(parents=True, exist_ok=True)
        self.config = self.folder / "prometheus.yml"
        self.config.write_text(yaml.safe_dump({
            "global": {"scrape_interval": interval, "scrape_timeout": interval,
                       "evaluation_interval": "1s"},
            "rule_files": [str(f) for f in rule_files],
            "scrape_configs": [{"job_name": "distmerge", "static_configs": [{"targets": targets}]}],
        }))
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> "Prometheus":
        self.log = open(self.folder / "prometheus.log", "wb")
        self.proc = subprocess.Popen(
            [self.binary, f"--config.file={self.config}", f"--storage.tsdb.path={self.folder / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}"],
            stdout=self.log, stderr=subprocess.STDOUT)
        try:
            wait_for("Prometheus to be ready", self._ready, timeout=60, every=0.2)
        except BaseException:
            self.__exit__()
            raise
        return self

    def _ready(self) -> bool:
        if self.proc.poll() is not None:
            pytest.fail("prometheus exited:\n" + (self.folder / "prometheus.log").read_text()[-3000:])
        try:
            with urllib.request.urlopen(self.url + "/-/ready", timeout=2) as r:
                return r.status == 200
        except (urllib.error.URLError, ConnectionError, OSError):
            return False

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=15)
        self.log.close()

    def api(self, path: str, **params: str) -> Any:
        """GET /api/v1/<path>; the ``data`` of a successful answer (an error fails the test)."""
        url = f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                body = json.load(r)
        except urllib.error.HTTPError as err:
            body = json.load(err)
        assert body.get("status") == "success", (params, body)
        return body["data"]

    def query(self, expr: str) -> list[dict]:
        """An instant query's result vector."""
        data = self.api("query", query=expr)
        assert data["resultType"] == "vector", data
        return data["result"]

    def scalar(self, expr: str) -> float | None:
        """The value of a query that returns at most one series."""
        result = self.query(expr)
        assert len(result) <= 1, result
        return float(result[0]["value"][1]) if result else None


class GatedExecutor(LocalExecutor):
    """The local executor, with hooks: the merge pass stops when half its slices are done
    (``midway`` set) until ``release`` is set; ``retry_once`` reports one failed, retried
    attempt per pass; ``fail_at`` raises at that merge slice (0-based count)."""

    def __init__(self, *, retry_once: bool = False, fail_at: int | None = None, gate: bool = True):
        super().__init__()
        self.midway = threading.Event()
        self.release = threading.Event()
        if not gate:
            self.release.set()
        self.retry_once = retry_once
        self.fail_at = fail_at

    def run(self, tasks, ctx, on_report, on_retry=None):
        merge = bool(tasks) and tasks[0].round is None
        if self.retry_once and tasks and on_retry is not None:
            on_retry(tasks[0], RuntimeError("simulated lost worker"))
        count = 0

        def report(task, rep):
            nonlocal count
            if merge and count == self.fail_at:
                raise RuntimeError(f"simulated failure of merge slice {count}")
            on_report(task, rep)
            count += 1
            if merge and count == len(tasks) // 2:
                self.midway.set()
                assert self.release.wait(180), "the test never released the merge pass"
        return super().run(tasks, ctx, report, on_retry)


class BackgroundRun:
    """``run_pipeline`` in a thread; ``join()`` returns its summary or raises its error."""

    def __init__(self, pipeline, executor):
        self.result = self.error = None
        self.thread = threading.Thread(target=self._main, args=(pipeline, executor), daemon=True)
        self.thread.start()

    def _main(self, pipeline, executor):
        try:
            self.result = run_pipeline(pipeline, executor=executor, show_progress=False)
        except BaseException as err:  # noqa: BLE001 - handed to join()
            self.error = err

    def join(self, timeout: float = 180):
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the run did not end"
        if self.error is not None:
            raise self.error
        return self.result


def metrics_pipeline(tmp_path: Path, models, *, port: int, linger: float = 30.0,
                     name: str = RUN, slice_size: str = "1KB", **changes):
    """A TIES (scope: model) pipeline: 2 statistics passes and the merge pass, many slices."""
    path = make_pipeline(tmp_path, models, name=name,
                         resources={"workers": 1, "slice_size": slice_size},
                         metrics={"port": port, "host": "127.0.0.1", "linger_seconds": linger},
                         **changes)
    return load_pipeline(path)


# -- a real Prometheus ----------------------------------------------------------------------
def test_prometheus_scrapes_a_running_merge_and_sees_it_reach_100_percent(tmp_path, tiny_models):
    port = free_port()
    sel = f'run="{RUN}"'
    with Prometheus(tmp_path / "prom", [f"127.0.0.1:{port}"]) as prom:
        executor = GatedExecutor()
        run = BackgroundRun(metrics_pipeline(tmp_path / "run", tiny_models, port=port), executor)
        try:
            assert executor.midway.wait(180), "the merge pass never got half way"
            # mid-run, through Prometheus: running, between 0 and 100%, with an ETA
            mid = wait_for("a mid-run scrape", lambda: prom.scalar(
                f'distmerge_progress_ratio{{{sel}}} > 0 < 1 '
                f'and ignoring (state) distmerge_run_state{{{sel},state="running"}} == 1'))
            assert 2 / 3 < mid < 1         # two statistics passes of three are done
            assert prom.scalar(f'distmerge_eta_seconds{{{sel}}}') > 0
            assert prom.scalar(f'distmerge_stage{{{sel},stage="merge"}}') == 1
        finally:
            executor.release.set()
        summary = run.join()
        assert port_is_closed(port)        # the exporter did not outlive the run
        # the final values were scraped before the exporter stopped (it lingers until then)
        done = wait_for("progress 1 in Prometheus", lambda: prom.scalar(
            f'max_over_time(distmerge_progress_ratio{{{sel}}}[5m]) == 1'), timeout=15)
        assert done == 1.0
        assert prom.scalar(f'last_over_time(distmerge_run_state{{{sel},state="succeeded"}}[5m])') == 1
        read = prom.scalar(f'sum(max_over_time(distmerge_read_bytes_total{{{sel}}}[5m]))')
        assert read == summary.bytes_read
        # the progress series went up step by step, as scraped
        rng = prom.api("query_range", query=f'distmerge_progress_ratio{{{sel}}}',
                       start=str(time.time() - 300), end=str(time.time()), step="0.5")
        values = [float(v) for _, v in rng["result"][0]["values"]]
        assert values == sorted(values) and values[-1] == 1.0 and any(0 < v < 1 for v in values)


# -- the exporter's values after a run -----------------------------------------------------------
def _scrape_when(url: str, state: str) -> Samples:
    return wait_for(f"the exporter to report {state}", lambda: (
        (s := try_scrape(url)) and value(s, "distmerge_run_state", state=state) == 1 and s))


def test_metric_values_of_a_finished_run(tmp_path, tiny_models):
    port = free_port()
    url = f"http://127.0.0.1:{port}/metrics"
    executor = GatedExecutor(retry_once=True, gate=False)
    run = BackgroundRun(metrics_pipeline(tmp_path, tiny_models, port=port), executor)
    s = _scrape_when(url, "succeeded")
    summary = run.join()
    assert port_is_closed(port)

    assert value(s, "distmerge_progress_ratio") == 1.0
    assert value(s, "distmerge_eta_seconds") == 0.0
    assert [value(s, "distmerge_run_state", state=x) for x in ("running", "succeeded", "failed")] == [0, 1, 0]
    assert all(value(s, "distmerge_stage", stage=x) == 0 for x in STAGES)
    info = next(dict(ls) for (n, ls) in s if n == "distmerge_run_info")
    assert (info["method"], info["experts"], info["executor"], info["ray_session"]) == ("ties", "3", "GatedExecutor", "")
    # every distmerge series carries the run's name
    assert all(dict(ls).get("run") == RUN for (n, ls) in s if n.startswith("distmerge_"))

    passes = ["stats1", "stats2", "merge"]
    for p in passes:
        total = value(s, "distmerge_pass_slices", **{"pass": p})
        assert total and value(s, "distmerge_slices_done_total", **{"pass": p}) == total
        assert value(s, "distmerge_slice_retries_total", **{"pass": p}) == 1
        assert value(s, "distmerge_slice_failures_total", **{"pass": p}) == 1
    assert value(s, "distmerge_pass_slices", **{"pass": "merge"}) == summary.slices
    assert summary.retries == len(passes)
    done = sum(value(s, "distmerge_slices_done_total", **{"pass": p}) for p in passes)
    assert value(s, "distmerge_worker_slices_done_total", worker="local") == done
    assert value(s, "distmerge_worker_peak_rss_bytes", worker="local") == summary.worker_peak_rss["local"]

    by_source = {x: value(s, "distmerge_read_bytes_total", source=x) for x in ("base", "expert0", "expert1", "expert2")}
    assert sum(by_source.values()) == summary.bytes_read > 0
    assert len(set(by_source.values())) == 1                 # same shapes and dtypes
    assert all(value(s, "distmerge_source_info", source=x, host="local") == 1 for x in by_source)
    assert value(s, "distmerge_written_bytes_total") == summary.bytes_written > 0
    for part in ("read", "compute", "write"):
        assert value(s, "distmerge_worker_seconds_total", part=part) == pytest.approx(summary.worker_seconds[part])
    for stage in STAGES:
        assert value(s, "distmerge_stage_duration_seconds", stage=stage) == summary.stage_seconds.get(stage, 0.0)
    assert value(s, "distmerge_run_elapsed_seconds") >= sum(summary.stage_seconds.values())
    assert value(s, "distmerge_run_start_time_seconds") <= time.time()


def test_a_failed_run_says_failed(tmp_path, tiny_models):
    port = free_port()
    url = f"http://127.0.0.1:{port}/metrics"
    executor = GatedExecutor(fail_at=3, gate=False)
    run = BackgroundRun(metrics_pipeline(tmp_path, tiny_models, port=port), executor)
    s = _scrape_when(url, "failed")
    with pytest.raises(RuntimeError, match="simulated failure"):
        run.join()
    assert port_is_closed(port)
    assert [value(s, "distmerge_run_state", state=x) for x in ("running", "succeeded", "failed")] == [0, 0, 1]
    assert value(s, "distmerge_slice_failures_total", **{"pass": "merge"}) == 1
    assert value(s, "distmerge_slice_retries_total", **{"pass": "merge"}) == 0
    assert value(s, "distmerge_slices_done_total", **{"pass": "merge"}) == 3
    assert 2 / 3 <= value(s, "distmerge_progress_ratio") < 1
    assert value(s, "distmerge_eta_seconds") is None           # unknown after a failure
    assert value(s, "distmerge_stage_duration_seconds", stage="merge") > 0
    assert not (tmp_path / "out").exists()


def test_a_run_failing_validation_is_exported_as_failed(tmp_path, tiny_models):
    port = free_port()
    url = f"http://127.0.0.1:{port}/metrics"
    pipe = metrics_pipeline(tmp_path, [tiny_models[0], tiny_models[1], tmp_path / "missing"], port=port)
    run = BackgroundRun(pipe, "local")
    s = _scrape_when(url, "failed")
    with pytest.raises(FileNotFoundError):
        run.join()
    assert value(s, "distmerge_progress_ratio") == 0
    assert value(s, "distmerge_stage_duration_seconds", stage="validate") > 0
    assert value(s, "distmerge_slice_failures_total") is None   # no pass started


# -- the exporter's life -------------------------------------------------------------------------
def test_a_port_in_use_is_a_config_error_before_any_work(tmp_path, tiny_models, capsys):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        pipe = metrics_pipeline(tmp_path, tiny_models, port=port)
        with pytest.raises(ConfigError, match=f"metrics: cannot serve on 127.0.0.1:{port}.*metrics.port"):
            run_pipeline(pipe, executor="local", show_progress=False)
        assert not (tmp_path / "out").exists()
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out") or "staging" in p.name]
        # the CLI: the same message, exit code 2
        path = make_pipeline(tmp_path, tiny_models, metrics={"host": "127.0.0.1"})
        assert main(["run", str(path), "--executor", "local", "--no-progress", "--metrics-port", str(port)]) == 2
        err = capsys.readouterr().err
        assert f"cannot serve on 127.0.0.1:{port}" in err and "--metrics-port" in err
    assert not (tmp_path / "out").exists()


def test_linger_ends_at_its_deadline_when_nobody_scrapes(tmp_path, tiny_models, caplog):
    pipe = metrics_pipeline(tmp_path, tiny_models, port=0, linger=0.5, slice_size="64KB",
                            method={"name": "linear"})
    caplog.set_level(logging.INFO, logger="distmerge")
    t0 = time.perf_counter()
    run_pipeline(pipe, executor="local", show_progress=False)
    took = time.perf_counter() - t0
    line = next(r.getMessage() for r in caplog.records if "metrics at http://" in r.getMessage())
    port = int(line.rsplit(":", 1)[1].split("/")[0])
    assert port_is_closed(port)
    assert any("until scraped once more (at most 0 s" in r.getMessage() or "at most 1 s" in r.getMessage()
               for r in caplog.records)
    assert took < 30


def test_no_linger_after_ctrl_c():
    ev = RunEvents("unit", show_progress=False)
    exporter = serve_metrics(ev, host="127.0.0.1", port=0, linger_seconds=60)
    ev.finish(error=KeyboardInterrupt())
    t0 = time.perf_counter()
    exporter.close()
    assert time.perf_counter() - t0 < 10 and port_is_closed(exporter.port)


def test_no_exporter_without_a_port(tmp_path, tiny_models):
    assert serve_metrics(RunEvents("x"), host="127.0.0.1", port=None) is None
    pipe = load_pipeline(make_pipeline(tmp_path, tiny_models))
    assert pipe.metrics.port is None and pipe.metrics.linger_seconds == 30


def test_the_metrics_port_comes_from_the_file_or_the_cli(tmp_path, tiny_models):
    path = make_pipeline(tmp_path, tiny_models, metrics={"port": 9400, "linger_seconds": 5})
    assert load_pipeline(path).metrics.port == 9400
    p = load_pipeline(path, metrics_port=9500)
    assert (p.metrics.port, p.metrics.linger_seconds, p.metrics.host) == (9500, 5, "0.0.0.0")
    assert load_pipeline(make_pipeline(tmp_path, tiny_models), metrics_port=0).metrics.port == 0
    for bad in ({"port": 70000}, {"port": -1}, {"prot": 9400}, {"linger_seconds": -1}):
        with pytest.raises(ConfigError, match="metrics"):
            load_pipeline(make_pipeline(tmp_path, tiny_models, metrics=bad))


# -- the events ------------------------------------------------------------------------------------
def _report(worker="w0", read=100, written=10, rss=1000) -> Report:
    return Report(slice=0, round=None, bytes_read=read, bytes_written=written, peak_rss=rss,
                  worker=worker, seconds={"read": 0.5, "compute": 0.25, "write": 0.125})


def _values(events: RunEvents) -> Samples:
    from prometheus_client import generate_latest

    return {(s.name, frozenset(s.labels.items())): s.value
            for fam in text_string_to_metric_families(generate_latest(events.metrics.registry).decode())
            for s in fam.samples}


def test_progress_over_passes_eta_and_the_end():
    ev = RunEvents("unit", show_progress=False)
    ev.describe(method="ties", sources=["/a/base", "s3://bucket/e0", "https://huggingface.co/x/e1"],
                executor="local")
    ev.set_passes(2)
    assert ev.eta() is None and ev.progress == 0
    ev.stage("stats")
    ev.pass_start("stats 1/1", 4)
    ev.slice_done(_report(), [50, 30, 20])
    assert ev.progress == 1 / 8 and ev.eta() is not None and ev.eta() >= 0
    for _ in range(3):
        ev.slice_done(_report(worker="w1", rss=500))
    ev.slice_failed()
    ev.pass_end()
    assert ev.progress == 0.5
    ev.stage("merge")
    ev.pass_start("merge", 0)                # nothing left to do (a resume)
    ev.pass_end()
    assert ev.progress == 1.0 and ev.eta() == 0.0
    ev.finish()
    ev.finish(error=RuntimeError("ignored: only the first call counts"))
    s = _values(ev)
    assert value(s, "distmerge_run_state", state="succeeded") == 1
    assert value(s, "distmerge_slices_done_total", **{"pass": "stats1"}) == 4
    assert value(s, "distmerge_slice_retries_total", **{"pass": "stats1"}) == 1
    assert value(s, "distmerge_pass_slices", **{"pass": "merge"}) == 0
    assert value(s, "distmerge_worker_slices_done_total", worker="w1") == 3
    assert value(s, "distmerge_worker_peak_rss_bytes", worker="w0") == 1000
    assert value(s, "distmerge_read_bytes_total", source="base") == 50 + 3 * 100   # no split: the base's
    assert value(s, "distmerge_read_bytes_total", source="expert1") == 20
    assert value(s, "distmerge_source_info", source="expert0", host="bucket") == 1
    assert value(s, "distmerge_source_info", source="expert1", host="huggingface.co") == 1
    assert value(s, "distmerge_worker_seconds_total", part="read") == 2.0
    assert value(s, "distmerge_stage_duration_seconds", stage="merge") == ev.stage_seconds["merge"]


def test_a_failure_during_a_pass_counts_as_a_failed_attempt():
    ev = RunEvents("unit", show_progress=False)
    ev.pass_start("stats 2/3", 10)
    ev.slice_done(_report())
    ev.finish(error=RuntimeError("boom"))
    s = _values(ev)
    assert value(s, "distmerge_slice_failures_total", **{"pass": "stats2"}) == 1
    assert value(s, "distmerge_run_state", state="failed") == 1
    assert value(s, "distmerge_progress_ratio") == 0.1 and ev.eta() is None
    ev2 = RunEvents("unit", show_progress=False)
    ev2.pass_start("merge", 10)
    ev2.finish(error=KeyboardInterrupt())      # Ctrl-C: failed, but not a slice's failure
    assert value(_values(ev2), "distmerge_slice_failures_total", **{"pass": "merge"}) == 0


def test_labels_stay_few():
    assert [pass_label(x) for x in ("stats 1/3", "stats 3/3", "merge")] == ["stats1", "stats3", "merge"]
    assert source_host("/data/models/expert") == "local"
    assert source_host("s3://my-bucket/path/to/model") == "my-bucket"
    assert source_host("https://user:secret@host.example:8443/x") == "host.example"
    assert source_host("hf://org/model") == "huggingface.co"
    assert source_host("file:///data/m") == "local"
