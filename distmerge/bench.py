"""``distmerge bench``: time merges of generated experts against the cost of reading them.

The bench generates (once; reused afterwards) a Llama-shaped bf16 base and N experts of a given
shape under a cache folder, then for each method merges them ``--runs`` times and reports the
medians next to the *read bound*: the time to read every input byte once with plain sequential
``readinto`` into a reused buffer. Both are measured with a warm page cache (the inputs are
read once, untimed, before anything is timed; caches are never dropped), because that is how
the merge itself reads them here.

Ray, when used, is started once for the whole bench, so no run pays Ray's start-up; its cost
is reported separately. Each run writes to a fresh temporary folder beside the cache folder
and deletes it afterwards.

``--compare mergekit`` times ``mergekit-yaml`` on the same inputs with an equivalent config,
when the ``mergekit`` package is installed, and measures its peak resident memory (its own
process tree, through a small wrapper process) beside distmerge's total peak (the workers'
peaks summed, plus the driver's own peak in that run).

``--scale`` does none of the above: it simulates planning a large merge (default 48 experts of
a ~64B Llama-shaped model) on synthetic headers; see :mod:`distmerge.scale`.

Library functions return data; only :func:`run_bench` (the CLI verb) prints, and what it
prints is :func:`render`'s text.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import multiprocessing
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

from distmerge.config import parse_size
from distmerge.demo import Shape, default_cache
from distmerge.errors import ConfigError

log = logging.getLogger("distmerge")

#: The method blocks a bench merges with, by name (any other registered method: defaults).
METHOD_SPECS: dict[str, dict[str, Any]] = {
    "task_arithmetic": {"name": "task_arithmetic"},
    "ties": {"name": "ties", "density": 0.2, "scope": "model"},
    "linear": {"name": "linear"},
}

READ_BUFFER = 16 * 2**20
DTYPE = "bfloat16"

#: Shape flags: (bench default, --scale default). The --scale shape is Llama-3-70B's but for
#: the MLP width (25344 instead of 28672), which gives 64.0B parameters.
SHAPE_DEFAULTS: dict[str, tuple[int, int]] = {
    "hidden": (1024, 8192), "layers": (8, 80), "intermediate": (2816, 25344),
    "vocab": (32000, 128256), "heads": (16, 64), "kv_heads": (16, 8),
}


# -- arguments ---------------------------------------------------------------------------------
def _size(text: str) -> int:
    return parse_size(text)


_size.__name__ = "size"     # argparse names the type in its error message


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", help="cache folder for the generated models "
                                 "(default: <cache>/bench/<shape-key>)")
    p.add_argument("--scale", action="store_true",
                   help="simulate planning a large merge on synthetic headers (no files, no "
                        "tensor bytes): time and memory of the driver's steps, and a model of "
                        "wall time; defaults then describe 48 experts of a ~64B Llama")
    p.add_argument("--experts", type=int, help="number of experts (default 8; --scale: 48)")
    for flag, (small, large) in SHAPE_DEFAULTS.items():
        p.add_argument(f"--{flag.replace('_', '-')}", type=int,
                       help=f"(default {small}; --scale: {large})")
    p.add_argument("--shard-size", type=_size, default=parse_size("2GB"),
                   help="shard size of the generated inputs and of the output (default 2GB)")
    p.add_argument("--methods", default="task_arithmetic,ties",
                   help="comma list (default task_arithmetic,ties; ties is scope model, density 0.2)")
    p.add_argument("--runs", type=int, default=3, help="merges per method; medians are reported")
    p.add_argument("--executor", choices=["ray", "local"], default="ray")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--memory-per-worker", type=_size,
                   help="memory budget of one worker (default 4GB; --scale: 16GB)")
    p.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    p.add_argument("--compare", choices=["mergekit"],
                   help="also time mergekit-yaml on the same inputs (if installed)")
    p.add_argument("--scale-workers", default="8,32,128",
                   help="--scale: cluster sizes the wall-time model is given for (default 8,32,128)")
    p.add_argument("--worker-gbps", type=float, default=1.0,
                   help="--scale: read bandwidth of one worker from storage in GB/s (default 1.0)")
    suites = p.add_subparsers(dest="suite", metavar="{quality}")
    from distmerge.quality import add_arguments as quality_arguments

    quality_arguments(suites.add_parser(
        "quality", help="accuracy of merges of real experts (scikit-learn digits) as irrelevant "
                        "experts join the pool; see distmerge.quality"))


def resolve_defaults(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the flags left out with the defaults of the mode (bench, or ``--scale``)."""
    large = bool(getattr(args, "scale", False))
    for flag, defaults in SHAPE_DEFAULTS.items():
        if getattr(args, flag, None) is None:
            setattr(args, flag, defaults[large])
    if getattr(args, "experts", None) is None:
        args.experts = 48 if large else 8
    if getattr(args, "memory_per_worker", None) is None:
        args.memory_per_worker = parse_size("16GB" if large else "4GB")
    return args


