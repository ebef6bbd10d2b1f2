"""The slice worker: read a slice's rows of base and experts, compute, write, report.

One :class:`SliceWorker` per executor worker (in-process, or inside a Ray actor). For each
piece of a slice it reads the rows of the base and of every expert with ranged reads in
parallel into reused buffers, converts them to fp32 on its device (CUDA when the worker has a
GPU), runs the method's ``stats`` or ``merge``, casts to the output dtype and, in the merge
pass, writes the slice's bytes at their planned offset in one positional write. It returns a
small :class:`Report`; tensors never leave the worker.

Between passes a worker may keep, within ``Job.resident_bytes``, its blocks of inputs behind
URLs and the derivatives a method asks it to keep (``Method.derivative``: e.g. frank_wolfe's
sketches of the pool); a later round that can work from a kept derivative reads only the
sources after the experts. Either way the values computed are the same, so where a slice runs
changes no output byte.
"""

from __future__ import annotations

import os
import resource
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from distmerge.checkpoint.header import TensorInfo
from distmerge.checkpoint.reader import TORCH_DTYPES, RangeReader, as_bytes
from distmerge.checkpoint.writer import ShardWriter, SinkSpec
from distmerge.config import StorageConfig
from distmerge.errors import NonFiniteError
from distmerge.methods import Block, MethodSet
from distmerge.plan import Slice, TensorPlan
from distmerge.reduce import is_exact

# fp32 values (all models together) per method call on the CPU: fits the L2/L3 caches.
CPU_CHUNK_FLOATS = 600_000
STATS_CHUNK_ELEMENTS = 4 * 65_536

Sources = tuple[dict[str, tuple[str, TensorInfo]], ...]


@dataclass(frozen=True, kw_only=True)
class Job:
    """Everything a worker needs, sent once when it starts."""

    tensors: dict[str, TensorPlan]
    shard_paths: tuple[str, ...]          # staging file of each output shard
    sources: Sources                      # [0] the base, [1:] the experts
    model_names: tuple[str, ...]          # URLs, for messages
    weights: tuple[float, ...]
    methods: MethodSet
    allow_nonfinite: bool = False
    storage: StorageConfig | None = None  # how to open source URLs: env var NAMES, no secrets
    sink: SinkSpec | None = None          # how merge slices are written (None: ShardWriter)
    # Input bytes a worker may keep between passes, of the sources listed (base and experts
    # behind URLs; never a source rewritten between passes). 0: read every pass.
    resident_bytes: int = 0
    resident_sources: tuple[int, ...] = ()


@dataclass(frozen=True, kw_only=True)
class Task:
    slice: Slice
    round: int | None                     # a statistics round, or None for the merge pass


@dataclass(kw_only=True)
class Report:
    slice: int
    round: int | None
    partial: dict[str, np.ndarray] = field(default_factory=dict)   # float statistics only
    checksum: int | None = None
    stats: dict[str, np.ndarray] = field(default_factory=dict)     # merge pass: exact ints
    receipt: dict | None = None           # what the sink returned for the slice's write
    bytes_read: int = 0
    read_by_source: list[int] = field(default_factory=list)   # bytes_read split by source index
    bytes_written: int = 0
    seconds: dict[str, float] = field(default_factory=dict)   # read, compute, write
    peak_rss: int = 0
    worker: str = ""


