"""Model Stock and SLERP: the properties their papers state, each checked through the
stats → reduce → merge protocol, against direct transcriptions of the reference formulas, and
the expert/weight/parameter checks."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch

from distmerge.errors import ConfigError
from distmerge.methods import Block, build
from distmerge.methods.model_stock import ModelStock
from distmerge.reduce import row_sums
from distmerge.methods.slerp import DOT_THRESHOLD, coefficients
from distmerge.reduce import EXACT_SCALE
from tests.harness import merge_tensors


def _random_models(n_experts, seed=0, spread=0.1):
    g = torch.Generator().manual_seed(seed)
    shapes = {"a.weight": (17, 9), "b.bias": (23,), "c.weight": (1, 40)}
    base = {n: torch.randn(s, generator=g) for n, s in shapes.items()}
    common = {n: torch.randn(s, generator=g) * spread for n, s in shapes.items()}   # shared direction
    experts = [{n: b + common[n] + torch.randn(b.shape, generator=g) * spread for n, b in base.items()}
               for _ in range(n_experts)]
    return base, experts


# -- Model Stock ----------------------------------------------------------------------------

def _model_stock_reference(base, experts):
    """The authors' / mergekit's formula in fp64 on whole tensors (no zero norms here)."""
    out = {}
    for n, b in base.items():
        taus = [(e[n] - b).double().reshape(-1) for e in experts]
        T = len(taus)
        cos = [float(taus[i] @ taus[j] / (taus[i].norm() * taus[j].norm()))
               for i in range(T) for j in range(i + 1, T)]
        c = sum(cos) / len(cos)
        t = T * c / ((T - 1) * c + 1)
        mean = sum(e[n].double() for e in experts) / T
        out[n] = (t * mean + (1 - t) * b.double(), t)
    return out


@pytest.mark.parametrize("n_experts", [2, 3, 5])
def test_model_stock_matches_the_reference_formula(n_experts):
    base, experts = _random_models(n_experts, seed=n_experts)
    got = merge_tensors(build("model_stock", {}), base, experts)
    for n, (want, t) in _model_stock_reference(base, experts).items():
        assert 0.0 < t < 1.0                    # a shared direction: θ lies between θ₀ and the mean
        torch.testing.assert_close(got[n].double(), want, rtol=0, atol=1e-6)


def _gram(cos_matrix):
    """Exact ⟨τ_i, τ_j⟩ (i ≤ j) of unit vectors with the given (dyadic) cosines, on the
    exact_sum scale."""
    T = len(cos_matrix)
    return [int(Fraction(cos_matrix[i][j]) * (1 << EXACT_SCALE)) for i in range(T) for j in range(i, T)]


def test_model_stock_ratio_is_the_papers_formula():
    # equal pairwise cos c: t = T c / ((T − 1) c + 1)
    for T in (2, 3, 4, 8):
        for c in (0.0, 0.25, 0.5, 0.75, 1.0):
            cos = [[1.0 if i == j else c for j in range(T)] for i in range(T)]
            assert ModelStock.ratio(_gram(cos)) == pytest.approx(T * c / ((T - 1) * c + 1), rel=1e-15)


def test_model_stock_ratio_grows_with_agreement_and_with_the_number_of_experts():
    # the paper: the closer the fine-tuned models' angle, the closer to their average; more
    # models at the same angle also move θ towards their average; c = 1 → the average itself
    def t(T, c):
        return ModelStock.ratio(_gram([[1.0 if i == j else c for j in range(T)] for i in range(T)]))
    for T in (2, 3, 5):
        ts = [t(T, c) for c in (0.0, 0.125, 0.25, 0.5, 0.75, 1.0)]
        assert ts == sorted(ts) and ts[0] == 0.0 and ts[-1] == 1.0
    assert t(2, 0.25) < t(3, 0.25) < t(5, 0.25) < 1.0


def test_model_stock_cos_is_over_the_whole_tensor_not_per_row():
    # rows disagree, the whole tensor agrees less: τ1 = [[1, 0], [0, 1]], τ2 = [[1, 0], [0, −1]]:
    # per-row cos are 1 and −1, the whole-tensor cos is 0 → t = 0 → θ₀
    base = {"w": torch.zeros(2, 2)}
    experts = [{"w": torch.tensor([[1.0, 0.0], [0.0, 1.0]])}, {"w": torch.tensor([[1.0, 0.0], [0.0, -1.0]])}]
    for rows in (None, 1):
        assert torch.equal(merge_tensors(build("model_stock", {}), base, experts, rows_per_block=rows)["w"],
                           torch.zeros(2, 2))


def test_model_stock_identical_experts_give_the_expert():
    base, experts = _random_models(1, seed=4)
    got = merge_tensors(build("model_stock", {}), base, experts * 2)
    for n in base:
        assert torch.equal(got[n], experts[0][n])      # c = 1 → t = 1 → (θ + θ) / 2 = θ exactly


def test_model_stock_refuses_weights_and_single_experts():
    ms = build("model_stock", {})
    ms.check_weights((1.0, 1.0, 1.0))
    with pytest.raises(ConfigError, match="experts: model_stock averages the experts equally"):
        ms.check_weights((1.0, 2.0))
    with pytest.raises(ConfigError, match="at least two experts"):
        ms.check_weights((1.0,))


def test_model_stock_takes_no_parameters():
    with pytest.raises(ConfigError, match=r"^method\.t: unknown parameter of model_stock"):
        build("model_stock", {"t": 0.5})


# -- SLERP ----------------------------------------------------------------------------------

def _slerp_reference(t, a, b, threshold=DOT_THRESHOLD):
    """mergekit's slerp (numpy, fp64) on one tensor."""
    a, b = a.double().numpy(), b.double().numpy()
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    dot = np.sum((a / na) * (b / nb))
    if abs(dot) > threshold:
        return torch.from_numpy((1 - t) * a + t * b)
    theta_0 = np.arccos(dot)
    s0 = np.sin(theta_0 - theta_0 * t) / np.sin(theta_0)
    s1 = np.sin(theta_0 * t) / np.sin(theta_0)
    return torch.from_numpy(s0 * a + s1 * b)