def shape_from_args(args: argparse.Namespace) -> Shape:
    return Shape(hidden=args.hidden, layers=args.layers, intermediate=args.intermediate,
                 vocab=args.vocab, heads=args.heads, kv_heads=args.kv_heads, dtype=DTYPE,
                 shard_size=args.shard_size)


def shape_key(shape: Shape, experts: int) -> str:
    return (f"e{experts}-h{shape.hidden}-l{shape.layers}-i{shape.intermediate}-v{shape.vocab}"
            f"-a{shape.heads}-kv{shape.kv_heads}-{shape.dtype}-s{shape.shard_size}")


def _check_args(args: argparse.Namespace) -> list[str]:
    from distmerge.methods import REGISTRY

    problems = []
    for flag in ("experts", "hidden", "layers", "intermediate", "vocab", "heads", "kv_heads",
                 "runs", "workers"):
        if getattr(args, flag) < 1:
            problems.append(f"--{flag.replace('_', '-')} must be at least 1")
    if args.experts < 2:
        problems.append("--experts must be at least 2 (a pipeline merges two or more experts)")
    if args.heads >= 1 and args.hidden % args.heads:
        problems.append("--hidden must be a multiple of --heads")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not methods:
        problems.append("--methods names no method")
    for m in methods:
        if m not in REGISTRY:
            problems.append(f"--methods: unknown method {m!r} (known: {', '.join(sorted(REGISTRY))})")
    if problems:
        raise ConfigError("bench: " + "; ".join(problems))
    return methods


# -- inputs ------------------------------------------------------------------------------------
def generate_inputs(out: Path, experts: int, shape: Shape) -> list[Path]:
    """Generate (or reuse) the models in a separate process, so that generating them does not
    raise this process's peak RSS, which the local executor reports as its worker's peak."""
    ctx = multiprocessing.get_context("spawn")
    from distmerge.demo import generate

    with ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
        return pool.submit(generate, out, experts=experts, shape=shape).result()


def input_files(folders: list[Path]) -> list[str]:
    """Every shard file of every model, as the merge reads them."""
    from distmerge.checkpoint.source import read_model_headers

    files: list[str] = []
    for f in folders:
        files.extend(read_model_headers(str(f)).shards)
    return files


def input_tensor_bytes(folders: list[Path]) -> int:
    """Tensor bytes of base + experts: what one pass of the merge reads."""
    from distmerge.checkpoint.source import read_model_headers

    return sum(read_model_headers(str(f)).nbytes for f in folders)


def read_all(files: list[str], buf: bytearray) -> int:
    """Read every byte of ``files`` sequentially into ``buf`` (reused); returns bytes read."""
    view = memoryview(buf)
    total = 0
    for path in files:
        with open(path, "rb", buffering=0) as f:
            while n := f.readinto(view):
                total += n
    return total


def read_bound(files: list[str], runs: int) -> dict[str, Any]:
    buf = bytearray(READ_BUFFER)
    read_all(files, buf)                          # untimed: warm the page cache
    seconds = []
    nbytes = 0
    for _ in range(runs):
        t0 = time.perf_counter()
        nbytes = read_all(files, buf)
        seconds.append(time.perf_counter() - t0)
    return {"bytes": nbytes, "files": len(files), "seconds": seconds,
            **_spread(seconds), "gbps": nbytes / 1e9 / statistics.median(seconds)}


