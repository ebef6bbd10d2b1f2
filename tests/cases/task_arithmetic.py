"""task_arithmetic: θ₀ + λ Σ w_t τ_t."""

import torch

from tests.cases import Case, one_tensor

_BASE, _EXPERTS = one_tensor("w", torch.ones(2), [torch.tensor([1.0, -2.0]), torch.tensor([0.5, 4.0])])

CASES = [
    # 1 + 1·(1 + .5) = 2.5 ; 1 + (−2 + 4) = 3
    Case(id="sum", params={}, base=_BASE, experts=_EXPERTS, expected={"w": torch.tensor([2.5, 3.0])}),
    # 1 + 2·(1·1 + .5·.5) = 3.5 ; 1 + 2·(−2 + .5·4) = 1
    Case(id="scale-and-weights", params={"scale": 2.0}, base=_BASE, experts=_EXPERTS,
         weights=[1.0, 0.5], expected={"w": torch.tensor([3.5, 1.0])}),
]
