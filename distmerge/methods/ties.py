"""TIES-Merging ("Resolving Interference When Merging Models", Yadav et al., NeurIPS 2023).

trim → elect → disjoint mean, then θ₀ + λ τ_m, exactly as ../shared/METHODS.md "TIES exactly":

- ``scope: model`` (the authors' code): each expert's trim threshold is the (n − m)-th smallest
  |τ_t| over the whole model, m = int(density · n) (every entry kept when m = n); where the
  weighted sum of trimmed vectors is exactly 0, the elected sign is the sign of the model-wide
  sum of elected signs (+1 when that is 0).
- ``scope: tensor`` (mergekit): the threshold is the max(1, m)-th largest |τ_t| of the tensor;
  a zero elected sum elects +1.

Entries at the threshold are all kept. Thresholds are exact, found by a two-round radix
select over slices (:mod:`distmerge.reduce`). Tensors whose parameters an override changes
form their own model-wide group (their own thresholds and sign sum).

The model-wide sign sum (``scope: model``) needs no pass of its own; it is speculated and
verified. The second round also counts a guess of it (Σ sign(Σ_t w_t τ̂_t) with every entry of
an expert's threshold bucket kept: exact integers, usually of the same sign as the true sum)
and the merge runs with the guess's majority. Every merged block also returns, as exact
integers (:meth:`Ties.merge_with_stats`), the true statistic (``signs``) and how many of its
positions the majority decides (``sensitive+``/``sensitive-``: elected sum exactly 0 with at
least one trimmed entry nonzero, under the majority +1/−1 the block was merged with). After
the merge pass the engine sums ``signs`` over all slices (:meth:`Ties.settle`) and merges
again only the slices with sensitive positions merged under the wrong majority: the output
bytes are those of a separate sign round, at 2 statistics passes (plus those slices) instead
of 3. A ties used by another method that calls its ``merge`` inside a statistics round
(LiNeS, frank_wolfe's initial merge) cannot be merged again, so it keeps the third round
(:meth:`Ties.unspeculative`, :class:`ExactSignTies`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import numpy as np
import torch

from distmerge.methods.base import Block, Method, Partial, disjoint_mean, task_vectors_, weighted_sum
from distmerge.reduce import bits_to_float, high_histograms, low_histograms, select_bucket

ROUND_HIGH, ROUND_LOW, ROUND_SIGN = 0, 1, 2


def _sign_sum(total: torch.Tensor) -> np.ndarray:
    """Σ sign(total), exactly: in fp32 every partial sum of at most 2²⁴ terms ±1, 0 is an
    integer it represents (in any order); beyond, in int64 (slower)."""
    signs = torch.sign(total)
    s = signs.sum() if signs.numel() <= 2**24 else signs.sum(dtype=torch.int64)
    return np.array([int(s)], dtype=np.int64)


def _majority(sign_sum: int) -> float:
    return -1.0 if sign_sum < 0 else 1.0


def sensitive_key(group: str, majority: float) -> str:
    """The merge statistic counting a block's positions decided by ``majority``."""
    return f"{group}/sensitive{'+' if majority > 0 else '-'}"


