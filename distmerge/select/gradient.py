"""The data objective's gradient stage: ∇f(θ^t) as a checkpoint in the base's layout.

``objective: {kind: data, model: "pkg.mod:factory", tasks: [{data, loss}], batch_size}``:

    f(θ) = 1/|tasks| Σ_task 1/N_task Σ_i loss_task(model(θ; x_i), y_i)
    cross_entropy: −log softmax(logits)[y_i]          (``labels`` int64 in the task file)
    entropy:       −Σ_c p_c log p_c, p = softmax(logits)   (unlabelled: only ``inputs``)

The model is ``factory()`` (a torch.nn.Module whose ``state_dict`` names and shapes are the
checkpoint's tensors), run in eval mode with ``torch.func.functional_call`` on
θ^t = θ₀ + Σ_j c_j τ_j, built tensor by tensor exactly as the merge pass builds it (the method's
own ``merge`` on whole tensors). Batches of ``batch_size`` are back-propagated one at a time, each
scaled by 1/(|tasks| N_task), in a fixed order, so the gradient is that of f over the whole sets.

The gradient is written as fp32 safetensors with every tensor name and shape of the base
(integer tensors as zeros) into the run's staging folder, replacing the previous one
atomically; the slice workers read it as one more source and compute their part of every
candidate's score (:meth:`distmerge.methods.frank_wolfe.FrankWolfe.stats`).

This is the plain-torch path for models that fit one process; it runs in the driver process
and keeps the pool's fp32 tensors resident when they fit ``resources.memory_per_worker``
(otherwise it re-reads them every iteration and says so per iteration). When the run's
``objective.scoring`` resolved to ``sketch`` and the pool does not fit but one fp32 model does,
it keeps θ̃^t instead and moves it by each recorded pick, θ̃ ← θ̃ + η (θ_pick − θ̃), reading only
the picked expert's tensors (:meth:`ThetaAndLoss.theta`; the trace's ``gradient_point``:
``formula`` or ``incremental``; θ̃^t equals the formula's θ^t up to fp32 rounding, see
FRANK_WOLFE.md "The gradient point"). Models that do not fit
one process (or ``objective.gradient: sharded``) use :mod:`distmerge.select.sharded`: torch
FSDP2 across Ray actors, each rank building its rows of θ^t with :meth:`ThetaAndLoss.merged`
and writing its rows of ∇f into the same file layout.
"""

from __future__ import annotations

import importlib
import logging
import math
import os
import shutil
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save

from distmerge.checkpoint.header import FLOAT_DTYPES
from distmerge.checkpoint.reader import TORCH_DTYPES, RangeReader
from distmerge.checkpoint.source import ModelHeaders, read_model_headers
from distmerge.errors import ConfigError
from distmerge.methods.base import Block

log = logging.getLogger(__name__)


def load_factory(spec: str):
    """``"package.module:factory"`` → the callable.

    Raises:
        ConfigError: the module or the attribute is missing."""
    mod_name, _, attr = spec.partition(":")
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as err:
        raise ConfigError(f"method.objective.model: cannot import {mod_name} ({err}); install it or "
                          "fix the module path") from None
    fn = getattr(mod, attr, None)
    if not callable(fn):
        raise ConfigError(f"method.objective.model: {mod_name} has no callable {attr}")
    return fn


