"""Task arithmetic ("Editing Models with Task Arithmetic", Ilharco et al., ICLR 2023).

θ = θ₀ + λ Σ_t w_t τ_t with τ_t = θ_t − θ₀. Locality E: no statistics.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from distmerge.methods.base import Block, Method, task_vectors_, weighted_sum


@dataclass(frozen=True, kw_only=True)
class TaskArithmetic(Method):
    name = "task_arithmetic"
    scale: float = 1.0

    def check(self) -> None:
        if not math.isfinite(self.scale):
            raise ValueError("scale: must be a finite number")

    def merge(self, block: Block, ctx: dict[str, Any]) -> torch.Tensor:
        tau = task_vectors_(block)                      # [T, rows, cols]
        merged = weighted_sum(tau, block.weights)       # [rows, cols]
        return block.base + merged * self.scale
