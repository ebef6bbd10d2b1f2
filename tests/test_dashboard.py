"""The Grafana dashboard and the Prometheus rules and scrape config under deploy/.

Every PromQL expression (dashboard panels, template variables, alert rules) is parsed by the
real Prometheus (``/api/v1/format_query``), its metric names are taken from the canonical text,
and each ``distmerge_*`` name must be one a live exporter serves, scraped from a running merge,
never from a list typed here. The dashboard's own expressions are then evaluated by a
Prometheus that is scraping that run and must return data, and the alert rules, loaded in the
same Prometheus, must evaluate without error. ``promtool check rules`` / ``check config`` pass,
and ``promtool test rules`` shows each alert firing when it should and not otherwise."""

from __future__ import annotations

import copy
import json
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.test_metrics import (
    BackgroundRun,
    GatedExecutor,
    Prometheus,
    free_port,
    metrics_pipeline,
    scrape,
    wait_for,
)
from tests.tools import require

REPO = Path(__file__).resolve().parents[1]
DASHBOARD = REPO / "deploy" / "grafana" / "distmerge.json"
ALERTS = REPO / "deploy" / "prometheus" / "alerts.yaml"
SCRAPE = REPO / "deploy" / "prometheus" / "scrape.yaml"
RUN = "dash-run"
# Ray's node metrics the GPU panels read (Ray's own names; Ray exports them, not distmerge)
RAY_METRICS = {"ray_node_gpus_utilization", "ray_node_gram_used"}


# -- collecting the expressions ----------------------------------------------------------------------
def _panels(panels: list[dict]) -> list[dict]:
    out = []
    for p in panels:
        out.append(p)
        out.extend(_panels(p.get("panels", [])))       # collapsed rows hold their panels
    return out


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def dashboard_exprs() -> list[tuple[str, str]]:
    """(where, expr) of every panel target."""
    return [(f"panel {p['title']!r} {t['refId']}", t["expr"])
            for p in _panels(dashboard()["panels"]) for t in p.get("targets", []) if t.get("expr")]


LABEL_VALUES = re.compile(r"^\s*label_values\(\s*(?P<selector>.+?)\s*,\s*(?P<label>[A-Za-z_]\w*)\s*\)\s*$")


def variable_exprs() -> list[tuple[str, str, str]]:
    """(name, selector, label) of every query variable (``label_values(selector, label)``)."""
    out = []
    for v in dashboard()["templating"]["list"]:
        if v["type"] != "query":
            continue
        q = v["query"]["query"] if isinstance(v["query"], dict) else v["query"]
        m = LABEL_VALUES.match(q)
        assert m, f"variable {v['name']}: expected label_values(selector, label), got {q!r}"
        out.append((v["name"], m["selector"], m["label"]))
    return out


def rule_exprs() -> list[tuple[str, str]]:
    rules = yaml.safe_load(ALERTS.read_text())
    return [(f"rule {r.get('alert') or r.get('record')}", r["expr"])
            for g in rules["groups"] for r in g["rules"]]


GRAFANA_VARS = {"__rate_interval": "1m", "__interval": "30s", "__range": "5m", "ray_session": ".*"}


def substitute(expr: str, run: str) -> str:
    """Grafana's variables replaced as Grafana would for one selected run."""
    values = {**GRAFANA_VARS, "run": run}     # run names: letters, digits, ".", "_", "-"

    def one(m: re.Match) -> str:
        name = m["name"] or m["bare"]
        assert name in values, f"unknown dashboard variable ${name} in {expr!r}"
        return values[name]
    return re.sub(r"\$\{(?P<name>\w+)(?::\w+)?\}|\$(?P<bare>\w+)", one, expr)


# -- metric names out of canonical PromQL --------------------------------------------------------------
_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or",
             "unless", "offset", "atan2", "inf", "nan", "start", "end"}


