"""DARE (dare_linear, dare_ties) and DELLA: the properties the papers state, checked
statistically on large tensors, and the counter-based generator they draw from.

- the generator: pinned to a pure-Python transcription of its formula; the same numbers
  however a range of elements is split; the uniforms the case files list;
- DARE: E[τ̃] = τ (so E[dare_linear] is task arithmetic), the drop fraction is 1 − density,
  ``l1`` keeps each expert's L1 norm per tensor; DELLA: the keep rate of each magnitude rank is
  p_i, survivors are τ/p_i, equal magnitudes rank by column;
- the same seed gives the same bytes whatever the row blocks, another seed other bytes;
- limits: density 1 is task arithmetic / TIES, ε = 0 is dare_ties, bad parameters name the key.
"""

from __future__ import annotations

import math
import zlib
from fractions import Fraction

import numpy as np
import pytest
import torch

from distmerge.errors import ConfigError
from distmerge.methods import Block, build, rng
from distmerge.methods.dare import DareLinear, DareTies, uniforms
from distmerge.reduce import bins_total, magnitude_bins
from distmerge.methods.della import Della, rank_order
from distmerge.reduce import StatsAccumulator
from tests.harness import _blocks, merge_tensors

Z = 5.0        # tolerance of the statistical checks, in standard deviations


# -- the generator --------------------------------------------------------------------------

def _fmix(h: int) -> int:
    h ^= h >> 16
    h = (h * 0x85EBCA6B) % 2**32
    h ^= h >> 13
    h = (h * 0xC2B2AE35) % 2**32
    return h ^ (h >> 16)


def uniform_reference(seed: int, expert: int, tensor: str, index: int) -> float:
    """rng.uniform's formula with Python integers, one element."""
    k = _fmix(((seed ^ 0x9E3779B9) % 2**32) ^ ((expert * 0x27D4EB2F + 0x165667B1) % 2**32))
    k = _fmix(k ^ zlib.crc32(tensor.encode("utf-8")))
    h = _fmix(_fmix(k ^ (index % 2**32)) ^ (index >> 32))
    return (h >> 8) / 2**24


@pytest.mark.parametrize("start", [0, 1000, 2**31 - 50, 2**32 - 50, 5 * 2**32 + 3, 2**40 - 20])
@pytest.mark.parametrize("seed, expert, tensor", [(0, 0, "w"), (7, 3, "model.layers.0.mlp.up_proj.weight"),
                                                   (2**32 - 1, 11, "lm_head.wéight")])
def test_uniform_is_the_formula(start, seed, expert, tensor):
    got = rng.uniform(seed=seed, expert=expert, tensor=tensor, start=start, shape=(4, 25))
    want = [uniform_reference(seed, expert, tensor, start + i) for i in range(100)]
    assert got.dtype == torch.float32
    assert got.reshape(-1).tolist() == want


def test_uniform_does_not_depend_on_how_a_range_is_split():
    start, n = 2**32 - 3000, 10_000                     # crosses a multiple of 2**32
    whole = rng.uniform(seed=5, expert=1, tensor="t", start=start, shape=(n,))
    cuts = [0, 1, 7, 2999, 3000, 3001, 6543, n]
    parts = [rng.uniform(seed=5, expert=1, tensor="t", start=start + a, shape=(b - a,))
             for a, b in zip(cuts, cuts[1:])]
    assert torch.equal(whole, torch.cat(parts))


def test_uniform_streams_are_distinct_and_uniform():
    n = 1 << 20
    u = {key: rng.uniform(seed=key[0], expert=key[1], tensor=key[2], start=0, shape=(n,))
         for key in [(0, 0, "a"), (1, 0, "a"), (0, 1, "a"), (0, 0, "b")]}
    ref = u[(0, 0, "a")]
    for key, v in u.items():
        assert 0.0 <= float(v.min()) and float(v.max()) < 1.0
        assert abs(float(v.double().mean()) - 0.5) < Z * math.sqrt(1 / 12 / n)
        if key != (0, 0, "a"):
            assert float((v == ref).double().mean()) < 1e-3, key
    # deciles hold a tenth each
    counts = torch.bincount((ref * 10).long(), minlength=10).double() / n
    assert (counts - 0.1).abs().max() < Z * math.sqrt(0.09 / n)


