"""consensus (TALL masks): τ_MTL = Σ τ_t; mask_t = |τ_t| > λ |τ_MTL − τ_t|; keep entries where
at least k masks hold; θ₀ + α (keep ⊙ τ_MTL). Weights scale each τ_t first."""

import torch

from tests.cases import Case, one_tensor

# Three experts, four entries (flat order), base 1:
#   entry   τ1  τ2  τ3  τ_MTL   |τ_MTL − τ_t|
#   0        1   1   1    3      2  2  2
#   1        2   2   0    4      2  2  4
#   2        4  −1   0    3      1  4  3
#   3        0   0   0    0      0  0  0
_TAUS = [torch.tensor([[1.0, 2.0], [4.0, 0.0]]),
         torch.tensor([[1.0, 2.0], [-1.0, 0.0]]),
         torch.tensor([[1.0, 0.0], [0.0, 0.0]])]
_BASE, _EXPERTS = one_tensor("w", torch.ones(2, 2), _TAUS)

CASES = [
    # λ = .6: entry 0: 1 > 1.2 no ×3 → 0 masks; entry 1: 2 > 1.2, 2 > 1.2, 0 > 2.4 → 2;
    # entry 2: 4 > .6, 1 > 2.4 no, 0 > 1.8 no → 1; entry 3: 0 > 0 no → 0.
    # k = 2 keeps entry 1 only: θ = 1 + [[0, 4], [0, 0]]
    Case(id="defaults", params={}, base=_BASE, experts=_EXPERTS,
         expected={"w": torch.tensor([[1.0, 5.0], [1.0, 1.0]])}),
    # λ = .25: entry 0: 1 > .5 ×3 → 3; entry 1: 2 > .5, 2 > .5, 0 > 1 no → 2;
    # entry 2: 4 > .25, 1 > 1 no (strict), 0 > .75 no → 1. k = 2 keeps entries 0, 1:
    # θ = 1 + [[3, 4], [0, 0]]
    Case(id="lambda-0.25", params={"tall_lambda": 0.25}, base=_BASE, experts=_EXPERTS,
         expected={"w": torch.tensor([[4.0, 5.0], [1.0, 1.0]])}),
    # λ = .6 counts 0, 2, 1, 0; k = 1 keeps entries 1, 2: θ = 1 + .5·[[0, 4], [3, 0]]
    Case(id="min-agree-1-scale", params={"min_agree": 1, "scale": 0.5}, base=_BASE, experts=_EXPERTS,
         expected={"w": torch.tensor([[1.0, 3.0], [2.5, 1.0]])}),
    # λ = .25 counts 3, 2, 1, 0; k = 3 keeps entry 0 only: θ = 1 + [[3, 0], [0, 0]]
    Case(id="min-agree-3", params={"min_agree": 3, "tall_lambda": 0.25}, base=_BASE, experts=_EXPERTS,
         expected={"w": torch.tensor([[4.0, 1.0], [1.0, 1.0]])}),
    # weights .5, 1, 1: τ1 becomes [[.5, 1], [2, 0]].
    #   entry 0: (.5, 1, 1), τ_MTL 2.5: .5 > 1.2 no, 1 > .9, 1 > .9 → 2 → kept (2.5)
    #   entry 1: (1, 2, 0), τ_MTL 3: 1 > 1.2 no, 2 > .6, 0 > 1.8 no → 1 → dropped
    #   entry 2: (2, −1, 0), τ_MTL 1: 2 > 1.2, 1 > 1.2 no, 0 > .6 no → 1 → dropped
    # θ = 1 + [[2.5, 0], [0, 0]]
    Case(id="weights", params={}, base=_BASE, experts=_EXPERTS, weights=[0.5, 1.0, 1.0],
         expected={"w": torch.tensor([[3.5, 1.0], [1.0, 1.0]])}),
]
