"""ties: trim → elect → disjoint mean (METHODS.md "TIES exactly"); the worked values are the
ones in tests/test_methods.py, where each step is spelt out."""

import torch

from tests.cases import Case, one_tensor

_TAU = [
    torch.tensor([[3.0, -1.0, 2.0], [0.5, -4.0, 1.0]]),
    torch.tensor([[-2.0, 2.0, 2.0], [1.0, -1.0, -3.0]]),
    torch.tensor([[1.0, 1.0, -4.0], [2.0, 2.0, 1.0]]),
]
_BASE, _EXPERTS = one_tensor("w", torch.ones(2, 3), _TAU)
_NEG_BASE, _NEG_EXPERTS = one_tensor("w", torch.ones(2, 3), [-t for t in _TAU])

CASES = [
    # density .2 over 6 entries: m = 1 → each expert keeps entries ≥ its 5th smallest |τ|
    # (3 | 2 | 2, with ties kept): τ̂ = [[3,0,0],[0,−4,0]], [[0,2,2],[0,0,−3]], [[0,0,−4],[2,2,0]];
    # sums [[3,2,−2],[2,−2,−3]] → means [[3,2,−4],[2,−4,−3]]
    Case(id="model-density-0.2", params={}, base=_BASE, experts=_EXPERTS,
         expected={"w": 1 + torch.tensor([[3.0, 2.0, -4.0], [2.0, -4.0, -3.0]])}),
    Case(id="model-density-0.5", params={"density": 0.5}, base=_BASE, experts=_EXPERTS,
         expected={"w": 1 + torch.tensor([[2.0, 1.5, 2.0], [2.0, -4.0, -3.0]])}),
    Case(id="model-majority-minus", params={"density": 0.5}, base=_NEG_BASE, experts=_NEG_EXPERTS,
         expected={"w": 1 - torch.tensor([[2.0, 1.5, 2.0], [2.0, -4.0, -3.0]])}),
    Case(id="tensor-scope-scale", params={"density": 0.5, "scope": "tensor", "scale": 0.5},
         base=_BASE, experts=_EXPERTS,
         expected={"w": 1 + 0.5 * torch.tensor([[3.0, 2.0, 2.0], [2.0, -4.0, -3.0]])}),
    # weights 3, 1 on τ = 1, −2: elected + (3 − 2 > 0); mean of agreeing = 3·1/3 = 1
    Case(id="weights", params={"density": 1.0}, base={"w": torch.zeros(1, 1)},
         experts=[{"w": torch.tensor([[1.0]])}, {"w": torch.tensor([[-2.0]])}], weights=[3.0, 1.0],
         expected={"w": torch.tensor([[1.0]])}),
]
