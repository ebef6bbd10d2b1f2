"""The ``distmerge`` command. No logic lives here: verbs call the library, and known errors
become one-line messages and exit codes in :func:`main` (a traceback only with ``--debug``)."""

from __future__ import annotations

import argparse
import gc
import json
import logging
import sys

from distmerge.errors import ConfigError, DistmergeError

log = logging.getLogger("distmerge")


def _pipeline_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("pipeline", help="pipeline YAML file")
    p.add_argument("--workers", type=int, help="number of workers (overrides resources.workers)")
    p.add_argument("--memory-per-worker", help="e.g. 4GB (overrides resources.memory_per_worker)")
    p.add_argument("--slice-size", help="fp32 bytes of one model's block per slice, e.g. 64MB")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")


def build_parser(verb: str | None = "bench") -> argparse.ArgumentParser:
    """The whole parser. ``bench`` gets its flags only when ``verb`` is it (the default):
    they come from modules that import torch, which every other verb would then pay for
    (about a second: ``distmerge inspect`` in 0.3 s instead of 1.4 s)."""
    parser = argparse.ArgumentParser(prog="distmerge", description=__doc__.split("\n")[0])
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    sub = parser.add_subparsers(dest="verb", required=True)

    p = sub.add_parser("validate", help="check the pipeline and every header; reads no tensor bytes "
                                        "(with --deep: a few sampled rows of every tensor)")
    _pipeline_args(p)
    p.add_argument("--deep", action="store_true",
                   help="also sample rows of every tensor of base and experts: report NaN/Inf (exit 7) "
                        "and experts that are not fine-tunes of the base, e.g. MergeLock-style "
                        "protected or from another base (exit 5)")
    p.add_argument("--sample-rows", type=int, metavar="N",
                   help="with --deep: evenly spaced rows sampled per tensor, first and last included, "
                        "plus the middle one (default 8)")

    p = sub.add_parser("plan", help="print the slices and output layout")
    _pipeline_args(p)
    p.add_argument("--format", choices=["table", "json"], default="table")

    p = sub.add_parser("run", help="merge and publish")
    _pipeline_args(p)
    p.add_argument("--executor", choices=["ray", "local"], default="ray",
                   help="ray (default; embedded local Ray when ray.address is null) or local (in-process)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar or progress lines")
    p.add_argument("--resume", action="store_true",
                   help="continue this pipeline's interrupted run from its staging folder (verified "
                        "slices are skipped); starts a new run when there is none")
    p.add_argument("--metrics-port", type=int, metavar="PORT",
                   help="serve the run's Prometheus metrics on this port (overrides metrics.port; "
                        "0: any free port)")

    p = sub.add_parser("inspect", help="list the tensors of a checkpoint (headers only)")
    p.add_argument("path", help="model folder, .safetensors file or URL")
    p.add_argument("--format", choices=["table", "json"], default="table")

    p = sub.add_parser("demo", help="generate a small Llama-shaped base and experts")
    p.add_argument("--out", help="folder (default: $DISTMERGE_CACHE/demo or ~/.cache/distmerge/demo)")
    p.add_argument("--experts", type=int, default=4)

    p = sub.add_parser("import-mergekit", help="translate a mergekit YAML into a pipeline YAML")
    p.add_argument("config", help="mergekit YAML file (one merge)")
    p.add_argument("-o", "--output", help="write the pipeline here (default: print it)")
    p.add_argument("--output-path", help="the merged model's folder (output.path); default: the "
                                         "config's out_path or a placeholder to edit")

    p = sub.add_parser("compress", help="store a consensus pipeline's experts as tau_MTL + one TALL "
                                        "bit mask per expert (one process)")
    _pipeline_args(p)

    p = sub.add_parser("extract", help="rebuild one expert from a compressed folder")
    p.add_argument("compressed", help="folder written by distmerge compress")
    p.add_argument("expert", metavar="NAME_OR_INDEX",
                   help="the expert's index (0-based, pipeline order), its path as in the pipeline, "
                        "or its folder's name")
    p.add_argument("--out", required=True, help="folder to write the rebuilt expert to")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"],
                   help="float tensors' dtype (default: the base's)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--reference", metavar="EXPERT_PATH",
                   help="the real expert: print the relative error of the rebuilt one per tensor")

    p = sub.add_parser("submit", help="run the pipeline on an existing Ray cluster (Ray Jobs API) "
                                      "and follow its logs")
    _pipeline_args(p)
    p.add_argument("--address", required=True,
                   help="the cluster's dashboard address, e.g. http://HEAD:8265")
    p.add_argument("--working-dir", metavar="DIR",
                   help="upload this folder as the job's working directory (relative model paths "
                        "then name files inside it)")
    p.add_argument("--pip", action="append", default=[], metavar="REQUIREMENT",
                   help="install into the job's environment (repeatable), e.g. distmerge==0.1.0 "
                        "when the cluster's image lacks it")
    p.add_argument("--ship-source", action="store_true",
                   help="upload this machine's distmerge package (runtime_env py_modules) instead "
                        "of using the one installed on the cluster")
    p.add_argument("--resume", action="store_true", help="pass --resume to distmerge run on the cluster")
    p.add_argument("--no-follow", action="store_true",
                   help="return once the job is accepted (prints how to follow or stop it)")

    p = sub.add_parser("bench", help="generate experts of a shape, merge, print medians")
    if verb == "bench":
        from distmerge.bench import add_arguments

        add_arguments(p)
    return parser


