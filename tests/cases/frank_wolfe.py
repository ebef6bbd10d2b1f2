"""frank_wolfe, data-free objective: f(θ) = 1/(2|K|) Σ_{k∈K} ‖θ − θ_k‖², θ = θ₀ + Σ_j c_j τ_j.

∇f = Σ_j d_j τ_j with d = c − mean_{k∈K} e_k; inner score s_j = (T d)_j, T the Gram of the task
vectors; γ_t = step · 2/(t + 2), η_t = scale · γ_t; c ← (1 − η) c + η e_pick.

Pool (tensor "w", θ₀ = [1, 0]): τ1 = [2, 0], τ2 = [0, 2], τ3 = [−1, 1]
(θ1 = [3, 0], θ2 = [1, 2], θ3 = [0, 1]);  T = [[4, 0, −2], [0, 4, 2], [−2, 2, 2]].
With step 0.75: γ0 = 0.75, γ1 = 0.5.
"""

import torch

from tests.cases import Case, one_tensor

_BASE, _EXPERTS = one_tensor("w", torch.tensor([1.0, 0.0]),
                             [torch.tensor([2.0, 0.0]), torch.tensor([0.0, 2.0]), torch.tensor([-1.0, 1.0])])


def _ta(c):
    """θ₀ + Σ_j c_j τ_j in the merge pass's fp32 order (coefficients worked out by hand)."""
    taus = [e["w"] - _BASE["w"] for e in _EXPERTS]
    acc = taus[0] * c[0]
    for t, cj in zip(taus[1:], c[1:]):
        acc += t if cj == 1.0 else t * cj
    return {"w": _BASE["w"] + acc}


_FAST = {"step": 0.75, "scale": 1.0, "init": "base"}

# Tensor "a": θ₀ = [1, 1], τ1 = [2, 0], τ2 = [0, 0]; tensor "b": θ₀ = [1], τ1 = [0], τ2 = [2].
# Targets: both experts, so ∇_g = c_g·τ_g − (τ1 + τ2)/2; at c = 0: ∇_a = [−1, 0], ∇_b = [−1].
# inner_a = [−2, 0] (a picks τ1), inner_b = [0, −2] (b picks τ2); summed [−2, −2]: a tie, the
# model picks the first, τ1. One iteration, η = 0.75:
#   tensor: a = [1, 1] + 0.75·[2, 0] = [2.5, 1], b = 1 + 0.75·2 = 2.5
#   model:  a = [2.5, 1], b = 1 + 0.75·0 = 1
_TWO_BASE = {"a": torch.tensor([1.0, 1.0]), "b": torch.tensor([1.0])}
_TWO_EXPERTS = [{"a": torch.tensor([3.0, 1.0]), "b": torch.tensor([1.0])},
                {"a": torch.tensor([1.0, 1.0]), "b": torch.tensor([3.0])}]

# local_merge ties: θ ← θ + η · (x ⊙ [|x| ≥ thr]), x = θ_pick − θ, thr the (n − int(density·n))-th
# smallest |x| over the model. Pool (tensor "v", θ₀ = 0): θ1 = [4, 1, −2, .5, 3], θ2 = [0, 2, 0, −1, 0];
# τ1·τ1 = 30.25, τ1·τ2 = 1.5, τ2·τ2 = 5.
_VB, _VE = one_tensor("v", torch.zeros(5), [torch.tensor([4.0, 1.0, -2.0, 0.5, 3.0]),
                                             torch.tensor([0.0, 2.0, 0.0, -1.0, 0.0])])

