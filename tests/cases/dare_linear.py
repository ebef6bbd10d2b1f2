"""dare_linear: drop each τ_t entry where u ≥ density, rescale the survivors (÷ density, the
tensor's L1 norm, or not at all), then θ₀ + λ Σ_t w_t τ̃_t.

The drops come from the counter-based generator: ``keep`` below recomputes them with
rng.uniform, and the comments list them (tests/test_methods_dare.py checks that listing).
Experts are numbered from 1 (τ1, τ2) as in METHODS.md; the generator's expert index t is
their 0-indexed position (τ1 is t = 0).
Tensor "w" is [2, 4]; its uniforms u (expert t, seed s):

    s = 0, t = 0: [[.2832 .5242 .9420 .0301], [.0658 .3616 .5975 .3185]]
    s = 0, t = 1: [[.8124 .4860 .0992 .6070], [.8481 .3454 .4709 .2848]]
    s = 1, t = 0: [[.5166 .0202 .9724 .1419], [.6925 .1230 .8821 .8624]]
    s = 1, t = 1: [[.9219 .3459 .2787 .1200], [.7140 .4038 .9890 .2869]]

so with density .5 (kept where u < .5):

    K(0, 0) = [[1 0 0 1], [1 1 0 1]]     K(0, 1) = [[0 1 1 0], [0 1 1 1]]
    K(1, 0) = [[0 1 0 1], [0 1 0 0]]     K(1, 1) = [[0 1 1 1], [0 1 0 1]]

and with density .9 (fp32(.9) = .89999998): K(0, 0) = [[1 1 0 1], [1 1 1 1]], K(0, 1) = all 1.
"""

import numpy as np
import torch

from distmerge.methods import rng
from tests.cases import Case, one_tensor


def keep(seed: int, expert: int, density: float, shape=(2, 4), name: str = "w") -> torch.Tensor:
    """Which entries of expert ``expert`` survive: u < fp32(density)."""
    u = rng.uniform(seed=seed, expert=expert, tensor=name, start=0, shape=shape)
    return (u < float(np.float32(density))).float()


# L1 case: each expert's kept |τ| is a simple fraction of its total.
#   τ1 = [[1 −2 2 1], [−1 1 −1 1]]: Σ|τ1| = 10, kept by K(0, 0): 1 + 1 + 1 + 1 + 1 = 5 → × 2
#   τ2 = [[1 1 −1 .5], [.5 −1 .5 .5]]: Σ|τ2| = 6, kept by K(0, 1): 1 + 1 + 1 + .5 + .5 = 4 → × 1.5
_L1_TAU = [torch.tensor([[1.0, -2.0, 2.0, 1.0], [-1.0, 1.0, -1.0, 1.0]]),
           torch.tensor([[1.0, 1.0, -1.0, 0.5], [0.5, -1.0, 0.5, 0.5]])]
_L1_BASE, _L1_EXPERTS = one_tensor("w", torch.ones(2, 4), _L1_TAU)
#   τ̃1 = 2 · τ1 · K(0, 0) = [[2 0 0 2], [−2 2 0 2]]
#   τ̃2 = 1.5 · τ2 · K(0, 1) = [[0 1.5 −1.5 0], [0 −1.5 .75 .75]]
#   θ = 1 + τ̃1 + τ̃2 = [[3 2.5 −.5 3], [−1 1.5 1.75 3.75]]
_L1_WANT = 1 + 2 * _L1_TAU[0] * keep(0, 0, 0.5) + 1.5 * _L1_TAU[1] * keep(0, 1, 0.5)
assert torch.equal(_L1_WANT, torch.tensor([[3.0, 2.5, -0.5, 3.0], [-1.0, 1.5, 1.75, 3.75]]))

# The same experts with seed 1, rescale ÷ .5, λ = 2:
#   τ̃1 = 2 · τ1 · K(1, 0) = [[0 −4 0 2], [0 2 0 0]]
#   τ̃2 = 2 · τ2 · K(1, 1) = [[0 2 −2 1], [0 −2 0 1]]
#   θ = 1 + 2 (τ̃1 + τ̃2) = 1 + [[0 −4 −4 6], [0 0 0 2]]
_SEED1_WANT = 1 + 2 * (2 * _L1_TAU[0] * keep(1, 0, 0.5) + 2 * _L1_TAU[1] * keep(1, 1, 0.5))
assert torch.equal(_SEED1_WANT, 1 + torch.tensor([[0.0, -4.0, -4.0, 6.0], [0.0, 0.0, 0.0, 2.0]]))

# rescale none, weights 1 and .5, seed 0: θ = 1 + τ1 · K(0, 0) + .5 · τ2 · K(0, 1)
#   = 1 + [[1 0 0 1], [−1 1 0 1]] + [[0 .5 −.5 0], [0 −.5 .25 .25]]
_NONE_WANT = 1 + _L1_TAU[0] * keep(0, 0, 0.5) + 0.5 * _L1_TAU[1] * keep(0, 1, 0.5)
assert torch.equal(_NONE_WANT, torch.tensor([[2.0, 1.5, 0.5, 2.0], [0.0, 1.5, 1.25, 2.25]]))

# Defaults (density .9, ÷ fp32(.9), seed 0, λ 1), base 0: each τ is q = fp32(.9) times a
# power of two, so τ / q is exact.
_Q = float(np.float32(0.9))
_M1 = torch.tensor([[1.0, 2.0, 4.0, -1.0], [0.5, -2.0, 1.0, 1.0]])
_M2 = torch.tensor([[-1.0, 2.0, 1.0, 2.0], [2.0, 1.0, -4.0, 1.0]])
_DEF_BASE, _DEF_EXPERTS = one_tensor("w", torch.zeros(2, 4), [_Q * _M1, _Q * _M2])
#   τ̃1 = M1 · K(0, 0) = [[1 2 0 −1], [.5 −2 1 1]]  (the 4 at u = .9420 is dropped)
#   τ̃2 = M2 (nothing dropped); weights 1, .5: θ = τ̃1 + .5 τ̃2 = [[.5 3 .5 0], [1.5 −1.5 −1 1.5]]
_DEF_WANT = _M1 * keep(0, 0, 0.9) + 0.5 * _M2 * keep(0, 1, 0.9)
assert torch.equal(_DEF_WANT, torch.tensor([[0.5, 3.0, 0.5, 0.0], [1.5, -1.5, -1.0, 1.5]]))

CASES = [
    Case(id="l1-density-0.5", params={"density": 0.5, "rescale": "l1"},
         base=_L1_BASE, experts=_L1_EXPERTS, expected={"w": _L1_WANT}),
    Case(id="seed-1-scale-2", params={"density": 0.5, "seed": 1, "scale": 2.0},
         base=_L1_BASE, experts=_L1_EXPERTS, expected={"w": _SEED1_WANT}),
    Case(id="rescale-none-weights", params={"density": 0.5, "rescale": "none"},
         base=_L1_BASE, experts=_L1_EXPERTS, weights=[1.0, 0.5], expected={"w": _NONE_WANT}),
    Case(id="defaults-weights", params={}, base=_DEF_BASE, experts=_DEF_EXPERTS,
         weights=[1.0, 0.5], expected={"w": _DEF_WANT}),
]
