"""``distmerge validate --deep``: sample a few rows of every tensor and look at the values.

The header checks (:mod:`distmerge.checkpoint.compat`) prove that base and experts have the same
tensors; they cannot tell whether an expert is a fine-tune of that base. This check reads, with
ranged reads and a bounded number of bytes, the same few rows of every float tensor in the base
and in every expert, and reports per expert:

* **non-finite values** (NaN, ±Inf, as a run sees them after conversion to fp32) in the sampled
  rows, naming model, tensor and first row. A run refuses them (it checks every value, not
  only the sampled ones) unless the pipeline sets ``allow_nonfinite: true``;
* **the relative size of the task vector** on the sampled rows, per tensor:
  ``ratio = |theta_t - theta_0| / |theta_0|`` (Frobenius norms over the sampled values).

What the ratio tells (the thresholds)
-------------------------------------
A fine-tune moves weights by a small fraction of their size: full fine-tunes and merged LoRA
adapters measure ``ratio`` ~ 1e-3 to 1e-2 per tensor, long continued training a few 1e-2 (the
generated demo experts, deliberately noisy, about 0.25 on matrices). Weights that are not a
fine-tune of the base measure about sqrt(2) = 1.41: for independent weights of the same scale
``|a - b|^2 = |a|^2 + |b|^2``, and the same holds for the base's weights multiplied by a random
orthogonal or invertible matrix, which is what MergeLock-style protection does to the attention
projections (Q/K and V/O pairs transformed so the model computes the same function but its
weights no longer lie near the base's, so any task-vector merge of it produces garbage).
:data:`RATIO_THRESHOLD` = 0.5 sits ten times above the fine-tune range and three times below the
scrambled one, so it separates them without tuning. Sampling 8 or more rows of hundreds of
values makes the estimate's noise far smaller than that gap.

Two signatures are reported, each naming the tensors:

* an expert whose **attention tensors** (names with ``attn``/``attention``, ``q_proj``,
  ``k_proj``, ``v_proj``, ``o_proj``, ``qkv``, ``query_key_value``, ``query``/``key``/``value``,
  ``wq``/``wk``/``wv``/``wo``, ``c_attn``; never a norm: architecture-agnostic patterns on the
  dot-separated parts of the name, see :func:`is_attention`) have ``ratio`` above the threshold
  while its other matrices do not: attention scrambled, **MergeLock-style protection**;
* an expert whose other matrices (2-D or more, not attention: embeddings, MLP, experts of an
  MoE, the head) have a **median** ``ratio`` above the threshold: **a model from another base**
  (or trained from scratch); every matrix over the threshold is named. Over all matrices when
  no name looks like attention, so architectures without attention are covered too.

Exit codes (decided by :meth:`DeepReport.error`, raised by the CLI after printing the report):
non-finite values are :class:`~distmerge.errors.NonFiniteError` (7), as a run would refuse them,
and only a warning when the pipeline allows them; a flagged expert is
:class:`~distmerge.errors.IncompatibleModelsError` (5), like an expert whose tensors differ in
shape: merging it would produce a broken model, so scripts that gate a long run on
``validate --deep`` stop there. Non-finite values win when both are found. A tensor whose sampled
base rows are all zero (e.g. zero-initialised) has no defined ratio and is not flagged.

Which rows: :func:`sample_rows` (first, middle, last and ``n`` evenly spaced, deterministic),
each read up to ``max_bytes // rows`` bytes from its start so that at most ``max_bytes`` bytes
are read per tensor and model (:func:`sample_ranges`); adjacent rows are read as one range.
Integer and bool tensors (copied from the base by a run) are not read.
"""

from __future__ import annotations

import re
import statistics
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from distmerge.checkpoint.header import FLOAT_DTYPES, TensorInfo
from distmerge.checkpoint.reader import TORCH_DTYPES, RangeReader
from distmerge.checkpoint.source import ModelHeaders
from distmerge.config import StorageConfig
from distmerge.errors import DistmergeError, IncompatibleModelsError, NonFiniteError

DEFAULT_SAMPLE_ROWS = 8
DEFAULT_MAX_BYTES = 256 * 1024          # per tensor and model
RATIO_THRESHOLD = 0.5
MAX_IN_MESSAGE = 5

_ATTENTION_PART = re.compile(
    r".*(attn|attention).*|(q|k|v|o|qkv|out)_proj|qkv|wqkv|query_key_value|query|key|value"
    r"|w[qkvo]|c_attn", re.IGNORECASE)
_NORM_PART = re.compile(r".*norm.*|ln(_?\w*)?", re.IGNORECASE)


