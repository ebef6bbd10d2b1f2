"""``distmerge submit`` against a real Ray cluster: a head started with ``ray start --head`` on
127.0.0.1 (its own ports and temp dir, so it never meets the embedded Ray of ``ray_session``),
stopped by this module alone (``ray stop`` would stop every Ray of the user). The jobs run
``distmerge run`` on that cluster over the tiny models; the unreachable, not-Ray and refused
cases use a closed port and a small HTTP server."""

from __future__ import annotations

import http.server
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from distmerge.cli import main
from distmerge.config import load_pipeline
from distmerge.errors import AccessDeniedError, ConfigError
from distmerge.submit import (
    PIPELINE_FILE,
    ClusterError,
    JobFailedError,
    check_pipeline,
    connect,
    entrypoint_for,
    follow_job,
    normalize_address,
    runtime_env_for,
    stage_job_folder,
)
from tests.conftest import make_pipeline, sha256_tree

REPO = Path(__file__).resolve().parents[1]
SUBMITTED = re.compile(r"submitted job (\S+) to")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    return env


def _instance_processes(temp_dir: str) -> list:
    """This head's processes that left its process group: any of ours whose command line or
    working directory names its temp dir."""
    import psutil

    found = []
    for p in psutil.process_iter(["pid", "cmdline", "cwd", "uids"]):
        try:
            text = " ".join(p.info["cmdline"] or []) + " " + (p.info["cwd"] or "")
        except (psutil.Error, TypeError):
            continue
        if temp_dir in text and p.pid != os.getpid():
            found.append(p)
    return found


def _stop_head(proc: subprocess.Popen, temp_dir: str) -> None:
    """SIGTERM to ``ray start --block`` stops this node's processes (and only them); anything
    left in its process group or naming its temp dir is then killed."""
    import psutil

    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    left = _instance_processes(temp_dir)
    for p in left:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(left, timeout=10)


