"""breadcrumbs and consensus (TALL masks): against direct transcriptions of METHODS.md on data
full of ties, through the stats → reduce → merge protocol, whole, in row blocks and in blocks of
uneven sizes handled in shuffled order; and the properties the papers state."""

from __future__ import annotations

import pickle
import random

import pytest
import torch

from distmerge.errors import ConfigError
from distmerge.methods import Block, build
from distmerge.reduce import StatsAccumulator
from tests.harness import merge_tensors


def _as_rows(x: torch.Tensor) -> torch.Tensor:
    """The [rows, cols] view every block sees (a 1-D tensor is one row)."""
    return x.reshape(x.shape[0], -1) if x.dim() >= 2 else x.reshape(1, -1)


def _weighted_sum(xs: list[torch.Tensor], weights) -> torch.Tensor:
    acc = xs[0] * weights[0]
    for x, w in zip(xs[1:], weights[1:]):
        acc += x * w
    return acc


# -- breadcrumbs: a direct transcription ------------------------------------------------------

def breadcrumbs_mask(values: list[float], density: float, gamma: float) -> list[bool]:
    """METHODS.md: sort |τ| descending, ties by lower index first; keep ranks
    ⌊γn⌋..⌊(γ+β)n⌋ − 1."""
    n = len(values)
    a, b = int(gamma * n), min(n, int((gamma + density) * n))
    order = sorted(range(n), key=lambda i: (-abs(values[i]), i))
    keep = [False] * n
    for rank, i in enumerate(order):
        keep[i] = a <= rank < b
    return keep


def breadcrumbs_reference(base, experts, *, density, gamma, scope, weights, scale=1.0):
    out = {}
    for name in sorted(base):
        b = _as_rows(base[name].float())
        trimmed = []
        for e in experts:
            tau = _as_rows(e[name].float()) - b                     # [rows, cols]
            units = [tau.reshape(-1)] if scope == "tensor" else list(tau)
            mask = [m for u in units for m in breadcrumbs_mask(u.tolist(), density, gamma)]
            trimmed.append(torch.where(torch.tensor(mask).view(tau.shape), tau, 0.0))
        out[name] = (b + _weighted_sum(trimmed, weights) * scale).reshape(base[name].shape)
    return out


def _tie_heavy_models(seed, T=3, shapes=None):
    """bf16 models whose task vectors take 7 values (many equal |τ| at every cut)."""
    g = torch.Generator().manual_seed(seed)
    shapes = shapes or {"a.weight": (13, 7), "b.weight": (5, 11), "norm": (9,), "one.row": (1, 6)}
    base = {n: (torch.randint(-8, 8, s, generator=g) / 16).bfloat16() for n, s in shapes.items()}
    experts = [
        {n: (b.float() + torch.randint(-3, 4, b.shape, generator=g) / 64).bfloat16() for n, b in base.items()}
        for _ in range(T)
    ]
    return base, experts


def merge_in_uneven_blocks(methods, base, experts, weights, seed):
    """The protocol with each tensor cut at random row boundaries, blocks handled in a
    shuffled order in every statistics round and in the merge pass."""
    rng = random.Random(seed)
    blocks = []
    for name in sorted(base):
        b2 = _as_rows(base[name].float())
        e2 = torch.stack([_as_rows(e[name].float()) for e in experts])
        rows = b2.shape[0]
        cuts = sorted(rng.sample(range(1, rows), rng.randint(0, rows - 1))) if rows > 1 else []
        for r0, r1 in zip([0, *cuts], [*cuts, rows]):
            blocks.append(Block(name=name, base=b2[r0:r1], experts=e2[:, r0:r1],
                                weights=tuple(weights), row_start=r0))
    ctx: dict = {}
    for rnd in range(methods.rounds):
        acc = StatsAccumulator()
        rng.shuffle(blocks)
        for i, block in enumerate(blocks):
            m = methods.for_tensor(block.name)
            if rnd < m.rounds:
                acc.add(i, m.stats(rnd, block, ctx))
        ctx = methods.reduce(rnd, acc.totals(), ctx, sorted(base))
    rng.shuffle(blocks)
    parts: dict[str, list] = {}
    for block in blocks:
        merged = methods.for_tensor(block.name).merge(block, ctx)
        parts.setdefault(block.name, []).append((block.row_start, merged))
    return {n: torch.cat([p for _, p in sorted(parts[n], key=lambda x: x[0])]).reshape(base[n].shape)
            for n in base}


@pytest.mark.parametrize("scope", ["row", "tensor"])
@pytest.mark.parametrize("density, gamma", [(0.9, 0.01), (0.5, 0.1), (0.3, 0.25), (0.9, 0.5),
                                            (1.0, 0.0), (0.0, 0.2), (0.6, 1.0), (1.0, 0.3)])
