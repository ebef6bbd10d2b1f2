"""dare_ties: DARE's drop and rescale, then TIES elect + disjoint mean without trimming, +1
elected where the weighted sum is exactly 0; θ = θ₀ + λ τ_m.

The keep masks K(seed, expert) of tensor "w" [2, 4] (u < density) are the ones listed in
tests/cases/dare_linear.py (τ1, τ2, τ3 are the generator's experts t = 0, 1, 2), plus t = 2:

    s = 0, t = 2: u = [[.7250 .6054 .1873 .9984], [.6966 .5922 .9310 .6367]]
    s = 1, t = 2: u = [[.6615 .0885 .6907 .5605], [.8477 .3311 .8735 .9858]]

    density .5:  K(0, 0) = [[1 0 0 1], [1 1 0 1]]   K(1, 0) = [[0 1 0 1], [0 1 0 0]]
                 K(0, 1) = [[0 1 1 0], [0 1 1 1]]   K(1, 1) = [[0 1 1 1], [0 1 0 1]]
                 K(0, 2) = [[0 0 1 0], [0 0 0 0]]   K(1, 2) = [[0 1 0 0], [0 1 0 0]]
"""

import torch

from tests.cases import Case, one_tensor
from tests.cases.dare_linear import _DEF_BASE, _DEF_EXPERTS, _L1_BASE, _L1_EXPERTS, keep

_TAU = [
    torch.tensor([[1.0, 3.0, -2.0, 0.5], [-1.0, 2.0, 1.0, 1.0]]),
    torch.tensor([[4.0, -1.0, 1.0, 2.0], [1.0, -1.0, 2.0, -1.0]]),
    torch.tensor([[1.0, 1.0, 0.5, 1.0], [3.0, 1.0, 1.0, 1.0]]),
]
_BASE, _EXPERTS = one_tensor("w", torch.ones(2, 4), _TAU)

# density .5, ÷ .5, seed 0: τ̃_t = 2 τ_t K(0, t)
#   τ̃1 = [[2 0 0 1], [−2 4 0 2]]   τ̃2 = [[0 −2 2 0], [0 −2 4 −2]]
#   τ̃3 = [[0 0 1 0], [0 0 0 0]]
#   sums  [[2 −2 3 1], [−2 2 4 0]] → elected [[+ − + +], [− + + +]] (the 0 elects +)
#   means of the agreeing: row 0: 2, −2, (2 + 1)/2 = 1.5, 1
#                          row 1: −2, 4 (τ̃2's −2 disagrees), 4, 2 (τ̃2's −2 disagrees)
_SEED0 = torch.tensor([[2.0, -2.0, 1.5, 1.0], [-2.0, 4.0, 4.0, 2.0]])
assert torch.equal(sum(2 * t * keep(0, i, 0.5) for i, t in enumerate(_TAU)),
                   torch.tensor([[2.0, -2.0, 3.0, 1.0], [-2.0, 2.0, 4.0, 0.0]]))

# rescale none, seed 1, λ = .5: τ̃_t = τ_t K(1, t)
#   τ̃1 = [[0 3 0 .5], [0 2 0 0]]   τ̃2 = [[0 −1 1 2], [0 −1 0 −1]]
#   τ̃3 = [[0 1 0 0], [0 1 0 0]]
#   sums  [[0 3 1 2.5], [0 2 0 −1]] → elected [[+ + + +], [+ + + −]]
#   means row 0: 0 (nothing survives), (3 + 1)/2 = 2, 1, (.5 + 2)/2 = 1.25
#         row 1: 0, (2 + 1)/2 = 1.5, 0, −1
_SEED1 = torch.tensor([[0.0, 2.0, 1.0, 1.25], [0.0, 1.5, 0.0, -1.0]])
assert torch.equal(sum(t * keep(1, i, 0.5) for i, t in enumerate(_TAU)),
                   torch.tensor([[0.0, 3.0, 1.0, 2.5], [0.0, 2.0, 0.0, -1.0]]))

# L1, seed 0, two experts (tests/cases/dare_linear.py): τ̃1 = [[2 0 0 2], [−2 2 0 2]],
#   τ̃2 = [[0 1.5 −1.5 0], [0 −1.5 .75 .75]]; sums [[2 1.5 −1.5 2], [−2 .5 .75 2.75]]
#   means row 0: 2, 1.5, −1.5, 2; row 1: −2, 2 (τ̃2's −1.5 disagrees), .75, (2 + .75)/2 = 1.375
_L1 = torch.tensor([[2.0, 1.5, -1.5, 2.0], [-2.0, 2.0, 0.75, 1.375]])

# Defaults, weights 1 and .5 (tests/cases/dare_linear.py): τ̃1 = [[1 2 0 −1], [.5 −2 1 1]],
#   τ̃2 = [[−1 2 1 2], [2 1 −4 1]]; weighted sums [[.5 3 .5 0], [1.5 −1.5 −1 1.5]]
#   elected [[+ + + +], [+ − − +]]; means Σ w τ̃ [agree] / Σ w [agree]:
#   row 0: 1/1, (2 + 1)/1.5 = 2, .5/.5 = 1, (.5 · 2)/.5 = 2 (the 0 elects +: τ̃2's 2)
#   row 1: (.5 + 1)/1.5 = 1, −2/1, (.5 · −4)/.5 = −4, (1 + .5)/1.5 = 1
_DEFAULTS = torch.tensor([[1.0, 2.0, 1.0, 2.0], [1.0, -2.0, -4.0, 1.0]])

CASES = [
    Case(id="density-0.5", params={"density": 0.5}, base=_BASE, experts=_EXPERTS,
         expected={"w": 1 + _SEED0}),
    Case(id="none-seed-1-scale-0.5", params={"density": 0.5, "rescale": "none", "seed": 1, "scale": 0.5},
         base=_BASE, experts=_EXPERTS, expected={"w": 1 + 0.5 * _SEED1}),
    Case(id="l1", params={"density": 0.5, "rescale": "l1"}, base=_L1_BASE, experts=_L1_EXPERTS,
         expected={"w": 1 + _L1}),
    Case(id="defaults-weights", params={}, base=_DEF_BASE, experts=_DEF_EXPERTS,
         weights=[1.0, 0.5], expected={"w": _DEFAULTS}),
]
