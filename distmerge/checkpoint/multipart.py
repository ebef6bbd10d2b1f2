"""S3 multipart uploads: the calls (through this process's s3fs client, under the retry policy
of :mod:`distmerge.checkpoint.storage`) and the worker side of an object-store destination,
which uploads each merge slice as one part of its shard's upload (see
:mod:`distmerge.checkpoint.objectstore` for the design)."""

from __future__ import annotations

import base64
import hashlib
import threading
from dataclasses import dataclass
from typing import Any

from distmerge.checkpoint.storage import call_with_retries, filesystem, protocol_of
from distmerge.config import StorageConfig
from distmerge.errors import ConfigError, MergeFailedError, SourceNotFoundError

MIN_PART = 5 * 2**20          # S3: every part but the last at least 5 MiB
MAX_PARTS = 10_000            # S3: part numbers 1..10000
MAX_PART = 5 * 2**30          # S3: at most 5 GiB per part
OBJECT_STORE_PROTOCOLS = ("s3", "s3a")


def is_object_store(url: str) -> bool:
    return protocol_of(url) in OBJECT_STORE_PROTOCOLS


def split_url(url: str) -> tuple[str, str]:
    """(bucket, key prefix without slashes at either end) of ``s3://bucket/prefix``.

    Raises:
        ConfigError: no prefix (a whole bucket is not a destination).
    """
    rest = url.split("://", 1)[1].strip("/")
    bucket, _, prefix = rest.partition("/")
    if not bucket or not prefix:
        raise ConfigError(f"output.path: {url}: give a prefix inside the bucket "
                          "(s3://bucket/path/to/model), not a whole bucket")
    return bucket, prefix


class Store:
    """S3 calls through this process's s3fs client, each under the retry policy."""

    def __init__(self, storage: StorageConfig, protocol: str = "s3"):
        self.storage = storage
        self.fs = filesystem(protocol, storage)

    def call(self, method: str, url: str, what: str, **kw) -> dict:
        return call_with_retries(lambda: self.fs.call_s3(method, **kw), url=url,
                                 storage=self.storage, what=what)

    def keys(self, bucket: str, prefix: str, *, limit: int | None = None) -> list[str]:
        out: list[str] = []
        token = None
        while True:
            kw: dict[str, Any] = {"Bucket": bucket, "Prefix": prefix}
            if token:
                kw["ContinuationToken"] = token
            if limit:
                kw["MaxKeys"] = limit
            resp = self.call("list_objects_v2", f"s3://{bucket}/{prefix}", "listing", **kw)
            out += [o["Key"] for o in resp.get("Contents", [])]
            token = resp.get("NextContinuationToken")
            if not resp.get("IsTruncated") or not token or (limit and len(out) >= limit):
                return out

    def parts(self, bucket: str, key: str, upload_id: str) -> dict[int, tuple[str, int]] | None:
        """part number -> (ETag, size) of an open upload; None when the upload is gone."""
        out: dict[int, tuple[str, int]] = {}
        marker = 0
        url = f"s3://{bucket}/{key}"
        while True:
            try:
                resp = self.call("list_parts", url, "listing the parts of", Bucket=bucket, Key=key,
                                 UploadId=upload_id, PartNumberMarker=marker)
            except SourceNotFoundError:          # NoSuchUpload: completed or aborted
                return None
            for p in resp.get("Parts", []):
                out[int(p["PartNumber"])] = (p["ETag"], int(p["Size"]))
            if not resp.get("IsTruncated"):
                return out
            marker = int(resp["NextPartNumberMarker"])

    def get(self, bucket: str, key: str) -> bytes | None:
        try:
            return call_with_retries(lambda: self.fs.cat_file(f"{bucket}/{key}"),
                                     url=f"s3://{bucket}/{key}", storage=self.storage)
        except SourceNotFoundError:
            return None

    def put(self, bucket: str, key: str, data: bytes) -> None:
        self.call("put_object", f"s3://{bucket}/{key}", "writing", Bucket=bucket, Key=key, Body=data,
                  ContentMD5=base64.b64encode(hashlib.md5(data).digest()).decode())

    def delete(self, bucket: str, keys: list[str]) -> None:
        for i in range(0, len(keys), 1000):
            batch = keys[i:i + 1000]
            self.call("delete_objects", f"s3://{bucket}/{batch[0]}", "deleting", Bucket=bucket,
                      Delete={"Objects": [{"Key": k} for k in batch], "Quiet": True})


# -- the worker side -------------------------------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class ShardUpload:
    url: str                   # s3://bucket/prefix/<shard file>: the Job's shard_paths entry
    bucket: str
    key: str
    upload_id: str
    header: bytes              # written in front of part 1
    parts: tuple[tuple[int, int], ...]   # (byte offset of a slice, its part number), from
                                         # objectstore.part_map


@dataclass(frozen=True, kw_only=True)
class MultipartSink:
    """Sent to every worker in its Job: the open upload of each shard and how slices map to
    part numbers. Holds no secret (credentials are read in each worker from the variables
    ``storage`` names)."""

    storage: StorageConfig
    protocol: str
    shards: tuple[ShardUpload, ...]

    def open(self) -> "MultipartWriter":
        return MultipartWriter(self)


class MultipartWriter:
    """Uploads each merge slice as its part (worker side); thread-safe."""

    def __init__(self, spec: MultipartSink):
        self.spec = spec
        self._by_url = {s.url: (s, dict(s.parts)) for s in spec.shards}
        self._store: Store | None = None
        self._lock = threading.Lock()

    def write(self, path: str, offset: int, data) -> dict:
        shard, parts = self._by_url[path]
        part = parts.get(offset)
        if part is None:
            raise MergeFailedError(f"{path}: no multipart part starts at byte {offset}; the "
                                   "plan and the upload disagree")
        view = memoryview(data).cast("B")
        # one copy of the slice's bytes; part 1 carries the shard's header in front
        body = b"".join((shard.header, view)) if part == 1 else view.tobytes()
        if len(body) > MAX_PART:
            raise MergeFailedError(f"{path}: part {part} is {len(body)} bytes, over {MAX_PART}")
        with self._lock:
            if self._store is None:
                self._store = Store(self.spec.storage, self.spec.protocol)
        resp = self._store.call(
            "upload_part", path, "uploading", Bucket=shard.bucket, Key=shard.key,
            UploadId=shard.upload_id, PartNumber=part, Body=body,
            ContentMD5=base64.b64encode(hashlib.md5(body).digest()).decode())
        return {"part": part, "etag": resp["ETag"], "size": len(body)}

    def close(self) -> None:
        self._store = None
