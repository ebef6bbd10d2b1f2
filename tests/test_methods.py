"""Hand-computed values of linear, task_arithmetic and TIES (both scopes), checked through the
same stats → reduce → merge protocol the engine runs, whole and in row blocks; and TIES
against a direct transcription of the authors' flatten-the-model code on data full of ties."""

from __future__ import annotations

import pytest
import torch

from distmerge.errors import ConfigError
from distmerge.methods import build
from tests.harness import merge_tensors

# τ of three experts on one [2, 3] tensor: entries tie at the thresholds, and column 2 of
# row 0 cancels exactly (2 + 2 − 4 = 0) after trimming.
TAU = [
    torch.tensor([[3.0, -1.0, 2.0], [0.5, -4.0, 1.0]]),
    torch.tensor([[-2.0, 2.0, 2.0], [1.0, -1.0, -3.0]]),
    torch.tensor([[1.0, 1.0, -4.0], [2.0, 2.0, 1.0]]),
]
BASE = torch.ones(2, 3)


def _models(taus, base=BASE, name="w"):
    return {name: base}, [{name: base + t} for t in taus]


def _merge(name, params, taus=TAU, weights=None, rows=None, base=BASE):
    b, e = _models(taus, base)
    return merge_tensors(build(name, params), b, e, weights, rows_per_block=rows)["w"]


@pytest.mark.parametrize("rows", [None, 1])
def test_ties_tensor_scope_hand_computed(rows):
    # m = int(0.5·6) = 3 → threshold = 3rd largest |τ_t|: 2, 2, 2 (τ2 keeps 4 entries: ties
    # at the threshold are kept). Elected sums [[1, 2, 0], [2, −2, −3]]; the exact zero
    # elects +1 in tensor scope, so the disjoint mean there is (2 + 2) / 2.
    got = _merge("ties", {"density": 0.5, "scope": "tensor", "scale": 0.5}, rows=rows)
    tau_m = torch.tensor([[3.0, 2.0, 2.0], [2.0, -4.0, -3.0]])
    assert torch.equal(got, BASE + 0.5 * tau_m)


@pytest.mark.parametrize("rows", [None, 1])
def test_ties_model_scope_hand_computed(rows):
    # threshold = (n − m)-th = 3rd smallest |τ_t|: 1, 2, 1. Elected sums
    # [[2, 2, 0], [2, −2, −1]]; the model-wide sum of elected signs is +1, so the zero
    # elects + and the mean there is (2 + 2) / 2.
    got = _merge("ties", {"density": 0.5, "scope": "model"}, rows=rows)
    tau_m = torch.tensor([[2.0, 1.5, 2.0], [2.0, -4.0, -3.0]])
    assert torch.equal(got, BASE + tau_m)


def test_ties_model_scope_majority_minus_one_decides_cancellations():
    # Negated task vectors: the model-wide sign sum is −1, so the cancelled entry elects −
    # and keeps the two −2 (with +1 it would have kept the +4).
    got = _merge("ties", {"density": 0.5, "scope": "model"}, taus=[-t for t in TAU])
    tau_m = -torch.tensor([[2.0, 1.5, 2.0], [2.0, -4.0, -3.0]])
    assert torch.equal(got, BASE + tau_m)


def test_ties_model_scope_threshold_spans_tensors():
    # A second tensor with large τ moves expert 1's model-wide threshold: n = 10, m = 5,
    # 5th smallest of {.5, 1, 1, 2, 3, 4, 10, 10, 10, 10} = 3, so its 2 and 1s are trimmed.
    base = {"a": BASE, "b": torch.zeros(4)}
    taus_b = [torch.full((4,), 10.0), torch.zeros(4), torch.zeros(4)]
    experts = [{"a": BASE + ta, "b": tb} for ta, tb in zip(TAU, taus_b)]
    got = merge_tensors(build("ties", {"density": 0.5, "scope": "model"}), base, experts)
    per_tensor = merge_tensors(build("ties", {"density": 0.5, "scope": "tensor"}), base, experts)
    assert not torch.equal(got["a"], per_tensor["a"])
    # expert 1 keeps only 3 and −4 in "a"; expert 2 (10 entries, 6 nonzero → threshold 0)
    # and expert 3 keep what they kept before.
    assert got["a"][0, 0] == 1 + (3 + 1) / 2          # τ̂ = 3, −2, 1 → elect + → {3, 1}
    assert got["a"][0, 1] == 1 + (2 + 1) / 2          # expert 1's −1 trimmed
    assert torch.equal(got["b"], torch.full((4,), 10.0))


