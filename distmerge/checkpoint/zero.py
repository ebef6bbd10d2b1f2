"""DeepSpeed ZeRO checkpoints as input: staged once into a safetensors folder, then read like any
other model.

A ZeRO checkpoint (stage 1, 2 or 3, any data-parallel world size) is the folder that
``engine.save_checkpoint(folder)`` writes, or a Hugging Face Trainer's ``checkpoint-500/``::

    folder/latest                                  # text: the newest tag, e.g. global_step500
    folder/config.json ...                         # optional side files (copied along)
    folder/global_step500/mp_rank_00_model_states.pt                  # stage 1-2 (stage 3:
    folder/global_step500/zero_pp_rank_0_mp_rank_00_optim_states.pt   #  zero_pp_rank_*_...)

Its ``*_model_states.pt`` and ``*_optim_states.pt`` are pickled torch files: loading them can
execute arbitrary code, so a pipeline entry with ``format: deepspeed_zero`` must say
``trust_pickle: true`` (checked by :mod:`distmerge.config` before any file is opened).

:func:`stage_checkpoints` runs on the driver, before any header is read, in the run's
``convert`` stage. For each ZeRO entry it first checks the layout without unpickling anything
(the folder, the tag folder, its model and optimizer state files), then, for every checkpoint
not staged yet, calls DeepSpeed's own consolidation,
``deepspeed.utils.zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint`` (lazily, one shard
at a time where the installed DeepSpeed supports ``lazy_mode``), and writes safetensors shards
with ``safetensors.torch.save_file`` plus an index. The result is fp32: ZeRO keeps fp32 master
weights, and consolidation returns them unchanged (no rounding to the training dtype); the
output dtype rules of the run apply to it as to any input (``output.dtype``, default: the
inputs' dtype), and all models of a merge must share one dtype.

The staged folder is ``<input_cache>/zero-<name>-<key>/``, where the key is a digest of the
checkpoint's real path, its tag, and the size and modification time (ns) of every file read
(the tag folder's files and the side files). It is written under a temporary name and renamed
when complete, with ``distmerge-staged.json`` describing it; a later run of the same checkpoint,
and ``--resume`` of an interrupted run, reuse it without DeepSpeed. A changed checkpoint gets a
new key, hence a new folder, hence a new run identity: never a stale conversion. Folders are
never deleted by distmerge; remove ``input_cache`` when done.

Local (or shared-filesystem) paths only: DeepSpeed's loader opens files by path.

What DeepSpeed's consolidation leaves out stays out: a ZeRO stage-1 checkpoint does not record
frozen parameters (``requires_grad=False``), so they are missing from its conversion, and the
header check then names them (:class:`~distmerge.errors.IncompatibleModelsError`).
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import io
import json
import logging
import math
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable

from distmerge.checkpoint.source import INDEX_NAME, is_local, local_path
from distmerge.checkpoint.writer import COPIED_SUFFIXES
from distmerge.errors import ConfigError, SourceNotFoundError, UnsafeCheckpointError

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'distmerge[deepspeed]'"
STAGED_FILE = "distmerge-staged.json"
STAGED_FORMAT = 1
DEFAULT_CACHE_NAME = ".distmerge-inputs"
SHARD_BYTES = 2 * 10**9                  # staged shard size (inputs are read by ranges anyway)
MODEL_STATES = "_model_states.pt"
OPTIM_STATES = "_optim_states.pt"


@dataclass(frozen=True, kw_only=True)
class ZeroCheckpoint:
    """One ZeRO checkpoint's identity, found without unpickling anything."""

    path: str                            # the checkpoint folder as the pipeline names it
    real: str                            # its real path
    tag: str
    files: dict[str, dict[str, int]]     # name relative to the folder -> {size, mtime_ns}

    @property
    def key(self) -> str:
        text = json.dumps({"format": STAGED_FORMAT, "kind": "deepspeed_zero", "path": self.real,
                           "tag": self.tag, "files": self.files}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()

    @property
    def nbytes(self) -> int:
        return sum(f["size"] for f in self.files.values())

    def folder_name(self) -> str:
        name = re.sub(r"[^A-Za-z0-9._-]+", "_", os.path.basename(self.real.rstrip("/")))[:48]
        return f"zero-{name or 'checkpoint'}-{self.key[:16]}"


def default_cache(output_path: str) -> str:
    """``.distmerge-inputs`` beside a local output folder: on the filesystem the workers already
    write to, so every worker can read what the driver staged there. For an object-store or Hub
    destination, ``$DISTMERGE_CACHE/inputs`` (default ``~/.cache/distmerge/inputs``): set
    ``input_cache`` to a shared volume when the workers run on other machines."""
    if not is_local(output_path):
        return os.path.join(os.path.expanduser(os.environ.get("DISTMERGE_CACHE", "~/.cache/distmerge")),
                            "inputs")
    parent = os.path.dirname(os.path.abspath(local_path(output_path)).rstrip("/"))
    return os.path.join(parent, DEFAULT_CACHE_NAME)


def _fingerprint(path: str) -> dict[str, int]:
    st = os.stat(path)
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _state_files(folder: str) -> list[str]:
    try:
        return sorted(n for n in os.listdir(folder) if n.endswith((MODEL_STATES, OPTIM_STATES)))
    except OSError:
        return []


def inspect_checkpoint(path: str, tag: str | None = None) -> ZeroCheckpoint:
    """Check a ZeRO checkpoint's layout and fingerprint its files; reads only ``latest``.

    Raises:
        SourceNotFoundError: no such folder, no ``latest`` (and no ``tag``), no such tag folder,
            or a tag folder without model or optimizer state files; each naming the path.
    """
    root = local_path(path)
    if not os.path.isdir(root):
        what = "is a file, not a checkpoint folder" if os.path.exists(root) else "no such folder"
        raise SourceNotFoundError(f"DeepSpeed ZeRO checkpoint not found: {path} ({what})")
    if tag is None:
        latest = os.path.join(root, "latest")
        if not os.path.isfile(latest):
            hint = ""
            if _state_files(root):
                parent, name = os.path.split(os.path.abspath(root).rstrip("/"))
                hint = (f"; it looks like a tag folder itself: use path: {parent} and tag: {name}")
            else:
                tags = sorted(n for n in os.listdir(root)
                              if any(f.endswith(MODEL_STATES) for f in _state_files(os.path.join(root, n))))
                if tags:
                    hint = f"; set tag: to one of its tag folders ({', '.join(tags[:5])})"
            raise SourceNotFoundError(
                f"{path}: not a DeepSpeed ZeRO checkpoint folder: it has no 'latest' file naming "
                f"the tag to read{hint}")
        with open(latest, "rb") as f:
            raw = f.read(4096)
        tag = raw.decode("utf-8", errors="replace").strip()
        if not tag or "/" in tag or "\\" in tag or tag in (".", ".."):
            raise SourceNotFoundError(f"{latest}: does not name a tag folder ({raw[:80]!r}); set tag:")
    folder = os.path.join(root, tag)
    if not os.path.isdir(folder):
        raise SourceNotFoundError(f"{path}: tag folder {tag!r} not found ({folder})")
    states = _state_files(folder)
    missing = [kind for kind, suffix in (("model", MODEL_STATES), ("optimizer", OPTIM_STATES))
               if not any(n.endswith(suffix) for n in states)]
    if missing:
        raise SourceNotFoundError(
            f"{folder}: no {' or '.join(missing)} state files (*{MODEL_STATES}, *{OPTIM_STATES}); "
            "not a complete DeepSpeed ZeRO checkpoint (was saving interrupted?)")
    files = {f"{tag}/{n}": _fingerprint(os.path.join(folder, n))
             for n in sorted(os.listdir(folder)) if os.path.isfile(os.path.join(folder, n))}
    for n in sorted(os.listdir(root)):
        p = os.path.join(root, n)
        if n.endswith(COPIED_SUFFIXES) and os.path.isfile(p):
            files[n] = _fingerprint(p)
    return ZeroCheckpoint(path=path, real=os.path.realpath(root), tag=tag, files=files)


def _import_zero_to_fp32(path: str):
    """DeepSpeed's ``zero_to_fp32`` module, imported only when a conversion is needed.

    Raises:
        ConfigError: DeepSpeed is not installed (or cannot be imported), naming the extra.
    """
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            from deepspeed.utils import zero_to_fp32
    except ImportError as err:
        raise ConfigError(
            f"{path}: format deepspeed_zero needs DeepSpeed to convert the checkpoint, and it "
            f"cannot be imported here ({err}); install it with {INSTALL_HINT} (CPU is enough)"
        ) from None
    return zero_to_fp32


def staged_folder(ckpt: ZeroCheckpoint, cache: str) -> str:
    return os.path.join(cache, ckpt.folder_name())


def is_staged(folder: str, ckpt: ZeroCheckpoint) -> bool:
    """Whether ``folder`` holds a complete conversion of ``ckpt``: its description names the
    same key and every shard it lists has its recorded size."""
    try:
        with open(os.path.join(folder, STAGED_FILE)) as f:
            desc = json.load(f)
        if desc.get("format") != STAGED_FORMAT or desc.get("key") != ckpt.key:
            return False
        return all(os.path.getsize(os.path.join(folder, n)) == size
                   for n, size in desc["shards"].items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def stage_checkpoints(refs: Iterable[tuple[str, str | None]], *, cache: str,
                      on_convert: Callable[[], None] | None = None) -> list[str]:
    """The staged safetensors folder of each ZeRO checkpoint ``(path, tag)``, converting those
    not staged yet (after checking every layout first, so a missing one fails before any
    conversion). ``on_convert`` is called once before the first conversion.

    Raises:
        SourceNotFoundError: a checkpoint is missing or incomplete (:func:`inspect_checkpoint`).
        ConfigError: a conversion is needed and DeepSpeed is not installed.
        UnsafeCheckpointError: DeepSpeed could not read a checkpoint (corrupt, truncated, or
            not a ZeRO checkpoint).
    """
    ckpts = [inspect_checkpoint(path, tag) for path, tag in refs]
    folders = []
    converting = False
    for ckpt in ckpts:
        folder = staged_folder(ckpt, cache)
        if is_staged(folder, ckpt):
            log.info("%s (tag %s): using its safetensors conversion %s", ckpt.path, ckpt.tag, folder)
        else:
            if not converting and on_convert is not None:
                on_convert()
            converting = True
            convert(ckpt, folder)
        folders.append(folder)
    return folders


class _LogLines(io.TextIOBase):
    """A stdout stand-in that turns what DeepSpeed prints into log lines (library code here
    never prints)."""

    def __init__(self, prefix: str):
        self.prefix = prefix
        self._buf = ""

    def write(self, s: str) -> int:
        self._buf += s
        *lines, self._buf = self._buf.split("\n")
        for line in lines:
            if line.strip():
                log.info("%s: %s", self.prefix, line.strip())
        return len(s)


def convert(ckpt: ZeroCheckpoint, folder: str) -> None:
    """Consolidate ``ckpt`` with DeepSpeed's ``zero_to_fp32`` into safetensors at ``folder``
    (built under a temporary name beside it, renamed when complete).

    Raises:
        ConfigError: DeepSpeed is not installed.
        UnsafeCheckpointError: DeepSpeed could not read the checkpoint.
    """
    zero_to_fp32 = _import_zero_to_fp32(ckpt.path)
    import deepspeed

    cache = os.path.dirname(folder)
    os.makedirs(cache, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(folder)}.tmp-", dir=cache)
    start = time.perf_counter()
    log.info("converting DeepSpeed ZeRO checkpoint %s (tag %s, %.3f GB) into safetensors at %s "
             "with DeepSpeed %s's zero_to_fp32; this unpickles its files (trust_pickle: true)",
             ckpt.path, ckpt.tag, ckpt.nbytes / 1e9, folder, deepspeed.__version__)
    try:
        get = zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint
        lazy = "lazy_mode" in inspect.signature(get).parameters
        try:
            with contextlib.redirect_stdout(_LogLines("deepspeed")), \
                    contextlib.redirect_stderr(io.StringIO()):         # its progress bars
                state = get(local_path(ckpt.real), tag=ckpt.tag, **({"lazy_mode": True} if lazy else {}))
                shards = _write_shards(state, tmp)
        except Exception as err:  # noqa: BLE001 - DeepSpeed's loader raises anything on bad files
            raise UnsafeCheckpointError(
                f"{ckpt.path} (tag {ckpt.tag}): DeepSpeed could not read this ZeRO checkpoint "
                f"({type(err).__name__}: {err}); it is corrupt or truncated, or not a ZeRO "
                "checkpoint this DeepSpeed version reads"
            ) from None
        from distmerge.checkpoint.writer import copy_side_files

        side = copy_side_files(ckpt.real, tmp, out_dtype="float32")
        desc = {"format": STAGED_FORMAT, "key": ckpt.key, "kind": "deepspeed_zero",
                "source": ckpt.real, "tag": ckpt.tag, "files": ckpt.files,
                "deepspeed": deepspeed.__version__, "dtype": "float32", "shards": shards,
                "side_files": side}
        with open(os.path.join(tmp, STAGED_FILE), "w") as f:
            json.dump(desc, f, indent=2, sort_keys=True)
        _publish(tmp, folder, ckpt)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    total = sum(shards.values())
    log.info("staged %s: %d shard(s), %.3f GB of fp32 weights (ZeRO consolidation yields the "
             "fp32 master weights; output.dtype decides the merged dtype) in %.1f s",
             folder, len(shards), total / 1e9, time.perf_counter() - start)


def _publish(tmp: str, folder: str, ckpt: ZeroCheckpoint) -> None:
    if os.path.isdir(folder) and not is_staged(folder, ckpt):
        log.warning("%s is incomplete or damaged; replacing it with a new conversion", folder)
        shutil.rmtree(folder)
    try:
        os.rename(tmp, folder)
    except OSError:
        if not is_staged(folder, ckpt):            # not a concurrent run's finished conversion
            raise
        shutil.rmtree(tmp, ignore_errors=True)
        log.info("%s was staged meanwhile by another run; using it", folder)


def _write_shards(state: dict[str, Any], out: str) -> dict[str, int]:
    """Write a (possibly lazy) state dict as safetensors shards of at most :data:`SHARD_BYTES`
    (one tensor may exceed it), in DeepSpeed's tensor order, materialising one shard at a time.
    Returns file name -> size."""
    import torch
    from safetensors.torch import save_file

    names = list(state)
    if not names:
        raise ValueError("the checkpoint holds no tensors")
    groups: list[list[str]] = [[]]
    size = 0
    for name in names:
        t = state[name]
        n = math.prod(t.shape) * t.dtype.itemsize          # t may be a lazy GatheredTensor
        if groups[-1] and size + n > SHARD_BYTES:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += n
    files: dict[str, int] = {}
    weight_map: dict[str, str] = {}
    for i, group in enumerate(groups):
        n = len(groups)
        fname = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        tensors: dict[str, torch.Tensor] = {}
        storages: set[int] = set()
        for name in group:
            t = state[name].contiguous().detach()
            # DeepSpeed's tensors may be views into one flat buffer, or one tensor under two
            # names (tied parameters): each name gets its own copy, as safetensors requires
            storage = t.untyped_storage()
            if t.storage_offset() or storage.nbytes() != t.numel() * t.dtype.itemsize \
                    or storage.data_ptr() in storages:
                t = t.clone()
            storages.add(t.untyped_storage().data_ptr())
            tensors[name] = t
        path = os.path.join(out, fname)
        save_file(tensors, path, metadata={"format": "pt"})
        del tensors
        files[fname] = os.path.getsize(path)
        weight_map.update({name: fname for name in group})
    if len(groups) > 1:
        total = sum(math.prod(state[n].shape) * state[n].dtype.itemsize for n in names)
        with open(os.path.join(out, INDEX_NAME), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return files
