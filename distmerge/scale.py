"""``distmerge bench --scale``: what the driver's side of a large merge costs, and a model of
its wall time, without a byte of tensor data.

It builds *synthetic* headers (:class:`ModelHeaders` of :class:`TensorInfo` with the offsets a
safetensors file of that layout would have; no files exist) for a base and N experts of a
Llama-shaped model (default: 48 experts of 64.0B parameters in bf16), then runs the driver's
own code on them and measures each step: time (median of ``--runs``, without tracemalloc) and
peak Python memory (one more run under :mod:`tracemalloc`):

- building the headers (what validation leaves the driver holding; the ranged reads of real
  headers from storage are *not* simulated),
- :func:`check_compatible`,
- :func:`make_plan` with :func:`slice_elements_for` of the per-worker budget (the cap
  ``MAX_SLICE_ELEMENTS`` applies, as in a run; the plan with the cap lifted is shown beside it),
- building the per-worker :class:`Job` exactly as the driver does, and pickling it,
- pickling every slice's :class:`Task` of one pass.

The statistics traffic of TIES (``scope: model``) is measured by running the method's real
``stats`` and ``reduce`` on a tiny block with the same number of experts: each worker drains
one array per statistics round (``SliceWorker.drain``), whose size does not depend on the
model size.

Everything about wall time is a *model*: bytes read per pass ÷ (workers × per-worker read
bandwidth) × passes, plus the planning overhead measured here. It assumes reads are the
bottleneck and perfectly parallel; it says nothing about compute, request latency or stragglers.
"""

from __future__ import annotations

import argparse
import math
import pickle
import statistics
import time
import tracemalloc
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import numpy as np
import torch

from distmerge.checkpoint.header import DTYPE_BY_NAME, DTYPE_SIZES, TensorInfo, build_header
from distmerge.checkpoint.source import ModelHeaders
from distmerge.demo import Shape

#: Where the synthetic models pretend to live (nothing is read from there).
URL_PREFIX = "s3://bucket/models"
HIST_BINS = 1 << 16


def _cluster_sizes(text: str) -> list[int]:
    from distmerge.errors import ConfigError

    try:
        sizes = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < 1:
        raise ConfigError(f"bench: --scale-workers: expected a comma list of positive integers, got {text!r}")
    return sizes


# -- synthetic headers -------------------------------------------------------------------------
def _layout(shape: Shape, dtype: str) -> list[list[tuple[str, tuple[int, ...], int, int]]]:
    """Tensors in name order packed into shards as :func:`distmerge.demo.save_model` does:
    per shard ``(name, shape, start, stop)`` with absolute offsets in the file."""
    item = DTYPE_SIZES[dtype]
    groups: list[list[tuple[str, tuple[int, ...], int]]] = [[]]
    used = 0
    for name, s in sorted(shape.tensor_shapes().items()):
        nbytes = math.prod(s) * item
        if groups[-1] and used + nbytes > shape.shard_size:
            groups.append([])
            used = 0
        groups[-1].append((name, s, nbytes))
        used += nbytes
    shards = []
    for group in groups:
        entries, off = [], 0
        for name, s, nbytes in group:
            entries.append((name, dtype, s, off, off + nbytes))
            off += nbytes
        data_start = len(build_header(entries))
        shards.append([(n, s, data_start + b, data_start + e) for n, _, s, b, e in entries])
    return shards


