"""Merge methods: one file each, registered by name in one explicit, sorted table.

:func:`build` turns the pipeline's ``method`` block (and each override) into a method instance,
checking every parameter's name, type and value, so a misspelt key never passes silently.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import typing
from typing import Any

import numpy as np

from distmerge.errors import ConfigError
from distmerge.methods.base import Block, Method
from distmerge.methods.breadcrumbs import Breadcrumbs
from distmerge.methods.consensus import Consensus
from distmerge.methods.dare import DareLinear, DareTies
from distmerge.methods.della import Della
from distmerge.methods.frank_wolfe import FrankWolfe
from distmerge.methods.linear import Linear
from distmerge.methods.lines import wrap as wrap_lines
from distmerge.methods.model_stock import ModelStock
from distmerge.methods.slerp import Slerp
from distmerge.methods.task_arithmetic import TaskArithmetic
from distmerge.methods.ties import Ties

REGISTRY: dict[str, type[Method]] = {
    "breadcrumbs": Breadcrumbs,
    "consensus": Consensus,
    "dare_linear": DareLinear,
    "dare_ties": DareTies,
    "della": Della,
    "frank_wolfe": FrankWolfe,
    "linear": Linear,
    "model_stock": ModelStock,
    "slerp": Slerp,
    "task_arithmetic": TaskArithmetic,
    "ties": Ties,
}

__all__ = ["Block", "Method", "REGISTRY", "build", "MethodSet"]


def _coerce(cls: type[Method], key: str, value: Any, where: str) -> Any:
    hint = typing.get_type_hints(cls)[key]
    origin = typing.get_origin(hint)
    if origin is typing.Literal:
        if value not in typing.get_args(hint):
            choices = " | ".join(map(str, typing.get_args(hint)))
            raise ConfigError(f"{where}.{key}: must be one of {choices}, got {value!r}")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}.{key}: must be true or false, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}.{key}: must be a number, got {value!r}")
        return float(value)
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}.{key}: must be an integer, got {value!r}")
        return value
    return value


def _make(cls: type[Method], params: dict[str, Any], where: str, base: Method | None = None) -> Method:
    fields = {f.name for f in dataclasses.fields(cls)}
    for key in params:
        if key not in fields:
            known = ", ".join(sorted(fields)) or "none"
            raise ConfigError(f"{where}.{key}: unknown parameter of {cls.name} (known: {known})")
    values = {k: _coerce(cls, k, v, where) for k, v in params.items()}
    method = dataclasses.replace(base, **values) if base is not None else cls(**values)
    try:
        method.check()
    except ValueError as err:
        raise ConfigError(f"{where}.{err}") from None
    return method


class MethodSet:
    """The pipeline's method and its overrides: which method instance merges which tensor
    (first matching override wins)."""

    def __init__(self, default: Method, overrides: list[tuple[str, Method]]):
        self.default = default
        self.overrides = overrides

    def for_tensor(self, name: str) -> Method:
        for pattern, method in self.overrides:
            if fnmatch.fnmatchcase(name, pattern):
                return method
        return self.default

    def check_weights(self, weights: tuple[float, ...]) -> None:
        """Raises:
            ConfigError: the expert weights make a method undefined."""
        for m in self.all():
            if m.exact_experts is not None and len(weights) != m.exact_experts:
                raise ConfigError(f"experts: {m.name} merges exactly {m.exact_experts} experts, "
                                  f"got {len(weights)}")
            try:
                m.check_weights(weights)
            except ValueError as err:
                raise ConfigError(f"experts: {err}") from None

    def all(self) -> list[Method]:
        return [self.default] + [m for _, m in self.overrides]

    @property
    def rounds(self) -> int:
        return max(m.rounds for m in self.all())

    def reduce(self, round: int, totals: dict[str, Any], ctx: dict[str, Any],
               tensors: list[str]) -> dict[str, Any]:
        """Hand each statistics group's totals (keys ``"<group>/<kind>"``) to the method that
        owns the group, in a fixed order; returns the context for the next round."""
        owners = self._owners(tensors, round)
        for group, part in _by_group(totals):
            ctx = owners[group].reduce(round, part, ctx)
        return ctx

    def settle(self, totals: dict[str, Any], ctx: dict[str, Any],
               tensors: list[str]) -> tuple[dict[str, Any], set[str]]:
        """After the merge pass: hand each group's merge statistics (summed over every slice)
        to the method that owns the group, to settle what its context speculated
        (:meth:`Method.settle`); returns the context and every statistics key that marks a
        slice merged with a wrong speculation (see :func:`merged_with_stale`)."""
        owners = self._owners(tensors)
        stale: set[str] = set()
        for group, part in _by_group(totals):
            if group in owners:
                ctx, keys = owners[group].settle(part, ctx)
                stale |= keys
        return ctx, stale

    def _owners(self, tensors: list[str], round: int | None = None) -> dict[str, Method]:
        """group -> the method that owns it (with ``round``: only methods with statistics in
        that round)."""
        owners: dict[str, Method] = {}
        for name in tensors:
            m = self.for_tensor(name)
            if round is None or round < m.rounds:
                owners[m.group(name)] = m
        return owners


def _by_group(totals: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """``totals`` (keys ``"<group>/<kind>"``) split by group, in sorted group order."""
    by_group: dict[str, dict[str, Any]] = {}
    for key, value in totals.items():
        by_group.setdefault(key.rsplit("/", 1)[0], {})[key] = value
    return sorted(by_group.items())

def merged_with_stale(stats: dict[str, Any], stale: set[str]) -> bool:
    """Whether a slice (or block) whose merge pass returned ``stats`` (exact counts: ints or
    int arrays) was merged with a speculation :meth:`MethodSet.settle` found wrong."""
    return any(int(np.asarray(stats.get(k, 0)).sum()) > 0 for k in stale)


def build(name: str, params: dict[str, Any],
          overrides: list[tuple[str, dict[str, Any]]] = ()) -> MethodSet:
    """The method named ``name`` with ``params``, and one instance per override.

    A ``lines`` block in ``params`` (the LiNeS modifier, :mod:`distmerge.methods.lines`) wraps
    the method and every override's instance.

    Raises:
        ConfigError: unknown method or parameter, wrong type or impossible value (the message
            names the key, e.g. ``method.density`` or ``overrides[0].density``).
    """
    cls = REGISTRY.get(name)
    if cls is None:
        raise ConfigError(f"method.name: unknown method {name!r} (known: {', '.join(sorted(REGISTRY))})")
    params = dict(params)
    has_lines, lines = "lines" in params, params.pop("lines", None)
    for i, (_, p) in enumerate(overrides):
        if "lines" in p:
            raise ConfigError(f"overrides[{i}].lines: set lines once, in the method block; "
                              "it applies to every override")
    default = _make(cls, params, "method")
    resolved = [
        (pattern, _make(cls, p, f"overrides[{i}]", base=default))
        for i, (pattern, p) in enumerate(overrides)
    ]
    if has_lines:
        default = wrap_lines(default, lines)
        resolved = [(pattern, wrap_lines(m, lines)) for pattern, m in resolved]
    return MethodSet(default, resolved)
