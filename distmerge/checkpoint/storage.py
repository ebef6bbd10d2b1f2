"""Opening URLs with the pipeline's storage options, and what to do when a request fails.

Where options and secrets travel
--------------------------------
The pipeline's ``storage:`` section (:class:`distmerge.config.StorageConfig`) holds endpoints,
regions, the anonymous flag and the NAMES of the environment variables that hold credentials,
never a credential. It is what travels: the driver activates it for its own process
(:func:`use_storage`, for header reads and the copy of config files from the base), and the
:class:`~distmerge.engine.worker.Job` carries it to every worker, whose readers open their own
filesystem objects with it. The credential values are read from the environment of the process
that opens a URL, at that moment (:func:`fs_options`), and live only in that process's
filesystem objects: never in the pipeline file, the Job, a log line or an error message. On a
Ray cluster every node must therefore have the variables set (KubeRay: env from a Secret);
a worker without them fails with a message naming the variable and the host.

Filesystem objects are built here, one per (process, scheme, options), never taken from
fsspec's instance cache and never sent to another process.

Failures
--------
:func:`classify` sorts an exception into missing (404), denied (401/403, wrong credentials),
short (416: the object ends before the range), transient (5xx, throttling, timeouts, connection resets) or permanent; :func:`call_with_retries`
retries transient ones with exponential backoff (:class:`ReadRetry`, a pure policy) and turns
the others into errors that name the URL: :class:`~distmerge.errors.SourceNotFoundError`,
:class:`AccessDeniedError` (with the credential variables' names), or
:class:`StorageUnavailableError` after the last attempt. The lower layers (botocore, s3fs) are
told to try once, so that this policy is the only one and its numbers are the real ones.
"""

from __future__ import annotations

import errno
import os
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import fsspec

from distmerge.config import StorageConfig
from distmerge.errors import (
    AccessDeniedError,
    ConfigError,
    DistmergeError,
    SourceNotFoundError,
    StorageUnavailableError,
    UnsafeCheckpointError,
)

T = TypeVar("T")
Kind = Literal["missing", "denied", "short", "transient", "permanent"]




# -- the options of this process ------------------------------------------------------------------

_active = StorageConfig()
_lock = threading.Lock()
_filesystems: dict[tuple, fsspec.AbstractFileSystem] = {}
_pools: dict[tuple[int, int], ThreadPoolExecutor] = {}


def use_storage(storage: StorageConfig) -> None:
    """Make ``storage`` the options for every URL this process opens without explicit ones
    (the driver's header reads, the copy of config files). A process runs one pipeline at a
    time; the driver calls this when it validates one."""
    global _active
    _active = storage


def active_storage() -> StorageConfig:
    return _active


def _env(name: str, field: str) -> str:
    value = os.environ.get(name)
    if not value:
        raise ConfigError(
            f"storage.s3.{field} names the environment variable {name}, which is not set in "
            f"this process (host {socket.gethostname()}, pid {os.getpid()}); the driver and "
            "every worker read credentials from their own environment, so set it on every node"
        )
    return value


def fs_options(protocol: str, storage: StorageConfig) -> dict[str, Any]:
    """Keyword arguments for the fsspec filesystem of ``protocol``, credentials resolved from
    this process's environment. The result holds secrets: never log it."""
    if protocol == "hf":
        return hub_options(storage)
    if protocol not in ("s3", "s3a"):
        return {}
    s3 = storage.s3
    opts: dict[str, Any] = {
        "skip_instance_cache": True,
        "use_listings_cache": False,
        "config_kwargs": {
            "max_pool_connections": max(10, storage.concurrency),
            "retries": {"total_max_attempts": 1},
        },
    }
    if s3.endpoint_url:
        opts["endpoint_url"] = s3.endpoint_url
    if s3.region:
        opts["client_kwargs"] = {"region_name": s3.region}
    if s3.anonymous:
        opts["anon"] = True
    elif s3.key_env and s3.secret_env:
        opts["key"] = _env(s3.key_env, "key_env")
        opts["secret"] = _env(s3.secret_env, "secret_env")
        if s3.token_env:
            opts["token"] = _env(s3.token_env, "token_env")
    return opts


def hub_options(storage: StorageConfig) -> dict[str, Any]:
    """Keyword arguments for huggingface_hub (``HfFileSystem``, ``HfApi``): the endpoint and
    the token read from the variable ``storage.hf.token_env`` names. Holds a secret."""
    hf = storage.hf
    opts: dict[str, Any] = {}
    if hf.endpoint_url:
        opts["endpoint"] = hf.endpoint_url
    if hf.token_env:
        value = os.environ.get(hf.token_env)
        if not value:
            raise ConfigError(
                f"storage.hf.token_env names the environment variable {hf.token_env}, which is "
                f"not set in this process (host {socket.gethostname()}, pid {os.getpid()}); set "
                "it on every node"
            )
        opts["token"] = value
    return opts


