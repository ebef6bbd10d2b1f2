"""The output checkpoint: a staging folder of preallocated shards, completed and published
atomically, and resumable after the driver dies.

Driver side (:class:`StagedOutput`): refuse a destination that exists (without ``overwrite``)
or lies inside a source; create a staging folder beside the destination (same filesystem, so
the final rename is atomic) holding every shard at its final size with its header written;
after the merge pass write the index json, copy config and tokenizer files from the base,
verify every planned byte against the workers' checksums, and rename the folder into place.
Nothing is visible at the destination before that rename.

Resumable runs (:meth:`StagedOutput.prepare`). A run's staging folder is named after the
destination and the run's identity, ``.<dest>.distmerge-staging-<digest[:16]>``, where the
digest is the sha256 of everything that decides the output bytes (see
:func:`distmerge.checkpoint.state.identity_digest`). Beside the shards it holds the run's state, which lives nowhere else
(not in memory, not in Ray), so the same command run again on a new cluster finds it:

- ``plan.json``: the staging format, the full digest and the identity it was computed from
  (so a refusal can say what changed); written last when the folder is created, so a folder
  without it holds no finished work.
- ``manifest.jsonl``: one JSON line per finished merge slice, ``{"slice", "shard", "start",
  "stop", "crc32", "stats"}`` (the crc32 its worker computed over the bytes it wrote; the
  slice's exact merge statistics, which say under which speculated context it was merged:
  ``Method.merge_with_stats``), appended and fdatasync'ed as each slice's report reaches the
  driver. A torn last line is ignored; a slice merged again appends a line, and the last wins.
- ``stats.json``: after each statistics round, the reduced context (the only state carried
  between rounds) in a tagged, exact JSON encoding (:mod:`distmerge.checkpoint.state`; no pickle), with its
  sha256. A resumed run restarts the statistics at the first round not saved.

Without ``resume`` any staging folder of the destination is refused (never reused, never
deleted). With ``resume`` the folder of the same identity is reopened: every recorded slice's
bytes are read back and checked against their crc32 (a mismatch is redone), finished slices
are skipped; a staging folder of another identity is refused with what changed. The state
files are removed just before the final rename, so the published folder holds only the model.
Whether a failed run keeps its staging folder is the driver's policy
(:func:`distmerge.engine.driver.keeps_staging`); :meth:`StagedOutput.abort` removes it.

Worker side (:class:`ShardWriter`): positional writes of a slice's bytes at their planned
offset. A slice always writes the same bytes at the same place, so a retried slice is harmless.

Object stores and the Hub publish differently and plug in beside this class through the same
steps (:mod:`distmerge.checkpoint.destination`): :mod:`~distmerge.checkpoint.objectstore`
(one multipart upload per shard, a :class:`SliceSink` per worker uploading its slices as
parts) and :mod:`~distmerge.checkpoint.hub` (this class's staging folder, published as one
commit).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import posixpath
import re
import shutil
import threading
import uuid
import zlib
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

from distmerge.checkpoint.header import header_length, parse_header
from distmerge.checkpoint.source import INDEX_NAME, is_local, local_path, open_fs
from distmerge.checkpoint.state import decode_state, encode_state, identity_digest
from distmerge.errors import ConfigError, DestinationError, MergeFailedError
from distmerge.plan import Plan, Slice

log = logging.getLogger(__name__)

# Files beside the weights that a merged model needs to load and tokenize like its base.
COPIED_SUFFIXES = (".json", ".model", ".txt", ".jinja", ".tiktoken")
MAX_COPIED_BYTES = 50 * 10**6

STAGING_FORMAT = 1
STAGING_MARK = ".distmerge-staging-"
PLAN_FILE = "plan.json"
MANIFEST_FILE = "manifest.jsonl"
STATS_FILE = "stats.json"
STATE_FILES = (STATS_FILE, MANIFEST_FILE, PLAN_FILE)     # removed in this order before publishing
MAX_STATE_BYTES = 1 << 30
READ_BACK_THREADS = 8           # threads that read written slices back to check their crc32


def _inside(child: str, parent: str) -> bool:
    return os.path.commonpath([child, parent]) == parent


def check_destination(dest: str, *, overwrite: bool, sources: list[str]) -> None:
    """Refuse an unusable destination before anything is read or written.

    Raises:
        ConfigError: the destination is not a local or shared filesystem path.
        DestinationError: it exists (and ``overwrite`` is off), or it is a source, lies inside
            one, or contains one.
    """
    if not is_local(dest):
        raise ConfigError(
            f"output.path: {dest}: not a local or shared-filesystem path "
            "(see distmerge.checkpoint.destination for s3:// and hf:// destinations)"
        )
    real = os.path.realpath(local_path(dest))
    for src in sources:
        if not is_local(src):
            continue
        s = os.path.realpath(local_path(src))
        if _inside(real, s) or _inside(s, real):
            raise DestinationError(
                f"output.path: {dest} overlaps the source {src}; write the merge somewhere else"
            )
    if os.path.exists(real):
        if not overwrite:
            raise DestinationError(
                f"output.path: {dest} already exists; choose another path or set "
                "output.overwrite: true (or pass --overwrite)"
            )
        if not os.path.isdir(real):
            raise DestinationError(f"output.path: {dest} exists and is not a folder")


class StagedOutput:
    """The output of one run, from staging to publication (driver side).

    ``StagedOutput(dest).create(plan)`` is a one-off staging folder (random name, no resume
    state); :meth:`prepare` is the resumable one a merge run uses.
    """

    def __init__(self, dest: str, *, run_id: str | None = None, staging_root: str | None = None):
        parent, name = staging_place(dest, staging_root)
        self.dest = os.path.join(parent, name) if staging_root is None else dest
        self.run_id = run_id or uuid.uuid4().hex[:12]
        self.staging = os.path.join(parent, f".{name}{STAGING_MARK}{self.run_id}")
        self.identity: dict[str, Any] | None = None
        self.digest: str | None = None
        self.resumed = False                  # reopened an interrupted run's folder
        self._manifest_fd: int | None = None
        self.recorded_stats: dict[int, dict[str, int]] = {}   # from recorded_slices

    def shard_path(self, filename: str) -> str:
        return os.path.join(self.staging, filename)

    # -- opening a run's staging folder -------------------------------------------------------
    @classmethod
    def prepare(cls, dest: str, plan: Plan, identity: dict[str, Any], *, resume: bool,
                staging_root: str | None = None) -> "StagedOutput":
        """The staging folder of the run whose identity is ``identity``: created, or (with
        ``resume``) the interrupted run's reopened. Check :attr:`resumed`, then
        :meth:`recorded_slices` and :meth:`load_stats` for what it had finished.

        Raises:
            DestinationError: without ``resume``, a staging folder of this destination exists;
                with it, the only staging folders are another pipeline's (or hold no state).
        """
        digest = identity_digest(identity)
        out = cls(dest, run_id=digest[:16], staging_root=staging_root)
        out.identity, out.digest = identity, digest
        found = staging_folders(dest, staging_root)
        others = [p for p in found if p != out.staging]
        if not resume:
            refuse_existing_staging(dest, staging_root)
        elif os.path.isdir(out.staging) and os.path.exists(os.path.join(out.staging, PLAN_FILE)):
            out._reopen(plan)
            if others:
                log.warning("resuming %s; other staging folders of this destination are left "
                            "as they are: %s", out.staging, ", ".join(others))
            return out
        elif others:
            raise DestinationError(_changed_message(out.dest, others, identity))
        elif os.path.isdir(out.staging):
            # created but interrupted before plan.json (written last): it holds nothing finished
            log.warning("%s was interrupted while being created; creating it again", out.staging)
            shutil.rmtree(out.staging)
        else:
            log.info("nothing to resume for %s: starting a new run", out.dest)
        out.create(plan)
        return out

    def create(self, plan: Plan) -> None:
        """Make the staging folder with every shard at its final size, header written; for a
        resumable run (one from :meth:`prepare`), an empty manifest, then ``plan.json`` last."""
        os.makedirs(os.path.dirname(self.staging), exist_ok=True)
        os.makedirs(self.staging)
        for shard in plan.shards:
            with open(self.shard_path(shard.filename), "wb") as f:
                f.write(shard.header)
                f.truncate(shard.size)
        if self.identity is None:
            return
        for shard in plan.shards:                   # the headers are durable before any slice
            _fsync_file(self.shard_path(shard.filename))
        self._open_manifest()
        _write_atomic(os.path.join(self.staging, PLAN_FILE), json.dumps({
            "format": STAGING_FORMAT, "digest": self.digest, "identity": self.identity,
            "slices": len(plan.slices), "shards": [s.filename for s in plan.shards],
        }, indent=1, sort_keys=True).encode())

    def _reopen(self, plan: Plan) -> None:
        state = _read_plan_file(self.staging)
        if state is None or state.get("digest") != self.digest:
            raise DestinationError(_changed_message(self.dest, [self.staging], self.identity or {}))
        for shard in plan.shards:                  # a lost or resized shard: its slices fail crc
            path = self.shard_path(shard.filename)
            mode = "r+b" if os.path.exists(path) else "w+b"
            with open(path, mode) as f:
                f.seek(0)
                if f.read(len(shard.header)) != shard.header:
                    f.seek(0)
                    f.write(shard.header)
                if os.fstat(f.fileno()).st_size != shard.size:
                    log.warning("%s: staged shard had the wrong size; its slices are redone", path)
                    f.truncate(shard.size)
        self._open_manifest()
        self.resumed = True

    # -- the manifest of finished merge slices -------------------------------------------------
    def _open_manifest(self) -> None:
        path = os.path.join(self.staging, MANIFEST_FILE)
        self._manifest_fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        size = os.fstat(self._manifest_fd).st_size
        if size:
            with open(path, "rb") as f:                # end a torn last line before appending
                f.seek(size - 1)
                if f.read(1) != b"\n":
                    os.write(self._manifest_fd, b"\n")
        _fsync_dir(self.staging)

    def sink(self) -> "SinkSpec | None":
        """What workers write slices with: None, the default positional :class:`ShardWriter`
        into :meth:`shard_path`."""
        return None

    def record(self, s: Slice, crc32: int, receipt: dict | None = None, *,
               stats: dict[str, int] | None = None) -> None:
        """Append one finished merge slice to the manifest, durably (fdatasync). ``receipt``
        (what the worker's sink returned; None for local files) is not needed here; ``stats``:
        the slice's exact merge statistics."""
        if self._manifest_fd is None:
            return
        line = json.dumps({"slice": s.index, "shard": s.shard, "start": s.start, "stop": s.stop,
                           "crc32": crc32, "stats": stats or {}}, separators=(",", ":")) + "\n"
        os.write(self._manifest_fd, line.encode())
        getattr(os, "fdatasync", os.fsync)(self._manifest_fd)

    def recorded_slices(self, plan: Plan) -> dict[int, int]:
        """slice index -> crc32 of every finished slice the manifest records (the last line of
        a slice wins). Lines that do not parse, or that disagree with the plan's slice, are
        ignored (their slices are redone)."""
        path = os.path.join(self.staging, MANIFEST_FILE)
        if not os.path.exists(path):
            return {}
        if os.path.getsize(path) > MAX_STATE_BYTES:
            raise MergeFailedError(f"{path}: over {MAX_STATE_BYTES} bytes; not a manifest of ours")
        out: dict[int, int] = {}
        ignored = 0
        with open(path, "rb") as f:
            for raw in f:
                try:
                    rec = json.loads(raw)
                    i, crc = rec["slice"], rec["crc32"]
                    s = plan.slices[i] if isinstance(i, int) and 0 <= i < len(plan.slices) else None
                    stats = manifest_stats(rec)
                    if (s is None or not isinstance(crc, int) or not 0 <= crc < 2**32
                            or (rec["shard"], rec["start"], rec["stop"]) != (s.shard, s.start, s.stop)):
                        raise ValueError(raw)
                except (ValueError, KeyError, TypeError):
                    ignored += raw.strip() != b""
                    continue
                out[i] = crc
                self.recorded_stats[i] = stats
        if ignored:
            log.warning("%s: %d unreadable line(s) ignored (their slices are redone)", path, ignored)
        return out

    def check_slices(self, plan: Plan, checksums: dict[int, int], *,
                     threads: int = READ_BACK_THREADS) -> tuple[dict[int, int], list[int]]:
        """Read back each slice of ``checksums`` and compare its crc32. Returns (the slices
        whose bytes match, the indices of those that do not)."""
        crcs = self.read_back(plan, [plan.slices[i] for i in sorted(checksums)], threads=threads)
        good = {i: checksums[i] for i in sorted(checksums) if crcs[i] == checksums[i]}
        return good, [i for i in sorted(checksums) if i not in good]

    def read_back(self, plan: Plan, slices: list[Slice], *,
                  threads: int = READ_BACK_THREADS) -> dict[int, int]:
        """slice index -> crc32 of the slice's bytes as they are now in its shard (-1 where the
        shard ends before the slice does). Slices are read on ``threads`` threads, whatever
        shard they are in: one shard's read-back is not serial (pread and crc32 release the
        GIL; measured on the bench shape's single 337 MB shard, 0.07 s serial)."""
        fds: dict[int, int] = {}
        try:
            for sl in slices:
                if sl.shard not in fds:
                    fds[sl.shard] = os.open(self.shard_path(plan.shards[sl.shard].filename), os.O_RDONLY)

            def one(sl: Slice) -> int:
                crc, at = 0, sl.start
                while at < sl.stop:
                    chunk = os.pread(fds[sl.shard], min(sl.stop - at, 16 << 20), at)
                    if not chunk:
                        return -1
                    crc = zlib.crc32(chunk, crc)
                    at += len(chunk)
                return crc

            with ThreadPoolExecutor(max_workers=max(1, min(threads, len(slices)))) as pool:
                return {sl.index: crc for sl, crc in zip(slices, pool.map(one, slices))}
        finally:
            for fd in fds.values():
                os.close(fd)

    # -- statistics state -----------------------------------------------------------------------
    def save_stats(self, next_round: int, ctx: dict[str, Any]) -> bool:
        """Persist the reduced context after a statistics round (atomically). Returns False
        (and saves nothing) when the context holds a value :func:`encode_state` cannot
        represent exactly; a resumed run then recomputes the statistics."""
        if self.identity is None:
            return False
        blob = stats_blob(self.digest or "", next_round, ctx)
        if blob is None:
            return False
        _write_atomic(os.path.join(self.staging, STATS_FILE), blob)
        return True

    def load_stats(self) -> tuple[int, dict[str, Any]] | None:
        """(the next statistics round, the context reduced so far) saved by an interrupted run,
        or None when nothing usable is saved (missing, torn, for another run)."""
        path = os.path.join(self.staging, STATS_FILE)
        try:
            if os.path.getsize(path) > MAX_STATE_BYTES:
                raise ValueError("too big")
            with open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as err:
            log.warning("%s unusable (%s); the statistics are recomputed", path, err)
            return None
        return parse_stats_blob(data, self.digest or "", where=path)

    def close(self) -> None:
        if self._manifest_fd is not None:
            os.close(self._manifest_fd)
            self._manifest_fd = None

    def finalize(self, plan: Plan, *, base_url: str, out_dtype: str | None) -> None:
        """Write the index json and copy config and tokenizer files from the base."""
        with open(os.path.join(self.staging, INDEX_NAME), "w") as f:
            json.dump(plan.index_json(), f, indent=2)
        copy_side_files(base_url, self.staging, out_dtype=out_dtype)

    def check_shards(self, plan: Plan) -> None:
        """Each staged shard has its planned size, and its header is byte for byte the planned
        one and parses back to the planned tensors (names, dtypes, shapes, offsets).

        Raises:
            MergeFailedError
        """
        for shard in plan.shards:
            path = self.shard_path(shard.filename)
            size = os.path.getsize(path)
            if size != shard.size:
                raise MergeFailedError(f"verification failed: {shard.filename} is {size} bytes, planned {shard.size}")
            with open(path, "rb") as f:
                head = f.read(len(shard.header))
            if head != shard.header:
                raise MergeFailedError(f"verification failed: {shard.filename} header differs from the plan")
            n = header_length(head[:8], file_size=size, where=path)
            tensors, _ = parse_header(head[8:8 + n], file_size=size, where=path)
            placed = {name: (t.dtype, t.shape, t.start, t.stop) for name, t in tensors.items()}
            planned = {name: (plan.tensors[name].out_dtype, plan.tensors[name].shape,
                              plan.tensors[name].start, plan.tensors[name].stop) for name in shard.tensors}
            if placed != planned:
                raise MergeFailedError(f"verification failed: {shard.filename} places its tensors "
                                       "other than planned")

    def verify(self, plan: Plan, checksums: dict[int, int]) -> None:
        """Check that every planned byte was written: each shard parses back to its planned
        header and size, and every slice's bytes match the checksum its worker reported.

        Raises:
            MergeFailedError: a slice is missing or its bytes differ.
        """
        missing = [s.index for s in plan.slices if s.index not in checksums]
        if missing:
            raise MergeFailedError(f"verification failed: {len(missing)} slices never reported (first {missing[:5]})")
        self.check_shards(plan)
        crcs = self.read_back(plan, plan.slices)
        for s in plan.slices:
            if crcs[s.index] != checksums[s.index]:
                raise MergeFailedError(
                    f"verification failed: slice {s.index} of {plan.shards[s.shard].filename} "
                    f"(bytes {s.start}..{s.stop}) differs from what its worker wrote"
                )

    def publish(self, *, overwrite: bool) -> None:
        """Move the staging folder into place; an existing destination (with ``overwrite``) is
        replaced only once the new one is complete. The resume state files are removed first
        (``plan.json`` last: a folder without it is never resumed)."""
        self.close()
        for name in STATE_FILES:
            try:
                os.remove(os.path.join(self.staging, name))
            except FileNotFoundError:
                pass
        old = None
        if os.path.exists(self.dest):
            if not overwrite:
                raise DestinationError(f"output.path: {self.dest} appeared during the run; not replacing it")
            old = f"{self.staging}.previous"
            os.rename(self.dest, old)
        try:
            os.rename(self.staging, self.dest)
        except OSError:
            if old:
                os.rename(old, self.dest)
            raise
        if old:
            shutil.rmtree(old, ignore_errors=True)

    def abort(self) -> None:
        """Remove the staging folder; the destination is untouched."""
        self.close()
        shutil.rmtree(self.staging, ignore_errors=True)


# -- the saved statistics, wherever the staging area is -----------------------------------------

def stats_blob(digest: str, next_round: int, ctx: dict[str, Any]) -> bytes | None:
    """The bytes of ``stats.json`` for the context reduced before ``next_round``, or None when
    the context holds a value :func:`encode_state` cannot represent exactly."""
    try:
        enc = encode_state(ctx)
    except (TypeError, ValueError) as err:
        log.warning("statistics context not saved for resume (%s); a resumed run recomputes it", err)
        return None
    body = json.dumps(enc, sort_keys=True, separators=(",", ":"))
    return json.dumps({
        "format": STAGING_FORMAT, "digest": digest, "round": next_round,
        "ctx_sha256": hashlib.sha256(body.encode()).hexdigest(), "ctx": body,
    }).encode()


def parse_stats_blob(data: bytes, digest: str, *, where: str) -> tuple[int, dict[str, Any]] | None:
    """(next round, context) from the bytes of a ``stats.json`` of the run ``digest``, or None
    (with a warning) when they are torn or belong to another run."""
    try:
        state = json.loads(data)
        body = state["ctx"]
        if (state["format"] != STAGING_FORMAT or state["digest"] != digest
                or hashlib.sha256(body.encode()).hexdigest() != state["ctx_sha256"]
                or not isinstance(state["round"], int) or state["round"] < 1):
            raise ValueError("does not match this run")
        return state["round"], decode_state(json.loads(body))
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as err:
        log.warning("%s unusable (%s); the statistics are recomputed", where, err)
        return None


# -- finding staging folders, refusing them ------------------------------------------------------

def manifest_stats(rec: dict) -> dict[str, int]:
    """A manifest record's merge statistics (``{}`` when it has none)."""
    stats = rec.get("stats", {})
    if not isinstance(stats, dict) or not all(
            isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) for k, v in stats.items()):
        raise ValueError(f"bad merge statistics {stats!r}")
    return stats


