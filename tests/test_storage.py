"""Models on object stores: storage options, ranged reads, retries, errors naming the URL.

Object-store tests run against a real S3-compatible server on 127.0.0.1 (moto's threaded
server, :mod:`tests.s3server`), started once for the session and stopped at its end. One
conformance suite for the storage layer runs on ``memory://``, ``file://``, plain local paths
and that server.
"""

from __future__ import annotations

import errno
import pickle
import threading
import uuid
from pathlib import Path

import fsspec
import pytest
import torch
from fsspec.implementations.memory import MemoryFileSystem
from safetensors.torch import load_file, save_file

from distmerge.checkpoint import storage as st
from distmerge.checkpoint.reader import RangeReader
from distmerge.checkpoint.source import list_shards, read_header, read_model_headers
from distmerge.checkpoint.storage import (
    ReadRetry,
    call_with_retries,
    classify,
    split_range,
)
from distmerge.config import StorageConfig, load_pipeline, parse_pipeline
from distmerge.engine.driver import run_pipeline, validate
from distmerge.engine.executors import LocalExecutor
from distmerge.errors import (
    AccessDeniedError,
    ConfigError,
    SourceNotFoundError,
    StorageUnavailableError,
    UnsafeCheckpointError,
)
from tests.conftest import make_pipeline, sha256_tree

pytest.importorskip("s3fs")
pytest.importorskip("moto")

BUCKET = "distmerge-tests"
KEY_ENV, SECRET_ENV = "DM_TEST_S3_KEY", "DM_TEST_S3_SECRET"
SECRET_VALUE = "s3cr3t-Value-that-must-never-leak/+xyz"
SLICE = "16KB"                      # several slices per shard, few enough requests to stay quick


# -- the server -----------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def s3():
    """One moto S3 server on 127.0.0.1 for the session, with a public-read bucket."""
    from tests.s3server import S3Server

    server = S3Server()
    server.create_bucket(BUCKET, public_read=True)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def s3_models(s3, tiny_models) -> list[str]:
    """The tiny base and experts uploaded under ``s3://BUCKET/tiny/m{i}``."""
    return [s3.upload_folder(folder, BUCKET, f"tiny/m{i}") for i, folder in enumerate(tiny_models)]


def s3_storage(s3, **extra) -> dict:
    return {"s3": {"endpoint_url": s3.endpoint, "region": "us-east-1", **extra}}


@pytest.fixture
def s3_creds(monkeypatch):
    """Credentials in this process's environment, named (never given) by the pipeline."""
    monkeypatch.setenv(KEY_ENV, "AKIATESTKEYID000")
    monkeypatch.setenv(SECRET_ENV, SECRET_VALUE)


def _local_pipeline(tmp_path: Path, tiny_models, **changes) -> Path:
    return make_pipeline(tmp_path / "local", tiny_models, resources={"slice_size": SLICE}, **changes)


def _s3_pipeline(tmp_path: Path, urls: list[str], storage: dict, **changes) -> Path:
    return make_pipeline(tmp_path / "remote", [], base=urls[0],
                         experts=[{"path": u} for u in urls[1:]],
                         resources={"slice_size": SLICE}, storage=storage, **changes)


def _run(path: Path, executor="local"):
    return run_pipeline(load_pipeline(path), executor=executor, show_progress=False)


# -- the storage section --------------------------------------------------------------------------

def _with_storage(storage) -> dict:
    return {"base": "a", "experts": [{"path": "b"}, {"path": "c"}], "method": {"name": "linear"},
            "output": {"path": "o"}, "storage": storage}


def test_storage_section_is_typed_and_holds_only_names():
    p = parse_pipeline(_with_storage({"s3": {"endpoint_url": "http://127.0.0.1:9000",
                                             "key_env": "K", "secret_env": "S"},
                                      "part_size": "1MiB", "concurrency": 4}))
    assert p.storage.s3.key_env == "K" and p.storage.part_size == 2**20
    assert pickle.loads(pickle.dumps(p.storage)) == p.storage
    assert parse_pipeline(_with_storage({})).storage == StorageConfig()


