"""``distmerge bench quality``: does merging keep what the experts learnt, on real data?

A small, honest experiment on scikit-learn's bundled digits (1797 8x8 images, no download),
run on the CPU in a few minutes; every merge goes through the real engine
(:func:`distmerge.engine.driver.run_pipeline`) on safetensors folders.

The setting, one "task" = the same 10-way digit classification on one input *domain* (a
transform of the 8x8 image), so every model shares one architecture and one 10-way head:

- **pretrained** model (:class:`DigitsMLP`, 64 → 256 → 256 → 10, ReLU): trained on the
  pretraining domains ``orig, rot180, rot270, transpose`` (training split).
- **target experts**, one per target domain ``rot90, fliplr, flipud, invert`` (domains the
  pretrained model never saw): the pretrained model fine-tuned on that domain's training split.
- **irrelevant experts**, fine-tuned with the same recipe on a pretraining domain, alternately
  on shuffled labels and on an unrelated task (the ink-amount decile of the image, or the digit
  classes relabelled by a fixed permutation). The pool of size k takes the first k of them, so
  the pools are nested.

Fine-tuning trains the hidden layers only; the head stays the pretrained one (as CLIP-style
merging keeps the zero-shot heads fixed), the same for every expert.

Splits (one seeded permutation of the images, shared by every domain): 60% train, 20%
validation, 20% test. Accuracies are on the test split. The validation split of each target
domain is written as ``val-<domain>.safetensors`` ("inputs" [N, 64] float32, "labels" [N]
int64): it is what the Frank-Wolfe ``data`` objective and the validation choice of the task
arithmetic scale see; the test split is never seen by any choice.

Methods, over the pool (target experts + k irrelevant ones): ``linear`` (plain average),
``task_arithmetic`` at λ = 0.3 and at the λ the validation sets choose from a grid, ``ties``
(density 0.2, scope model, λ = 1), and ``frank_wolfe`` with the ``data`` objective (the
validation sets) and with the ``data_free`` one (targets: the target experts), when that
method is registered. Library functions return data; only :func:`run_quality` prints.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from distmerge.errors import ConfigError

log = logging.getLogger("distmerge")

INSTALL = "pip install 'distmerge[quality]'"
HIDDEN = 256
CLASSES = 10
PRETRAIN_DOMAINS = ("orig", "rot180", "rot270", "transpose")
TARGET_DOMAINS = ("rot90", "fliplr", "flipud", "invert")
#: irrelevant expert i: its labels (cycled) and its domain (a pretraining one, cycled)
IRRELEVANT_LABELS = ("shuffled", "ink", "shuffled", "permuted")
FROZEN = ("head.",)
ALL_METHODS = ("linear", "task_arithmetic", "task_arithmetic_val", "ties", "frank_wolfe_data",
               "frank_wolfe_data_free", "frank_wolfe_data_init_base", "frank_wolfe_data_free_init_base")


# -- the model ---------------------------------------------------------------------------------
class DigitsMLP(nn.Module):
    """64 → 256 → 256 → 10 with ReLU; its state_dict keys are the checkpoint's tensor names."""

    def __init__(self, hidden: int = HIDDEN):
        super().__init__()
        self.fc1 = nn.Linear(64, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.head = nn.Linear(hidden, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:   # x: [N, 64] in [0, 1]
        return self.head(F.relu(self.fc2(F.relu(self.fc1(x)))))   # [N, 10] logits


def digits_model() -> nn.Module:
    """The experiment's architecture (a factory for ``objective.model`` of ``frank_wolfe``:
    ``"distmerge.quality:digits_model"``)."""
    return DigitsMLP()


# -- data and tasks ----------------------------------------------------------------------------
def _load_digits():
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise ConfigError("the quality experiment needs scikit-learn (its bundled digits data "
                          f"set): {INSTALL}") from None
    return load_digits()


@dataclass(frozen=True)
class Digits:
    images: torch.Tensor    # [N, 8, 8] float32 in [0, 1]
    labels: torch.Tensor    # [N] int64
    splits: dict[str, torch.Tensor]   # "train" | "val" | "test" -> indices


def load_splits(seed: int = 0) -> Digits:
    """The digits, scaled to [0, 1], and one seeded 60/20/20 split of the images.

    Raises:
        ConfigError: scikit-learn is not installed."""
    d = _load_digits()
    images = torch.tensor(d.images, dtype=torch.float32) / 16.0
    labels = torch.tensor(d.target, dtype=torch.int64)
    n = len(labels)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    a, b = int(0.6 * n), int(0.8 * n)
    return Digits(images, labels, {"train": perm[:a], "val": perm[a:b], "test": perm[b:]})


def transform(domain: str, images: torch.Tensor) -> torch.Tensor:
    """The inputs of ``domain``: [N, 8, 8] images → [N, 64]."""
    ops = {
        "orig": lambda x: x,
        "rot90": lambda x: torch.rot90(x, 1, (1, 2)),
        "rot180": lambda x: torch.rot90(x, 2, (1, 2)),
        "rot270": lambda x: torch.rot90(x, 3, (1, 2)),
        "fliplr": lambda x: torch.flip(x, (2,)),
        "flipud": lambda x: torch.flip(x, (1,)),
        "transpose": lambda x: x.transpose(1, 2),
        "invert": lambda x: 1.0 - x,
    }
    return ops[domain](images).reshape(len(images), 64).contiguous()


@dataclass(frozen=True)
class Task:
    name: str
    domain: str
    labels: str        # "digits" | "shuffled" | "ink" | "permuted"
    seed: int
    target: bool


def build_tasks(irrelevant: int, seed: int = 0,
                kinds: tuple[str, ...] = IRRELEVANT_LABELS) -> tuple[list[Task], list[Task]]:
    """The target tasks and the first ``irrelevant`` irrelevant ones, their labels cycling
    through ``kinds`` (a pure function)."""
    targets = [Task(f"target-{d}", d, "digits", seed * 1000 + i, True)
               for i, d in enumerate(TARGET_DOMAINS)]
    others = []
    for i in range(irrelevant):
        kind = kinds[i % len(kinds)]
        domain = PRETRAIN_DOMAINS[(i // 2) % len(PRETRAIN_DOMAINS)]
        others.append(Task(f"irrelevant-{i:02d}-{kind}-{domain}", domain, kind,
                           seed * 1000 + 100 + i, False))
    return targets, others


def task_data(task: Task, digits: Digits, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs [N, 64], labels [N]) of ``task`` on ``split``."""
    idx = digits.splits[split]
    x = transform(task.domain, digits.images[idx])
    y = digits.labels[idx]
    gen = torch.Generator().manual_seed(task.seed)
    if task.labels == "shuffled":
        y = y[torch.randperm(len(y), generator=gen)]
    elif task.labels == "permuted":
        y = torch.randperm(CLASSES, generator=gen)[y]
    elif task.labels == "ink":         # decile of the total ink, edges from the training split
        ink = x.sum(1)
        train_ink = transform(task.domain, digits.images[digits.splits["train"]]).sum(1)
        edges = torch.quantile(train_ink, torch.linspace(0, 1, CLASSES + 1)[1:-1])
        y = torch.bucketize(ink, edges)
    return x, y


# -- training and evaluation -------------------------------------------------------------------
def new_model(seed: int) -> DigitsMLP:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return DigitsMLP()


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, epochs: int, lr: float,
          batch_size: int, seed: int, frozen: tuple[str, ...] = ()) -> nn.Module:
    """Adam on cross-entropy, minibatches in a seeded order; parameters whose names start with
    one of ``frozen`` are not trained."""
    params = [p for n, p in model.named_parameters() if not n.startswith(frozen)]
    opt = torch.optim.Adam(params, lr=lr)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=gen)
        for i in range(0, len(y), batch_size):
            b = order[i:i + batch_size]
            opt.zero_grad()
            F.cross_entropy(model(x[b]), y[b]).backward()
            opt.step()
    return model


def accuracy(state: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> float:
    model = DigitsMLP()
    model.load_state_dict({k: v.float() for k, v in state.items()})
    model.eval()
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def state_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def write_model(folder: Path, state: dict[str, torch.Tensor]) -> Path:
    """A safetensors model folder (``model.safetensors`` and a ``config.json``)."""
    folder.mkdir(parents=True, exist_ok=True)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps({
        "model_type": "distmerge-digits-mlp", "architectures": ["DigitsMLP"],
        "hidden_size": HIDDEN, "inputs": 64, "num_labels": CLASSES, "torch_dtype": "float32"},
        indent=2))
    return folder


def write_task_set(path: Path, x: torch.Tensor, y: torch.Tensor) -> Path:
    """A labelled set for the ``frank_wolfe`` data objective ("inputs", "labels")."""
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"inputs": x.float().contiguous(), "labels": y.to(torch.int64).contiguous()}, str(path))
    return path


def load_model(folder: Path) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        state.update(load_file(str(f)))
    return state


# -- merging through the engine ----------------------------------------------------------------
def merge(base: Path, experts: list[Path], method: dict[str, Any], dest: Path, *,
          executor: str = "local") -> dict[str, torch.Tensor]:
    """Merge with :func:`run_pipeline` into ``dest`` (fp32) and return the merged weights."""
    from distmerge.config import parse_pipeline
    from distmerge.engine.driver import run_pipeline

    pipeline = parse_pipeline({
        "name": "quality-" + method["name"].replace("_", "-"),
        "base": str(base),
        "experts": [{"path": str(e), "weight": 1.0} for e in experts],
        "method": method,
        "output": {"path": str(dest), "dtype": "float32", "overwrite": True},
        "resources": {"workers": 1, "memory_per_worker": "1GB"},
    }, source=f"quality pipeline ({method['name']})")
    run_pipeline(pipeline, executor=executor, show_progress=False)
    return load_model(dest)


def fw_available(name: str = "frank_wolfe_data") -> bool:
    """Whether this build can run the ``frank_wolfe`` row ``name`` (the ``_init_base`` rows
    need the method's ``init`` parameter)."""
    import dataclasses

    from distmerge.methods import REGISTRY

    cls = REGISTRY.get("frank_wolfe")
    if cls is None:
        return False
    return not name.endswith("_init_base") or "init" in {f.name for f in dataclasses.fields(cls)}


# -- the experiment ----------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class QualityConfig:
    seed: int = 0
    pretrain_epochs: int = 30
    finetune_epochs: int = 10
    lr: float = 1e-3
    batch_size: int = 32
    pool_sizes: tuple[int, ...] = (0, 4, 16)
    ta_scale: float = 0.3
    ta_grid: tuple[float, ...] = (0.1, 0.2, 0.3, 0.5, 0.7, 1.0)
    methods: tuple[str, ...] = ALL_METHODS
    executor: str = "local"
    irrelevant_labels: tuple[str, ...] = IRRELEVANT_LABELS
    fw: dict[str, Any] = field(default_factory=dict)    # extra frank_wolfe parameters
    fw_objective: dict[str, Any] = field(default_factory=dict)   # extra keys of the data objective

    def check(self) -> None:
        """Raises:
            ConfigError: an impossible value."""
        if min(self.pretrain_epochs, self.finetune_epochs, self.batch_size) < 1:
            raise ConfigError("quality: epochs and batch size must be at least 1")
        if not self.pool_sizes or min(self.pool_sizes) < 0:
            raise ConfigError("quality: --pool-sizes must be numbers of irrelevant experts >= 0")
        unknown = sorted(set(self.methods) - set(ALL_METHODS))
        if unknown:
            raise ConfigError(f"quality: unknown method(s) {', '.join(unknown)} "
                              f"(known: {', '.join(ALL_METHODS)})")
        bad = sorted(set(self.irrelevant_labels) - {"shuffled", "ink", "permuted"})
        if not self.irrelevant_labels or bad:
            raise ConfigError(f"quality: --irrelevant-labels must list shuffled, ink or permuted, "
                              f"got {', '.join(bad) or 'none'}")
        if not self.ta_grid or not self.lr > 0:
            raise ConfigError("quality: --ta-grid needs a value and lr must be positive")


def _accuracies(state, tests) -> dict[str, float]:
    return {name: accuracy(state, x, y) for name, (x, y) in tests.items()}


def _row(method: str, pool: int | None, acc: dict[str, float], **extra: Any) -> dict[str, Any]:
    return {"method": method, "pool": pool, "accuracy": acc,
            "mean": sum(acc.values()) / len(acc), **extra}


def run_experiment(cfg: QualityConfig, workdir: Path) -> dict[str, Any]:
    """Train, write, merge and evaluate; returns the figures (JSON-serialisable).

    Raises:
        ConfigError: a bad configuration or scikit-learn missing (before any training)."""
    cfg.check()
    t0 = time.perf_counter()
    digits = load_splits(cfg.seed)
    targets, irrelevant = build_tasks(max(cfg.pool_sizes), cfg.seed, cfg.irrelevant_labels)
    tests = {t.domain: task_data(t, digits, "test") for t in targets}
    vals = {t.domain: task_data(t, digits, "val") for t in targets}
    models, data = workdir / "models", workdir / "data"
    val_files = [write_task_set(data / f"val-{d}.safetensors", *vals[d]) for d in vals]

    # pretraining on the pretraining domains (all of them in one set)
    parts = [task_data(Task("pre", d, "digits", 0, False), digits, "train") for d in PRETRAIN_DOMAINS]
    pre = train(new_model(cfg.seed), torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]),
                epochs=cfg.pretrain_epochs, lr=cfg.lr, batch_size=cfg.batch_size, seed=cfg.seed)
    base_state = state_of(pre)
    base = write_model(models / "base", base_state)
    t_pre = time.perf_counter()

    folders: dict[str, Path] = {}
    expert_states: dict[str, dict[str, torch.Tensor]] = {}
    for task in targets + irrelevant:
        model = new_model(cfg.seed)
        model.load_state_dict(base_state)
        x, y = task_data(task, digits, "train")
        train(model, x, y, epochs=cfg.finetune_epochs, lr=cfg.lr, batch_size=cfg.batch_size,
              seed=task.seed, frozen=FROZEN)
        expert_states[task.name] = state_of(model)
        folders[task.name] = write_model(models / task.name, expert_states[task.name])
    t_ft = time.perf_counter()
    norms = {name: torch.sqrt(sum(((st[k] - base_state[k]) ** 2).sum() for k in st)).item()
             for name, st in expert_states.items()}                   # ‖τ‖ over the model
    log.info("quality: pretrained in %.1f s, %d experts fine-tuned in %.1f s",
             t_pre - t0, len(folders), t_ft - t_pre)

    rows = [_row("pretrained", None, _accuracies(base_state, tests))]
    rows += [_row(f"expert {t.domain}", None, _accuracies(expert_states[t.name], tests))
             for t in targets]
    target_folders = [folders[t.name] for t in targets]
    fw = fw_available()
    skipped = [m for m in cfg.methods if m.startswith("frank_wolfe") and not fw_available(m)]
    merges = workdir / "merged"
    for k in cfg.pool_sizes:
        pool = target_folders + [folders[t.name] for t in irrelevant[:k]]    # 4 + k experts
        for name in cfg.methods:
            if name in skipped:
                continue
            specs = _specs(name, cfg, target_folders, val_files)
            best = None
            for spec in specs:                      # several only for task_arithmetic_val
                ts = time.perf_counter()
                state = merge(base, pool, spec, merges / f"{name}-{k}", executor=cfg.executor)
                seconds = time.perf_counter() - ts
                val_mean = sum(_accuracies(state, vals).values()) / len(vals)
                if best is None or val_mean > best[0]:
                    best = (val_mean, spec, state, seconds)
            val_mean, spec, state, seconds = best
            extra = {"spec": _jsonable(spec), "val_mean": val_mean, "merge_seconds": seconds}
            if name.startswith("frank_wolfe"):
                extra["picked"] = _fw_picks(merges / f"{name}-{k}", pool, target_folders)
            rows.append(_row(name, k, _accuracies(state, tests), **extra))
            log.info("quality: %s over %d experts: mean test accuracy %.3f", name, len(pool),
                     rows[-1]["mean"])
    return {
        "config": _jsonable(asdict(cfg)), "tasks": [t.domain for t in targets],
        "irrelevant": [t.name for t in irrelevant],
        "frank_wolfe": ("registered (the init_base rows need its init parameter)" if fw
                        else "not registered in this build"),
        "skipped": skipped, "rows": rows, "task_vector_norms": norms,
        "seconds": {"pretrain": t_pre - t0, "finetune": t_ft - t_pre,
                    "merge_and_eval": time.perf_counter() - t_ft},
    }


def combine(per_seed: list[dict[str, Any]]) -> dict[str, Any]:
    """The experiment over several seeds: per (method, pool), accuracies averaged over the
    seeds, with each seed's mean (``seed_means``) and their population std (``std``)."""
    first = per_seed[0]
    rows = []
    for i, row in enumerate(first["rows"]):
        same = [r["rows"][i] for r in per_seed]
        assert all((r["method"], r["pool"]) == (row["method"], row["pool"]) for r in same)
        acc = {t: statistics.fmean(r["accuracy"][t] for r in same) for t in first["tasks"]}
        means = [r["mean"] for r in same]
        out = {"method": row["method"], "pool": row["pool"], "accuracy": acc,
               "mean": statistics.fmean(means), "seed_means": means,
               "std": statistics.pstdev(means)}
        if "spec" in row:
            out["specs"] = [r["spec"] for r in same]
            out["val_mean"] = statistics.fmean(r["val_mean"] for r in same)
        if row.get("picked"):
            out["picked"] = {k: sum(r["picked"][k] for r in same)
                             for k in ("target", "irrelevant", "sketched", "certain")}
            out["picked"]["scoring"] = row["picked"]["scoring"]
        rows.append(out)
    return {
        "config": first["config"], "seeds": [r["config"]["seed"] for r in per_seed],
        "tasks": first["tasks"], "irrelevant": first["irrelevant"],
        "frank_wolfe": first["frank_wolfe"], "skipped": first["skipped"], "rows": rows,
        "task_vector_norms": {kind: statistics.fmean(
            v for r in per_seed for k, v in r["task_vector_norms"].items()
            if k.startswith(kind)) for kind in ("target", "irrelevant")
            if any(k.startswith(kind) for k in first["task_vector_norms"])},
        "seconds": {k: sum(r["seconds"][k] for r in per_seed) for k in first["seconds"]},
        "per_seed": per_seed,
    }


def _specs(name: str, cfg: QualityConfig, targets: list[Path], val_files: list[Path]) -> list[dict]:
    if name == "linear":
        return [{"name": "linear"}]
    if name == "task_arithmetic":
        return [{"name": "task_arithmetic", "scale": cfg.ta_scale}]
    if name == "task_arithmetic_val":
        return [{"name": "task_arithmetic", "scale": s} for s in cfg.ta_grid]
    if name == "ties":
        return [{"name": "ties", "density": 0.2, "scope": "model", "scale": 1.0}]
    if name.startswith("frank_wolfe_data_free"):
        objective = {"kind": "data_free", "targets": [str(t) for t in targets]}
    else:
        objective = {"kind": "data", "model": "distmerge.quality:digits_model",
                     "tasks": [{"data": str(f), "loss": "cross_entropy"} for f in val_files],
                     **cfg.fw_objective}
    init = {"init": "base"} if name.endswith("_init_base") else {}
    return [{"name": "frank_wolfe", **cfg.fw, **init, "objective": objective}]


def _fw_picks(folder: Path, pool: list[Path], targets: list[Path]) -> dict[str, Any] | None:
    """How often the trace picked a target expert and an irrelevant one (with granularity
    tensor, each tensor's pick counts)."""
    trace = folder / "frank_wolfe_trace.json"
    if not trace.exists():
        return None
    data = json.loads(trace.read_text())
    its = data.get("iterations", [])
    picks = []                        # granularity tensor: one pick per tensor and iteration
    for it in its:
        p = it.get("picked")
        picks += [p] if isinstance(p, str) else [p[k] for k in sorted(p)] if isinstance(p, dict) else []
    names = {str(p): p.name for p in pool}
    target_set = {str(t) for t in targets}
    sketched = [it for it in its if it.get("scoring") == "sketch"]
    return {"target": sum(p in target_set for p in picks),
            "irrelevant": sum(p not in target_set for p in picks),
            "sequence": [names.get(p, p) for p in picks],
            "scoring": (data.get("scoring") or {}).get("scoring", "exact"),
            # sketched iterations whose pick the stated error bound makes certain (margin ≥ 3σ)
            "sketched": len(sketched), "certain": sum(bool(it.get("certain")) for it in sketched)}


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


# -- report ------------------------------------------------------------------------------------
LABELS = {"task_arithmetic": "task_arithmetic (λ={s})", "task_arithmetic_val": "task_arithmetic (λ by val: {s})",
          "ties": "ties (d=0.2, λ=1)", "frank_wolfe_data": "frank_wolfe data",
          "frank_wolfe_data_free": "frank_wolfe data_free",
          "frank_wolfe_data_init_base": "frank_wolfe data, init base",
          "frank_wolfe_data_free_init_base": "frank_wolfe data_free, init base"}


def label(row: dict[str, Any]) -> str:
    """The row's name in the table (the λ that task arithmetic used, per seed)."""
    scales = [f"{sp.get('scale')}" for sp in row.get("specs", [])]
    scales = "/".join(scales if len(set(scales)) > 1 else scales[:1])
    return LABELS.get(row["method"], row["method"]).format(s=scales)


def _mean(row: dict[str, Any], seeds: int) -> str:
    return f"{row['mean']:.3f}" + (f" ±{row['std']:.3f}" if seeds > 1 else "")


def render(results: dict[str, Any]) -> str:
    """The printed report: test accuracy per target task and the mean (over the seeds, with
    the std of the seeds' means), one row per method and pool size; then the means as a
    method × irrelevant-experts matrix."""
    tasks, rows, seeds = results["tasks"], results["rows"], len(results["seeds"])
    width = max(len(label(r)) for r in rows) + 2
    mw = 14 if seeds > 1 else 8
    head = f"{'method':<{width}}{'irrel.':>7}" + "".join(f"{t:>8}" for t in tasks) + f"{'mean':>{mw}}"
    lines = [f"test accuracy per target task (digits; pool = {len(tasks)} target experts + N "
             f"irrelevant; seeds {','.join(map(str, results['seeds']))}: their average)",
             head, "-" * len(head)]
    for r in rows:
        pool = "-" if r["pool"] is None else str(r["pool"])
        cells = "".join(f"{r['accuracy'][t]:>8.3f}" for t in tasks)
        lines.append(f"{label(r):<{width}}{pool:>7}{cells}{_mean(r, seeds):>{mw}}")
    pools = sorted({r["pool"] for r in rows if r["pool"] is not None})
    methods = list(dict.fromkeys(r["method"] for r in rows if r["pool"] is not None))
    if pools:
        lines += ["", "mean test accuracy by irrelevant experts in the pool",
                  f"{'method':<{width}}" + "".join(f"{p:>{mw}}" for p in pools)]
        for m in methods:
            by = {r["pool"]: r for r in rows if r["method"] == m}
            lines.append(f"{m:<{width}}" + "".join(
                f"{_mean(by[p], seeds):>{mw}}" if p in by else f"{'-':>{mw}}" for p in pools))
    for r in rows:
        if r.get("picked"):
            p = r["picked"]
            lines.append(f"{r['method']} ({r['pool']} irrelevant): picked a target expert "
                         f"{p['target']}x, an irrelevant one {p['irrelevant']}x"
                         + (f"; {p['sketched']} iterations scored from the sketch, {p['certain']} of "
                            "them certain (margin ≥ 3σ)" if p.get("sketched") else ""))
    if results["skipped"]:
        lines.append(f"skipped: {', '.join(results['skipped'])} (frank_wolfe: {results['frank_wolfe']})")
    norms = results["task_vector_norms"]
    lines.append("mean ‖τ‖ (whole model): " + ", ".join(f"{k} experts {v:.2f}" for k, v in norms.items()))
    t = results["seconds"]
    lines.append(f"time: pretraining {t['pretrain']:.1f} s, fine-tuning {t['finetune']:.1f} s, "
                 f"merges and evaluation {t['merge_and_eval']:.1f} s")
    return "\n".join(lines)


# -- the CLI verb ------------------------------------------------------------------------------
def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(",") if v.strip())


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(v) for v in text.split(",") if v.strip())


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = QualityConfig()
    p.add_argument("--seeds", type=_ints, default=(0, 1, 2),
                   help="run the whole experiment once per seed (split, initialisation, batch "
                        "order, label noise) and report the average (default 0,1,2)")
    p.add_argument("--pretrain-epochs", type=int, default=d.pretrain_epochs)
    p.add_argument("--finetune-epochs", type=int, default=d.finetune_epochs)
    p.add_argument("--pool-sizes", type=_ints, default=d.pool_sizes,
                   help="irrelevant experts added to the 4 target experts (default 0,4,16)")
    p.add_argument("--irrelevant-labels", default=",".join(d.irrelevant_labels),
                   help="what the irrelevant experts learn, cycled: shuffled (shuffled digit "
                        "labels), ink (ink-amount decile), permuted (digits relabelled) "
                        f"(default {','.join(d.irrelevant_labels)})")
    p.add_argument("--methods", default=",".join(ALL_METHODS),
                   help=f"comma list (default: all of {', '.join(ALL_METHODS)})")
    p.add_argument("--ta-scale", type=float, default=d.ta_scale,
                   help="task arithmetic's fixed λ (default 0.3)")
    p.add_argument("--ta-grid", type=_floats, default=d.ta_grid,
                   help="λ values the validation sets choose from (default 0.1,0.2,0.3,0.5,0.7,1.0)")
    p.add_argument("--fw-step", type=float, metavar="STEP",
                   help="frank_wolfe's step (default: the method's, 0.1 as the authors' code)")
    p.add_argument("--fw-scale", type=float, metavar="SCALE",
                   help="frank_wolfe's local merge scale (default: the method's, 0.3)")
    p.add_argument("--fw-iterations", type=int, metavar="N",
                   help="frank_wolfe's iterations (default: the method's, 10)")
    p.add_argument("--fw-granularity", choices=["model", "tensor"],
                   help="frank_wolfe's granularity (default: the method's, model; the authors' "
                        "scripts pick per layer, i.e. tensor)")
    p.add_argument("--fw-scoring", choices=["auto", "exact", "sketch"],
                   help="the data objective's objective.scoring (default: the method's, auto: "
                        "exact for these local files); sketch scores iterations after the first "
                        "from a row-wise sketch of the pool")
    p.add_argument("--fw-sketch-ratio", type=int, metavar="R",
                   help="the data objective's objective.sketch_ratio (columns per sketch bucket; "
                        "default: the method's, 16)")
    p.add_argument("--executor", choices=["local", "ray"], default=d.executor)
    p.add_argument("--workdir", metavar="DIR",
                   help="keep the models, validation sets and merges here (default: a temporary "
                        "folder, deleted afterwards)")
    p.add_argument("--json", metavar="PATH", help="also write the figures as JSON")


def config_from_args(args: argparse.Namespace) -> QualityConfig:
    return QualityConfig(pretrain_epochs=args.pretrain_epochs,
                         finetune_epochs=args.finetune_epochs, pool_sizes=tuple(args.pool_sizes),
                         methods=tuple(m.strip() for m in args.methods.split(",") if m.strip()),
                         irrelevant_labels=tuple(k.strip() for k in args.irrelevant_labels.split(",")
                                                 if k.strip()),
                         ta_scale=args.ta_scale, ta_grid=tuple(args.ta_grid), executor=args.executor,
                         fw={k: v for k, v in (("step", args.fw_step), ("scale", args.fw_scale),
                                                ("iterations", args.fw_iterations),
                                                ("granularity", args.fw_granularity)) if v is not None},
                         fw_objective={k: v for k, v in (("scoring", args.fw_scoring),
                                                          ("sketch_ratio", args.fw_sketch_ratio))
                                       if v is not None})


def run_quality(args: argparse.Namespace) -> int:
    """The ``bench quality`` verb: run the experiment once per seed, print the table, write
    JSON when asked."""
    cfg = config_from_args(args)
    cfg.check()
    if not args.seeds:
        raise ConfigError("quality: --seeds needs at least one seed")
    _load_digits()                      # a missing scikit-learn fails before anything else
    threads = torch.get_num_threads()
    torch.set_num_threads(1)            # tiny models: one thread is fastest and reproducible
    keep = args.workdir is not None
    workdir = Path(args.workdir).expanduser() if keep else Path(tempfile.mkdtemp(prefix="distmerge-quality-"))
    started = False
    try:
        if cfg.executor == "ray":       # one Ray for every merge, as the speed bench does
            from distmerge.engine.driver import ensure_ray

            started = ensure_ray(None, 1)
        results = combine([run_experiment(replace(cfg, seed=seed), workdir / f"seed-{seed}")
                           for seed in args.seeds])
    finally:
        torch.set_num_threads(threads)
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)
        if started:
            import ray

            ray.shutdown()
    print(render(results))
    from distmerge.bench import write_figures

    write_figures(args.json, results)
    return 0
