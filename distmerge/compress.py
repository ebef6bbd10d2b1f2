"""TALL-mask compression: keep T fine-tuned experts as one summed task vector plus one bit per
entry per expert, and rebuild any of them on demand.

Source: "Localizing Task Information for Improved Model Merging and Compression" (Wang et al.,
ICML 2024), the compression use of TALL masks. With the notation of ../shared/METHODS.md
(θ₀ base, θ_t expert t, τ_t = θ_t − θ₀ in fp32, λ = the consensus method's ``tall_lambda``)::

    τ_MTL  = Σ_t τ_t                                 (summed in fp32, in pipeline order)
    m_t    = |τ_t| > λ · |τ_MTL − τ_t|               (strict; bit for bit the consensus row's mask)
    θ̂_t    = θ₀ + m_t ⊙ τ_MTL                        (the rebuilt expert)

``compress`` writes ONE checkpoint folder (``model.safetensors.index.json`` and its shards),
holding for every float tensor ``X`` of the base:

- ``X``: τ_MTL, in the pipeline's ``output.dtype``, **float32 when it is null**: τ_MTL is a sum
  of T task vectors and bf16 would round it to 8 significant bits, an error every rebuilt
  expert would inherit (the experts' own bf16 values are fine: θ₀ + τ is rounded once at the
  end of ``extract``);
- ``X.tall_mask.<t>`` for each expert t (0-indexed, in pipeline order): m_t as a ``U8`` tensor
  of shape ``[rows, ceil(cols / 8)]``. ``rows`` is dim 0 (a 0-D or 1-D tensor is one row),
  ``cols`` the product of the other dims (each row flattened in C order). Entry ``c`` of a row
  is bit ``c % 8`` of byte ``c // 8`` of that row, least significant bit first ("little" bit
  order, as ``numpy.packbits(..., bitorder="little")``); the padding bits of a row's last
  byte are 0.

plus ``compression.json`` (:data:`FORMAT`, :data:`FORMAT_VERSION`, the base path, the expert
paths, λ, the tensor naming, the dtype) and the base's config and tokenizer files, unchanged.
Integer and bool tensors are not stored: ``extract`` copies them from the base, whose path
``compression.json`` records (so the base must stay where it was).

How it runs: one process (the calling one). The output layout comes from the pure planner
(:func:`distmerge.plan.make_plan`; the ``U8`` mask tensors are "not merged" there), the row
blocks are the plan's slices of each τ_MTL tensor (so a block holds at most the plan's slice
budget of elements per model, computed from ``resources.memory_per_worker`` or ``slice_size``
exactly as for a merge), and each block of base and experts is read with ranged reads
(:class:`distmerge.checkpoint.reader.RangeReader`), computed in fp32, and its τ_MTL rows and
the same rows of every mask are written at their planned offsets in the staged output
(:class:`distmerge.checkpoint.writer.StagedOutput`): nothing appears at the destination before
the whole folder is written and verified, and a failure leaves the destination as it was.
Never a whole model in memory, nor a whole tensor bigger than the budget. Distributing the
blocks over the engine's actors (as ``run`` does) is future work.

Library functions return data (:class:`CompressSummary`, :class:`ExtractSummary`); only the
CLI prints.
"""

from __future__ import annotations

import json
import logging
import math
import os
import posixpath
import statistics
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

import distmerge
from distmerge.checkpoint.compat import check_compatible
from distmerge.checkpoint.header import (
    DTYPE_BY_NAME, DTYPE_SIZES, FLOAT_DTYPES,
)
from distmerge.checkpoint.reader import TORCH_DTYPES, RangeReader, as_bytes
from distmerge.checkpoint.source import (
    ModelHeaders, is_local, join, local_path, open_fs, read_model_headers,
)
from distmerge.checkpoint.writer import ShardWriter, StagedOutput, check_destination
from distmerge.config import OUTPUT_DTYPES, Pipeline, expand_path
from distmerge.errors import (
    ConfigError, IncompatibleModelsError, MergeFailedError, NonFiniteError,
    SourceNotFoundError, UnsafeCheckpointError,
)
from distmerge.engine.driver import validate
from distmerge.methods import build
from distmerge.methods.base import weighted_sum
from distmerge.methods.consensus import Consensus
from distmerge.plan import Plan, make_plan, slice_elements_for

