"""LiNeS, as a modifier of any task-vector method ("LiNeS: Post-training layer scaling prevents
forgetting and enhances model merging", Wang et al., 2024, arXiv:2410.17146).

The inner method merges as usual; LiNeS rescales its merged task vector by depth:

    τ_merged = θ_inner − θ₀                       (θ_inner: the inner method's merged tensor)
    θ = θ₀ + s(ℓ) · τ_merged
    s(ℓ) = α + β · ℓ / (L − 1)   for a tensor of block ℓ (0-indexed) of L blocks,
    s    = α                     for every other tensor (embeddings, final norm, head)
    α (auto) = ‖Σ_t τ_t‖₁ / (T · ‖τ_merged‖₁), both norms over the whole model

as in the authors' code (``norm_summed_tvs / norm_mtv / num_tasks``). In a pipeline::

    method: {name: ties, density: 0.2, lines: {beta: 0.5}}            # auto α
    method: {name: task_arithmetic, lines: {alpha: 0.3, beta: 0.5}}

Semantics chosen where the paper leaves room:

- ℓ comes from the tensor name, never from a model class: the first ``layers.<int>.``,
  ``h.<int>.`` or ``blocks.<int>.`` component (at the start of the name or after a ``.``), e.g.
  ``model.layers.3.mlp.up_proj.weight`` → 3, ``transformer.h.0.attn.c_attn.weight`` → 0. A name
  without one gets α. (The authors' code matches ``.{i}.`` anywhere in the name, which would
  also catch e.g. an MoE expert index.)
- L = 1 + the largest ℓ over the model, learned exactly in the statistics round (one count per
  layer index seen). With L = 1 every tensor gets α (ℓ / (L − 1) has no value).
- Σ_t τ_t and T are unweighted, as in METHODS.md and the authors' code: the experts' weights
  act only through the inner method (so with auto α a common factor on all weights cancels).
- τ_merged includes the inner method's ``scale`` λ: with auto α it cancels in the α term but
  still multiplies the β term (the authors' code applies β to the unscaled merged vector;
  keep λ = 1 to match it).
- ‖τ_merged‖₁ = 0 means τ_merged = 0 everywhere, so θ = θ₀ whatever α: α is then taken as 0.
- With overrides, every tensor's merged task vector counts in the same model-wide α and L
  (``lines`` is set once, in the method block, and wraps the method of every override).

Statistics: the inner method's rounds (under the group ``lines:<inner group>`` so keys never
collide with an unwrapped method's), then one more round, on the same groups: per tensor, the
exact sums of per-row fp64 sums (:func:`distmerge.reduce.row_sums`, then
:func:`distmerge.reduce.exact_sum`) of |Σ_t τ_t| and |τ_merged| (the inner merge runs in that
round; skipped when α is given) and a count under the
kind ``layer<ℓ>``. The driver adds them up over every group in ``ctx["lines:model"]`` (exact
integers, so the order of groups and rounds does not matter). The merge computes α in fp64
from those exact totals (correctly rounded), s(ℓ) in fp64, and applies s rounded once to fp32:
``θ₀ + fp32(s) · (θ_inner − θ₀)`` in fp32.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import numpy as np
import torch

from distmerge.errors import ConfigError
from distmerge.methods.base import Block, Method, Partial, task_vectors, weighted_sum
from distmerge.reduce import exact_sum, row_sums

# Methods whose result is θ₀ + (a merged task vector): the ones LiNeS can rescale.
TASK_VECTOR_METHODS = frozenset({
    "breadcrumbs", "consensus", "dare_linear", "dare_ties", "della", "task_arithmetic", "ties",
})
PREFIX = "lines:"           # statistics groups of the wrapped method
CTX = "lines:model"         # the model-wide totals in ctx
_NOTHING_YET = {"sum_l1": 0, "merged_l1": 0, "layers": 0}     # the totals before any statistics
_LAYER = re.compile(r"(?:^|\.)(?:layers|h|blocks)\.(\d+)\.")


def layer_index(tensor: str) -> int | None:
    """ℓ of the first ``layers.<int>.`` / ``h.<int>.`` / ``blocks.<int>.`` component, or None."""
    m = _LAYER.search(tensor)
    return int(m.group(1)) if m else None


@dataclass(frozen=True, kw_only=True)
class Lines(Method):
    name = "lines"
    inner: Method
    alpha: float | None = None      # None: auto
    beta: float = 0.5

    def check(self) -> None:
        if self.inner.name not in TASK_VECTOR_METHODS:
            raise ValueError(f"inner: {self.inner.name} does not merge task vectors")
        if self.alpha is not None and not math.isfinite(self.alpha):
            raise ValueError("alpha: must be a finite number, or null for auto")
        if not math.isfinite(self.beta):
            raise ValueError("beta: must be a finite number")

    @property
    def rounds(self) -> int:
        return self.inner.rounds + 1

    def check_weights(self, weights: tuple[float, ...]) -> None:
        self.inner.check_weights(weights)

    def group(self, tensor: str) -> str:
        return PREFIX + self.inner.group(tensor)

    def stats(self, round: int, block: Block, ctx: dict[str, Any]) -> Partial:
        if round < self.inner.rounds:
            return {PREFIX + k: v for k, v in self.inner.stats(round, block, ctx).items()}
        if round > self.inner.rounds:
            raise ValueError(f"lines has no statistics round {round}")
        g = self.group(block.name)
        out: Partial = {}
        ell = layer_index(block.name)
        if ell is not None:
            out[f"{g}/layer{ell}"] = np.ones(1, dtype=np.int64)
        if self.alpha is None:
            tau_sum = weighted_sum(task_vectors(block), (1.0,) * block.n_experts)   # [rows, cols]
            tau_merged = self.inner.merge(block, ctx) - block.base                    # [rows, cols]
            out[f"{g}/sum_l1"] = np.array([exact_sum(row_sums(tau_sum.abs_().double()))], dtype=object)
            out[f"{g}/merged_l1"] = np.array([exact_sum(row_sums(tau_merged.abs_().double()))], dtype=object)
        return out

    def reduce(self, round: int, totals: Partial, ctx: dict[str, Any]) -> dict[str, Any]:
        if round < self.inner.rounds:
            return self.inner.reduce(round, {k[len(PREFIX):]: v for k, v in totals.items()}, ctx)
        acc = dict(ctx.get(CTX, _NOTHING_YET))
        for key, arr in totals.items():
            kind = key.rsplit("/", 1)[1]
            if kind in ("sum_l1", "merged_l1"):
                acc[kind] += int(arr[0])
            elif kind.startswith("layer"):
                acc["layers"] = max(acc["layers"], int(kind[len("layer"):]) + 1)
        return {**ctx, CTX: acc}

    # -- merge ----------------------------------------------------------------------------
    def alpha_value(self, totals: dict[str, int], n_experts: int) -> float:
        """α in fp64: the given one, or ‖Σ_t τ_t‖₁ / (T ‖τ_merged‖₁) correctly rounded."""
        if self.alpha is not None:
            return self.alpha
        if totals["merged_l1"] == 0:
            return 0.0                                  # τ_merged = 0: θ₀ whatever α
        return float(Fraction(totals["sum_l1"], n_experts * totals["merged_l1"]))

    def scale(self, tensor: str, totals: dict[str, int], n_experts: int) -> float:
        """s(ℓ) of ``tensor``, computed in fp64 and rounded to fp32."""
        s = self.alpha_value(totals, n_experts)
        ell, n_layers = layer_index(tensor), totals["layers"]
        if ell is not None and n_layers > 1:
            s += self.beta * ell / (n_layers - 1)
        return float(np.float32(s))

    def merge(self, block: Block, ctx: dict[str, Any]) -> torch.Tensor:
        s = self.scale(block.name, ctx.get(CTX, _NOTHING_YET), block.n_experts)   # no layer, α given: no totals
        tau_merged = self.inner.merge(block, ctx) - block.base     # [rows, cols], a new tensor
        return block.base + tau_merged.mul_(s)


def wrap(inner: Method, spec: Any, where: str = "method.lines") -> Lines:
    """``inner`` wrapped in LiNeS, from a pipeline's ``lines`` block (``{alpha?, beta?}``).

    Raises:
        ConfigError: ``spec`` is not a mapping, has an unknown key or a value of the wrong
            type, or ``inner`` is not a task-vector method (the message names ``where``).
    """
    if inner.name not in TASK_VECTOR_METHODS:
        raise ConfigError(f"{where}: lines rescales a merged task vector and {inner.name} does not "
                          f"merge task vectors; use it with one of {', '.join(sorted(TASK_VECTOR_METHODS))}")
    inner = inner.unspeculative()           # its merge runs in a statistics round: no redo there
    if not isinstance(spec, dict):
        raise ConfigError(f"{where}: must be a mapping such as {{beta: 0.5}} ({{}} for the defaults), "
                          f"got {spec!r}")
    for key in spec:
        if key not in ("alpha", "beta"):
            raise ConfigError(f"{where}.{key}: unknown parameter of lines (known: alpha, beta)")
    alpha, beta = spec.get("alpha"), spec.get("beta", 0.5)
    if alpha is not None and (isinstance(alpha, bool) or not isinstance(alpha, (int, float))):
        raise ConfigError(f"{where}.alpha: must be a number, or null for auto, got {alpha!r}")
    if isinstance(beta, bool) or not isinstance(beta, (int, float)):
        raise ConfigError(f"{where}.beta: must be a number, got {beta!r}")
    try:
        lines = Lines(inner=inner, alpha=None if alpha is None else float(alpha), beta=float(beta))
        lines.check()
    except OverflowError:
        raise ConfigError(f"{where}: alpha and beta must be finite numbers") from None
    except ValueError as err:
        raise ConfigError(f"{where}.{err}") from None
    return lines
