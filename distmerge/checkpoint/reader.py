"""Ranged reads of tensor rows into preallocated buffers.

A :class:`RangeReader` lives in one worker: it opens files lazily (never sharing filesystem
objects across processes), reads a row block of one tensor of one model into a buffer it
reuses, and views the bytes as a tensor without a copy. Local files are read with
``os.preadv`` straight into the buffer. Other fsspec URLs are opened with the run's storage
options (:mod:`distmerge.checkpoint.storage`); a range is split into parts of
``storage.part_size`` bytes fetched in parallel with ``cat_file(start, end)`` on the process's
request pool (at most ``storage.concurrency`` requests in flight, whichever threads ask), each
part retried on transient errors and checked: an error, or a part shorter than asked, fails the
read with a message naming the URL.
"""

from __future__ import annotations

import os
import threading

import numpy as np
import torch

from distmerge.checkpoint.header import TensorInfo
from distmerge.checkpoint.source import is_local, local_path, open_fs
from distmerge.checkpoint.storage import active_storage, call_with_retries, request_pool, split_range
from distmerge.config import StorageConfig
from distmerge.errors import SourceNotFoundError, UnsafeCheckpointError

TORCH_DTYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8,
    "I16": torch.int16, "I32": torch.int32, "I64": torch.int64,
    "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64,
    "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


class RangeReader:
    """Reads row blocks into reusable buffers, one per slot (model); one reader per slice in
    flight, shared by the threads reading that slice's models in parallel.

    ``storage``: the options for non-local URLs (the Job's, in a worker); default the options
    active in this process. ``pin``: page-locked buffers, for a worker that copies them to a
    GPU (an asynchronous copy needs them)."""

    def __init__(self, storage: StorageConfig | None = None, *, pin: bool = False) -> None:
        self.storage = storage
        self.pin = pin
        self._fds: dict[str, int] = {}
        self._fs: dict[str, tuple] = {}
        self._buffers: dict[int, torch.Tensor] = {}
        self._lock = threading.Lock()            # the read pool's threads share the open files

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        self._fs.clear()
        self._buffers.clear()

    def _buffer(self, slot: int, nbytes: int) -> torch.Tensor:
        buf = self._buffers.get(slot)
        if buf is None or buf.numel() < nbytes:
            buf = torch.empty(max(nbytes, 1), dtype=torch.uint8, pin_memory=self.pin)
            self._buffers[slot] = buf
        return buf[:nbytes]

    def read_range(self, url: str, start: int, stop: int, out: torch.Tensor) -> None:
        """Fill ``out`` (uint8, contiguous, ``stop - start`` bytes) from ``url[start:stop]``.

        Raises:
            SourceNotFoundError: the file vanished; UnsafeCheckpointError: it is shorter than
                its header said (truncated after validation).
        """
        view = memoryview(out.numpy())
        if is_local(url):
            with self._lock:
                fd = self._fds.get(url)
                if fd is None:
                    try:
                        fd = os.open(local_path(url), os.O_RDONLY)
                    except FileNotFoundError:
                        raise SourceNotFoundError(f"shard not found: {url}") from None
                    self._fds[url] = fd
            done = 0
            while done < len(view):
                n = os.preadv(fd, [view[done:]], start + done)
                if n == 0:
                    raise UnsafeCheckpointError(
                        f"{url}: file ends at byte {start + done}, before the tensor data its "
                        "header describes (truncated shard)"
                    )
                done += n
            return
        self._read_remote(url, start, stop, view)

    def _read_remote(self, url: str, start: int, stop: int, view: memoryview) -> None:
        storage = self.storage if self.storage is not None else active_storage()
        with self._lock:
            if url not in self._fs:
                self._fs[url] = open_fs(url, storage)
            fs, path = self._fs[url]

        def fetch(a: int, b: int) -> bytes:
            return call_with_retries(lambda: fs.cat_file(path, start=a, end=b), url=url,
                                     storage=storage)

        parts = split_range(start, stop, storage.part_size)
        pool = request_pool(storage.concurrency)
        futures = [pool.submit(fetch, a, b) for a, b in parts]
        try:
            for (a, b), fut in zip(parts, futures):
                data = fut.result()
                if len(data) != b - a:
                    raise UnsafeCheckpointError(
                        f"{url}: short read at bytes {a}..{b} ({len(data)} bytes; truncated shard)"
                    )
                view[a - start:b - start] = data
        except BaseException:
            for fut in futures:
                fut.cancel()
            raise

    def read_rows(self, slot: int, url: str, info: TensorInfo, row_start: int, row_stop: int,
                  *, keep: bool = False) -> torch.Tensor:
        """Rows ``[row_start, row_stop)`` of a tensor as a ``[rows, cols]`` tensor of its own dtype
        (a 1-D or 0-D tensor as one row), viewing a reused buffer: valid until the next read
        into the same ``slot``; with ``keep``, in a buffer of its own that stays valid."""
        row_bytes = info.row_bytes
        start = info.start + row_start * row_bytes
        nbytes = (row_stop - row_start) * row_bytes
        if keep:
            buf = torch.empty(max(nbytes, 1), dtype=torch.uint8, pin_memory=self.pin)[:nbytes]
        else:
            buf = self._buffer(slot, nbytes)
        if nbytes:
            self.read_range(url, start, start + nbytes, buf)
        dtype = TORCH_DTYPES[info.dtype]
        cols = (info.numel // info.rows) if info.rows else 0
        return buf.view(dtype).view(row_stop - row_start, cols)


def as_bytes(t: torch.Tensor) -> np.ndarray:
    """The bytes of a CPU tensor as a uint8 numpy array (no copy when contiguous)."""
    t = t.contiguous()
    return t.view(-1).view(torch.uint8).numpy() if t.numel() else np.empty(0, np.uint8)
