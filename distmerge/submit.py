"""``distmerge submit``: send a pipeline to an existing Ray cluster through the Ray Jobs API,
follow its logs and report how it ended.

What happens, in order:

1. The pipeline is checked on this machine, schema only: :func:`distmerge.config.load_pipeline`
   and the method's parameters (:func:`distmerge.methods.build`). No header is read, since the
   models are often reachable only from the cluster. Paths are resolved ON THE CLUSTER, so a
   relative ``output.path`` is refused (it would land in the job's temporary working directory
   and be lost), and so are relative model paths unless ``working_dir`` is given (they then
   name files inside the uploaded folder). ``~`` is expanded on the cluster.
2. The pipeline travels with the job: a temporary folder holding ``distmerge-pipeline.yaml``
   (plus a copy of ``working_dir``, when given) is the job's ``runtime_env.working_dir``. The
   file is the user's YAML with one change: ``ray.address`` is forced to ``auto``, so the
   job's driver joins the cluster it runs on (through the ``RAY_ADDRESS`` the Jobs API sets)
   instead of starting an embedded Ray. CLI overrides (``--workers`` ...) are passed to
   ``distmerge run`` as flags, so the shipped file otherwise holds the user's values (its
   comments are not kept).
3. The entrypoint is ``python -m distmerge.cli run distmerge-pipeline.yaml [flags]`` (every
   argument quoted with :func:`shlex.quote`), with ``PYTHONUNBUFFERED=1`` so lines reach the
   logs as they are printed. By default distmerge is assumed to be installed in the cluster's
   image, and ``python`` on the nodes' PATH to be the one that has it. ``pip`` adds packages to a per-job virtualenv (e.g.
   ``distmerge==0.1.0`` or a wheel URL); ``ship_source`` uploads this machine's ``distmerge``
   package as ``runtime_env.py_modules``, which comes first on the job's and its workers'
   ``sys.path`` (the cluster still needs distmerge's dependencies: torch, safetensors...).
   Storage credentials are never shipped: the environment variables the pipeline names must
   exist on the cluster's nodes.
4. The submission id is the pipeline's ``name`` plus 8 random hex digits (``my-merge-1a2b3c4d``);
   the job's metadata carries the pipeline name and this distmerge's version.
5. Following: the logs are streamed (``JobSubmissionClient.tail_job_logs``) to stdout until the
   job ends; then its final status decides: SUCCEEDED returns normally; FAILED or STOPPED
   raise :class:`JobFailedError` carrying the job's ``distmerge: error:`` line and its last log
   lines, with the exit code of ``distmerge run`` on the cluster (2 configuration, 3 missing
   source, ...; 8 when there is none). Ctrl-C stops following only: the job keeps running and
   the commands to follow or stop it are printed (exit 130). There is no prompt.

Connecting: the address is the dashboard's HTTP address (``http://HEAD:8265``; a bare
``HEAD`` or ``HEAD:PORT`` gets ``http://``, and port 8265 when none is given). One request to
``/api/version`` with a 10 s timeout comes first, so an unreachable or stuck server is reported
in seconds (Ray's client itself sets no timeout and could wait for minutes). Extra HTTP headers come from ``RAY_JOB_HEADERS`` (JSON, as
for ``ray job submit``); Ray's token authentication is used as Ray's own client uses it
(``RAY_AUTH_MODE=token`` with ``RAY_AUTH_TOKEN`` or ``~/.ray/auth_token``).

Errors: :class:`ClusterError` (exit code 10: no answer, not a Ray job server, the job or its
upload refused, the connection lost while following), the existing
:class:`~distmerge.errors.AccessDeniedError` (HTTP 401/403, Ray token authentication),
:class:`~distmerge.errors.ConfigError` (pipeline, address, options), :class:`JobFailedError`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import shlex
import shutil
import sys
import tempfile
import time
import warnings
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, TextIO
from urllib.parse import urlsplit

import yaml

import distmerge
from distmerge.config import Pipeline, load_pipeline
from distmerge.errors import AccessDeniedError, ClusterError, ConfigError, DistmergeError, MergeFailedError

PIPELINE_FILE = "distmerge-pipeline.yaml"     # its name inside the job's working directory
DEFAULT_DASHBOARD_PORT = 8265
CONNECT_TIMEOUT_S = 10.0
LAST_LINES = 20                               # log lines kept for a failure's message
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
RAY_CHATTY_LOGGERS = ("ray.dashboard.modules.dashboard_sdk", "ray.dashboard.modules.job.sdk",
                      "ray._private.runtime_env.packaging")
# exit codes of ``distmerge run`` that a failed job passes on (see distmerge.errors)
DISTMERGE_EXIT_CODES = range(2, 10)




class JobFailedError(MergeFailedError):
    """The submitted job ended FAILED or STOPPED. ``exit_code`` is the one ``distmerge run``
    exited with on the cluster when it is one of distmerge's (2-9), else 8."""

    def __init__(self, message: str, exit_code: int = MergeFailedError.exit_code):
        super().__init__(message)
        self.exit_code = exit_code

    def __reduce__(self):
        return (type(self), (self.message, self.exit_code))


