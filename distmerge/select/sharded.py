"""The data objective's gradient stage sharded across Ray actors with torch FSDP2.

Used when the objective's model does not fit one worker (``objective.gradient: auto``, the
default, and the fp32 parameters × :data:`FOOTPRINT` exceed ``resources.memory_per_worker``) or
when the pipeline asks for it (``objective.gradient: sharded``); ``single`` keeps the
driver-process path of :mod:`distmerge.select.gradient` whatever the size.

``resources.workers`` Ray actors (:class:`GradientRank`, apart from the slice actors; started
with the stage, stopped by :meth:`ShardedGradientStage.remove` after the run) form one
``torch.distributed`` process group: ``nccl`` when ``resources.gpus_per_worker`` ≥ 1 (every
rank on its own GPU: :func:`gpu_slots`; the ranks take no Ray GPU resource, the slice actors
hold them and are idle meanwhile), ``gloo`` on CPU. The rendezvous is a TCP address the driver chooses: rank 0's
node address and a free port found there (127.0.0.1 when rank 0 runs on the driver's node).

Each iteration, every rank

1. builds ``factory()`` on the meta device (float buffers become parameters, so that they are
   sharded and get a gradient as in the single-process path, which differentiates every float
   tensor of the state_dict), applies ``fully_shard`` to every submodule that owns parameters
   and to the root, then ``to_empty`` on its device (the model is built once, on the first
   iteration, and reused);
2. reads ITS rows of θ^t: for each parameter, the dim-0 chunk FSDP2 gives the rank
   (``torch.chunk`` rule: chunks of ⌈d₀/world⌉ rows, rank r from r·⌈d₀/world⌉); for ≥ 2-D
   tensors only those rows of base and experts are read (``RangeReader.read_rows``), a 1-D
   or 0-D tensor is read whole (one checkpoint row) and sliced; integer buffers are the base's
   and read whole by every rank. θ^t is built by the same code as the single-process stage
   (:meth:`distmerge.select.gradient.ThetaAndLoss.theta` with row ranges: the method's
   ``merge`` on the row block, with its ``row_start``; or, with an incremental gradient
   point, the rank's kept rows of θ̃^t moved by the last pick, reading only the picked
   expert's rows);
3. runs forward/backward over ALL the tasks' batches in the single-process order and scaling
   (:meth:`ThetaAndLoss.forward_sum`): the data are replicated, not split, so each rank
   computes the same unsharded per-batch gradient as the single process, and FSDP2's
   reduce-scatter averages ``world`` identical copies: for world ≤ 2 that is exact
   (x + x = 2x and 2x/2 = x in binary floating point), so ∇f and f are bitwise those of
   :meth:`GradientStage.loss_and_grad`; for world > 2 the sum of ``world`` identical values may
   round (≤ (world − 1) ulp relative per batch before the division);
4. writes its gradient rows into the gradient checkpoint in place, at the offsets of the
   checkpoint's header (the driver wrote the whole file once, zeros, at the stage's start; the
   layout never changes), and fsyncs. No rank gathers the model or the gradient: each rank
   holds its shard of θ^t and of ∇f, plus one FSDP unit's full parameters while it computes.
   (The staging folder must be a file system every rank sees, as the slice workers already
   need to read the gradient.)

The cost: every rank computes every batch (the forward/backward is not data-parallel): the
stage buys memory, not speed, in exchange for a result equal to the single-process one.
"""

from __future__ import annotations

import logging
import math
import os
import socket
from typing import Any

import torch

from distmerge.checkpoint.header import FLOAT_DTYPES, build_header
from distmerge.checkpoint.source import ModelHeaders
from distmerge.errors import ConfigError
from distmerge.select.gradient import GradientStage, ThetaAndLoss

log = logging.getLogger(__name__)

#: fp32 parameter bytes × FOOTPRINT is what one process needs for the single-process stage:
#: θ^t (1), its gradient (1), the activations and autograd buffers of a batch and the fp32
#: pool tensors being merged (2, a rough allowance for modest batch sizes).
FOOTPRINT = 4


def param_bytes(base: ModelHeaders) -> int:
    """fp32 bytes of the model's float tensors."""
    return sum(info.numel * 4 for _, info in base.tensors.values() if info.dtype in FLOAT_DTYPES)


def choose(mode: str, base: ModelHeaders, memory: int) -> str:
    """``single`` or ``sharded`` for ``objective.gradient = mode``."""
    if mode in ("single", "sharded"):
        return mode
    need = param_bytes(base) * FOOTPRINT
    return "sharded" if memory > 0 and need > memory else "single"