def _verb(argv: list[str]) -> str | None:
    """The verb of a command line: its first word that is not an option (the top-level
    options take no values)."""
    return next((a for a in argv if not a.startswith("-")), None)


def _load(args):
    from distmerge.config import load_pipeline

    return load_pipeline(args.pipeline, workers=args.workers, memory_per_worker=args.memory_per_worker,
                         slice_size=args.slice_size, overwrite=args.overwrite or None,
                         metrics_port=getattr(args, "metrics_port", None))


def cmd_validate(args) -> int:
    from distmerge.engine.driver import plan_for, validate

    if args.sample_rows is not None and (not args.deep or args.sample_rows < 1):
        raise ConfigError("--sample-rows: needs --deep and a positive number of rows")
    pipeline = _load(args)
    v = validate(pipeline)
    plan = plan_for(pipeline, v)
    gb = (v.base.nbytes + sum(e.nbytes for e in v.experts)) / 1e9
    print(f"ok: {pipeline.method.name} over {len(v.experts)} experts, {len(v.base.tensors)} tensors, "
          f"{gb:.3f} GB to read, {len(plan.slices)} slices into {len(plan.shards)} shard(s)")
    if args.deep:
        from distmerge.checkpoint.deep import DEFAULT_SAMPLE_ROWS, deep_validate

        report = deep_validate(v.base, v.experts, storage=pipeline.storage,
                               allow_nonfinite=pipeline.allow_nonfinite,
                               sample_rows=args.sample_rows or DEFAULT_SAMPLE_ROWS)
        print("\n".join(report.lines()))
        error = report.error()
        if error is not None:
            raise error
    return 0


def cmd_plan(args) -> int:
    from distmerge.engine.driver import plan_for, validate

    pipeline = _load(args)
    plan = plan_for(pipeline, validate(pipeline))
    if args.format == "json":
        print(plan.to_json())
        return 0
    print(f"{len(plan.shards)} shard(s), {len(plan.slices)} slices, "
          f"{plan.slice_elements} elements per model per slice at most")
    for sh in plan.shards:
        print(f"  {sh.filename}: {sh.size} bytes, {len(sh.tensors)} tensors")
    print(f"{'slice':>6} {'shard':>5} {'bytes':>12}  pieces")
    for s in plan.slices:
        pieces = ", ".join(f"{p.tensor}[{p.row_start}:{p.row_stop}]" for p in s.pieces[:3])
        more = f" (+{len(s.pieces) - 3})" if len(s.pieces) > 3 else ""
        print(f"{s.index:>6} {s.shard:>5} {s.nbytes:>12}  {pieces}{more}")
    return 0