def synthetic_headers(shape: Shape, experts: int, *, dtype: str = "BF16",
                      url_prefix: str = URL_PREFIX) -> list[ModelHeaders]:
    """Headers of a base and ``experts`` experts of ``shape`` (fresh objects per model, as
    reading them would give; no file exists)."""
    layout = _layout(shape, dtype)
    n = len(layout)
    models = []
    for m in range(experts + 1):
        url = f"{url_prefix}/{'base' if m == 0 else f'expert-{m}'}"
        shards = tuple(f"{url}/model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n))
        tensors: dict[str, tuple[str, TensorInfo]] = {}
        for shard_url, entries in zip(shards, layout):
            for name, s, start, stop in entries:
                tensors[name] = (shard_url, TensorInfo(name=name, dtype=dtype, shape=tuple(s),
                                                       start=start, stop=stop))
        models.append(ModelHeaders(url=url, shards=shards, tensors=tensors))
    return models


# -- the driver's steps ------------------------------------------------------------------------
@contextmanager
def _uncapped() -> Iterator[None]:
    """Lift ``plan.MAX_SLICE_ELEMENTS`` for one call, to show what the memory budget alone
    would allow (a comparison only; a run always applies the cap)."""
    from distmerge import plan as plan_mod

    cap = plan_mod.MAX_SLICE_ELEMENTS
    plan_mod.MAX_SLICE_ELEMENTS = 2**62
    try:
        yield
    finally:
        plan_mod.MAX_SLICE_ELEMENTS = cap


def _steps(shape: Shape, experts: int, memory_per_worker: int, method: tuple[str, dict]
           ) -> list[tuple[str, Callable[[dict[str, Any]], Any]]]:
    """The driver's steps in order; each reads earlier results from ``state`` and returns its
    own, which is stored under its name."""
    from distmerge.checkpoint.compat import check_compatible
    from distmerge.engine.worker import Job, Task
    from distmerge.methods import build
    from distmerge.plan import make_plan, slice_elements_for

    out_dtype = DTYPE_BY_NAME[shape.dtype]

    def headers(st):
        return synthetic_headers(shape, experts)

    def compat(st):
        check_compatible(st["headers"][0], st["headers"][1:])

    def tensors(st):
        return [(n, info.dtype, info.shape) for n, (_, info) in st["headers"][0].tensors.items()]

    def itemsize(st):
        return max((DTYPE_SIZES[d] for _, d, _ in st["tensor_table"]), default=4)

    def plan(st):
        elements = slice_elements_for(memory_per_worker, n_models=experts + 1, in_itemsize=itemsize(st))
        return make_plan(st["tensor_table"], out_dtype=out_dtype, shard_size=shape.shard_size,
                         slice_elements=elements)

    def plan_uncapped(st):
        with _uncapped():
            elements = slice_elements_for(memory_per_worker, n_models=experts + 1,
                                          in_itemsize=itemsize(st))
        return make_plan(st["tensor_table"], out_dtype=out_dtype, shard_size=shape.shard_size,
                         slice_elements=elements)

    def job(st):
        models, p = st["headers"], st["plan"]
        return Job(                                     # as Run._plan builds it
            tensors=p.tensors,
            shard_paths=tuple(f"/staging/.distmerge-out/{s.filename}" for s in p.shards),
            sources=tuple({n: t for n, t in m.tensors.items()} for m in models),
            model_names=tuple(m.url for m in models),
            weights=tuple(1.0 for _ in range(experts)),
            methods=build(method[0], method[1]),
        )

    def job_pickle(st):
        return pickle.dumps(st["job"], protocol=pickle.HIGHEST_PROTOCOL)

    def task_pickles(st):
        return [len(pickle.dumps(Task(slice=s, round=None), protocol=pickle.HIGHEST_PROTOCOL))
                for s in st["plan"].slices]

    return [("headers", headers), ("check_compatible", compat), ("tensor_table", tensors),
            ("plan", plan), ("plan_uncapped", plan_uncapped), ("job", job),
            ("job_pickle", job_pickle), ("task_pickles", task_pickles)]


def _run_steps(steps, *, traced: bool) -> tuple[dict[str, Any], dict[str, dict[str, float]]]:
    state: dict[str, Any] = {}
    figures: dict[str, dict[str, float]] = {}
    for name, fn in steps:
        if traced:
            before, _ = tracemalloc.get_traced_memory()
            tracemalloc.reset_peak()
        t0 = time.perf_counter()
        state[name] = fn(state)
        seconds = time.perf_counter() - t0
        fig: dict[str, float] = {"seconds": seconds}
        if traced:
            after, peak = tracemalloc.get_traced_memory()
            fig.update(peak_bytes=peak - before, retained_bytes=after - before)
        figures[name] = fig
    return state, figures


def measure_steps(shape: Shape, experts: int, memory_per_worker: int, method: tuple[str, dict],
                  runs: int) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """Every step ``runs`` times untraced (median seconds), then once under tracemalloc (peak
    and retained Python memory, relative to before the step). Returns the last state and the
    figures per step."""
    steps = _steps(shape, experts, memory_per_worker, method)
    times: dict[str, list[float]] = {name: [] for name, _ in steps}
    for _ in range(runs):
        _, figs = _run_steps(steps, traced=False)
        for name, f in figs.items():
            times[name].append(f["seconds"])
    started = not tracemalloc.is_tracing()
    if started:
        tracemalloc.start()
    try:
        state, traced = _run_steps(steps, traced=True)
    finally:
        if started:
            tracemalloc.stop()
    figures = {name: {"seconds": statistics.median(ts), "seconds_runs": ts,
                      "seconds_traced": traced[name]["seconds"],
                      "peak_bytes": traced[name]["peak_bytes"],
                      "retained_bytes": traced[name]["retained_bytes"]}
               for name, ts in times.items()}
    return state, figures


# -- statistics traffic ------------------------------------------------------------------------
def _wire_bytes(arr: np.ndarray) -> int:
    """Bytes of a drained array: int64 data (the worker sums counts as int64), or pickled
    Python ints for exact sums."""
    if arr.dtype == object:
        return len(pickle.dumps(arr, protocol=pickle.HIGHEST_PROTOCOL))
    return int(arr.size * 8)


def ties_stats_traffic(experts: int, spec: dict[str, Any]) -> list[dict[str, Any]]:
    """Run TIES's own ``stats``/``reduce`` on a tiny block of ``experts`` experts: per round, the
    integer arrays a worker hands the driver at its drain (their size is per worker and does
    not depend on the model) and the pickled size of the context sent back for the next round."""
    from distmerge.methods import Block, build
    from distmerge.reduce import is_exact

    methods = build(spec["name"], {k: v for k, v in spec.items() if k != "name"})
    method = methods.default
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(4, 8, generator=gen)
    block = Block(name="t", base=base, experts=base + 0.01 * torch.randn(experts, 4, 8, generator=gen),
                  weights=tuple(1.0 for _ in range(experts)), row_start=0)
    ctx: dict[str, Any] = {}
    rounds = []
    for r in range(method.rounds):
        part = method.stats(r, block, ctx)
        exact = {k: v for k, v in part.items() if is_exact(v)}      # summed in the worker, drained
        floats = {k: v for k, v in part.items() if k not in exact}  # reported per slice
        ctx = methods.reduce(r, part, ctx, ["t"])
        rounds.append({
            "round": r,
            "drained": {k: {"shape": list(v.shape), "dtype": "int64" if v.dtype != object else "object",
                            "bytes": _wire_bytes(v)} for k, v in exact.items()},
            "drain_bytes_per_worker": sum(_wire_bytes(v) for v in exact.values()),
            "float_bytes_per_slice": int(sum(v.nbytes for v in floats.values())),
            "ctx_pickle_bytes": len(pickle.dumps(ctx, protocol=pickle.HIGHEST_PROTOCOL)),
        })
    return rounds


def cpu_histogram_work(plan, experts: int, drain_bytes: int, hidden: int) -> dict[str, Any]:
    """How many method calls a statistics round makes over the whole model (the worker merges
    in row chunks on the CPU, one call per piece on a GPU; ``engine.worker.chunk_rows``), and
    the histogram bytes they build: each call returns arrays as large as one drain."""
    from distmerge.engine.worker import chunk_rows

    n_models = experts + 1
    cpu = "cpu"
    calls_cpu = calls_gpu = 0
    for s in plan.slices:
        for piece in s.pieces:
            t = plan.tensors[piece.tensor]
            if not t.merged:
                continue
            rows = piece.row_stop - piece.row_start
            step = chunk_rows(cpu, n_models, t.row_elements, rows, stats=True)
            calls_cpu += math.ceil(rows / step)
            calls_gpu += 1
    return {"calls_per_round_cpu": calls_cpu, "calls_per_round_gpu": calls_gpu,
            "histogram_bytes_per_round_cpu": calls_cpu * drain_bytes,
            "histogram_bytes_per_round_gpu": calls_gpu * drain_bytes,
            "rows_per_call_cpu_hidden": chunk_rows(cpu, n_models, hidden, 1 << 30, stats=True),
            "hidden": hidden}


# -- the simulation ----------------------------------------------------------------------------
def simulate(args: argparse.Namespace) -> dict[str, Any]:
    """The scale simulation for ``args`` (bench's flags, defaults resolved). Prints nothing."""
    from distmerge.bench import METHOD_SPECS, _check_args, shape_from_args
    from distmerge.methods import build
    from distmerge.plan import MAX_SLICE_ELEMENTS

    methods = _check_args(args)
    clusters = _cluster_sizes(args.scale_workers)
    if not args.worker_gbps > 0:
        from distmerge.errors import ConfigError

        raise ConfigError("bench: --worker-gbps must be positive")
    shape = shape_from_args(args)
    experts, n_models = args.experts, args.experts + 1
    ties_spec = METHOD_SPECS["ties"]
    spec_of = {m: METHOD_SPECS.get(m, {"name": m}) for m in methods}
    job_spec = spec_of.get("ties", next(iter(spec_of.values())))
    job_method = (job_spec["name"], {k: v for k, v in job_spec.items() if k != "name"})

    state, steps = measure_steps(shape, experts, args.memory_per_worker, job_method, args.runs)
    models, plan, plan_free = state["headers"], state["plan"], state["plan_uncapped"]
    base = models[0]

    params = sum(info.numel for _, info in base.tensors.values())
    bytes_per_model = base.nbytes
    read_per_pass = sum(m.nbytes for m in models)
    requests = sum(len(s.pieces) for s in plan.slices) * n_models
    stats_slices = sum(1 for s in plan.slices if any(plan.tensors[p.tensor].merged for p in s.pieces))
    task_sizes = state["task_pickles"]

    traffic = ties_stats_traffic(experts, ties_spec)
    hist_bytes = max((r["drain_bytes_per_worker"] for r in traffic), default=0)
    planning = sum(steps[k]["seconds"] for k in ("check_compatible", "tensor_table", "plan",
                                                 "job", "job_pickle"))

    per_method = {}
    for m, spec in spec_of.items():
        ms = build(spec["name"], {k: v for k, v in spec.items() if k != "name"})
        passes = ms.rounds + 1
        per_method[m] = {"spec": spec, "passes": passes, "stats_rounds": ms.rounds,
                         "bytes_read": passes * read_per_pass,
                         "ray_tasks": ms.rounds * stats_slices + len(plan.slices)}

    model = []
    for n in clusters:
        agg = n * args.worker_gbps * 1e9
        t_pass = read_per_pass / agg
        row = {"workers": n, "aggregate_gbps": agg / 1e9, "seconds_per_pass": t_pass,
               "requests_per_second": requests / t_pass,
               "tasks_per_second": len(plan.slices) / t_pass,
               "input_bytes_per_worker": read_per_pass / n,
               "write_gbps_merge_pass": plan.total_size / t_pass / 1e9,
               "methods": {}}
        for m, pm in per_method.items():
            rounds = pm["stats_rounds"]
            row["methods"][m] = {
                "wall_seconds": pm["passes"] * t_pass + planning,
                "driver_drain_bytes": (sum(r["drain_bytes_per_worker"] for r in traffic) * n
                                       if spec_of[m]["name"] == "ties" and rounds else 0),
            }
        model.append(row)

    return {
        "mode": "scale",
        "shape": {**{k: getattr(shape, k) for k in ("hidden", "layers", "intermediate", "vocab",
                                                    "heads", "kv_heads", "dtype", "shard_size")},
                  "experts": experts, "params_per_model": params},
        "memory_per_worker": args.memory_per_worker, "runs": args.runs,
        "worker_gbps": args.worker_gbps, "url_prefix": URL_PREFIX,
        "counts": {
            "models": n_models, "tensors": len(base.tensors), "input_shards_per_model": len(base.shards),
            "output_shards": len(plan.shards), "slices": len(plan.slices),
            "stats_slices": stats_slices, "slice_elements": plan.slice_elements,
            "slice_elements_cap": MAX_SLICE_ELEMENTS,
            "slices_uncapped": len(plan_free.slices), "slice_elements_uncapped": plan_free.slice_elements,
            "ranged_requests_per_pass": requests,
            "mean_request_bytes": read_per_pass / requests if requests else 0,
            "job_pickle_bytes": len(state["job_pickle"]),
            "task_pickle_bytes_per_pass": sum(task_sizes),
            "task_pickle_bytes_max": max(task_sizes, default=0),
        },
        "bytes": {"per_model": bytes_per_model, "read_per_pass": read_per_pass,
                  "written_tensors": plan.total_size, "written_files": sum(s.size for s in plan.shards)},
        "steps": steps,
        "planning_seconds": planning,
        "ties_stats_traffic": {"experts": experts, "spec": ties_spec, "rounds": traffic,
                               "histogram_bytes": hist_bytes,
                               "work": cpu_histogram_work(plan, experts, hist_bytes, shape.hidden)},
        "methods": per_method,
        "model": model,
    }


# -- the report --------------------------------------------------------------------------------
def _b(n: float) -> str:
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"


def _n(n: float) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n:,.0f}"