def chunk_rows(device_type: str, n_models: int, cols: int, rows: int, *, stats: bool) -> int:
    """Rows per method call. On the CPU, blocks of ~CPU_CHUNK_FLOATS fp32 values over all
    models, so the chain of elementwise ops runs in cache (measured 8x faster than whole
    2M-element blocks); for statistics at least STATS_CHUNK_ELEMENTS per model, so that the
    per-call 65 536-bin histograms stay small beside the data they count; on a GPU, the whole
    piece. Methods are slice-invariant, so this changes no output byte."""
    if device_type != "cpu":
        return max(1, rows)
    floats = CPU_CHUNK_FLOATS
    if stats:
        floats = max(4 * CPU_CHUNK_FLOATS, n_models * STATS_CHUNK_ELEMENTS)
    return max(1, floats // max(1, n_models * cols))


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _add(into: dict[str, np.ndarray], part: dict[str, np.ndarray]) -> None:
    for k, v in part.items():
        into[k] = into[k] + v if k in into else v


class SliceWorker:
    def __init__(self, job: Job, *, device: str | None = None, worker_id: str | None = None):
        self.job = job
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.worker_id = worker_id or f"pid{os.getpid()}"
        self.writer = job.sink.open() if job.sink is not None else ShardWriter()
        self.pool = ThreadPoolExecutor(max_workers=min(16, len(job.sources)))
        # Two slices may run at once (a Ray actor with max_concurrency 2: one reads or writes
        # while the other computes). Each thread has its own read buffers and fp32 workspace.
        self._local = threading.local()
        self._readers: list[RangeReader] = []
        self._lock = threading.Lock()
        self._counts: dict[str, np.ndarray] = {}
        self._resident: dict[tuple[int, str, int, int], torch.Tensor] = {}
        self._derived: dict[tuple[str, int, int], Any] = {}     # Method.derive, by tensor and rows
        self._resident_used = 0

    @property
    def reader(self) -> RangeReader:
        reader = getattr(self._local, "reader", None)
        if reader is None:
            reader = self._local.reader = RangeReader(self.job.storage, pin=self.device.type == "cuda")
            with self._lock:
                self._readers.append(reader)
        return reader

    def close(self) -> None:
        self._resident.clear()
        self._derived.clear()
        self.pool.shutdown()
        for reader in self._readers:
            reader.close()
        self.writer.close()

    def drain(self) -> dict[str, np.ndarray]:
        """The exact statistics (histograms, counts, exact sums) summed over every slice this worker
        processed since the last drain, then forgotten. Integer sums are exact in any order,
        so summing per worker is the same as summing per slice; it keeps the driver's traffic
        at one histogram per worker and pass instead of one per slice."""
        with self._lock:
            counts, self._counts = self._counts, {}
        return counts

    def _workspace(self, elements: int) -> torch.Tensor:
        """A reused fp32 buffer on the device for the blocks of base and experts (no fresh
        allocation, and no page faults, per slice)."""
        fp32 = getattr(self._local, "fp32", None)
        if fp32 is None or fp32.numel() < elements:
            fp32 = self._local.fp32 = torch.empty(elements, dtype=torch.float32, device=self.device)
        return fp32[:elements]

    def _read(self, tensor: str, r0: int, r1: int, which: range | None = None
              ) -> tuple[list[torch.Tensor], dict[int, int]]:
        """Rows ``r0..r1`` of ``tensor`` in every source (or in the sources ``which``), and how
        many bytes of them came from storage (not from blocks kept in memory), by source."""
        reader = self.reader              # this slice's thread's buffers, one slot per model
        uploaded = getattr(self._local, "uploaded", None)
        if uploaded is not None:          # the last block's copies to the GPU left the buffers
            uploaded.synchronize()

        def one(i: int) -> tuple[torch.Tensor, int]:
            url, info = self.job.sources[i][tensor]
            key = (i, tensor, r0, r1)
            kept = self._resident.get(key)
            if kept is not None:
                return kept, 0
            keep = i in self.job.resident_sources and self._reserve((r1 - r0) * info.row_bytes)
            rows = reader.read_rows(i, url, info, r0, r1, keep=keep)
            if keep:
                self._resident[key] = rows
            return rows, rows.numel() * rows.element_size()
        which = range(len(self.job.sources)) if which is None else which
        got = list(self.pool.map(one, which))
        return [rows for rows, _ in got], {i: n for i, (_, n) in zip(which, got)}

    def _reserve(self, nbytes: int) -> bool:
        """Whether ``nbytes`` more input bytes may be kept resident (and count them if so).
        Kept blocks let the later passes of a multi-pass method (statistics rounds, then the
        merge) read this worker's slices from memory instead of storage; a slice that comes
        back to another worker is read there, so this changes no output byte."""
        with self._lock:
            if self._resident_used + nbytes > self.job.resident_bytes:
                return False
            self._resident_used += nbytes
            return True

    def _keep_derived(self, key: tuple[str, int, int], derived: Any) -> None:
        """Keep a method's derivative of a block (:meth:`Method.derivative`) within the
        resident budget; nothing when it does not fit."""
        if key not in self._derived and self._reserve(int(derived.nbytes)):
            with self._lock:
                self._derived[key] = derived

    def _chunks(self, rows: int, cols: int, stats: bool) -> list[tuple[int, int]]:
        """The row ranges (within the piece) of the method calls on it: the same whichever
        sources a round reads, so a derivative kept in one round is found in the next."""
        step = chunk_rows(self.device.type, len(self.job.sources), cols, rows, stats=stats)
        return [(r0, min(rows, r0 + step)) for r0 in range(0, rows, step)]

    def _upload(self, raws: list[torch.Tensor]) -> list[torch.Tensor]:
        """The blocks on the worker's device, in their stored dtype. To a GPU: asynchronous
        copies of the raw bytes from the reader's page-locked buffers (on this thread's stream)
        into reused device buffers; the conversion to fp32 then runs on the GPU. On the CPU:
        the blocks themselves."""
        if self.device.type == "cpu":
            return raws
        bufs = getattr(self._local, "device_raw", None)
        if bufs is None:
            bufs = self._local.device_raw = {}
        out = []
        for slot, r in enumerate(raws):
            nbytes = r.numel() * r.element_size()
            buf = bufs.get(slot)
            if buf is None or buf.numel() < nbytes:
                buf = bufs[slot] = torch.empty(max(nbytes, 1), dtype=torch.uint8, device=self.device)
            buf[:nbytes].copy_(r.reshape(-1).view(torch.uint8), non_blocking=True)
            out.append(buf[:nbytes].view(r.dtype).view(r.shape))
        event = self._local.uploaded = torch.cuda.Event()
        event.record()
        return out

    def _check_finite(self, tensor: str, r0: int, r1: int, base: torch.Tensor, experts: torch.Tensor) -> None:
        # A sum is finite only if every term is (or it overflowed): one cheap reduction per
        # block, and the exact per-model check only when it is not.
        if self.job.allow_nonfinite or bool(torch.isfinite(base.sum() + experts.sum())):
            return
        for i, x in enumerate([base, *experts]):
            if not bool(torch.isfinite(x).all()):
                raise NonFiniteError(
                    f"{self.job.model_names[i]}: tensor {tensor} holds NaN or Inf in rows "
                    f"{r0}..{r1}; fix the checkpoint (or allow non-finite values explicitly)"
                )

    def process(self, task: Task, ctx: dict[str, Any]) -> Report:
        if self.device.type != "cuda":
            return self._process(task, ctx)
        stream = getattr(self._local, "stream", None)
        if stream is None:                # one stream per slice thread: two slices overlap
            stream = self._local.stream = torch.cuda.Stream(self.device)
        with torch.cuda.stream(stream):
            return self._process(task, ctx)

    def _process(self, task: Task, ctx: dict[str, Any]) -> Report:
        s = task.slice
        rep = Report(slice=s.index, round=task.round, worker=self.worker_id,
                     read_by_source=[0] * len(self.job.sources))
        t_read = t_compute = t_write = 0.0
        cuda = self.device.type == "cuda"
        out = (torch.empty(s.nbytes, dtype=torch.uint8, pin_memory=cuda)
               if task.round is None else None)
        partial: dict[str, np.ndarray] = {}
        for piece in s.pieces:
            tp = self.job.tensors[piece.tensor]
            method = self.job.methods.for_tensor(piece.tensor)
            if task.round is not None and (not tp.merged or task.round >= method.rounds):
                continue
            mode = method.derivative(task.round, ctx) if task.round is not None and tp.merged else None
            n_pool = 1 + len(self.job.weights)               # base and experts; then the extras
            info = self.job.sources[0][piece.tensor][1]
            chunks = self._chunks(piece.row_stop - piece.row_start,
                                  info.numel // info.rows if info.rows else 0, task.round is not None)
            # kept derivatives of every chunk replace the pool: read only the extra sources
            only_extras = mode == "use" and all(
                (piece.tensor, piece.row_start + a, piece.row_start + b) in self._derived for a, b in chunks)
            t0 = time.perf_counter()
            raws, from_storage = self._read(piece.tensor, piece.row_start, piece.row_stop,
                                            range(n_pool, len(self.job.sources)) if only_extras else None)
            for i, n in from_storage.items():
                rep.read_by_source[i] += n
            t1 = time.perf_counter()
            t_read += t1 - t0
            row_bytes = (tp.stop - tp.start) // tp.rows if tp.rows else 0
            if not tp.merged:                                               # copied from the base
                at = tp.start + piece.row_start * row_bytes - s.start
                data = as_bytes(raws[0])
                out.numpy()[at:at + len(data)] = data
                t_compute += time.perf_counter() - t1
                continue
            cols = raws[0].shape[1]
            raws = self._upload(raws)
            # Every source's chunks as views, made once per piece, so that a chunk's conversion
            # to fp32 is one call holding the GIL briefly, not one per source: with two slices
            # in flight the per-source calls made the threads queue for the GIL (a Python loop
            # of copies scaled 1.16x on two threads where one call scaled 1.6x, measured).
            parts = [r.split(chunks[0][1] - chunks[0][0]) for r in raws] if chunks else []
            for k, (r0, r1) in enumerate(chunks):
                fp32 = self._workspace(len(raws) * (r1 - r0) * cols).view(len(raws), r1 - r0, cols)
                torch.stack([part[k] for part in parts], out=fp32)
                g0, g1 = piece.row_start + r0, piece.row_start + r1
                kept = (piece.tensor, g0, g1)
                if only_extras:                                             # fp32: [E, rows, cols]
                    part = method.stats_derived(task.round, self._derived[kept], fp32,
                                                name=piece.tensor, row_start=g0, ctx=ctx)
                else:
                    base, experts = fp32[0], fp32[1:]                       # [rows, cols], [T, rows, cols]
                    if (task.round or 0) == 0 and (task.round is not None or method.rounds == 0):
                        self._check_finite(piece.tensor, g0, g1, base, experts)  # first read only
                    block = Block(name=piece.tensor, base=base, experts=experts,
                                  weights=self.job.weights, row_start=g0, scratch=True)
                    if mode == "use":                                       # not kept here: derive again
                        derived = self._derived.get(kept)
                        if derived is None:
                            derived = method.derive(block, ctx)
                            self._keep_derived(kept, derived)
                        part = method.stats_derived(task.round, derived, fp32[n_pool:],
                                                    name=piece.tensor, row_start=g0, ctx=ctx)
                    elif task.round is not None:
                        if mode == "keep" and kept not in self._derived:      # before stats: a
                            self._keep_derived(kept, method.derive(block, ctx))  # scratch block may change
                        part = method.stats(task.round, block, ctx)
                if task.round is not None:
                    for key, arr in part.items():
                        if is_exact(arr):
                            with self._lock:
                                if key not in self._counts:
                                    self._counts[key] = arr.copy() if arr.dtype == object else arr.astype(np.int64)
                                elif arr.dtype == object:
                                    self._counts[key] = self._counts[key] + arr
                                else:
                                    np.add(self._counts[key], arr, out=self._counts[key])
                        else:
                            _add(partial, {key: arr})
                    continue
                merged, mstats = method.merge_with_stats(block, ctx)
                _add(rep.stats, mstats)
                merged = merged.to(TORCH_DTYPES[tp.out_dtype]).reshape(-1)
                at = tp.start + g0 * row_bytes - s.start
                n = merged.numel() * merged.element_size()
                out[at:at + n].copy_(merged.view(torch.uint8), non_blocking=cuda)
            t_compute += time.perf_counter() - t1
        if cuda:
            torch.cuda.current_stream().synchronize()     # the copies back into `out`
        if out is not None:
            t0 = time.perf_counter()
            data = out.numpy()
            rep.receipt = self.writer.write(self.job.shard_paths[s.shard], s.start, data)
            rep.checksum = zlib.crc32(data)
            rep.bytes_written = s.nbytes
            t_write = time.perf_counter() - t0
        rep.partial = partial
        rep.bytes_read = sum(rep.read_by_source)
        rep.seconds = {"read": t_read, "compute": t_compute, "write": t_write}
        rep.peak_rss = peak_rss_bytes()
        return rep