@dataclass(frozen=True)
class Submission:
    submission_id: str
    address: str
    entrypoint: str
    runtime_env: dict[str, Any]
    client: Any = field(default=None, repr=False, compare=False)

    def commands(self) -> list[str]:
        a = shlex.quote(self.address)
        return [f"  follow: ray job logs -f {self.submission_id} --address {a}",
                f"  status: ray job status {self.submission_id} --address {a}",
                f"  stop:   ray job stop {self.submission_id} --address {a}"]


@dataclass
class JobResult:
    submission_id: str
    address: str
    status: str
    message: str = ""
    driver_exit_code: int | None = None
    last_lines: list[str] = field(default_factory=list)

    def error_line(self) -> str:
        """The job's ``distmerge: error:`` line, else the first line of Ray's message."""
        for line in reversed(self.last_lines):
            if "distmerge: error:" in line:
                return line[line.index("distmerge: error:"):].strip()
        return (self.message or "").strip().splitlines()[0] if (self.message or "").strip() else ""

    def check(self) -> None:
        """Return when the job SUCCEEDED; raise :class:`JobFailedError` otherwise."""
        if self.status == "SUCCEEDED":
            return
        code = self.driver_exit_code
        exit_code = code if code in DISTMERGE_EXIT_CODES else MergeFailedError.exit_code
        what = f"driver exit code {code}" if code is not None else "no driver exit code"
        lines = [f"job {self.submission_id} {self.status} ({what}): {self.error_line() or 'no error line'}"]
        if self.last_lines:
            lines.append("  last log lines:")
            lines += [f"    {l}" for l in self.last_lines[-10:]]
        lines.append(f"  all logs: ray job logs {self.submission_id} --address {shlex.quote(self.address)}")
        raise JobFailedError("\n".join(lines), exit_code)


# ---------------------------------------------------------------- address and connection

def normalize_address(address: str) -> str:
    """``HEAD`` → ``http://HEAD:8265``, ``HEAD:9000`` → ``http://HEAD:9000``; ``http(s)://``
    addresses are kept (without a trailing ``/``).

    Raises:
        ConfigError: empty, or another scheme (``ray://`` is the Ray Client port, not the
        dashboard's Jobs API).
    """
    a = (address or "").strip()
    if not a:
        raise ConfigError("--address: give the Ray dashboard's address, e.g. http://HEAD:8265")
    bare = "://" not in a
    a = ("http://" + a if bare else a).rstrip("/")
    parts = urlsplit(a)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"--address: expected the Ray dashboard's http://HOST:{DEFAULT_DASHBOARD_PORT} "
                          f"address (the Jobs API), got {address!r}")
    try:
        port = parts.port
    except ValueError:
        raise ConfigError(f"--address: bad port in {address!r}") from None
    if bare and port is None:
        a += f":{DEFAULT_DASHBOARD_PORT}"
    return a


def _headers_from_env() -> dict[str, Any] | None:
    text = os.environ.get("RAY_JOB_HEADERS")
    if not text:
        return None
    try:
        headers = json.loads(text)
    except json.JSONDecodeError as err:
        raise ConfigError(f"RAY_JOB_HEADERS: not JSON ({err}); expected {{\"NAME\": \"VALUE\"}}") from None
    if not isinstance(headers, dict):
        raise ConfigError("RAY_JOB_HEADERS: expected a JSON object {\"NAME\": \"VALUE\"}")
    return headers