def check_sharded(obj: dict[str, Any], base: ModelHeaders, *, workers: int, memory: int,
                  gpus_per_worker: float) -> None:
    """What can be refused before work about the sharded stage.

    Raises:
        ConfigError
    """
    mode = obj.get("gradient", "auto")
    if choose(mode, base, memory) != "sharded":
        return
    why = "objective.gradient: sharded" if mode == "sharded" else (
        f"the model's fp32 parameters × {FOOTPRINT} ({param_bytes(base) * FOOTPRINT} bytes) exceed "
        f"resources.memory_per_worker ({memory})")
    if 0 < gpus_per_worker < 1:
        raise ConfigError(f"resources.gpus_per_worker: {gpus_per_worker}: the sharded gradient stage "
                          f"({why}) runs one NCCL rank per GPU; give each worker a whole GPU or none")
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError as err:
        raise ConfigError(f"method.objective: the sharded gradient stage ({why}) needs "
                          f"torch.distributed with FSDP2 ({err})") from None
    if not torch.distributed.is_available():
        raise ConfigError(f"method.objective: the sharded gradient stage ({why}) needs a torch "
                          "built with torch.distributed")
    if workers < 1:
        raise ConfigError("resources.workers: the sharded gradient stage needs at least one worker")


def chunk_rows(d0: int, world: int, rank: int) -> tuple[int, int]:
    """The dim-0 rows FSDP2's ``Shard(0)`` gives ``rank`` (the ``torch.chunk`` rule)."""
    size = math.ceil(d0 / world) if d0 else 0
    start = min(d0, rank * size)
    return start, min(d0, start + size)


def gpu_slots(workers: int) -> list[tuple[str, int]]:
    """(node id, device index) for each of ``workers`` NCCL ranks: the alive nodes' GPUs in node
    order, filled node by node (ranks of one node talk over NVLink/PCIe).

    Raises:
        ConfigError: the cluster has fewer GPUs than ranks."""
    import ray

    slots = []
    for node in sorted(ray.nodes(), key=lambda n: n["NodeID"]):
        n = int(node.get("Resources", {}).get("GPU", 0)) if node.get("Alive") else 0
        slots += [(node["NodeID"], i) for i in range(n)]
    if len(slots) < workers:
        raise ConfigError(f"resources.workers: the sharded gradient stage runs one NCCL rank per GPU "
                          f"and the Ray cluster has {len(slots)} GPU(s) for {workers} ranks; lower "
                          "workers or set gpus_per_worker: 0 (gloo on CPU)")
    return slots[:workers]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _float_buffers_to_params(model: torch.nn.Module) -> None:
    for mod in model.modules():
        for n, b in list(mod._buffers.items()):
            if b is not None and b.is_floating_point():
                del mod._buffers[n]
                mod.register_parameter(n, torch.nn.Parameter(b, requires_grad=True))


