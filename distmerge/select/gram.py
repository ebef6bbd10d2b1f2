"""Exact inner products of row blocks: the statistics Frank-Wolfe scores are built from.

A worker computes, for the rows it holds, every pairwise inner product of m vectors (the base
and the task vectors, or the gradient and the candidates) as exact integers (multiples of
2**-EXACT_SCALE, :mod:`distmerge.reduce`): products of fp32 values are exact in fp64, each row is
summed in fp64 by :func:`distmerge.reduce.row_sums` (a fixed order, and rows are never split),
and the per-row sums are added exactly. Integer totals do not depend on how the tensor was
sliced, the number of workers or the order of arrival, so neither does any selection made from
them.
"""

from __future__ import annotations

import numpy as np
import torch

from distmerge.reduce import exact_sums, exact_value, row_sums


def pairs(m: int) -> list[tuple[int, int]]:
    """The upper triangle (i ≤ j) of an m × m Gram matrix, row by row."""
    return [(i, j) for i in range(m) for j in range(i, m)]


def block_gram(x: torch.Tensor) -> np.ndarray:
    """Exact ⟨x_i, x_j⟩ (i ≤ j, :func:`pairs` order) over a block.  [m, rows, cols] fp32 →
    object [m (m + 1) / 2]"""
    m = x.shape[0]
    x64 = x.double()
    sums = []
    for i in range(m):
        prod = x64[i:i + 1] * x64[i:]                             # [m − i, rows, cols]
        sums.append(row_sums(prod))                               # [m − i, rows]
    rows = torch.cat(sums).cpu().numpy()                          # [m (m + 1) / 2, rows]
    return exact_sums(rows)


def cross_products(g: torch.Tensor, x: torch.Tensor) -> np.ndarray:
    """Exact ⟨g, x_j⟩ for every j, then ⟨g, g⟩ last.  g [rows, cols], x [m, rows, cols] fp32 →
    object [m + 1]"""
    g64 = g.double()
    prod = torch.cat([g64.unsqueeze(0) * x.double(), (g64 * g64).unsqueeze(0)])   # [m + 1, rows, cols]
    return exact_sums(row_sums(prod).cpu().numpy())


def unpack(tri: np.ndarray, m: int) -> np.ndarray:
    """The symmetric fp64 Gram matrix from exact upper-triangle totals (each rounded once).
    → [m, m]"""
    out = np.empty((m, m), dtype=np.float64)
    for k, (i, j) in enumerate(pairs(m)):
        out[i, j] = out[j, i] = exact_value(int(tri[k]))
    return out