@pytest.mark.parametrize("rows", [None, 1, 4])
def test_breadcrumbs_matches_reference_with_many_ties(scope, density, gamma, rows):
    base, experts = _tie_heavy_models(seed=int(density * 10) + int(gamma * 100))
    weights = [1.0, 0.5, -2.0]
    params = {"density": density, "gamma": gamma, "scope": scope, "scale": 0.7}
    want = breadcrumbs_reference(base, experts, density=density, gamma=gamma, scope=scope,
                                 weights=weights, scale=0.7)
    got = merge_tensors(build("breadcrumbs", params), base, experts, weights, rows_per_block=rows)
    for n in base:
        assert torch.equal(got[n], want[n]), n


def _split_ties(values: torch.Tensor, rank: int) -> tuple[int, int, int]:
    """For the entry of descending rank ``rank`` (stable by flat index) of a [rows, cols]
    tensor: how many entries equal to its |value| rank above it, how many at or below it, and
    over how many rows they spread."""
    flat = values.abs().reshape(-1)
    order = sorted(range(flat.numel()), key=lambda i: (-float(flat[i]), i))
    v = flat[order[rank]]
    tied = [i for i in range(flat.numel()) if flat[i] == v]
    above = sum(1 for i in tied if order.index(i) < rank)
    return above, len(tied) - above, len({i // values.shape[-1] for i in tied})


def test_breadcrumbs_tensor_scope_ties_at_both_cuts_in_one_row_blocks():
    # |τ| ∈ {1/64, 2/64, 3/64}: with n = 120, γ = .1, β = .5 the cuts a = 12 and b = 72 both
    # fall inside groups of equal |τ| that spread over many rows, and only the lower-index rule
    # (applied across blocks) decides which of them survive.
    base, experts = _tie_heavy_models(seed=5, shapes={"w": (24, 5)})
    g = torch.Generator().manual_seed(0)
    row = torch.tensor([1.0, -2.0, 2.0, -2.0, 3.0]) / 64
    for e in experts:
        for r in range(24):
            e["w"][r] = (base["w"][r].float() + row[torch.randperm(5, generator=g)]).bfloat16()
    weights = [1.0, 1.0, 1.0]
    for e in experts:
        tau = e["w"].float() - base["w"].float()
        for rank in (12, 72):
            above, below, spread = _split_ties(tau, rank)
            assert above >= 1 and below >= 1 and spread >= 5, (rank, above, below, spread)
    params = {"density": 0.5, "gamma": 0.1, "scope": "tensor"}
    want = breadcrumbs_reference(base, experts, density=0.5, gamma=0.1, scope="tensor", weights=weights)
    got = merge_tensors(build("breadcrumbs", params), base, experts, weights, rows_per_block=1)
    assert torch.equal(got["w"], want["w"])
    for seed in range(5):
        got = merge_in_uneven_blocks(build("breadcrumbs", params), base, experts, weights, seed)
        assert torch.equal(got["w"], want["w"]), seed


@pytest.mark.parametrize("scope", ["row", "tensor"])
def test_breadcrumbs_uneven_blocks_in_any_order(scope):
    base, experts = _tie_heavy_models(seed=11)
    weights = [2.0, 0.5, 1.0]
    params = {"density": 0.4, "gamma": 0.15, "scope": scope}
    want = breadcrumbs_reference(base, experts, density=0.4, gamma=0.15, scope=scope, weights=weights)
    for seed in range(4):
        got = merge_in_uneven_blocks(build("breadcrumbs", params), base, experts, weights, seed)
        for n in base:
            assert torch.equal(got[n], want[n]), (seed, n)


@pytest.mark.parametrize("scope", ["row", "tensor"])
def test_breadcrumbs_gamma_0_density_1_is_task_arithmetic(scope):
    base, experts = _tie_heavy_models(seed=3)
    weights = [1.0, 0.5, 2.0]
    got = merge_tensors(build("breadcrumbs", {"gamma": 0.0, "density": 1.0, "scope": scope, "scale": 0.3}),
                        base, experts, weights, rows_per_block=2)
    want = merge_tensors(build("task_arithmetic", {"scale": 0.3}), base, experts, weights)
    for n in base:
        assert torch.equal(got[n], want[n]), n


def test_breadcrumbs_row_and_tensor_scope_differ():
    # τ = [[8, 4], [2, 1]], γ = 0, β = .5. Per row (n = 2) keep rank 0 of each row:
    # [[8, 0], [2, 0]]. Per tensor (n = 4) keep ranks 0, 1: [[8, 4], [0, 0]].
    base = {"w": torch.zeros(2, 2)}
    experts = [{"w": torch.tensor([[8.0, 4.0], [2.0, 1.0]])}, {"w": torch.zeros(2, 2)}]
    row = merge_tensors(build("breadcrumbs", {"gamma": 0.0, "density": 0.5}), base, experts)["w"]
    tensor = merge_tensors(build("breadcrumbs", {"gamma": 0.0, "density": 0.5, "scope": "tensor"}),
                           base, experts, rows_per_block=1)["w"]
    assert torch.equal(row, torch.tensor([[8.0, 0.0], [2.0, 0.0]]))
    assert torch.equal(tensor, torch.tensor([[8.0, 4.0], [0.0, 0.0]]))


def test_breadcrumbs_scopes_agree_on_one_row_tensors():
    base, experts = _tie_heavy_models(seed=4, shapes={"norm": (40,), "bias": (1, 17)})
    for params in ({"density": 0.5, "gamma": 0.1}, {"density": 0.8, "gamma": 0.05}):
        row = merge_tensors(build("breadcrumbs", params), base, experts)
        tensor = merge_tensors(build("breadcrumbs", {**params, "scope": "tensor"}), base, experts)
        for n in base:
            assert torch.equal(row[n], tensor[n]), n


def test_breadcrumbs_drops_the_largest_entries_as_outliers():
    # Breadcrumbs' point: the top ⌊γn⌋ magnitudes of each row are zeroed (density 1 keeps the rest).
    g = torch.Generator().manual_seed(0)
    base = {"w": torch.zeros(6, 50)}
    tau = torch.randn(6, 50, generator=g)
    got = merge_tensors(build("breadcrumbs", {"gamma": 0.1, "density": 1.0}), base,
                        [{"w": tau}, {"w": torch.zeros(6, 50)}])["w"]
    top5 = tau.abs().topk(5, dim=1).indices
    assert torch.equal(got.gather(1, top5), torch.zeros(6, 5))
    assert int((got != 0).sum()) == 6 * 45
    assert torch.equal(got[got != 0], tau[got != 0])


def test_breadcrumbs_gamma_one_zeroes_everything():
    base, experts = _tie_heavy_models(seed=6)
    for scope in ("row", "tensor"):
        got = merge_tensors(build("breadcrumbs", {"gamma": 1.0, "scope": scope}), base, experts,
                            rows_per_block=3)
        for n in base:
            assert torch.equal(got[n], base[n].float()), (scope, n)


def test_breadcrumbs_tensor_scope_context_stays_small():
    # Per-row tie counts are only a statistic: the context keeps a few numbers per expert.
    base, experts = _tie_heavy_models(seed=7, shapes={"big": (3000, 4)})
    methods = build("breadcrumbs", {"density": 0.5, "gamma": 0.1, "scope": "tensor"})
    ctx: dict = {}
    for rnd in range(methods.rounds):
        acc = StatsAccumulator()
        for i, r0 in enumerate(range(0, 3000, 500)):
            e = torch.stack([x["big"][r0:r0 + 500].float() for x in experts])
            block = Block(name="big", base=base["big"][r0:r0 + 500].float(), experts=e,
                          weights=(1.0,) * 3, row_start=r0)
            acc.add(i, methods.default.stats(rnd, block, ctx))
        ctx = methods.reduce(rnd, acc.totals(), ctx, ["big"])
    assert any(q > 0 for qs in ctx["big"]["quota"] for q in qs)    # the ties round ran
    assert len(pickle.dumps(ctx)) < 1000


@pytest.mark.parametrize("params, key", [
    ({"density": 1.5}, "method.density"),
    ({"gamma": -0.1}, "method.gamma"),
    ({"scope": "model"}, "method.scope"),
    ({"scale": float("nan")}, "method.scale"),
])
def test_breadcrumbs_bad_parameters_name_the_key(params, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        build("breadcrumbs", params)


# -- consensus (TALL masks): a direct transcription ---------------------------------------------

def consensus_reference(base, experts, *, tall_lambda, min_agree, weights, scale=1.0):
    """METHODS.md with each τ_t scaled by its weight first, entry by entry in Python floats
    (every value here is a small dyadic fraction, so fp64 decides the comparisons like fp32)."""
    out = {}
    for name in sorted(base):
        b = base[name].float()
        taus = [(e[name].float() - b) * w for e, w in zip(experts, weights)]
        mtl = _weighted_sum(taus, [1.0] * len(taus))
        keep = torch.zeros(b.shape, dtype=torch.bool)
        flat = [t.reshape(-1).tolist() for t in taus]
        for i, s in enumerate(mtl.reshape(-1).tolist()):
            votes = sum(abs(x[i]) > tall_lambda * abs(s - x[i]) for x in flat)
            keep.view(-1)[i] = votes >= min_agree
        out[name] = b + torch.where(keep, mtl, 0.0) * scale
    return out


@pytest.mark.parametrize("tall_lambda, min_agree",
                         [(0.6, 2), (0.5, 1), (0.25, 3), (1.0, 2), (0.0, 2), (2.0, 1)])
@pytest.mark.parametrize("rows", [None, 1])
def test_consensus_matches_reference(tall_lambda, min_agree, rows):
    base, experts = _tie_heavy_models(seed=int(tall_lambda * 4) + min_agree)
    weights = [1.0, 0.5, 2.0]
    params = {"tall_lambda": tall_lambda, "min_agree": min_agree, "scale": 0.75}
    want = consensus_reference(base, experts, tall_lambda=tall_lambda, min_agree=min_agree,
                               weights=weights, scale=0.75)
    got = merge_tensors(build("consensus", params), base, experts, weights, rows_per_block=rows)
    for n in base:
        assert torch.equal(got[n], want[n]), n


def test_consensus_min_agree_1_lambda_0_is_task_arithmetic():
    # λ = 0: mask_t = |τ_t| > 0, so with k = 1 every entry where some τ_t ≠ 0 is kept, and the
    # others have τ_MTL = 0: the merge is task arithmetic with scale α, bit for bit.
    base, experts = _tie_heavy_models(seed=8)
    g = torch.Generator().manual_seed(1)
    for e in experts:                                   # many entries where every τ_t = 0
        for n in e:
            same = torch.rand(e[n].shape, generator=g) < 0.5
            e[n] = torch.where(same, base[n], e[n])
    assert any(bool((torch.stack([e[n] for e in experts]) == base[n]).all(0).any()) for n in base)
    weights = [1.0, 0.5, 2.0]
    got = merge_tensors(build("consensus", {"tall_lambda": 0.0, "min_agree": 1, "scale": 0.3}),
                        base, experts, weights)
    want = merge_tensors(build("task_arithmetic", {"scale": 0.3}), base, experts, weights)
    for n in base:
        assert torch.equal(got[n], want[n]), n


def test_consensus_mask_is_strict():
    # T = 2, λ = .5: entry 0 τ = (1, 2), τ_MTL = 3: |τ1| = 1 = .5·|3 − 1| is not > → 1 vote,
    # dropped at k = 2 (with ≥ it would be kept); entry 1 τ = (1.5, 2): 1.5 > 1, 2 > .75 → kept.
    base = {"w": torch.zeros(2)}
    experts = [{"w": torch.tensor([1.0, 1.5])}, {"w": torch.tensor([2.0, 2.0])}]
    got = merge_tensors(build("consensus", {"tall_lambda": 0.5, "min_agree": 2}), base, experts)["w"]
    assert torch.equal(got, torch.tensor([0.0, 3.5]))


def test_consensus_weights_scale_the_task_vectors():
    # weights (2, 1, .5) give the same merge as unit weights on experts whose τ are scaled so
    # (exact: powers of two), and an expert of weight 0 counts as one with τ = 0.
    base, experts = _tie_heavy_models(seed=9)
    scaled = [{n: base[n].float() + w * (e[n].float() - base[n].float()) for n in base}
              for e, w in zip(experts, (2.0, 1.0, 0.5))]
    got = merge_tensors(build("consensus", {}), base, experts, [2.0, 1.0, 0.5])
    want = merge_tensors(build("consensus", {}), {n: b.float() for n, b in base.items()}, scaled)
    zeroed = [experts[0], experts[1], {n: base[n] for n in base}]
    got0 = merge_tensors(build("consensus", {"min_agree": 1}), base, experts, [1.0, 1.0, 0.0])
    want0 = merge_tensors(build("consensus", {"min_agree": 1}), base, zeroed)
    for n in base:
        assert torch.equal(got[n], want[n]), n
        assert torch.equal(got0[n], want0[n]), n


def test_consensus_min_agree_above_expert_count_is_refused():
    methods = build("consensus", {"min_agree": 3})
    methods.check_weights((1.0, 1.0, 1.0))
    with pytest.raises(ConfigError, match="min_agree 3 is more than the 2 experts"):
        methods.check_weights((1.0, 1.0))


@pytest.mark.parametrize("params, key", [
    ({"min_agree": 0}, "method.min_agree"),
    ({"min_agree": 1.5}, "method.min_agree"),
    ({"tall_lambda": -0.1}, "method.tall_lambda"),
    ({"tall_lambda": float("inf")}, "method.tall_lambda"),
    ({"scale": float("inf")}, "method.scale"),
])
def test_consensus_bad_parameters_name_the_key(params, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        build("consensus", params)
