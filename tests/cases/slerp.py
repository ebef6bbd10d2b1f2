"""slerp: per tensor on the raw weights of the two experts (the base is not used): linear when
|cos| > 0.9995, else sin((1 − t)Ω)/sin Ω · θ_a + sin(tΩ)/sin Ω · θ_b with Ω = arccos(cos)
(coefficients rounded to fp32)."""

import math

import torch

from tests.cases import Case

_UNUSED_BASE = 7.0          # any base: slerp ignores it
_S = float(torch.tensor(math.sin(math.pi / 4)))   # fp32(sin 45°) = 0.70710677


def _case(id, a, b, expected, **params):
    a, b = torch.tensor(a), torch.tensor(b)
    return Case(id=id, params=params, base={"w": torch.full_like(a, _UNUSED_BASE)},
                experts=[{"w": a}, {"w": b}], expected={"w": torch.tensor(expected)})


CASES = [
    # orthogonal unit vectors: cos 0, Ω = π/2, sin Ω = 1; t = ½ → both coefficients sin(π/4)
    _case("orthogonal-90deg", [[1.0, 0.0]], [[0.0, 1.0]], [[_S, _S]]),
    # [1, 1, 0]·[−1, 0, 1] = −1, norms √2 → cos = −1/2, Ω = 120°, t = ½:
    # sin(60°)/sin(120°) = 1 for both (fp64 0.9999999999999999 → fp32 1) → a + b = [0, 1, 1]
    _case("120deg-coefficients-one", [[1.0, 1.0, 0.0]], [[-1.0, 0.0, 1.0]], [[0.0, 1.0, 1.0]]),
    # colinear (cos = 1 > 0.9995) → linear: ¾·[1, 2] + ¼·[2, 4] = [1.25, 2.5]
    # (t = ½ would give [1.5, 3])
    _case("colinear-linear-t", [1.0, 2.0], [2.0, 4.0], [1.25, 2.5], t=0.25),
    # antiparallel (|cos| = 1) → linear too: ½·[1, 2] + ½·[−2, −4] = [−0.5, −1]
    _case("antiparallel-linear", [1.0, 2.0], [-2.0, -4.0], [-0.5, -1.0]),
    # an all-zero expert has no direction: cos counts as 0 (as mergekit) → Ω = π/2,
    # θ = sin(π/4)·0 + sin(π/4)·[2, 0] = [2·fp32(sin 45°), 0]
    _case("zero-expert-is-orthogonal", [[0.0, 0.0]], [[2.0, 0.0]], [[2 * _S, 0.0]]),
    # the endpoints are the experts exactly (coefficients exactly 1 and 0)
    _case("t0-first-expert", [[1.5, -2.0], [3.0, 0.25]], [[-1.0, 0.5], [2.0, -3.0]],
          [[1.5, -2.0], [3.0, 0.25]], t=0.0),
    _case("t1-second-expert", [[1.5, -2.0], [3.0, 0.25]], [[-1.0, 0.5], [2.0, -3.0]],
          [[-1.0, 0.5], [2.0, -3.0]], t=1.0),
]
