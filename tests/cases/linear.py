"""linear: Σ w_t θ_t / Σ w_t, or Σ w_t θ_t with normalize false."""

import torch

from tests.cases import Case

_BASE = {"w": torch.zeros(2)}
_EXPERTS = [{"w": torch.tensor([1.0, 2.0])}, {"w": torch.tensor([3.0, 4.0])}]

CASES = [
    # (1·[1, 2] + 3·[3, 4]) / 4 = [2.5, 3.5]
    Case(id="weighted-mean", params={}, base=_BASE, experts=_EXPERTS, weights=[1.0, 3.0],
         expected={"w": torch.tensor([2.5, 3.5])}),
    # 1·[1, 2] + 3·[3, 4] = [10, 14]
    Case(id="no-normalize", params={"normalize": False}, base=_BASE, experts=_EXPERTS,
         weights=[1.0, 3.0], expected={"w": torch.tensor([10.0, 14.0])}),
]
