"""Row-wise CountSketch of the pool, for the data objective's score rounds (``objective.scoring``).

An iteration of the data objective with the task-arithmetic local merge needs, per tensor,
⟨∇f, θ₀⟩ and ⟨∇f, τ_j⟩ for every candidate: read exactly, that is one pass over the pool per
iteration. With ``scoring: sketch`` the first score round (t = 0) is exact and also sketches
x = [θ₀, τ_1..τ_n] row by row; the workers keep the sketches (about ``ratio / 2`` times smaller
than a bf16 pool) and later rounds read only the gradient:

    tensor T, row r (a 1-D tensor is one row), column c, q_T = ceil(cols_T / ratio)
    z = splitmix64(seed_T + (r · cols_T + c + 1) · 0x9E3779B97F4A7C15)     (uint64, wrapping)
    bucket h = ((z >> 32) · q_T) >> 32 ∈ [0, q_T),  sign s = 1 − 2 (z & 1)
    (S x)_r[b] = Σ_{c: h(r, c) = b} s(r, c) · x_r[c]     (fp64, columns in order; stored fp32)
    ⟨g, x⟩ ≈ Σ_r ⟨(S g)_r, (S x)_r⟩                     (per row in fp64, rows added exactly)

seed_T is the first 8 bytes of blake2b(tensor name): stable across processes and machines.
Every sketched value depends on its row only, and rows are never split across slices, so the
estimates — like the exact products — do not depend on the slicing, the worker or the device.

Error (over the hash, modelled as random): per row the estimate is unbiased and
Var ≤ (‖g_r‖²‖x_r‖² + ⟨g_r, x_r⟩²) / q ≤ 2 ‖g_r‖²‖x_r‖² / q; rows hash independently, so
σ(⟨g, x⟩) ≤ sqrt(Σ_r 2 ‖g_r‖²‖x_r‖² / q_T). Workers return those variance bounds exactly summed
(:func:`sketched_products`); :func:`uncertainty` turns them into σ per candidate score.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from distmerge.reduce import row_sums
from distmerge.select.frank_wolfe import GroupScores, argmin_first, scores
from distmerge.select.gram import exact_sums

SCORING = ("auto", "exact", "sketch")
DEFAULT_RATIO = 16

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def check_scoring(obj: dict[str, Any]) -> None:
    """Raise ValueError("objective.<key>: reason") for a bad ``scoring`` or ``sketch_ratio`` of
    an objective block (only the data objective takes them)."""
    if obj.get("kind") != "data":
        for key in ("scoring", "sketch_ratio"):
            if key in obj:
                raise ValueError(f"objective.{key}: only for kind: data (the data-free objective reads "
                                 "the pool once, whatever the number of iterations: nothing to sketch)")
        return
    if obj.get("scoring", "auto") not in SCORING:
        raise ValueError(f"objective.scoring: must be one of {' | '.join(SCORING)} (how iterations after "
                         f"the first score the pool: auto, re-read it, a kept sketch), got "
                         f"{obj.get('scoring')!r}")
    ratio = obj.get("sketch_ratio", DEFAULT_RATIO)
    if isinstance(ratio, bool) or not isinstance(ratio, int) or ratio < 2:
        raise ValueError(f"objective.sketch_ratio: must be an integer ≥ 2 (columns per sketch "
                         f"bucket), got {ratio!r}")


def buckets(cols: int, ratio: int) -> int:
    """q = ceil(cols / ratio), at least 1."""
    return max(1, -(-cols // ratio))


def seed_of(tensor: str) -> int:
    """The tensor's hash seed: the first 8 bytes of blake2b(name), little-endian."""
    return int.from_bytes(hashlib.blake2b(tensor.encode(), digest_size=8).digest(), "little")