@pytest.mark.parametrize("storage, key", [
    ({"s3": {"bogus": 1}}, "storage.s3.bogus: unknown key"),
    ({"gcs": {}}, "storage.gcs: unknown key"),
    ({"s3": {"key_env": "K"}}, "key_env and secret_env go together"),
    ({"s3": {"anonymous": True, "key_env": "K", "secret_env": "S"}}, "anonymous"),
    ({"s3": {"endpoint_url": "127.0.0.1:9000"}}, "storage.s3.endpoint_url"),
    ({"concurrency": 0}, "storage.concurrency"),
])
def test_bad_storage_sections_are_refused_with_the_key(storage, key):
    with pytest.raises(ConfigError, match=key):
        parse_pipeline(_with_storage(storage))


def test_a_credential_pasted_instead_of_a_name_is_refused_without_repeating_it():
    with pytest.raises(ConfigError) as err:
        parse_pipeline(_with_storage({"s3": {"key_env": "K", "secret_env": SECRET_VALUE}}))
    assert "storage.s3.secret_env" in str(err.value) and "NAME" in str(err.value)
    assert SECRET_VALUE not in str(err.value) and "s3cr3t" not in str(err.value)


def test_a_credential_variable_missing_in_this_process_is_named(monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)
    cfg = StorageConfig.model_validate({"s3": {"key_env": KEY_ENV, "secret_env": SECRET_ENV}})
    with pytest.raises(ConfigError, match=f"{KEY_ENV}, which is not set in this process"):
        st.fs_options("s3", cfg)


# -- the retry policy (pure) ----------------------------------------------------------------------

class _ClientError(Exception):
    """Shaped like botocore's ClientError."""

    def __init__(self, status: int, code: str):
        super().__init__(f"An error occurred ({code})")
        self.response = {"Error": {"Code": code, "Message": code},
                         "ResponseMetadata": {"HTTPStatusCode": status}}


class ReadTimeoutError(Exception):
    """Named like botocore's."""


def _translated(exc: BaseException, cause: BaseException) -> BaseException:
    exc.__cause__ = cause
    return exc


@pytest.mark.parametrize("err, kind", [
    (PermissionError("Forbidden"), "denied"),
    (FileNotFoundError("NoSuchKey"), "missing"),
    (_ClientError(403, "AccessDenied"), "denied"),
    (_ClientError(403, "InvalidAccessKeyId"), "denied"),
    (_ClientError(404, "NoSuchKey"), "missing"),
    (_ClientError(503, "SlowDown"), "transient"),
    (_ClientError(500, "InternalError"), "transient"),
    (_ClientError(429, "TooManyRequests"), "transient"),
    (_ClientError(400, "InvalidArgument"), "permanent"),
    (_ClientError(416, "InvalidRange"), "short"),
    (_translated(OSError(errno.EBUSY, "SlowDown"), _ClientError(503, "SlowDown")), "transient"),
    (_translated(PermissionError("denied"), _ClientError(403, "AccessDenied")), "denied"),
    (OSError(121, "InternalError"), "transient"),                  # s3fs: 500 → EREMOTEIO
    (ConnectionResetError(errno.ECONNRESET, "reset by peer"), "transient"),
    (TimeoutError("read timed out"), "transient"),
    (ReadTimeoutError("Read timeout on endpoint URL"), "transient"),
    (ValueError("bad"), "permanent"),
])
def test_classify(err, kind):
    assert classify(err) == kind


def test_backoff_is_exponential_capped_and_jittered_downwards():
    p = ReadRetry(attempts=8, base=0.25, cap=2.0, jitter=0.5)
    assert [p.delay(n) for n in range(1, 6)] == [0.25, 0.5, 1.0, 2.0, 2.0]
    assert p.delay(2, 0.0) == 0.25 and p.delay(2, 0.5) == 0.375


def test_split_range():
    assert split_range(0, 0, 10) == []
    assert split_range(5, 15, 10) == [(5, 15)]
    assert split_range(0, 25, 10) == [(0, 9), (9, 18), (18, 25)]
    parts = split_range(3, 1003, 64)
    assert parts[0][0] == 3 and parts[-1][1] == 1003
    assert all(b == c for (_, b), (c, _) in zip(parts, parts[1:]))
    assert max(b - a for a, b in parts) <= 64


def _call(fn, attempts=4):
    sleeps: list[float] = []
    cfg = StorageConfig(attempts=attempts)
    try:
        return call_with_retries(fn, url="s3://b/k", storage=cfg, sleep=sleeps.append,
                                 rand=lambda: 1.0), sleeps
    except Exception as e:  # noqa: BLE001
        e.sleeps = sleeps
        raise


