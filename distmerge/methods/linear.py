"""Linear averaging of weights ("model soups", Wortsman et al., 2022).

θ = Σ_t w_t θ_t / Σ_t w_t, or Σ_t w_t θ_t with ``normalize: false``. The base is not used.
Locality E: no statistics.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from distmerge.methods.base import Block, Method, divide_, weighted_sum


@dataclass(frozen=True, kw_only=True)
class Linear(Method):
    name = "linear"
    normalize: bool = True

    def check_weights(self, weights: tuple[float, ...]) -> None:
        if self.normalize and sum(weights) == 0:
            raise ValueError("linear with normalize: true needs expert weights that do not sum to 0")

    def merge(self, block: Block, ctx: dict[str, Any]) -> torch.Tensor:
        acc = weighted_sum(block.experts, block.weights)  # [rows, cols]
        if self.normalize:
            divide_(acc, sum(block.weights))
        return acc
