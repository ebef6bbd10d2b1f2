"""della: per row, keep each entry with p_i = (density − ε) + 2ε (rank_i − 1)/(n − 1) by
ascending |τ| rank (equal |τ|: lower column first; n = 1: p = density), rescale survivors by
1/p_i, then TIES elect + disjoint mean (+1 on an exact zero sum); θ = θ₀ + λ τ_m.

density .5, ε .25, rows of n = 3: p = .25, .5, .75 for ranks 1, 2, 3; each |τ| below is p times
a small number, so τ/p is exact. Uniforms (rng.uniform, tests/test_methods_dare.py checks them):

    tensor "w" [2, 3], seed 0: t = 0: [[.2832 .5242 .9420], [.0301 .0658 .3616]]
                               t = 1: [[.8124 .4860 .0992], [.6070 .8481 .3454]]
                               t = 2: [[.7250 .6054 .1873], [.9984 .6966 .5922]]
                       seed 1: t = 0: [[.5166 .0202 .9724], ...]
                               t = 1: [[.9219 .3459 .2787], ...]
    tensor "v" [2, 1], seed 0: t = 0: [.6478 .6962]   t = 1: [.0316 .3076]   t = 2: [.7936 .0765]
"""

import torch

from tests.cases import Case

_W = [
    torch.tensor([[0.75, -0.75, 0.25], [-3.0, 0.5, 1.5]]),
    torch.tensor([[2.0, 1.0, -0.5], [1.5, -1.0, 0.25]]),
    torch.tensor([[-1.125, 0.5, 0.25], [0.5, -0.25, 0.75]]),
]
_V = [torch.tensor([[1.0], [2.0]]), torch.tensor([[-1.0], [0.5]]), torch.tensor([[3.0], [-1.0]])]

# seed 0, "w" (rank: p, u → kept?, τ/p):
#   τ1 row 0 [.75 −.75 .25]: col 2 r1 .25 .9420 ✗; col 0 r2 (ties with col 1, lower column first)
#          .5 .2832 ✓ 1.5; col 1 r3 .75 .5242 ✓ −1                        → τ̃1 = [1.5 −1 0]
#      row 1 [−3 .5 1.5]: col 1 r1 .25 .0658 ✓ 2; col 2 r2 .5 .3616 ✓ 3; col 0 r3 .75 .0301 ✓ −4
#                                                                          → τ̃1 = [−4 2 3]
#   τ2 row 0 [2 1 −.5]: col 2 r1 .25 .0992 ✓ −2; col 1 r2 .5 .4860 ✓ 2; col 0 r3 .75 .8124 ✗
#                                                                          → τ̃2 = [0 2 −2]
#      row 1 [1.5 −1 .25]: col 2 r1 .3454 ✗; col 1 r2 .8481 ✗; col 0 r3 .75 .6070 ✓ 2 → [2 0 0]
#   τ3 row 0 [−1.125 .5 .25]: col 2 r1 .25 .1873 ✓ 1; col 1 r2 .5 .6054 ✗; col 0 r3 .75 .7250 ✓
#          −1.5                                                            → τ̃3 = [−1.5 0 1]
#      row 1 [.5 −.25 .75]: col 1 r1 .6966 ✗; col 0 r2 .9984 ✗; col 2 r3 .75 .5922 ✓ 1 → [0 0 1]
#   sums row 0 [0 1 −1] → elected [+ + −] (the 0 elects +) → means [1.5 2 −2]
#        row 1 [−2 2 4] → elected [− + +] → means [−4 2 (3 + 1)/2 = 2]
#   (had the tie at row 0 ranked col 1 first, τ̃1 row 0 would be [1 0 0] and τ_m[0, 0] = −1.5)
_W_MEAN = torch.tensor([[1.5, 2.0, -2.0], [-4.0, 2.0, 2.0]])
# seed 0, "v": rows of n = 1, p = density = .5: τ̃1 = [0 0] (u .6478, .6962), τ̃2 = [−2 1],
#   τ̃3 = [0 −2]; sums [−2 −1] → elected [− −] → means [−2 −2]
_V_MEAN = torch.tensor([[-2.0], [-2.0]])

# seed 1, λ = 2, weights 1 and 3, "w" = row 0 of the above with the first two experts:
#   τ1 [.75 −.75 .25]: col 2 r1 .25 .9724 ✗; col 0 r2 .5 .5166 ✗; col 1 r3 .75 .0202 ✓ −1
#                                                                          → [0 −1 0]
#   τ2 [2 1 −.5]: col 2 r1 .25 .2787 ✗; col 1 r2 .5 .3459 ✓ 2; col 0 r3 .75 .9219 ✗ → [0 2 0]
#   weighted sums [0 5 0] → col 1: 3 · 2 / 3 = 2, the others 0 → θ = 1 + 2 · [0 2 0]
_SEED1 = 1 + 2 * torch.tensor([[0.0, 2.0, 0.0]])

CASES = [
    Case(id="ranks-ties-and-one-column-rows", params={"density": 0.5, "epsilon": 0.25},
         base={"w": torch.ones(2, 3), "v": torch.zeros(2, 1)},
         experts=[{"w": 1 + w, "v": v} for w, v in zip(_W, _V)],
         expected={"w": 1 + _W_MEAN, "v": _V_MEAN}),
    Case(id="seed-1-scale-2-weights", params={"density": 0.5, "epsilon": 0.25, "seed": 1, "scale": 2.0},
         base={"w": torch.ones(1, 3)}, experts=[{"w": 1 + w[:1]} for w in _W[:2]],
         weights=[1.0, 3.0], expected={"w": _SEED1}),
]
