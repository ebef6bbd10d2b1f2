"""Frank-Wolfe objectives behind one interface: the gradient's scores at the current model.

Both objectives answer the same question for the iteration (:mod:`distmerge.select.frank_wolfe`):
at θ = θ₀ + Σ_j c_{g,j} τ_j, what are f(θ) and, per tensor g, the :class:`GroupScores`
(⟨∇_g f, τ_j⟩, ⟨∇_g f, θ₀⟩, ‖∇_g f‖², ‖θ_{g,j}‖²)?

- :class:`DataFree` (``objective: {kind: data_free, targets: [...]}``): the quadratic
      f(θ) = 1/(2|K|) Σ_{k∈K} ‖θ − θ_k‖²      (K: the target experts, all of the pool by default)
  so ∇_g f = Σ_j c_{g,j} τ_{g,j} − τ̄_{g,K} with τ̄_K the mean task vector of the targets. Every
  quantity is linear or quadratic in the Gram matrix of [θ₀, τ_1..τ_n] per tensor, which one
  statistics pass computes exactly; every iteration then runs on the driver in microseconds.
- the data objective (``kind: data``): a proxy loss on small labelled or unlabelled sets; its
  gradient comes from the gradient stage (:mod:`distmerge.select.gradient`) and its scores
  from a statistics pass over the gradient checkpoint, as :func:`scores_from_products`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from distmerge.select.frank_wolfe import GroupScores


@dataclass(frozen=True, kw_only=True)
class DataFree:
    """The data-free quadratic objective over per-tensor Gram matrices.

    ``grams[g]`` is the fp64 Gram matrix of [θ₀, τ_1..τ_n] over tensor g ([n + 1, n + 1]);
    ``targets`` the 0-based indices of the target experts."""

    grams: dict[str, np.ndarray]
    targets: tuple[int, ...]

    def _mean_target(self, n: int) -> np.ndarray:
        w = np.zeros(n)
        for k in self.targets:
            w[k] += 1.0 / len(self.targets)
        return w                                                   # [n]

    def value(self, coeffs: dict[str, np.ndarray]) -> float:
        """f(θ) = 1/(2|K|) Σ_k Σ_g (c_g − e_k)ᵀ T_g (c_g − e_k), T_g the task-vector Gram."""
        total = 0.0
        for g in sorted(self.grams):
            T = self.grams[g][1:, 1:]
            c = coeffs[g]
            for k in self.targets:
                d = c.copy()
                d[k] -= 1.0
                total += float(d @ T @ d)
        return total / (2 * len(self.targets))

    def scores(self, coeffs: dict[str, np.ndarray]) -> dict[str, GroupScores]:
        out = {}
        for g in sorted(self.grams):
            G = self.grams[g]
            T, B, base_sq = G[1:, 1:], G[0, 1:], G[0, 0]           # [n, n], [n], scalar
            d = coeffs[g] - self._mean_target(len(B))             # ∇_g f = Σ_j d_j τ_j
            out[g] = GroupScores(
                inner=T @ d,
                grad_base=float(B @ d),
                grad_sq=float(d @ T @ d),
                weight_sq=base_sq + 2 * B + np.diag(T),            # ‖θ₀ + τ_j‖²
            )
        return out


def scores_from_products(products: np.ndarray, weight_sq: np.ndarray) -> GroupScores:
    """GroupScores of one tensor from a gradient pass: ``products`` = [⟨g, θ₀⟩, ⟨g, τ_1⟩..
    ⟨g, τ_n⟩, ⟨g, g⟩] (fp64), ``weight_sq`` = ‖θ_j‖² for every candidate."""
    return GroupScores(inner=np.asarray(products[1:-1], dtype=np.float64),
                       grad_base=float(products[0]), grad_sq=float(products[-1]),
                       weight_sq=np.asarray(weight_sq, dtype=np.float64))


def data_free_at(gram: np.ndarray, products: np.ndarray, targets: tuple[int, ...]
                 ) -> tuple[float, GroupScores]:
    """The data-free objective's share f_g and GroupScores of one tensor at a model given as its
    delta D = θ^t − θ₀ (any local merge, e.g. TIES steps): ``gram`` = Gram of [θ₀, τ_1..τ_n]
    ([n + 1, n + 1]), ``products`` = [⟨D, θ₀⟩, ⟨D, τ_1⟩..⟨D, τ_n⟩, ⟨D, D⟩].

    With w the targets' mean weights: ∇f = D − Σ_k w_k τ_k, so
    ⟨∇f, τ_j⟩ = ⟨D, τ_j⟩ − (T w)_j, ⟨∇f, θ₀⟩ = ⟨D, θ₀⟩ − B·w, ‖∇f‖² = ⟨D, D⟩ − 2 w·⟨D, τ⟩ + wᵀT w,
    ⟨∇f, D⟩ = ⟨D, D⟩ − w·⟨D, τ⟩, f_g = ½ (⟨D, D⟩ − 2 w·⟨D, τ⟩ + Σ_k w_k T_kk)."""
    T, B, base_sq = gram[1:, 1:], gram[0, 1:], gram[0, 0]
    n = len(B)
    w = np.zeros(n)
    for k in targets:
        w[k] += 1.0 / len(targets)
    DB, DT, DD = float(products[0]), np.asarray(products[1:-1], dtype=np.float64), float(products[-1])
    f = 0.5 * (DD - 2 * float(w @ DT) + float(w @ np.diag(T)))
    return f, GroupScores(inner=DT - T @ w, grad_base=DB - float(B @ w),
                          grad_sq=DD - 2 * float(w @ DT) + float(w @ T @ w),
                          weight_sq=base_sq + 2 * B + np.diag(T),
                          grad_delta=DD - float(w @ DT))
