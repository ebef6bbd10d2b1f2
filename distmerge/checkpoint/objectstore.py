"""Object-store destinations (``s3://bucket/prefix``): every shard is one multipart upload.

Slices and parts
----------------
For an object-store output the plan is re-cut (:func:`distmerge.plan.coalesce_for_parts`) so
that each slice is exactly one part of its shard's multipart upload: consecutive slices of a
shard are joined until each holds at least ``MIN_PART`` bytes (S3's minimum part size, 5 MiB;
the last part of a shard may be smaller), part ``k`` of a shard is its ``k``-th slice, and
part 1 carries the shard's header in front of its first tensor. A worker merges a slice and
uploads it as its part (:class:`~distmerge.checkpoint.multipart.MultipartWriter`, with
Content-MD5 so the store rejects bytes damaged on the way); no process ever holds a whole
shard. A shard needing more than ``MAX_PARTS`` (10 000) parts is refused before any work.
Joining slices changes no output byte (every method is slice-invariant) and keeps a worker's
memory per piece; only a slice's output buffer grows to under ``MIN_PART`` plus one slice.

Nothing is visible before the end
---------------------------------
Parts of an incomplete multipart upload are not objects: nothing appears under the destination
prefix while workers upload. The gather stage checks every part against the plan and the
workers' receipts (ListParts: every part number, its size, the ETag the worker was given), then
publication completes each shard's upload, writes the config and tokenizer files, and writes
``model.safetensors.index.json`` last: a reader that finds the index finds every shard. S3 has
no multi-object transaction, so the shards become visible one by one during publication (a
few requests); if publication fails part-way, the objects it wrote are deleted again. A failed
run aborts its uploads (nothing left at the destination, no upload left open) unless it keeps
its staging area for ``--resume`` (:func:`distmerge.engine.driver.keeps_staging`), in which
case the open uploads are what a resume continues.

The staging area and resume
---------------------------
A run's state lives beside the destination, under the prefix
``<parent>/.<name>.distmerge-staging-<digest[:16]>/`` (the same name as the local staging
folder, :mod:`distmerge.checkpoint.writer`): ``plan.json`` (the identity, and the upload id of
every shard; written last when the run starts), ``stats.json`` (the reduced statistics after
each round), and ``manifest-<time>.jsonl`` objects, each a batch of finished slices ``{"slice",
"shard", "start", "stop", "crc32", "part", "etag", "stats"}`` (an object store has no append; the driver
writes a batch every :data:`MANIFEST_BATCH` slices or :data:`MANIFEST_SECONDS`, and at the end
or on failure). A resumed run takes a recorded slice as finished only when ListParts still
shows its part with the recorded ETag and the planned size (S3 checked the part's MD5 when it
was uploaded); others are redone (the same bytes under the same part number). The staging
objects are deleted after publication.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from typing import Any, NamedTuple

from distmerge.checkpoint.multipart import (
    MultipartSink,
    ShardUpload,
    Store,
    is_object_store,
    split_url,
)
from distmerge.checkpoint.source import INDEX_NAME
from distmerge.checkpoint.storage import protocol_of
from distmerge.checkpoint.writer import (
    MAX_STATE_BYTES,
    STAGING_FORMAT,
    STAGING_MARK,
    manifest_stats,
    parse_stats_blob,
    side_files,
    stats_blob,
)
from distmerge.config import StorageConfig
from distmerge.errors import ConfigError, DestinationError, MergeFailedError, SourceNotFoundError
from distmerge.plan import Plan, Slice

log = logging.getLogger(__name__)

MANIFEST_BATCH = 256
MANIFEST_SECONDS = 5.0
PLAN_OBJECT = "plan.json"
STATS_OBJECT = "stats.json"
MANIFEST_PREFIX = "manifest-"


def _staging_base(prefix: str) -> str:
    parent, _, name = prefix.rpartition("/")
    return (parent + "/" if parent else "") + f".{name}{STAGING_MARK}"


def refuse_object_staging(dest: str, found: list[str]) -> None:
    """Raises:
        DestinationError: ``found`` (:func:`object_staging_areas` of ``dest``) is not empty."""
    if found:
        raise DestinationError(
            f"output.path: {dest}: the staging area {found[-1]}/ of an earlier run exists; run "
            "again with --resume to continue it, or delete it (and abort its multipart uploads) "
            "to start over")


# -- the driver side -------------------------------------------------------------------------------

def check_object_destination(dest: str, *, overwrite: bool, sources: list[str],
                             storage: StorageConfig) -> None:
    """Refuse an unusable object-store destination before anything is read or written.

    Raises:
        ConfigError: no prefix inside the bucket.
        DestinationError: objects exist under it (without ``overwrite``), or it overlaps a source.
    """
    bucket, prefix = split_url(dest)
    for src in sources:
        if not is_object_store(src):
            continue
        try:
            sb, sp = split_url(src)
        except ConfigError:
            continue
        if sb == bucket and (sp == prefix or sp.startswith(prefix + "/") or prefix.startswith(sp + "/")):
            raise DestinationError(f"output.path: {dest} overlaps the source {src}; write the "
                                   "merge somewhere else")
    store = Store(storage, protocol_of(dest))
    if store.keys(bucket, prefix + "/", limit=1) and not overwrite:
        raise DestinationError(f"output.path: {dest} already holds objects; choose another "
                               "prefix or set output.overwrite: true (or pass --overwrite)")


def object_staging_areas(dest: str, storage: StorageConfig) -> list[str]:
    """``s3://`` URLs of every staging area of ``dest`` (any run)."""
    bucket, prefix = split_url(dest)
    base = _staging_base(prefix)
    store = Store(storage, protocol_of(dest))
    runs = sorted({k[len(base):].split("/", 1)[0] for k in store.keys(bucket, base)})
    return [f"{protocol_of(dest)}://{bucket}/{base}{r}" for r in runs if r]


