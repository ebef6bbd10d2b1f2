"""model_stock: per tensor, c = mean pairwise cos(τ_i, τ_j), t = T c / ((T − 1) c + 1),
θ = t · mean θ_t + (1 − t) θ₀ (t and 1 − t rounded to fp32). Vectors are chosen so that every
cos, t and the mean are exact."""

import torch

from tests.cases import Case, one_tensor

_ONES = torch.ones(3)

CASES = [
    # T = 2, τ = [2, 1, 2], [0, 3, 0]: ⟨τ1, τ2⟩ = 3, ‖τ1‖ = ‖τ2‖ = 3 → c = 1/3,
    # t = 2·(1/3) / (1/3 + 1) = 1/2. mean θ = 1 + [1, 2, 1] = [2, 3, 2];
    # θ = ½·[2, 3, 2] + ½·[1, 1, 1] = [1.5, 2, 1.5]
    Case(id="two-experts-cos-third", params={},
         **dict(zip(("base", "experts"), one_tensor("w", _ONES, [torch.tensor([2.0, 1.0, 2.0]),
                                                                  torch.tensor([0.0, 3.0, 0.0])]))),
         expected={"w": torch.tensor([1.5, 2.0, 1.5])}),
    # T = 3 on a [2, 2] tensor (cos over the whole tensor): τ = [[2, 2], [2, 2]], [[2, 2], [2, −2]],
    # [[2, 2], [−1, 0]]; norms 4, 4, 3; dots 8, 6, 6 → every cos = 1/2, c = 1/2,
    # t = 3·½ / (2·½ + 1) = 3/4. Σ τ = [[6, 6], [3, 0]] → mean θ = θ₀ + [[2, 2], [1, 0]];
    # θ₀ = [[1, −1], [0, 4]]: mean θ = [[3, 1], [1, 4]],
    # θ = ¾·[[3, 1], [1, 4]] + ¼·[[1, −1], [0, 4]] = [[2.5, 0.5], [0.75, 4]]
    Case(id="three-experts-cos-half", params={},
         **dict(zip(("base", "experts"), one_tensor("w", torch.tensor([[1.0, -1.0], [0.0, 4.0]]), [
             torch.tensor([[2.0, 2.0], [2.0, 2.0]]),
             torch.tensor([[2.0, 2.0], [2.0, -2.0]]),
             torch.tensor([[2.0, 2.0], [-1.0, 0.0]])]))),
         expected={"w": torch.tensor([[2.5, 0.5], [0.75, 4.0]])}),
    # A zero task vector has no angle: its pair's cos counts as 0 → c = 0 → t = 0 → θ₀
    # (the mean θ would be 1 + [1, 0.5, 1])
    Case(id="zero-task-vector-is-cos-0", params={},
         **dict(zip(("base", "experts"), one_tensor("w", _ONES, [torch.tensor([2.0, 1.0, 2.0]),
                                                                  torch.zeros(3)]))),
         expected={"w": _ONES}),
    # c < 0 extrapolates away from the mean, as the formula says: τ = [2, 1, 2], [0, −3, 0] →
    # c = −3/9 = −1/3, t = 2·(−1/3) / (−1/3 + 1) = −1 → θ = −mean θ + 2 θ₀;
    # mean θ = 1 + [1, −1, 1] = [2, 0, 2] → θ = [−2, 0, −2] + [2, 2, 2] = [0, 2, 0]
    Case(id="negative-cos-extrapolates", params={},
         **dict(zip(("base", "experts"), one_tensor("w", _ONES, [torch.tensor([2.0, 1.0, 2.0]),
                                                                  torch.tensor([0.0, -3.0, 0.0])]))),
         expected={"w": torch.tensor([0.0, 2.0, 0.0])}),
    # τ2 = −2 τ1: cos = −18 / (3·6) = −1 → (T − 1) c + 1 = 0, t has no value → t = 0 → θ₀
    # (the mean θ would be 1 + [−1, −0.5, −1])
    Case(id="cancelling-task-vectors-give-base", params={},
         **dict(zip(("base", "experts"), one_tensor("w", _ONES, [torch.tensor([2.0, 1.0, 2.0]),
                                                                  torch.tensor([-4.0, -2.0, -4.0])]))),
         expected={"w": _ONES}),
]