def test_transient_errors_are_retried_with_backoff_then_succeed():
    errors = [ConnectionResetError(errno.ECONNRESET, "reset"), _ClientError(503, "SlowDown")]

    def fn():
        if errors:
            raise errors.pop(0)
        return b"ok"
    assert _call(fn) == (b"ok", [0.25, 0.5])


def test_transient_errors_beyond_the_attempts_name_the_url():
    def fn():
        raise TimeoutError("timed out")
    with pytest.raises(StorageUnavailableError, match=r"s3://b/k failed 3 times") as err:
        _call(fn, attempts=3)
    assert err.value.sleeps == [0.25, 0.5]
    assert not isinstance(err.value, SourceNotFoundError)      # the slice policy may retry it


@pytest.mark.parametrize("err, cls, text", [
    (_ClientError(403, "AccessDenied"), AccessDeniedError, "access denied reading s3://b/k"),
    (_ClientError(404, "NoSuchKey"), SourceNotFoundError, "not found: s3://b/k"),
    (ValueError("weird"), OSError, "reading s3://b/k: ValueError: weird"),
    (_ClientError(400, "InvalidArgument"), OSError, "reading s3://b/k: HTTP 400, _ClientError"),
])
def test_permanent_errors_are_not_retried_and_name_the_url(err, cls, text):
    def fn():
        raise err
    with pytest.raises(cls, match=text) as e:
        _call(fn)
    assert e.value.sleeps == []


def test_access_denied_names_the_credential_variables_never_their_values(monkeypatch):
    monkeypatch.setenv(KEY_ENV, "AKIATESTKEYID000")
    monkeypatch.setenv(SECRET_ENV, SECRET_VALUE)
    cfg = StorageConfig.model_validate({"s3": {"key_env": KEY_ENV, "secret_env": SECRET_ENV}})

    def fn():
        raise _ClientError(403, f"SignatureDoesNotMatch for {SECRET_VALUE}")
    with pytest.raises(AccessDeniedError) as err:
        call_with_retries(fn, url="s3://b/k", storage=cfg, sleep=lambda s: None)
    msg = str(err.value)
    assert KEY_ENV in msg and SECRET_ENV in msg and SECRET_VALUE not in msg
    assert pickle.loads(pickle.dumps(err.value)).message == msg


# -- ranged reads through a flaky in-process filesystem ---------------------------------------------

class FlakyFS(MemoryFileSystem):
    """memory:// with injected failures and a count of requests in flight."""

    protocol = "dmflaky"
    failures: list[BaseException] = []
    lock = threading.Lock()
    in_flight = 0
    max_in_flight = 0
    requests: list[tuple[int, int]] = []

    @classmethod
    def _strip_protocol(cls, path):
        return super()._strip_protocol(path.replace("dmflaky://", "memory://", 1))

    def cat_file(self, path, start=None, end=None, **kwargs):
        cls = type(self)
        with cls.lock:
            cls.in_flight += 1
            cls.max_in_flight = max(cls.max_in_flight, cls.in_flight)
            cls.requests.append((start, end))
            err = cls.failures.pop(0) if cls.failures else None
        try:
            threading.Event().wait(0.005)   # time.sleep is patched out by the fixture
            if err is not None:
                raise err
            return super().cat_file(path, start=start, end=end, **kwargs)
        finally:
            with cls.lock:
                cls.in_flight -= 1


@pytest.fixture
def flaky(monkeypatch):
    fsspec.register_implementation("dmflaky", FlakyFS, clobber=True)
    FlakyFS.failures, FlakyFS.requests, FlakyFS.max_in_flight = [], [], 0
    monkeypatch.setattr(st.time, "sleep", lambda s: None)
    name = f"dm-flaky-{uuid.uuid4().hex}"
    data = bytes(range(256)) * 400                      # 102 400 bytes
    fsspec.filesystem("memory").pipe(f"/{name}/blob", data)
    yield f"dmflaky://{name}/blob", data
    fsspec.filesystem("memory").rm(f"/{name}", recursive=True)