# -- memory ------------------------------------------------------------------------------------
def machine_cpu_seconds() -> float | None:
    """CPU seconds every process on this machine has used so far (user, nice, system, irq and
    softirq time of ``/proc/stat``), or None where there is no ``/proc/stat``. A run's difference
    counts its Ray actors, Ray's daemons and the kernel's work for it too, which no rusage of
    this process sees; on a quiet machine it is the CPU work a run costs, a figure less noisy
    than wall time when every core is busy."""
    try:
        with open("/proc/stat") as f:
            ticks = [int(x) for x in f.readline().split()[1:8]]
    except (OSError, ValueError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq = ticks
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def _cpu_since(start: float | None) -> float | None:
    end = machine_cpu_seconds()
    return end - start if start is not None and end is not None else None


def _rusage_bytes(maxrss: int) -> int:
    """``ru_maxrss`` in bytes (Linux reports KiB, macOS bytes)."""
    return maxrss if sys.platform == "darwin" else maxrss * 1024


def reset_peak_rss() -> bool:
    """Reset this process's peak-RSS high-water mark (Linux: ``/proc/self/clear_refs``), so the
    next :func:`peak_rss` covers only what runs from now on. False where it cannot be reset;
    :func:`peak_rss` is then the process's peak since it started."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss() -> int:
    """This process's peak resident memory in bytes (since start, or the last reset)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return _rusage_bytes(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


# -- merges ------------------------------------------------------------------------------------
def pipeline_spec(method: str, folders: list[Path], dest: Path, args: argparse.Namespace) -> dict[str, Any]:
    """The bench's pipeline for ``method`` as the YAML's mapping."""
    from distmerge.methods import REGISTRY

    n = REGISTRY[method].exact_experts if method in REGISTRY else None   # slerp: 2
    return {
        "name": f"bench-{method}".replace("_", "-"),
        "base": str(folders[0]),
        "experts": [{"path": str(f), "weight": 1.0} for f in folders[1:][:n]],
        "method": dict(METHOD_SPECS.get(method, {"name": method})),
        "output": {"path": str(dest), "dtype": DTYPE, "shard_size": args.shard_size,
                   "overwrite": True},
        "resources": {"workers": args.workers, "memory_per_worker": args.memory_per_worker},
    }


def build_pipeline(method: str, folders: list[Path], dest: Path, args: argparse.Namespace):
    from distmerge.config import parse_pipeline

    return parse_pipeline(pipeline_spec(method, folders, dest, args), source=f"bench pipeline ({method})")


def _spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def _median_of(dicts: list[dict[str, float]], key: str) -> float:
    return statistics.median(d.get(key, 0.0) for d in dicts)


def time_merges(method: str, folders: list[Path], scratch_dir: Path, out_name: str,
                args: argparse.Namespace, input_bytes: int) -> dict[str, Any]:
    from distmerge.engine.driver import run_pipeline

    runs = []
    for i in range(args.runs):
        tmp = Path(tempfile.mkdtemp(prefix=f".{out_name}.bench-{method}-", dir=scratch_dir))
        try:
            pipeline = build_pipeline(method, folders, tmp / "merged", args)
            was_reset = reset_peak_rss()
            cpu0 = machine_cpu_seconds()
            t0 = time.perf_counter()
            summary = run_pipeline(pipeline, executor=args.executor, show_progress=False)
            wall = time.perf_counter() - t0
            cpu = _cpu_since(cpu0)
            driver_peak = peak_rss()
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        runs.append({
            "wall_seconds": wall, "machine_cpu_seconds": cpu, "summary_seconds": summary.seconds, "passes": summary.passes,
            "remerged_slices": summary.remerged_slices,     # ties: merged again (wrong sign guess)
            "bytes_read": summary.bytes_read, "bytes_written": summary.bytes_written,
            "stage_seconds": summary.stage_seconds, "worker_seconds": summary.worker_seconds,
            "worker_peak_rss": summary.worker_peak_rss,
            "memory_per_worker": summary.memory_per_worker,
            "slices": summary.slices, "shards": summary.shards, "tensors": summary.tensors,
            "driver_peak_rss": driver_peak, "driver_peak_reset": was_reset,
            # the local executor's worker is this process: its peak is the driver's
            "total_peak_rss": driver_peak if args.executor == "local"
            else driver_peak + sum(summary.worker_peak_rss.values()),
        })
        log.info("bench: %s run %d/%d: %.2f s", method, i + 1, args.runs, wall)
    walls = [r["wall_seconds"] for r in runs]
    wall = statistics.median(walls)
    cpus = [r["machine_cpu_seconds"] for r in runs]
    last = runs[-1]
    return {
        "method": method,
        "spec": METHOD_SPECS.get(method, {"name": method}),
        "machine_cpu_seconds": _spread(cpus) if None not in cpus else None,
        "passes": last["passes"],
        "remerged_slices": last["remerged_slices"],
        "slices": last["slices"],
        "wall_seconds": _spread(walls),
        "bytes_read": last["bytes_read"],
        "bytes_read_per_run": [r["bytes_read"] for r in runs],
        "bytes_written": last["bytes_written"],
        "input_gbps": input_bytes / 1e9 / wall,
        "read_gbps_all_passes": last["bytes_read"] / 1e9 / wall,
        "peak_worker_rss": max(max(r["worker_peak_rss"].values(), default=0) for r in runs),
        "driver_peak_rss": max(r["driver_peak_rss"] for r in runs),
        "total_peak_rss": max(r["total_peak_rss"] for r in runs),
        "memory_per_worker": last["memory_per_worker"],
        "stage_seconds": {k: _median_of([r["stage_seconds"] for r in runs], k)
                          for k in ("validate", "plan", "stats", "merge", "gather", "publish")},
        "worker_seconds": {k: _median_of([r["worker_seconds"] for r in runs], k)
                           for k in ("read", "compute", "write")},
        "runs": runs,
    }


def time_command(method: str, folders: list[Path], scratch_dir: Path, out_name: str,
                 args: argparse.Namespace, ray_address: str | None) -> dict[str, Any]:
    """``distmerge run`` of the same pipeline as a child process, timed like mergekit-yaml:
    the whole command, with its own start-up (Python, ``import torch``, connecting to Ray).
    With the Ray executor it joins the bench's running Ray (as a job joins a cluster), so
    starting Ray is not in it."""
    import yaml

    def command(tmp: Path) -> list[str]:
        spec = tmp / "pipeline.yaml"
        spec.write_text(yaml.safe_dump(pipeline_spec(method, folders, tmp / "merged", args)))
        return [sys.executable, "-m", "distmerge.cli", "-q", "run", str(spec),
                "--executor", args.executor, "--no-progress"]

    env = {**os.environ, "RAY_ADDRESS": ray_address} if ray_address else None
    timed = time_child(f"distmerge run {method} (whole command)", command, runs=args.runs,
                       scratch=scratch_dir, prefix=f".{out_name}.command-{method}-", env=env)
    if "error" not in timed:
        timed["command"] = (f"python -m distmerge.cli -q run PIPELINE --executor {args.executor} "
                            "--no-progress" + (" (RAY_ADDRESS: the bench's Ray)" if ray_address else ""))
    return timed


def time_child(label: str, command: Callable[[Path], list[str]], *, runs: int, scratch: Path,
               prefix: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run ``command(tmp)`` (which writes its inputs into a fresh folder ``tmp``, removed after)
    ``runs`` times under :func:`run_measured`: its wall seconds, the machine's CPU seconds and
    its peak RSS, or ``{"error"}`` with the last line it printed when a run fails."""
    seconds: list[float] = []
    cpus: list[float | None] = []
    peaks: list[int] = []
    for _ in range(runs):
        tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=scratch))
        try:
            cmd = command(tmp)
            cpu0 = machine_cpu_seconds()
            proc, usage = run_measured(cmd, tmp / "usage.json", env=env)
            cpus.append(_cpu_since(cpu0))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        if proc.returncode != 0 or usage["seconds"] is None:
            tail = (proc.stderr or proc.stdout).strip().splitlines()
            return {"error": f"{label} exited {proc.returncode}: {tail[-1] if tail else 'no output'}"}
        seconds.append(usage["seconds"])
        peaks.append(usage["peak_rss"])
        log.info("bench: %s: %.2f s, peak RSS %.2f GB", label, usage["seconds"], usage["peak_rss"] / 1e9)
    return {"wall_seconds": _spread(seconds), "seconds": seconds,
            "machine_cpu_seconds": _spread(cpus) if None not in cpus else None,
            "peak_rss": max(peaks), "peak_rss_runs": peaks}


# -- mergekit ----------------------------------------------------------------------------------
MERGEKIT_INSTALL = "pip install mergekit"


def mergekit_available() -> bool:
    return importlib.util.find_spec("mergekit") is not None


def mergekit_config(method: str, folders: list[Path]) -> dict[str, Any] | None:
    """The mergekit config closest to the bench's pipeline for ``method`` (fp32 arithmetic,
    bf16 output, weight 1 each), or None where mergekit has no equivalent."""
    base, experts = str(folders[0]), [str(f) for f in folders[1:]]
    spec = METHOD_SPECS.get(method, {})
    if method == "task_arithmetic":
        models = [{"model": e, "parameters": {"weight": 1.0}} for e in experts]
        params: dict[str, Any] = {"normalize": False}
    elif method == "ties":
        density = spec.get("density", 0.2)
        models = [{"model": e, "parameters": {"weight": 1.0, "density": density}} for e in experts]
        params = {"normalize": True}
    elif method == "linear":
        return {"merge_method": "linear", "dtype": "float32", "out_dtype": DTYPE,
                "models": [{"model": e, "parameters": {"weight": 1.0}} for e in experts],
                "parameters": {"normalize": True}}
    else:
        return None
    return {"merge_method": method, "base_model": base, "models": models, "parameters": params,
            "dtype": "float32", "out_dtype": DTYPE}


def mergekit_note(method: str) -> str:
    if method == "ties":
        return "mergekit trims per tensor (distmerge: scope model)"
    return ""


#: Runs argv[2:] as a child, then writes its wall time and the peak RSS of its process tree
#: (``RUSAGE_CHILDREN``: the largest of the waited-for descendants; this wrapper's own memory
#: is not counted) as JSON to argv[1]. A fresh wrapper per run, so nothing else the bench
#: started (input generation, Ray) is among its children.
_RUSAGE_WRAPPER = """\
import json, resource, subprocess, sys, time
t0 = time.perf_counter()
rc = subprocess.call(sys.argv[2:])
seconds = time.perf_counter() - t0
ru = resource.getrusage(resource.RUSAGE_CHILDREN)
with open(sys.argv[1], "w") as f:
    json.dump({"rc": rc, "seconds": seconds, "maxrss": ru.ru_maxrss}, f)
sys.exit(rc)
"""


def run_measured(cmd: list[str], usage_file: Path, env: dict[str, str] | None = None
                 ) -> tuple[subprocess.CompletedProcess, dict[str, Any]]:
    """Run ``cmd`` under :data:`_RUSAGE_WRAPPER`; returns the process and ``{"rc", "seconds",
    "peak_rss"}`` (seconds: the command's own wall time; peak_rss in bytes) of ``cmd`` itself."""
    proc = subprocess.run([sys.executable, "-c", _RUSAGE_WRAPPER, str(usage_file), *cmd],
                          capture_output=True, text=True, env=env)
    try:
        usage = json.loads(usage_file.read_text())
    except (OSError, ValueError):
        return proc, {"rc": proc.returncode, "seconds": None, "peak_rss": None}
    return proc, {"rc": usage["rc"], "seconds": usage["seconds"],
                  "peak_rss": _rusage_bytes(usage["maxrss"])}


def _mergekit_command() -> list[str]:
    exe = shutil.which("mergekit-yaml")
    return [exe] if exe else [sys.executable, "-m", "mergekit.scripts.run_yaml"]


def time_mergekit(method: str, folders: list[Path], scratch_dir: Path, out_name: str,
                  args: argparse.Namespace) -> dict[str, Any]:
    import yaml

    config = mergekit_config(method, folders)
    if config is None:
        return {"error": f"no mergekit equivalent of {method}"}
    params_per_shard = max(1, args.shard_size // 2)          # bf16: 2 bytes a parameter
    flags = ["--out-shard-size", str(params_per_shard), "--no-cuda", "--no-copy-tokenizer"]

    def command(tmp: Path) -> list[str]:
        cfg = tmp / "mergekit.yaml"
        cfg.write_text(yaml.safe_dump(config, sort_keys=False))
        return [*_mergekit_command(), str(cfg), str(tmp / "merged"), *flags]

    timed = time_child(f"mergekit {method}", command, runs=args.runs, scratch=scratch_dir,
                       prefix=f".{out_name}.mergekit-{method}-")
    timed["config"] = config
    if "error" not in timed:
        timed["command"] = " ".join([*_mergekit_command(), "CONFIG", "OUT", *flags])
        timed["note"] = mergekit_note(method)
    return timed


# -- the whole bench ---------------------------------------------------------------------------
def _ray_gcs_address() -> str:
    import ray

    return ray.get_runtime_context().gcs_address


def benchmark(args: argparse.Namespace) -> dict[str, Any]:
    """Generate or reuse the inputs, measure the read bound, time every method (and mergekit
    when asked); returns every figure as a JSON-able dict. Prints nothing."""
    resolve_defaults(args)
    methods = _check_args(args)
    shape = shape_from_args(args)
    out = Path(args.out).expanduser() if args.out else default_cache() / "bench" / shape_key(shape, args.experts)
    out = out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    folders = generate_inputs(out, args.experts, shape)
    prepare_seconds = time.perf_counter() - t0
    files = input_files(folders)
    input_bytes = input_tensor_bytes(folders)

    results: dict[str, Any] = {
        "shape": {**asdict(shape), "experts": args.experts, "params_per_model": shape.params()},
        "inputs": {"folder": str(out), "files": len(files), "file_bytes": sum(os.path.getsize(f) for f in files),
                   "tensor_bytes": input_bytes, "prepare_seconds": prepare_seconds},
        "executor": args.executor, "workers": args.workers if args.executor == "ray" else 1,
        "memory_per_worker": args.memory_per_worker, "runs": args.runs,
        "read_bound": read_bound(files, args.runs),
        "ray": None, "methods": [], "compare": None,
    }

    started = False
    try:
        if args.executor == "ray":
            from distmerge.engine.driver import ensure_ray

            t0 = time.perf_counter()
            started = ensure_ray(None, args.workers)
            results["ray"] = {"started_by_bench": started,
                              "startup_seconds": time.perf_counter() - t0 if started else 0.0}
        for m in methods:
            results["methods"].append(time_merges(m, folders, out.parent, out.name, args, input_bytes))
        if args.compare:                  # the whole command too, timed as mergekit's is
            address = _ray_gcs_address() if args.executor == "ray" else None
            for r in results["methods"]:
                r["whole_command"] = time_command(r["method"], folders, out.parent, out.name, args, address)
    finally:
        if started:
            import ray

            ray.shutdown()

    if args.compare == "mergekit":
        if not mergekit_available():
            results["compare"] = {"tool": "mergekit", "installed": False,
                                  "install": MERGEKIT_INSTALL}
        else:
            per_method = {m: time_mergekit(m, folders, out.parent, out.name, args) for m in methods}
            results["compare"] = {"tool": "mergekit", "installed": True, "methods": per_method}
    return results


# -- the report --------------------------------------------------------------------------------
def _gb(n: float) -> str:
    return f"{n / 1e9:.3f}"


def _gb_or_dash(n: float | None) -> str:
    return "-" if n is None else f"{n / 1e9:.2f}"


def render(results: dict[str, Any]) -> str:
    """The bench report as text."""
    s, inp, rb = results["shape"], results["inputs"], results["read_bound"]
    lines = [
        f"distmerge bench: base + {s['experts']} experts, {s['params_per_model'] / 1e6:.1f}M params "
        f"each ({s['dtype']}; hidden {s['hidden']}, layers {s['layers']}, intermediate "
        f"{s['intermediate']}, vocab {s['vocab']}, heads {s['heads']}/{s['kv_heads']} kv)",
        f"inputs: {inp['folder']} ({inp['files']} shard file(s), {_gb(inp['file_bytes'])} GB on disk, "
        f"{_gb(inp['tensor_bytes'])} GB of tensors per pass; ready in {inp['prepare_seconds']:.1f} s)",
        f"executor: {results['executor']}, {results['workers']} worker(s), "
        f"{results['memory_per_worker'] / 1e9:.2f} GB per worker; {results['runs']} run(s) per method, "
        "medians [min..max]",
    ]
    ray = results.get("ray")
    if ray is not None:
        if ray["started_by_bench"]:
            lines.append(f"ray: started once for the whole bench in {ray['startup_seconds']:.1f} s "
                         "(not included in any run; each run still starts its own worker actors)")
        else:
            lines.append("ray: already running; reused (no start-up in any run)")
    lines.append(
        f"read bound: {rb['median']:.3f} s [{rb['min']:.3f}..{rb['max']:.3f}] = {rb['gbps']:.2f} GB/s "
        f"to read all {_gb(rb['bytes'])} GB once: one thread, plain sequential readinto into a "
        f"reused {READ_BUFFER // 2**20} MiB buffer, warm page cache (read once untimed first; "
        "caches not dropped), the same page cache the merge reads from")
    lines.append("")

    cols = [("method", "<"), ("passes", ">"), ("wall s [min..max]", ">"), ("read GB", ">"),
            ("in GB/s", ">"), ("x bound", ">"), ("cpu s", ">"), ("peak RSS/budget GB", ">"), ("total peak GB", ">"),
            ("plan s", ">"), ("stats s", ">"),
            ("merge s", ">"), ("wk read/compute/write s", ">")]
    rows = []
    for r in results["methods"]:
        w, st, ws = r["wall_seconds"], r["stage_seconds"], r["worker_seconds"]
        rows.append([
            r["method"], str(r["passes"]),
            f"{w['median']:.2f} [{w['min']:.2f}..{w['max']:.2f}]",
            _gb(r["bytes_read"]), f"{r['input_gbps']:.2f}", f"{w['median'] / rb['median']:.2f}",
            f"{r['machine_cpu_seconds']['median']:.2f}" if r.get("machine_cpu_seconds") else "-",
            f"{r['peak_worker_rss'] / 1e9:.2f}/{r['memory_per_worker'] / 1e9:.2f}",
            _gb_or_dash(r.get("total_peak_rss")),
            f"{st['plan']:.2f}", f"{st['stats']:.2f}", f"{st['merge']:.2f}",
            f"{ws['read']:.2f}/{ws['compute']:.2f}/{ws['write']:.2f}",
        ])
    widths = [max(len(c[0]), *(len(row[i]) for row in rows)) if rows else len(c[0])
              for i, c in enumerate(cols)]

    def fmt(cells: list[str]) -> str:
        return "  ".join(f"{cell:{a}{wd}}" for cell, (_, a), wd in zip(cells, cols, widths)).rstrip()

    lines.append(fmt([c[0] for c in cols]))
    lines.append("  ".join("-" * wd for wd in widths))
    lines += [fmt(row) for row in rows]
    lines += [
        "",
        "read GB: bytes the merge read in all passes (ties reads the inputs once per statistics "
        "round plus once to merge); in GB/s: one pass of input tensors / wall; x bound: wall / read bound.",
        "cpu s: CPU seconds the whole machine used during a run (/proc/stat: actors, Ray's daemons, "
        "driver, kernel), median; wall is about cpu s / cores when every core is busy.",
        "plan s, stats s, merge s: driver stage times (plan includes starting the run's workers); wk read/compute/write s: summed over workers and slices.",
    ]
    if results["executor"] == "local":
        lines.append("peak RSS (local executor): the bench process's own high-water mark in a run (reset "
                     "before each run where Linux allows; inputs are generated in a separate process); "
                     "total peak: the same process, so the same figure.")
    else:
        lines.append("peak RSS: highest of any worker actor in any run (actors are new in each run); "
                     "total peak: the workers' peaks summed plus the driver's (this process's) peak, "
                     "highest over runs; Ray's own daemons and object store are not counted.")
    if any(not run.get("driver_peak_reset", True) for r in results["methods"] for run in r.get("runs", [])):
        lines.append("driver peak: could not be reset per run here, so it is this process's peak since it "
                     "started (an upper bound).")

    commands = {r["method"]: r["whole_command"] for r in results["methods"] if r.get("whole_command")}
    if commands:
        lines.append("")
        for m, wc in commands.items():
            if "error" in wc:
                lines.append(f"distmerge run {m}, whole command: not timed: {wc['error']}")
                continue
            w, c = wc["wall_seconds"], wc.get("machine_cpu_seconds")
            cpu = f", machine CPU {c['median']:.2f} s" if c else ""
            lines.append(f"distmerge run {m}, whole command: {w['median']:.2f} s [{w['min']:.2f}.."
                         f"{w['max']:.2f}]{cpu} (a child process with its start-up, timed as "
                         "mergekit-yaml is" + ("; it joins the running Ray" if results.get("ray") else "")
                         + ")")

    cmp_ = results.get("compare")
    if cmp_ is not None:
        lines.append("")
        if not cmp_["installed"]:
            lines.append(f"mergekit: not installed; skipped (install it with `{cmp_['install']}` "
                         "and rerun with --compare mergekit)")
        else:
            timed = {m: wc for m, wc in commands.items() if "error" not in wc}
            ours = {r["method"]: r["wall_seconds"]["median"] for r in results["methods"]}
            ours_cpu = {r["method"]: r.get("machine_cpu_seconds") for r in results["methods"]}
            ours_peak = {r["method"]: r.get("total_peak_rss") for r in results["methods"]}
            for m, mk in cmp_["methods"].items():
                if "error" in mk:
                    lines.append(f"mergekit {m}: not timed: {mk['error']}")
                    continue
                w = mk["wall_seconds"]
                note = f"; {mk['note']}" if mk.get("note") else ""
                wc = timed.get(m)
                whole = (f"{w['median'] / wc['wall_seconds']['median']:.2f}x distmerge's whole command "
                         "(both with their start-up), " if wc else "")
                lines.append(f"mergekit {m}: {w['median']:.2f} s [{w['min']:.2f}..{w['max']:.2f}] "
                             f"(mergekit-yaml subprocess, CPU, incl. its start-up) = {whole}"
                             f"{w['median'] / ours[m]:.2f}x distmerge's in-process wall{note}")
                if mk.get("machine_cpu_seconds") and ours_cpu.get(m):
                    c, mine_c = mk["machine_cpu_seconds"]["median"], ours_cpu[m]["median"]
                    whole_c = (f"{c / wc['machine_cpu_seconds']['median']:.2f}x the whole command's, "
                               if wc and wc.get("machine_cpu_seconds") else "")
                    lines.append(f"mergekit {m}: machine CPU {c:.2f} s (measured as for distmerge) "
                                 f"= {whole_c}{c / mine_c:.2f}x the in-process run's {mine_c:.2f} s")
                if mk.get("peak_rss") is not None:
                    mine = ours_peak.get(m)
                    vs = (f" vs distmerge's total peak {mine / 1e9:.2f} GB "
                          f"(= {mk['peak_rss'] / mine:.2f}x)" if mine else "")
                    lines.append(f"mergekit {m}: peak RSS {mk['peak_rss'] / 1e9:.2f} GB (its process "
                                 f"tree, highest over runs){vs}")
    return "\n".join(lines)


def run_bench(args: argparse.Namespace) -> int:
    """The ``bench`` verb: run the bench (or, with ``--scale``, the scale simulation), print
    the report, write JSON when asked; ``bench quality`` runs :func:`distmerge.quality.run_quality`."""
    if getattr(args, "suite", None) == "quality":
        from distmerge.quality import run_quality

        return run_quality(args)
    resolve_defaults(args)
    if getattr(args, "scale", False):
        from distmerge import scale

        results = scale.simulate(args)
        text = scale.render(results)
    else:
        results = benchmark(args)
        text = render(results)
    print(text)
    write_figures(args.json, results)
    return 0


def write_figures(json_path: str | None, results: dict[str, Any]) -> None:
    """``--json PATH``: the figures as JSON (and a line saying where)."""
    if json_path:
        path = Path(json_path).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results, indent=1))
        print(f"figures written to {path}")