def splitmix64(z: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser on uint64 (wrapping arithmetic).  [...] → [...]"""
    with np.errstate(over="ignore"):
        z = (z ^ (z >> np.uint64(30))) * _M1
        z = (z ^ (z >> np.uint64(27))) * _M2
        return z ^ (z >> np.uint64(31))


def bucket_sign(tensor: str, cols: int, q: int, r0: int, r1: int) -> tuple[np.ndarray, np.ndarray]:
    """Bucket and sign of every entry of rows ``r0..r1`` of ``tensor``.
    → h int64 [rows, cols] in [0, q), s fp64 [rows, cols] in {−1, +1}"""
    rows = np.arange(r0, r1, dtype=np.uint64)[:, None]
    index = rows * np.uint64(cols) + np.arange(cols, dtype=np.uint64)[None, :]     # [rows, cols]
    with np.errstate(over="ignore"):
        z = splitmix64(np.uint64(seed_of(tensor)) + (index + np.uint64(1)) * _GOLDEN)
    h = (((z >> np.uint64(32)) * np.uint64(q)) >> np.uint64(32)).astype(np.int64)
    s = 1.0 - 2.0 * (z & np.uint64(1)).astype(np.float64)
    return h, s


def sketch_rows(x: np.ndarray, h: np.ndarray, s: np.ndarray, q: int) -> np.ndarray:
    """(S x_i)_r for every vector i and row r: per vector one ``np.bincount`` over the block
    flattened row-major (key r·q + h), so within a bucket the terms are added in column order.
    x fp64 [m, rows, cols] → fp64 [m, rows, q]"""
    m, rows, cols = x.shape
    key = (np.arange(rows, dtype=np.int64)[:, None] * q + h).reshape(-1)          # [rows·cols]
    out = np.empty((m, rows, q))
    for i in range(m):                                     # one vector at a time: less memory
        out[i] = np.bincount(key, weights=(x[i] * s).reshape(-1), minlength=rows * q).reshape(rows, q)
    return out


def _f64(t: torch.Tensor) -> np.ndarray:
    return t.detach().to("cpu", torch.float64).numpy()


@dataclass(frozen=True, kw_only=True)
class PoolSketch:
    """What a worker keeps of a block of the pool between score rounds."""

    q: int
    y: np.ndarray        # fp32 [n + 1, rows, q]: S θ₀, S τ_1..S τ_n
    sq: np.ndarray       # fp64 [2n + 1, rows]: ‖θ₀_r‖², ‖τ_{j,r}‖², ‖θ_{j,r}‖² (row_sums order)

    @property
    def nbytes(self) -> int:
        return self.y.nbytes + self.sq.nbytes


def sketch_pool(name: str, row_start: int, base: torch.Tensor, pool: torch.Tensor, ratio: int) -> PoolSketch:
    """The sketch of a block of the pool. base [rows, cols], pool [n, rows, cols] fp32 (θ_j);
    τ_j = θ_j − θ₀ in fp32, as the exact score round computes it."""
    rows, cols = base.shape
    q = buckets(cols, ratio)
    x = torch.cat([base.unsqueeze(0), pool - base.unsqueeze(0)])                   # [n + 1, rows, cols]
    x64 = _f64(x)
    h, s = bucket_sign(name, cols, q, row_start, row_start + rows)
    y = sketch_rows(x64, h, s, q).astype(np.float32)
    p64 = _f64(pool)
    sq = np.concatenate([row_sums(torch.from_numpy(x64 * x64)).numpy(),
                         row_sums(torch.from_numpy(p64 * p64)).numpy()])           # [2n + 1, rows]
    return PoolSketch(q=q, y=y, sq=sq)


def sketched_products(name: str, row_start: int, kept: PoolSketch, g: torch.Tensor) -> np.ndarray:
    """A score round from the kept sketch and the gradient's rows g [rows, cols]:
    [⟨Sg, Sθ₀⟩, ⟨Sg, Sτ_1⟩..⟨Sg, Sτ_n⟩, ‖g‖² (exact), V_θ₀, V_τ_1..V_τ_n, V_θ_1..V_θ_n], each
    an exact sum over rows (object ints, :mod:`distmerge.select.gram`), V_x = Σ_r 2‖g_r‖²‖x_r‖²/q
    the variance bound of ⟨g, x⟩'s estimate.  → object [3n + 3]"""
    rows, cols = g.shape
    g64 = _f64(g)
    h, s = bucket_sign(name, cols, kept.q, row_start, row_start + rows)
    sg = sketch_rows(g64[None], h, s, kept.q)[0].astype(np.float32).astype(np.float64)   # [rows, q]
    prods = row_sums(torch.from_numpy(sg[None] * kept.y.astype(np.float64))).numpy()     # [n + 1, rows]
    gg = row_sums(torch.from_numpy(g64 * g64)).numpy()                                   # [rows]
    var = 2.0 * gg[None] * kept.sq / kept.q                                              # [2n + 1, rows]
    return exact_sums(np.concatenate([prods, gg[None], var]))


# -- the driver side ---------------------------------------------------------------------------

def uncertainty(groups: dict[str, GroupScores], variances: dict[str, np.ndarray] | None, *,
                rule: str, granularity: str) -> dict[str, Any]:
    """What the trace records about a score round's decision: the candidates' scores (summed
    over tensors for ``model``, per tensor for ``tensor``), the margin between the pick and the
    runner-up and, for a sketched round (``variances``: per tensor [V_θ₀, V_τ.., V_θ..]), σ per
    candidate (Σ over tensors in quadrature) and ``certain``: margin ≥ 3 σ(difference), with
    σ(difference) ≤ σ_pick + σ_runner-up (whatever their correlation)."""
    names = sorted(groups)
    per: dict[str, tuple[np.ndarray, np.ndarray | None]] = {}
    for name in names:
        g = groups[name]
        n = len(g.inner)
        var = None
        if variances is not None:
            v = np.asarray(variances[name], dtype=np.float64)
            if rule == "inner":
                var = v[1:n + 1].copy()
            else:                                            # cos: ⟨g, θ_j⟩ / (‖g‖ ‖θ_j‖)
                den = max(g.grad_sq, 0.0) * np.maximum(g.weight_sq, 0.0)
                var = np.zeros(n)
                np.divide(v[n + 1:], den, out=var, where=den > 0)
        per[name] = (scores(g, rule), var)

    def decide(total: np.ndarray, var: np.ndarray | None) -> dict[str, Any]:
        out: dict[str, Any] = {"scores": total.tolist()}
        j = argmin_first(total)
        rest = [k for k in range(len(total)) if k != j]
        r = min(rest, key=lambda k: (total[k], k)) if rest else None
        out["margin"] = float(total[r] - total[j]) if r is not None else None
        if var is not None:
            sigma = np.sqrt(var)
            out["sigma"] = sigma.tolist()
            sd = float(sigma[j] + sigma[r]) if r is not None else 0.0
            out["certain"] = r is None or out["margin"] >= 3 * sd
        return out

    if granularity == "model":
        n = len(next(iter(groups.values())).inner) if groups else 0
        total, var = np.zeros(n), (np.zeros(n) if variances is not None else None)
        for name in names:                                   # the order fw_pick sums in
            total += per[name][0]
            if var is not None:
                var += per[name][1]
        return decide(total, var)
    each = {name: decide(*per[name]) for name in names}
    out = {k: {name: each[name][k] for name in names} for k in ("scores", "margin")}
    if variances is not None:
        out["sigma"] = {name: each[name]["sigma"] for name in names}
        out["certain"] = all(each[name]["certain"] for name in names)
        out["uncertain_tensors"] = [name for name in names if not each[name]["certain"]]
    return out


@dataclass(frozen=True, kw_only=True)
class ScoringChoice:
    """How the score rounds of a run are computed, and the figures the choice used."""

    requested: str              # auto | exact | sketch
    scoring: str                # exact | sketch
    reason: str
    ratio: int
    reread_bytes: int           # pool bytes a score round reads from storage beyond the resident budget
    pool_bytes: int             # the pool's float-tensor bytes (what an exact score round reads)
    remote_bytes: int           # of which behind URLs (object stores, the Hub)
    resident_budget: int        # what the workers may keep, all of them together
    sketch_bytes: int           # what the sketch keeps
    rel_error: tuple[float, float]   # sqrt(2/q): the widest tensors' to the narrowest's
    # sqrt(2/(q·rows)): a whole tensor's, when its rows carry even norms (largest to smallest)
    tensor_error: tuple[float, float] = (0.0, 0.0)

    def as_dict(self) -> dict[str, Any]:
        return {"requested": self.requested, "scoring": self.scoring, "reason": self.reason,
                "sketch_ratio": self.ratio, "reread_bytes_per_iteration": self.reread_bytes,
                "pool_bytes": self.pool_bytes, "remote_pool_bytes": self.remote_bytes,
                "resident_budget_bytes": self.resident_budget, "sketch_bytes": self.sketch_bytes,
                "relative_error": list(self.rel_error),
                "tensor_relative_error_even_rows": list(self.tensor_error)}


def rows_cols(shape: tuple[int, ...]) -> tuple[int, int]:
    """A tensor as the engine slices it: rows along dim 0 (a 0-D or 1-D tensor is one row)."""
    rows = shape[0] if len(shape) >= 2 else 1
    return rows, (math.prod(shape) // rows if rows else 0)


def sketch_bytes_for(shapes: list[tuple[int, ...]], n: int, ratio: int) -> int:
    """Bytes of the kept sketch of a pool of ``n`` experts over float tensors of ``shapes``:
    per row (n + 1) q fp32 values and 2n + 1 fp64 row norms."""
    total = 0
    for shape in shapes:
        rows, cols = rows_cols(shape)
        total += rows * ((n + 1) * buckets(cols, ratio) * 4 + (2 * n + 1) * 8)
    return total


def choose_scoring(requested: str, *, applicable: str | None, ratio: int, shapes: list[tuple[int, ...]],
                   n: int, pool_bytes: int, remote_bytes: int, resident_budget: int) -> ScoringChoice:
    """``auto``: sketch when an exact score round would read from storage pool bytes that are
    not resident (models behind URLs that exceed the workers' resident budget; local files are
    left to the page cache and count as cheap) and the sketch fits the budget; else exact.
    ``applicable``: None when sketching can serve this run, else why not (then always exact)."""
    rcs = [rows_cols(s) for s in shapes]
    qs = [buckets(c, ratio) for r, c in rcs if r] or [1]
    rel = (math.sqrt(2 / max(qs)), math.sqrt(2 / min(qs)))
    features = [buckets(c, ratio) * r for r, c in rcs if r] or [1]
    whole = (math.sqrt(2 / max(features)), math.sqrt(2 / min(features)))
    kept = sketch_bytes_for(shapes, n, ratio)
    reread = max(0, remote_bytes - resident_budget)
    if applicable is not None:
        scoring, reason = "exact", applicable
    elif requested != "auto":
        scoring, reason = requested, f"scoring: {requested} in the pipeline"
    elif reread == 0:
        scoring, reason = "exact", ("the pool is local (the page cache keeps it)" if remote_bytes == 0
                                    else "the pool's remote part stays resident")
    elif kept > resident_budget:
        scoring, reason = "exact", "the sketch does not fit the resident budget either"
    else:
        scoring, reason = "sketch", "re-reading reads non-resident pool bytes every iteration; the sketch fits"
    return ScoringChoice(requested=requested, scoring=scoring, reason=reason, ratio=ratio,
                         reread_bytes=reread, pool_bytes=pool_bytes, remote_bytes=remote_bytes,
                         resident_budget=resident_budget, sketch_bytes=kept, rel_error=rel,
                         tensor_error=whole)