def _unreachable(address: str, why: str) -> ClusterError:
    return ClusterError(
        f"cannot reach the Ray job server at {address}: {why}. Check that the cluster is up and "
        f"that this is its dashboard address (port {DEFAULT_DASHBOARD_PORT} unless changed; a head "
        "started with `ray start --head` listens on 127.0.0.1 only unless --dashboard-host=0.0.0.0)")


def check_reachable(address: str, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """One HTTP request to the job server's ``/api/version`` within ``timeout`` seconds (to
    connect, then to answer). Any HTTP answer passes (authentication is Ray's client's
    business); no answer fails fast, where Ray's own client would wait without a limit.

    Raises:
        ClusterError
    """
    import requests

    try:
        requests.get(address + "/api/version", timeout=(timeout, timeout), allow_redirects=False)
    except requests.Timeout:
        raise _unreachable(address, f"no answer within {timeout:g} s") from None
    except requests.RequestException as err:
        raise _unreachable(address, _reason(err)) from None


def _reason(err: BaseException) -> str:
    """The innermost reason of a requests/urllib3 error (e.g. 'Connection refused')."""
    seen = err
    while True:
        nxt = seen.__cause__ or seen.__context__ or (seen.args[0] if seen.args and isinstance(
            seen.args[0], BaseException) else None)
        if nxt is None or nxt is seen:
            break
        seen = nxt
    text = str(seen)
    for marker in ("] ", ": "):
        if "Errno" in text and marker in text:
            text = text.rsplit(marker, 1)[-1]
            break
    return text.strip().rstrip(")'\"") or type(err).__name__


def connect(address: str, *, timeout: float = CONNECT_TIMEOUT_S):
    """A ``JobSubmissionClient`` for ``address`` (normalized), with clear errors.

    Raises:
        ConfigError, ClusterError, AccessDeniedError
    """
    address = normalize_address(address)
    headers = _headers_from_env()
    check_reachable(address, timeout)
    import requests
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address, headers=headers)
    except AuthenticationError as err:
        raise _denied(address, err) from None
    except (ConnectionError, requests.RequestException) as err:
        raise _unreachable(address, str(err).rstrip(".")) from None
    except RuntimeError as err:        # 404 on /api/version, another HTTP error: not a job server
        raise _unreachable(address, f"this does not look like a Ray job server ({err})") from None


def _denied(address: str, err: BaseException) -> AccessDeniedError:
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return AccessDeniedError(
        f"the Ray job server at {address} refused the request ({first}). For Ray token "
        "authentication set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN (or ~/.ray/auth_token) to the "
        "cluster's token; other headers (e.g. a proxy's) go in RAY_JOB_HEADERS as JSON")


def _call(address: str, what: str, fn, *args, **kwargs):
    """A client call with its errors mapped to ours; ``what`` starts the message of an HTTP
    error (Ray raises RuntimeError for those: unknown job, refused upload...)."""
    import requests
    from ray.exceptions import AuthenticationError

    try:
        return fn(*args, **kwargs)
    except AuthenticationError as err:
        raise _denied(address, err) from None
    except (ConnectionError, requests.RequestException) as err:
        raise _unreachable(address, f"lost the connection ({err})") from None
    except RuntimeError as err:
        raise ClusterError(f"{what}: {err}") from None


# ---------------------------------------------------------------- preparing the job

def _is_relative_local(path: Any) -> bool:
    p = str(path)
    return "://" not in p and not p.startswith(("/", "~"))


def check_pipeline(path: str | os.PathLike, *, working_dir: str | os.PathLike | None = None,
                   **overrides: Any) -> tuple[Pipeline, dict[str, Any]]:
    """Schema-check the pipeline here (no header is read) and return it with the raw mapping.

    Raises:
        ConfigError
    """
    from distmerge.methods import build

    pipeline = load_pipeline(path, **overrides)
    methods = build(pipeline.method.name, pipeline.method.params(),
                    [(o.match, o.params()) for o in pipeline.overrides])
    methods.check_weights(tuple(e.weight for e in pipeline.experts))
    raw = yaml.safe_load(Path(path).read_text())
    out = raw["output"]["path"]
    if _is_relative_local(out):
        raise ConfigError(f"{path}: output.path: {out!r} is relative; the job would write it inside its "
                          "temporary working directory on the cluster and it would be lost: use an "
                          "absolute path or a URL")
    if working_dir is None:
        models = [("base", raw["base"])] + [(f"experts.{i}.path", e["path"])
                                            for i, e in enumerate(raw["experts"])]
        for key, p in models:
            if _is_relative_local(p):
                raise ConfigError(f"{path}: {key}: {p!r} is relative; paths are resolved on the "
                                  "cluster: use an absolute path or a URL, or upload the folder it "
                                  "is relative to with --working-dir")
    return pipeline, raw