@pytest.mark.parametrize("t", [0.1, 0.5, 0.73])
def test_slerp_matches_mergekit(t):
    base, experts = _random_models(2, seed=7, spread=1.0)
    got = merge_tensors(build("slerp", {"t": t}), base, experts)
    for n in base:
        torch.testing.assert_close(got[n].double(), _slerp_reference(t, experts[0][n], experts[1][n]),
                                   rtol=0, atol=2e-6)


@pytest.mark.parametrize("t, which", [(0.0, 0), (1.0, 1)])
def test_slerp_endpoints_are_the_experts_exactly(t, which):
    for spread in (1.0, 1e-4):                      # spherical branch, then the linear one
        base, experts = _random_models(2, seed=8, spread=spread)
        got = merge_tensors(build("slerp", {"t": t}), base, experts, rows_per_block=4)
        for n in base:
            assert torch.equal(got[n], experts[which][n]), (n, spread)


def test_slerp_orthogonal_unit_vectors_hand_computed():
    # cos 0 → Ω = π/2, sin Ω = 1; t = ½: both coefficients sin(π/4)/1 = √½
    assert coefficients(0.0, 0.5) == (math.sin(math.pi / 4), math.sin(math.pi / 4))
    got = merge_tensors(build("slerp", {}), {"w": torch.zeros(2)},
                        [{"w": torch.tensor([1.0, 0.0])}, {"w": torch.tensor([0.0, 1.0])}])["w"]
    assert torch.equal(got, torch.full((2,), math.sqrt(0.5), dtype=torch.float32))