def test_a_range_is_read_as_parallel_parts_with_bounded_concurrency(flaky):
    url, data = flaky
    cfg = StorageConfig(concurrency=3, part_size=1000)
    outs = [torch.empty(50_000, dtype=torch.uint8) for _ in range(4)]

    def read(out):
        RangeReader(cfg).read_range(url, 1234, 51_234, out)
    threads = [threading.Thread(target=read, args=(o,)) for o in outs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for out in outs:
        assert out.numpy().tobytes() == data[1234:51_234]
    assert len(FlakyFS.requests) == 4 * 50
    assert all(b - a <= 1000 for a, b in FlakyFS.requests)
    assert 2 <= FlakyFS.max_in_flight <= 3


def test_a_failed_part_is_retried_alone(flaky):
    url, data = flaky
    FlakyFS.failures = [ConnectionResetError(errno.ECONNRESET, "reset"), TimeoutError("slow")]
    out = torch.empty(10_000, dtype=torch.uint8)
    RangeReader(StorageConfig(concurrency=4, part_size=2500)).read_range(url, 0, 10_000, out)
    assert out.numpy().tobytes() == data[:10_000]
    assert len(FlakyFS.requests) == 4 + 2


def test_a_part_failing_for_good_fails_the_read_naming_the_url(flaky):
    url, _ = flaky
    FlakyFS.failures = [PermissionError("Forbidden")]
    with pytest.raises(AccessDeniedError, match=f"access denied reading {url}"):
        RangeReader(StorageConfig(part_size=2500)).read_range(url, 0, 10_000,
                                                              torch.empty(10_000, dtype=torch.uint8))
    FlakyFS.failures = [ConnectionResetError(errno.ECONNRESET, "reset")] * 3
    with pytest.raises(StorageUnavailableError, match=f"{url} failed 2 times"):
        RangeReader(StorageConfig(attempts=2, concurrency=1)).read_range(
            url, 0, 100, torch.empty(100, dtype=torch.uint8))


def test_a_short_part_is_a_truncated_shard(flaky):
    url, data = flaky
    with pytest.raises(UnsafeCheckpointError, match="truncated"):
        RangeReader(StorageConfig(part_size=4096)).read_range(
            url, len(data) - 5000, len(data) + 100, torch.empty(5100, dtype=torch.uint8))


# -- the storage conformance suite: memory://, file://, local paths, S3 ----------------------------

BACKENDS = ["memory", "file-url", "local-path", "s3"]


@pytest.fixture(params=BACKENDS)
def backend(request, tmp_path, tiny_models):
    """(model URL, its local copy, the storage options) for one expert on each backend."""
    folder = tiny_models[1]
    kind = request.param
    if kind == "s3":
        server = request.getfixturevalue("s3")
        url = server.upload_folder(folder, BUCKET, f"conformance/{uuid.uuid4().hex}")
        yield url, folder, StorageConfig.model_validate(s3_storage(server, anonymous=True))
        return
    if kind == "memory":
        root = f"memory://dm-conformance-{uuid.uuid4().hex}"
        fs = fsspec.filesystem("memory")
        for f in folder.iterdir():
            fs.pipe(f"{root}/{f.name}", f.read_bytes())
        yield root, folder, StorageConfig()
        fs.rm(root, recursive=True)
        return
    copy = tmp_path / "model"
    copy.mkdir()
    for f in folder.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    yield (f"file://{copy}" if kind == "file-url" else str(copy)), folder, StorageConfig()


def _rel(urls, root):
    return [u[len(root):] for u in urls]


def test_conformance_list_shards(backend):
    url, folder, cfg = backend
    shards, weight_map = list_shards(url, storage=cfg)
    ref_shards, ref_map = list_shards(str(folder))
    assert len(shards) >= 2 and _rel(shards, url) == _rel(ref_shards, str(folder))
    assert {k: v[len(url):] for k, v in weight_map.items()} == \
           {k: v[len(str(folder)):] for k, v in ref_map.items()}


def test_conformance_read_header(backend):
    url, folder, cfg = backend
    remote = read_model_headers(url, storage=cfg)
    local = read_model_headers(str(folder))
    assert {n: i for n, (_, i) in remote.tensors.items()} == {n: i for n, (_, i) in local.tensors.items()}
    first = remote.shards[0]
    assert read_header(first, storage=cfg) == read_header(str(folder) + first[len(url):])


@pytest.mark.parametrize("part_size", [1 << 20, 300])
def test_conformance_read_rows_exact_bytes(backend, part_size):
    url, folder, cfg = backend
    cfg = cfg.model_copy(update={"part_size": part_size})
    expected = {}
    for f in sorted(folder.glob("*.safetensors")):
        expected.update(load_file(str(f)))
    headers = read_model_headers(url, storage=cfg)
    reader = RangeReader(cfg)
    for name, (shard, info) in headers.tensors.items():
        rows = info.rows
        r0, r1 = (1, min(rows, 5)) if rows > 2 else (0, rows)
        got = reader.read_rows(0, shard, info, r0, r1)
        want = expected[name].reshape(rows, -1)[r0:r1]
        assert torch.equal(got.view(torch.uint8), want.contiguous().view(torch.uint8)), name
    reader.close()


def test_conformance_missing_file(backend):
    url, _, cfg = backend
    with pytest.raises(SourceNotFoundError, match="not found"):
        list_shards(url + "/no-such-model", storage=cfg)
    with pytest.raises(SourceNotFoundError, match="no-such-shard.safetensors"):
        read_header(url + "/no-such-shard.safetensors", storage=cfg)
    with pytest.raises(SourceNotFoundError, match="no-such-shard.safetensors"):
        RangeReader(cfg).read_range(url + "/no-such-shard.safetensors", 0, 10,
                                    torch.empty(10, dtype=torch.uint8))


# -- S3 end to end --------------------------------------------------------------------------------

def test_validate_reads_headers_from_s3(tmp_path, s3, s3_models, tiny_models, s3_creds):
    pipeline = load_pipeline(_s3_pipeline(tmp_path, s3_models, s3_storage(
        s3, key_env=KEY_ENV, secret_env=SECRET_ENV)))
    v = validate(pipeline)
    local = read_model_headers(str(tiny_models[0]))
    assert v.base.url == s3_models[0] and len(v.base.shards) == len(local.shards) >= 3
    assert {n: i for n, (_, i) in v.base.tensors.items()} == {n: i for n, (_, i) in local.tensors.items()}


def test_ranged_reads_of_a_many_shard_model_read_only_the_ranges(s3, s3_models, tiny_models, monkeypatch):
    """Every tensor of a model split across several shards, read by ranges in parallel parts:
    exactly the tensors' bytes are requested, never a whole file."""
    cfg = StorageConfig.model_validate({**s3_storage(s3, anonymous=True), "part_size": 512})
    headers = read_model_headers(s3_models[2], storage=cfg)
    assert len(headers.shards) >= 3
    fs = st.filesystem("s3", cfg)
    requested: list[tuple[int, int]] = []
    real = fs.cat_file

    def spy(path, start=None, end=None, **kw):
        assert start is not None and end is not None, "a whole-object GET"
        requested.append((start, end))
        return real(path, start=start, end=end, **kw)
    monkeypatch.setattr(fs, "cat_file", spy)
    expected = {}
    for f in sorted(tiny_models[2].glob("*.safetensors")):
        expected.update(load_file(str(f)))
    reader = RangeReader(cfg)
    for name, (shard, info) in headers.tensors.items():
        got = reader.read_rows(0, shard, info, 0, info.rows)
        assert torch.equal(got.reshape(expected[name].shape), expected[name]), name
    assert sum(b - a for a, b in requested) == headers.nbytes
    assert max(b - a for a, b in requested) <= 512 and len(requested) > len(headers.tensors)


class _Capturing(LocalExecutor):
    jobs: list = []

    def start(self, job):
        self.jobs.append(job)
        super().start(job)


def test_merge_from_s3_equals_the_merge_from_local_copies(tmp_path, s3, s3_models, tiny_models,
                                                          s3_creds, caplog):
    remote = _s3_pipeline(tmp_path, s3_models, s3_storage(s3, key_env=KEY_ENV, secret_env=SECRET_ENV))
    local = _local_pipeline(tmp_path, tiny_models)
    executor = _Capturing()
    with caplog.at_level("DEBUG"):
        summary = run_pipeline(load_pipeline(remote), executor=executor, show_progress=False)
    _run(local)
    assert summary.bytes_read > 0
    assert sha256_tree(tmp_path / "remote" / "out") == sha256_tree(tmp_path / "local" / "out")
    assert (tmp_path / "remote" / "out" / "config.json").read_bytes() == \
           (tmp_path / "local" / "out" / "config.json").read_bytes()
    job = executor.jobs[-1]
    assert job.storage.s3.key_env == KEY_ENV and job.storage.s3.endpoint_url == s3.endpoint
    assert SECRET_VALUE.encode() not in pickle.dumps(job)           # what Ray would ship
    assert SECRET_VALUE not in caplog.text


@pytest.mark.ray
def test_merge_from_s3_on_ray_workers(tmp_path, ray_session, s3, s3_models, tiny_models):
    """Ray workers (other processes) open their own S3 filesystem from the Job's options."""
    remote = _s3_pipeline(tmp_path, s3_models, s3_storage(s3, anonymous=True))
    local = _local_pipeline(tmp_path, tiny_models)
    summary = _run(remote, executor="ray")
    _run(local)
    assert summary.bytes_read > 0
    assert sha256_tree(tmp_path / "remote" / "out") == sha256_tree(tmp_path / "local" / "out")


def test_a_missing_expert_on_s3_is_not_found(tmp_path, s3, s3_models, s3_creds):
    missing = f"s3://{BUCKET}/tiny/no-such-expert"
    pipeline = load_pipeline(_s3_pipeline(tmp_path, [*s3_models[:2], missing],
                                          s3_storage(s3, key_env=KEY_ENV, secret_env=SECRET_ENV)))
    with pytest.raises(SourceNotFoundError, match=missing):
        run_pipeline(pipeline, executor="local", show_progress=False)
    assert not (tmp_path / "remote" / "out").exists()


@pytest.fixture(scope="session")
def single_file_models(s3, tiny_models, tmp_path_factory) -> list[str]:
    """Base and experts as single .safetensors files under ``authz/`` (m2 under ``denied/``)."""
    out = tmp_path_factory.mktemp("single")
    urls = []
    for i, folder in enumerate(tiny_models[:3]):
        tensors = {}
        for f in sorted(folder.glob("*.safetensors")):
            tensors.update(load_file(str(f)))
        save_file(tensors, str(out / f"m{i}.safetensors"))
        key = f"authz/denied/m{i}.safetensors" if i == 2 else f"authz/m{i}.safetensors"
        urls.append(s3.put(BUCKET, key, (out / f"m{i}.safetensors").read_bytes()))
    return urls


@pytest.fixture(scope="session")
def reader_user(s3) -> tuple[str, str]:
    """An IAM user who may read the bucket except ``authz/denied/``."""
    return s3.create_user("dm-reader", [
        {"Effect": "Allow", "Action": "s3:*", "Resource": "*"},
        {"Effect": "Deny", "Action": "s3:GetObject", "Resource": f"arn:aws:s3:::{BUCKET}/authz/denied/*"},
    ])


def test_a_403_on_one_expert_is_reported_as_access_denied(tmp_path, s3, single_file_models,
                                                          reader_user, monkeypatch):
    key, secret = reader_user
    monkeypatch.setenv("DM_READER_KEY", key)
    monkeypatch.setenv("DM_READER_SECRET", secret)
    storage = s3_storage(s3, key_env="DM_READER_KEY", secret_env="DM_READER_SECRET")
    cfg = StorageConfig.model_validate(storage)
    pipeline = load_pipeline(_s3_pipeline(tmp_path, single_file_models, storage))
    denied = single_file_models[2]
    with s3.iam_auth():
        assert read_model_headers(single_file_models[1], storage=cfg).tensors   # allowed
        with pytest.raises(AccessDeniedError) as err:                           # driver: headers
            validate(pipeline)
        # a worker's ranged read of the same object
        with pytest.raises(AccessDeniedError, match=f"access denied reading {denied}"):
            RangeReader(cfg).read_range(denied, 8, 64, torch.empty(56, dtype=torch.uint8))
    msg = str(err.value)
    assert denied in msg and "DM_READER_KEY" in msg and "DM_READER_SECRET" in msg
    assert secret not in msg and key not in msg
    assert err.value.exit_code == 3 and isinstance(err.value, PermissionError)


def test_wrong_credentials_are_access_denied_naming_the_variables(tmp_path, s3, single_file_models,
                                                                 reader_user, s3_creds):
    pipeline = load_pipeline(_s3_pipeline(tmp_path, single_file_models,
                                          s3_storage(s3, key_env=KEY_ENV, secret_env=SECRET_ENV)))
    with s3.iam_auth(), pytest.raises(AccessDeniedError) as err:
        validate(pipeline)
    msg = str(err.value)
    assert single_file_models[0] in msg and KEY_ENV in msg and SECRET_ENV in msg
    assert SECRET_VALUE not in msg and "AKIATESTKEYID000" not in msg