def submission_id_for(pipeline: Pipeline) -> str:
    return f"{pipeline.name}-{secrets.token_hex(4)}"


def entrypoint_for(*, workers: int | None = None, memory_per_worker: str | None = None,
                   slice_size: str | None = None, overwrite: bool = False,
                   resume: bool = False) -> str:
    argv = ["python", "-m", "distmerge.cli", "run", PIPELINE_FILE]
    if workers is not None:
        argv += ["--workers", str(workers)]
    if memory_per_worker is not None:
        argv += ["--memory-per-worker", str(memory_per_worker)]
    if slice_size is not None:
        argv += ["--slice-size", str(slice_size)]
    if overwrite:
        argv.append("--overwrite")
    if resume:
        argv.append("--resume")
    return shlex.join(argv)


def stage_job_folder(raw: dict[str, Any], source: str, folder: Path,
                     working_dir: str | os.PathLike | None = None) -> Path:
    """Fill ``folder`` (the job's working directory): a copy of ``working_dir`` when given, and
    the pipeline with ``ray.address: auto``."""
    if working_dir is not None:
        wd = Path(working_dir)
        if not wd.is_dir():
            raise ConfigError(f"--working-dir: {wd} is not a folder")
        if (wd / PIPELINE_FILE).exists():
            raise ConfigError(f"--working-dir: {wd} already holds a {PIPELINE_FILE}; distmerge "
                              "writes the submitted pipeline under that name")
        shutil.copytree(wd, folder, symlinks=True, dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc", ".git"))
    data = dict(raw)
    data["ray"] = {**(raw.get("ray") or {}), "address": "auto"}
    text = (f"# submitted by distmerge submit {distmerge.__version__} from {source}\n"
            "# ray.address forced to auto: the job's driver joins the cluster it runs on\n"
            + yaml.safe_dump(data, sort_keys=False))
    (folder / PIPELINE_FILE).write_text(text)
    return folder


def runtime_env_for(folder: Path, *, pip: Iterable[str] = (), ship_source: bool = False) -> dict[str, Any]:
    env: dict[str, Any] = {
        "working_dir": str(folder),
        "env_vars": {"PYTHONUNBUFFERED": "1"},
        "excludes": ["__pycache__", "*.pyc"],
    }
    pip = [p for p in pip if p]
    if pip:
        env["pip"] = pip
    if ship_source:
        env["py_modules"] = [str(Path(distmerge.__file__).resolve().parent)]
    return env


def submit_pipeline(path: str | os.PathLike, address: str, *, working_dir: str | os.PathLike | None = None,
                    pip: Iterable[str] = (), ship_source: bool = False, workers: int | None = None,
                    memory_per_worker: str | None = None, slice_size: str | None = None,
                    overwrite: bool = False, resume: bool = False, client=None) -> Submission:
    """Check the pipeline here, then submit it as a Ray job. Returns once the job is accepted
    (its working directory uploaded).

    Raises:
        ConfigError, ClusterError, AccessDeniedError
    """
    pipeline, raw = check_pipeline(path, working_dir=working_dir, workers=workers,
                                   memory_per_worker=memory_per_worker, slice_size=slice_size,
                                   overwrite=overwrite or None)
    address = normalize_address(address)
    if client is None:
        client = connect(address)
    sid = submission_id_for(pipeline)
    entrypoint = entrypoint_for(workers=workers, memory_per_worker=memory_per_worker,
                                slice_size=slice_size, overwrite=overwrite, resume=resume)
    folder = Path(tempfile.mkdtemp(prefix="distmerge-submit-"))
    try:
        stage_job_folder(raw, str(path), folder, working_dir)
        runtime_env = runtime_env_for(folder, pip=pip, ship_source=ship_source)
        metadata = {"distmerge_pipeline": pipeline.name, "distmerge_version": distmerge.__version__}
        try:
            _call(address, f"the Ray job server at {address} did not accept the job",
                  client.submit_job, entrypoint=entrypoint, submission_id=sid,
                  runtime_env=runtime_env, metadata=metadata)
        except (ValueError, TypeError) as err:        # Ray refused the runtime_env before sending
            raise ConfigError(f"the job's runtime environment is not valid: {err}") from None
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return Submission(sid, address, entrypoint, runtime_env, client)


# ---------------------------------------------------------------- following

async def _tail(client, sid: str, out: TextIO, keep: deque) -> None:
    partial = ""
    async for chunk in client.tail_job_logs(sid):
        out.write(chunk)
        out.flush()
        lines = (partial + chunk).split("\n")
        partial = lines.pop()
        keep.extend(l for l in lines if l.strip())
    if partial.strip():
        keep.append(partial)


def follow_job(submission: Submission | str, address: str | None = None, *, client=None,
               out: TextIO | None = None, err: TextIO | None = None,
               poll_s: float = 1.0) -> JobResult:
    """Stream the job's logs to ``out`` until it ends and return its final state.
    ``KeyboardInterrupt`` propagates (the job is left running).

    Raises:
        ClusterError, AccessDeniedError
    """
    sid = submission.submission_id if isinstance(submission, Submission) else submission
    address = normalize_address(address or submission.address)
    out = out or sys.stdout
    err = err or sys.stderr
    if client is None and isinstance(submission, Submission):
        client = submission.client
    if client is None:
        client = connect(address)
    import aiohttp

    keep: deque[str] = deque(maxlen=LAST_LINES)
    try:
        with warnings.catch_warnings():        # Ray's own call into aiohttp
            warnings.filterwarnings("ignore", message="ssl=None is deprecated", category=DeprecationWarning)
            asyncio.run(_tail(client, sid, out, keep))
    except (RuntimeError, OSError, aiohttp.ClientError, asyncio.TimeoutError) as e:
        # the log stream broke (head restarted, proxy timeout): poll the status instead
        print(f"distmerge: warning: stopped streaming the logs of {sid} ({e}); waiting for the "
              "job to end", file=err, flush=True)
    what = f"job {sid} at {address}"
    while True:
        status = str(_call(address, what, client.get_job_status, sid))
        if status in TERMINAL:
            break
        time.sleep(poll_s)
    info = _call(address, what, client.get_job_info, sid)
    if not keep:
        try:
            text = _call(address, what, client.get_job_logs, sid)
            keep.extend(l for l in text.splitlines() if l.strip())
        except DistmergeError:
            pass
    return JobResult(sid, address, status, message=info.message or "",
                     driver_exit_code=getattr(info, "driver_exit_code", None), last_lines=list(keep))


def submit(path: str | os.PathLike, address: str, *, follow: bool = True, client=None,
           out: TextIO | None = None, err: TextIO | None = None, **options: Any) -> int:
    """``distmerge submit``: submit, then (with ``follow``) stream the logs and report how the
    job ended. Returns 0 when the job SUCCEEDED (or was submitted, without ``follow``), 130 when
    Ctrl-C stopped the following (the job keeps running).

    Raises:
        ConfigError, ClusterError, AccessDeniedError, JobFailedError
    """
    out = out or sys.stdout
    err = err or sys.stderr
    for name in RAY_CHATTY_LOGGERS:          # their INFO lines (upload, websocket closed) are noise here
        logging.getLogger(name).setLevel(logging.WARNING)
    sub = submit_pipeline(path, address, client=client, **options)
    print(f"distmerge: submitted job {sub.submission_id} to {sub.address}", file=err, flush=True)
    if not follow:
        print("\n".join(sub.commands()), file=err, flush=True)
        return 0
    try:
        result = follow_job(sub, out=out, err=err)
    except KeyboardInterrupt:
        print(f"\ndistmerge: stopped following job {sub.submission_id}; it keeps running on the "
              "cluster.\n" + "\n".join(sub.commands()), file=err, flush=True)
        return 130
    result.check()
    print(f"distmerge: job {sub.submission_id} SUCCEEDED", file=err, flush=True)
    return 0
