"""Model locations: find a model's safetensors shards and read their headers, nothing else.

A model is a folder (local path or any fsspec URL) in the Hugging Face layout: either
``model.safetensors.index.json`` naming its shards, or one or more ``*.safetensors`` files.
A path to a single ``.safetensors`` file is a model too. Pickle checkpoints (``.bin``, ``.pt``,
``.pth``, ``.ckpt``) are refused: loading them runs arbitrary code. The one exception is a model
entry with ``format: deepspeed_zero`` and ``trust_pickle: true``: :func:`resolve_models` turns
it into the safetensors folder it was staged into (:mod:`distmerge.checkpoint.zero`), and only
that is read here.

Only headers are read here, by ranged reads (8 bytes, then the JSON), many shards at once.

Every URL is opened with the storage options of the run (:mod:`distmerge.checkpoint.storage`:
explicit ``storage=`` arguments, else those the driver activated for this process), and every
request goes through its retry policy, so a missing object is a :class:`SourceNotFoundError`
and a refused one an :class:`~distmerge.errors.AccessDeniedError`, each naming
the URL.
"""

from __future__ import annotations

import json
import os
import posixpath
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import fsspec
from fsspec.core import url_to_fs

from distmerge.checkpoint.header import TensorInfo, header_length, parse_header
from distmerge.checkpoint.storage import (
    active_storage,
    call_with_retries,
    filesystem,
    protocol_of,
    use_storage,
)
from distmerge.config import SourceRef, StorageConfig
from distmerge.errors import SourceNotFoundError, UnsafeCheckpointError

__all__ = ["ModelHeaders", "list_shards", "open_fs", "read_header",
           "read_model_headers", "resolve_models", "use_storage"]

INDEX_NAME = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
MAX_INDEX_BYTES = 100 * 1000 * 1000


def is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


def local_path(url: str) -> str:
    return url[len("file://"):] if url.startswith("file://") else url


EXTRAS = {"s3": "s3fs (pip install 'distmerge[s3]')", "s3a": "s3fs (pip install 'distmerge[s3]')",
          "gs": "gcsfs", "gcs": "gcsfs", "hf": "huggingface_hub"}