def is_attention(name: str) -> bool:
    """Whether ``name`` is an attention tensor, from the dot-separated parts of its name alone:
    some part matches an attention pattern (``self_attn``, ``attention``, ``q_proj``, ``qkv``,
    ``query_key_value``, ``wq``, ``c_attn``, ...) and no part names a norm (``layernorm``,
    ``q_norm``, ``ln_1``): ``post_attention_layernorm.weight`` is not attention."""
    parts = name.split(".")
    return (any(_ATTENTION_PART.fullmatch(p) for p in parts)
            and not any(_NORM_PART.fullmatch(p) for p in parts))


def sample_rows(rows: int, n: int = DEFAULT_SAMPLE_ROWS) -> tuple[int, ...]:
    """Row indices to read of a tensor with ``rows`` rows: the first, middle and last, and ``n``
    evenly spaced (at most ``max(n + 1, 3)`` rows; every row when there are no more than that)."""
    if rows <= 0:
        return ()
    if rows <= n + 1:
        return tuple(range(rows))
    picks = {0, (rows - 1) // 2, rows - 1}
    if n > 1:
        picks |= {round(i * (rows - 1) / (n - 1)) for i in range(n)}
    return tuple(sorted(picks))


def sample_ranges(info: TensorInfo, n: int = DEFAULT_SAMPLE_ROWS,
                  max_bytes: int = DEFAULT_MAX_BYTES) -> list[tuple[int, int, int]]:
    """The byte ranges to read of ``info`` as ``(row, start, stop)``, offsets relative to the
    tensor's first byte: the beginning of each sampled row, ``max_bytes // rows`` bytes at most
    (whole elements, at least one), adjacent whole rows joined into one range. The lengths sum
    to at most ``max(max_bytes, one element per row)``."""
    if info.numel == 0:
        return []
    rows = sample_rows(info.rows, n)
    itemsize = info.nbytes // info.numel
    row_bytes = info.row_bytes
    most = max(1, max_bytes // itemsize)       # fewer rows when max_bytes cannot hold one
    if len(rows) > most:                       # element of each: an evenly spaced subset
        rows = tuple(sorted({rows[(i * (len(rows) - 1)) // max(1, most - 1)] for i in range(most)}))
    take = min(row_bytes, max(itemsize, (max_bytes // len(rows)) // itemsize * itemsize))
    ranges: list[tuple[int, int, int]] = []
    for r in rows:
        a = r * row_bytes
        if ranges and take == row_bytes and ranges[-1][2] == a:
            ranges[-1] = (ranges[-1][0], ranges[-1][1], a + take)
        else:
            ranges.append((r, a, a + take))
    return ranges


@dataclass(frozen=True, kw_only=True)
class TensorCheck:
    """One tensor of one model, on its sampled rows."""

    name: str
    attention: bool
    matrix: bool                  # 2-D or more
    values: int                   # sampled values
    nonfinite: int                # of them NaN or ±Inf (after conversion to fp32)
    first_bad_row: int | None     # the first sampled row holding one
    ratio: float | None           # |theta_t - theta_0| / |theta_0|; None: base, non-finite, zero base


@dataclass(frozen=True, kw_only=True)
class ModelCheck:
    url: str
    role: str                     # "base" or "expert N" (1-based, pipeline order)
    tensors: tuple[TensorCheck, ...]

    @property
    def nonfinite(self) -> list[TensorCheck]:
        return [t for t in self.tensors if t.nonfinite]

    def _ratios(self, which) -> list[TensorCheck]:
        return [t for t in self.tensors if t.ratio is not None and which(t)]

    @property
    def median_ratio(self) -> float | None:
        """Median ratio over the matrices (2-D or more) that are not attention tensors (over
        all matrices when every one is): attention tensors are most of a transformer's
        matrices, so scrambled attention alone must not move this median."""
        rs = [t.ratio for t in self._ratios(lambda t: t.matrix and not t.attention)]
        rs = rs or [t.ratio for t in self._ratios(lambda t: t.matrix)]
        return statistics.median(rs) if rs else None

    @property
    def max_ratio(self) -> TensorCheck | None:
        ts = self._ratios(lambda t: True)
        return max(ts, key=lambda t: t.ratio) if ts else None

    @property
    def flagged(self) -> list[TensorCheck]:
        """The tensors that make this expert suspect: attention tensors over the threshold,
        and when the expert looks like another base, then every other matrix over it."""
        attention = self._ratios(lambda t: t.attention and t.ratio > RATIO_THRESHOLD)
        if self.kind == "another-base":
            return attention + self._ratios(lambda t: t.matrix and not t.attention
                                            and t.ratio > RATIO_THRESHOLD)
        return attention

    @property
    def kind(self) -> str | None:
        """None (looks like a fine-tune of the base), ``"another-base"`` or
        ``"attention-scrambled"`` (see the module docstring)."""
        if self.role == "base":
            return None
        median = self.median_ratio
        if median is not None and median > RATIO_THRESHOLD:
            return "another-base"
        if self._ratios(lambda t: t.attention and t.ratio > RATIO_THRESHOLD):
            return "attention-scrambled"
        return None

    def verdict(self) -> str:
        if self.kind == "another-base":
            return (f"its weights differ from the base's by about their own size (median ratio "
                    f"{self.median_ratio:.2f} over the non-attention matrices): a model from another base or "
                    "trained from scratch, not a fine-tune of this base")
        if self.kind == "attention-scrambled":
            return ("its attention tensors differ from the base's by about their own size while "
                    "the rest looks like a fine-tune: the signature of MergeLock-style "
                    "protection (attention weights transformed to resist merging)")
        return "looks like a fine-tune of the base"


@dataclass(frozen=True, kw_only=True)
class DeepReport:
    """What :func:`deep_validate` found; :meth:`lines` for people, :meth:`error` for exit codes."""

    base: ModelCheck
    experts: tuple[ModelCheck, ...]
    sample_rows: int
    max_bytes: int
    bytes_read: int
    reads: int
    allow_nonfinite: bool

    @property
    def models(self) -> tuple[ModelCheck, ...]:
        return (self.base, *self.experts)

    @property
    def flagged_experts(self) -> list[ModelCheck]:
        return [e for e in self.experts if e.kind is not None]

    @property
    def nonfinite_models(self) -> list[ModelCheck]:
        return [m for m in self.models if m.nonfinite]

    @property
    def ok(self) -> bool:
        return not self.flagged_experts and not self.nonfinite_models

    def lines(self) -> list[str]:
        tensors = len(self.base.tensors)
        out = [f"deep check: {tensors} float tensors x {len(self.models)} models, up to "
               f"{max(self.sample_rows + 1, 3)} rows and {self.max_bytes} bytes per tensor and model; read "
               f"{self.bytes_read} bytes in {self.reads} ranged reads",
               "  ratio = |theta_t - theta_0| / |theta_0| on the sampled rows (fine-tunes: ~0.001-0.05; "
               f"flagged above {RATIO_THRESHOLD})"]
        for m in self.models:
            values = sum(t.values for t in m.tensors)
            bad = m.nonfinite
            nf = (f"{sum(t.nonfinite for t in bad)} NaN/Inf in {len(bad)} tensor(s)" if bad
                  else f"no NaN/Inf in {values} sampled values")
            if m.role == "base":
                out.append(f"  base {m.url}: {nf}")
            else:
                top = m.max_ratio
                ratios = (f"ratio median {m.median_ratio:.4f} (non-attention matrices), max "
                          f"{top.ratio:.4f} ({top.name})"
                          if top is not None and m.median_ratio is not None else "ratio n/a")
                out.append(f"  {m.role} {m.url}: {ratios}; {nf}")
        label = "warning" if self.allow_nonfinite else "error"
        for m in self.nonfinite_models:
            for t in m.nonfinite:
                out.append(f"  {label}: {m.role} {m.url}: tensor {t.name}: {t.nonfinite} NaN/Inf in "
                           f"{t.values} sampled values (first in row {t.first_bad_row})")
        for m in self.flagged_experts:
            out.append(f"  error: {m.role} {m.url}: {m.verdict()}; tensors with ratio > "
                       f"{RATIO_THRESHOLD}:")
            out.extend(f"    {t.name}: {t.ratio:.3f}" for t in m.flagged)
        if self.allow_nonfinite and self.nonfinite_models:
            out.append("  (allow_nonfinite: true: a run merges them; NaN/Inf propagate)")
        return out

    def error(self) -> DistmergeError | None:
        """The error the CLI exits with after printing :meth:`lines`, or None: NaN/Inf found
        (unless allowed) → :class:`NonFiniteError`; else a flagged expert →
        :class:`IncompatibleModelsError`."""
        if self.nonfinite_models and not self.allow_nonfinite:
            parts = [f"{m.url}: " + ", ".join(f"tensor {t.name} (row {t.first_bad_row})"
                                              for t in m.nonfinite[:MAX_IN_MESSAGE])
                     + (f", ... ({len(m.nonfinite) - MAX_IN_MESSAGE} more)"
                        if len(m.nonfinite) > MAX_IN_MESSAGE else "")
                     for m in self.nonfinite_models]
            return NonFiniteError(
                "validate --deep: NaN or Inf in sampled rows of " + "; ".join(parts)
                + "; a run refuses them: fix the checkpoint (or set allow_nonfinite: true)")
        flagged = self.flagged_experts
        if flagged:
            parts = []
            for m in flagged:
                names = [t.name for t in m.flagged]
                more = f", ... ({len(names) - MAX_IN_MESSAGE} more)" if len(names) > MAX_IN_MESSAGE else ""
                what = "another base" if m.kind == "another-base" else "MergeLock-style protection"
                parts.append(f"{m.url} ({what}): {', '.join(names[:MAX_IN_MESSAGE])}{more}")
            return IncompatibleModelsError(
                f"validate --deep: {len(flagged)} expert(s) are not fine-tunes of the base (task "
                f"vector as large as the base weights, ratio > {RATIO_THRESHOLD}): "
                + "; ".join(parts) + "; merging them would produce a broken model")
        return None


def _tensor_names(base: ModelHeaders) -> list[str]:
    return sorted(n for n, (_, info) in base.tensors.items()
                  if info.dtype in FLOAT_DTYPES and info.numel > 0)


def deep_validate(base: ModelHeaders, experts: list[ModelHeaders], *,
                  sample_rows: int = DEFAULT_SAMPLE_ROWS, max_bytes: int = DEFAULT_MAX_BYTES,
                  allow_nonfinite: bool = False, storage: StorageConfig | None = None,
                  threads: int = 32) -> DeepReport:
    """Sample every float tensor of ``base`` and ``experts`` (already checked compatible: same
    names, shapes, dtypes) and measure them; see the module docstring. Reads at most
    ``max_bytes`` per tensor and model, from ``threads`` threads.

    Raises:
        SourceNotFoundError, AccessDeniedError, UnsafeCheckpointError: a shard vanished, is
            refused or is shorter than its header says. NaN/Inf and suspicious experts are
            reported, not raised.
    """
    if sample_rows < 1 or max_bytes < 1:
        raise ValueError("sample_rows and max_bytes must be positive")
    models = [base, *experts]
    names = _tensor_names(base)
    reader = RangeReader(storage)
    lock = threading.Lock()
    counts = {"bytes": 0, "reads": 0}

    def read(model: ModelHeaders, name: str, ranges: list[tuple[int, int, int]]) -> torch.Tensor:
        url, info = model.tensors[name]
        total = sum(b - a for _, a, b in ranges)
        buf = torch.empty(total, dtype=torch.uint8)
        at = 0
        for _, a, b in ranges:
            reader.read_range(url, info.start + a, info.start + b, buf[at:at + b - a])
            at += b - a
        with lock:
            counts["bytes"] += total
            counts["reads"] += len(ranges)
        return buf.view(TORCH_DTYPES[info.dtype]).to(torch.float32)

    def first_bad_row(x: torch.Tensor, ranges: list[tuple[int, int, int]], info: TensorInfo) -> int | None:
        bad = (~torch.isfinite(x)).nonzero()
        if not len(bad):
            return None
        pos = int(bad[0, 0]) * (info.nbytes // info.numel)       # byte offset in the sample
        at = 0
        for r, a, b in ranges:
            if pos < at + b - a:
                return r + (pos - at) // info.row_bytes if info.row_bytes else r
            at += b - a
        return None

    def check(name: str, x: torch.Tensor, x0: torch.Tensor | None,
              ranges: list[tuple[int, int, int]], info: TensorInfo) -> TensorCheck:
        nonfinite = int((~torch.isfinite(x)).sum())
        ratio = None
        if x0 is not None and not nonfinite and bool(torch.isfinite(x0).all()):
            b = x0.double()
            d = float((x.double() - b).norm())
            n0 = float(b.norm())
            ratio = d / n0 if n0 > 0 else (0.0 if d == 0 else None)
        return TensorCheck(name=name, attention=is_attention(name), matrix=len(info.shape) >= 2,
                           values=x.numel(), nonfinite=nonfinite,
                           first_bad_row=first_bad_row(x, ranges, info) if nonfinite else None,
                           ratio=ratio)

    results: dict[tuple[int, str], TensorCheck] = {}
    inner = ThreadPoolExecutor(max_workers=max(1, threads))

    def one_tensor(name: str) -> None:
        info = base.tensors[name][1]
        ranges = sample_ranges(info, sample_rows, max_bytes)
        x0 = read(base, name, ranges)
        results[(0, name)] = check(name, x0, None, ranges, info)

        def expert(i: int) -> None:
            results[(i, name)] = check(name, read(models[i], name, ranges), x0, ranges, info)
        list(inner.map(expert, range(1, len(models))))

    try:
        with ThreadPoolExecutor(max_workers=4) as outer:
            list(outer.map(one_tensor, names))
    finally:
        inner.shutdown()
        reader.close()
    checks = [ModelCheck(url=m.url, role="base" if i == 0 else f"expert {i}",
                         tensors=tuple(results[(i, n)] for n in names))
              for i, m in enumerate(models)]
    return DeepReport(base=checks[0], experts=tuple(checks[1:]), sample_rows=sample_rows,
                      max_bytes=max_bytes, bytes_read=counts["bytes"], reads=counts["reads"],
                      allow_nonfinite=allow_nonfinite)