def _shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def check_data_objective(obj: dict[str, Any], base: ModelHeaders) -> None:
    """Everything about a data objective that can be checked before any tensor byte is read:
    the factory builds (on the meta device) a module with the checkpoint's names and shapes,
    each task file holds ``inputs`` (float) and, for cross_entropy, int64 ``labels`` of as
    many rows.

    Raises:
        ConfigError
    """
    factory = load_factory(obj["model"])
    try:
        try:
            with torch.device("meta"):                 # no memory, no initialisation cost
                model = factory()
        except Exception:  # noqa: BLE001 - a factory that cannot build on meta: build it for real
            model = factory()
    except Exception as err:  # noqa: BLE001 - the user's factory: report whatever it raised
        raise ConfigError(f"method.objective.model: {obj['model']}() failed: {err}") from None
    if not isinstance(model, torch.nn.Module):
        raise ConfigError(f"method.objective.model: {obj['model']}() must return a torch.nn.Module")
    mine = _shapes(model)
    theirs = {n: tuple(info.shape) for n, (_, info) in base.tensors.items()}
    if mine != theirs:
        missing = sorted(set(theirs) - set(mine))[:3]
        extra = sorted(set(mine) - set(theirs))[:3]
        shape = sorted(n for n in set(mine) & set(theirs) if mine[n] != theirs[n])[:3]
        raise ConfigError(f"method.objective.model: {obj['model']}()'s state_dict does not match "
                          f"the checkpoint (not in the module: {missing}, not in the checkpoint: "
                          f"{extra}, other shape: {shape})")
    for i, task in enumerate(obj["tasks"]):
        path = os.path.expanduser(task["data"])
        where = f"method.objective.tasks[{i}].data"
        if not os.path.isfile(path):
            raise ConfigError(f"{where}: {path} is not a file (a local .safetensors with 'inputs'"
                              " and, for cross_entropy, 'labels')")
        try:
            with safe_open(path, framework="pt") as f:
                keys = set(f.keys())
                if "inputs" not in keys:
                    raise ConfigError(f"{where}: {path} has no tensor 'inputs'")
                inputs = f.get_slice("inputs")
                if inputs.get_dtype() not in ("F32", "F16", "BF16", "F64"):
                    raise ConfigError(f"{where}: 'inputs' must be a float tensor, is {inputs.get_dtype()}")
                if task.get("loss", "cross_entropy") == "cross_entropy":
                    if "labels" not in keys:
                        raise ConfigError(f"{where}: loss cross_entropy needs a tensor 'labels' in {path}")
                    labels = f.get_slice("labels")
                    if labels.get_dtype() != "I64" or len(labels.get_shape()) != 1 \
                            or labels.get_shape()[0] != inputs.get_shape()[0]:
                        raise ConfigError(f"{where}: 'labels' must be int64 with one entry per row of "
                                          f"'inputs' ({inputs.get_shape()[0]})")
        except ConfigError:
            raise
        except Exception as err:  # noqa: BLE001 - a corrupt file: say which
            raise ConfigError(f"{where}: {path} is not a readable safetensors file ({err})") from None


def task_loss(logits: torch.Tensor, labels: torch.Tensor | None, kind: str) -> torch.Tensor:
    """Σ over the batch of the per-sample loss.  logits [B, C] → scalar"""
    if kind == "cross_entropy":
        return torch.nn.functional.cross_entropy(logits, labels, reduction="sum")
    logp = torch.log_softmax(logits, dim=-1)
    return -(logp.exp() * logp).sum()