def staging_place(dest: str, staging_root: str | None = None) -> tuple[str, str]:
    """(the folder that holds ``dest``'s staging folders, the name they start from): beside a
    local destination (same filesystem: the final rename is atomic); in ``staging_root`` for a
    destination that is not a local path (the Hub), named after the URL."""
    if staging_root is None:
        return os.path.split(os.path.realpath(local_path(dest)))
    flat = re.sub(r"[^A-Za-z0-9._-]+", "--", dest.split("://", 1)[-1]).strip("-.")
    return os.path.realpath(staging_root), f"{dest.split('://', 1)[0]}--{flat}"


def staging_folders(dest: str, staging_root: str | None = None) -> list[str]:
    """Every staging folder of ``dest`` (any run, any version), oldest first."""
    parent, name = staging_place(dest, staging_root)
    pattern = re.compile(re.escape(f".{name}{STAGING_MARK}") + r"[0-9a-f]{8,64}")
    try:
        names = os.listdir(parent)
    except (FileNotFoundError, NotADirectoryError):
        return []
    found = [os.path.join(parent, n) for n in names
             if pattern.fullmatch(n) and os.path.isdir(os.path.join(parent, n))]
    return sorted(found, key=lambda p: (os.path.getmtime(p), p))


def refuse_existing_staging(dest: str, staging_root: str | None = None) -> None:
    """Raises:
        DestinationError: a staging folder of ``dest`` exists (an interrupted or running run);
            it is neither reused nor deleted without the user saying so."""
    found = staging_folders(dest, staging_root)
    if found:
        shown = dest if staging_root is not None else os.path.realpath(local_path(dest))
        raise DestinationError(
            f"output.path: {shown}: the staging folder {found[-1]} of an "
            f"earlier run exists{f' (and {len(found) - 1} more)' if len(found) > 1 else ''}; run again "
            "with --resume to continue it, or delete it to start over (make sure no run is still "
            "writing it)"
        )


