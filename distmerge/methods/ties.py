"""TIES-Merging ("Resolving Interference When Merging Models", Yadav et al., NeurIPS 2023).

trim → elect → disjoint mean, then θ₀ + λ τ_m, exactly as ../shared/METHODS.md "TIES exactly":

- ``scope: model`` (the authors' code): each expert's trim threshold is the (n − m)-th smallest
  |τ_t| over the whole model, m = int(density · n) (every entry kept when m = n); where the
  weighted sum of trimmed vectors is exactly 0, the elected sign is the sign of the model-wide
  sum of elected signs (+1 when that is 0).
- ``scope: tensor`` (mergekit): the threshold is the max(1, m)-th largest |τ_t| of the tensor;
  a zero elected sum elects +1.

Entries at the threshold are all kept. Thresholds are exact, found by a two-round radix
select over slices (:mod:`distmerge.reduce`); ``scope: model`` adds a third round for the
model-wide sign sum. Tensors whose parameters an override changes form their own model-wide
group (their own thresholds and sign sum).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from distmerge.methods.base import Block, Method, Partial, disjoint_mean, task_vectors, weighted_sum
from distmerge.reduce import bits_to_float, high_histograms, low_histograms, select_bucket

ROUND_HIGH, ROUND_LOW, ROUND_SIGN = 0, 1, 2


@dataclass(frozen=True, kw_only=True)
class Ties(Method):
    name = "ties"
    density: float = 0.2
    scope: Literal["model", "tensor"] = "model"
    scale: float = 1.0

    def check(self) -> None:
        if not 0.0 <= self.density <= 1.0:
            raise ValueError("density: must be between 0 and 1")
        if self.scope not in ("model", "tensor"):
            raise ValueError("scope: must be 'model' or 'tensor'")
        if not math.isfinite(self.scale):
            raise ValueError("scale: must be a finite number")

    @property
    def rounds(self) -> int:
        return 3 if self.scope == "model" else 2

    def group(self, tensor: str) -> str:
        if self.scope == "tensor":
            return tensor
        return f"model(density={self.density!r},scale={self.scale!r})"

    # -- trim threshold: ranks, then a two-round radix select ----------------------------
    def _rank(self, n: int) -> int:
        """The 1-indexed rank (k-th smallest) of the threshold among n entries; 0 = keep all."""
        m = int(self.density * n)
        if self.scope == "model":
            return 0 if m == n else n - m
        return 0 if n == 0 else n - max(1, m) + 1

    def stats(self, round: int, block: Block, ctx: dict[str, Any]) -> Partial:
        g = self.group(block.name)
        if round == ROUND_HIGH:
            return {f"{g}/high": high_histograms(task_vectors(block).abs_().view(torch.int32))}
        c = ctx[g]
        if round == ROUND_LOW:                                      # bucket −1: keep all, count none
            return {f"{g}/low": low_histograms(task_vectors(block).abs_().view(torch.int32), c["bucket"])}
        if round == ROUND_SIGN:
            _, total = self._trim_elect(block, c)
            return {f"{g}/signs": np.array([int(torch.sign(total).sum())], dtype=np.int64)}
        raise ValueError(f"ties has no statistics round {round}")

    def reduce(self, round: int, totals: Partial, ctx: dict[str, Any]) -> dict[str, Any]:
        ctx = dict(ctx)
        for key, arr in totals.items():
            g, kind = key.rsplit("/", 1)
            if round == ROUND_HIGH and kind == "high":
                buckets, ranks = [], []
                for hist in arr:                                    # one expert at a time
                    k = self._rank(int(hist.sum()))
                    b, r = select_bucket(hist, k) if k else (-1, 0)
                    buckets.append(b)
                    ranks.append(r)
                ctx[g] = {"bucket": buckets, "rank": ranks}
            elif round == ROUND_LOW and kind == "low":
                c = dict(ctx[g])
                thr = []
                for t, hist in enumerate(arr):
                    if c["bucket"][t] < 0:
                        thr.append(0.0)                             # keep every entry
                    else:
                        low, _ = select_bucket(hist, c["rank"][t])
                        thr.append(bits_to_float((c["bucket"][t] << 16) | low))
                c["threshold"] = thr
                c["majority"] = 1.0
                ctx[g] = c
            elif round == ROUND_SIGN and kind == "signs":
                ctx[g] = {**ctx[g], "majority": -1.0 if int(arr[0]) < 0 else 1.0}
        return ctx

    # -- merge ----------------------------------------------------------------------------
    def _trim_elect(self, block: Block, c: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """τ̂ (trimmed task vectors) and the weighted sum that elects the sign."""
        tau = task_vectors(block)                                   # [T, rows, cols]
        thr = torch.tensor(c["threshold"], dtype=tau.dtype, device=tau.device).view(-1, 1, 1)
        # τ · [|τ| ≥ thr]: a trimmed entry becomes ±0, which counts as 0 everywhere below.
        # The indicator as fp32 1/0 made in place: several times faster than a bool mask.
        trimmed = tau.mul_(tau.abs().ge_(thr))
        return trimmed, weighted_sum(trimmed, block.weights)    # [T, rows, cols], [rows, cols]

    def merge(self, block: Block, ctx: dict[str, Any]) -> torch.Tensor:
        c = ctx[self.group(block.name)]
        trimmed, total = self._trim_elect(block, c)
        merged = disjoint_mean(trimmed, block.weights, majority=c["majority"], total=total)
        return block.base + merged * self.scale if self.scale != 1.0 else block.base + merged
