"""What every merge method is: parameters, statistics rounds, and a pure merge of one block.

The protocol (stats → reduce → merge), which the engine runs for every method:

1. For ``round in range(method.rounds)``: every slice worker calls ``method.stats(round, block,
   ctx)`` on each block and returns the partials (numpy arrays keyed by name); the driver sums
   them over all slices (:class:`distmerge.reduce.StatsAccumulator`: integers exactly, floats in
   fp64 in slice order) and calls ``method.reduce(round, totals, ctx)``, which returns the
   context for the next round.
2. ``method.merge(block, ctx)`` returns the merged fp32 block. The engine calls it through
   ``method.merge_with_stats(block, ctx)``, which also returns exact integer statistics of the
   block (numpy int64 arrays keyed ``"<group>/<kind>"``, empty for most methods). A method that
   speculates part of its context (ties ``scope: model``: its majority sign) gets them summed
   over every slice in ``method.settle(totals, ctx)``, which returns the final context and the
   statistics keys marking a slice merged with a wrong one; the engine merges those slices
   again with the final context.

``ctx`` is a small picklable dict built only by ``reduce``; a method that needs no statistics
(locality E) has ``rounds == 0`` and sees an empty ctx. Statistics are keyed by ``group``: one
group per tensor for per-tensor methods, one for the whole model for model-wide ones. With
overrides, tensors whose parameters differ fall in different groups.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch


@dataclass(frozen=True, kw_only=True)
class Block:
    """Rows ``[row_start, row_start + rows)`` of one tensor, for the base and every expert."""

    name: str                 # tensor name
    base: torch.Tensor        # [rows, cols] fp32 (a 1-D tensor is one row)
    experts: torch.Tensor     # [T, rows, cols] fp32
    weights: tuple[float, ...]  # [T]
    row_start: int
    # True when ``experts`` is the caller's scratch copy, which the method may overwrite (the
    # worker's per-chunk fp32 workspace); see :func:`task_vectors_`.
    scratch: bool = False

    @property
    def n_experts(self) -> int:
        return self.experts.shape[0]


Partial = dict[str, np.ndarray]


@dataclass(frozen=True, kw_only=True)
class Method:
    """Base class: subclasses are frozen keyword-only dataclasses of their parameters."""

    name: ClassVar[str]
    # how many experts the method merges (None: any number from two)
    exact_experts: ClassVar[int | None] = None

    @property
    def rounds(self) -> int:
        """How many statistics rounds run before the merge pass (0 for locality E)."""
        return 0

    def check(self) -> None:
        """Raise ValueError("param: reason") for an impossible parameter value."""

    def check_weights(self, weights: tuple[float, ...]) -> None:
        """Raise ValueError("reason") when the experts' weights make this method undefined."""

    def group(self, tensor: str) -> str:
        """The statistics group of ``tensor`` (see the module docstring)."""
        return tensor

    def stats(self, round: int, block: Block, ctx: dict[str, Any]) -> Partial:
        raise NotImplementedError

    def reduce(self, round: int, totals: Partial, ctx: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError

    # -- kept derivatives: statistics rounds that need not read the base and experts again ----
    def derivative(self, round: int, ctx: dict[str, Any]) -> str | None:
        """How statistics round ``round`` uses a *derivative* of a block's base and experts
        (:meth:`derive`: something smaller, e.g. a sketch, that a worker may keep in memory,
        counted against its resident budget, keyed by tensor and row range):

        - None (the default): the worker reads every source and calls :meth:`stats`;
        - ``"keep"``: the same, and the worker also keeps ``derive(block, ctx)`` when its
          resident budget allows;
        - ``"use"``: the statistics are :meth:`stats_derived` of the block's derivative and its
          rows of the extra sources (those after the experts, e.g. a gradient rewritten between
          passes). A worker that kept the derivative reads only the extra sources; one that did
          not (no room, or the slice ran elsewhere before) reads every source and derives it
          again. ``derive`` depends only on the block's rows, so the statistics do not depend
          on where the block runs."""
        return None

    def derive(self, block: Block, ctx: dict[str, Any]) -> Any:
        """The derivative of ``block``'s base and experts (see :meth:`derivative`): any object
        with an ``nbytes`` attribute (what it counts against the resident budget)."""
        raise NotImplementedError

    def stats_derived(self, round: int, derived: Any, extras: torch.Tensor, *, name: str,
                      row_start: int, ctx: dict[str, Any]) -> Partial:
        """A ``"use"`` round's statistics of one block from its derivative and ``extras``
        ([E, rows, cols] fp32: the block's rows of the sources after the experts)."""
        raise NotImplementedError

    def merge(self, block: Block, ctx: dict[str, Any]) -> torch.Tensor:
        raise NotImplementedError

    def merge_with_stats(self, block: Block, ctx: dict[str, Any]) -> tuple[torch.Tensor, Partial]:
        """``merge`` and the block's exact integer merge statistics (none by default)."""
        return self.merge(block, ctx), {}

    def settle(self, totals: Partial, ctx: dict[str, Any]) -> tuple[dict[str, Any], set[str]]:
        """After the merge pass, with ``merge_with_stats``'s statistics summed over all slices:
        the final context and the keys whose nonzero value in a slice's statistics means the
        slice was merged with a context that differs from it where it matters (redo it)."""
        return ctx, set()

    def unspeculative(self) -> "Method":
        """This method with nothing speculated, for a wrapper calling ``merge`` where it cannot
        be redone (inside its own statistics round)."""
        return self

    def params(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def weighted_sum(x: torch.Tensor, weights: tuple[float, ...]) -> torch.Tensor:
    """Σ_t w_t x_t, accumulated elementwise in expert order (the same bytes whatever the
    block's shape or device).  x: [T, rows, cols] → [rows, cols]"""
    acc = x[0] * weights[0]
    for t in range(1, x.shape[0]):
        acc += x[t] if weights[t] == 1.0 else x[t] * weights[t]    # x · 1 = x exactly
    return acc


def divide_(x: torch.Tensor, d: float) -> torch.Tensor:
    """x /= d in place, correctly rounded on every device. (CUDA turns a division by a Python
    number into a product with its rounded reciprocal, which can differ in the last bit; a
    division by a tensor on the same device is a true division there, as on the CPU.)"""
    return x.div_(torch.tensor(d, dtype=x.dtype, device=x.device) if x.is_cuda else d)


def task_vectors(block: Block) -> torch.Tensor:
    """τ_t = θ_t − θ₀.  [T, rows, cols]"""
    return block.experts - block.base.unsqueeze(0)


def task_vectors_(block: Block) -> torch.Tensor:
    """τ_t = θ_t − θ₀ like :func:`task_vectors` (the same values), computed in place into
    ``block.experts`` when the block is a scratch copy: no [T, rows, cols] allocation and one
    memory stream fewer (measured 2x faster for 2M floats). Call it at most once per block,
    and read nothing from ``block.experts`` after it.  [T, rows, cols]"""
    if block.scratch:
        return block.experts.sub_(block.base.unsqueeze(0))
    return task_vectors(block)


def disjoint_mean(trimmed: torch.Tensor, weights: tuple[float, ...], *, majority: float = 1.0,
                  total: torch.Tensor | None = None) -> torch.Tensor:
    """TIES elect + disjoint mean (METHODS.md "TIES exactly"): the sign of Σ_t w_t τ̂_t, or
    ``majority`` where that sum is exactly 0; then Σ_t w_t τ̂_t agree_t / Σ_t w_t agree_t (0 where
    no expert agrees). With the elected sign s = ±1, τ̂_t agrees ⇔ τ̂_t · s > 0, and the agreeing
    entries sum to s · Σ_t w_t |τ̂_t| (negation is exact, so this is bit for bit the formula).
    Overwrites ``trimmed``; ``total``: Σ_t w_t τ̂_t when the caller has it.
    [T, rows, cols] → τ_m [rows, cols]"""
    if total is None:
        total = weighted_sum(trimmed, weights)                          # [rows, cols]
    elected = torch.sign(total).masked_fill_(total == 0, majority)     # ±1
    aligned = trimmed.mul_(elected)                                     # [T, rows, cols]
    agree = aligned > 0
    aligned.clamp_min_(0)
    num = weighted_sum(aligned, weights)
    if all(w == 1.0 for w in weights):
        den = agree.sum(0, dtype=torch.int32).to(num.dtype)            # a count: exact in any order
    else:
        den = weighted_sum(agree.to(num.dtype), weights)
    return torch.where(den != 0, num.div_(den).mul_(elected), 0.0)