def test_ties_density_one_agreeing_signs_is_mean_of_task_vectors():
    taus = [torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([[3.0, 2.0, 1.0]])]
    base = torch.zeros(1, 3)
    got = _merge("ties", {"density": 1.0}, taus=taus, base=base)
    assert torch.equal(got, (taus[0] + taus[1]) / 2)


def test_ties_weights_enter_election_and_mean():
    taus = [torch.tensor([[1.0]]), torch.tensor([[-2.0]])]
    base = torch.zeros(1, 1)
    # weights 3 and 1: elected sum 3·1 − 2 = 1 → +; mean of agreeing = 3·1 / 3 = 1
    assert _merge("ties", {"density": 1.0}, taus=taus, base=base, weights=[3.0, 1.0]).item() == 1.0
    # equal weights: 1 − 2 < 0 → −; mean = −2
    assert _merge("ties", {"density": 1.0}, taus=taus, base=base).item() == -2.0


def test_linear_weights_and_normalize():
    base = {"w": torch.zeros(2)}
    experts = [{"w": torch.tensor([1.0, 2.0])}, {"w": torch.tensor([3.0, 4.0])}]
    got = merge_tensors(build("linear", {}), base, experts, [1.0, 3.0])["w"]
    assert torch.equal(got, torch.tensor([2.5, 3.5]))
    raw = merge_tensors(build("linear", {"normalize": False}), base, experts, [1.0, 3.0])["w"]
    assert torch.equal(raw, torch.tensor([10.0, 14.0]))


def test_task_arithmetic_scale_and_weights():
    base = {"w": torch.ones(2)}
    experts = [{"w": torch.tensor([2.0, -1.0])}, {"w": torch.tensor([1.5, 5.0])}]
    got = merge_tensors(build("task_arithmetic", {"scale": 2.0}), base, experts, [1.0, 0.5])["w"]
    assert torch.equal(got, torch.tensor([3.5, 1.0]))     # 1 + 2·(1 + .25), 1 + 2·(−2 + 2)


def test_task_arithmetic_one_expert_scale_one_returns_expert():
    g = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(5, 7, generator=g).bfloat16().float()}
    expert = {"w": torch.randn(5, 7, generator=g).bfloat16().float()}
    got = merge_tensors(build("task_arithmetic", {}), base, [expert, base])["w"]
    assert torch.equal(got.bfloat16(), expert["w"].bfloat16())


# -- TIES against the authors' algorithm on data full of ties -------------------------------

def ties_reference(base, experts, *, density, scope, weights, scale=1.0):
    """A direct transcription of METHODS.md: flatten (the whole model, or each tensor), trim
    with kthvalue / topk, elect, disjoint mean."""
    names = sorted(base)
    T = len(experts)

    def trim(flat):                                        # flat: [n]
        n = flat.numel()
        m = int(density * n)
        if scope == "model":
            if m == n:
                return flat
            thr = flat.abs().kthvalue(n - m).values
        else:
            thr = flat.abs().topk(max(1, m)).values[-1]
        return torch.where(flat.abs() >= thr, flat, 0.0)

    def elect_and_mean(trimmed, majority):                 # trimmed: [T, n]
        acc = trimmed[0] * weights[0]
        for t in range(1, T):
            acc += trimmed[t] * weights[t]
        s = torch.sign(acc)
        s[s == 0] = majority
        num = torch.zeros_like(acc)
        den = torch.zeros_like(acc)
        for t in range(T):
            agree = (trimmed[t] != 0) & (torch.sign(trimmed[t]) == s)
            num += torch.where(agree, trimmed[t] * weights[t], 0.0)
            den += agree * weights[t]
        return torch.where(den != 0, num / torch.where(den != 0, den, 1.0), 0.0)

    taus = {n: torch.stack([e[n].float() - base[n].float() for e in experts]) for n in names}
    out = {}
    if scope == "model":
        flat = torch.cat([taus[n].reshape(T, -1) for n in names], dim=1)
        trimmed = torch.stack([trim(flat[t]) for t in range(T)])
        acc = trimmed[0] * weights[0]
        for t in range(1, T):
            acc += trimmed[t] * weights[t]
        majority = 1.0 if torch.sign(acc).sum() >= 0 else -1.0
        merged = elect_and_mean(trimmed, majority)
        at = 0
        for n in names:
            k = base[n].numel()
            out[n] = base[n].float() + scale * merged[at:at + k].reshape(base[n].shape)
            at += k
    else:
        for n in names:
            trimmed = torch.stack([trim(taus[n][t].reshape(-1)) for t in range(T)])
            out[n] = base[n].float() + scale * elect_and_mean(trimmed, 1.0).reshape(base[n].shape)
    return out


