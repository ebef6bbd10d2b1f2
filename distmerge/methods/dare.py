"""DARE ("Language Models are Super Mario: Absorbing Abilities from Homologous Models as a Free
Lunch", Yu et al., ICML 2024): Drop And REscale each task vector, then merge.

For each expert t (its 0-indexed position in the pipeline's list of experts) and each entry of
τ_t = θ_t − θ₀, u = :func:`distmerge.methods.rng.uniform` keyed by (``seed``, t, tensor name,
global flat index) (METHODS.md "Randomness"). With d = ``density`` rounded to fp32:

    keep    u < d  (u is an fp32 multiple of 2**-24, so the entry is kept with probability d
            exactly when d ≥ 0.5, within 2**-24 otherwise); a dropped entry becomes ±0
    rescale ``inverse`` (the paper): survivors ÷ d, in fp32
            ``l1`` (mergekit ≥ 0.1, ``rescale_norm: l1``): survivors × r_t with
            r_t = Σ|τ_t| / Σ|τ_t · keep| over the whole tensor, per expert; both sums are exact
            (one statistics round of integer sums of fp32 significands by exponent, see
            :func:`distmerge.reduce.magnitude_bins`), their ratio is rounded to fp64 and then to fp32. When nothing
            nonzero survives (Σ|τ_t · keep| = 0) τ̃_t is 0 whatever the factor, and r_t = 1.
            mergekit leaves a tensor unscaled when either sum is below 1e-7; distmerge rescales
            whenever the kept sum is nonzero (the rule does not depend on the weights' scale).
            ``none``: survivors as they are.

then

- ``dare_linear``: θ = θ₀ + λ Σ_t w_t τ̃_t (task arithmetic on τ̃);
- ``dare_ties``: TIES elect + disjoint mean on τ̃ without trimming (METHODS.md "TIES exactly"):
  s = sign(Σ_t w_t τ̃_t), +1 where that sum is exactly 0 (the ``scope: tensor`` rule, which
  mergekit's ``dare_ties`` also uses); τ_m = Σ_t w_t τ̃_t [τ̃_t ≠ 0, sign τ̃_t = s] /
  Σ_t w_t [τ̃_t ≠ 0, sign τ̃_t = s] (0 where no expert agrees); θ = θ₀ + λ τ_m.

Locality E (T with ``rescale: l1``). The masks, and so the merge, are the same whatever the
slicing, the executor or the device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Literal

import numpy as np
import torch

from distmerge.methods import rng
from distmerge.methods.base import Block, Method, Partial, disjoint_mean, divide_, task_vectors, weighted_sum
from distmerge.reduce import bins_total, magnitude_bins

# The generator's resolution: u is a multiple of this, so a smaller keep probability is not
# what it says (u = 0 alone would be kept, with probability 2**-24).
MIN_PROBABILITY = 2.0 ** -24


def fp32(x: float) -> float:
    """``x`` rounded to the nearest fp32 (a Python float that fp32 holds exactly)."""
    return float(np.float32(x))


def uniforms(block: Block, seed: int) -> torch.Tensor:
    """The counter-based uniform of every entry of every expert.  [T, rows, cols]"""
    rows, cols = block.base.shape
    return torch.stack([
        rng.uniform(seed=seed, expert=t, tensor=block.name, start=block.row_start * cols,
                    shape=(rows, cols), device=block.base.device)
        for t in range(block.n_experts)
    ])


def check_seed(seed: int) -> None:
    if not 0 <= seed < 1 << 32:
        raise ValueError("seed: must be an integer in [0, 2**32)")


@dataclass(frozen=True, kw_only=True)
class _Dare(Method):
    density: float = 0.9
    rescale: Literal["inverse", "l1", "none"] = "inverse"
    seed: int = 0
    scale: float = 1.0

    def check(self) -> None:
        if not MIN_PROBABILITY <= self.density <= 1.0:
            raise ValueError("density: must be between 2**-24 (the random generator's "
                             "resolution) and 1")
        if self.rescale not in ("inverse", "l1", "none"):
            raise ValueError("rescale: must be 'inverse', 'l1' or 'none'")
        check_seed(self.seed)
        if not math.isfinite(self.scale):
            raise ValueError("scale: must be a finite number")

    @property
    def rounds(self) -> int:
        return 1 if self.rescale == "l1" else 0

    def group(self, tensor: str) -> str:
        return tensor

    def _keep(self, block: Block) -> torch.Tensor:
        """Which entries survive.  bool [T, rows, cols]"""
        return uniforms(block, self.seed) < fp32(self.density)

    def stats(self, round: int, block: Block, ctx: dict[str, Any]) -> Partial:
        if round != 0 or self.rescale != "l1":
            raise ValueError(f"{self.name} has no statistics round {round}")
        tau = task_vectors(block)                                       # [T, rows, cols]
        before = magnitude_bins(tau)                                    # [T, 256]
        after = magnitude_bins(tau.mul_(self._keep(block)))
        return {f"{self.group(block.name)}/l1": torch.stack([before, after]).cpu().numpy()}

    def reduce(self, round: int, totals: Partial, ctx: dict[str, Any]) -> dict[str, Any]:
        ctx = dict(ctx)
        for key, arr in totals.items():
            g, kind = key.rsplit("/", 1)
            if round == 0 and kind == "l1":
                factors = []                                            # arr: [2, T, 256]
                for b, a in zip(arr[0], arr[1]):
                    before, after = bins_total(b), bins_total(a)        # exact, one unit
                    ratio = float(Fraction(before, after)) if after else 1.0   # rounded once
                    factors.append(fp32(ratio))                         # and to fp32
                ctx[g] = {"l1": factors}
        return ctx

    def sparsified(self, block: Block, ctx: dict[str, Any]) -> torch.Tensor:
        """τ̃: the task vectors dropped and rescaled.  [T, rows, cols]"""
        tau = task_vectors(block).mul_(self._keep(block))               # dropped: ±0
        dev = tau.device
        if self.rescale == "inverse":
            divide_(tau, fp32(self.density))
        elif self.rescale == "l1":
            r = ctx[self.group(block.name)]["l1"]
            tau.mul_(torch.tensor(r, dtype=tau.dtype, device=dev).view(-1, 1, 1))
        return tau


@dataclass(frozen=True, kw_only=True)
class DareLinear(_Dare):
    """DARE, then task arithmetic: θ₀ + λ Σ_t w_t τ̃_t."""

    name = "dare_linear"

    def merge(self, block: Block, ctx: dict[str, Any]) -> torch.Tensor:
        merged = weighted_sum(self.sparsified(block, ctx), block.weights)    # [rows, cols]
        return block.base + merged * self.scale


@dataclass(frozen=True, kw_only=True)
class DareTies(_Dare):
    """DARE, then TIES elect + disjoint mean without trimming: θ₀ + λ τ_m."""

    name = "dare_ties"

    def merge(self, block: Block, ctx: dict[str, Any]) -> torch.Tensor:
        merged = disjoint_mean(self.sparsified(block, ctx), block.weights)   # [rows, cols]
        return block.base + merged * self.scale
