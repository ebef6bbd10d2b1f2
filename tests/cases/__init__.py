"""Hand-computed cases for every registered merge method, one module per method
(``tests/cases/<method>.py`` with a ``CASES`` list), collected by the conformance suite.

A case gives tiny fp32 tensors (exactly representable values), the method's parameters and the
expected merged tensors, worked out by hand in the case's comment. The suite runs each case
whole and in row blocks, and checks that every parameter of every method appears, away from
its default, in a case whose expected result differs from the default's: a parameter that a
method ignored would fail there.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True, kw_only=True)
class Case:
    id: str
    params: dict
    base: dict[str, torch.Tensor]
    experts: list[dict[str, torch.Tensor]]
    expected: dict[str, torch.Tensor]
    weights: list[float] | None = None
    overrides: list[tuple[str, dict]] = field(default_factory=list)


def one_tensor(name: str, base: torch.Tensor, taus: list[torch.Tensor]) -> tuple[dict, list[dict]]:
    """Models with one tensor: the base and base + τ_t for each expert."""
    return {name: base}, [{name: base + t} for t in taus]


def cases_for(method: str) -> list[Case]:
    """The CASES of ``tests/cases/<method>.py`` (ImportError if the module is missing)."""
    return importlib.import_module(f"tests.cases.{method}").CASES
