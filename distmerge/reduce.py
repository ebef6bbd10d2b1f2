"""Cross-slice statistics: exact radix select on fp32 bit patterns, and order-fixed sums.

Non-negative fp32 values order exactly like their uint32 bit patterns, so the k-th smallest
|τ| over a whole model is found with two rounds of 65 536-bin histograms: the high 16 bits
pick a bucket, then the low 16 bits of the entries in that bucket pick the value. Counts are
integers, so summing them over slices is exact in any order; float statistics are summed in
fp64 in slice order, so the result never depends on the number of workers.
"""

from __future__ import annotations

import numpy as np
import torch

BINS = 1 << 16


def abs_bits(x: torch.Tensor) -> torch.Tensor:
    """The int32 bit patterns of |x| (fp32), which order like the values."""
    return x.abs().view(torch.int32)


def histogram16(keys: torch.Tensor) -> np.ndarray:
    """Counts of ``keys`` (int32 in [0, 65536)) as int64[65536]."""
    return torch.bincount(keys.reshape(-1), minlength=BINS).cpu().numpy()


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
            if np.issubdtype(arr.dtype, np.integer):
                if key in self._ints:
                    self._ints[key] += arr
                else:
                    self._ints[key] = arr.astype(np.int64, copy=True)
            else:
                floats[key] = np.asarray(arr, dtype=np.float64)
        if floats:
            self._floats[slice_index] = floats

    def add_counts(self, counts: dict[str, np.ndarray]) -> None:
        """Integer statistics already summed over many slices (a worker's drain)."""
        self.add(-1, {k: v for k, v in counts.items() if np.issubdtype(v.dtype, np.integer)})

    def totals(self) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = dict(self._ints)
        for idx in sorted(self._floats):
            for key, arr in self._floats[idx].items():
                out[key] = out[key] + arr if key in out else arr.copy()
        return out