# The uniforms and masks the case files list in their comments.
LISTED = {
    ("w", (2, 4), 0, 0): [[.2832, .5242, .9420, .0301], [.0658, .3616, .5975, .3185]],
    ("w", (2, 4), 0, 1): [[.8124, .4860, .0992, .6070], [.8481, .3454, .4709, .2848]],
    ("w", (2, 4), 0, 2): [[.7250, .6054, .1873, .9984], [.6966, .5922, .9310, .6367]],
    ("w", (2, 4), 1, 0): [[.5166, .0202, .9724, .1419], [.6925, .1230, .8821, .8624]],
    ("w", (2, 4), 1, 1): [[.9219, .3459, .2787, .1200], [.7140, .4038, .9890, .2869]],
    ("w", (2, 4), 1, 2): [[.6615, .0885, .6907, .5605], [.8477, .3311, .8735, .9858]],
    ("w", (2, 3), 0, 0): [[.2832, .5242, .9420], [.0301, .0658, .3616]],
    ("w", (2, 3), 0, 1): [[.8124, .4860, .0992], [.6070, .8481, .3454]],
    ("w", (2, 3), 0, 2): [[.7250, .6054, .1873], [.9984, .6966, .5922]],
    ("w", (1, 3), 1, 0): [[.5166, .0202, .9724]],
    ("w", (1, 3), 1, 1): [[.9219, .3459, .2787]],
    ("v", (2, 1), 0, 0): [[.6478], [.6962]],
    ("v", (2, 1), 0, 1): [[.0316], [.3076]],
    ("v", (2, 1), 0, 2): [[.7936], [.0765]],
}


@pytest.mark.parametrize("key", list(LISTED), ids=[f"{k[0]}{list(k[1])}-s{k[2]}-t{k[3]}" for k in LISTED])
def test_case_files_list_the_generators_numbers(key):
    name, shape, seed, expert = key
    u = rng.uniform(seed=seed, expert=expert, tensor=name, start=0, shape=shape)
    assert (u - torch.tensor(LISTED[key])).abs().max() < 5e-5


# -- DARE -----------------------------------------------------------------------------------

def _block(name, base, experts, weights=None, row_start=0):
    return Block(name=name, base=base, experts=torch.stack(experts),
                 weights=tuple(weights or [1.0] * len(experts)), row_start=row_start)


