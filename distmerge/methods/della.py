"""DELLA-Merging ("DELLA-Merging: Reducing Interference in Model Merging through Magnitude-Based
Sampling", Deep et al., 2024): MagPrune, then TIES elect + disjoint mean.

Per row (one index along dim 0; a 1-D tensor is one row) of n entries, for each expert t
(its 0-indexed position in the pipeline's list of experts):

    rank   rank_i of |τ_t,i| in ascending order, 1 = smallest; equal magnitudes are ranked by
           column, lower index first (a stable sort)
    keep   p_i = (density − ε) + 2ε · (rank_i − 1) / (n − 1)   (n = 1: p = density), evaluated
           in fp64 in that order — (d − ε) + ((2ε · (rank_i − 1)) / (n − 1)) — and rounded to
           fp32; the entry is kept when u < p_i, u = :func:`distmerge.methods.rng.uniform` keyed
           by (``seed``, t, tensor name, global flat index) (METHODS.md "Randomness")
    scale  survivors τ_t,i / p_i (fp32 division); dropped entries become ±0

then TIES elect + disjoint mean on the rescaled vectors, no trim (+1 elected where the weighted
sum is exactly 0, as in :func:`distmerge.methods.base.disjoint_mean`), θ = θ₀ + λ τ_m.

With ε = 0 every p_i is fp32(density) and the result is bit for bit ``dare_ties`` with
``rescale: inverse`` and the same seed. mergekit's ``della`` differs: it rescales the survivors
to the tensor's L1 norm instead of by 1/p_i (the paper's rule, used here).

Locality R: every row is whole in a block, so no statistics.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from distmerge.methods.base import Block, Method, disjoint_mean, divide_, task_vectors
from distmerge.methods.dare import MIN_PROBABILITY, check_seed, fp32, uniforms
from distmerge.reduce import abs_bits


def rank_order(tau: torch.Tensor) -> torch.Tensor:
    """order[..., k] = the column of the (k+1)-th smallest |τ| of its row, equal magnitudes by
    column, lower first.  [..., n] → int64 [..., n]

    Sorts unique keys (the bits of |τ|, which order like the values, then the column), so the
    order is fully determined and every sort gives it; numpy's sort is several times faster
    than torch's on the CPU."""
    n = tau.shape[-1]
    k = max(1, (n - 1).bit_length())                                      # bits for a column
    key = abs_bits(tau).to(torch.int64).bitwise_left_shift_(k)
    key.bitwise_or_(torch.arange(n, dtype=torch.int64, device=tau.device))
    if key.device.type == "cpu":
        key = torch.from_numpy(np.sort(key.numpy(), axis=-1))
    else:
        key = torch.sort(key, dim=-1).values
    return key.bitwise_and_((1 << k) - 1)


@dataclass(frozen=True, kw_only=True)
class Della(Method):
    name = "della"
    density: float = 0.7
    epsilon: float = 0.07
    seed: int = 0
    scale: float = 1.0

    def check(self) -> None:
        if not (math.isfinite(self.density) and 0.0 < self.density <= 1.0):
            raise ValueError("density: must be in (0, 1]")
        if not (math.isfinite(self.epsilon) and self.epsilon >= 0.0):
            raise ValueError("epsilon: must be a number ≥ 0")
        if fp32(self.density - self.epsilon) < MIN_PROBABILITY:
            raise ValueError("epsilon: density − epsilon, the smallest keep probability, must be "
                             "at least 2**-24 (the random generator's resolution)")
        if self.density + self.epsilon > 1.0:
            raise ValueError("epsilon: density + epsilon, the largest keep probability, must be "
                             "at most 1")
        check_seed(self.seed)
        if not math.isfinite(self.scale):
            raise ValueError("scale: must be a finite number")

    def keep_probabilities(self, n: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """p for the ranks 1..n of a row of n entries, as fp32.  [n]"""
        if n == 1:
            return torch.full((1,), fp32(self.density), dtype=torch.float32, device=device)
        r = torch.arange(n, dtype=torch.float64, device=device)          # rank − 1
        p = divide_(r * (2.0 * self.epsilon), n - 1).add_(self.density - self.epsilon)
        return p.to(torch.float32)

    def sampled(self, block: Block) -> torch.Tensor:
        """τ̃: each expert's task vector dropped by rank and rescaled by 1/p.  [T, rows, cols]"""
        tau = task_vectors(block)                                         # [T, rows, cols]
        order = rank_order(tau)                                           # [T, rows, cols]
        by_rank = self.keep_probabilities(tau.shape[-1], tau.device).expand_as(tau)
        p = torch.empty_like(tau).scatter_(-1, order, by_rank)            # p at each column
        keep = uniforms(block, self.seed) < p
        return tau.div_(p).mul_(keep)

    def merge(self, block: Block, ctx: dict[str, Any]) -> torch.Tensor:
        merged = disjoint_mean(self.sampled(block), block.weights)        # [rows, cols]
        return block.base + merged * self.scale
