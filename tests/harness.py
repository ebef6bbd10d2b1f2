"""Run a method's stats → reduce → merge protocol on in-memory tensors, whole or in row blocks.

The same calls the engine makes, without files or workers: lets the method tests check
hand-computed values and that splitting tensors into row blocks changes nothing.
"""

from __future__ import annotations

import torch

from distmerge.methods import Block, MethodSet
from distmerge.reduce import StatsAccumulator


def _blocks(name, base, experts, weights, rows_per_block):
    b2 = base.reshape(base.shape[0], -1) if base.dim() >= 2 else base.reshape(1, -1)
    e2 = torch.stack([e.reshape(b2.shape) for e in experts])
    step = rows_per_block or b2.shape[0]
    for r0 in range(0, b2.shape[0], step):
        yield Block(name=name, base=b2[r0:r0 + step].float(), experts=e2[:, r0:r0 + step].float(),
                    weights=tuple(weights), row_start=r0)


def merge_tensors(methods: MethodSet, base: dict[str, torch.Tensor],
                  experts: list[dict[str, torch.Tensor]], weights=None,
                  rows_per_block: int | None = None) -> dict[str, torch.Tensor]:
    """fp32 merged tensors; ``rows_per_block`` splits every tensor into row blocks, each its
    own slice (stats of every block reduced like the engine's slices)."""
    weights = weights or [1.0] * len(experts)
    ctx: dict = {}
    for rnd in range(methods.rounds):
        acc = StatsAccumulator()
        i = 0
        for name in sorted(base):
            m = methods.for_tensor(name)
            if rnd >= m.rounds:
                continue
            for block in _blocks(name, base[name], [e[name] for e in experts], weights, rows_per_block):
                acc.add(i, m.stats(rnd, block, ctx))
                i += 1
        ctx = methods.reduce(rnd, acc.totals(), ctx, sorted(base))
    out = {}
    for name in sorted(base):
        m = methods.for_tensor(name)
        parts = [m.merge(b, ctx) for b in _blocks(name, base[name], [e[name] for e in experts],
                                                   weights, rows_per_block)]
        out[name] = torch.cat(parts).reshape(base[name].shape)
    return out