def test_slerp_stays_on_the_sphere_and_moves_the_angle_linearly():
    # equal norms: ‖θ(t)‖ = ‖θ_a‖ and angle(θ_a, θ(t)) = t Ω (the point of spherical interpolation)
    g = torch.Generator().manual_seed(9)
    a, b = torch.randn(64, generator=g), torch.randn(64, generator=g)
    b = b * (a.norm() / b.norm())
    omega = math.acos(float(a.double() @ b.double() / (a.double().norm() * b.double().norm())))
    for t in (0.2, 0.5, 0.9):
        got = merge_tensors(build("slerp", {"t": t}), {"w": torch.zeros(64)}, [{"w": a}, {"w": b}])["w"].double()
        assert float(got.norm()) == pytest.approx(float(a.double().norm()), rel=1e-6)
        angle = math.acos(float(got @ a.double() / (got.norm() * a.double().norm())))
        assert angle == pytest.approx(t * omega, rel=1e-5)


def test_slerp_threshold_switches_to_linear():
    # just above 0.9995 the coefficients are (1 − t, t); just below they are spherical
    assert coefficients(0.99951, 0.25) == (0.75, 0.25)
    assert coefficients(-0.99951, 0.25) == (0.75, 0.25)
    c_a, c_b = coefficients(0.9994, 0.25)
    assert (c_a, c_b) != (0.75, 0.25) and c_a == pytest.approx(0.75, abs=1e-3)


def test_slerp_ignores_the_base():
    base, experts = _random_models(2, seed=10, spread=1.0)
    other_base = {n: torch.randn_like(b) for n, b in base.items()}
    a = merge_tensors(build("slerp", {"t": 0.3}), base, experts)
    b = merge_tensors(build("slerp", {"t": 0.3}), other_base, experts)
    for n in base:
        assert torch.equal(a[n], b[n])


@pytest.mark.parametrize("t", [-0.1, 1.5, float("nan")])
def test_slerp_t_outside_0_1_is_refused(t):
    with pytest.raises(ConfigError, match=r"^method\.t: must be between 0 and 1"):
        build("slerp", {"t": t})


def test_slerp_needs_exactly_two_experts_and_no_weights():
    ms = build("slerp", {})
    ms.check_weights((1.0, 1.0))
    with pytest.raises(ConfigError, match="slerp merges exactly 2 experts, got 3"):
        ms.check_weights((1.0, 1.0, 1.0))
    with pytest.raises(ConfigError, match="slerp interpolates two experts by t"):
        ms.check_weights((1.0, 0.5))


# -- exact statistics -----------------------------------------------------------------------

@pytest.mark.parametrize("method", ["model_stock", "slerp"])
def test_statistics_do_not_depend_on_the_blocks_for_long_rows(method):
    # Rows of ≥ 32 768 values: torch's fp64 row sums change with the block's row count on several
    # CPU threads; the statistics (fixed-order row sums, then exact sums) do not.
    g = torch.Generator().manual_seed(11)
    base = torch.randn(3, 40_000, generator=g)
    experts = torch.stack([base + torch.randn(3, 40_000, generator=g) for _ in range(2)])
    m = build(method, {}).default

    def stats(r0, r1):
        block = Block(name="w", base=base[r0:r1], experts=experts[:, r0:r1], weights=(1.0, 1.0), row_start=r0)
        return m.stats(0, block, {})

    (key, whole), = stats(0, 3).items()
    assert list(whole) == list(stats(0, 1)[key] + stats(1, 2)[key] + stats(2, 3)[key])


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8, 13, 4096, 40_001])
def test_row_sums_fixed_order(n):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(5, n, generator=g, dtype=torch.float64)
    got = row_sums(x)
    assert torch.allclose(got, x.sum(-1), rtol=1e-12, atol=1e-9)
    assert torch.equal(torch.cat([row_sums(x[r:r + 1]) for r in range(5)]), got)
    assert torch.equal(row_sums(x[:, :0]), torch.zeros(5, dtype=torch.float64))
    # the pairwise order, spelt out for 3 and 5 values: (x0 + x1) + x2; ((x0 + x2) + x4) + (x1 + x3)
    if n == 3:
        assert torch.equal(got, (x[:, 0] + x[:, 1]) + x[:, 2])
    if n == 5:
        assert torch.equal(got, ((x[:, 0] + x[:, 2]) + x[:, 4]) + (x[:, 1] + x[:, 3]))