class GradientRank(ThetaAndLoss):
    """One rank of the sharded stage (a Ray actor)."""

    def __init__(self, rank: int, world: int, method: Any, base: ModelHeaders,
                 experts: list[ModelHeaders], storage: Any, memory: int, gpu_index: int,
                 scoring: str | None = None):
        share = (param_bytes(base) * (len(experts) + 1)) // max(1, world)
        super().__init__(method, base=base, experts=experts, storage=storage, memory=memory,
                         pool_bytes=share, scoring=scoring)
        self.rank, self.world = rank, world
        self.gpu, self.gpu_index = gpu_index >= 0, gpu_index     # -1: CPU (gloo)
        self.model: torch.nn.Module | None = None
        self.rows: dict[str, tuple[int, int]] = {}
        self.parts: dict[str, tuple[int, int]] = {}     # dim-0 range of each parameter's shard

    def address(self) -> tuple[str, int]:
        import ray

        return ray.util.get_node_ip_address(), _free_port()

    def init(self, host: str, port: int) -> str:
        import torch.distributed as dist

        backend = "nccl" if self.gpu else "gloo"
        if self.gpu:
            if self.gpu_index >= torch.cuda.device_count():
                raise ConfigError(f"gradient rank {self.rank}: GPU {self.gpu_index} of its node is not "
                                  f"visible ({torch.cuda.device_count()} visible)")
            torch.cuda.set_device(self.gpu_index)
        dist.init_process_group(backend, init_method=f"tcp://{host}:{port}", rank=self.rank,
                                world_size=self.world)
        return backend

    def _device(self) -> torch.device:
        return torch.device("cuda", self.gpu_index) if self.gpu else torch.device("cpu")

    def _build(self) -> None:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        dev = self._device()
        mesh = init_device_mesh(dev.type, (self.world,))
        with torch.device("meta"):
            model = self.factory()
        _float_buffers_to_params(model)
        model.eval()
        seen: set[int] = set()
        for _, p in model.named_parameters(remove_duplicate=False):
            if id(p) in seen:
                raise ConfigError("method.objective.model: the sharded gradient stage does not "
                                  "handle tied (shared) parameters yet; use objective.gradient: single")
            seen.add(id(p))
        for mod in reversed(list(model.modules())):
            if mod is not model and any(True for _ in mod.parameters(recurse=False)):
                fully_shard(mod, mesh=mesh)
        fully_shard(model, mesh=mesh)
        model.to_empty(device=dev)
        for name, p in model.named_parameters():
            info = self.base.tensors[name][1]
            if len(info.shape) == 0:
                raise ConfigError(f"method.objective.model: {name} is a 0-d parameter; the sharded "
                                  "gradient stage shards dim 0; use objective.gradient: single")
            part = chunk_rows(info.shape[0], self.world, self.rank)
            local = p.to_local()
            if local.shape[0] != part[1] - part[0]:
                raise RuntimeError(f"{name}: FSDP gave rank {self.rank} {local.shape[0]} rows, "
                                   f"expected {part}")
            self.parts[name] = part
            if len(info.shape) >= 2:                # checkpoint rows = dim 0
                self.rows[name] = part
        self.model = model

    def step(self, ctx: dict[str, Any], grad: bool, path: str | None,
             offsets: dict[str, int]) -> tuple[float, int, str, str]:
        """f(θ^t) (the same on every rank), the pool bytes this rank read and where the
        gradient was taken (:meth:`ThetaAndLoss.choose_point`: this rank keeps θ̃^t of its rows
        when incremental); with ``grad``, this rank's rows of ∇f written into ``path`` at
        ``offsets`` (each tensor's first byte)."""
        if self.gpu:
            torch.cuda.set_device(self.gpu_index)
        if self.model is None:
            self._build()
        model = self.model
        theta, nbytes = self.theta(ctx, self.rows)
        dev = self._device()
        with torch.no_grad():
            params = dict(model.named_parameters())
            for name, t in theta.items():
                if name in params:
                    a, b = self.parts[name]
                    if name not in self.rows:      # read whole (one checkpoint row): slice dim 0
                        t = t[a:b]
                    params[name].to_local().copy_(t.to(dev))
                    params[name].grad = None
                else:                               # an integer buffer: the base's, whole
                    owner, _, leaf = name.rpartition(".")
                    mod = model.get_submodule(owner) if owner else model
                    mod._buffers[leaf] = t.to(dev)
        f = self.forward_sum(model, grad=grad, device=dev)
        if grad:
            with open(path, "r+b") as fh:
                for name, p in params.items():
                    a, b = self.parts[name]
                    if b <= a:
                        continue
                    g = p.grad.to_local() if p.grad is not None else torch.zeros_like(p.to_local())
                    data = g.detach().float().contiguous().cpu().numpy().tobytes()
                    row = 4 * math.prod(self.base.tensors[name][1].shape[1:])
                    fh.seek(offsets[name] + a * row)
                    fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
        return f, nbytes, self.point, self.point_reason

    def stop(self) -> None:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