log = logging.getLogger(__name__)

FORMAT = "distmerge-tall-masks"
FORMAT_VERSION = 1
MANIFEST = "compression.json"
MASK_INFIX = ".tall_mask."
DEFAULT_DTYPE = "float32"
MAX_MANIFEST_BYTES = 50 * 10**6
_NAME_TO_TORCH = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


# -- the format ------------------------------------------------------------------------------

def mask_name(tensor: str, expert: int) -> str:
    """The name of expert ``expert``'s mask of ``tensor`` in a compressed folder."""
    return f"{tensor}{MASK_INFIX}{expert}"


def rows_cols(shape: tuple[int, ...]) -> tuple[int, int]:
    """``(rows, cols)`` of a tensor seen as rows: dim 0 and the product of the others; a 0-D or
    1-D tensor is one row."""
    if len(shape) >= 2:
        return shape[0], math.prod(shape[1:])
    return 1, math.prod(shape)


def mask_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    """The shape of the packed mask of a tensor of ``shape``: ``[rows, ceil(cols / 8)]``."""
    rows, cols = rows_cols(shape)
    return rows, (cols + 7) // 8


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """``[rows, cols]`` bool → ``[rows, ceil(cols / 8)]`` uint8: entry c of a row is bit c % 8
    (least significant first) of byte c // 8; padding bits are 0."""
    bits = mask.detach().to("cpu", torch.bool).contiguous().numpy()
    return torch.from_numpy(np.packbits(bits, axis=-1, bitorder="little"))


def unpack_mask(packed: torch.Tensor, cols: int) -> torch.Tensor:
    """The inverse of :func:`pack_mask`: ``[rows, nbytes]`` uint8 → ``[rows, cols]`` bool."""
    arr = np.ascontiguousarray(packed.cpu().numpy())
    return torch.from_numpy(np.unpackbits(arr, axis=-1, count=cols, bitorder="little")).bool()


# -- summaries -------------------------------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class CompressSummary:
    output: str
    experts: tuple[str, ...]
    tall_lambda: float
    dtype: str                       # of the stored τ_MTL, e.g. "float32"
    tensors: int                     # float tensors stored as τ_MTL + masks
    integer_tensors: int             # left to the base (copied by extract)
    shards: int
    elements: int                    # float entries per model
    mask_ones: tuple[int, ...]       # set bits of each expert's masks
    compressed_bytes: int            # every file of the published folder
    experts_bytes: int               # the experts' safetensors files it replaces
    bytes_read: int
    seconds: float

    @property
    def storage_ratio(self) -> float:
        """Bytes of the compressed folder / bytes of the experts' weight files."""
        return self.compressed_bytes / self.experts_bytes if self.experts_bytes else math.inf

    @property
    def mask_density(self) -> tuple[float, ...]:
        return tuple(n / self.elements if self.elements else 0.0 for n in self.mask_ones)

    def lines(self) -> list[str]:
        dens = ", ".join(f"{d:.3f}" for d in self.mask_density)
        return [
            f"compressed checkpoint: {self.output}",
            f"  {len(self.experts)} experts, {self.tensors} float tensors as tau_MTL ({self.dtype}) "
            f"+ {len(self.experts)} bit masks each (tall_lambda {self.tall_lambda:g}); "
            f"{self.integer_tensors} integer tensor(s) left to the base",
            f"  mask density per expert: {dens}",
            f"  {self.compressed_bytes / 1e6:.3f} MB in {self.shards} shard(s) + side files, vs "
            f"{self.experts_bytes / 1e6:.3f} MB of expert weights: storage ratio "
            f"{self.storage_ratio:.4f} ({1 / self.storage_ratio if self.storage_ratio else math.inf:.2f}x smaller)",
            f"  read {self.bytes_read / 1e9:.3f} GB in {self.seconds:.2f} s (one process)",
        ]