def _read_plan_file(staging: str) -> dict[str, Any] | None:
    try:
        with open(os.path.join(staging, PLAN_FILE), "rb") as f:
            state = json.loads(f.read(MAX_STATE_BYTES))
        return state if isinstance(state, dict) else None
    except (OSError, ValueError, RecursionError):
        return None


def _changed_message(dest: str, others: list[str], identity: dict[str, Any]) -> str:
    folder = others[-1]
    state = _read_plan_file(folder)
    if state is None or state.get("format") != STAGING_FORMAT or not isinstance(state.get("identity"), dict):
        return (f"output.path: {dest}: cannot resume: {folder} holds no resumable state (an "
                "incomplete, one-off or older distmerge run's staging folder); delete it to start over")
    old = state["identity"]
    changed = [_IDENTITY_LABELS.get(k, k) for k in sorted(set(old) | set(identity))
               if old.get(k) != identity.get(k)]
    if "inputs" in old and "inputs" in identity and old["inputs"] != identity["inputs"]:
        olds = {m.get("url"): m for m in old["inputs"] if isinstance(m, dict)}
        moved = [m["url"] for m in identity["inputs"] if olds.get(m["url"]) != m]
        if moved:
            changed = [c for c in changed if c != _IDENTITY_LABELS["inputs"]]
            changed.append(f"input files of {', '.join(moved[:3])}{' ...' if len(moved) > 3 else ''}")
    return (f"output.path: {dest}: cannot resume: the staging folder {folder} belongs to a different "
            f"pipeline (changed: {'; '.join(changed) or 'unknown'}); restore the pipeline and inputs "
            "it was started with, or delete that folder to start over")