class ShardedGradientStage(GradientStage):
    """:class:`GradientStage` whose f and ∇f come from :class:`GradientRank` actors."""

    def __init__(self, method: Any, *, base: ModelHeaders, experts: list[ModelHeaders],
                 folder: str, storage: Any = None, memory: int = 0, workers: int = 1,
                 gpus_per_worker: float = 0, scoring: str | None = None):
        import ray

        if not ray.is_initialized():
            raise ConfigError("method.objective: the sharded gradient stage runs on Ray actors; run "
                              "with the Ray executor (or objective.gradient: single)")
        super().__init__(method, base=base, experts=experts, folder=folder, storage=storage,
                         memory=memory, scoring=scoring)
        self._pool.clear()
        self.resident = False                       # the driver builds no θ^t
        self.world = workers
        self.offsets = {n: info.start for n, (_, info) in self.headers.tensors.items()}
        self.actors: list[Any] = []
        try:
            gpu = gpus_per_worker >= 1
            # The ranks take no GPU resource from Ray: the slice actors hold the GPUs for the whole
            # run (asking for more would wait forever, or starve the slice actors), and they are
            # idle while the gradient stage runs. So each rank is pinned to a node with GPUs and a
            # device index there (Ray leaves CUDA_VISIBLE_DEVICES alone for a 0-GPU actor).
            slots = gpu_slots(workers) if gpu else [(None, -1)] * workers
            self.actors = []
            for r, (node, index) in enumerate(slots):
                opts: dict[str, Any] = {"num_cpus": 0, "num_gpus": 0, "max_restarts": 0}
                if node is not None:
                    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

                    opts["scheduling_strategy"] = NodeAffinitySchedulingStrategy(node, soft=False)
                self.actors.append(ray.remote(GradientRank).options(**opts).remote(
                    r, workers, method, base, experts, storage, memory, index, scoring))
            host, port = ray.get(self.actors[0].address.remote())
            if host == ray.util.get_node_ip_address():
                host = "127.0.0.1" if workers == 1 or self._all_local() else host
            backends = ray.get([a.init.remote(host, port) for a in self.actors])
        except BaseException:
            self.remove()                           # no rank left behind, no gradient folder
            raise
        self.backend = backends[0]
        log.info("frank_wolfe data objective: sharded gradient stage, %d %s ranks (FSDP2), "
                 "rendezvous %s:%d", workers, self.backend, host, port)

    def _create(self) -> None:
        """The checkpoint as a header and a sparse file of zeros: the ranks write their rows in
        place at the header's offsets, so the driver never holds the model's gradient (the
        stage exists for models that do not fit one process)."""
        entries, off = [], 0
        for name in self.names:
            info = self.base.tensors[name][1]
            nbytes = info.numel * 4
            entries.append((name, "F32", tuple(info.shape), off, off + nbytes))
            off += nbytes
        header = build_header(entries, metadata={})     # the bytes save() writes (single stage)
        with open(self.path, "wb") as f:
            f.write(header)
            f.truncate(len(header) + off)
            f.flush()
            os.fsync(f.fileno())

    def _all_local(self) -> bool:
        import ray

        here = ray.util.get_node_ip_address()
        ips = ray.get([a.address.remote() for a in self.actors])
        return all(ip == here for ip, _ in ips)

    def _log_plan(self, fp32: int) -> None:
        log.info("frank_wolfe data objective: gradient checkpoint %s, written by the sharded "
                 "stage's ranks (each its rows)", self.path)

    def _step(self, ctx: dict[str, Any], grad: bool) -> float:
        import ray

        out = ray.get([a.step.remote(ctx, grad, self.path, self.offsets) for a in self.actors])
        fs = {o[0] for o in out}
        if len(fs) != 1:
            raise RuntimeError(f"the sharded gradient stage's ranks disagree on f: {sorted(fs)}")
        points = {o[2] for o in out}
        if len(points) != 1:
            raise RuntimeError(f"the sharded gradient stage's ranks disagree on the gradient point: "
                               f"{sorted(points)}")
        if out[0][2] != self.point:
            log.info("frank_wolfe gradient stage (sharded): the gradient is taken at the %s model "
                     "(rank 0: %s)", out[0][2], out[0][3])
        self.point, self.point_reason = out[0][2], out[0][3]
        self.pass_bytes.append(sum(o[1] for o in out))
        return out[0][0]

    def run(self, round: int, ctx: dict[str, Any]) -> dict[str, Any]:
        from distmerge.methods.frank_wolfe import GROUP

        f = self._step(ctx, True)
        log.info("frank_wolfe gradient stage (sharded, %d ranks), iteration %d: f = %.6g at the %s "
                 "model, read %d pool bytes", self.world, round, f, self.point, self.pass_bytes[-1])
        return {**ctx, GROUP: {**(ctx.get(GROUP) or {}), "objective_now": f}}

    def objective(self, ctx: dict[str, Any]) -> float:
        return self._step(ctx, False)

    def close(self) -> None:
        """Stop the ranks (their process group first) and end their actors, which hold a GPU
        each and would otherwise live as long as the driver's process."""
        import ray

        for a in getattr(self, "actors", []):
            try:
                ray.get(a.stop.remote(), timeout=30)
            except Exception:  # noqa: BLE001 - a dead rank: kill it anyway
                pass
            try:
                ray.kill(a)
            except Exception as err:  # noqa: BLE001 - never hide the run's own error
                log.warning("could not end a gradient rank: %s", err)
        self.actors = []


def make_stage(method: Any, *, base: ModelHeaders, experts: list[ModelHeaders], folder: str,
               storage: Any = None, memory: int = 0, workers: int = 1,
               gpus_per_worker: float = 0, scoring: str | None = None) -> GradientStage:
    """The gradient stage ``objective.gradient`` asks for (see :func:`choose`); ``scoring``:
    the run's resolved ``objective.scoring`` (``sketch`` lets the stage keep θ̃^t)."""
    mode = choose(method.objective.get("gradient", "auto"), base, memory)
    if mode == "sharded":
        return ShardedGradientStage(method, base=base, experts=experts, folder=folder,
                                    storage=storage, memory=memory, workers=workers,
                                    gpus_per_worker=gpus_per_worker, scoring=scoring)
    return GradientStage(method, base=base, experts=experts, folder=folder, storage=storage,
                         memory=memory, scoring=scoring)