@dataclass(frozen=True, kw_only=True)
class TensorError:
    """‖θ̂_t − θ_t‖₂² and ‖θ_t − θ₀‖₂² of one tensor, accumulated in fp64."""

    error_sq: float
    delta_sq: float

    @property
    def relative(self) -> float:
        """‖θ̂_t − θ_t‖₂ / ‖θ_t − θ₀‖₂ (0 when both are 0; inf when only the expert did not
        move)."""
        if self.delta_sq == 0.0:
            return 0.0 if self.error_sq == 0.0 else math.inf
        return math.sqrt(self.error_sq / self.delta_sq)


@dataclass(frozen=True, kw_only=True)
class ExtractSummary:
    output: str
    expert: int
    expert_path: str
    dtype: str | None                # None: each tensor in the base's dtype
    tensors: int
    shards: int
    bytes_written: int
    kept: int                        # entries where the mask holds
    elements: int                    # float entries
    seconds: float
    reference: str | None = None
    errors: dict[str, TensorError] = field(default_factory=dict)   # float tensors, with reference

    @property
    def relative_error(self) -> float | None:
        """Over the whole model: √(Σ error_sq) / √(Σ delta_sq); None without a reference."""
        if self.reference is None:
            return None
        return TensorError(error_sq=sum(e.error_sq for e in self.errors.values()),
                           delta_sq=sum(e.delta_sq for e in self.errors.values())).relative

    def error_stats(self) -> tuple[float, float, float] | None:
        """(min, median, max) of the per-tensor relative errors."""
        rel = [e.relative for e in self.errors.values()]
        if not rel:
            return None
        return min(rel), statistics.median(rel), max(rel)

    def lines(self, *, per_tensor: bool = True) -> list[str]:
        out = [
            f"extracted expert {self.expert} ({self.expert_path}): {self.output}",
            f"  {self.tensors} tensors in {self.shards} shard(s), {self.bytes_written / 1e6:.3f} MB, "
            f"mask keeps {self.kept} of {self.elements} entries "
            f"({self.kept / self.elements if self.elements else 0.0:.3f}), {self.seconds:.2f} s",
        ]
        if self.reference is None:
            return out
        if per_tensor:
            out.append(f"  relative error |rebuilt - expert| / |expert - base| against {self.reference}:")
            width = max((len(n) for n in self.errors), default=4)
            for name in sorted(self.errors):
                out.append(f"    {name:<{width}}  {self.errors[name].relative:.6e}")
        stats = self.error_stats()
        if stats:
            out.append(f"  per tensor: min {stats[0]:.6e}, median {stats[1]:.6e}, max {stats[2]:.6e}")
        out.append(f"  overall relative error: {self.relative_error:.6e}")
        return out


# -- helpers ---------------------------------------------------------------------------------

def _files_size(urls: tuple[str, ...] | list[str]) -> int:
    total = 0
    for url in urls:
        if is_local(url):
            total += os.path.getsize(local_path(url))
        else:
            fs, path = open_fs(url)
            total += int(fs.size(path))
    return total


def _folder_size(folder: str) -> int:
    return sum(e.stat().st_size for e in os.scandir(folder) if e.is_file())


def _abs(url: str) -> str:
    return os.path.abspath(local_path(url)) if is_local(url) else url


