"""Model Breadcrumbs ("Model Breadcrumbs: Scaling Multi-Task Model Merging with Sparse Masks",
Davari & Belilovsky, ECCV 2024), exactly as ../shared/METHODS.md "Breadcrumbs exactly".

For each expert, over a set of n entries (each row with ``scope: row``, as the authors' code;
the whole tensor with ``scope: tensor``, as mergekit), sort |τ_t| descending, stably by flat
index (of two equal magnitudes the lower index ranks first), and number the entries 0..n − 1 in
that order. (METHODS.md's "ties at a cut keep the lower index" read this way: at the outlier
cut the lower index of two ties is the one dropped.) With the cuts

    a = int(γ · n)              (γ = ``gamma``: the top fraction dropped as outliers)
    b = min(n, int((γ + β) · n))    (β = ``density``: the fraction kept)

computed in fp64 like TIES's int(density · n), entries ranked below a or at or beyond b are
zeroed: τ̃_t keeps ranks a..b − 1. Then θ = θ₀ + λ Σ_t w_t τ̃_t. γ = 0 and β = 1 keep every
entry (task arithmetic).

Both scopes decide with one int64 key per entry, unique within its row, that orders like the
stable descending sort: key = (fp32 bits of |τ|) · 2³² + (2³² − 1 − column) (non-negative fp32
values order like their bit patterns). An entry ranks above cut c (rank < c) when its key is
above a threshold thr_c of its row; τ̃_t keeps the entries with thr_b < key ≤ thr_a.

- ``scope: row`` is local to a block (rows are never split): thr_c is the key of rank c in the
  row (a k-th value of the keys, no sort).
- ``scope: tensor`` needs each cut's exact value across slices: two rounds of 65 536-bin
  histograms of |τ| bit patterns (:mod:`distmerge.reduce`) give, per expert and cut c, the value
  v_c of rank c and q_c = c − #{|τ| > v_c}, how many entries equal to v_c rank above the cut:
  the first q_c of them in flat order. When q_c > 0, a third round counts the entries equal to
  v_c in each row (int64, [T, 2, rows of the tensor], filled at the block's rows) and reduce
  keeps only the row R_c of the first tie that ranks below the cut (the (q_c + 1)-th in flat
  order) and how many of R_c's ties rank above the cut; every tie in a row before R_c does,
  none after. The context is a few integers per tensor,
  expert and cut, whatever the tensor's size; merge turns them into per-row thresholds
  (|τ| ≥ v_c before R_c, |τ| > v_c after, the first ties of R_c by column in R_c).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from distmerge.methods.base import Block, Method, Partial, task_vectors, weighted_sum
from distmerge.reduce import abs_bits, high_histograms, histogram16, select_bucket

ROUND_HIGH, ROUND_LOW, ROUND_TIES = 0, 1, 2
CUTS = 2          # the outlier cut a and the density cut b
# A cut's fp32 bit pattern when it is outside 1..n − 1 (rank 0: no entry ranks above it; rank
# n: every entry does). As thresholds on the int64 keys of merge: none or every key is above.
NONE_ABOVE, ALL_ABOVE = (1 << 63) - 1, -1


@dataclass(frozen=True, kw_only=True)
class Breadcrumbs(Method):
    name = "breadcrumbs"
    density: float = 0.9
    gamma: float = 0.01
    scope: Literal["row", "tensor"] = "row"
    scale: float = 1.0

    def check(self) -> None:
        if not 0.0 <= self.density <= 1.0:
            raise ValueError("density: must be between 0 and 1")
        if not 0.0 <= self.gamma <= 1.0:
            raise ValueError("gamma: must be between 0 and 1")
        if self.scope not in ("row", "tensor"):
            raise ValueError("scope: must be 'row' or 'tensor'")
        if not math.isfinite(self.scale):
            raise ValueError("scale: must be a finite number")

    @property
    def rounds(self) -> int:
        return 3 if self.scope == "tensor" else 0

    def cuts(self, n: int) -> tuple[int, int]:
        """(a, b) among n entries: descending ranks < a and ≥ b are zeroed."""
        return int(self.gamma * n), min(n, int((self.gamma + self.density) * n))

    # -- statistics (scope: tensor) -------------------------------------------------------
    def stats(self, round: int, block: Block, ctx: dict[str, Any]) -> Partial:
        g = self.group(block.name)
        bits = abs_bits(task_vectors(block))                        # [T, rows, cols]
        if round == ROUND_HIGH:
            return {f"{g}/high": high_histograms(bits)}
        c = ctx[g]
        if round == ROUND_LOW:
            hists = np.zeros((len(bits), CUTS, 1 << 16), dtype=np.int64)   # [T, 2, 65536]
            for t, b in enumerate(bits):
                high = b >> 16
                for cut, bucket in enumerate(c["bucket"][t]):
                    if bucket < 0:
                        continue                                    # no value to find
                    if cut and bucket == c["bucket"][t][0]:
                        hists[t, cut] = hists[t, 0]                 # same bucket, same counts
                    else:
                        hists[t, cut] = histogram16(b[high == bucket] & 0xFFFF)
            return {f"{g}/low": hists}
        if round == ROUND_TIES:
            if not any(q > 0 for qs in c["quota"] for q in qs):
                return {}                                           # no cut splits its ties
            rows, cols = block.base.shape
            counts = np.zeros((len(bits), CUTS, c["n"] // cols), dtype=np.int64)  # [T, 2, rows of tensor]
            for t in range(len(bits)):
                for cut in range(CUTS):
                    if c["quota"][t][cut] > 0:
                        eq = (bits[t] == c["bits"][t][cut]).sum(-1)            # [rows]
                        counts[t, cut, block.row_start:block.row_start + rows] = eq.cpu().numpy()
            return {f"{g}/ties": counts}
        raise ValueError(f"breadcrumbs has no statistics round {round}")

    def reduce(self, round: int, totals: Partial, ctx: dict[str, Any]) -> dict[str, Any]:
        ctx = dict(ctx)
        for key, arr in totals.items():
            g, kind = key.rsplit("/", 1)
            if round == ROUND_HIGH and kind == "high":
                ctx[g] = self._select_buckets(arr)
            elif round == ROUND_LOW and kind == "low":
                ctx[g] = self._select_values(ctx[g], arr)
            elif round == ROUND_TIES and kind == "ties":
                ctx[g] = self._locate_tie_rows(ctx[g], arr)
        return ctx

    def _select_buckets(self, high: np.ndarray) -> dict[str, Any]:
        """Round 0: for each expert and cut c, the high-16-bit bucket of the value of rank c
        (−1 when the cut is outside 1..n − 1 and needs no value)."""
        n = int(high[0].sum())
        buckets, ranks, above = [], [], []
        for hist in high:                                           # one expert at a time
            bt, rt, at = [], [], []
            for c in self.cuts(n):
                if 0 < c < n:
                    b, r = select_bucket(hist, n - c)               # rank c = (n − c)-th smallest
                    bt.append(b)
                    rt.append(r)
                    at.append(int(hist[b + 1:].sum()))              # entries in higher buckets
                else:
                    bt.append(-1)
                    rt.append(0)
                    at.append(0)
            buckets.append(bt)
            ranks.append(rt)
            above.append(at)
        return {"n": n, "bucket": buckets, "rank": ranks, "above": above}

    def _select_values(self, c: dict[str, Any], low: np.ndarray) -> dict[str, Any]:
        """Round 1: each cut's value v (as fp32 bits) and quota q (entries equal to v ranking
        above the cut)."""
        values, quotas = [], []
        for t, hists in enumerate(low):
            vt, qt = [], []
            for cut, (rank_c, hist) in enumerate(zip(self.cuts(c["n"]), hists)):
                bucket = c["bucket"][t][cut]
                if bucket < 0:
                    # rank 0: nothing ranks above the cut; rank n: everything does
                    vt.append(NONE_ABOVE if rank_c <= 0 else ALL_ABOVE)
                    qt.append(0)
                    continue
                lo, _ = select_bucket(hist, c["rank"][t][cut])
                vt.append((bucket << 16) | lo)
                qt.append(rank_c - c["above"][t][cut] - int(hist[lo + 1:].sum()))
            values.append(vt)
            quotas.append(qt)
        T = len(low)
        return {"n": c["n"], "bits": values, "quota": quotas,
                "row": [[-1] * CUTS for _ in range(T)], "in_row": [[0] * CUTS for _ in range(T)]}

    @staticmethod
    def _locate_tie_rows(c: dict[str, Any], counts: np.ndarray) -> dict[str, Any]:
        """Round 2: the row R holding each cut inside its ties, and how many of R's ties rank
        above the cut (every tie in rows before R does, none after)."""
        rows = [list(r) for r in c["row"]]
        in_row = [list(r) for r in c["in_row"]]
        for t, per_cut in enumerate(counts):
            for cut, per_row in enumerate(per_cut):
                q = c["quota"][t][cut]
                if q > 0:
                    cum = np.cumsum(per_row)                        # ties in rows ≤ r
                    r = int(np.searchsorted(cum, q, side="right"))  # cum[r − 1] ≤ q < cum[r]
                    rows[t][cut] = r
                    in_row[t][cut] = q - (int(cum[r - 1]) if r > 0 else 0)
        return {**c, "row": rows, "in_row": in_row}

    # -- merge: keys and per-row thresholds (module docstring) ------------------------------
    @staticmethod
    def _keys(mag: torch.Tensor) -> torch.Tensor:
        """Keys unique within a row, ordered like the stable descending sort of |τ|.
        mag: [T, rows, cols] fp32 → int64"""
        col = torch.arange(mag.shape[-1], device=mag.device)
        return (mag.view(torch.int32).long() << 32) | (0xFFFFFFFF - col)

    def _row_thresholds(self, key: torch.Tensor) -> list[torch.Tensor]:
        """scope row: the key of rank c of each row, for c = a, b.  → [T, rows, 1] each"""
        cols = key.shape[-1]
        out = []
        for c in self.cuts(cols):
            if 0 < c < cols:
                out.append(key.kthvalue(cols - c, dim=-1, keepdim=True).values)   # rank c
            else:
                out.append(torch.full((*key.shape[:-1], 1), NONE_ABOVE if c <= 0 else ALL_ABOVE,
                                      dtype=key.dtype, device=key.device))
        return out

    def _tensor_thresholds(self, key: torch.Tensor, c: dict[str, Any], row_start: int) -> list[torch.Tensor]:
        """scope tensor: per row, ties of v_c rank above the cut in rows before R_c, below it in
        rows after R_c, and in row R_c the first ``in_row`` of them do.  → [T, rows, 1] each"""
        T, rows, _ = key.shape
        g = torch.arange(row_start, row_start + rows, device=key.device)     # global rows
        out = []
        for cut in range(CUTS):
            thr = torch.empty((T, rows, 1), dtype=key.dtype, device=key.device)
            for t in range(T):
                bits, r = c["bits"][t][cut], c["row"][t][cut]
                if bits in (ALL_ABOVE, NONE_ABOVE):                 # the cut is outside 1..n − 1
                    thr[t] = bits                                   # −1, or the largest int64
                    continue
                thr[t, :, 0] = torch.where(g < r, (bits << 32) - 1, (bits << 32) | 0xFFFFFFFF)
                if row_start <= r < row_start + rows:
                    ties = ((key[t, r - row_start] >> 32) == bits).nonzero()[:, 0]   # columns
                    thr[t, r - row_start] = key[t, r - row_start, ties[c["in_row"][t][cut]]]
            out.append(thr)
        return out

    def merge(self, block: Block, ctx: dict[str, Any]) -> torch.Tensor:
        tau = task_vectors(block)                                   # [T, rows, cols]
        if tau.numel():
            key = self._keys(tau.abs())                             # [T, rows, cols]
            if self.scope == "row":
                thr_a, thr_b = self._row_thresholds(key)
            else:
                thr_a, thr_b = self._tensor_thresholds(key, ctx[self.group(block.name)], block.row_start)
            tau.mul_((key <= thr_a) & (key > thr_b))
        merged = weighted_sum(tau, block.weights)                   # [rows, cols]
        return block.base + merged * self.scale