def credentials_note(protocol: str, storage: StorageConfig) -> str:
    """How requests to ``protocol`` are authenticated, by names only (for error messages)."""
    if protocol == "hf":
        return (f"the token in the environment variable {storage.hf.token_env}"
                if storage.hf.token_env else "huggingface_hub's default token (HF_TOKEN, saved login)")
    if protocol not in ("s3", "s3a"):
        return f"the default credentials of the {protocol}:// filesystem"
    s3 = storage.s3
    if s3.anonymous:
        return "anonymous access (storage.s3.anonymous: true)"
    if s3.key_env:
        names = [s3.key_env, s3.secret_env] + ([s3.token_env] if s3.token_env else [])
        return "credentials from the environment variables " + ", ".join(str(n) for n in names)
    return ("the default AWS credential chain (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, "
            "AWS_SESSION_TOKEN, AWS_PROFILE, ~/.aws, instance role); set storage.s3.key_env "
            "and secret_env to name others")


def protocol_of(url: str) -> str:
    return url.split("://", 1)[0].lower() if "://" in url else "file"


def filesystem(protocol: str, storage: StorageConfig) -> fsspec.AbstractFileSystem:
    """This process's filesystem object for ``protocol`` with ``storage``'s options (built once
    per process and options; credentials are part of the key, so a changed variable gives a
    new object).

    Raises:
        ImportError, ValueError: no fsspec backend for the protocol.
        ConfigError: a credential variable is not set here.
    """
    opts = fs_options(protocol, storage)
    key = (os.getpid(), protocol, storage.s3, storage.hf, hash(repr(sorted(opts.items()))))
    with _lock:
        fs = _filesystems.get(key)
        if fs is None:
            cls = fsspec.get_filesystem_class(protocol)
            if protocol == "hf":
                opts = {**opts, "skip_instance_cache": True}
            fs = _filesystems[key] = cls(**opts)
            if protocol in ("s3", "s3a"):
                fs.retries = 1                      # call_with_retries is the retry policy
    return fs


def request_pool(concurrency: int) -> ThreadPoolExecutor:
    """The process's pool for ranged requests: at most ``concurrency`` in flight at once."""
    key = (os.getpid(), concurrency)
    with _lock:
        pool = _pools.get(key)
        if pool is None:
            pool = _pools[key] = ThreadPoolExecutor(max_workers=concurrency,
                                                    thread_name_prefix="distmerge-read")
    return pool


# -- the retry policy (pure) ----------------------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class ReadRetry:
    """``attempts`` tries per request; before try ``n + 1`` wait ``base * 2**(n - 1)`` seconds,
    at most ``cap``, scaled by ``jitter_fraction`` in ``[1 - jitter, 1]`` so that workers
    throttled together do not come back together."""

    attempts: int = 5
    base: float = 0.25
    cap: float = 8.0
    jitter: float = 0.5

    def delay(self, attempt: int, jitter_fraction: float = 1.0) -> float:
        """Seconds to wait after failed try number ``attempt`` (1-based)."""
        d = min(self.cap, self.base * 2.0 ** (attempt - 1))
        return d * (1.0 - self.jitter * (1.0 - min(1.0, max(0.0, jitter_fraction))))


TRANSIENT_ERRNOS = frozenset({
    errno.EBUSY, errno.EAGAIN, errno.ECONNRESET, errno.ECONNABORTED, errno.ECONNREFUSED,
    errno.ETIMEDOUT, errno.EPIPE, errno.EIO, errno.EHOSTUNREACH, errno.ENETUNREACH,
    getattr(errno, "EREMOTEIO", 121),
})
# botocore, aiohttp and http.client classes, by name (no import of optional packages).
TRANSIENT_CLASS_NAMES = frozenset({
    "HTTPClientError", "EndpointConnectionError", "ConnectionClosedError", "ReadTimeoutError",
    "ConnectTimeoutError", "ProxyConnectionError", "ResponseStreamingError", "IncompleteRead",
    "ClientPayloadError", "ServerDisconnectedError", "ClientConnectionError", "ClientOSError",
    "ServerTimeoutError", "RemoteDisconnected", "FSTimeoutError",
})
DENIED_CODES = frozenset({
    "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken",
    "InvalidToken", "AllAccessDisabled", "AccountProblem", "Forbidden", "Unauthorized",
})
MISSING_CODES = frozenset({"NoSuchKey", "NoSuchBucket", "NotFound"})
TRANSIENT_CODES = frozenset({
    "SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout", "Throttling",
    "ThrottlingException", "RequestLimitExceeded", "TooManyRequests",
})


def _chain(err: BaseException) -> list[BaseException]:
    out: list[BaseException] = []
    e: BaseException | None = err
    while e is not None and e not in out and len(out) < 16:
        out.append(e)
        e = e.__cause__ or e.__context__
    return out