def _slice_elements(memory: int, slice_size: int | None, *, n_models: int, itemsize: int) -> int:
    """The plan's row-block budget, as the driver computes it for a merge."""
    if slice_size is not None:
        return max(1, slice_size // 4)
    return slice_elements_for(memory, n_models=n_models, in_itemsize=itemsize)


def _read_pool(n: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=max(1, min(16, n)))


def _check_finite(names: list[str], tensor: str, r0: int, r1: int, blocks: torch.Tensor) -> None:
    if bool(torch.isfinite(blocks.sum())):
        return
    for i in range(blocks.shape[0]):
        if not bool(torch.isfinite(blocks[i]).all()):
            raise NonFiniteError(f"{names[i]}: tensor {tensor} holds NaN or Inf in rows {r0}..{r1}; "
                                 "fix the checkpoint")


class _Writes:
    """What was written where (shard, offset, length, crc32), to check every byte at the end."""

    def __init__(self) -> None:
        self.by_shard: dict[int, list[tuple[int, int, int]]] = {}
        self.covered: dict[str, int] = {}

    def add(self, shard: int, offset: int, data: np.ndarray, tensor: str) -> None:
        self.by_shard.setdefault(shard, []).append((offset, len(data), zlib.crc32(data)))
        self.covered[tensor] = self.covered.get(tensor, 0) + len(data)


def _verify(output: StagedOutput, plan: Plan, writes: _Writes) -> None:
    """Every shard parses back to its planned header and size, every tensor's planned bytes
    were written once, and every write reads back with its checksum.

    Raises:
        MergeFailedError
    """
    for name, t in plan.tensors.items():
        if writes.covered.get(name, 0) != t.stop - t.start:
            raise MergeFailedError(f"verification failed: {name} has {writes.covered.get(name, 0)} "
                                   f"bytes written, planned {t.stop - t.start}")
    output.check_shards(plan)
    for si, shard in enumerate(plan.shards):
        with open(output.shard_path(shard.filename), "rb") as f:
            for offset, length, crc in writes.by_shard.get(si, []):
                f.seek(offset)
                if zlib.crc32(f.read(length)) != crc:
                    raise MergeFailedError(f"verification failed: bytes {offset}..{offset + length} of "
                                           f"{shard.filename} differ from what was written")


# -- compress --------------------------------------------------------------------------------

def _lambdas(pipeline: Pipeline):
    """The consensus method set of ``pipeline`` (overrides may set their own ``tall_lambda``).

    Raises:
        ConfigError: another method, ``lines``, or non-unit weights.
    """
    if pipeline.method.name != Consensus.name:
        raise ConfigError(
            f"method.name: compress stores TALL masks, which the consensus method defines (its "
            f"tall_lambda is the mask threshold); this pipeline's method is "
            f"{pipeline.method.name!r}; use method: {{name: consensus, tall_lambda: 0.6}}"
        )
    methods = build(pipeline.method.name, pipeline.method.params(),
                    [(o.match, o.params()) for o in pipeline.overrides])
    for m in methods.all():
        if not isinstance(m, Consensus):
            raise ConfigError("method.lines: compress stores the task vectors' sum and masks, "
                              "not a merged model; remove lines")
    for i, e in enumerate(pipeline.experts):
        if e.weight != 1.0:
            raise ConfigError(
                f"experts[{i}].weight: compress stores the unweighted tau_MTL = sum of the task "
                f"vectors, so every weight must be 1 (got {e.weight:g}); remove the weights"
            )
    return methods


def compress(pipeline: Pipeline) -> CompressSummary:
    """Write the TALL-mask compression of the pipeline's experts to ``output.path`` (see the
    module docstring), in this process.

    Raises:
        ConfigError (not consensus, weights, impossible sizes), SourceNotFoundError,
        UnsafeCheckpointError, IncompatibleModelsError, DestinationError, NonFiniteError,
        MergeFailedError; the destination is then left as it was.
    """
    start = time.perf_counter()
    methods = _lambdas(pipeline)
    v = validate(pipeline)            # storage options, destination, headers, compatibility
    base, experts = v.base, v.experts
    models = [base, *experts]

    T = len(experts)
    floats = sorted(n for n, (_, i) in base.tensors.items() if i.dtype in FLOAT_DTYPES)
    integers = sorted(n for n, (_, i) in base.tensors.items() if i.dtype not in FLOAT_DTYPES)
    entries: list[tuple[str, str, tuple[int, ...]]] = []
    for name in floats:
        info = base.tensors[name][1]
        entries.append((name, info.dtype, info.shape))
        entries += [(mask_name(name, t), "U8", mask_shape(info.shape)) for t in range(T)]
    clash = sorted({n for n, _, _ in entries} & set(integers))
    if clash:
        raise IncompatibleModelsError(f"{pipeline.base_path}: tensor names {clash[:3]} clash with the mask "
                                      f"names compress writes (<tensor>{MASK_INFIX}<t>)")
    dtype = pipeline.output.dtype or DEFAULT_DTYPE
    itemsize = max((DTYPE_SIZES[base.tensors[n][1].dtype] for n in floats), default=4)
    elements = _slice_elements(pipeline.resources.memory_per_worker, pipeline.resources.slice_size,
                               n_models=1 + T, itemsize=itemsize)
    plan = make_plan(entries, out_dtype=DTYPE_BY_NAME[dtype], shard_size=pipeline.output.shard_size,
                     slice_elements=elements)

    output = StagedOutput(pipeline.output.path)
    reader, writer, writes = RangeReader(), ShardWriter(), _Writes()
    ones = [0] * T
    bytes_read = 0
    names = [m.url for m in models]
    out_torch = _NAME_TO_TORCH[dtype]
    workspace = torch.empty(0, dtype=torch.float32)
    try:
        output.create(plan)
        shard_paths = [output.shard_path(s.filename) for s in plan.shards]
        with _read_pool(len(models)) as pool:
            for s in plan.slices:
                for piece in s.pieces:
                    tp = plan.tensors[piece.tensor]
                    if not tp.merged or tp.numel == 0:       # masks: written with their tensor's rows
                        continue
                    name, r0, r1 = piece.tensor, piece.row_start, piece.row_stop
                    raws = list(pool.map(
                        lambda i: reader.read_rows(i, *models[i].tensors[name], r0, r1), range(len(models))))
                    bytes_read += sum(r.numel() * r.element_size() for r in raws)
                    rows, cols = raws[0].shape
                    if workspace.numel() < len(raws) * rows * cols:
                        workspace = torch.empty(len(raws) * rows * cols, dtype=torch.float32)
                    fp = workspace[:len(raws) * rows * cols].view(len(raws), rows, cols)
                    for i, r in enumerate(raws):
                        fp[i].copy_(r)
                    _check_finite(names, name, r0, r1, fp)
                    theta0, tau = fp[0], fp[1:]
                    tau.sub_(theta0)                                          # τ_t = θ_t − θ₀ (fp32)
                    tau_mtl = weighted_sum(tau, (1.0,) * T)                   # Σ_t τ_t, expert order
                    lam = methods.for_tensor(name).tall_lambda
                    data = as_bytes(tau_mtl.to(out_torch))
                    at = tp.start + r0 * ((tp.stop - tp.start) // tp.rows)
                    writer.write(shard_paths[tp.shard], at, data)
                    writes.add(tp.shard, at, data, name)
                    for t in range(T):
                        m = tau[t].abs() > (tau_mtl - tau[t]).abs_().mul_(lam)  # as consensus.merge
                        ones[t] += int(m.sum())
                        packed = pack_mask(m).numpy()
                        mp = plan.tensors[mask_name(name, t)]
                        at = mp.start + r0 * packed.shape[1]
                        writer.write(shard_paths[mp.shard], at, packed.reshape(-1))
                        writes.add(mp.shard, at, packed.reshape(-1), mp.name)
        writer.close()
        output.finalize(plan, base_url=base.url, out_dtype=None)   # config: the base's, unchanged
        n_elements = sum(base.tensors[n][1].numel for n in floats)
        manifest = _manifest(pipeline, base.url, methods, floats, integers, dtype,
                             [o / n_elements if n_elements else 0.0 for o in ones])
        with open(os.path.join(output.staging, MANIFEST), "w") as f:
            json.dump(manifest, f, indent=2)
        _verify(output, plan, writes)
        output.publish(overwrite=pipeline.output.overwrite)
    except BaseException:
        output.abort()
        raise
    finally:
        writer.close()
        reader.close()
    return CompressSummary(
        output=output.dest, experts=tuple(e.path for e in pipeline.experts),
        tall_lambda=methods.default.tall_lambda, dtype=dtype, tensors=len(floats),
        integer_tensors=len(integers), shards=len(plan.shards), elements=n_elements,
        mask_ones=tuple(ones), compressed_bytes=_folder_size(output.dest),
        experts_bytes=sum(_files_size(m.shards) for m in experts), bytes_read=bytes_read,
        seconds=time.perf_counter() - start,
    )


def _manifest(pipeline: Pipeline, base_url: str, methods, floats: list[str], integers: list[str],
              dtype: str, density: list[float]) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "created_by": f"distmerge {distmerge.__version__}",
        "base": _abs(base_url),           # the safetensors folder read (a ZeRO base's staged one)
        "experts": [{"index": t, "path": e.path, "resolved": _abs(e.path), "mask_density": density[t]}
                    for t, e in enumerate(pipeline.experts)],
        "tall_lambda": methods.default.tall_lambda,
        "tall_lambda_overrides": [{"match": p, "tall_lambda": m.tall_lambda} for p, m in methods.overrides],
        "dtype": dtype,
        "tensors": {
            "task_vector": "<tensor>: tau_MTL = sum_t (theta_t - theta_0), differences and sum in "
                           f"fp32 in expert order, stored as {dtype}",
            "mask": f"<tensor>{MASK_INFIX}<t>: mask of expert t (0-indexed, pipeline order), "
                    "|tau_t| > tall_lambda * |tau_MTL - tau_t| (strict)",
            "mask_dtype": "U8",
            "mask_shape": "[rows, ceil(cols / 8)]: rows = dim 0 (1 for a 0-D or 1-D tensor), "
                          "cols = product of the other dims, each row flattened in C order",
            "bit_order": "little: entry c of a row is bit (c % 8) of byte (c // 8), least significant "
                         "first (numpy.packbits bitorder='little'); padding bits are 0",
            "rebuild": "theta_t = theta_0 + mask_t * tau_MTL",
        },
        "float_tensors": len(floats),
        "integer_tensors": integers,
        "integer_tensors_note": "not stored; copied from the base",
    }


# -- extract ---------------------------------------------------------------------------------

def read_manifest(compressed: str) -> dict[str, Any]:
    """The ``compression.json`` of a compressed folder, checked.

    Raises:
        SourceNotFoundError: no folder or no manifest; UnsafeCheckpointError: not one this
            version reads.
    """
    fs, path = open_fs(compressed)
    where = join(compressed, MANIFEST)
    try:
        if fs.size(join(path, MANIFEST)) > MAX_MANIFEST_BYTES:
            raise UnsafeCheckpointError(f"{where}: over {MAX_MANIFEST_BYTES} bytes")
        raw = fs.cat_file(join(path, MANIFEST))
    except FileNotFoundError:
        raise SourceNotFoundError(f"{compressed}: not a compressed folder (no {MANIFEST}); "
                                  "make one with distmerge compress") from None
    try:
        m = json.loads(raw)
    except (ValueError, RecursionError):
        m = None
    ok = (
        isinstance(m, dict) and m.get("format") == FORMAT and isinstance(m.get("base"), str)
        and isinstance(m.get("experts"), list) and m["experts"]
        and all(isinstance(e, dict) and isinstance(e.get("path"), str) for e in m["experts"])
    )
    if not ok:
        raise UnsafeCheckpointError(f"{where}: not a {FORMAT} manifest")
    if m.get("format_version") != FORMAT_VERSION:
        raise UnsafeCheckpointError(f"{where}: format_version {m.get('format_version')!r}; this "
                                    f"distmerge reads version {FORMAT_VERSION}")
    return m


def _basename(url: str) -> str:
    return posixpath.basename(local_path(url).rstrip("/").replace(os.sep, "/"))


def resolve_expert(manifest: dict[str, Any], key: str | int) -> int:
    """The index of the expert named by ``key``: its path as given in the pipeline (or the same
    place), its index, or its folder's basename.

    Raises:
        ConfigError: no such expert, or a basename two experts share.
    """
    experts = manifest["experts"]
    known = "; ".join(f"{i}: {e['path']}" for i, e in enumerate(experts))
    if isinstance(key, int) and not isinstance(key, bool):
        if 0 <= key < len(experts):
            return key
        raise ConfigError(f"expert index {key} out of range: the compressed folder holds {known}")
    s = str(key)
    same = [i for i, e in enumerate(experts)
            if s == e["path"] or (is_local(s) and is_local(e["path"])
                                  and os.path.normpath(_abs(s)) == os.path.normpath(e.get("resolved") or _abs(e["path"])))]
    if len(same) == 1:
        return same[0]
    if s.isdigit():
        if int(s) < len(experts):
            return int(s)
        raise ConfigError(f"expert index {s} out of range: the compressed folder holds {known}")
    named = [i for i, e in enumerate(experts) if _basename(e["path"]) == _basename(s)] if s.strip("/") else []
    if len(named) == 1:
        return named[0]
    if len(named) > 1:
        raise ConfigError(f"expert {s!r} is ambiguous: experts {named} share that folder name; "
                          f"give the index or the full path ({known})")
    raise ConfigError(f"unknown expert {s!r}: the compressed folder holds {known}")


def _check_layout(compressed: ModelHeaders, base: ModelHeaders, T: int) -> None:
    """The compressed folder holds exactly τ_MTL and T masks of every float tensor of the base.

    Raises:
        IncompatibleModelsError
    """
    want: dict[str, tuple[frozenset[str] | set[str], tuple[int, ...]]] = {}
    for name, (_, info) in base.tensors.items():
        if info.dtype in FLOAT_DTYPES:
            want[name] = (FLOAT_DTYPES, info.shape)
            for t in range(T):
                want[mask_name(name, t)] = ({"U8"}, mask_shape(info.shape))
    problems = []
    have = compressed.tensors
    missing, extra = sorted(set(want) - set(have)), sorted(set(have) - set(want))
    if missing:
        problems.append(f"lacks {len(missing)} tensor(s): {missing[:3]}")
    if extra:
        problems.append(f"has {len(extra)} tensor(s) the base does not explain: {extra[:3]}")
    for name in sorted(set(want) & set(have)):
        dtypes, shape = want[name]
        info = have[name][1]
        if info.dtype not in dtypes or info.shape != shape:
            problems.append(f"{name} is {info.dtype}{list(info.shape)}, expected {list(shape)}")
            break
    if problems:
        raise IncompatibleModelsError(
            f"{compressed.url} does not match the base {base.url}: " + "; ".join(problems)
            + " (was the base changed or moved since compress?)")


def extract(compressed: str, expert: str | int, out: str, *, dtype: str | None = None,
            overwrite: bool = False, reference: str | None = None, shard_size: int = 2 * 10**9,
            memory: int = 2 * 10**9, slice_size: int | None = None) -> ExtractSummary:
    """Rebuild expert ``expert`` of the compressed folder as θ₀ + m_t ⊙ τ_MTL (θ₀ from the base
    that ``compression.json`` records; integer tensors copied from it) and write it to ``out``
    as a normal checkpoint (index json, the base's config and tokenizer files), staged and
    published atomically. ``dtype`` (float32 | float16 | bfloat16; None: the base's) is the
    float tensors' dtype. With ``reference`` (the real expert), the result holds the per-tensor
    relative errors ‖θ̂_t − θ_t‖₂ / ‖θ_t − θ₀‖₂ of the written values, accumulated in fp64.

    Raises:
        ConfigError (unknown expert, dtype), SourceNotFoundError, UnsafeCheckpointError,
        IncompatibleModelsError, DestinationError, MergeFailedError; the destination is then
        left as it was.
    """
    start = time.perf_counter()
    compressed = expand_path(compressed)
    out = expand_path(out)
    reference = expand_path(reference) if reference is not None else None
    if dtype is not None and dtype not in OUTPUT_DTYPES:
        raise ConfigError(f"--dtype: must be one of {', '.join(OUTPUT_DTYPES)}, got {dtype!r}")
    manifest = read_manifest(compressed)
    t = resolve_expert(manifest, expert)
    base_url = manifest["base"]
    sources = [compressed, base_url] + ([reference] if reference else [])
    check_destination(out, overwrite=overwrite, sources=sources)
    with _read_pool(len(sources)) as pool:
        headers = [read_model_headers(u, pool=pool) for u in sources]
    packed_m, base = headers[0], headers[1]
    ref = headers[2] if reference else None
    _check_layout(packed_m, base, len(manifest["experts"]))
    if ref is not None:
        check_compatible(base, [ref])

    tensors = [(n, info.dtype, info.shape) for n, (_, info) in base.tensors.items()]
    itemsize = max((DTYPE_SIZES[d] for _, d, _ in tensors), default=4)
    # per element: base, τ_MTL, mask bits, reference and their fp32 / fp64 copies
    elements = _slice_elements(memory, slice_size, n_models=5 if ref else 3, itemsize=max(itemsize, 4))
    plan = make_plan(tensors, out_dtype=DTYPE_BY_NAME[dtype] if dtype else None, shard_size=shard_size,
                     slice_elements=elements)

    output = StagedOutput(out)
    reader, writer = RangeReader(), ShardWriter()
    checksums: dict[int, int] = {}
    errors: dict[str, list[float]] = {}
    kept = n_elements = 0
    try:
        output.create(plan)
        with _read_pool(4) as pool:
            for s in plan.slices:
                buf = np.empty(s.nbytes, dtype=np.uint8)
                for piece in s.pieces:
                    tp = plan.tensors[piece.tensor]
                    name, r0, r1 = piece.tensor, piece.row_start, piece.row_stop
                    at = tp.start + r0 * ((tp.stop - tp.start) // tp.rows if tp.rows else 0) - s.start
                    if not tp.merged:                                     # copied from the base
                        data = as_bytes(reader.read_rows(0, *base.tensors[name], r0, r1))
                        buf[at:at + len(data)] = data
                        continue
                    reads = [(0, base, name), (1, packed_m, name), (2, packed_m, mask_name(name, t))]
                    if ref is not None:
                        reads.append((3, ref, name))
                    raws = list(pool.map(lambda a: reader.read_rows(a[0], *a[1].tensors[a[2]], r0, r1), reads))
                    cols = raws[0].shape[1]
                    theta0 = raws[0].float()
                    m = unpack_mask(raws[2], cols)
                    rebuilt = theta0 + raws[1].float() * m.float()           # θ₀ + m_t ⊙ τ_MTL (fp32)
                    written = rebuilt.to(TORCH_DTYPES[tp.out_dtype])
                    data = as_bytes(written)
                    buf[at:at + len(data)] = data
                    kept += int(m.sum())
                    n_elements += m.numel()
                    if ref is not None:
                        theta = raws[3].double()
                        e = errors.setdefault(name, [0.0, 0.0])
                        e[0] += float((written.double() - theta).square_().sum())
                        e[1] += float((theta - raws[0].double()).square_().sum())
                writer.write(output.shard_path(plan.shards[s.shard].filename), s.start, buf)
                checksums[s.index] = zlib.crc32(buf)
        writer.close()
        output.finalize(plan, base_url=base_url, out_dtype=dtype)
        output.verify(plan, checksums)
        output.publish(overwrite=overwrite)
    except BaseException:
        output.abort()
        raise
    finally:
        writer.close()
        reader.close()
    return ExtractSummary(
        output=output.dest, expert=t, expert_path=manifest["experts"][t]["path"], dtype=dtype,
        tensors=len(plan.tensors), shards=len(plan.shards), bytes_written=plan.total_size,
        kept=kept, elements=n_elements, seconds=time.perf_counter() - start, reference=reference,
        errors={n: TensorError(error_sq=e[0], delta_sq=e[1]) for n, e in sorted(errors.items())},
    )
