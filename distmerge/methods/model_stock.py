"""Model Stock ("Model Stock: All we need is just a few fine-tuned models", Jang et al., ECCV 2024).

Per tensor, with τ_t = θ_t − θ₀ (fp32) and T experts:

    c = mean over the pairs i < j of cos(τ_i, τ_j)        (cos over the whole tensor)
    t = T c / ((T − 1) c + 1)
    θ = t · mean_t θ_t + (1 − t) · θ₀

Semantics chosen where the paper leaves room (the authors' code and mergekit agree on the
first two):

- A pair in which one task vector is all zeros has no angle; its cos counts as 0 (both the
  authors' ``+ EPS`` and mergekit's ``clamp(min=1e-6)`` give 0/ε = 0 there). All task vectors
  zero → c = 0 → t = 0 → θ₀, which is then every expert.
- c < 0 gives t < 0 (extrapolation away from the experts' mean), as in both references.
- (T − 1) c + 1 = ‖Σ_i τ_i/‖τ_i‖‖² / T ≥ 0, and it is 0 only when the normalised task vectors
  cancel exactly (e.g. two experts with τ₂ = −k τ₁): the formula has no value there (mergekit
  gives ±inf, the authors' code ±2·10⁸), and distmerge uses t = 0, i.e. θ₀.
- mean_t θ_t is the plain mean, as in the paper and both codes: Model Stock has no expert
  weights, so weights other than 1 are refused (:meth:`ModelStock.check_weights`) rather than
  ignored.

Statistics (one round, locality T): per tensor, ⟨τ_i, τ_j⟩ for i ≤ j as exact sums of per-row
fp64 sums (fp32 products are exact in fp64; :func:`distmerge.reduce.row_sums` adds each row in a fixed order,
:func:`distmerge.reduce.exact_sum` adds the rows exactly). The driver computes each cos from
those totals correctly rounded to fp64 (τ₂ = −2^k τ₁ gives −1 exactly), c with
``math.fsum``, t in fp64, and hands the merge t and 1 − t rounded once to fp32; the merge is
``fp32(t) · mean + fp32(1 − t) · θ₀`` in fp32 (mean = Σ_t θ_t in expert order, then ÷ T), so
t = 0 gives θ₀ and t = 1 the mean exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import numpy as np
import torch

from distmerge.methods.base import Block, Method, Partial, divide_, task_vectors, weighted_sum
from distmerge.reduce import exact_sum, row_sums


def pair_cos(dot: int, sq_i: int, sq_j: int) -> float:
    """cos from the exact totals ⟨u, v⟩, ‖u‖², ‖v‖² (exact_sum scale), correctly rounded to
    fp64 (up to the ~2⁻¹¹⁰⁰ relative error of an integer square root) and clamped to [−1, 1]
    (per-row rounding may break Cauchy–Schwarz by an ulp); 0 when a norm is 0."""
    if sq_i == 0 or sq_j == 0:
        return 0.0
    return min(1.0, max(-1.0, float(Fraction(dot, math.isqrt(sq_i * sq_j)))))


def _fp32(x: float) -> float:
    return float(np.float32(x))


@dataclass(frozen=True, kw_only=True)
class ModelStock(Method):
    name = "model_stock"

    @property
    def rounds(self) -> int:
        return 1

    def check_weights(self, weights: tuple[float, ...]) -> None:
        if len(weights) < 2:
            raise ValueError(f"model_stock needs at least two experts, got {len(weights)}")
        if any(w != 1.0 for w in weights):
            raise ValueError("model_stock averages the experts equally (it has no expert weights); "
                             f"set every weight to 1, got {list(weights)}")

    def stats(self, round: int, block: Block, ctx: dict[str, Any]) -> Partial:
        if round != 0:
            raise ValueError(f"model_stock has no statistics round {round}")
        tau = task_vectors(block).double()                  # [T, rows, cols]; products are exact
        gram = [exact_sum(row_sums(tau[i] * tau[j]))        # ⟨τ_i, τ_j⟩
                for i in range(len(tau)) for j in range(i, len(tau))]
        return {f"{block.name}/gram": np.array(gram, dtype=object)}   # [T(T+1)/2], i ≤ j

    def reduce(self, round: int, totals: Partial, ctx: dict[str, Any]) -> dict[str, Any]:
        ctx = dict(ctx)
        for key, gram in totals.items():
            g, _ = key.rsplit("/", 1)
            t = self.ratio([int(v) for v in gram])
            ctx[g] = {"t": _fp32(t), "1-t": _fp32(1.0 - t)}
        return ctx

    @staticmethod
    def ratio(gram: list[int]) -> float:
        """t (fp64) from the exact ⟨τ_i, τ_j⟩, i ≤ j, in row-major order."""
        T = (math.isqrt(8 * len(gram) + 1) - 1) // 2        # len(gram) = T(T + 1)/2
        at = dict(zip([(i, j) for i in range(T) for j in range(i, T)], gram))
        cos = [pair_cos(at[i, j], at[i, i], at[j, j]) for i in range(T) for j in range(i + 1, T)]
        c = math.fsum(cos) / len(cos)
        den = (T - 1) * c + 1.0
        return T * c / den if den > 0 else 0.0          # den ≤ 0: the task vectors cancel → θ₀

    def merge(self, block: Block, ctx: dict[str, Any]) -> torch.Tensor:
        c = ctx[block.name]
        mean = weighted_sum(block.experts, (1.0,) * block.n_experts)   # [rows, cols], a new tensor
        divide_(mean, block.n_experts)
        return mean.mul_(c["t"]).add_(block.base * c["1-t"])
