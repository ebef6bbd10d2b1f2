"""The planner: tensor table + settings in, a frozen JSON-serialisable :class:`Plan` out.

Pure: no I/O, no tensors; tests drive it with integer shapes.

- The output layout: tensors sorted by name are packed into shards of at most ``shard_size``
  bytes (a bigger tensor gets a shard of its own); inside a shard they lie by item size, then
  name, with no gaps, as safetensors writes them. Every shard header is computed here, so every
  output byte has a known place before any worker starts.
- The slices: a tensor whose fp32 block fits the slice budget is grouped with its neighbours in
  the same shard; a bigger one is split into row blocks (never splitting a row). Every slice is
  one contiguous byte range of exactly one output shard.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass

from distmerge.checkpoint.header import DTYPE_SIZES, FLOAT_DTYPES, build_header
from distmerge.errors import ConfigError

# A worker process (Python, torch, Ray) costs about this much before it holds any slice.
WORKER_OVERHEAD_BYTES = 600 * 10**6
MIN_SLICE_ELEMENTS = 1024
# Bigger slices than this only cost: fresh multi-GB temporaries fault in page by page, and
# fewer slices balance worse across workers (measured: 8 MB fp32 blocks merged 1.6x faster
# than 256 MB ones on the bench shape).
MAX_SLICE_ELEMENTS = 2 * 2**20


@dataclass(frozen=True, kw_only=True)
class TensorPlan:
    name: str
    in_dtype: str            # safetensors dtype of the inputs
    out_dtype: str           # safetensors dtype written
    shape: tuple[int, ...]
    merged: bool             # False: copied from the base (integer and bool tensors)
    shard: int
    start: int               # absolute byte offset in the output shard
    stop: int

    @property
    def rows(self) -> int:
        return self.shape[0] if len(self.shape) >= 2 else 1

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def row_elements(self) -> int:
        return self.numel // self.rows if self.rows else 0


@dataclass(frozen=True, kw_only=True)
class Piece:
    """Rows ``[row_start, row_stop)`` of one tensor."""

    tensor: str
    row_start: int
    row_stop: int


@dataclass(frozen=True, kw_only=True)
class Slice:
    index: int
    shard: int
    start: int               # absolute byte range in the output shard
    stop: int
    pieces: tuple[Piece, ...]

    @property
    def nbytes(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True, kw_only=True)
class Shard:
    filename: str
    header: bytes            # length prefix + JSON, written at offset 0
    size: int                # total file size
    tensors: tuple[str, ...]


@dataclass(frozen=True, kw_only=True)
class Plan:
    tensors: dict[str, TensorPlan]
    shards: tuple[Shard, ...]
    slices: tuple[Slice, ...]
    slice_elements: int

    @property
    def total_size(self) -> int:
        """Bytes of tensor data (the index json's ``total_size``)."""
        return sum(t.stop - t.start for t in self.tensors.values())

    def to_json(self) -> str:
        d = asdict(self)
        for s in d["shards"]:
            s["header"] = len(s["header"])
        return json.dumps(d, indent=1)

    def index_json(self) -> dict:
        return {
            "metadata": {"total_size": self.total_size},
            "weight_map": {
                name: self.shards[t.shard].filename for name, t in sorted(self.tensors.items())
            },
        }


def slice_elements_for(memory_per_worker: int, *, n_models: int, in_itemsize: int) -> int:
    """How many elements of one tensor a slice may hold so a worker stays within its memory
    (at most ``MAX_SLICE_ELEMENTS``).

    Per element a worker holds the raw inputs twice (the block being merged and the next one
    prefetched), their fp32 copies, the task vectors and masks, and the output.

    Raises:
        ConfigError: the memory cannot hold even a minimal slice.
    """
    per_element = _per_element(n_models, in_itemsize)
    usable = memory_per_worker - WORKER_OVERHEAD_BYTES
    elements = min(usable // per_element, MAX_SLICE_ELEMENTS) if usable > 0 else 0
    if elements < MIN_SLICE_ELEMENTS:
        need = WORKER_OVERHEAD_BYTES + MIN_SLICE_ELEMENTS * per_element
        raise ConfigError(
            f"resources.memory_per_worker: {memory_per_worker} bytes cannot hold a slice of "
            f"{n_models} models; give each worker at least {need} bytes"
        )
    return int(elements)


def _per_element(n_models: int, in_itemsize: int) -> int:
    return 2 * n_models * in_itemsize + n_models * 4 + 2 * (n_models - 1) * 4 + 16


def resident_bytes_for(memory_per_worker: int, *, n_models: int, in_itemsize: int,
                       slice_elements: int) -> int:
    """What a worker may keep of its slices' input bytes between passes: its memory less what
    slices of ``slice_elements`` elements need while they are merged (the sizing
    :func:`slice_elements_for` uses) and the process's own overhead. 0 when no memory is
    given (no bound to keep within)."""
    if memory_per_worker <= 0:
        return 0
    working = WORKER_OVERHEAD_BYTES + slice_elements * _per_element(n_models, in_itemsize)
    return max(0, memory_per_worker - working)


def _shard_names(n: int) -> list[str]:
    if n == 1:
        return ["model.safetensors"]
    return [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


def make_plan(
    tensors: list[tuple[str, str, tuple[int, ...]]],
    *,
    out_dtype: str | None,
    shard_size: int,
    slice_elements: int,
) -> Plan:
    """Plan the output of merging models whose tensors are ``(name, dtype, shape)``.

    ``out_dtype`` (a safetensors dtype name, or None to keep each tensor's) applies to float
    tensors; integer and bool tensors keep theirs and are copied from the base.
    """
    if shard_size <= 0 or slice_elements <= 0:
        raise ConfigError("shard_size and slice size must be positive")
    specs = []
    for name, dtype, shape in sorted(tensors):
        merged = dtype in FLOAT_DTYPES
        odt = (out_dtype or dtype) if merged else dtype
        specs.append((name, dtype, odt, tuple(shape), math.prod(shape) * DTYPE_SIZES[odt]))

    # pack tensors (in name order) into shards
    groups: list[list[tuple]] = []
    used = 0
    for spec in specs:
        if not groups or (used + spec[4] > shard_size and groups[-1]):
            groups.append([])
            used = 0
        groups[-1].append(spec)
        used += spec[4]
    if not groups:
        groups = [[]]
    names = _shard_names(len(groups))

    plans: dict[str, TensorPlan] = {}
    shards: list[Shard] = []
    for si, group in enumerate(groups):
        group = sorted(group, key=lambda s: (-DTYPE_SIZES[s[2]], s[0]))
        entries, off = [], 0
        for name, _, odt, shape, nbytes in group:
            entries.append((name, odt, shape, off, off + nbytes))
            off += nbytes
        header = build_header(entries)
        for (name, idt, odt, shape, _), (_, _, _, b, e) in zip(group, entries):
            plans[name] = TensorPlan(
                name=name, in_dtype=idt, out_dtype=odt, shape=shape,
                merged=idt in FLOAT_DTYPES, shard=si,
                start=len(header) + b, stop=len(header) + e,
            )
        shards.append(Shard(filename=names[si], header=header, size=len(header) + off,
                            tensors=tuple(g[0] for g in group)))

    slices: list[Slice] = []
    for si, shard in enumerate(shards):
        pending: list[Piece] = []
        pending_elems = 0

        def flush() -> None:
            nonlocal pending, pending_elems
            if pending:
                first, last = plans[pending[0].tensor], plans[pending[-1].tensor]
                slices.append(Slice(index=len(slices), shard=si, start=first.start,
                                    stop=last.stop, pieces=tuple(pending)))
            pending, pending_elems = [], 0

        for name in shard.tensors:
            t = plans[name]
            if t.numel <= slice_elements:
                if pending_elems + t.numel > slice_elements:
                    flush()
                pending.append(Piece(tensor=name, row_start=0, row_stop=t.rows))
                pending_elems += t.numel
                continue
            flush()
            rows_per = max(1, slice_elements // max(1, t.row_elements))
            row_bytes = (t.stop - t.start) // t.rows
            for r0 in range(0, t.rows, rows_per):
                r1 = min(t.rows, r0 + rows_per)
                slices.append(Slice(index=len(slices), shard=si,
                                    start=t.start + r0 * row_bytes, stop=t.start + r1 * row_bytes,
                                    pieces=(Piece(tensor=name, row_start=r0, row_stop=r1),)))
        flush()
    return Plan(tensors=plans, shards=tuple(shards), slices=tuple(slices),
                slice_elements=slice_elements)


# -- object-store destinations: one slice per multipart part -------------------------------------

def coalesce_for_parts(plan: Plan, *, min_part: int, max_parts: int) -> Plan:
    """The plan with consecutive slices of each shard joined until every slice but the last of
    its shard holds at least ``min_part`` bytes, counting the shard header in front of its first
    slice (an object store's minimum part size), so that each slice is exactly one part of its
    shard's multipart upload: part ``k`` of a shard is its ``k``-th slice, and part 1 carries the
    header. Pieces are kept as they are (a worker processes a joined slice piece by piece, so its
    memory per piece does not grow; only the slice's output buffer, < ``min_part`` plus one
    slice, does). Slice indices are renumbered in order. The output bytes do not change.

    Raises:
        ConfigError: a shard would need more than ``max_parts`` parts.
    """
    if min_part <= 0:
        return plan
    by_shard: list[list[Slice]] = [[] for _ in plan.shards]
    for s in plan.slices:
        by_shard[s.shard].append(s)
    slices: list[Slice] = []
    for si, shard in enumerate(plan.shards):
        group: list[Slice] = []
        first_of_shard = len(slices)

        def flush() -> None:
            if group:
                slices.append(Slice(index=len(slices), shard=si, start=group[0].start,
                                    stop=group[-1].stop,
                                    pieces=tuple(p for s in group for p in s.pieces)))
                group.clear()

        for s in by_shard[si]:
            if group and group[-1].stop != s.start:
                raise ConfigError(f"slices of {shard.filename} are not contiguous at byte {s.start}")
            group.append(s)
            header = len(shard.header) if len(slices) == first_of_shard else 0
            if group[-1].stop - group[0].start + header >= min_part:
                flush()
        flush()
        parts = len(slices) - first_of_shard
        if parts > max_parts:
            raise ConfigError(
                f"output.shard_size: {shard.filename} ({shard.size} bytes) would need {parts} "
                f"multipart parts, over the object store's limit of {max_parts}; lower "
                "output.shard_size or raise resources.slice_size"
            )
    return Plan(tensors=plan.tensors, shards=plan.shards, slices=tuple(slices),
                slice_elements=plan.slice_elements)