@pytest.fixture(scope="module")
def ray_head():
    """A Ray head on 127.0.0.1 with a job server (2 CPUs). Every port is chosen here so that it
    does not meet another Ray on this machine; the temp dir is short (Ray's socket paths must
    fit in 107 bytes) and keeps its ``ray_current_cluster`` file away from /tmp/ray, so a plain
    ``ray.init()`` elsewhere in the session still starts its own instance."""
    pytest.importorskip("ray.job_submission")
    temp_dir = tempfile.mkdtemp(prefix="dmray", dir="/tmp")
    flags = {name: _free_port() for name in (
        "port", "dashboard-port", "ray-client-server-port", "dashboard-agent-listen-port",
        "dashboard-agent-grpc-port", "runtime-env-agent-port", "metrics-export-port",
        "node-manager-port", "object-manager-port")}
    ray_cli = shutil.which("ray", path=str(Path(sys.executable).parent))
    cmd = ([ray_cli] if ray_cli else [sys.executable, "-m", "ray.scripts.scripts"]) + [
        "start", "--head", "--block", "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1",
        "--num-cpus=2", "--include-dashboard=true", f"--temp-dir={temp_dir}",
        "--object-store-memory=200000000", "--disable-usage-stats",
    ] + [f"--{k}={v}" for k, v in flags.items()]
    # no token authentication on this test cluster (Ray enables it when ~/.ray/auth_token exists)
    env = {**_env(), "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    log_path = Path(temp_dir) / "ray-start.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    address = f"http://127.0.0.1:{flags['dashboard-port']}"
    try:
        from ray.job_submission import JobSubmissionClient

        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None:
                pytest.fail(f"ray start exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
            try:
                client = JobSubmissionClient(address)
                client.list_jobs()
                break
            except Exception:  # noqa: BLE001 - not up yet
                if time.monotonic() > deadline:
                    pytest.fail(f"the job server at {address} did not answer within 180 s:\n"
                                f"{log_path.read_text()[-3000:]}")
                time.sleep(0.5)
        yield SimpleNamespace(address=address, client=client, temp_dir=temp_dir)
    finally:
        _stop_head(proc, temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _wait_terminal(client, sid: str, timeout: float = 240) -> str:
    deadline = time.monotonic() + timeout
    while True:
        status = str(client.get_job_status(sid))
        if status in ("SUCCEEDED", "FAILED", "STOPPED"):
            return status
        assert time.monotonic() < deadline, f"job {sid} still {status}"
        time.sleep(0.5)


def _pipeline(tmp_path: Path, models, **changes) -> Path:
    changes.setdefault("resources", {"workers": 2, "memory_per_worker": "512MB", "slice_size": "16KB"})
    return make_pipeline(tmp_path, models, **changes)


# ---------------------------------------------------------------- against the cluster

@pytest.mark.ray
@pytest.mark.e2e
@pytest.mark.timeout(400)
def test_submit_merges_on_the_cluster_and_follows_the_logs(ray_head, tmp_path, tiny_models):
    # the models travel in --working-dir and are named relatively; this distmerge goes along
    wd = tmp_path / "wd"
    for m in tiny_models:
        shutil.copytree(m, wd / "models" / m.name)
    rel = [Path("models") / m.name for m in tiny_models]
    out = tmp_path / "out"
    pipe = _pipeline(tmp_path / "p", rel, name="tiny-merge", output={"path": str(out), "dtype": "bfloat16"})
    proc = subprocess.run(
        [sys.executable, "-m", "distmerge.cli", "submit", str(pipe), "--address", ray_head.address,
         "--working-dir", str(wd), "--ship-source"],
        env=_env(), cwd=tmp_path, capture_output=True, text=True, timeout=360)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    sid = SUBMITTED.search(proc.stderr).group(1)
    assert sid.startswith("tiny-merge-")
    assert f"merged checkpoint: {out}" in proc.stdout            # the followed logs
    assert f"job {sid} SUCCEEDED" in proc.stderr

    info = ray_head.client.get_job_info(sid)
    assert str(info.status) == "SUCCEEDED" and info.driver_exit_code == 0
    assert info.entrypoint == f"python -m distmerge.cli run {PIPELINE_FILE}"
    assert info.runtime_env.get("py_modules")                     # --ship-source
    assert info.metadata["distmerge_pipeline"] == "tiny-merge"

    shards = sha256_tree(out)
    assert shards and (out / "config.json").exists()
    # the same bytes as an in-process run of the same pipeline here
    local = _pipeline(tmp_path / "l", tiny_models, output={"path": str(tmp_path / "local"), "dtype": "bfloat16"})
    from distmerge.engine.driver import run_pipeline

    run_pipeline(load_pipeline(local), executor="local", show_progress=False)
    assert sha256_tree(tmp_path / "local") == shards


@pytest.mark.ray
@pytest.mark.e2e
@pytest.mark.timeout(300)
def test_a_failing_job_exits_with_its_code_and_error_line(ray_head, tmp_path, tiny_models, capsys):
    missing = tmp_path / "no-such-expert"
    pipe = _pipeline(tmp_path, [*tiny_models[:2], missing])
    t0 = time.monotonic()
    code = main(["submit", str(pipe), "--address", ray_head.address])
    out, err = capsys.readouterr()
    assert code == 3, err                                 # SourceNotFoundError on the cluster
    assert f"distmerge: error: model not found: {missing}" in out      # the streamed logs
    assert "FAILED (driver exit code 3): distmerge: error: model not found" in err
    assert "last log lines:" in err and "ray job logs test-" in err
    assert time.monotonic() - t0 < 200


@pytest.mark.ray
@pytest.mark.e2e
@pytest.mark.timeout(300)
def test_no_follow_returns_at_once_and_the_job_can_be_followed_later(ray_head, tmp_path, tiny_models, capsys):
    pipe = _pipeline(tmp_path, [*tiny_models[:2], tmp_path / "gone"])
    assert main(["submit", str(pipe), "--address", ray_head.address, "--no-follow"]) == 0
    err = capsys.readouterr().err
    sid = SUBMITTED.search(err).group(1)
    assert f"ray job stop {sid} --address {ray_head.address}" in err
    assert f"ray job logs -f {sid}" in err
    assert _wait_terminal(ray_head.client, sid) == "FAILED"
    result = follow_job(sid, ray_head.address)                # a finished job: replays its logs
    assert result.status == "FAILED" and result.driver_exit_code == 3
    with pytest.raises(JobFailedError, match="model not found") as caught:
        result.check()
    assert caught.value.exit_code == 3
    with pytest.raises(ClusterError, match="job no-such-job-1 at .*does not exist"):
        follow_job("no-such-job-1", ray_head.address)


@pytest.mark.ray
@pytest.mark.e2e
@pytest.mark.timeout(300)
def test_ctrl_c_stops_following_not_the_job(ray_head, tmp_path, tiny_models):
    # workers asking for more memory than the cluster has: the job waits for them until stopped
    pipe = _pipeline(tmp_path, tiny_models, resources={"workers": 2, "memory_per_worker": "1000GB",
                                                       "slice_size": "16KB"})
    stdout = open(tmp_path / "stdout", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "distmerge.cli", "submit", str(pipe),
                             "--address", ray_head.address],
                            env=_env(), stdout=stdout, stderr=subprocess.PIPE, text=True)
    sid = None
    try:
        for line in proc.stderr:
            m = SUBMITTED.search(line)
            if m:
                sid = m.group(1)
                break
        assert sid, "no submission line"
        deadline = time.monotonic() + 60
        while not (tmp_path / "stdout").read_text() and time.monotonic() < deadline:
            time.sleep(0.2)                                   # following has begun
        proc.send_signal(signal.SIGINT)
        err = proc.stderr.read()
        assert proc.wait(60) == 130, err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        stdout.close()
        if sid:
            status = str(ray_head.client.get_job_status(sid))
            if status not in ("SUCCEEDED", "FAILED", "STOPPED"):
                ray_head.client.stop_job(sid)
            _wait_terminal(ray_head.client, sid)
    assert status == "RUNNING"                                # Ctrl-C left it running
    assert f"stopped following job {sid}; it keeps running" in err
    assert f"ray job stop {sid} --address {ray_head.address}" in err
    assert "Traceback" not in err
    result = follow_job(sid, ray_head.address)
    assert result.status == "STOPPED"
    with pytest.raises(JobFailedError, match=f"job {sid} STOPPED") as caught:
        result.check()
    assert caught.value.exit_code == 8


# ---------------------------------------------------------------- without a cluster

def test_an_unreachable_address_fails_fast_with_a_clear_error(tmp_path, tiny_models, capsys):
    pipe = _pipeline(tmp_path, tiny_models)
    port = _free_port()                                       # nothing listens there now
    t0 = time.monotonic()
    assert main(["submit", str(pipe), "--address", f"http://127.0.0.1:{port}"]) == 10
    err = capsys.readouterr().err
    assert f"cannot reach the Ray job server at http://127.0.0.1:{port}: Connection refused" in err
    assert time.monotonic() - t0 < 15
    assert not (tmp_path / "out").exists()


def test_a_server_that_never_answers_times_out():
    with socket.socket() as listener:                         # accepts connections, says nothing
        listener.bind(("127.0.0.1", 0))
        listener.listen(4)
        t0 = time.monotonic()
        with pytest.raises(ClusterError, match="no answer within 1 s"):
            connect(f"127.0.0.1:{listener.getsockname()[1]}", timeout=1)
        assert time.monotonic() - t0 < 10


@pytest.fixture
def http_status():
    """A small HTTP server answering every GET with ``server.status``."""
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            body = b"Unauthorized: Missing authentication token" if server.status == 401 else b"nope"
            self.send_response(server.status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.status = 404
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join(5)


def test_not_a_ray_job_server_and_refused_credentials(http_status, tmp_path, tiny_models, capsys):
    address = f"http://127.0.0.1:{http_status.server_address[1]}"
    http_status.status = 404
    with pytest.raises(ClusterError, match="does not look like a Ray job server"):
        connect(address)
    http_status.status = 401
    with pytest.raises(AccessDeniedError, match="refused the request .*RAY_AUTH_TOKEN"):
        connect(address)
    assert main(["submit", str(_pipeline(tmp_path, tiny_models)), "--address", address]) == 3
    assert "distmerge: error: the Ray job server at" in capsys.readouterr().err


def test_the_pipeline_is_checked_here_before_the_cluster_is_contacted(tmp_path, tiny_models, capsys):
    closed = f"http://127.0.0.1:{_free_port()}"
    bad = _pipeline(tmp_path / "a", tiny_models, method={"name": "ties", "density": 1.5})
    assert main(["submit", str(bad), "--address", closed]) == 2
    assert "density" in capsys.readouterr().err
    rel_out = _pipeline(tmp_path / "b", tiny_models, output={"path": "merged/out"})
    assert main(["submit", str(rel_out), "--address", closed]) == 2
    assert "output.path: 'merged/out' is relative" in capsys.readouterr().err
    rel_model = _pipeline(tmp_path / "c", [Path("base"), *tiny_models[1:]])
    with pytest.raises(ConfigError, match="base: 'base' is relative.*--working-dir"):
        check_pipeline(rel_model)
    check_pipeline(rel_model, working_dir=tmp_path)           # resolved inside the upload
    good = _pipeline(tmp_path / "d", tiny_models)
    assert main(["submit", str(good), "--address", "ray://head:10001"]) == 2
    assert "expected the Ray dashboard's http://HOST:8265 address" in capsys.readouterr().err


def test_the_shipped_pipeline_forces_the_clusters_address(tmp_path, tiny_models):
    pipe = _pipeline(tmp_path, tiny_models, ray={"address": "ray://somewhere:10001"})
    original, raw = check_pipeline(pipe)
    folder = tmp_path / "job"
    folder.mkdir()
    stage_job_folder(raw, str(pipe), folder)
    shipped = load_pipeline(folder / PIPELINE_FILE)
    assert shipped.ray.address == "auto"
    assert shipped.model_dump(exclude={"ray"}) == original.model_dump(exclude={"ray"})
    env = runtime_env_for(folder, pip=["distmerge==0.1.0"], ship_source=True)
    assert env["working_dir"] == str(folder) and env["pip"] == ["distmerge==0.1.0"]
    assert env["py_modules"] == [str(REPO / "distmerge")]
    assert env["env_vars"]["PYTHONUNBUFFERED"] == "1"
    assert "pip" not in runtime_env_for(folder)
    assert (entrypoint_for(workers=8, memory_per_worker="4 GB", overwrite=True, resume=True)
            == f"python -m distmerge.cli run {PIPELINE_FILE} --workers 8 --memory-per-worker '4 GB' "
               "--overwrite --resume")


@pytest.mark.parametrize("given, expected", [
    ("head", "http://head:8265"),
    ("10.0.0.5:9000", "http://10.0.0.5:9000"),
    ("http://head:8265/", "http://head:8265"),
    ("https://ray.example.com", "https://ray.example.com"),
])
def test_addresses(given, expected):
    assert normalize_address(given) == expected


@pytest.mark.parametrize("bad", ["", "ray://head:10001", "http://", "head:port"])
def test_bad_addresses(bad):
    with pytest.raises(ConfigError, match="--address"):
        normalize_address(bad)