class ThetaAndLoss:
    """θ^t from the pool and f, ∇f at it: the parts of the gradient stage that do not write the
    checkpoint (shared by :class:`GradientStage` in the driver and the ranks of
    :mod:`distmerge.select.sharded`)."""

    def __init__(self, method: Any, *, base: ModelHeaders, experts: list[ModelHeaders],
                 storage: Any = None, memory: int = 0, pool_bytes: int | None = None,
                 scoring: str | None = None):
        self.method = method
        self.memory = memory
        #: the run's ``objective.scoring`` (resolved); a resumed run's recorded one wins (ctx)
        self.scoring = scoring
        self.base = base
        self.experts = experts
        self.storage = storage
        self.names = sorted(base.tensors)
        obj = method.objective
        self.factory = load_factory(obj["model"])
        self.batch_size = int(obj.get("batch_size", 256))
        self.tasks = []
        for task in obj["tasks"]:
            with safe_open(os.path.expanduser(task["data"]), framework="pt") as f:
                keys = set(f.keys())
                x = f.get_tensor("inputs").float()
                y = f.get_tensor("labels") if "labels" in keys else None
            self.tasks.append((x, y, task.get("loss", "cross_entropy")))
        fp32 = sum(info.numel * 4 for _, info in base.tensors.values()) * (len(experts) + 1)
        self.pool_fp32 = fp32 if pool_bytes is None else pool_bytes
        self.resident = memory <= 0 or self.pool_fp32 <= memory
        self._pool: dict[Any, tuple[torch.Tensor, torch.Tensor]] = {}
        self._model: torch.nn.Module | None = None       # the factory's module (loss_and_grad)
        self.pass_bytes: list[int] = []
        #: one fp32 copy of the model (of this process's rows): what θ̃^t keeps
        self.model_fp32 = self.pool_fp32 // (len(experts) + 1)
        self.point: str | None = None           # "formula" | "incremental", once a θ was built
        self.point_reason = ""
        self._kept: dict[str, torch.Tensor] | None = None    # θ̃^t (incremental)
        self._kept_rows: dict[str, tuple[int, int]] | None = None
        self._kept_steps: list[Any] = []                      # the records θ̃ has moved by


    # -- θ^t ----------------------------------------------------------------------------------
    def _tensor(self, name: str, reader: RangeReader, rows: tuple[int, int] | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(base [rows, cols], experts [n, rows, cols]) of one tensor in fp32 — its rows
        ``rows = (start, stop)`` (the checkpoint's rows: dim 0 of a ≥ 2-D tensor; a 0-D or 1-D
        tensor is one row), all of them when None — and the bytes read."""
        key = name if rows is None else (name, rows)
        if key in self._pool:
            b, e = self._pool[key]
            return b, e, 0
        info = self.base.tensors[name][1]
        start, stop = (0, info.rows) if rows is None else rows
        got, nbytes = [], 0
        for slot, m in enumerate([self.base, *self.experts]):
            url, inf = m.tensors[name]
            got.append(reader.read_rows(slot, url, inf, start, stop).float().clone())
            nbytes += inf.row_bytes * (stop - start)
        b, e = got[0], torch.stack(got[1:])
        if self.resident:
            self._pool[key] = (b, e)
        return b, e, nbytes

    def merged(self, ctx: dict[str, Any], rows: dict[str, tuple[int, int]] | None = None
               ) -> tuple[dict[str, torch.Tensor], int]:
        """θ^t for every tensor (float tensors built by the method's ``merge`` from the
        coefficients in ``ctx``; integer ones the base's), and the tensor bytes read. With
        ``rows``, a tensor named there is built for those rows only (shape [stop − start,
        *shape[1:]]; the rows of a ≥ 2-D tensor), the others whole."""
        from distmerge.methods.frank_wolfe import GROUP, initial_state

        state = ctx.get(GROUP) or {}
        if "coefficients" not in state:
            ctx = {**ctx, GROUP: {**state, **initial_state(self.method, self._float_names(), len(self.experts))}}
        reader = RangeReader(self.storage)
        out, total = {}, 0
        try:
            for name in self.names:
                info = self.base.tensors[name][1]
                part = (rows or {}).get(name)
                b, e, nbytes = self._tensor(name, reader, part)
                total += nbytes
                shape = info.shape if part is None else (part[1] - part[0], *info.shape[1:])
                if info.dtype in FLOAT_DTYPES:
                    block = Block(name=name, base=b, experts=e, weights=(1.0,) * len(self.experts),
                                  row_start=0 if part is None else part[0])
                    t = self.method.merge(block, ctx)
                    # the merge pass writes the output dtype; the gradient is taken at θ^t in fp32
                    out[name] = t.reshape(shape)
                else:
                    out[name] = b.to(TORCH_DTYPES[info.dtype]).reshape(shape)
        finally:
            reader.close()
        return out, total

    # -- θ̃^t: the kept model, moved by each pick (scoring: sketch, pool not resident) -------------
    def choose_point(self, ctx: dict[str, Any]) -> tuple[str, str]:
        """Where the gradient is taken: ``formula`` (θ^t = θ₀ + Σ_j c_j τ_j rebuilt from the pool,
        the bytes the merge pass writes) or ``incremental`` (θ̃^t kept between iterations and
        moved by each iteration's pick), and why."""
        from distmerge.methods.frank_wolfe import GROUP

        scoring = (ctx.get(GROUP) or {}).get("scoring", self.scoring)
        if self.method.local_merge != "task_arithmetic":
            return "formula", "the TIES local merge replays θ^t from its record"
        if scoring != "sketch":
            return "formula", (f"objective.scoring resolved to {scoring or 'exact'}: the gradient is "
                               "taken at the merge formula's θ^t")
        if self.resident:
            return "formula", (f"the pool's fp32 copy ({self.pool_fp32} bytes) fits "
                               f"resources.memory_per_worker ({self.memory}) and stays resident: "
                               "θ^t is rebuilt from memory")
        if self.model_fp32 > self.memory:
            return "formula", (f"the pool's fp32 copy ({self.pool_fp32} bytes) does not fit "
                               f"resources.memory_per_worker ({self.memory}), nor does one fp32 copy "
                               f"of the model ({self.model_fp32} bytes): θ^t is rebuilt from the pool "
                               "every iteration")
        return "incremental", (f"the pool's fp32 copy ({self.pool_fp32} bytes) does not fit "
                               f"resources.memory_per_worker ({self.memory}); one fp32 copy of the "
                               f"model ({self.model_fp32} bytes) is kept and moved by each pick, "
                               "reading only the picked expert's tensors")

    def theta(self, ctx: dict[str, Any], rows: dict[str, tuple[int, int]] | None = None
              ) -> tuple[dict[str, torch.Tensor], int]:
        """The model the gradient is taken at for ``ctx``'s iteration (``len(trace)`` steps
        done), and the pool bytes read: :meth:`merged` (formula) or the kept θ̃^t
        (incremental; see :meth:`choose_point`). Same shapes as :meth:`merged`; incremental
        tensors are the kept ones: read them, do not modify them (valid until the next call)."""
        point, why = self.choose_point(ctx)
        if point != self.point:
            log.info("frank_wolfe gradient stage: the gradient is taken at the %s model: %s",
                     "merge formula's" if point == "formula" else "incrementally kept", why)
        self.point, self.point_reason = point, why
        if point == "formula":
            self._kept = None
            return self.merged(ctx, rows)
        return self._incremental(ctx, rows)

    def _incremental(self, ctx: dict[str, Any], rows: dict[str, tuple[int, int]] | None
                     ) -> tuple[dict[str, torch.Tensor], int]:
        """θ̃^t: θ̃^0 by the formula (:meth:`merged` at the initial coefficients), then each
        recorded step s < t: θ̃ ← θ̃ + η_s (θ_{j*_s} − θ̃) per float tensor not held, in fp32
        elementwise (``d = x − θ̃``, ``d ← d·η`` with η rounded to fp32, ``θ̃ ← θ̃ + d``: three
        correctly rounded operations, so any row block gives the same bytes). Kept between
        calls; a call whose record does not extend the kept one (a resumed run, a restarted
        rank) replays from θ̃^0, reading each past pick once."""
        from distmerge.methods.frank_wolfe import GROUP, initial_state

        trace = list((ctx.get(GROUP) or {}).get("trace", []))
        steps = [self._step_of(r) for r in trace]
        total = 0
        if (self._kept is None or self._kept_rows != rows or len(steps) < len(self._kept_steps)
                or steps[:len(self._kept_steps)] != self._kept_steps):
            names = self._float_names()
            start = {GROUP: initial_state(self.method, names, len(self.experts))}
            self._kept, total = self.merged(start, rows)
            self._kept_rows, self._kept_steps = rows, []
        reader = RangeReader(self.storage)
        try:
            for step in steps[len(self._kept_steps):]:
                total += self._move(step, rows, reader)
                self._kept_steps.append(step)
        finally:
            reader.close()
        return dict(self._kept), total

    def _step_of(self, rec: dict[str, Any]) -> tuple[float, dict[str, int]]:
        """A trace record's move: (η, {float tensor: picked expert}) over the tensors that
        moved (``model``: every float tensor unless ``moved`` is false; ``tensor``: those not
        in ``held``)."""
        floats = self._float_names()
        if isinstance(rec["picked"], dict):
            held = set(rec.get("held", ()))
            picks = {n: int(j) for n, j in rec["picked"].items() if n not in held}
            return float(rec["eta"]), {n: picks[n] for n in floats if n in picks}
        if rec["picked"] is None or not rec.get("moved", True):
            return float(rec["eta"]), {}
        return float(rec["eta"]), {n: int(rec["picked"]) for n in floats}

    def _move(self, step: tuple[float, dict[str, int]], rows: dict[str, tuple[int, int]] | None,
              reader: RangeReader) -> int:
        """One recorded step on the kept θ̃ (see :meth:`_incremental`); the bytes read: the
        picked expert's rows of each moving tensor, nothing for a held one."""
        assert self._kept is not None
        eta, picks = step
        eta32 = float(np.float32(eta))
        nbytes = 0
        for name in sorted(picks):
            j = picks[name]
            url, info = self.experts[j].tensors[name]
            part = (rows or {}).get(name)
            start, stop = (0, info.rows) if part is None else part
            cur = self._kept[name]
            x = reader.read_rows(1 + j, url, info, start, stop).float().reshape(cur.shape)
            nbytes += info.row_bytes * (stop - start)
            d = x - cur
            d.mul_(eta32)
            cur.add_(d)
        return nbytes

    def _float_names(self) -> list[str]:
        return [n for n in self.names if self.base.tensors[n][1].dtype in FLOAT_DTYPES]

    # -- f and ∇f -----------------------------------------------------------------------------
    def forward_sum(self, call: Any, *, grad: bool, device: Any = None) -> float:
        """f = Σ_task 1/(|tasks| N_task) Σ_batches loss(call(x_b), y_b), back-propagating each
        batch's term in a fixed order (tasks in order, batches of ``batch_size`` in row order)
        when ``grad``; the same order and scaling for the single-process and the sharded stage.
        ``device``: where the batches go (the sharded stage's GPU ranks); None leaves them.

        Raises:
            ConfigError: f is not finite."""
        total = 0.0
        for x, y, kind in self.tasks:
            w = 1.0 / (len(self.tasks) * x.shape[0])
            for i in range(0, x.shape[0], self.batch_size):
                xb = x[i:i + self.batch_size]
                yb = y[i:i + self.batch_size] if y is not None else None
                if device is not None:
                    xb, yb = xb.to(device), (yb.to(device) if yb is not None else None)
                with torch.set_grad_enabled(grad):
                    loss = task_loss(call(xb), yb, kind) * w
                if grad:
                    loss.backward()
                total += float(loss.detach())
        if not math.isfinite(total):
            raise ConfigError(f"method.objective: the loss at iteration's model is {total}; check the "
                              "data sets and the model factory")
        return total

    def loss_and_grad(self, theta: dict[str, torch.Tensor], *, grad: bool = True
                      ) -> tuple[float, dict[str, torch.Tensor]]:
        """f(θ) and ∇f(θ) (float tensors; zeros for the others). The factory's module is built
        once: ``functional_call`` runs it with θ's tensors in place of its own."""
        if self._model is None:
            self._model = self.factory()
            self._model.eval()
        model = self._model
        params = {n: (t.detach().clone().requires_grad_(grad) if t.is_floating_point() else t)
                  for n, t in theta.items()}
        total = self.forward_sum(lambda xb: torch.func.functional_call(model, params, (xb,)), grad=grad)
        grads = {n: (p.grad if p.is_floating_point() and p.grad is not None
                     else torch.zeros(p.shape, dtype=torch.float32)) for n, p in params.items()}
        return total, {n: g.float() for n, g in grads.items()}


class GradientStage(ThetaAndLoss):
    """Writes ∇f(θ^t) before each statistics round of a data objective (see the module
    docstring). ``headers``: the gradient checkpoint's, for the workers' Job."""

    def __init__(self, method: Any, *, base: ModelHeaders, experts: list[ModelHeaders],
                 folder: str, storage: Any = None, memory: int = 0, scoring: str | None = None):
        super().__init__(method, base=base, experts=experts, storage=storage, memory=memory,
                         scoring=scoring)
        self.folder = folder
        fp32 = self.pool_fp32
        os.makedirs(folder, exist_ok=True)
        self.path = os.path.join(folder, "model.safetensors")
        self._create()
        self.headers = read_model_headers(folder)
        self._log_plan(fp32)

    def _log_plan(self, fp32: int) -> None:
        point, why = self.choose_point({})
        log.info("frank_wolfe data objective: gradient checkpoint %s; the pool's fp32 tensors "
                 "(%d bytes) %s; the gradient is taken at the %s model (%s)", self.path, fp32,
                 "stay resident between iterations" if self.resident
                 else "exceed resources.memory_per_worker" + (
                     ": after the first iteration only the picked expert's tensors are read"
                     if point == "incremental" else " and are re-read every iteration"),
                 point, why)

    def _create(self) -> None:
        """The checkpoint, all zeros, in the layout :meth:`_write` rewrites every iteration."""
        self._write({n: torch.zeros(self.base.tensors[n][1].shape, dtype=torch.float32) for n in self.names})

    def _write(self, tensors: dict[str, torch.Tensor]) -> None:
        """Write the checkpoint in place: the same file (inode) every iteration, because the
        workers keep their file descriptors open between passes (a renamed new file would
        leave them reading the first gradient). The layout never changes, so neither do the
        headers the workers hold. Only written between passes, never while one reads."""
        data = save({n: t.contiguous() for n, t in tensors.items()})
        if os.path.exists(self.path) and os.path.getsize(self.path) != len(data):
            raise RuntimeError(f"{self.path}: the gradient's layout changed ({len(data)} bytes, "
                               f"was {os.path.getsize(self.path)})")
        with open(self.path, "r+b" if os.path.exists(self.path) else "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())

    def run(self, round: int, ctx: dict[str, Any]) -> dict[str, Any]:
        """Write ∇f(θ^round) and return ``ctx`` with f(θ^round) in it."""
        from distmerge.methods.frank_wolfe import GROUP

        theta, nbytes = self.theta(ctx)
        f, grads = self.loss_and_grad(theta)
        self._write(grads)
        self.pass_bytes.append(nbytes)
        log.info("frank_wolfe gradient stage, iteration %d: f = %.6g at the %s model, read %d pool "
                 "bytes", round, f, self.point, nbytes)
        return {**ctx, GROUP: {**(ctx.get(GROUP) or {}), "objective_now": f}}

    def objective(self, ctx: dict[str, Any]) -> float:
        """f at the final model (a forward pass only; the incremental θ̃^T when the run keeps it)."""
        theta, nbytes = self.theta(ctx)
        self.pass_bytes.append(nbytes)
        f, _ = self.loss_and_grad(theta, grad=False)
        return f

    def close(self) -> None:
        """Release what the stage runs on (nothing here: it runs in the driver); its files
        stay, for :meth:`remove` or a resumed run."""

    def remove(self) -> None:
        self.close()
        shutil.rmtree(self.folder, ignore_errors=True)