def metric_names(promql: str) -> set[str]:
    """The metric names a (Prometheus-formatted) expression selects: identifiers that are not
    function or aggregation calls, keywords, label names of matchers or groupings, durations
    or numbers."""
    s = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`', '""', promql)   # strings
    s = re.sub(r"\{[^}]*\}", "{}", s)                                              # label matchers
    s = re.sub(r"\[[^\]]*\]", "[]", s)                                             # ranges, subqueries
    s = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", s)  # label lists
    names = set()
    for m in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", s):
        if m.start() and (s[m.start() - 1].isdigit() or s[m.start() - 1] == "."):
            continue                                                               # 1e3, 5m, 0.5
        if s[m.end():].lstrip().startswith("(") or m[0].lower() in _KEYWORDS:
            continue
        names.add(m[0])
    return names


def test_metric_names_are_read_out_of_promql():
    assert metric_names('sum by (run, source) (rate(a_total{run=~"x|y"}[1m:10s]))') == {"a_total"}
    assert metric_names("(p <= p offset 15m) and p < 1 and ignoring (state) s{state=\"r\"} == 1") == {"p", "s"}
    assert metric_names("x * on (run, source) group_left (host) max by (run) (info) * 1e3") == {"x", "info"}
    assert metric_names('label_replace(up, "a", "$1", "b", "(.*)") unless bool up2') == {"up", "up2"}


# -- the dashboard -----------------------------------------------------------------------------------
def test_dashboard_has_a_stable_uid_a_datasource_and_a_run_selector():
    d = dashboard()
    assert d["uid"] == "distmerge-run" and d["id"] is None and d["title"]
    variables = {v["name"]: v for v in d["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    run = variables["run"]
    assert run["type"] == "query" and run["datasource"]["uid"] == "${datasource}"
    name, selector, label = next(v for v in variable_exprs() if v[0] == "run")
    assert label == "run" and selector.startswith("distmerge_")
    panels = [p for p in _panels(d["panels"]) if p["type"] != "row"]
    assert len({p["id"] for p in _panels(d["panels"])}) == len(_panels(d["panels"]))
    for p in panels:
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        assert p["targets"] and all(t["datasource"]["uid"] == "${datasource}" for t in p["targets"])
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24, p["title"]
        for t in p["targets"]:
            if "distmerge_" in t["expr"]:
                assert 'run=~"$run"' in t["expr"], (p["title"], t["expr"])   # every query follows the selector


def test_dashboard_has_the_panels_people_look_for():
    panels = [p for p in _panels(dashboard()["panels"]) if p["type"] != "row"]

    def exprs_of(word: str) -> str:
        found = [p for p in panels if word.lower() in p["title"].lower()]
        assert found, f"no panel about {word!r}"
        return " ".join(t["expr"] for p in found for t in p["targets"])
    assert "distmerge_progress_ratio" in exprs_of("progress")
    assert "distmerge_eta_seconds" in exprs_of("ETA")
    assert "rate(distmerge_read_bytes_total" in exprs_of("read throughput")
    assert "rate(distmerge_written_bytes_total" in exprs_of("write throughput")
    assert "distmerge_worker_slices_done_total" in exprs_of("per worker")
    retries = exprs_of("retries")
    assert "distmerge_slice_retries_total" in retries and "distmerge_slice_failures_total" in retries
    assert "distmerge_stage_duration_seconds" in exprs_of("stage durations")
    assert "distmerge_worker_peak_rss_bytes" in exprs_of("memory")
    gpu = [p for p in panels if "gpu" in p["title"].lower()]
    assert gpu and "ray_node_gpus_utilization" in " ".join(t["expr"] for p in gpu for t in p["targets"])
    for p in gpu:
        assert "Ray's metrics export" in p["description"], p["title"]


# -- promtool ----------------------------------------------------------------------------------------
def _promtool(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([require("promtool"), *args], capture_output=True, text=True, timeout=120, cwd=cwd)


def test_alert_rules_pass_promtool_check():
    proc = _promtool("check", "rules", str(ALERTS))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    names = {where.split()[1] for where, _ in rule_exprs()}
    assert {"DistmergeRunStalled", "DistmergeRunFailed", "DistmergeSlicesFailing"} <= names


def test_scrape_config_passes_promtool_check():
    proc = _promtool("check", "config", SCRAPE.name, cwd=SCRAPE.parent)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout


def test_alerts_fire_when_they_should(tmp_path):
    """promtool's rule unit tests over synthetic series. Annotations are left out of the copy
    of the rules under test (promtool compares them verbatim); the expressions are the same."""
    rules = yaml.safe_load(ALERTS.read_text())
    bare = copy.deepcopy(rules)
    for g in bare["groups"]:
        for r in g["rules"]:
            r.pop("annotations", None)
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(bare))
    L = 'instance="a",job="distmerge"'

    def series(name: str, labels: str, values: str) -> dict:
        return {"series": f"{name}{{{labels},{L}}}", "values": values}

    def alert(at: str, name: str, *expected: dict) -> dict:
        return {"eval_time": at, "alertname": name,
                "exp_alerts": [{"exp_labels": {"instance": "a", **e}} for e in expected]}

    test = {
        "rule_files": ["rules.yaml"],
        "evaluation_interval": "1m",
        "tests": [{
            "interval": "1m",
            "input_series": [
                # stuck at 40% from minute 4, still running
                series("distmerge_progress_ratio", 'run="stuck"', "0 0.1 0.2 0.3 0.4x40"),
                series("distmerge_run_state", 'run="stuck",state="running"', "1x44"),
                # steadily moving
                series("distmerge_progress_ratio", 'run="moving"', "0+0.02x44"),
                series("distmerge_run_state", 'run="moving",state="running"', "1x44"),
                # done, publishing for a long time: not stalled
                series("distmerge_progress_ratio", 'run="publishing"', "0 0.5 1x42"),
                series("distmerge_run_state", 'run="publishing",state="running"', "1x44"),
                # failed at minute 3; its exporter gone at minute 5
                series("distmerge_run_state", 'run="broken",state="failed"', "0 0 0 1 1 stale"),
                series("distmerge_run_state", 'run="broken",state="running"', "1 1 1 0 0 stale"),
                # slice attempts failing at minutes 2..3
                series("distmerge_slice_failures_total", 'run="flaky",pass="merge"', "0 0 1 2 2x40"),
                # the driver killed at minute 5 while running; and one that finished normally
                series("distmerge_run_state", 'run="killed",state="running"', "1x4 stale"),
                series("distmerge_run_state", 'run="finished",state="running"', "1 1 1 0 stale"),
            ],
            "alert_rule_test": [
                alert("10m", "DistmergeRunStalled"),
                alert("25m", "DistmergeRunStalled",
                      {"severity": "warning", "run": "stuck", "job": "distmerge"}),
                alert("2m", "DistmergeRunFailed"),
                alert("10m", "DistmergeRunFailed",
                      {"severity": "critical", "run": "broken", "state": "failed", "job": "distmerge"}),
                alert("30m", "DistmergeRunFailed"),
                alert("4m", "DistmergeSlicesFailing", {"severity": "warning", "run": "flaky"}),
                alert("20m", "DistmergeSlicesFailing"),
                alert("8m", "DistmergeRunVanished",
                      {"severity": "warning", "run": "killed", "state": "running", "job": "distmerge"}),
                alert("30m", "DistmergeRunVanished"),
            ],
        }],
    }
    (tmp_path / "test.yaml").write_text(yaml.safe_dump(test))
    proc = _promtool("test", "rules", "test.yaml", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# -- against a live exporter and Prometheus ------------------------------------------------------------
@pytest.fixture(scope="module")
def live(tmp_path_factory, tiny_models):
    """A Prometheus (with the alert rules) scraping a local merge held half way through its
    merge pass; yields (prometheus, names the exporter serves). The run is released and
    Prometheus stopped at the end."""
    tmp = tmp_path_factory.mktemp("dash")
    port = free_port()
    with Prometheus(tmp / "prom", [f"127.0.0.1:{port}"], rule_files=[str(ALERTS)]) as prom:
        executor = GatedExecutor(retry_once=True)
        run = BackgroundRun(metrics_pipeline(tmp / "run", tiny_models, port=port, name=RUN, linger=5), executor)
        try:
            assert executor.midway.wait(180), "the merge pass never got half way"
            served = {name for name, _ in scrape(f"http://127.0.0.1:{port}/metrics")}
            # several scrapes of the running merge, so rate() over 1m has points
            wait_for("3 scrapes of the run", lambda: (prom.scalar(
                f'count_over_time(distmerge_progress_ratio{{run="{RUN}"}}[1m]) >= 3')), timeout=60)
            wait_for("a rule evaluation", lambda: all(
                r.get("lastEvaluation", "0001").startswith("20") for g in prom.api("rules")["groups"]
                for r in g["rules"]), timeout=30)
            yield prom, served
        finally:
            executor.release.set()
            run.join()


def test_every_expression_parses_and_names_only_exported_metrics(live):
    prom, served = live
    assert {"distmerge_progress_ratio", "distmerge_read_bytes_total", "distmerge_run_state"} <= served
    exprs = dashboard_exprs() + rule_exprs() + [(f"variable {n}", sel) for n, sel, _ in variable_exprs()]
    assert len(exprs) > 20
    seen: set[str] = set()
    for where, expr in exprs:
        canonical = prom.api("format_query", query=substitute(expr, RUN))   # the real parser
        names = metric_names(canonical)
        assert names, (where, canonical)
        seen |= names
        unknown = {n for n in names if n.startswith("distmerge_")} - served
        assert not unknown, f"{where}: {sorted(unknown)} not exported (served: {sorted(served)})"
        foreign = {n for n in names if not n.startswith("distmerge_")} - RAY_METRICS
        assert not foreign, f"{where}: {sorted(foreign)} is neither distmerge's nor Ray's GPU metrics"
    assert RAY_METRICS <= seen
    # most of what the exporter serves is used somewhere
    unused = {n for n in served if n.startswith("distmerge_") and not n.endswith("_created")} - seen
    assert not unused, f"exported but shown nowhere: {sorted(unused)}"


def test_every_dashboard_query_returns_data_for_a_running_merge(live):
    prom, _ = live
    for where, expr in dashboard_exprs():
        if not any(n.startswith("distmerge_") for n in metric_names(expr)):
            continue                      # Ray's GPU metrics: no Ray exporter here
        result = prom.query(substitute(expr, RUN))
        assert result, f"{where} returns nothing: {substitute(expr, RUN)}"
        assert all(r["metric"].get("run") in (RUN, None) for r in result), (where, result)
    for name, selector, label in variable_exprs():
        if name == "ray_session":
            continue                      # empty for a local run
        values = {r["metric"].get(label) for r in prom.query(f"count by ({label}) ({substitute(selector, RUN)})")}
        assert RUN in values, (name, values)


def test_alert_rules_evaluate_against_the_live_series(live):
    prom, _ = live
    rules = [r for g in prom.api("rules")["groups"] for r in g["rules"]]
    assert {r["name"] for r in rules} == {n.split()[1] for n, _ in rule_exprs()}
    for r in rules:
        assert r["health"] == "ok", (r["name"], r.get("lastError"))
    active = {a["labels"]["alertname"] for a in prom.api("alerts")["alerts"] if a["labels"].get("run") == RUN}
    # a healthy run just started: not stalled, failed or vanished (its retried slices may
    # show as failing slices, if a scrape saw their counter at 0 first)
    assert active <= {"DistmergeSlicesFailing"}, active