_IDENTITY_LABELS = {
    "distmerge": "distmerge version", "method": "method or overrides", "experts": "experts or weights",
    "inputs": "input files", "output": "output dtype or shard size", "plan": "slice plan (slice size, memory per worker)",
    "format": "staging format",
}


# -- small file helpers ----------------------------------------------------------------------------

def _fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: str) -> None:
    try:
        _fsync_file(path)
    except OSError:          # some filesystems cannot fsync a directory
        pass


def _write_atomic(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(os.path.dirname(path))


def copy_side_files(base_url: str, out_dir: str, *, out_dtype: str | None) -> list[str]:
    """Copy config, generation config and tokenizer files from the base folder; set the
    config's dtype to the output dtype. Returns the copied names."""
    files = side_files(base_url, out_dtype=out_dtype)
    for name, data in files.items():
        with open(os.path.join(out_dir, name), "wb") as f:
            f.write(data)
    return list(files)


def side_files(base_url: str, *, out_dtype: str | None) -> dict[str, bytes]:
    """name -> bytes of the config, generation config and tokenizer files of the base folder
    (each at most MAX_COPIED_BYTES), the config's dtype set to the output dtype."""
    fs, path = open_fs(base_url)
    if path.endswith(".safetensors"):
        path = posixpath.dirname(path)
    copied: dict[str, bytes] = {}
    for entry in fs.ls(path, detail=True):
        name = posixpath.basename(entry["name"])
        if (
            entry.get("type") != "file"
            or name == INDEX_NAME
            or not name.endswith(COPIED_SUFFIXES)
            or (entry.get("size") or 0) > MAX_COPIED_BYTES
        ):
            continue
        data = fs.cat_file(entry["name"])
        if name == "config.json" and out_dtype:
            try:
                cfg = json.loads(data)
                for key in ("torch_dtype", "dtype"):
                    if key in cfg:
                        cfg[key] = out_dtype
                data = json.dumps(cfg, indent=2).encode()
            except ValueError:
                log.warning("config.json of %s is not JSON; copied unchanged", base_url)
        copied[name] = data
    return copied


class SliceSink(Protocol):
    """Where a worker's merge slices go (worker side): ``write`` puts one slice's bytes at
    their planned offset of the shard at ``path`` (a :class:`Job`'s ``shard_paths`` entry) and
    returns what the driver needs to know about the write (a receipt carried back in the
    slice's report), or None."""

    def write(self, path: str, offset: int, data) -> dict | None: ...

    def close(self) -> None: ...


class SinkSpec(Protocol):
    """A picklable description of a sink, sent to every worker in its Job; ``open`` builds the
    worker's own :class:`SliceSink` (with its own connections and credentials)."""

    def open(self) -> SliceSink: ...


class ShardWriter:
    """Positional writes into the staged shards (worker side; keeps descriptors open;
    ``pwrite`` at disjoint offsets is safe from several threads)."""

    def __init__(self) -> None:
        self._fds: dict[str, int] = {}
        self._lock = threading.Lock()

    def write(self, path: str, offset: int, data) -> None:
        with self._lock:
            fd = self._fds.get(path)
            if fd is None:
                fd = self._fds[path] = os.open(path, os.O_WRONLY)
        view = memoryview(data).cast("B")
        done = 0
        while done < len(view):
            done += os.pwrite(fd, view[done:], offset + done)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
