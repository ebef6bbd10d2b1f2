"""The slice worker: read a slice's rows of base and experts, compute, write, report.

One :class:`SliceWorker` per executor worker (in-process, or inside a Ray actor). For each
piece of a slice it reads the rows of the base and of every expert with ranged reads in
parallel into reused buffers, converts them to fp32 on its device (CUDA when the worker has a
GPU), runs the method's ``stats`` or ``merge``, casts to the output dtype and, in the merge
pass, writes the slice's bytes at their planned offset in one positional write. It returns a
small :class:`Report`; tensors never leave the worker.
"""

from __future__ import annotations

import os
import resource
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from distmerge.checkpoint.header import TensorInfo
from distmerge.checkpoint.reader import TORCH_DTYPES, RangeReader, as_bytes
from distmerge.checkpoint.writer import ShardWriter
from distmerge.errors import NonFiniteError
from distmerge.methods import Block, MethodSet
from distmerge.plan import Slice, TensorPlan

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


@dataclass(frozen=True, kw_only=True)
class Task:
    slice: Slice
    round: int | None                     # a statistics round, or None for the merge pass


@dataclass(kw_only=True)
class Report:
    slice: int
    round: int | None
    partial: dict[str, np.ndarray] = field(default_factory=dict)
    checksum: int | None = None
    bytes_read: int = 0
    bytes_written: int = 0
    seconds: dict[str, float] = field(default_factory=dict)   # read, compute, write
    peak_rss: int = 0
    worker: str = ""


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
        self.reader = RangeReader()
        self.writer = ShardWriter()
        self.pool = ThreadPoolExecutor(max_workers=min(16, len(job.sources)))
        self._fp32: torch.Tensor | None = None

    def close(self) -> None:
        self.pool.shutdown()
        self.reader.close()
        self.writer.close()

    def _workspace(self, elements: int) -> torch.Tensor:
        """A reused fp32 buffer on the device for the blocks of base and experts (no fresh
        allocation, and no page faults, per slice)."""
        if self._fp32 is None or self._fp32.numel() < elements:
            self._fp32 = torch.empty(elements, dtype=torch.float32, device=self.device)
        return self._fp32[:elements]

    def _read(self, tensor: str, r0: int, r1: int) -> list[torch.Tensor]:
        def one(i: int) -> torch.Tensor:
            url, info = self.job.sources[i][tensor]
            return self.reader.read_rows(i, url, info, r0, r1)
        return list(self.pool.map(one, range(len(self.job.sources))))

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
        s = task.slice
        rep = Report(slice=s.index, round=task.round, worker=self.worker_id)
        t_read = t_compute = t_write = 0.0
        out = torch.empty(s.nbytes, dtype=torch.uint8) if task.round is None else None
        partial: dict[str, np.ndarray] = {}
        for piece in s.pieces:
            tp = self.job.tensors[piece.tensor]
            method = self.job.methods.for_tensor(piece.tensor)
            if task.round is not None and (not tp.merged or task.round >= method.rounds):
                continue
            t0 = time.perf_counter()
            raws = self._read(piece.tensor, piece.row_start, piece.row_stop)
            rep.bytes_read += sum(r.numel() * r.element_size() for r in raws)
            t1 = time.perf_counter()
            t_read += t1 - t0
            if tp.merged:
                rows, cols = raws[0].shape
                fp32 = self._workspace(len(raws) * rows * cols).view(len(raws), rows, cols)
                for t, r in enumerate(raws):
                    fp32[t].copy_(r)
                base, experts = fp32[0], fp32[1:]                           # [rows, cols], [T, rows, cols]
                self._check_finite(piece.tensor, piece.row_start, piece.row_stop, base, experts)
                block = Block(name=piece.tensor, base=base, experts=experts,
                              weights=self.job.weights, row_start=piece.row_start)
                if task.round is not None:
                    _add(partial, method.stats(task.round, block, ctx))
                    t_compute += time.perf_counter() - t1
                    continue
                result = method.merge(block, ctx).to(TORCH_DTYPES[tp.out_dtype]).cpu()
            else:
                result = raws[0]                                            # copied from the base
            row_bytes = (tp.stop - tp.start) // tp.rows if tp.rows else 0
            at = tp.start + piece.row_start * row_bytes - s.start
            data = as_bytes(result)
            out.numpy()[at:at + len(data)] = data
            t_compute += time.perf_counter() - t1
        if out is not None:
            t0 = time.perf_counter()
            data = out.numpy()
            self.writer.write(self.job.shard_paths[s.shard], s.start, data)
            rep.checksum = zlib.crc32(data)
            rep.bytes_written = s.nbytes
            t_write = time.perf_counter() - t0
        rep.partial = partial
        rep.seconds = {"read": t_read, "compute": t_compute, "write": t_write}
        rep.peak_rss = peak_rss_bytes()
        return rep
