"""breadcrumbs: zero each expert's top γ fraction of |τ| and everything below the top (γ + β)
fraction, per row or per tensor (METHODS.md "Breadcrumbs exactly"), then task arithmetic.

Both experts' task vectors tie a lot: the cuts fall inside groups of equal |τ| that span rows,
so "ties at a cut keep the lower flat index" decides which entries survive (the suite runs
every case whole and in 1-row blocks)."""

import torch

from tests.cases import Case, one_tensor

# τ1 flat (index: |τ|):  0:3  1:2  2:1  3:.5 | 4:2  5:1  6:2  7:1
# stable descending order by |τ|, then index:  0, 1, 4, 6, 2, 5, 7, 3  (ranks 0..7)
_TAU1 = torch.tensor([[3.0, -2.0, 1.0, 0.5], [2.0, -1.0, 2.0, -1.0]])
# τ2: every |τ| equal, so the ranks are the flat indices (per row: the column indices)
_TAU2 = torch.full((2, 4), 0.5)
_BASE, _EXPERTS = one_tensor("w", torch.ones(2, 4), [_TAU1, _TAU2])

# scope tensor, γ = .25, β = .5, n = 8: a = 2, b = int(.75·8) = 6 → keep ranks 2..5.
#   τ1 keeps flat 4, 6, 2, 5: [[0, 0, 1, 0], [2, −1, 2, 0]]. The cut at a splits the |τ| = 2 ties
#   (flat 1 dropped, 4 and 6 kept), the cut at b the |τ| = 1 ties (2 and 5 kept, 7 dropped).
#   τ2 keeps flat 2..5: [[0, 0, .5, .5], [.5, .5, 0, 0]]
_TENSOR = torch.tensor([[0.0, 0.0, 1.5, 0.5], [2.5, -0.5, 2.0, 0.0]])
# scope row, γ = .25, β = .5, n = 4: a = 1, b = 3 → keep ranks 1, 2 of each row.
#   τ1 row 0 order 0, 1, 2, 3 → keep cols 1, 2: [0, −2, 1, 0];
#      row 1 |τ| = 2 1 2 1, order 0, 2, 1, 3 → keep cols 2, 1: [0, −1, 2, 0]
#   τ2 keeps cols 1, 2 of each row: [[0, .5, .5, 0], [0, .5, .5, 0]]
_ROW1 = torch.tensor([[0.0, -2.0, 1.0, 0.0], [0.0, -1.0, 2.0, 0.0]])
_ROW2 = torch.tensor([[0.0, 0.5, 0.5, 0.0], [0.0, 0.5, 0.5, 0.0]])

# One 1-D tensor (one row) of n = 100 with the defaults: a = int(.01·100) = 1,
# b = int(.91·100) = 91 → keep ranks 1..90. τ1 = 1..100 ranks value v at 100 − v, so it keeps
# 10..99 (the outlier 100 and the nine smallest 1..9 are zeroed); τ2 = 0.
_LINE = torch.arange(1.0, 101.0)
_LINE_BASE, _LINE_EXPERTS = one_tensor("v", torch.zeros(100), [_LINE, torch.zeros(100)])

CASES = [
    # θ = 1 + τ̃1 + τ̃2
    Case(id="tensor-scope-ties-at-both-cuts", params={"density": 0.5, "gamma": 0.25, "scope": "tensor"},
         base=_BASE, experts=_EXPERTS, expected={"w": 1 + _TENSOR}),
    # θ = 1 + 2·(τ̃1 + τ̃2) = 1 + 2·[[0, −1.5, 1.5, 0], [0, −.5, 2.5, 0]]
    Case(id="row-scope-scale", params={"density": 0.5, "gamma": 0.25, "scale": 2.0},
         base=_BASE, experts=_EXPERTS,
         expected={"w": torch.tensor([[1.0, -2.0, 4.0, 1.0], [1.0, 0.0, 6.0, 1.0]])}),
    # weights 2, −1: 2·τ̃1 − τ̃2 = [[0, −4.5, 1.5, 0], [0, −2.5, 3.5, 0]]
    Case(id="row-scope-weights", params={"density": 0.5, "gamma": 0.25}, base=_BASE,
         experts=_EXPERTS, weights=[2.0, -1.0],
         expected={"w": torch.tensor([[1.0, -3.5, 2.5, 1.0], [1.0, -1.5, 4.5, 1.0]])}),
    Case(id="defaults-1d", params={}, base=_LINE_BASE, experts=_LINE_EXPERTS,
         expected={"v": torch.where((_LINE >= 10) & (_LINE <= 99), _LINE, 0.0)}),
]