def cmd_run(args) -> int:
    from distmerge.engine.driver import run_pipeline

    pipeline = _load(args)
    summary = run_pipeline(pipeline, executor=args.executor, show_progress=not args.no_progress,
                           resume=args.resume)
    print("\n".join(summary.lines()))
    return 0


def cmd_inspect(args) -> int:
    from distmerge.checkpoint.source import read_model_headers
    from distmerge.config import expand_path

    m = read_model_headers(expand_path(args.path))
    rows = sorted((n, info.dtype, list(info.shape), info.nbytes, shard.rsplit("/", 1)[-1])
                  for n, (shard, info) in m.tensors.items())
    if args.format == "json":
        print(json.dumps([dict(zip(("name", "dtype", "shape", "bytes", "shard"), r)) for r in rows], indent=1))
        return 0
    width = max((len(r[0]) for r in rows), default=4)
    for name, dtype, shape, nbytes, shard in rows:
        print(f"{name:<{width}}  {dtype:<5} {str(shape):<16} {nbytes:>12}  {shard}")
    print(f"{len(rows)} tensors in {len(m.shards)} shard(s), {m.nbytes} bytes")
    return 0


def cmd_demo(args) -> int:
    from distmerge.demo import default_cache, generate

    out = args.out or str(default_cache() / "demo")
    folders = generate(out, experts=args.experts)
    print(f"demo models ready: {folders[0]} and {len(folders) - 1} experts beside it")
    return 0


def cmd_import_mergekit(args) -> int:
    from distmerge.importers.mergekit import import_mergekit

    text, warnings = import_mergekit(args.config, output_path=args.output_path, out=args.output)
    for w in warnings:
        print(f"distmerge: warning: {w}", file=sys.stderr)
    if args.output:
        print(f"wrote {args.output} ({len(warnings)} warning(s))", file=sys.stderr)
    else:
        print(text, end="")
    return 0


def cmd_compress(args) -> int:
    from distmerge.compress import compress

    pipeline = _load(args)
    if args.workers:
        log.info("compress runs in this one process; --workers is not used")
    print("\n".join(compress(pipeline).lines()))
    return 0


def cmd_extract(args) -> int:
    from distmerge.compress import extract

    summary = extract(args.compressed, args.expert, args.out, dtype=args.dtype,
                      overwrite=args.overwrite, reference=args.reference)
    print("\n".join(summary.lines()))
    return 0


def cmd_submit(args) -> int:
    from distmerge.submit import submit

    return submit(args.pipeline, args.address, follow=not args.no_follow,
                  working_dir=args.working_dir, pip=args.pip, ship_source=args.ship_source,
                  workers=args.workers, memory_per_worker=args.memory_per_worker,
                  slice_size=args.slice_size, overwrite=args.overwrite, resume=args.resume)


def cmd_bench(args) -> int:
    from distmerge.bench import run_bench

    return run_bench(args)


VERBS = {"validate": cmd_validate, "plan": cmd_plan, "run": cmd_run, "inspect": cmd_inspect,
         "demo": cmd_demo, "bench": cmd_bench, "import-mergekit": cmd_import_mergekit,
         "compress": cmd_compress, "extract": cmd_extract, "submit": cmd_submit}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(_verb(argv)).parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    try:
        return VERBS[args.verb](args)
    except DistmergeError as err:
        if args.debug:
            raise
        print(f"distmerge: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("distmerge: interrupted; nothing was published", file=sys.stderr)
        return 130


def entry() -> None:
    """The console script: :func:`main`, then exit without the interpreter's last garbage
    collections. Once torch is imported they walk its hundreds of thousands of objects for
    about 0.25 s (a merging verb: 2.66 s -> 2.3 s here) and free nothing the OS would not.
    Freezing only stops the collector: atexit handlers, ``weakref.finalize`` and
    reference-counted cleanup all still run, and every verb has closed and published its
    files before it returns. Tests call :func:`main`, so their process is not frozen."""
    code = main()
    gc.freeze()
    sys.exit(code)


if __name__ == "__main__":
    entry()
