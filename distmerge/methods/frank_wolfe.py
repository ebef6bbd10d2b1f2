"""Frank-Wolfe pool selection ("FW-Merging: Scaling Model Merging with Frank-Wolfe
Optimization", Chen et al., 2025; code github.com/hmarkc/FW-Merging).

The pool is the pipeline's experts. Each iteration t a linear minimisation oracle picks the
pool model that most decreases a linearised objective (per tensor with ``granularity:
tensor``), and a local task-arithmetic merge moves the current model toward it:
θ^{t+1} = θ^t + scale · γ_t (θ_pick − θ^t), γ_t = step · 2/(t + 2). The merged model stays
θ₀ + Σ_j c_j τ_j (coefficients per tensor), which the merge pass applies slice by slice. The
iteration itself is :mod:`distmerge.select.frank_wolfe`; exact semantics and every choice made
are in distmerge/select/FRANK_WOLFE.md.

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
  Each iteration reads the pool once more (bytes logged per iteration), unless the run's
  ``objective.scoring`` resolves to ``sketch`` (:mod:`distmerge.select.sketch`): the exact
  first score round also keeps a row-wise CountSketch of [θ₀, τ_1..τ_n] in the workers
  (``Method.derivative`` "keep"), and later rounds score from it and the gradient alone ("use"),
  returning the variance bounds the trace turns into σ per candidate.

- ``local_merge: ties`` — the model is no longer a combination of the pool: θ^{t+1} =
  θ^t + scale·γ_t · trim(θ_pick − θ^t), the trim keeping the entries of |θ_pick − θ^t| at or
  above its model-wide (n − int(density·n))-th smallest value (the authors' ``ties_merge`` of
  one model: trim, then elect and disjoint mean, which for one model keep the trimmed vector).
  The workers replay θ^t on each block from the driver's record (the initial TIES merge's
  thresholds, then each iteration's pick, η and threshold; elementwise in fp32), so each
  iteration is three statistics rounds: the scores at θ^t (⟨D, ·⟩ with D = θ^t − θ₀ for the
  data-free objective; ⟨∇f, ·⟩ and ⟨∇f, D⟩ for the data one), then the two radix-select rounds
  of the trim threshold (:mod:`distmerge.reduce`). ``init: merge`` adds the three rounds of
  the initial TIES merge (model scope, ``density``, ``scale``). Each round reads the pool.

The experts' ``weight`` must stay 1: the method sets every expert's coefficient itself.
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
from distmerge.methods.ties import ExactSignTies, Ties
from distmerge.reduce import abs_bits, bits_to_float, exact_value, histogram16, row_sums, select_bucket
from distmerge.select.frank_wolfe import GroupScores, Params, fw_pick, fw_step, initial_coefficients
from distmerge.select.gram import block_gram, cross_products, exact_sums, pairs, unpack
from distmerge.select.objectives import DataFree, data_free_at, scores_from_products
from distmerge.select.sketch import DEFAULT_RATIO, check_scoring, sketch_pool, sketched_products, uncertainty

GROUP = "frank_wolfe"
LOSSES = ("cross_entropy", "entropy")
GRADIENT_MODES = ("auto", "single", "sharded")


def _default_objective() -> dict[str, Any]:
    return {"kind": "data_free"}


def check_objective(obj: Any) -> None:
    """Raise ValueError("objective...: reason") for a malformed objective block."""
    if not isinstance(obj, dict):
        raise ValueError("objective: must be a mapping with kind: data_free or kind: data")
    kind = obj.get("kind")
    if kind == "data_free":
        check_scoring(obj)
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
        unknown = set(obj) - {"kind", "model", "tasks", "batch_size", "gradient", "scoring", "sketch_ratio"}
        if unknown:
            raise ValueError(f"objective.{sorted(unknown)[0]}: unknown key of a data objective "
                             "(known: kind, model, tasks, batch_size, gradient, scoring, sketch_ratio)")
        check_scoring(obj)
        if obj.get("gradient", "auto") not in GRADIENT_MODES:
            raise ValueError(f"objective.gradient: must be one of {' | '.join(GRADIENT_MODES)} (where "
                             f"∇f is computed: auto, the driver, FSDP ranks), got {obj.get('gradient')!r}")
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
    """The statistics key of a tensor (one model-wide group; the name quoted so that neither a
    '/' nor a ':' in it can split the key or meet the model-wide keys ``init:``/``trim:``)."""
    return f"{GROUP}/t:{quote(tensor, safe='')}"


def tensor_of(key: str) -> str:
    return unquote(key.split("/", 1)[1][2:])


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
    density: float = 0.3
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
        if not 0.0 <= self.density <= 1.0:
            raise ValueError("density: must be between 0 and 1")
        check_objective(self.objective)
        if self.scoring == "sketch" and self.local_merge == "ties":
            raise ValueError("objective.scoring: sketch needs local_merge: task_arithmetic (the TIES "
                             "local merge's trim rounds read θ^t's rows, so its iterations re-read "
                             "the pool anyway); use scoring: exact or auto")

    def check_weights(self, weights: tuple[float, ...]) -> None:
        if any(w != 1.0 for w in weights):
            raise ValueError("frank_wolfe sets every expert's coefficient itself: leave the experts' "
                             "weight at 1")

    @property
    def kind(self) -> str:
        return self.objective.get("kind", "data_free")

    @property
    def scoring(self) -> str:
        """``objective.scoring`` as asked (auto | exact | sketch; the run resolves auto)."""
        return self.objective.get("scoring", "auto") if self.kind == "data" else "exact"

    @property
    def sketch_ratio(self) -> int:
        return int(self.objective.get("sketch_ratio", DEFAULT_RATIO))

    def can_sketch(self) -> str | None:
        """None when the score rounds can use a sketch, else why not."""
        if self.kind != "data":
            return "the data-free objective reads the pool once"
        if self.local_merge == "ties":
            return "the TIES local merge's trim rounds read θ^t's rows (always exact)"
        if self.iterations < 2:
            return "one iteration: its score round is exact"
        return None

    @property
    def targets(self) -> tuple[int, ...] | None:
        """0-based target indices (None: every expert). Paths are resolved to indices when the
        pipeline is validated (:func:`distmerge.select.pool.bind_pool`)."""
        t = self.objective.get("targets")
        if t is None:
            return None
        if not all(isinstance(x, int) for x in t):
            raise ValueError("objective.targets: paths were not resolved to experts; validate the "
                             "pipeline (distmerge.select.pool.bind_pool) before merging")
        return tuple(t)

    def fw_params(self) -> Params:
        return Params(iterations=self.iterations, step=self.step, scale=self.scale,
                      granularity=self.granularity, score=self.score)

    # -- the rounds ----------------------------------------------------------------------------
    @property
    def _offset(self) -> int:
        """Rounds before iteration 0's score round (local_merge ties)."""
        if self.init == "merge":
            return 3                                   # the TIES merge of the pool: 3 rounds
        return 1 if self.kind == "data_free" else 0    # data-free: the Gram round

    @property
    def rounds_per_iteration(self) -> int:
        """Statistics rounds each iteration costs: 0 (data-free task arithmetic: the driver
        iterates on the Gram), 1 (the data objective's score round), 3 (ties: score + trim)."""
        if self.local_merge == "task_arithmetic":
            return 0 if self.kind == "data_free" else 1
        return 3

    @property
    def rounds(self) -> int:
        if self.local_merge == "task_arithmetic":
            return 1 if self.kind == "data_free" else self.iterations
        return self._offset + self.rounds_per_iteration * self.iterations

    def phase(self, round: int) -> tuple[str, int]:
        """What statistics round ``round`` computes, and its iteration:
        ``gram`` (data-free: the Gram of [θ₀, τ], with the initial TIES merge's first round),
        ``init_high``/``init_low``/``init_sign`` (the initial TIES merge), ``score`` (the
        gradient's inner products at θ^t), ``trim_high``/``trim_low`` (the TIES local merge's
        model-wide threshold of |θ_pick − θ^t|)."""
        if self.local_merge == "task_arithmetic":
            return ("gram", 0) if self.kind == "data_free" else ("score", round)
        if round < self._offset:
            if round == 0:
                return ("gram", 0) if self.kind == "data_free" else ("init_high", 0)
            return ("init_low", 0) if round == 1 else ("init_sign", 0)
        t, k = divmod(round - self._offset, 3)
        return (("score", "trim_high", "trim_low")[k], t)

    def is_score_round(self, round: int) -> bool:
        return self.phase(round)[0] == "score"

    def group(self, tensor: str) -> str:
        return GROUP

    def _ties(self) -> Ties:
        """The initial merge of the pool (init: merge, local_merge: ties): TIES, model scope,
        with its sign round (init_sign): its merge runs inside statistics rounds, where a
        speculated majority could not be merged again."""
        return ExactSignTies(density=self.density, scope="model", scale=self.scale)

    # -- statistics --------------------------------------------------------------------------
    def stats(self, round: int, block: Block, ctx: dict[str, Any]) -> Partial:
        n = len(block.weights)
        pool = block.experts[:n]                                             # [n, rows, cols]
        state = ctx.get(GROUP) or {}
        phase, t = self.phase(round)
        if phase in ("gram", "score"):
            x = torch.cat([block.base.unsqueeze(0), pool - block.base.unsqueeze(0)])  # [n + 1, rows, cols]
        out: Partial = {}
        if phase == "gram":
            out[key_of(block.name)] = block_gram(x)
            if self.local_merge == "ties" and self.init == "merge":
                out.update(self._init_stats(0, block, state))
            return out
        if phase.startswith("init_"):
            return self._init_stats(("init_high", "init_low", "init_sign").index(phase), block, state)
        if phase == "score":
            if self.kind == "data_free":                                     # ties: ⟨D, ·⟩, D = θ^t − θ₀
                delta = self._theta(block, state, t) - block.base
                return {key_of(block.name): cross_products(delta, x)}
            grad = block.experts[n]                                          # [rows, cols]
            if self.local_merge == "ties":
                delta = self._theta(block, state, t) - block.base
                x = torch.cat([x, delta.unsqueeze(0)])                       # [n + 2, rows, cols]
            prods = cross_products(grad, x)                                  # [len(x) + 1]
            if t > 0:                              # ‖θ_j‖² do not change: the driver kept them
                return {key_of(block.name): prods}
            p64 = pool.double()
            norms = exact_sums(row_sums(p64 * p64).reshape(n, -1).cpu().numpy())  # [n] ‖θ_j‖² of these rows
            return {key_of(block.name): np.concatenate([prods, norms])}
        # the TIES local merge's trim of x = θ_pick − θ^t, over the whole model
        pend = state["pending"]
        if block.name in pend["held"]:
            diff = block.base[:0]                                            # no entries
        else:
            diff = block.experts[pend["picked"][block.name]] - self._theta(block, state, t)
        bits = abs_bits(diff)
        if phase == "trim_high":
            return {f"{GROUP}/trim:high": histogram16(bits >> 16)}
        bucket = pend["bucket"]
        inside = bits[(bits >> 16) == bucket] if bucket >= 0 else bits.reshape(-1)[:0]
        return {f"{GROUP}/trim:low": histogram16(inside & 0xFFFF)}

    def _init_stats(self, r: int, block: Block, state: dict[str, Any]) -> Partial:
        ties = self._ties()
        n = len(block.weights)
        pool = Block(name=block.name, base=block.base, experts=block.experts[:n], weights=block.weights,
                     row_start=block.row_start)
        part = ties.stats(r, pool, state.get("init", {}))
        return {f"{GROUP}/init:{k.rsplit('/', 1)[1]}": v for k, v in part.items()}

    # -- kept sketches of the pool (objective.scoring: sketch; see Method.derivative) ----------
    def derivative(self, round: int, ctx: dict[str, Any]) -> str | None:
        """With the run's scoring resolved to ``sketch`` (``ctx``; task arithmetic, data
        objective): the exact first score round keeps each block's sketch, later ones use it."""
        if self.kind != "data" or self.local_merge != "task_arithmetic":
            return None
        if (ctx.get(GROUP) or {}).get("scoring") != "sketch":
            return None
        if round == 0:
            return "keep" if self.iterations > 1 else None
        return "use"

    def derive(self, block: Block, ctx: dict[str, Any]) -> Any:
        n = len(block.weights)
        return sketch_pool(block.name, block.row_start, block.base, block.experts[:n], self.sketch_ratio)

    def stats_derived(self, round: int, derived: Any, extras: torch.Tensor, *, name: str,
                      row_start: int, ctx: dict[str, Any]) -> Partial:
        return {key_of(name): sketched_products(name, row_start, derived, extras[0])}   # extras[0]: ∇f

    def reduce(self, round: int, totals: Partial, ctx: dict[str, Any]) -> dict[str, Any]:
        ctx = dict(ctx)
        if self.local_merge == "task_arithmetic":
            if self.kind == "data_free":
                ctx[GROUP] = self._run_data_free(totals)
                return ctx
            return self._data_step(round, totals, ctx)
        state = dict(ctx.get(GROUP) or {})
        state.setdefault("history", [])
        state.setdefault("trace", [])
        phase, t = self.phase(round)
        tensors = {tensor_of(k): v for k, v in totals.items() if k.split("/", 1)[1].startswith("t:")}
        init = {k: v for k, v in totals.items() if k.split("/", 1)[1].startswith("init:")}
        if phase == "gram":
            refuse_equal_task_vectors(tensors)
            state["grams"] = {name: unpack(tri, _m(len(tri))).tolist() for name, tri in sorted(tensors.items())}
        if init or phase.startswith("init_"):
            ties = self._ties()
            g0 = ties.group("")
            r = 0 if phase == "gram" else ("init_high", "init_low", "init_sign").index(phase)
            inner = {f"{g0}/{k.rsplit(':', 1)[1]}": v for k, v in init.items()}
            state["init"] = ties.reduce(r, inner, state.get("init", {}))
        if phase == "score":
            state = self._ties_score(t, tensors, state)
        elif phase == "trim_high":
            hist = totals[f"{GROUP}/trim:high"]
            k = self._trim_rank(int(hist.sum()))
            b, r = select_bucket(hist, k) if k else (-1, 0)
            state["pending"] = {**state["pending"], "bucket": b, "rank": r}
        elif phase == "trim_low":
            pend = state["pending"]
            hist = totals[f"{GROUP}/trim:low"]
            thr = 0.0 if pend["bucket"] < 0 else bits_to_float((pend["bucket"] << 16) | select_bucket(hist, pend["rank"])[0])
            state["history"] = state["history"] + [{"picked": pend["picked"], "eta": pend["eta"],
                                                    "held": pend["held"], "threshold": thr}]
            state["trace"] = state["trace"][:-1] + [{**state["trace"][-1], "threshold": thr}]
            state.pop("pending")
        ctx[GROUP] = state
        return ctx

    def _trim_rank(self, n: int) -> int:
        """The 1-indexed rank of the trim threshold among n entries (0: keep every entry): the
        (n − m)-th smallest |x|, m = int(density · n), as TIES with model scope."""
        m = int(self.density * n)
        return 0 if m == n else n - m

    def _ties_score(self, t: int, tensors: dict[str, np.ndarray], state: dict[str, Any]) -> dict[str, Any]:
        groups = {}
        f = 0.0
        for name in sorted(tensors):
            vals = np.array([exact_value(int(v)) for v in tensors[name]], dtype=np.float64)
            if self.kind == "data_free":
                n = len(vals) - 2
                targets = self.targets if self.targets is not None else tuple(range(n))
                fg, groups[name] = data_free_at(np.asarray(state["grams"][name]), vals, targets)
                f += fg
            else:                                   # [gθ₀, gτ_1..gτ_n, gD, gg, (t = 0: ‖θ_1‖²..‖θ_n‖²)]
                n = (len(vals) - 3) // 2 if t == 0 else len(vals) - 3
                if t == 0:
                    state["weight_sq"] = {**state.get("weight_sq", {}), name: vals[n + 3:].tolist()}
                groups[name] = GroupScores(inner=vals[1:n + 1], grad_base=float(vals[0]),
                                           grad_sq=float(vals[n + 2]),
                                           weight_sq=np.asarray(state["weight_sq"][name], dtype=np.float64),
                                           grad_delta=float(vals[n + 1]))
        if self.kind == "data":
            f = float(state.get("objective_now", float("nan")))
        st = fw_pick(t, groups, self.fw_params())
        state["pending"] = {"picked": dict(st.picked), "eta": st.eta, "held": list(st.held)}
        state["trace"] = state["trace"] + [_record(t, st, f, self.granularity)]
        state["experts"] = len(next(iter(groups.values())).inner) if groups else 0
        return state

    def _n_and_names(self, totals: Partial) -> list[str]:
        return sorted(tensor_of(k) for k in totals)

    def _run_data_free(self, totals: Partial) -> dict[str, Any]:
        names = self._n_and_names(totals)
        grams = {}
        tensors = {tensor_of(k): v for k, v in totals.items()}
        for name, tri in tensors.items():
            grams[name] = unpack(tri, _m(len(tri)))
        refuse_equal_task_vectors(tensors)
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
        scoring = state.get("scoring")                   # set by the run (select.pool.Selection)
        sketched = scoring == "sketch" and round >= 1
        variances: dict[str, np.ndarray] | None = {} if sketched else None
        weight_sq = dict(state.get("weight_sq", {}))     # ‖θ_j‖²: exact, from the first round
        for k, arr in totals.items():
            vals = np.array([exact_value(int(v)) for v in arr], dtype=np.float64)
            name = tensor_of(k)
            if variances is not None:              # [⟨Sg,Sθ₀⟩, ⟨Sg,Sτ_j⟩.., ‖g‖², V_θ₀, V_τ_j.., V_θ_j..]
                n = (len(vals) - 3) // 3
                groups[name] = GroupScores(inner=vals[1:n + 1], grad_base=float(vals[0]),
                                           grad_sq=float(vals[n + 1]),
                                           weight_sq=np.asarray(weight_sq[name], dtype=np.float64))
                variances[name] = vals[n + 2:]
            else:                                  # [⟨g,θ₀⟩, ⟨g,τ_j⟩.., ‖g‖², (round 0: ‖θ_j‖²..)]
                n = (len(vals) - 2) // 2 if round == 0 else len(vals) - 2
                if round == 0:
                    weight_sq[name] = vals[n + 2:].tolist()
                groups[name] = scores_from_products(vals[:n + 2], np.asarray(weight_sq[name], dtype=np.float64))
        state["weight_sq"] = weight_sq
        if "coefficients" not in state:
            state.update(initial_state(self, names, n))
        coeffs = {k: np.asarray(v, dtype=np.float64) for k, v in state["coefficients"].items()}
        f = float(state.get("objective_now", float("nan")))
        coeffs, st = fw_step(round, groups, coeffs, self.fw_params())
        state["coefficients"] = {k: v.tolist() for k, v in coeffs.items()}
        rec = _record(round, st, f, self.granularity)
        if scoring is not None:
            rec["scoring"] = "sketch" if sketched else "exact"
            rec.update(uncertainty(groups, variances, rule=self.score, granularity=self.granularity))
        state["trace"] = list(state.get("trace", [])) + [rec]
        state["experts"] = n
        ctx[GROUP] = state
        return ctx

    # -- merge -------------------------------------------------------------------------------
    def _theta(self, block: Block, state: dict[str, Any], upto: int) -> torch.Tensor:
        """θ^upto of this block under the TIES local merge, replayed from the driver's record:
        the initial model, then each iteration's θ ← θ + η (x ⊙ [|x| ≥ thr]), x = θ_pick − θ,
        in fp32 elementwise (so any row block gives the same bytes).  → [rows, cols]"""
        n = len(block.weights)
        if self.init == "merge":
            pool = Block(name=block.name, base=block.base, experts=block.experts[:n],
                         weights=block.weights, row_start=block.row_start)
            theta = self._ties().merge(pool, state["init"])
        else:
            theta = block.base.clone()
        for h in state.get("history", [])[:upto]:
            if block.name in h["held"]:
                continue
            x = block.experts[h["picked"][block.name]] - theta              # [rows, cols]
            theta = theta + x.mul_(x.abs() >= h["threshold"]) * h["eta"]
        return theta

    def merge(self, block: Block, ctx: dict[str, Any]) -> torch.Tensor:
        state = ctx[GROUP]
        if self.local_merge == "ties":
            return self._theta(block, state, len(state.get("history", [])))
        n = len(block.weights)
        c = state["coefficients"][block.name]
        tau = block.experts[:n] - block.base.unsqueeze(0)                  # [n, rows, cols]
        return block.base + weighted_sum(tau, tuple(float(x) for x in c))

    def params(self) -> dict[str, Any]:
        return {"iterations": self.iterations, "step": self.step, "scale": self.scale,
                "local_merge": self.local_merge, "granularity": self.granularity,
                "score": self.score, "init": self.init, "density": self.density,
                "objective": dict(self.objective)}


def _m(tri_len: int) -> int:
    """m for an upper triangle of m (m + 1) / 2 entries."""
    return (math.isqrt(8 * tri_len + 1) - 1) // 2


def initial_state(method: FrankWolfe, names: list[str], n: int) -> dict[str, Any]:
    """The state of θ^0 for the tensors ``names`` and ``n`` experts (as in ctx) before any
    statistics: the coefficients (task arithmetic) or an empty history (ties, init: base)."""
    if method.local_merge == "ties":
        return {"history": []}
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
    m = _m(len(next(iter(totals.values()))))
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
