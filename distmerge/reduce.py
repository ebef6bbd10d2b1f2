"""Cross-slice statistics: exact radix select on fp32 bit patterns, and exact sums.

Non-negative fp32 values order exactly like their uint32 bit patterns, so the k-th smallest
|τ| over a whole model is found with two rounds of 65 536-bin histograms: the high 16 bits
pick a bucket, then the low 16 bits of the entries in that bucket pick the value. Counts are
integers, so summing them over slices is exact in any order.

Float statistics (norms, dot products) are made exact the same way: a method computes fp64
sums per row with :func:`row_sums` (a fixed pairwise order; a row is never split, so these do
not depend on the slicing — torch's own ``sum`` does, as it splits long rows across threads)
and turns them into an exact integer with :func:`exact_sum`; or, for L1 norms, counts fp32
significands by exponent with :func:`magnitude_bins`. Integers add up exactly in any order,
so the totals never depend on the number of workers, the slice size or the order of arrival.
:func:`exact_value` rounds a total back to a float once, on the driver.
"""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import torch

BINS = 1 << 16
# Every finite fp64 value times 2**EXACT_SCALE is an integer (subnormals included).
EXACT_SCALE = 1127


def abs_bits(x: torch.Tensor) -> torch.Tensor:
    """The int32 bit patterns of |x| (fp32), which order like the values."""
    return x.abs().view(torch.int32)


def histogram16(keys: torch.Tensor, minlength: int = BINS) -> np.ndarray:
    """Counts of ``keys`` (int32 in [0, minlength)) as int64[minlength]."""
    return torch.bincount(keys.reshape(-1), minlength=minlength).cpu().numpy()


def high_histograms(bits: torch.Tensor) -> np.ndarray:
    """For ``bits`` [T, ...] (the int32 patterns of non-negative floats): the counts of their
    high 16 bits, one histogram per leading index, as int64[T, 65536]. One bincount over
    keys offset by t·65536 instead of T bincounts (each of which zero-fills and scans its own
    65 536 bins)."""
    n = bits.shape[0]
    keys = bits.reshape(n, -1) >> 16
    keys += torch.arange(n, dtype=keys.dtype, device=keys.device).mul_(BINS).view(n, 1)
    return histogram16(keys, minlength=n * BINS).reshape(n, BINS)


def low_histograms(bits: torch.Tensor, buckets: list[int]) -> np.ndarray:
    """For ``bits`` [T, ...] as above: the counts of the low 16 bits of the entries whose
    high 16 bits equal ``buckets[t]`` (none counted for a bucket < 0), as int64[T, 65536].
    On the CPU through numpy, whose boolean gather is about twice as fast as torch's here."""
    n = bits.shape[0]
    hists = np.zeros((n, BINS), dtype=np.int64)
    if bits.device.type == "cpu":
        flat = bits.numpy().reshape(n, -1)
        inside = (flat >> 16) == np.asarray(buckets, dtype=flat.dtype).reshape(n, 1)
        for t in range(n):
            if buckets[t] >= 0:
                hists[t] = np.bincount(flat[t][inside[t]] & 0xFFFF, minlength=BINS)
        return hists
    want = torch.tensor(buckets, dtype=bits.dtype, device=bits.device).view((n,) + (1,) * (bits.dim() - 1))
    inside = (bits >> 16) == want                                   # one pass for all T
    for t in range(n):
        if buckets[t] >= 0:
            hists[t] = histogram16(bits[t][inside[t]] & 0xFFFF)
    return hists


def select_bucket(hist: np.ndarray, k: int) -> tuple[int, int]:
    """For the k-th smallest item (1-indexed) of a histogram: its bin and its rank in the bin.

    Raises:
        ValueError: k outside [1, total].
    """
    total = int(hist.sum())
    if not 1 <= k <= total:
        raise ValueError(f"rank {k} outside 1..{total}")
    cum = np.cumsum(hist, dtype=np.int64)
    b = int(np.searchsorted(cum, k, side="left"))
    before = int(cum[b - 1]) if b > 0 else 0
    return b, k - before


def bits_to_float(bits: int) -> float:
    return float(np.array([bits], dtype=np.uint32).view(np.float32)[0])


def exact_sum(values: np.ndarray | torch.Tensor) -> int:
    """Σ values, exactly, as an integer multiple of 2**-EXACT_SCALE (each value is split into
    its exponent and two 27-bit halves of its mantissa, whose per-exponent sums fp64 holds
    exactly for up to 2**26 values; :func:`exact_sums` with one row).

    Raises:
        ValueError: a value is NaN or infinite.
    """
    v = np.asarray(values.detach().cpu().numpy() if isinstance(values, torch.Tensor) else values,
                   dtype=np.float64).reshape(1, -1)
    return int(exact_sums(v)[0])


# Per exponent bin, fp64 holds the sum of this many 27-bit halves exactly.
_MAX_ROWS = 1 << 26


