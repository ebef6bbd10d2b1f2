"""The output checkpoint: a staging folder of preallocated shards, completed and published
atomically.

Driver side (:class:`StagedOutput`): refuse a destination that exists (without ``overwrite``)
or lies inside a source; create a staging folder beside the destination (same filesystem, so
the final rename is atomic) holding every shard at its final size with its header written;
after the merge pass write the index json, copy config and tokenizer files from the base,
verify every planned byte against the workers' checksums, and rename the folder into place.
On failure the staging folder is removed and the destination is left as it was.

Worker side (:class:`ShardWriter`): positional writes of a slice's bytes at their planned
offset. A slice always writes the same bytes at the same place, so a retried slice is harmless.

This issue's destinations are local or shared filesystems; object stores and the Hub publish
differently (multipart completion, one commit) and plug in beside this class.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import shutil
import threading
import uuid
import zlib

from distmerge.checkpoint.header import header_length, parse_header
from distmerge.checkpoint.source import INDEX_NAME, is_local, local_path, open_fs
from distmerge.errors import ConfigError, DestinationError, MergeFailedError
from distmerge.plan import Plan

log = logging.getLogger(__name__)

# Files beside the weights that a merged model needs to load and tokenize like its base.
COPIED_SUFFIXES = (".json", ".model", ".txt", ".jinja", ".tiktoken")
MAX_COPIED_BYTES = 50 * 10**6


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
            f"output.path: {dest}: only local or shared-filesystem destinations are supported "
            "in this version; write to a path and upload the folder"
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
    """The output of one run, from staging to publication (driver side)."""

    def __init__(self, dest: str, *, run_id: str | None = None):
        self.dest = os.path.realpath(local_path(dest))
        parent, name = os.path.split(self.dest)
        self.run_id = run_id or uuid.uuid4().hex[:12]
        self.staging = os.path.join(parent, f".{name}.distmerge-staging-{self.run_id}")

    def shard_path(self, filename: str) -> str:
        return os.path.join(self.staging, filename)

    def create(self, plan: Plan) -> None:
        """Make the staging folder with every shard at its final size, header written."""
        os.makedirs(os.path.dirname(self.dest), exist_ok=True)
        os.makedirs(self.staging)
        for shard in plan.shards:
            with open(self.shard_path(shard.filename), "wb") as f:
                f.write(shard.header)
                f.truncate(shard.size)

    def finalize(self, plan: Plan, *, base_url: str, out_dtype: str | None) -> None:
        """Write the index json and copy config and tokenizer files from the base."""
        with open(os.path.join(self.staging, INDEX_NAME), "w") as f:
            json.dump(plan.index_json(), f, indent=2)
        copy_side_files(base_url, self.staging, out_dtype=out_dtype)

    def verify(self, plan: Plan, checksums: dict[int, int]) -> None:
        """Check that every planned byte was written: each shard parses back to its planned
        header and size, and every slice's bytes match the checksum its worker reported.

        Raises:
            MergeFailedError: a slice is missing or its bytes differ.
        """
        missing = [s.index for s in plan.slices if s.index not in checksums]
        if missing:
            raise MergeFailedError(f"verification failed: {len(missing)} slices never reported (first {missing[:5]})")
        by_shard: dict[int, list] = {}
        for s in plan.slices:
            by_shard.setdefault(s.shard, []).append(s)
        for si, shard in enumerate(plan.shards):
            path = self.shard_path(shard.filename)
            size = os.path.getsize(path)
            if size != shard.size:
                raise MergeFailedError(f"verification failed: {shard.filename} is {size} bytes, planned {shard.size}")
            with open(path, "rb") as f:
                prefix = f.read(8)
                n = header_length(prefix, file_size=size, where=path)
                tensors, _ = parse_header(f.read(n), file_size=size, where=path)
                if set(tensors) != set(shard.tensors):
                    raise MergeFailedError(f"verification failed: {shard.filename} header differs from the plan")
                for s in by_shard.get(si, []):
                    f.seek(s.start)
                    crc = zlib.crc32(f.read(s.nbytes))
                    if crc != checksums[s.index]:
                        raise MergeFailedError(
                            f"verification failed: slice {s.index} of {shard.filename} "
                            f"(bytes {s.start}..{s.stop}) differs from what its worker wrote"
                        )

    def publish(self, *, overwrite: bool) -> None:
        """Move the staging folder into place; an existing destination (with ``overwrite``) is
        replaced only once the new one is complete."""
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
        shutil.rmtree(self.staging, ignore_errors=True)


def copy_side_files(base_url: str, out_dir: str, *, out_dtype: str | None) -> list[str]:
    """Copy config, generation config and tokenizer files from the base folder; set the
    config's dtype to the output dtype. Returns the copied names."""
    fs, path = open_fs(base_url)
    if path.endswith(".safetensors"):
        path = posixpath.dirname(path)
    copied = []
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
        with open(os.path.join(out_dir, name), "wb") as f:
            f.write(data)
        copied.append(name)
    return copied


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