CASES = [
    # init base, targets [θ1], step .75, scale 1: ∇f = −τ1, inner = [−30.25, −1.5] → θ1; x = θ1;
    # density .6: m = 3, thr = 2nd smallest |x| = 1 → keep [4, 1, −2, 0, 3]; η = .75
    # θ = [3, .75, −1.5, 0, 2.25]  (task arithmetic: .375 at entry 3; density .3: thr 3 → [3, 0, 0, 0, 2.25])
    Case(id="ties-local-merge", params={**_FAST, "iterations": 1, "local_merge": "ties", "density": 0.6,
                                        "objective": {"kind": "data_free", "targets": [0]}},
         base=_VB, experts=_VE, expected={"v": torch.tensor([3.0, 0.75, -1.5, 0.0, 2.25])}),
    # init merge (TIES of the pool, model scope, density .6, scale .5): m = 3 of 5, thr_t = 2nd
    # smallest |τ_t|: τ1 → 1 (keeps [4, 1, −2, 0, 3]), τ2 → 0 (keeps all); signs of the sum
    # [4, 3, −2, −1, 3]; disjoint mean [4, 1.5, −2, −1, 3]; θ^0 = .5 · that = [2, .75, −1, −.5, 1.5].
    # targets [θ2]: ∇f = θ^0 − τ2 = [2, −1.25, −1, .5, 1.5]; inner = [13.5, −3] → θ2; step 1: η = .5;
    # x = θ2 − θ^0 = [−2, 1.25, 1, −.5, −1.5], thr = 2nd smallest = 1 → keep all but −.5;
    # θ^1 = θ^0 + .5 · [−2, 1.25, 1, 0, −1.5] = [1, 1.375, −.5, −.5, .75]
    Case(id="ties-init-merge", params={"step": 1.0, "scale": 0.5, "iterations": 1, "local_merge": "ties",
                                       "density": 0.6, "objective": {"kind": "data_free", "targets": [1]}},
         base=_VB, experts=_VE, expected={"v": torch.tensor([1.0, 1.375, -0.5, -0.5, 0.75])}),

    # targets [τ2]: t=0 c=0, d = −e2, T d = [0, −4, −2] → τ2; c = [0, .75, 0]
    #               t=1 d = [0, −.25, 0], T d = [0, −1, −.5] → τ2; c = .5·c + .5 e2 = [0, .875, 0]
    # θ = [1, 0] + .875·[0, 2] = [1, 1.75]
    Case(id="select-target", params={**_FAST, "iterations": 2,
                                     "objective": {"kind": "data_free", "targets": [1]}},
         base=_BASE, experts=_EXPERTS, expected=_ta([0.0, 0.875, 0.0])),
    # cosine of ∇f with the candidates' weights, targets [τ3]: ∇ = −τ3 = [1, −1];
    # inner T d = [2, −2, −2] would pick τ2 (first of a tie); cosines with θ1..θ3:
    # 3/(√2·3) > 0, −1/(√2·√5) ≈ −.316, −1/(√2·1) ≈ −.707 → τ3; c = [0, 0, .75]
    # θ = [1, 0] + .75·[−1, 1] = [.25, .75]
    Case(id="cosine", params={**_FAST, "iterations": 1, "score": "cosine",
                              "objective": {"kind": "data_free", "targets": [2]}},
         base=_BASE, experts=_EXPERTS, expected=_ta([0.0, 0.0, 0.75])),
    # the same with the inner score: τ2 (above), c = [0, .75, 0]
    Case(id="inner-same-pool", params={**_FAST, "iterations": 1,
                                       "objective": {"kind": "data_free", "targets": [2]}},
         base=_BASE, experts=_EXPERTS, expected=_ta([0.0, 0.75, 0.0])),
    # the authors' start (init: merge): c0 = scale·1 = .5 each; step .5, scale .5:
    # t=0 targets [τ2]: d = [.5, −.5, .5], T d = [2 − 1, −2 + 1, −1 − 1 + 1] = [1, −1, −1] → τ2
    # (first of the tie); γ0 = .5, η = .25: c = .75·.5 + .25 e2 = [.375, .625, .375]
    # θ = [1, 0] + .375·[2, 0] + .625·[0, 2] + .375·[−1, 1] = [1.375, 1.625]
    Case(id="init-merge", params={"step": 0.5, "scale": 0.5, "iterations": 1,
                                  "objective": {"kind": "data_free", "targets": [1]}},
         base=_BASE, experts=_EXPERTS, expected=_ta([0.375, 0.625, 0.375])),
    Case(id="granularity-tensor", params={**_FAST, "iterations": 1, "granularity": "tensor"},
         base=_TWO_BASE, experts=_TWO_EXPERTS,
         expected={"a": torch.tensor([2.5, 1.0]), "b": torch.tensor([2.5])}),
    Case(id="granularity-model", params={**_FAST, "iterations": 1},
         base=_TWO_BASE, experts=_TWO_EXPERTS,
         expected={"a": torch.tensor([2.5, 1.0]), "b": torch.tensor([1.0])}),
]