def _tie_heavy_models(seed, T=4):
    """bf16 models whose task vectors take 7 values: many entries sit exactly at each
    threshold and many elected sums cancel to exactly 0."""
    g = torch.Generator().manual_seed(seed)
    shapes = {"a.weight": (13, 7), "b.weight": (5, 11), "norm": (9,)}
    base = {n: (torch.randint(-8, 8, s, generator=g) / 16).bfloat16() for n, s in shapes.items()}
    experts = [
        {n: (b.float() + torch.randint(-3, 4, b.shape, generator=g) / 64).bfloat16() for n, b in base.items()}
        for _ in range(T)
    ]
    return base, experts


@pytest.mark.parametrize("scope", ["model", "tensor"])
@pytest.mark.parametrize("density", [0.0, 0.2, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("rows", [None, 1, 4])
def test_ties_matches_reference_with_many_ties(scope, density, rows):
    base, experts = _tie_heavy_models(seed=int(density * 10) + (scope == "model"))
    weights = [1.0, 0.5, 2.0, 1.0]
    want = ties_reference(base, experts, density=density, scope=scope, weights=weights, scale=0.7)
    got = merge_tensors(build("ties", {"density": density, "scope": scope, "scale": 0.7}),
                        base, experts, weights, rows_per_block=rows)
    for n in base:
        assert torch.equal(got[n], want[n]), n


def test_tie_heavy_data_really_has_ties_and_cancellations():
    base, experts = _tie_heavy_models(seed=2)
    tau = torch.stack([e["a.weight"].float() - base["a.weight"].float() for e in experts])
    thr = tau[0].abs().reshape(-1).topk(int(0.5 * tau[0].numel())).values[-1]
    assert int((tau[0].abs() == thr).sum()) >= 5
    assert int((tau.sum(0) == 0).sum()) >= 5


def test_override_density_forms_its_own_group():
    base, experts = _tie_heavy_models(seed=3)
    plain = merge_tensors(build("ties", {"density": 0.2}), base, experts)
    over = merge_tensors(build("ties", {"density": 0.2}, [("a.*", {"density": 0.9})]), base, experts)
    assert not torch.equal(plain["a.weight"], over["a.weight"])
    # the other tensors form a model-wide group of their own: the reference on just them
    rest = [n for n in base if n != "a.weight"]
    want = ties_reference({n: base[n] for n in rest}, [{n: e[n] for n in rest} for e in experts],
                          density=0.2, scope="model", weights=[1.0] * 4)
    for n in rest:
        assert torch.equal(over[n], want[n])


@pytest.mark.parametrize("params, key", [
    ({"density": 1.5}, "method.density"),
    ({"densty": 0.5}, "method.densty"),
    ({"scope": "layer"}, "method.scope"),
    ({"scale": "big"}, "method.scale"),
])
def test_bad_parameters_name_the_key(params, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        build("ties", params)


def test_task_vectors_in_place_only_in_a_scratch_copy():
    """``task_vectors_`` gives task_vectors' values; it overwrites the experts only when the
    block says they are the caller's scratch copy (the worker's per-chunk workspace), and
    task_arithmetic and ties merge a scratch block to the same bytes as a kept one."""
    from distmerge.methods.base import Block, task_vectors, task_vectors_

    g = torch.Generator().manual_seed(3)
    base = torch.randn(4, 8, generator=g)
    experts = torch.randn(3, 4, 8, generator=g)

    def block(scratch: bool) -> Block:
        return Block(name="w", base=base.clone(), experts=experts.clone(), weights=(1.0, 0.5, 2.0),
                     row_start=0, scratch=scratch)

    kept, scratch = block(False), block(True)
    want = task_vectors(kept)
    got_kept, got_scratch = task_vectors_(kept), task_vectors_(scratch)
    assert torch.equal(got_kept, want) and torch.equal(got_scratch, want)
    assert torch.equal(kept.experts, experts)                          # untouched
    assert got_scratch.data_ptr() == scratch.experts.data_ptr()        # in place
    assert torch.equal(scratch.base, base)
    for name, params in (("task_arithmetic", {"scale": 0.7}),
                         ("ties", {"density": 0.5, "scope": "tensor"})):
        m = build(name, params).default
        ctx: dict = {}
        for r in range(m.rounds):
            ctx = m.reduce(r, m.stats(r, block(False), ctx), ctx)
        a = m.merge(block(False), ctx)
        b = m.merge(block(True), ctx)
        assert torch.equal(a.view(torch.int32), b.view(torch.int32)), name