def open_fs(url: str, storage: StorageConfig | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """This process's filesystem for ``url`` (built here with ``storage``'s options, default
    the process's active ones; never fsspec's instance cache, never sent to another process)
    and the path inside it.

    Raises:
        SourceNotFoundError: no fsspec backend for the URL's scheme.
        ConfigError: a credential variable named by the storage options is not set here.
    """
    storage = storage if storage is not None else active_storage()
    protocol = protocol_of(url)
    try:
        if "::" in url:                              # a chained URL: fsspec's own parsing
            return url_to_fs(url)
        fs = filesystem(protocol, storage)
        return fs, fs._strip_protocol(url)
    except (ImportError, ValueError) as err:
        raise SourceNotFoundError(
            f"cannot open {url}: no filesystem for {protocol}:// ({err}); install its fsspec "
            f"backend ({EXTRAS.get(protocol, 'see fsspec.available_protocols()')})"
        ) from None


def _call(fn, url: str, storage: StorageConfig | None, what: str = "reading"):
    return call_with_retries(fn, url=url, storage=storage if storage is not None else active_storage(),
                             what=what)


def _info(fs: fsspec.AbstractFileSystem, path: str, url: str, storage: StorageConfig | None) -> dict | None:
    """``fs.info(path)``, or None when nothing is there (unlike ``isfile``/``isdir``, which
    answer False to a refused request too)."""
    try:
        return _call(lambda: fs.info(path), url, storage)
    except SourceNotFoundError:
        return None


def join(url: str, name: str) -> str:
    return url.rstrip("/") + "/" + name


@dataclass(frozen=True, kw_only=True)
class ModelHeaders:
    """Where every tensor of one model lives: tensor name -> (shard URL, TensorInfo)."""

    url: str
    shards: tuple[str, ...]
    tensors: dict[str, tuple[str, TensorInfo]]

    @property
    def nbytes(self) -> int:
        return sum(info.nbytes for _, info in self.tensors.values())


def _refuse_pickle(url: str, names: list[str]) -> None:
    pickles = sorted(n for n in names if n.lower().endswith(PICKLE_SUFFIXES))
    raise UnsafeCheckpointError(
        f"{url}: holds pickle checkpoint files ({', '.join(pickles[:3])}) and no safetensors; "
        "pickle files can run arbitrary code when loaded, so distmerge refuses them. Convert "
        "the model to safetensors first, e.g. with transformers: "
        "AutoModel.from_pretrained(path).save_pretrained(out, safe_serialization=True)"
    )


def _check_shard_name(url: str, name: object) -> str:
    if (
        not isinstance(name, str)
        or not name
        or "://" in name
        or "\\" in name
        or name.startswith("/")
        or ".." in name.split("/")
        or not name.endswith(".safetensors")
    ):
        raise UnsafeCheckpointError(
            f"{join(url, INDEX_NAME)}: weight_map names {name!r}, which is not a .safetensors "
            "file inside the model folder; refusing to read outside it"
        )
    return name


def _check_inside(folder: str, file_url: str) -> None:
    """For local models: a shard (or a symlink to it) must resolve inside the model folder."""
    if not is_local(folder):
        return
    root = os.path.realpath(local_path(folder))
    real = os.path.realpath(local_path(file_url))
    if os.path.commonpath([root, real]) != root:
        raise UnsafeCheckpointError(
            f"{file_url}: resolves to {real}, outside the model folder {root} (a symlink "
            "escaping the folder); refusing to read it"
        )


def list_shards(url: str, *, storage: StorageConfig | None = None) -> tuple[tuple[str, ...], dict[str, str] | None]:
    """The shard URLs of the model at ``url`` in a stable order, and its index's weight_map
    (tensor -> shard URL) when it has one.

    Raises:
        SourceNotFoundError: no such model, or a shard named by the index is missing.
        AccessDeniedError: the store refused a request.
        UnsafeCheckpointError: only pickle files, or an index naming files outside the folder.
    """
    fs, path = open_fs(url, storage)
    if url.lower().endswith(PICKLE_SUFFIXES):
        _refuse_pickle(url, [posixpath.basename(path)])
    info = _info(fs, path, url, storage)
    if url.endswith(".safetensors"):
        if info is None or info.get("type") != "file":
            raise SourceNotFoundError(f"model file not found: {url}")
        return (url,), None
    if info is None or info.get("type") != "directory":
        raise SourceNotFoundError(f"model not found: {url} (no such folder)")
    names = sorted(posixpath.basename(p.rstrip("/"))
                   for p in _call(lambda: fs.ls(path, detail=False), url, storage, "listing"))
    if INDEX_NAME in names:
        index_url = join(url, INDEX_NAME)
        index_path = join(path, INDEX_NAME)
        if _call(lambda: fs.size(index_path), index_url, storage) > MAX_INDEX_BYTES:
            raise UnsafeCheckpointError(f"{index_url}: index file over {MAX_INDEX_BYTES} bytes")
        raw = _call(lambda: fs.cat_file(index_path), index_url, storage)
        try:
            weight_map = json.loads(raw)["weight_map"]
        except (ValueError, KeyError, TypeError, RecursionError):
            weight_map = None
        if not isinstance(weight_map, dict):
            raise UnsafeCheckpointError(
                f"{index_url}: not a valid index (expected JSON with a weight_map object)"
            )
        files = sorted({_check_shard_name(url, n) for n in weight_map.values()})
        present = set(names)
        for name in files:
            if name not in present:
                shard = _info(fs, join(path, name), join(url, name), storage)
                if shard is None or shard.get("type") != "file":
                    raise SourceNotFoundError(f"{index_url} names {name}, which is missing")
            _check_inside(url, join(url, name))
        return tuple(join(url, n) for n in files), {t: join(url, n) for t, n in weight_map.items()}
    st = [n for n in names if n.endswith(".safetensors")]
    if not st:
        if any(n.lower().endswith(PICKLE_SUFFIXES) for n in names):
            _refuse_pickle(url, names)
        raise SourceNotFoundError(f"{url}: no .safetensors files in this folder")
    for n in st:
        _check_inside(url, join(url, n))
    return tuple(join(url, n) for n in st), None


def resolve_models(refs: list[SourceRef], *, cache: str,
                   on_convert: Callable[[], None] | None = None) -> list[str]:
    """The URL of the safetensors model each entry names: its path, or for ``deepspeed_zero``
    the folder under ``cache`` its checkpoint is staged into, converted now unless a previous
    run did (``on_convert`` is called first; see :mod:`distmerge.checkpoint.zero`).

    Raises:
        SourceNotFoundError, ConfigError, UnsafeCheckpointError: a ZeRO checkpoint is missing,
            DeepSpeed is not installed, or DeepSpeed cannot read the checkpoint.
    """
    zero = [i for i, r in enumerate(refs) if r.format == "deepspeed_zero"]
    urls = [r.path for r in refs]
    if zero:
        from distmerge.checkpoint.zero import stage_checkpoints   # torch and DeepSpeed, lazily

        staged = stage_checkpoints([(refs[i].path, refs[i].tag) for i in zero], cache=cache,
                                   on_convert=on_convert)
        for i, folder in zip(zero, staged):
            urls[i] = folder
    return urls


def read_header(shard_url: str, *, storage: StorageConfig | None = None) -> dict[str, TensorInfo]:
    """Read one shard's header by two ranged reads.

    Raises:
        SourceNotFoundError, AccessDeniedError, UnsafeCheckpointError
    """
    fs, path = open_fs(shard_url, storage)
    size = _call(lambda: fs.size(path), shard_url, storage)
    if size is None:
        raise SourceNotFoundError(f"shard not found: {shard_url}")
    prefix = _call(lambda: fs.cat_file(path, start=0, end=min(8, size)), shard_url, storage)
    n = header_length(prefix, file_size=size, where=shard_url)
    raw = _call(lambda: fs.cat_file(path, start=8, end=8 + n), shard_url, storage)
    if len(raw) != n:
        raise UnsafeCheckpointError(f"{shard_url}: header shorter than its length field")
    tensors, _ = parse_header(raw, file_size=size, where=shard_url)
    return tensors


def read_model_headers(url: str, *, pool: ThreadPoolExecutor | None = None,
                       storage: StorageConfig | None = None) -> ModelHeaders:
    """List the shards of one model and read every header (in parallel when given a pool).

    Raises:
        SourceNotFoundError, AccessDeniedError, UnsafeCheckpointError: as the model is missing,
            refused or unsafe; a tensor present in two shards, or an index that disagrees with
            the headers, is refused too.
    """
    storage = storage if storage is not None else active_storage()   # the pool's threads too
    shards, weight_map = list_shards(url, storage=storage)

    def one(shard: str) -> dict[str, TensorInfo]:
        return read_header(shard, storage=storage)

    headers = list(pool.map(one, shards)) if pool else [one(s) for s in shards]
    tensors: dict[str, tuple[str, TensorInfo]] = {}
    for shard, header in zip(shards, headers):
        for name, info in header.items():
            if name in tensors:
                raise UnsafeCheckpointError(
                    f"{url}: tensor {name!r} appears in both {tensors[name][0]} and {shard}"
                )
            tensors[name] = (shard, info)
    if weight_map is not None:
        wrong = sorted(n for n in set(weight_map) | set(tensors)
                       if weight_map.get(n) != (tensors[n][0] if n in tensors else None))
        if wrong:
            raise UnsafeCheckpointError(
                f"{join(url, INDEX_NAME)} disagrees with the shard headers about "
                f"{len(wrong)} tensor(s), e.g. {wrong[:3]}; the index or a shard is stale"
            )
    return ModelHeaders(url=url, shards=shards, tensors=tensors)
