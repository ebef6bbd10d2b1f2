"""What the driver calls around the engine's passes for pool selection (frank_wolfe):
:func:`bind_pool` at validation (targets → expert indices, refusals before any work) and
:class:`Selection` during the run (the data objective's gradient checkpoint, the selection
trace ``frank_wolfe_trace.json`` and its metrics). Driver-side only: it reads file metadata.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import numpy as np

from distmerge.checkpoint.multipart import is_object_store
from distmerge.checkpoint.source import is_local, local_path
from distmerge.checkpoint.state import file_fingerprint
from distmerge.config import expand_path
from distmerge.errors import ConfigError

if TYPE_CHECKING:
    from distmerge.checkpoint.source import ModelHeaders
    from distmerge.select.sketch import ScoringChoice
    from distmerge.config import Pipeline
    from distmerge.methods import MethodSet

log = logging.getLogger(__name__)

TRACE_FILE = "frank_wolfe_trace.json"


def _is_fw(methods: "MethodSet") -> bool:
    from distmerge.methods.frank_wolfe import FrankWolfe

    return any(isinstance(m, FrankWolfe) for m in methods.all())


def _norm(url: str) -> str:
    url = expand_path(url)
    return os.path.realpath(local_path(url)) if is_local(url) else url.rstrip("/")


def bind_pool(methods: "MethodSet", pipeline: "Pipeline", base: "ModelHeaders",
              experts: list["ModelHeaders"]) -> "MethodSet":
    """Check a pool-selection method against its pool and resolve its targets to expert
    indices; any other method passes through unchanged. Reads no tensor byte (file
    fingerprints: size and mtime, or the store's version fields).

    Raises:
        ConfigError: overrides or ``lines`` with frank_wolfe, a duplicate expert (the same
            location twice, or files with identical fingerprints), a target that is not an
            expert, a data objective whose model factory or data sets do not fit the base.
    """
    from distmerge.methods import MethodSet
    from distmerge.methods.frank_wolfe import FrankWolfe

    if not _is_fw(methods):
        return methods
    fw = methods.default
    if not isinstance(fw, FrankWolfe) or methods.overrides:
        raise ConfigError("method: frank_wolfe selects whole models (or one model per tensor) from "
                          "the pool; it takes no overrides and no lines modifier")
    if is_object_store(pipeline.output.path):
        raise ConfigError(f"output.path: {pipeline.output.path}: frank_wolfe keeps its selection "
                          "trace (and the data objective's gradient) in a staging folder on a "
                          "file system; write to a local, shared or hf:// destination")
    urls = [e.path for e in pipeline.experts]
    normed = [_norm(u) for u in urls]
    seen: dict[str, int] = {}
    for i, u in enumerate(normed):
        if u in seen:
            raise ConfigError(f"experts[{i}]: {urls[i]} is experts[{seen[u]}] again; frank_wolfe "
                              "selects from a pool of distinct models: remove the duplicate")
        seen[u] = i
    _refuse_identical_files(experts, urls)
    obj = dict(fw.objective)
    if obj.get("kind", "data_free") == "data_free" and obj.get("targets") is not None:
        resolved = []
        for k, t in enumerate(obj["targets"]):
            if isinstance(t, int):
                if t >= len(urls):
                    raise ConfigError(f"method.objective.targets[{k}]: index {t} but there are "
                                      f"{len(urls)} experts")
                resolved.append(t)
                continue
            idx = seen.get(_norm(t))
            if idx is None:
                raise ConfigError(f"method.objective.targets[{k}]: {t} is not one of the experts "
                                  "(the pool); add it to experts: or fix the path")
            resolved.append(idx)
        if len(set(resolved)) != len(resolved):
            raise ConfigError("method.objective.targets: names one expert twice")
        obj["targets"] = resolved
    if obj.get("kind") == "data":
        from distmerge.select.gradient import check_data_objective

        from distmerge.select.sharded import check_sharded

        check_data_objective(obj, base)
        r = pipeline.resources
        check_sharded(obj, base, workers=r.workers, memory=r.memory_per_worker,
                      gpus_per_worker=r.gpus_per_worker)
    return MethodSet(dataclasses.replace(fw, objective=obj), [])


def _file_identity(url: str) -> str | None:
    """What makes two shard files one: the same inode (a symlink or hard link, a folder listed
    under two names) for local files; the same content version (ETag, generation...) and size
    for stored objects. None when the store reports no version (sizes alone say nothing)."""
    if is_local(url):
        st = os.stat(local_path(url))
        return f"inode:{st.st_dev}:{st.st_ino}"
    fp = file_fingerprint(url)
    if len(fp) < 2:
        return None
    return json.dumps(fp, sort_keys=True)


def _refuse_identical_files(experts: list["ModelHeaders"], urls: list[str]) -> None:
    """Two experts whose shard files are all the same files (or the same stored versions) are
    one model twice. (Distinct files with equal bytes are found exactly from the statistics:
    :func:`distmerge.methods.frank_wolfe.refuse_equal_task_vectors`.)"""
    def ident(m: "ModelHeaders") -> str | None:
        ids = [_file_identity(s) for s in m.shards]
        return None if any(i is None for i in ids) else "|".join(ids)

    with ThreadPoolExecutor(max_workers=16) as pool:
        idents = list(pool.map(ident, experts))
    seen: dict[str, int] = {}
    for i, p in enumerate(idents):
        if p is None:
            continue
        if p in seen:
            raise ConfigError(f"experts[{i}]: {urls[i]} is the same files as experts[{seen[p]}] "
                              f"{urls[seen[p]]}; frank_wolfe selects from a pool of distinct models: "
                              "remove the duplicate")
        seen[p] = i


class Selection:
    """The driver-side part of frank_wolfe during a run: created by :meth:`for_run` (None for
    any other method)."""

    def __init__(self, method: Any, expert_urls: list[str], base: "ModelHeaders",
                 experts: list["ModelHeaders"], storage: Any = None, memory: int = 0,
                 workers: int = 1, gpus_per_worker: float = 0, remote: tuple[int, ...] = (),
                 resident_budget: int = 0):
        self.method = method
        self.workers = workers                 # the sharded gradient stage's ranks
        self.gpus_per_worker = gpus_per_worker
        self.expert_urls = expert_urls
        self.base = base
        self.experts = experts
        self.storage = storage
        self.memory = memory
        self.stage = None                  # the data objective's gradient stage
        self._reported = 0
        self.pass_bytes: list[int] = []    # tensor bytes each statistics pass read (this process's run)
        pool = base.nbytes + sum(e.nbytes for e in experts)
        m = method
        per_it = m.rounds_per_iteration
        log.info("frank_wolfe plan: %d statistics pass(es) over the pool (%d bytes each%s), %d per "
                 "iteration after %d up front, then the merge pass; the iterations themselves run "
                 "on the driver", m.rounds, pool, " plus the fp32 gradient" if m.kind == "data" else "",
                 per_it, m.rounds - per_it * m.iterations)
        self.scoring = self._choose(remote, resident_budget) if m.kind == "data" else None
        if self.scoring is not None and self.scoring.scoring == "sketch":
            log.info("frank_wolfe plan: scoring from a sketch: the first statistics pass reads the "
                     "pool and the gradient, the %d later ones the fp32 gradient only (where a "
                     "worker kept the sketch of its slice)", m.rounds - 1)

    def _choose(self, remote: tuple[int, ...], budget: int) -> "ScoringChoice":
        """``objective.scoring`` for this run (auto resolved), logged with its figures.
        ``remote``: the models (0 the base) behind URLs; ``budget``: the bytes all workers may
        keep resident together."""
        from distmerge.checkpoint.header import FLOAT_DTYPES
        from distmerge.select.sketch import choose_scoring

        m = self.method
        models = [self.base, *self.experts]
        floats = [name for name, (_, info) in self.base.tensors.items() if info.dtype in FLOAT_DTYPES]

        def nbytes(model: "ModelHeaders") -> int:
            return sum(model.tensors[name][1].nbytes for name in floats)

        c = choose_scoring(m.scoring, applicable=m.can_sketch(), ratio=m.sketch_ratio,
                           shapes=[self.base.tensors[name][1].shape for name in floats], n=len(self.experts),
                           pool_bytes=sum(nbytes(x) for x in models),
                           remote_bytes=sum(nbytes(models[i]) for i in remote), resident_budget=budget)
        log.info("frank_wolfe scoring: %s (asked: %s; %s): an exact score round reads %d pool bytes, "
                 "%d of them from storage beyond the workers' resident budget of %d bytes, every "
                 "iteration; a sketch keeps %d bytes (sketch_ratio %d), error per score at most "
                 "sqrt(2/q) = %.3g (widest tensors) to %.3g (narrowest) of ‖∇f‖‖x‖ per row, "
                 "about sqrt(2/(q·rows)) = %.3g (largest tensor) to %.3g (smallest) of a "
                 "tensor's ‖∇f‖‖x‖ when its rows carry even norms; each score's own bound is in "
                 "the trace", c.scoring, c.requested, c.reason, c.pool_bytes, c.reread_bytes,
                 c.resident_budget, c.sketch_bytes, c.ratio, *c.rel_error, *c.tensor_error)
        return c

    def resident_sources(self, remote: tuple[int, ...]) -> tuple[int, ...]:
        """The inputs the workers keep resident as they are: none when the run sketches (the
        budget holds the sketches, which save every later score round's read), else ``remote``."""
        return () if self.scoring is not None and self.scoring.scoring == "sketch" else remote

    @classmethod
    def for_run(cls, pipeline: "Pipeline", methods: "MethodSet", base: "ModelHeaders",
                experts: list["ModelHeaders"], *, remote: tuple[int, ...] = (),
                resident_budget: int = 0) -> "Selection | None":
        """``remote``: the models (0 the base) the workers would keep resident (behind URLs);
        ``resident_budget``: what all workers may keep together (for ``objective.scoring``)."""
        if not _is_fw(methods):
            return None
        return cls(methods.default, [e.path for e in pipeline.experts], base, experts,
                   storage=pipeline.storage, memory=pipeline.resources.memory_per_worker,
                   workers=pipeline.resources.workers, gpus_per_worker=pipeline.resources.gpus_per_worker,
                   remote=remote, resident_budget=resident_budget)

    # -- the data objective's gradient checkpoint ------------------------------------------
    def extra_sources(self, staging: str) -> list["ModelHeaders"]:
        """Models the workers read besides base and experts: the gradient checkpoint of the
        data objective (written now as zeros, so its headers exist before the workers start)."""
        if self.method.kind != "data":
            return []
        from distmerge.select.sharded import make_stage

        self.stage = make_stage(self.method, base=self.base, experts=self.experts,
                                folder=os.path.join(staging, "frank_wolfe_gradient"),
                                storage=self.storage, memory=self.memory, workers=self.workers,
                                gpus_per_worker=self.gpus_per_worker,
                                scoring=self.scoring.scoring if self.scoring is not None else None)
        return [self.stage.headers]

    def before_round(self, round: int, ctx: dict[str, Any]) -> dict[str, Any]:
        """Before statistics round ``round``: the data objective's gradient at θ^round."""
        if self.stage is None or not self.method.is_score_round(round):
            return ctx
        ctx = self.stage.run(self.method.phase(round)[1], ctx)
        if self.scoring is not None:       # a resumed run keeps the decision it started with
            from distmerge.methods.frank_wolfe import GROUP

            ctx = {**ctx, GROUP: {"scoring": self.scoring.scoring, **(ctx.get(GROUP) or {})}}
        return ctx

    # -- the trace and its metrics ---------------------------------------------------------
    def pass_done(self, ctx: dict[str, Any], bytes_read: int) -> list[dict[str, Any]]:
        """A statistics pass ended having read ``bytes_read`` tensor bytes: log it, and return
        the trace records it produced (for the metrics)."""
        from distmerge.methods.frank_wolfe import GROUP

        self.pass_bytes.append(bytes_read)
        trace = (ctx.get(GROUP) or {}).get("trace", [])
        new = trace[self._reported:]
        self._reported = len(trace)
        log.info("frank_wolfe statistics pass %d read %d bytes (%d iteration(s) from it)",
                 len(self.pass_bytes), bytes_read, len(new))
        for r in new:
            log.info("frank_wolfe iteration %d: picked %s, step %.4g, objective %.6g, FW gap %.6g",
                     r["iteration"], self._picked_summary(r["picked"]), r["step"], r["objective"],
                     r["fw_gap"])
            if r.get("scoring") == "sketch":
                log.info("frank_wolfe iteration %d scored from the sketch: %s", r["iteration"], _sketch_summary(r))
        return new

    def _picked_summary(self, picked: Any) -> str:
        if isinstance(picked, int):
            return self.expert_urls[picked]
        counts: dict[int, int] = {}
        for j in picked.values():
            counts[j] = counts.get(j, 0) + 1
        return ", ".join(f"{self.expert_urls[j]} ×{c}" for j, c in sorted(counts.items()))

    def trace(self, ctx: dict[str, Any]) -> dict[str, Any]:
        """The JSON of ``frank_wolfe_trace.json``: expert indices turned into their paths."""
        from distmerge.methods.frank_wolfe import GROUP

        state = ctx[GROUP]
        urls = self.expert_urls
        its = []
        for r in state["trace"]:
            p = r["picked"]
            its.append({**r, "picked": urls[p] if isinstance(p, int) else {k: urls[j] for k, j in p.items()}})
        coeffs = state.get("coefficients")
        if coeffs is None:              # local_merge ties: the model is not a combination
            out_coeffs: Any = None
        elif self.method.granularity == "model":
            first = coeffs[sorted(coeffs)[0]] if coeffs else [0.0] * len(urls)
            out_coeffs = {u: c for u, c in zip(urls, first)}
        else:
            out_coeffs = {k: {u: c for u, c in zip(urls, v)} for k, v in sorted(coeffs.items())}
        out = {"iterations": its, "coefficients": out_coeffs, "method": self.method.params()}
        out["stats_pass_bytes_read"] = list(self.pass_bytes)
        if self.stage is not None:
            out["gradient_stage_bytes_read"] = list(self.stage.pass_bytes)
            # formula: θ^t = θ₀ + Σ c_j τ_j (the output's bytes); incremental: the kept θ̃^t,
            # equal to it up to fp32 rounding (FRANK_WOLFE.md)
            out["gradient_point"] = self.stage.point
            out["gradient_point_reason"] = self.stage.point_reason
        if "final_objective" in state:
            out["final_objective"] = state["final_objective"]
        if self.scoring is not None:
            out["scoring"] = self.scoring.as_dict()
        return out

    def close(self) -> None:
        """At the end of the run, whether it succeeded or failed: stop what the gradient stage
        runs on (the sharded stage's ranks). Its checkpoint stays in the staging folder."""
        if self.stage is not None:
            self.stage.close()

    def finish(self, staging: str, ctx: dict[str, Any]) -> None:
        """Before the output is verified and published: write the trace into it and remove
        the gradient checkpoint."""
        if self.stage is not None:
            from distmerge.methods.frank_wolfe import GROUP

            ctx = {**ctx, GROUP: {**ctx[GROUP], "final_objective": self.stage.objective(ctx)}}
            self.stage.remove()
        with open(os.path.join(staging, TRACE_FILE), "w") as f:
            json.dump(self.trace(ctx), f, indent=1)


def _sketch_summary(r: dict[str, Any]) -> str:
    """One line about a sketched iteration's decision: margin against σ, certain or not."""
    if isinstance(r["margin"], dict):                      # per tensor
        bad = r["uncertain_tensors"]
        return (f"the pick is certain (margin ≥ 3σ) in {len(r['margin']) - len(bad)} of "
                f"{len(r['margin'])} tensors" + (f"; not in {', '.join(bad[:5])}" if bad else ""))
    if r["margin"] is None:
        return "one candidate"
    j = int(np.argmin(r["scores"]))
    return (f"margin to the runner-up {r['margin']:.4g}, σ of the pick's score {r['sigma'][j]:.3g}: "
            + ("certain (margin ≥ 3σ of the difference)" if r["certain"]
               else "NOT certain (margin < 3σ of the difference)"))
