"""The state a resumable run keeps in its staging folder, in forms that are safe to read back:
the identity digest that names the folder, input file fingerprints, and an exact, code-free
JSON encoding of the statistics context (no pickle: a staging file can never run code).
Used by :mod:`distmerge.checkpoint.writer`."""

from __future__ import annotations

import base64
import hashlib
import json
import os
from typing import Any

import numpy as np

from distmerge.checkpoint.source import is_local, local_path, open_fs


def identity_digest(identity: dict[str, Any]) -> str:
    """sha256 of the canonical JSON of a run's identity: everything that decides its output
    bytes (method and overrides, experts and weights, every input shard's header and file
    fingerprint, output dtype and shard size, the slice plan, the distmerge version)."""
    text = json.dumps(identity, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()


FINGERPRINT_KEYS = ("ETag", "etag", "VersionId", "version_id", "generation", "md5Hash", "blob_id",
                    "LastModified", "last_modified", "mtime", "created")


def file_fingerprint(url: str) -> dict[str, Any]:
    """What identifies one input file's content without reading it: its size and, on a local
    or shared filesystem, its modification time in ns; elsewhere the version fields the store
    reports (ETag, generation, blob id, modification time). Touching an input makes an
    interrupted run of it unresumable: safe, never a mixed checkpoint."""
    if is_local(url):
        st = os.stat(local_path(url))
        return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
    fs, path = open_fs(url)
    info = fs.info(path)
    fp: dict[str, Any] = {"size": info.get("size")}
    for key in FINGERPRINT_KEYS:
        if info.get(key) is not None:
            fp[key] = str(info[key])
    return fp


# -- an exact, code-free encoding of the statistics context --------------------------------------

def encode_state(obj: Any) -> Any:
    """A JSON-able form of ``obj`` that :func:`decode_state` turns back into an equal object of
    the same types: None, bool, int (any size), float (exact, via ``float.hex``; NaN and Inf
    too), str, list, tuple, dict, numpy scalars and numeric arrays (raw bytes, base64), object
    arrays of those. Anything else raises TypeError. Decoding builds only these types: unlike
    pickle, a staging file cannot make it run code.
    """
    t = type(obj)
    if obj is None or t is bool or t is str:
        return obj
    if t is int:
        return obj if abs(obj) < 1 << 53 else {"$int": hex(obj)}
    if t is float:
        return {"$f": obj.hex()}
    if t is list:
        return [encode_state(v) for v in obj]
    if t is tuple:
        return {"$tuple": [encode_state(v) for v in obj]}
    if t is dict:
        return {"$dict": [[encode_state(k), encode_state(v)] for k, v in obj.items()]}
    if isinstance(obj, np.ndarray):
        if obj.dtype == object:
            return {"$ndobj": list(obj.shape), "items": [encode_state(v) for v in obj.ravel().tolist()]}
        if obj.dtype.kind not in "biufc":
            raise TypeError(f"numpy array of dtype {obj.dtype}")
        return {"$nd": obj.dtype.str, "shape": list(obj.shape),
                "data": base64.b64encode(np.ascontiguousarray(obj).tobytes()).decode()}
    if isinstance(obj, np.generic) and obj.dtype.kind in "biufc":
        return {"$np": obj.dtype.str, "data": base64.b64encode(obj.tobytes()).decode()}
    raise TypeError(f"cannot save a {t.__module__}.{t.__qualname__} in the statistics state")


def decode_state(obj: Any) -> Any:
    """The inverse of :func:`encode_state`.

    Raises:
        ValueError: not an encoding it writes.
    """
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, list):
        return [decode_state(v) for v in obj]
    if not isinstance(obj, dict) or len(obj) not in (1, 2, 3):
        raise ValueError(f"not a saved state value: {str(obj)[:80]}")
    if "$int" in obj:
        return int(obj["$int"], 16)
    if "$f" in obj:
        return float.fromhex(obj["$f"])
    if "$tuple" in obj:
        return tuple(decode_state(v) for v in obj["$tuple"])
    if "$dict" in obj:
        return {decode_state(k): decode_state(v) for k, v in obj["$dict"]}
    if "$nd" in obj or "$np" in obj:
        dtype = np.dtype(obj.get("$nd", obj.get("$np")))
        if dtype.kind not in "biufc":
            raise ValueError(f"dtype {dtype} not allowed")
        arr = np.frombuffer(base64.b64decode(obj["data"], validate=True), dtype=dtype)
        if "$np" in obj:
            if arr.size != 1:
                raise ValueError("a scalar of several values")
            return arr[0]
        return arr.reshape([int(n) for n in obj["shape"]]).copy()
    if "$ndobj" in obj:
        items = [decode_state(v) for v in obj["items"]]
        arr = np.empty(len(items), dtype=object)
        arr[:] = items
        return arr.reshape([int(n) for n in obj["$ndobj"]])
    raise ValueError(f"not a saved state value: {str(obj)[:80]}")
