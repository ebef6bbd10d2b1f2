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

from distmerge.reduce import EXACT_SCALE, exact_value, row_sums

# Per exponent bin, fp64 holds the sum of this many 27-bit halves exactly.
_MAX_ROWS = 1 << 26


def exact_sums(v: np.ndarray) -> np.ndarray:
    """Σ over the last axis of ``v`` for every leading index, each exactly, as Python ints
    (the batched form of :func:`distmerge.reduce.exact_sum`).  [P, R] fp64 → object [P]

    Raises:
        ValueError: a value is NaN or infinite.
    """
    v = np.asarray(v, dtype=np.float64)
    P, R = v.shape
    out = np.empty(P, dtype=object)
    out[:] = [0] * P
    if R == 0 or P == 0:
        return out
    if not np.isfinite(v).all():
        raise ValueError("an inner product of non-finite values")
    for start in range(0, R, _MAX_ROWS):
        part = v[:, start:start + _MAX_ROWS]
        mant, exp = np.frexp(part)
        m = (mant * (1 << 53)).astype(np.int64)                  # exact 53-bit mantissas
        hi, lo = m >> 27, m & ((1 << 27) - 1)
        exps, inv = np.unique(exp, return_inverse=True)
        E = len(exps)
        key = (np.arange(P)[:, None] * E + inv.reshape(part.shape)).ravel()
        sh = np.bincount(key, weights=hi.ravel().astype(np.float64), minlength=P * E).reshape(P, E)
        sl = np.bincount(key, weights=lo.ravel().astype(np.float64), minlength=P * E).reshape(P, E)
        shifts = [int(e) - 53 + EXACT_SCALE for e in exps.tolist()]
        sh_l, sl_l = sh.tolist(), sl.tolist()
        for p in range(P):
            total = 0
            for e in range(E):
                if sh_l[p][e] or sl_l[p][e]:
                    total += ((int(sh_l[p][e]) << 27) + int(sl_l[p][e])) << shifts[e]
            out[p] += total
    return out


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