class ObjectStoreOutput:
    """The output of one run to an object store, from the open uploads to publication (driver
    side); the same steps as :class:`~distmerge.checkpoint.writer.StagedOutput`."""

    def __init__(self, dest: str, storage: StorageConfig, *, run_id: str):
        self.dest = dest.rstrip("/")
        self.protocol = protocol_of(dest)
        self.bucket, self.prefix = split_url(dest)
        self.storage = storage
        self.run_id = run_id
        self.staging_key = f"{_staging_base(self.prefix)}{run_id}/"
        self.staging = f"{self.protocol}://{self.bucket}/{self.staging_key}"
        self.identity: dict[str, Any] | None = None
        self.digest: str | None = None
        self.resumed = False
        self.store = Store(storage, self.protocol)
        self.uploads: dict[int, str] = {}            # shard index -> upload id
        self.receipts: dict[int, dict] = {}           # slice index -> {"part", "etag", "size"}
        self.recorded_stats: dict[int, dict[str, int]] = {}   # from recorded_slices
        self._plan: Plan | None = None
        self._pending: list[str] = []
        self._flushed = time.monotonic()
        self._files: dict[str, bytes] = {}
        self._claimed: dict[int, dict] = {}

    # -- opening ----------------------------------------------------------------------------
    @classmethod
    def prepare(cls, dest: str, plan: Plan, identity: dict[str, Any], *, resume: bool,
                storage: StorageConfig) -> "ObjectStoreOutput":
        """The run's uploads and staging area: created, or (with ``resume``) the interrupted
        run's reopened.

        Raises:
            DestinationError: without ``resume``, a staging area of this destination exists;
                with it, the only ones are another pipeline's.
        """
        from distmerge.checkpoint.state import identity_digest

        digest = identity_digest(identity)
        out = cls(dest, storage, run_id=digest[:16])
        out.identity, out.digest, out._plan = identity, digest, plan
        found = object_staging_areas(dest, storage)
        others = [a for a in found if a.rstrip("/") != out.staging.rstrip("/")]
        state = out._read_state() if out.staging.rstrip("/") in [a.rstrip("/") for a in found] else None
        if not resume:
            refuse_object_staging(out.dest, found)
        if resume and state is not None:
            out._reopen(plan, state)
            return out
        if resume and others:
            raise DestinationError(
                f"output.path: {out.dest}: cannot resume: the staging area {others[-1]}/ belongs "
                "to a different pipeline (method, experts, inputs, output or slice plan changed); "
                "restore the pipeline it was started with, or delete it to start over")
        if resume:
            log.info("nothing to resume for %s: starting a new run", out.dest)
        out._create(plan)
        return out

    def _read_state(self) -> dict | None:
        data = self.store.get(self.bucket, self.staging_key + PLAN_OBJECT)
        if data is None or len(data) > MAX_STATE_BYTES:
            return None
        try:
            state = json.loads(data)
        except ValueError:
            return None
        return state if isinstance(state, dict) else None

    def _create(self, plan: Plan) -> None:
        for si, shard in enumerate(plan.shards):
            self.uploads[si] = self._new_upload(shard.filename)
        self._write_state(plan)

    def _new_upload(self, filename: str) -> str:
        key = f"{self.prefix}/{filename}"
        resp = self.store.call("create_multipart_upload", self.shard_path(filename),
                               "starting an upload of", Bucket=self.bucket, Key=key,
                               ContentType="application/octet-stream")
        return resp["UploadId"]

    def _write_state(self, plan: Plan) -> None:
        self.store.put(self.bucket, self.staging_key + PLAN_OBJECT, json.dumps({
            "format": STAGING_FORMAT, "digest": self.digest, "identity": self.identity,
            "slices": len(plan.slices), "shards": [s.filename for s in plan.shards],
            "uploads": {plan.shards[i].filename: u for i, u in sorted(self.uploads.items())},
        }, indent=1, sort_keys=True).encode())

    def _reopen(self, plan: Plan, state: dict) -> None:
        if state.get("format") != STAGING_FORMAT or state.get("digest") != self.digest:
            raise DestinationError(
                f"output.path: {self.dest}: cannot resume: {self.staging} holds another run's "
                "state; delete it (and abort its multipart uploads) to start over")
        uploads = state.get("uploads") or {}
        renewed = False
        for si, shard in enumerate(plan.shards):
            uid = uploads.get(shard.filename)
            if not isinstance(uid, str) or self.store.parts(self.bucket, f"{self.prefix}/{shard.filename}", uid) is None:
                log.warning("%s: its multipart upload is gone; its slices are redone", shard.filename)
                uid = self._new_upload(shard.filename)
                renewed = True
            self.uploads[si] = uid
        if renewed:
            self._write_state(plan)
        self.resumed = True

    # -- what workers need ------------------------------------------------------------------
    def shard_path(self, filename: str) -> str:
        return f"{self.protocol}://{self.bucket}/{self.prefix}/{filename}"

    def sink(self) -> MultipartSink:
        assert self._plan is not None
        plan = self._plan
        parts: dict[int, list[tuple[int, int]]] = {si: [] for si in range(len(plan.shards))}
        for p in _in_part_order(part_map(plan)):
            parts[p.shard].append((p.start, p.number))
        return MultipartSink(storage=self.storage, protocol=self.protocol, shards=tuple(
            ShardUpload(url=self.shard_path(sh.filename), bucket=self.bucket,
                        key=f"{self.prefix}/{sh.filename}", upload_id=self.uploads[si],
                        header=sh.header, parts=tuple(parts[si]))
            for si, sh in enumerate(plan.shards)))

    # -- the manifest of finished slices ------------------------------------------------------
    def record(self, s: Slice, crc32: int, receipt: dict | None = None, *,
               stats: dict[str, int] | None = None) -> None:
        if not isinstance(receipt, dict) or "etag" not in receipt:
            raise MergeFailedError(f"slice {s.index}: its worker reported no uploaded part")
        self.receipts[s.index] = receipt          # a slice merged again: its new part's ETag
        self._pending.append(json.dumps({
            "slice": s.index, "shard": s.shard, "start": s.start, "stop": s.stop, "crc32": crc32,
            "part": receipt["part"], "etag": receipt["etag"], "stats": stats or {}},
            separators=(",", ":")))
        if len(self._pending) >= MANIFEST_BATCH or time.monotonic() - self._flushed > MANIFEST_SECONDS:
            self._flush()

    def _flush(self) -> None:
        self._flushed = time.monotonic()
        if not self._pending:
            return
        lines, self._pending = self._pending, []
        name = f"{MANIFEST_PREFIX}{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.jsonl"
        self.store.put(self.bucket, self.staging_key + name, ("\n".join(lines) + "\n").encode())

    def recorded_slices(self, plan: Plan) -> dict[int, int]:
        """slice index -> crc32 of every slice the manifest batches record (the last record
        of a slice wins; records that disagree with the plan are ignored)."""
        out: dict[int, int] = {}
        for key in sorted(self.store.keys(self.bucket, self.staging_key + MANIFEST_PREFIX)):
            data = self.store.get(self.bucket, key) or b""
            for raw in data.splitlines():
                try:
                    rec = json.loads(raw)
                    i = rec["slice"]
                    s = plan.slices[i] if isinstance(i, int) and 0 <= i < len(plan.slices) else None
                    if s is None or (rec["shard"], rec["start"], rec["stop"]) != (s.shard, s.start, s.stop):
                        raise ValueError(raw)
                    if not isinstance(rec["crc32"], int) or not isinstance(rec["etag"], str):
                        raise ValueError(raw)
                    stats = manifest_stats(rec)
                except (ValueError, KeyError, TypeError):
                    continue
                out[i] = rec["crc32"]
                self.recorded_stats[i] = stats
                self._claimed[i] = {"part": rec["part"], "etag": rec["etag"]}
        return out

    def check_slices(self, plan: Plan, checksums: dict[int, int], *,
                     threads: int = 8) -> tuple[dict[int, int], list[int]]:
        """A recorded slice is finished when its part is still in the upload with the recorded
        ETag and the planned size. Returns (those slices, the indices of the others)."""
        listed = {si: self.store.parts(self.bucket, f"{self.prefix}/{sh.filename}", self.uploads[si]) or {}
                  for si, sh in enumerate(plan.shards)}
        parts = part_map(plan)
        good: dict[int, int] = {}
        bad: list[int] = []
        for i in sorted(checksums):
            claim = self._claimed.get(i)
            p = parts[i]
            have = listed[p.shard].get(p.number)
            if claim and claim["part"] == p.number and have == (claim["etag"], p.size):
                good[i] = checksums[i]
                self.receipts[i] = {"part": p.number, "etag": claim["etag"], "size": p.size}
            else:
                bad.append(i)
        return good, bad

    # -- statistics ---------------------------------------------------------------------------
    def save_stats(self, next_round: int, ctx: dict[str, Any]) -> bool:
        blob = stats_blob(self.digest or "", next_round, ctx)
        if blob is None:
            return False
        self.store.put(self.bucket, self.staging_key + STATS_OBJECT, blob)
        return True

    def load_stats(self) -> tuple[int, dict[str, Any]] | None:
        data = self.store.get(self.bucket, self.staging_key + STATS_OBJECT)
        if data is None:
            return None
        return parse_stats_blob(data, self.digest or "", where=self.staging + STATS_OBJECT)

    def close(self) -> None:
        """Write the manifest records not yet written (a failed run keeping its staging)."""
        self._flush()

    # -- gather and publish -------------------------------------------------------------------
    def finalize(self, plan: Plan, *, base_url: str, out_dtype: str | None) -> None:
        """Collect the small files (config, tokenizer, the index json) written at publication."""
        self._files = side_files(base_url, out_dtype=out_dtype)
        self._files[INDEX_NAME] = json.dumps(plan.index_json(), indent=2).encode()

    def verify(self, plan: Plan, checksums: dict[int, int]) -> None:
        """Every planned part is in its shard's upload, with the planned size and the ETag its
        worker was given; no other part is.

        Raises:
            MergeFailedError
        """
        self._flush()
        missing = [s.index for s in plan.slices if s.index not in checksums or s.index not in self.receipts]
        if missing:
            raise MergeFailedError(f"verification failed: {len(missing)} slices never reported (first {missing[:5]})")
        by_shard: dict[int, dict[int, tuple[str, int]]] = {}
        for i, p in part_map(plan).items():
            by_shard.setdefault(p.shard, {})[p.number] = (self.receipts[i]["etag"], p.size)
        for si, shard in enumerate(plan.shards):
            have = self.store.parts(self.bucket, f"{self.prefix}/{shard.filename}", self.uploads[si])
            if have != by_shard.get(si, {}):
                raise MergeFailedError(
                    f"verification failed: the upload of {shard.filename} holds parts other than "
                    "planned (a lost, extra or changed part)")

    def publish(self, *, overwrite: bool) -> None:
        """Complete every shard's upload, then write the small files, the index json last;
        with ``overwrite``, then delete the objects of the previous checkpoint that the new
        one does not replace; finally delete the staging area.

        Raises:
            DestinationError: objects appeared under the destination during the run (without
                ``overwrite``).
        """
        assert self._plan is not None
        plan = self._plan
        self._flush()
        old = set(self.store.keys(self.bucket, self.prefix + "/"))
        if old and not overwrite:
            raise DestinationError(f"output.path: {self.dest} holds objects that appeared during "
                                   "the run; not writing over them")
        parts_of: dict[int, list[dict]] = {si: [] for si in range(len(plan.shards))}
        for p in _in_part_order(part_map(plan)):          # S3 wants ascending part numbers
            parts_of[p.shard].append({"PartNumber": p.number, "ETag": self.receipts[p.slice]["etag"]})
        written: list[str] = []
        try:
            for si, shard in enumerate(plan.shards):
                key = f"{self.prefix}/{shard.filename}"
                parts = parts_of[si]
                self.store.call("complete_multipart_upload", self.shard_path(shard.filename),
                                "completing the upload of", Bucket=self.bucket, Key=key,
                                UploadId=self.uploads[si], MultipartUpload={"Parts": parts})
                written.append(key)
            for name in sorted(self._files, key=lambda n: n == INDEX_NAME):   # the index last
                key = f"{self.prefix}/{name}"
                self.store.put(self.bucket, key, self._files[name])
                written.append(key)
        except BaseException:
            if not old:
                log.warning("publication of %s failed; deleting the %d object(s) it wrote",
                            self.dest, len(written))
                try:
                    self.store.delete(self.bucket, written)
                except Exception as err:  # noqa: BLE001 - the original error matters more
                    log.warning("could not delete them: %s", err)
            raise
        stale = sorted(old - set(written))
        if stale:
            self.store.delete(self.bucket, stale)
        self._delete_staging()

    def _delete_staging(self) -> None:
        keys = self.store.keys(self.bucket, self.staging_key)
        if keys:
            self.store.delete(self.bucket, keys)

    def abort(self) -> None:
        """Abort every upload of the run and delete its staging area; the destination is
        untouched."""
        self._pending = []
        for si, uid in sorted(self.uploads.items()):
            key = f"{self.prefix}/{self._plan.shards[si].filename}" if self._plan else None
            if key is None:
                continue
            try:
                self.store.call("abort_multipart_upload", f"{self.protocol}://{self.bucket}/{key}",
                                "aborting the upload of", Bucket=self.bucket, Key=key, UploadId=uid)
            except SourceNotFoundError:
                pass
            except Exception as err:  # noqa: BLE001 - abort the others; say which is left
                log.warning("could not abort the upload %s of %s: %s", uid, key, err)
        try:
            self._delete_staging()
        except Exception as err:  # noqa: BLE001
            log.warning("could not delete the staging area %s: %s", self.staging, err)


class Part(NamedTuple):
    """Where one slice goes in its shard's multipart upload."""

    slice: int       # the slice's index in the plan
    shard: int
    number: int      # its part number (1-based, in slice order within the shard)
    size: int        # the part's bytes: the slice, plus the shard's header for part 1
    start: int       # the slice's byte offset in the shard file


def part_map(plan: Plan) -> dict[int, Part]:
    """slice index -> its :class:`Part`; the one place part numbers and sizes are derived
    (workers, resume checks, verification and completion all use it)."""
    out: dict[int, Part] = {}
    count: dict[int, int] = {}
    for s in plan.slices:
        n = count[s.shard] = count.get(s.shard, 0) + 1
        out[s.index] = Part(slice=s.index, shard=s.shard, number=n, start=s.start,
                            size=s.nbytes + (len(plan.shards[s.shard].header) if n == 1 else 0))
    return out


def _in_part_order(parts: dict[int, Part]) -> list[Part]:
    return sorted(parts.values(), key=lambda p: (p.shard, p.number))
