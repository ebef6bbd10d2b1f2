"""SLERP: spherical linear interpolation of two models (Shoemake, "Animating rotation with
quaternion curves", SIGGRAPH 1985; as model merging, mergekit's ``slerp``).

Per tensor, on the raw weights θ_a (expert 1) and θ_b (expert 2); the base is not used:

    dot = ⟨θ_a, θ_b⟩ / (‖θ_a‖ ‖θ_b‖)
    |dot| > 0.9995:  θ = (1 − t) θ_a + t θ_b                              (nearly colinear)
    otherwise:       Ω = arccos(dot)
                     θ = sin((1 − t) Ω) / sin Ω · θ_a + sin(t Ω) / sin Ω · θ_b

Semantics chosen where the formula leaves room, following mergekit: a tensor that is all zeros
in one expert has no direction; its dot counts as 0 (mergekit's ``normalize`` leaves a
zero vector as it is), so the spherical branch runs with Ω = π/2. SLERP has no expert
weights: weights other than 1 are refused rather than ignored.

Statistics (one round, locality T): per tensor, ‖θ_a‖², ‖θ_b‖², ⟨θ_a, θ_b⟩ as exact sums of
per-row fp64 sums (:func:`distmerge.reduce.row_sums`, then
:func:`distmerge.reduce.exact_sum`). The driver computes dot from them correctly rounded to
fp64, clamped to [−1, 1], and the two coefficients in fp64, and the merge applies both rounded
once to fp32:
``fp32(c_a) · θ_a + fp32(c_b) · θ_b``. t = 0 and t = 1 give θ_a and θ_b exactly (the
coefficients are then exactly 1 and 0 in both branches).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from distmerge.methods.base import Block, Method, Partial, weighted_sum
from distmerge.methods.model_stock import pair_cos
from distmerge.reduce import exact_sum, row_sums

DOT_THRESHOLD = 0.9995      # mergekit's: above it, interpolate linearly


def coefficients(dot: float, t: float) -> tuple[float, float]:
    """(c_a, c_b) in fp64 for θ = c_a θ_a + c_b θ_b."""
    if abs(dot) > DOT_THRESHOLD:
        return 1.0 - t, t
    omega = math.acos(dot)
    sin_omega = math.sin(omega)
    return math.sin((1.0 - t) * omega) / sin_omega, math.sin(t * omega) / sin_omega


@dataclass(frozen=True, kw_only=True)
class Slerp(Method):
    name = "slerp"
    exact_experts = 2
    t: float = 0.5

    def check(self) -> None:
        if not 0.0 <= self.t <= 1.0:
            raise ValueError("t: must be between 0 and 1")

    def check_weights(self, weights: tuple[float, ...]) -> None:
        if any(w != 1.0 for w in weights):
            raise ValueError("slerp interpolates two experts by t and has no expert weights; "
                             f"set both weights to 1, got {list(weights)}")

    @property
    def rounds(self) -> int:
        return 1

    def stats(self, round: int, block: Block, ctx: dict[str, Any]) -> Partial:
        if round != 0:
            raise ValueError(f"slerp has no statistics round {round}")
        if block.n_experts != 2:
            raise ValueError(f"slerp merges exactly 2 experts, got {block.n_experts}")
        a, b = block.experts.double()                       # [rows, cols] each; products are exact
        sums = [exact_sum(row_sums(a * a)), exact_sum(row_sums(b * b)), exact_sum(row_sums(a * b))]
        return {f"{block.name}/dots": np.array(sums, dtype=object)}    # ‖a‖², ‖b‖², ⟨a, b⟩

    def reduce(self, round: int, totals: Partial, ctx: dict[str, Any]) -> dict[str, Any]:
        ctx = dict(ctx)
        for key, (aa, bb, ab) in totals.items():
            g, _ = key.rsplit("/", 1)
            dot = pair_cos(int(ab), int(aa), int(bb))
            c_a, c_b = coefficients(dot, self.t)
            ctx[g] = {"dot": dot, "coef": (float(np.float32(c_a)), float(np.float32(c_b)))}
        return ctx

    def merge(self, block: Block, ctx: dict[str, Any]) -> torch.Tensor:
        return weighted_sum(block.experts, ctx[block.name]["coef"])    # [rows, cols]