def _t(sec: float) -> str:
    if sec >= 3600:
        return f"{sec / 3600:.2f} h"
    if sec >= 60:
        return f"{sec / 60:.1f} min"
    return f"{sec:.2f} s" if sec >= 0.1 else f"{sec * 1e3:.1f} ms"


STEP_LABELS = {
    "headers": "build synthetic headers (base + experts)",
    "check_compatible": "check_compatible",
    "tensor_table": "tensor table for the planner",
    "plan": "make_plan (budget, default cap)",
    "plan_uncapped": "make_plan (budget only, cap lifted)",
    "job": "build the Job (sources as the driver does)",
    "job_pickle": "pickle.dumps(Job)",
    "task_pickles": "pickle every Task of one pass",
}


def render(r: dict[str, Any]) -> str:
    s, c, b = r["shape"], r["counts"], r["bytes"]
    lines = [
        f"distmerge bench --scale: base + {s['experts']} experts of {_n(s['params_per_model'])} "
        f"params ({s['dtype']}; hidden {s['hidden']}, layers {s['layers']}, intermediate "
        f"{s['intermediate']}, vocab {s['vocab']}, heads {s['heads']}/{s['kv_heads']} kv), input and "
        f"output shards of {_b(s['shard_size'])}",
        "synthetic headers: no files and no tensor bytes; the driver's own functions run on them",
        "",
        f"tensors {c['tensors']} per model, {c['input_shards_per_model']} input shards per model, "
        f"{c['output_shards']} output shards",
        f"slices: {c['slices']} of at most {c['slice_elements']:,} elements "
        f"({_b(r['memory_per_worker'])} per worker; cap {c['slice_elements_cap']:,}); with the cap "
        f"lifted the budget alone gives {c['slice_elements_uncapped']:,} elements = "
        f"{c['slices_uncapped']} slices",
        f"bytes to read per pass: {_b(b['read_per_pass'])} ({c['models']} models x {_b(b['per_model'])}); "
        f"to write: {_b(b['written_tensors'])} of tensors ({_b(b['written_files'])} with headers)",
        f"ranged read requests per pass: {c['ranged_requests_per_pass']:,} "
        f"(one per slice piece per model; mean {_b(c['mean_request_bytes'])})",
        f"Ray tasks per pass = slices = {c['slices']:,}; Job pickled {_b(c['job_pickle_bytes'])} "
        f"(put once, fetched by every worker); Tasks of one pass pickled {_b(c['task_pickle_bytes_per_pass'])} "
        f"(largest {c['task_pickle_bytes_max']} B)",
        "",
        f"driver steps, measured on this machine (median of {r['runs']} run(s); memory: one run under "
        "tracemalloc, Python allocations only, relative to before the step):",
    ]
    w = max(len(v) for v in STEP_LABELS.values())
    lines.append(f"  {'step':<{w}}  {'time':>9}  {'peak mem':>10}  {'retained':>10}")
    for name, f in r["steps"].items():
        lines.append(f"  {STEP_LABELS.get(name, name):<{w}}  {_t(f['seconds']):>9}  "
                     f"{_b(f['peak_bytes']):>10}  {_b(f['retained_bytes']):>10}")
    lines.append(f"  planning overhead (check_compatible + tensor table + make_plan + Job + pickle): "
                 f"{_t(r['planning_seconds'])}")
    lines.append("")

    t = r["ties_stats_traffic"]
    lines.append(f"ties ({', '.join(f'{k} {v}' for k, v in t['spec'].items() if k != 'name')}) statistics "
                 f"traffic, from the method's own stats/reduce with {t['experts']} experts; per worker "
                 "and round (one drain each):")
    for rd in t["rounds"]:
        arrays = ", ".join(f"{k.rsplit('/', 1)[1]} {'x'.join(map(str, a['shape']))} int64"
                           for k, a in rd["drained"].items())
        lines.append(f"  round {rd['round'] + 1}: {arrays or 'nothing'} = {_b(rd['drain_bytes_per_worker'])}; "
                     f"context sent back {_b(rd['ctx_pickle_bytes'])}")
    wk = t["work"]
    lines.append(f"  histogram arrays built per round (one drain-sized array per method call): CPU workers "
                 f"{wk['calls_per_round_cpu']:,} calls ({wk['rows_per_call_cpu_hidden']} row(s) of a "
                 f"{wk['hidden']}-wide tensor each) = {_b(wk['histogram_bytes_per_round_cpu'])}; GPU workers (a call per piece) "
                 f"{wk['calls_per_round_gpu']:,} calls = {_b(wk['histogram_bytes_per_round_gpu'])}")
    lines.append("")

    lines.append(f"model of wall time (NOT measured): bytes read / (workers x {r['worker_gbps']:.2f} GB/s) "
                 "x passes + planning overhead above; reads assumed the only bottleneck")
    for m, pm in r["methods"].items():
        lines.append(f"  {m}: {pm['passes']} pass(es) = {_b(pm['bytes_read'])} read, "
                     f"{pm['ray_tasks']:,} Ray tasks")
    cols = ["workers", "GB/s", "per pass", *[f"{m} wall" for m in r["methods"]], "GET/s",
            "tasks/s", "input/worker", "ties drains/run"]
    rows = []
    for row in r["model"]:
        ties = next((v for k, v in row["methods"].items() if r["methods"][k]["spec"]["name"] == "ties"), None)
        rows.append([str(row["workers"]), f"{row['aggregate_gbps']:.0f}", _t(row["seconds_per_pass"]),
                     *[_t(v["wall_seconds"]) for v in row["methods"].values()],
                     f"{row['requests_per_second']:,.0f}", f"{row['tasks_per_second']:,.0f}",
                     _b(row["input_bytes_per_worker"]),
                     _b(ties["driver_drain_bytes"]) if ties else "-"])
    widths = [max(len(h), *(len(x[i]) for x in rows)) for i, h in enumerate(cols)]
    lines.append("  " + "  ".join(h.rjust(wd) for h, wd in zip(cols, widths)))
    for x in rows:
        lines.append("  " + "  ".join(v.rjust(wd) for v, wd in zip(x, widths)))
    lines += [
        "  GET/s: ranged requests per second the storage must serve; tasks/s: Ray tasks the driver "
        "submits and collects per second;",
        "  input/worker: one pass of inputs divided over the workers (what keeping inputs resident "
        "between passes would need; not implemented);",
        "  ties drains/run: histogram bytes all workers send the driver over the statistics rounds.",
    ]
    return "\n".join(lines)