@dataclass(frozen=True, kw_only=True)
class Ties(Method):
    name = "ties"
    density: float = 0.2
    scope: Literal["model", "tensor"] = "model"
    scale: float = 1.0
    # scope model: the sign sum speculated in ROUND_LOW and settled after the merge pass
    speculates: ClassVar[bool] = True

    def check(self) -> None:
        if not 0.0 <= self.density <= 1.0:
            raise ValueError("density: must be between 0 and 1")
        if self.scope not in ("model", "tensor"):
            raise ValueError("scope: must be 'model' or 'tensor'")
        if not math.isfinite(self.scale):
            raise ValueError("scale: must be a finite number")

    @property
    def _speculative(self) -> bool:
        return self.scope == "model" and self.speculates

    @property
    def rounds(self) -> int:
        return 3 if self.scope == "model" and not self.speculates else 2

    def unspeculative(self) -> "Ties":
        return ExactSignTies(**{f.name: getattr(self, f.name) for f in dataclasses.fields(self)})

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
            return {f"{g}/high": high_histograms(task_vectors_(block).abs_().view(torch.int32))}
        c = ctx[g]
        if round == ROUND_LOW:                                      # bucket −1: keep all, count none
            if not self._speculative:
                return {f"{g}/low": low_histograms(task_vectors_(block).abs_().view(torch.int32), c["bucket"])}
            tau = task_vectors_(block)
            mag = tau.abs()
            out = {f"{g}/low": low_histograms(mag.view(torch.int32), c["bucket"])}
            # the guess: every entry of an expert's threshold bucket kept (its threshold is at
            # least the bucket's smallest value, bucket << 16), reusing |τ| for the trim
            lower = [0.0 if b < 0 else bits_to_float(b << 16) for b in c["bucket"]]
            thr = torch.tensor(lower, dtype=tau.dtype, device=tau.device).view(-1, *([1] * (tau.dim() - 1)))
            total = weighted_sum(tau.mul_(mag.ge_(thr)), block.weights)
            out[f"{g}/guess"] = _sign_sum(total)
            return out
        if round == ROUND_SIGN:
            _, total = self._trim_elect(block, c)
            return {f"{g}/signs": _sign_sum(total)}
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
                guess = totals.get(f"{g}/guess")
                if guess is not None:                               # settled after the merge pass
                    c["majority"] = _majority(int(guess[0]))
                    c["guess"] = True
                ctx[g] = c
            elif round == ROUND_SIGN and kind == "signs":
                ctx[g] = {**ctx[g], "majority": _majority(int(arr[0]))}
        return ctx

    def settle(self, totals: Partial, ctx: dict[str, Any]) -> tuple[dict[str, Any], set[str]]:
        """The true majority of each speculated group from the merge pass's ``signs`` summed
        over every slice (as ROUND_SIGN's reduce: −1 when the sum is negative, else +1), and
        the statistics keys (``sensitive±`` of the other majority) that mark a slice merged
        with the wrong one."""
        ctx = dict(ctx)
        stale: set[str] = set()
        for key, arr in totals.items():
            g, kind = key.rsplit("/", 1)
            if (kind != "signs" or not self._speculative
                    or not isinstance(ctx.get(g), dict) or not ctx[g].get("guess")):
                continue
            true = _majority(int(arr[0]))
            ctx[g] = {**ctx[g], "majority": true, "guess": False}
            stale.add(sensitive_key(g, -true))
        return ctx, stale

    # -- merge ----------------------------------------------------------------------------
    def _trim_elect(self, block: Block, c: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """τ̂ (trimmed task vectors) and the weighted sum that elects the sign."""
        tau = task_vectors_(block)                                  # [T, rows, cols]
        thr = torch.tensor(c["threshold"], dtype=tau.dtype, device=tau.device).view(-1, 1, 1)
        # τ · [|τ| ≥ thr]: a trimmed entry becomes ±0, which counts as 0 everywhere below.
        # The indicator as fp32 1/0 made in place: several times faster than a bool mask.
        trimmed = tau.mul_(tau.abs().ge_(thr))
        return trimmed, weighted_sum(trimmed, block.weights)    # [T, rows, cols], [rows, cols]

    def merge(self, block: Block, ctx: dict[str, Any]) -> torch.Tensor:
        return self.merge_with_stats(block, ctx)[0]

    def merge_with_stats(self, block: Block, ctx: dict[str, Any]) -> tuple[torch.Tensor, Partial]:
        g = self.group(block.name)
        c = ctx[g]
        trimmed, total = self._trim_elect(block, c)
        # also after settle (guess False): a slice merged again records its sign count too,
        # which a resume sums into the model-wide majority
        counted = self._speculative and c.get("guess") is not None
        # positions the majority decides: Σ_t w_t τ̂_t = 0 while some τ̂_t ≠ 0
        by_merged = counted and _decided_where_merged_nonzero(c["threshold"], block.weights)
        decided = None
        if counted and not by_merged:                               # max |τ̂_t| > 0, before
            decided = trimmed.abs().amax(0).ne_(0)                  # trimmed is overwritten
        merged = disjoint_mean(trimmed, block.weights, majority=c["majority"], total=total)
        stats: Partial = {}
        if counted:
            if by_merged:
                decided = merged.ne(0)
            n = int(torch.count_nonzero(decided.logical_and_(total == 0)))
            stats = {f"{g}/signs": _sign_sum(total),
                     sensitive_key(g, c["majority"]): np.array([n], dtype=np.int64)}
        out = block.base + merged * self.scale if self.scale != 1.0 else block.base + merged
        return out, stats


def _decided_where_merged_nonzero(thresholds: list[float], weights: tuple[float, ...]) -> bool:
    """Whether, where Σ_t w_t τ̂_t = 0, "some τ̂_t ≠ 0" is "the merged τ_m ≠ 0" (a test on one
    [rows, cols] tensor instead of all T). It is when every weight is positive and every kept
    |τ̂_t| (≥ its threshold) times any weight, over Σ w, is a normal float: then no product
    w_t τ̂_t of a kept entry is 0, a zero sum of them needs both signs, so either majority has
    an agreeing entry (den > 0), and num / den ≥ min w · min thr / Σ w is not 0. Entries all
    zero give τ_m = 0. (Not so when an expert keeps everything: its threshold is 0.)"""
    if not weights or min(weights) <= 0.0 or min(thresholds) <= 0.0:
        return False
    return min(weights) * min(thresholds) / math.fsum(weights) >= 2.0 ** -100


@dataclass(frozen=True, kw_only=True)
class ExactSignTies(Ties):
    """ties with the model-wide sign sum as a third statistics round (no speculation): for
    wrappers that call ``merge`` where its output cannot be re-merged (LiNeS's statistics)."""

    speculates: ClassVar[bool] = False
