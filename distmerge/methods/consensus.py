"""Consensus merging with TALL masks ("Localizing Task Information for Improved Model Merging and
Compression", Wang et al., ICML 2024), as ../shared/METHODS.md's table states it:

    τ_MTL  = Σ_t τ_t                                   (summed in expert order)
    mask_t = |τ_t| > λ · |τ_MTL − τ_t|                 (strict; one λ = ``tall_lambda`` for all)
    keep   = #{t : mask_t} ≥ k                         (k = ``min_agree``)
    θ      = θ₀ + α · (keep ⊙ τ_MTL)                   (α = ``scale``)

Expert weights scale the task vectors before anything else: with weights, τ_t above is w_t τ_t
(so τ_MTL is the weighted task-arithmetic sum, and an expert with weight 0 counts as one whose
task vector is 0: its mask is never true). With unit weights this is the formula above exactly.
``min_agree`` above the number of experts would keep nothing, and is refused.

Locality E: every entry is decided by its own values.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from distmerge.methods.base import Block, Method, task_vectors, weighted_sum


@dataclass(frozen=True, kw_only=True)
class Consensus(Method):
    name = "consensus"
    tall_lambda: float = 0.6
    min_agree: int = 2
    scale: float = 1.0

    def check(self) -> None:
        if not (math.isfinite(self.tall_lambda) and self.tall_lambda >= 0.0):
            raise ValueError("tall_lambda: must be a finite number ≥ 0")
        if self.min_agree < 1:
            raise ValueError("min_agree: must be an integer ≥ 1")
        if not math.isfinite(self.scale):
            raise ValueError("scale: must be a finite number")

    def check_weights(self, weights: tuple[float, ...]) -> None:
        if self.min_agree > len(weights):
            raise ValueError(f"consensus min_agree {self.min_agree} is more than the "
                             f"{len(weights)} experts: no entry could be kept; lower min_agree")

    def merge(self, block: Block, ctx: dict[str, Any]) -> torch.Tensor:
        tau = task_vectors(block)                                   # [T, rows, cols]
        for t, w in enumerate(block.weights):
            if w != 1.0:
                tau[t] *= w                                         # w_t τ_t
        ones = (1.0,) * len(block.weights)
        tau_mtl = weighted_sum(tau, ones)                           # [rows, cols], Σ_t w_t τ_t
        agree = torch.zeros(tau_mtl.shape, dtype=torch.int32, device=tau.device)
        for t in range(tau.shape[0]):
            agree += tau[t].abs() > (tau_mtl - tau[t]).abs_().mul_(self.tall_lambda)
        merged = tau_mtl.mul_(agree >= self.min_agree)              # keep ⊙ τ_MTL
        return block.base + merged * self.scale