def _http(err: BaseException) -> tuple[int | None, str | None]:
    """HTTP status and error code of a botocore-style ``ClientError`` (``.response``) or an
    HTTP error with ``.status``/``.status_code``/``.code``."""
    resp = getattr(err, "response", None)
    if isinstance(resp, dict):
        e = resp.get("Error") or {}
        status = (resp.get("ResponseMetadata") or {}).get("HTTPStatusCode")
        code = e.get("Code")
        if status is None and isinstance(code, str) and code.isdigit():
            status = int(code)
        return (int(status) if status is not None else None), code
    for attr in ("status", "status_code", "code"):
        v = getattr(err, attr, None)
        if isinstance(v, int) and 100 <= v < 600:
            return v, None
    return None, None


def classify(err: BaseException) -> Kind:
    """What a failed request means, from the exception and its causes."""
    for e in _chain(err):
        status, code = _http(e)
        if status in (401, 403) or code in DENIED_CODES:
            return "denied"
        if status == 404 or code in MISSING_CODES:
            return "missing"
        if status == 416 or code == "InvalidRange":
            return "short"
        if (status is not None and (status >= 500 or status in (408, 429))) or code in TRANSIENT_CODES:
            return "transient"
    for e in _chain(err):
        if isinstance(e, PermissionError):
            return "denied"
        if isinstance(e, FileNotFoundError):
            return "missing"
        if isinstance(e, (TimeoutError, ConnectionError)):
            return "transient"
        if any(c.__name__ in TRANSIENT_CLASS_NAMES for c in type(e).__mro__):
            return "transient"
        if isinstance(e, OSError) and e.errno in TRANSIENT_ERRNOS:
            return "transient"
    return "permanent"


def _scrub(text: str, secrets: list[str]) -> str:
    for s in secrets:
        if s and len(s) >= 4:
            text = text.replace(s, "***")
    return text


def _secrets(protocol: str, storage: StorageConfig) -> list[str]:
    if protocol == "hf":
        return [os.environ.get(storage.hf.token_env) or ""] if storage.hf.token_env else []
    s3 = storage.s3
    if protocol not in ("s3", "s3a"):
        return []
    return [os.environ.get(n) or "" for n in (s3.key_env, s3.secret_env, s3.token_env) if n]


def call_with_retries(
    fn: Callable[[], T],
    *,
    url: str,
    storage: StorageConfig,
    what: str = "reading",
    sleep: Callable[[float], None] | None = None,
    rand: Callable[[], float] | None = None,
) -> T:
    """``fn()``, retried on transient errors; permanent ones become errors naming ``url``.

    Raises:
        SourceNotFoundError: 404 / no such object.
        AccessDeniedError: 401/403, wrong credentials (names the credential variables).
        UnsafeCheckpointError: 416, the object is shorter than the range asked for.
        StorageUnavailableError: still failing after ``storage.attempts`` tries.
        DistmergeError: raised by ``fn`` itself, unchanged.
        OSError: any other failure, with the URL in front of the original message.
    """
    import random

    policy = ReadRetry(attempts=storage.attempts)
    sleep = sleep or time.sleep
    rand = rand or random.random
    protocol = protocol_of(url)
    attempt = 0
    while True:
        attempt += 1
        try:
            return fn()
        except DistmergeError:
            raise
        except Exception as err:  # noqa: BLE001 - every failure is classified below
            kind = classify(err)
            status = next((h for h in map(lambda e: _http(e)[0], _chain(err)) if h), None)
            detail = _scrub((f"HTTP {status}, " if status else "") + f"{type(err).__name__}: {err}",
                            _secrets(protocol, storage))
            if kind == "missing":
                raise SourceNotFoundError(f"not found: {url} ({detail})") from None
            if kind == "denied":
                raise AccessDeniedError(
                    f"access denied {what} {url} ({detail}); requests used "
                    f"{credentials_note(protocol, storage)}: check that they may read it"
                ) from None
            if kind == "short":
                raise UnsafeCheckpointError(
                    f"{url}: ends before the bytes asked for ({detail}); truncated shard?"
                ) from None
            if kind == "transient" and attempt < policy.attempts:
                sleep(policy.delay(attempt, rand()))
                continue
            if kind == "transient":
                raise StorageUnavailableError(
                    f"{what} {url} failed {attempt} times with transient errors; last: {detail}"
                ) from None
            raise OSError(f"{what} {url}: {detail}") from None


# -- ranges --------------------------------------------------------------------------------------

def split_range(start: int, stop: int, part_size: int) -> list[tuple[int, int]]:
    """``[start, stop)`` as consecutive parts of at most ``part_size`` bytes, of nearly equal
    sizes (so the last one is not a sliver)."""
    n = stop - start
    if n <= 0:
        return []
    parts = -(-n // max(1, part_size))
    size = -(-n // parts)
    return [(a, min(stop, a + size)) for a in range(start, stop, size)]
