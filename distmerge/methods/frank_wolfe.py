"""Frank-Wolfe pool selection ("FW-Merging: Scaling Model Merging with Frank-Wolfe
Optimization", Chen et al., 2025; code github.com/hmarkc/FW-Merging).

The pool is the pipeline's experts. Each iteration t a linear minimisation oracle picks the
pool model that most decreases a linearised objective (per tensor with ``granularity:
tensor``), and a local task-arithmetic merge moves the current model toward it:
θ^{t+1} = θ^t + scale · γ_t (θ_pick − θ^t), γ_t = step · 2/(t + 2). The merged model stays
θ₀ + Σ_j c_j τ_j (coefficients per tensor), which the merge pass applies slice by slice. The
iteration itself is :mod:`distmerge.select.frank_wolfe`; exact semantics and every choice made
are in docs/METHODS-frank_wolfe.md.

How it runs in the engine's protocol (stats → reduce → merge):

- ``objective: {kind: data_free}`` — one statistics round: every slice returns the exact Gram
  matrix of [θ₀, τ_1..τ_n] over its rows of each tensor (integers, so slice-invariant); the
  driver's ``reduce`` runs all iterations on those numbers (:class:`~distmerge.select.
  objectives.DataFree`); the merge pass applies the coefficients. The pool is read twice in
  all (stats + merge), whatever the number of iterations.
- ``objective: {kind: data}`` — one statistics round per iteration. Before each, the driver's
  gradient stage (:mod:`distmerge.select.gradient`) writes ∇f(θ^t) as a checkpoint in the base's
  layout, which the workers read as one more source (the block's last "expert"); each slice
  returns exact ⟨∇f, θ₀⟩, ⟨∇f, τ_j⟩, ‖∇f‖², ‖θ_j‖² per tensor, and ``reduce`` makes one step.
  Each iteration reads the pool once more (bytes logged per iteration).

Only ``local_merge: task_arithmetic`` is built; ``ties`` is refused with a ConfigError (see
the docs for what it needs). The experts' ``weight`` must stay 1: the method sets every
expert's coefficient itself.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import quote, unquote

import numpy as np
import torch

from distmerge.errors import ConfigError
from distmerge.methods.base import Block, Method, Partial, weighted_sum
from distmerge.reduce import exact_value
from distmerge.select.frank_wolfe import Params, fw_step, initial_coefficients
from distmerge.reduce import row_sums
from distmerge.select.gram import block_gram, cross_products, exact_sums, pairs, unpack
from distmerge.select.objectives import DataFree, scores_from_products

GROUP = "frank_wolfe"
LOSSES = ("cross_entropy", "entropy")


def _default_objective() -> dict[str, Any]:
    return {"kind": "data_free"}


def check_objective(obj: Any) -> None:
    """Raise ValueError("objective...: reason") for a malformed objective block."""
    if not isinstance(obj, dict):
        raise ValueError("objective: must be a mapping with kind: data_free or kind: data")
    kind = obj.get("kind")
    if kind == "data_free":
        unknown = set(obj) - {"kind", "targets"}
        if unknown:
            raise ValueError(f"objective.{sorted(unknown)[0]}: unknown key of a data_free objective "
                             "(known: kind, targets)")
        targets = obj.get("targets")
        if targets is not None:
            if not isinstance(targets, (list, tuple)) or not targets:
                raise ValueError("objective.targets: must be a non-empty list of expert paths "
                                 "(or leave it out: every expert is a target)")
            for i, t in enumerate(targets):
                ok = (isinstance(t, str) and t.strip()) or (isinstance(t, int) and not isinstance(t, bool) and t >= 0)
                if not ok:
                    raise ValueError(f"objective.targets[{i}]: must be an expert's path (or its 0-based "
                                     f"index among the experts), got {t!r}")
            if len(set(map(str, targets))) != len(targets):
                raise ValueError("objective.targets: lists a target twice")
    elif kind == "data":
        unknown = set(obj) - {"kind", "model", "tasks", "batch_size"}
        if unknown:
            raise ValueError(f"objective.{sorted(unknown)[0]}: unknown key of a data objective "
                             "(known: kind, model, tasks, batch_size)")
        model = obj.get("model")
        if not isinstance(model, str) or model.count(":") != 1 or not all(model.split(":")):
            raise ValueError(f"objective.model: must be \"package.module:factory\", got {model!r}")
        tasks = obj.get("tasks")
        if not isinstance(tasks, (list, tuple)) or not tasks:
            raise ValueError("objective.tasks: must be a non-empty list of {data: path, loss: "
                             "cross_entropy | entropy}")
        for i, task in enumerate(tasks):
            if not isinstance(task, dict) or set(task) - {"data", "loss"}:
                raise ValueError(f"objective.tasks[{i}]: must be {{data: path, loss: cross_entropy | entropy}}")
            if not isinstance(task.get("data"), str) or not task["data"].strip():
                raise ValueError(f"objective.tasks[{i}].data: must be the path of a .safetensors file")
            if task.get("loss", "cross_entropy") not in LOSSES:
                raise ValueError(f"objective.tasks[{i}].loss: must be one of {' | '.join(LOSSES)}, "
                                 f"got {task.get('loss')!r}")
        bs = obj.get("batch_size", 256)
        if isinstance(bs, bool) or not isinstance(bs, int) or bs < 1:
            raise ValueError(f"objective.batch_size: must be a positive integer, got {bs!r}")
    else:
        raise ValueError(f"objective.kind: must be data_free or data, got {kind!r}")


def key_of(tensor: str) -> str:
    """The statistics key of a tensor (one model-wide group; the name quoted so that a '/'
    in it cannot split the key)."""
    return f"{GROUP}/{quote(tensor, safe='')}"


def tensor_of(key: str) -> str:
    return unquote(key.split("/", 1)[1])


@dataclass(frozen=True, kw_only=True)
class FrankWolfe(Method):
    name = "frank_wolfe"
    iterations: int = 10
    step: float = 0.1
    scale: float = 0.3
    local_merge: Literal["task_arithmetic", "ties"] = "task_arithmetic"
    granularity: Literal["model", "tensor"] = "model"
    score: Literal["inner", "cosine"] = "inner"
    init: Literal["merge", "base"] = "merge"
    objective: dict = field(default_factory=_default_objective)

    # -- parameters --------------------------------------------------------------------------
    def check(self) -> None:
        if self.iterations < 1 or self.iterations > 100_000:
            raise ValueError("iterations: must be between 1 and 100000")
        for k in ("step", "scale"):
            v = getattr(self, k)
            if not math.isfinite(v) or v <= 0:
                raise ValueError(f"{k}: must be a positive number")
        if self.scale * self.step > 1:
            raise ValueError(f"scale: scale × step = {self.scale * self.step:g} > 1 moves the first "
                             "iteration past the picked model; lower step or scale")
        if self.local_merge == "ties":
            raise ValueError("local_merge: ties is not built yet for frank_wolfe (each iteration "
                             "would need a model-wide trim of θ_pick − θ_t; see docs/"
                             "METHODS-frank_wolfe.md); use task_arithmetic")
        check_objective(self.objective)

    def check_weights(self, weights: tuple[float, ...]) -> None:
        if any(w != 1.0 for w in weights):
            raise ValueError("frank_wolfe sets every expert's coefficient itself: leave the experts' "
                             "weight at 1")

    @property
    def kind(self) -> str:
        return self.objective.get("kind", "data_free")

    @property
    def targets(self) -> tuple[int, ...] | None:
        """0-based target indices (None: every expert). Paths are resolved to indices when the
        pipeline is validated (:func:`distmerge.select.bind_pool`)."""
        t = self.objective.get("targets")
        if t is None:
            return None
        if not all(isinstance(x, int) for x in t):
            raise ValueError("objective.targets: paths were not resolved to experts; validate the "
                             "pipeline (distmerge.select.bind_pool) before merging")
        return tuple(t)

    def fw_params(self) -> Params:
        return Params(iterations=self.iterations, step=self.step, scale=self.scale,
                      granularity=self.granularity, score=self.score)

    @property
    def rounds(self) -> int:
        return 1 if self.kind == "data_free" else self.iterations

    def group(self, tensor: str) -> str:
        return GROUP

    # -- statistics --------------------------------------------------------------------------
    def stats(self, round: int, block: Block, ctx: dict[str, Any]) -> Partial:
        n = len(block.weights)
        pool = block.experts[:n]                                             # [n, rows, cols]
        if self.kind == "data_free":
            x = torch.cat([block.base.unsqueeze(0), pool - block.base.unsqueeze(0)])  # [n + 1, rows, cols]
            return {key_of(block.name): block_gram(x)}
        grad = block.experts[n]                                              # [rows, cols]
        x = torch.cat([block.base.unsqueeze(0), pool - block.base.unsqueeze(0)])
        prods = cross_products(grad, x)                                      # [n + 2]
        p64 = pool.double()
        norms = exact_sums(row_sums(p64 * p64).reshape(n, -1).cpu().numpy())  # [n] ‖θ_j‖² of these rows
        return {key_of(block.name): np.concatenate([prods, norms])}

    def reduce(self, round: int, totals: Partial, ctx: dict[str, Any]) -> dict[str, Any]:
        ctx = dict(ctx)
        if self.kind == "data_free":
            ctx[GROUP] = self._run_data_free(totals)
            return ctx
        return self._data_step(round, totals, ctx)

    def _n_and_names(self, totals: Partial) -> list[str]:
        return sorted(tensor_of(k) for k in totals)

    def _run_data_free(self, totals: Partial) -> dict[str, Any]:
        names = self._n_and_names(totals)
        grams = {}
        for k, tri in totals.items():
            m = (math.isqrt(8 * len(tri) + 1) - 1) // 2                     # len = m (m + 1) / 2
            grams[tensor_of(k)] = unpack(tri, m)
        refuse_equal_task_vectors(totals)
        n = next(iter(grams.values())).shape[0] - 1 if grams else 0
        targets = self.targets if self.targets is not None else tuple(range(n))
        if any(t >= n for t in targets):
            raise ValueError(f"objective.targets: index {max(targets)} outside the {n} experts")
        obj = DataFree(grams=grams, targets=targets)
        coeffs = initial_coefficients(names, n, init=self.init, scale=self.scale)
        trace = []
        for t in range(self.iterations):
            f = obj.value(coeffs)
            coeffs, st = fw_step(t, obj.scores(coeffs), coeffs, self.fw_params())
            trace.append(_record(t, st, f, self.granularity))
        return {"coefficients": {k: v.tolist() for k, v in coeffs.items()}, "trace": trace,
                "final_objective": obj.value(coeffs), "experts": n}

    def _data_step(self, round: int, totals: Partial, ctx: dict[str, Any]) -> dict[str, Any]:
        state = dict(ctx.get(GROUP) or {})
        names = self._n_and_names(totals)
        groups = {}
        n = 0
        for k, arr in totals.items():
            vals = np.array([exact_value(int(v)) for v in arr], dtype=np.float64)
            n = (len(vals) - 2) // 2
            groups[tensor_of(k)] = scores_from_products(vals[:n + 2], vals[n + 2:])
        if "coefficients" not in state:
            state.update(initial_state(self, names, n))
        coeffs = {k: np.asarray(v, dtype=np.float64) for k, v in state["coefficients"].items()}
        f = float(state.get("objective_now", float("nan")))
        coeffs, st = fw_step(round, groups, coeffs, self.fw_params())
        state["coefficients"] = {k: v.tolist() for k, v in coeffs.items()}
        state["trace"] = list(state.get("trace", [])) + [_record(round, st, f, self.granularity)]
        state["experts"] = n
        ctx[GROUP] = state
        return ctx

    # -- merge -------------------------------------------------------------------------------
    def merge(self, block: Block, ctx: dict[str, Any]) -> torch.Tensor:
        n = len(block.weights)
        c = ctx[GROUP]["coefficients"][block.name]
        tau = block.experts[:n] - block.base.unsqueeze(0)                  # [n, rows, cols]
        return block.base + weighted_sum(tau, tuple(float(x) for x in c))

    def params(self) -> dict[str, Any]:
        return {"iterations": self.iterations, "step": self.step, "scale": self.scale,
                "local_merge": self.local_merge, "granularity": self.granularity,
                "score": self.score, "init": self.init, "objective": dict(self.objective)}


def initial_state(method: FrankWolfe, names: list[str], n: int) -> dict[str, Any]:
    """The coefficients of θ^0 for the tensors ``names`` and ``n`` experts (as in ctx)."""
    c = initial_coefficients(sorted(names), n, init=method.init, scale=method.scale)
    return {"coefficients": {k: v.tolist() for k, v in c.items()}}


def refuse_equal_task_vectors(totals: Partial) -> None:
    """Two experts with equal task vectors over the whole model are one model twice: from the
    exact Gram totals, ‖τ_i − τ_j‖² = G_ii + G_jj − 2 G_ij is exactly 0 then (the same products
    give the same row sums).

    Raises:
        ConfigError: naming the two experts (0-based, in the pipeline's order)."""
    if not totals:
        return
    m = (math.isqrt(8 * len(next(iter(totals.values()))) + 1) - 1) // 2
    index = {p: k for k, p in enumerate(pairs(m))}
    summed = [0] * len(index)
    for tri in totals.values():
        for k, v in enumerate(tri):
            summed[k] += int(v)
    for i in range(1, m):
        for j in range(i + 1, m):
            if summed[index[(i, i)]] + summed[index[(j, j)]] - 2 * summed[index[(i, j)]] == 0:
                raise ConfigError(f"experts[{j - 1}] has the same weights as experts[{i - 1}] (equal "
                                  "task vectors in every tensor); frank_wolfe selects from a pool of "
                                  "distinct models: remove the duplicate")


def _record(t: int, st, f: float, granularity: str) -> dict[str, Any]:
    picked: Any = (next(iter(st.picked.values())) if st.picked else None) if granularity == "model" \
        else dict(sorted(st.picked.items()))
    rec = {"iteration": t, "picked": picked, "step": st.gamma, "eta": st.eta,
           "objective": f, "fw_gap": st.gap}
    if granularity == "model":
        rec["moved"] = not st.held
    else:
        rec["held"] = list(st.held)
    return rec