def exact_sums(v: np.ndarray) -> np.ndarray:
    """Σ over the last axis of ``v`` for every leading index, each exactly, as Python ints
    (multiples of 2**-EXACT_SCALE; :func:`exact_sum` is the one-row form).  [P, R] fp64 → object [P]

    Raises:
        ValueError: a value is NaN or infinite.
    """
    v = np.asarray(v, dtype=np.float64)
    P, R = v.shape
    out = np.empty(P, dtype=object)
    out[:] = [0] * P
    if R == 0 or P == 0:
        return out
    if not np.isfinite(v).all():
        raise ValueError("an exact sum of a non-finite value")
    for start in range(0, R, _MAX_ROWS):
        part = v[:, start:start + _MAX_ROWS]
        mant, exp = np.frexp(part)
        m = (mant * (1 << 53)).astype(np.int64)                  # exact 53-bit mantissas
        hi, lo = m >> 27, m & ((1 << 27) - 1)
        exps, inv = np.unique(exp, return_inverse=True)
        E = len(exps)
        key = (np.arange(P)[:, None] * E + inv.reshape(part.shape)).ravel()
        sh = np.bincount(key, weights=hi.ravel().astype(np.float64), minlength=P * E).reshape(P, E)
        sl = np.bincount(key, weights=lo.ravel().astype(np.float64), minlength=P * E).reshape(P, E)
        shifts = [int(e) - 53 + EXACT_SCALE for e in exps.tolist()]
        sh_l, sl_l = sh.tolist(), sl.tolist()
        for p in range(P):
            total = 0
            for e in range(E):
                if sh_l[p][e] or sl_l[p][e]:
                    total += ((int(sh_l[p][e]) << 27) + int(sl_l[p][e])) << shifts[e]
            out[p] += total
    return out


def exact_value(total: int) -> float:
    """The float nearest to an :func:`exact_sum` total (correctly rounded)."""
    return float(Fraction(total, 1 << EXACT_SCALE))


def row_sums(x: torch.Tensor) -> torch.Tensor:
    """Σ over the last dim of ``x`` (fp64) in a fixed pairwise order: halves are added
    elementwise (an odd last column joins column 0 first), so each row's sum depends only on
    that row, never on how many rows the block has, the thread count or the device. (torch's
    own fp64 ``sum(-1)`` is not: for rows of ≥ 32 768 values on several CPU threads it changes
    with the block's row count.) Pass the result to :func:`distmerge.reduce.exact_sum`.
    [..., n] → [...]"""
    while x.shape[-1] > 1:
        h = x.shape[-1] // 2
        y = x[..., :h] + x[..., h:2 * h]
        if x.shape[-1] % 2:
            y[..., 0] += x[..., 2 * h]
        x = y
    return x[..., 0] if x.shape[-1] else x.new_zeros(x.shape[:-1])


def magnitude_bins(x: torch.Tensor) -> torch.Tensor:
    """Σ|x| for each leading index, exactly: int64 sums of the fp32 significands of |x| by
    biased exponent (|x| = sig · 2**(max(e, 1) − 150)).  [T, ...] → int64 [T, 256]

    Integer sums add up exactly in any order, so the totals do not depend on the slicing, the
    thread count or the device. (Per-row fp64 sums do: torch splits a reduction with a single
    output — one row of one expert — of ≥ 32 768 entries across threads.) Exact while a tensor
    has fewer than 2**39 entries."""
    bits = abs_bits(x).reshape(x.shape[0], -1)                          # [T, n] int32
    e = bits >> 23                                                      # 0: zero or subnormal
    sig = (bits & 0x7FFFFF) | ((e > 0).to(torch.int32) << 23)           # the implicit bit
    bins = torch.zeros(x.shape[0], 256, dtype=torch.int64, device=x.device)
    return bins.scatter_add_(1, e.long(), sig.long())


def bins_total(bins: np.ndarray) -> int:
    """The sum that :func:`magnitude_bins` counted, in units of 2**-149.  [256] → int"""
    return sum(int(s) << (max(e, 1) - 1) for e, s in enumerate(bins.tolist()) if s)


def is_exact(arr: np.ndarray) -> bool:
    """Integer arrays (counts) and object arrays of Python ints (exact sums) add up exactly in
    any order; anything else does not."""
    return np.issubdtype(arr.dtype, np.integer) or arr.dtype == object


def kth_smallest_abs(values: torch.Tensor, k: int) -> float:
    """Reference for tests: the k-th smallest |value| (1-indexed) of one tensor."""
    return float(values.abs().reshape(-1).kthvalue(k).values)


class StatsAccumulator:
    """Sums partial statistics over slices: integer arrays as they arrive (exact in any
    order), float arrays in fp64 by slice index at the end (a fixed order). A slice reported
    twice (a retry) replaces its float partial rather than adding to it."""

    def __init__(self) -> None:
        self._ints: dict[str, np.ndarray] = {}
        self._floats: dict[int, dict[str, np.ndarray]] = {}

    def add(self, slice_index: int, partial: dict[str, np.ndarray]) -> None:
        floats = {}
        for key, arr in partial.items():
            if is_exact(arr):
                if key in self._ints:
                    self._ints[key] = self._ints[key] + arr
                else:
                    self._ints[key] = arr.copy() if arr.dtype == object else arr.astype(np.int64)
            else:
                floats[key] = np.asarray(arr, dtype=np.float64)
        if floats:
            self._floats[slice_index] = floats

    def add_counts(self, counts: dict[str, np.ndarray]) -> None:
        """Integer statistics already summed over many slices (a worker's drain)."""
        self.add(-1, {k: v for k, v in counts.items() if is_exact(v)})

    def totals(self) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = dict(self._ints)
        for idx in sorted(self._floats):
            for key, arr in self._floats[idx].items():
                out[key] = out[key] + arr if key in out else arr.copy()
        return out
