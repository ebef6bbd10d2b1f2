"""The Frank-Wolfe iteration of FW-Merging, on the driver: pure functions over small fp64 numbers.

"FW-Merging: Scaling Model Merging with Frank-Wolfe Optimization" (Chen, Hu, Luk, Hospedales,
Fan, 2025; code github.com/hmarkc/FW-Merging). The semantics, and every choice made where the
paper or its code leaves room, are in distmerge/select/FRANK_WOLFE.md; in short, with the pool
θ_j = θ₀ + τ_j (j = 1..n) and the merged model kept as coefficients per tensor,

    θ^t = θ₀ + Σ_j c_j^t τ_j                      (per tensor g: c_g^t; one vector for model)
    γ_t = step · 2 / (t + 2),   η_t = scale · γ_t  (the authors' code: the local merge at
                                                    scaling · γ_t)
    pick  j*_t = argmin_j s_j      (model: s_j summed over tensors; tensor: per tensor)
          score inner : s_{g,j} = ⟨∇_g f(θ^t), τ_{g,j}⟩
          score cosine: s_{g,j} = cos(∇_g f(θ^t), θ_{g,j})   (the candidate's weights)
    c^{t+1} = (1 − η_t) c^t + η_t e_{j*}    (task-arithmetic local merge toward θ_{j*});
          unchanged where the FW gap (per tensor for ``tensor``) is ≤ 0: no vertex descends
    gap   g_t = ⟨∇f(θ^t), θ^t − v_t⟩ with v_t the textbook LMO vertex (argmin of the inner
          score, per tensor for ``tensor``), whatever the score rule: the certificate
          f(θ^t) − min f ≤ g_t when θ^t lies in the feasible hull.

Everything here works on :class:`GroupScores` (per tensor: the gradient's inner products with
the candidates' task vectors and the base, its squared norm, the candidates' squared norms),
which the objectives (:mod:`distmerge.select.objectives`) produce, either in closed form from a
Gram matrix (data-free) or from a statistics pass over the gradient checkpoint (data). Sums
over tensors run in sorted tensor order in fp64, so a trace depends only on the reduced
statistics, which are exact (slice-invariant).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

Granularity = Literal["model", "tensor"]
Score = Literal["inner", "cosine"]


@dataclass(frozen=True, kw_only=True)
class GroupScores:
    """What the iteration needs about one tensor g at the current model."""

    inner: np.ndarray          # [n] ⟨∇_g f, τ_{g,j}⟩
    grad_base: float           # ⟨∇_g f, θ₀_g⟩
    grad_sq: float             # ‖∇_g f‖²
    weight_sq: np.ndarray      # [n] ‖θ_{g,j}‖² (the candidates' weights, for cosine)
    grad_delta: float | None = None   # ⟨∇_g f, θ^t_g − θ₀_g⟩; None: Σ_j c_j inner_j (coefficients)


@dataclass(frozen=True, kw_only=True)
class Params:
    iterations: int
    step: float
    scale: float
    granularity: Granularity
    score: Score


def gamma(t: int, step: float) -> float:
    """γ_t = step · 2 / (t + 2), t = 0, 1, ..."""
    return step * 2.0 / (t + 2)


def cosine(g: GroupScores) -> np.ndarray:
    """cos(∇_g f, θ_{g,j}) for every candidate j; 0 where either vector is 0 (the authors'
    code divides by 0 there and gets NaN).  → [n]"""
    dots = g.grad_base + g.inner                                    # ⟨∇f, θ₀ + τ_j⟩
    den = np.sqrt(max(g.grad_sq, 0.0)) * np.sqrt(np.maximum(g.weight_sq, 0.0))
    out = np.zeros_like(dots)
    np.divide(dots, den, out=out, where=den > 0)
    return out


def scores(g: GroupScores, rule: Score) -> np.ndarray:
    """The per-candidate score of one tensor under ``rule``.  → [n]"""
    return np.asarray(g.inner, dtype=np.float64) if rule == "inner" else cosine(g)


def argmin_first(x: np.ndarray) -> int:
    """The first index of the minimum (a tie picks the earlier expert, as the authors' strict
    ``<`` does)."""
    return int(np.argmin(x))


@dataclass(frozen=True, kw_only=True)
class Step:
    """One iteration's decision."""

    picked: dict[str, int]     # tensor -> expert index (model granularity: the same for all)
    gamma: float
    eta: float
    gap: float
    held: tuple[str, ...] = ()  # tensors that did not move: their FW gap was ≤ 0


def fw_pick(t: int, groups: dict[str, GroupScores], p: Params,
            coeffs: dict[str, np.ndarray] | None = None) -> Step:
    """Iteration ``t``'s decision: the pick from the scores and the FW gap at the current model
    (⟨∇f, θ^t − θ₀⟩ from ``grad_delta``, or from ``coeffs`` when the model is coefficients);
    a tensor whose gap is ≤ 0 is held (no vertex descends, e.g. at the optimum)."""
    names = sorted(groups)
    n = len(next(iter(groups.values())).inner) if groups else 0
    g_t = gamma(t, p.step)

    def current(name: str) -> float:
        g = groups[name]
        return float(g.grad_delta) if g.grad_delta is not None else float(coeffs[name] @ g.inner)

    picked: dict[str, int] = {}
    gaps: dict[str, float] = {}
    if p.granularity == "model":
        total = np.zeros(n)
        inner = np.zeros(n)
        here = 0.0
        for name in names:                                          # fixed order, fp64
            total += scores(groups[name], p.score)
            inner += groups[name].inner
            here += current(name)
        j = argmin_first(total)
        gap = here - float(inner.min()) if n else 0.0
        picked = {name: j for name in names}
        gaps = {name: gap for name in names}
    else:
        gap = 0.0
        for name in names:
            g = groups[name]
            picked[name] = argmin_first(scores(g, p.score))
            gaps[name] = current(name) - float(np.min(g.inner))
            gap += gaps[name]
    held = tuple(name for name in names if gaps[name] <= 0)
    return Step(picked=picked, gamma=g_t, eta=p.scale * g_t, gap=gap, held=held)


def fw_step(t: int, groups: dict[str, GroupScores], coeffs: dict[str, np.ndarray],
            p: Params) -> tuple[dict[str, np.ndarray], Step]:
    """Iteration ``t`` on a model kept as coefficients (task-arithmetic local merge): pick,
    then c ← (1 − η) c + η e_pick for every tensor not held. Returns the new coefficients and
    the step."""
    st = fw_pick(t, groups, p, coeffs)
    new = {}
    for name in sorted(groups):
        c = np.asarray(coeffs[name], dtype=np.float64)
        if name in st.held:
            new[name] = c.copy()
            continue
        c = (1.0 - st.eta) * c
        c[st.picked[name]] += st.eta
        new[name] = c
    return new, st


def initial_coefficients(names: list[str], n: int, *, init: str, scale: float) -> dict[str, np.ndarray]:
    """θ^0: ``merge`` = the task-arithmetic merge of the whole pool at ``scale`` (the authors'
    code: ``second_merge_method`` over every model), ``base`` = θ₀."""
    start = scale if init == "merge" else 0.0
    return {name: np.full(n, start, dtype=np.float64) for name in names}
