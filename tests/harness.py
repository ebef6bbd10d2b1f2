"""Run a method's stats → reduce → merge protocol on in-memory tensors, whole or in row blocks.

The same calls the engine makes, without files or workers: lets the method tests check
hand-computed values and that splitting tensors into row blocks changes nothing.
"""

from __future__ import annotations

import torch

from distmerge.methods import Block, MethodSet, merged_with_stale
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
    own slice (stats of every block reduced like the engine's slices). Like the engine, the
    merge statistics settle a speculated context (ties ``scope: model``) after the merge pass
    and the blocks merged with a wrong one are merged again (their count: ``merge_tensors.redone``)."""
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
    # the merge pass, each block with its exact merge statistics (the engine's slices)
    merged: dict[tuple[str, int], tuple[torch.Tensor, dict]] = {}
    blocks: dict[tuple[str, int], Block] = {}
    for name in sorted(base):
        m = methods.for_tensor(name)
        for block in _blocks(name, base[name], [e[name] for e in experts], weights, rows_per_block):
            key = (name, block.row_start)
            blocks[key] = block
            merged[key] = m.merge_with_stats(_copy(block), ctx)
    # settle what the context speculated; merge again the blocks merged with a wrong value
    totals: dict = {}
    for _, stats in merged.values():
        for k, v in stats.items():
            totals[k] = totals[k] + v if k in totals else v
    ctx, stale = methods.settle(totals, ctx, sorted(base))
    redone = 0
    for key, (_, stats) in list(merged.items()):
        if merged_with_stale(stats, stale):
            merged[key] = methods.for_tensor(key[0]).merge_with_stats(_copy(blocks[key]), ctx)
            redone += 1
    merge_tensors.redone = redone
    out = {}
    for name in sorted(base):
        parts = [merged[k][0] for k in sorted(k for k in merged if k[0] == name)]
        out[name] = torch.cat(parts).reshape(base[name].shape)
    return out


def _copy(block: Block) -> Block:
    """A block whose tensors a method may overwrite, keeping the original for a redo."""
    return Block(name=block.name, base=block.base.clone(), experts=block.experts.clone(),
                 weights=block.weights, row_start=block.row_start)