def _big(rows=1000, cols=1000, T=1, seed=0):
    """Base and experts with 1M entries per tensor, τ ~ N(0, 1) (no zeros)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(rows, cols, generator=g)
    return base, [base + torch.randn(rows, cols, generator=g) for _ in range(T)]


@pytest.mark.parametrize("density", [0.1, 0.5, 0.9])
def test_dare_drop_fraction_is_one_minus_density(density):
    base, experts = _big()
    m = DareLinear(density=density, rescale="none")
    tau = experts[0] - base
    kept = m.sparsified(_block("x", base, experts), {})[0] != 0
    n = tau.numel()
    assert int((tau == 0).sum()) == 0
    assert abs(float(kept.double().mean()) - density) < Z * math.sqrt(density * (1 - density) / n)
    # survivors are τ itself
    assert torch.equal(m.sparsified(_block("x", base, experts), {})[0][kept], tau[kept])


@pytest.mark.parametrize("density", [0.1, 0.5, 0.9])
def test_dare_rescaled_task_vector_is_unbiased(density):
    """E[τ̃] = τ entry by entry: over 1M entries, Σ τ (τ̃ − τ) / Σ τ² (the regression of τ̃ on τ
    minus 1) and the mean of τ̃ − τ are both 0 within sampling error."""
    base, experts = _big()
    tau = (experts[0] - base).double()
    got = DareLinear(density=density).sparsified(_block("x", base, experts), {})[0].double()
    d = float(np.float32(density))
    var = (1 - d) / d                                  # Var[τ̃_i] = τ_i² (1 − d)/d
    err = got - tau
    assert abs(float(err.mean())) < Z * math.sqrt(var * float((tau**2).sum())) / tau.numel()
    slope = float((tau * err).sum() / (tau**2).sum())
    assert abs(slope) < Z * math.sqrt(var * float((tau**4).sum())) / float((tau**2).sum())
    # and the bias is real if the rescale is left out
    none = DareLinear(density=density, rescale="none").sparsified(_block("x", base, experts), {})[0]
    assert abs(float((tau * (none.double() - tau)).sum() / (tau**2).sum()) - (d - 1)) < 0.01


def test_dare_linear_expectation_is_task_arithmetic():
    """Averaged over 1M entries, dare_linear − task_arithmetic (three experts, weights) is 0
    within sampling error, and its spread matches the dropout variance."""
    base, experts = _big(rows=500, cols=2000, T=3, seed=1)
    weights = [1.0, 0.5, 2.0]
    b, e = {"w": base}, [{"w": x} for x in experts]
    ta = merge_tensors(build("task_arithmetic", {}), b, e, weights)["w"].double()
    dare = merge_tensors(build("dare_linear", {"density": 0.7}), b, e, weights)["w"].double()
    d = float(np.float32(0.7))
    # Var[dare − ta] per entry = Σ_t w_t² τ_t² (1 − d)/d
    var = sum(w * w * (x - base).double() ** 2 for w, x in zip(weights, experts)) * (1 - d) / d
    diff = dare - ta
    n = diff.numel()
    assert abs(float(diff.mean())) < Z * math.sqrt(float(var.sum())) / n
    assert abs(float((diff**2).mean()) / float(var.mean()) - 1) < 0.02


def test_dare_l1_keeps_each_experts_l1_norm_per_tensor():
    base, experts = _big(rows=300, cols=700, T=3, seed=2)
    m = DareLinear(density=0.3, rescale="l1")
    b, e = {"w": base}, [{"w": x} for x in experts]
    # the factors the statistics round finds, whole and in 7-row blocks: identical
    ctxs = [m.reduce(0, {"w/l1": _l1_totals(m, base, experts, rows)}, {}) for rows in (None, 7)]
    assert ctxs[0] == ctxs[1]
    tt = m.sparsified(_block("w", base, experts), ctxs[0])
    for t in range(3):
        before = float((experts[t] - base).abs().double().sum())
        after = float(tt[t].abs().double().sum())
        assert abs(after / before - 1) < 1e-6
        assert 3.0 < ctxs[0]["w"]["l1"][t] < 3.6       # ≈ 1/density
    merged = merge_tensors(build("dare_linear", {"density": 0.3, "rescale": "l1"}), b, e)["w"]
    assert torch.equal(merged, base + (tt[0] + tt[1] + tt[2]))


def test_magnitude_bins_sum_exactly():
    g = torch.Generator().manual_seed(9)
    x = torch.randn(2, 5000, generator=g) * torch.exp2(torch.randint(-140, 120, (2, 5000), generator=g).float())
    x[0, :10] = torch.tensor([0.0, -0.0, 1e-45, -3e-45, 1e-40, 3e38, -3.4e38, 1.0, -1.0, 2.0**-126])
    bins = magnitude_bins(x).numpy()
    for t in range(2):
        want = sum(Fraction(abs(v)) for v in x[t].double().tolist())
        assert Fraction(bins_total(bins[t]), 2**149) == want


def _l1_totals(m, base, experts, rows):
    acc = StatsAccumulator()
    for i, blk in enumerate(_blocks("w", base, experts, [1.0] * len(experts), rows)):
        acc.add(i, m.stats(0, blk, {}))
    return acc.totals()["w/l1"]


def test_dare_l1_one_long_row_one_expert_is_slice_invariant():
    """A block of one row of one expert is one reduction output, which torch splits across
    threads: fp64 row sums of it would differ from the same row's in a larger block. The
    statistics are integers and do not."""
    g = torch.Generator().manual_seed(10)
    base = torch.randn(3, 70_000, generator=g)
    expert = base + torch.randn(3, 70_000, generator=g) * torch.exp(torch.randn(3, 70_000, generator=g) * 4)
    m = DareLinear(density=0.5, rescale="l1")
    whole = _l1_totals(m, base, [expert], None)
    for rows in (1, 2):
        assert np.array_equal(whole, _l1_totals(m, base, [expert], rows))
    ms = build("dare_linear", {"density": 0.5, "rescale": "l1"})
    b, e = {"w": base}, [{"w": expert}]
    assert torch.equal(merge_tensors(ms, b, e)["w"], merge_tensors(ms, b, e, rows_per_block=1)["w"])


def test_dare_l1_when_nothing_survives_gives_the_base():
    # density 2**-24 over 12 entries: nothing is kept (the kept L1 sum is 0, factor 1); an
    # all-zero task vector likewise
    base = {"w": torch.ones(3, 4)}
    experts = [{"w": torch.full((3, 4), 2.0)}, {"w": torch.ones(3, 4)}]
    m = build("dare_linear", {"density": 2.0**-24, "rescale": "l1"})
    assert torch.equal(merge_tensors(m, base, experts)["w"], base["w"])
    assert torch.equal(merge_tensors(build("dare_ties", {"density": 0.5, "rescale": "l1"}),
                                     base, [experts[1], experts[1]])["w"], base["w"])


# -- DELLA ----------------------------------------------------------------------------------

def test_della_keep_rate_by_rank_is_p():
    """20 000 rows of n = 10 distinct magnitudes in shuffled order: the kept fraction at each
    rank is p_rank, and every survivor is τ/p_rank exactly."""
    rows, n = 20_000, 10
    g = torch.Generator().manual_seed(3)
    mags = torch.arange(1.0, n + 1.0) / 8                            # rank r ↔ |τ| = r/8
    perm = torch.argsort(torch.rand(rows, n, generator=g), dim=1)
    tau = mags[perm] * torch.where(torch.rand(rows, n, generator=g) < 0.5, -1.0, 1.0)
    m = Della(density=0.5, epsilon=0.3)
    base = torch.zeros(rows, n)
    got = m.sampled(_block("x", base, [tau]))[0]                      # [rows, n]
    p = m.keep_probabilities(n)
    assert torch.allclose(p.double(), 0.2 + 0.6 * torch.arange(n).double() / (n - 1))
    rank = perm                                                       # 0-indexed rank of each entry
    for r in range(n):
        at = rank == r
        kept = got[at] != 0
        rate = float(kept.double().mean())
        pr = float(p[r])
        assert abs(rate - pr) < Z * math.sqrt(pr * (1 - pr) / rows), (r, rate, pr)
        assert torch.equal(got[at][kept], tau[at][kept] / p[r])
    # unbiased: E[τ̃] = τ
    err = (got.double() - tau.double())
    var = (tau.double() ** 2 * (1 / p[rank].double() - 1)).sum()
    assert abs(float(err.sum())) < Z * math.sqrt(float(var))


def test_della_equal_magnitudes_rank_by_column():
    # every |τ| equal: rank = column + 1, so column c keeps with p_c and survivors are 1/p_c
    m = Della(density=0.5, epsilon=0.25)
    tau = torch.ones(4000, 5)
    got = m.sampled(_block("x", torch.zeros(4000, 5), [tau]))[0]
    p = m.keep_probabilities(5)
    assert p.tolist() == [0.25, 0.375, 0.5, 0.625, 0.75]
    for c in range(5):
        col = got[:, c]
        assert torch.equal(col[col != 0], (1 / p[c]).expand(int((col != 0).sum())))
        assert abs(float((col != 0).double().mean()) - float(p[c])) < Z * math.sqrt(0.25 / 4000)


@pytest.mark.parametrize("n", [1, 2, 7, 1024, 1025])
def test_della_rank_order_is_a_stable_sort_of_magnitudes(n):
    g = torch.Generator().manual_seed(n)
    tau = torch.randint(-3, 4, (3, 11, n), generator=g) / 8             # ties, ±0
    tau[0, 0] = -0.0
    want = torch.sort(tau.abs(), dim=-1, stable=True).indices
    assert torch.equal(rank_order(tau), want)


def test_della_one_column_rows_keep_with_density():
    m = Della(density=0.3, epsilon=0.2)
    got = m.sampled(_block("x", torch.zeros(100_000, 1), [torch.ones(100_000, 1)]))[0]
    assert abs(float((got != 0).double().mean()) - 0.3) < Z * math.sqrt(0.21 / 100_000)


def test_della_epsilon_zero_is_dare_ties():
    base, experts = _big(rows=40, cols=50, T=3, seed=4)
    b, e = {"w": base}, [{"w": x} for x in experts]
    for seed in (0, 9):
        della = build("della", {"density": 0.6, "epsilon": 0.0, "seed": seed})
        dare = build("dare_ties", {"density": 0.6, "seed": seed})
        della, dare = (merge_tensors(m, b, e, [1, .5, 2]) for m in (della, dare))
        assert torch.equal(della["w"], dare["w"])


# -- all three: slicing, seeds, limits ------------------------------------------------------

SPECS = [
    ("dare_linear", {"density": 0.6}),
    ("dare_linear", {"density": 0.4, "rescale": "l1"}),
    ("dare_ties", {"density": 0.6}),
    ("dare_ties", {"density": 0.3, "rescale": "l1"}),
    ("della", {"density": 0.6, "epsilon": 0.2}),
]


def _models(seed=5):
    """bf16-valued models: a [50, 37] tensor, a 1-D one and a single-row one, τ with ties and
    exact zeros."""
    g = torch.Generator().manual_seed(seed)
    shapes = {"a.weight": (50, 37), "norm": (23,), "b.weight": (1, 19)}
    base = {n: torch.randn(s, generator=g).bfloat16().float() for n, s in shapes.items()}
    experts = [{n: (b + torch.randint(-3, 4, b.shape, generator=g) / 64).bfloat16().float()
                for n, b in base.items()} for _ in range(3)]
    return base, experts


@pytest.mark.parametrize("method, params", SPECS,
                         ids=[f"{m}-{'-'.join(map(str, p.values()))}" for m, p in SPECS])
def test_same_seed_same_bytes_whatever_the_blocks(method, params):
    base, experts = _models()
    weights = [1.0, 0.5, 2.0]
    whole = merge_tensors(build(method, params), base, experts, weights)
    for rows in (1, 7):
        blocks = merge_tensors(build(method, params), base, experts, weights, rows_per_block=rows)
        for n in whole:
            assert torch.equal(whole[n], blocks[n]), (n, rows)
    other = merge_tensors(build(method, {**params, "seed": 1}), base, experts, weights)
    assert not torch.equal(whole["a.weight"], other["a.weight"])
    # experts are drawn independently: two identical experts are not dropped alike
    m = build(method, params).default
    blk = _block("a.weight", base["a.weight"], [experts[0]["a.weight"]] * 2)
    u = uniforms(blk, 0)
    assert float((u[0] == u[1]).double().mean()) < 0.01
    assert m.rounds == (1 if params.get("rescale") == "l1" else 0)


def test_density_one_is_task_arithmetic_and_ties():
    base, experts = _models(seed=6)
    w = [1.0, 0.5, 2.0]
    ta = merge_tensors(build("task_arithmetic", {"scale": 0.7}), base, experts, w)
    ties = merge_tensors(build("ties", {"density": 1.0, "scope": "tensor", "scale": 0.7}), base, experts, w)
    for rescale in ("inverse", "l1", "none"):
        p = {"density": 1.0, "rescale": rescale, "scale": 0.7, "seed": 3}
        lin = merge_tensors(build("dare_linear", p), base, experts, w)
        dt = merge_tensors(build("dare_ties", p), base, experts, w)
        for n in base:
            assert torch.equal(lin[n], ta[n]), (rescale, n)
            assert torch.equal(dt[n], ties[n]), (rescale, n)
    della = merge_tensors(build("della", {"density": 1.0, "epsilon": 0.0, "scale": 0.7}), base, experts, w)
    for n in base:
        assert torch.equal(della[n], ties[n]), n


@pytest.mark.parametrize("method, params, key", [
    ("dare_linear", {"density": 0.0}, "method.density"),
    ("dare_linear", {"density": 1.5}, "method.density"),
    ("dare_ties", {"density": 1e-9}, "method.density"),
    ("dare_ties", {"density": float("nan")}, "method.density"),
    ("dare_linear", {"rescale": "l2"}, "method.rescale"),
    ("dare_linear", {"seed": -1}, "method.seed"),
    ("dare_ties", {"seed": 2**32}, "method.seed"),
    ("dare_ties", {"seed": 1.5}, "method.seed"),
    ("dare_linear", {"scale": float("inf")}, "method.scale"),
    ("della", {"density": 0.0}, "method.density"),
    ("della", {"density": 1.2, "epsilon": 0.0}, "method.density"),
    ("della", {"epsilon": -0.1}, "method.epsilon"),
    ("della", {"density": 0.5, "epsilon": 0.5}, "method.epsilon"),      # p_min = 0
    ("della", {"density": 0.9, "epsilon": 0.2}, "method.epsilon"),      # p_max = 1.1
    ("della", {"seed": -3}, "method.seed"),
    ("della", {"scale": float("nan")}, "method.scale"),
])
def test_bad_parameters_name_the_key(method, params, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        build(method, params)


def test_extreme_valid_parameters():
    base, experts = _models(seed=7)
    for method, params in [("della", {"density": 1.0, "epsilon": 0.0}),
                           ("della", {"density": 0.5, "epsilon": 0.5 - 2.0**-23}),
                           ("della", {"density": 0.9, "epsilon": 0.1}),
                           ("dare_ties", {"density": 2.0**-24}), ("dare_linear", {"seed": 2**32 - 1})]:
        got = merge_tensors(build(method, params), base, experts)
        assert all(bool(torch.isfinite(v).all()) for v in got.values()), (method, params)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_gives_the_cpu_bytes():
    base, experts = _models(seed=8)
    w = (1.0, 0.5, 2.0)
    key = dict(seed=1, expert=2, tensor="t", start=2**32 - 7, shape=(1000,))
    assert torch.equal(rng.uniform(**key, device="cuda").cpu(), rng.uniform(**key))
    for cls, params in [(DareLinear, {}), (DareTies, {"density": 0.3}), (Della, {})]:
        m = cls(**params)
        cpu = _block("a.weight", base["a.weight"], [e["a.weight"] for e in experts], list(w), row_start=3)
        gpu = Block(name=cpu.name, base=cpu.base.cuda(), experts=cpu.experts.cuda(), weights=w, row_start=3)
        assert torch.equal(m.merge(cpu, {}), m.merge(gpu, {}).cpu()), cls.name
