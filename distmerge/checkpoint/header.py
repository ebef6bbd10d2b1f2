"""Safetensors headers: parse and check them without trusting a byte.

A safetensors file is ``[u64 little-endian N][N bytes of JSON][data]``. The JSON maps tensor
names to ``{"dtype", "shape", "data_offsets": [begin, end]}`` (offsets relative to the data
section) plus an optional ``"__metadata__"`` of strings. Every check that the format allows an
attacker to break is made here, before any tensor byte is read: the length field, the JSON, the
dtype names, the shapes, offsets inside the data and not overlapping.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass

from distmerge.errors import UnsafeCheckpointError

MAX_HEADER_BYTES = 100 * 1000 * 1000

# safetensors dtype name -> item size in bytes
DTYPE_SIZES: dict[str, int] = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}
FLOAT_DTYPES = frozenset({"F16", "BF16", "F32", "F64", "F8_E4M3", "F8_E5M2"})

# the output dtype names of the pipeline file -> safetensors names
DTYPE_BY_NAME = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}


@dataclass(frozen=True, kw_only=True)
class TensorInfo:
    """One tensor of one file: where its bytes are (absolute offsets in the file)."""

    name: str
    dtype: str          # safetensors name, e.g. "BF16"
    shape: tuple[int, ...]
    start: int          # absolute byte offset of the first byte in the file
    stop: int           # absolute byte offset one past the last byte

    @property
    def nbytes(self) -> int:
        return self.stop - self.start

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def rows(self) -> int:
        """Rows along dim 0; a 0-D or 1-D tensor is one row."""
        return self.shape[0] if len(self.shape) >= 2 else 1

    @property
    def row_bytes(self) -> int:
        return self.nbytes // self.rows if self.rows else 0


def header_length(prefix: bytes, *, file_size: int, where: str) -> int:
    """Decode and check the 8-byte length prefix.

    Raises:
        UnsafeCheckpointError: the file is too short, or the length is past its end or over
            the 100 MB limit.
    """
    if len(prefix) < 8 or file_size < 8:
        raise UnsafeCheckpointError(f"{where}: not a safetensors file (shorter than 8 bytes)")
    (n,) = struct.unpack("<Q", prefix[:8])
    if n > MAX_HEADER_BYTES:
        raise UnsafeCheckpointError(
            f"{where}: safetensors header claims {n} bytes, over the {MAX_HEADER_BYTES} byte "
            "limit; the file is corrupt or hostile"
        )
    if 8 + n > file_size:
        raise UnsafeCheckpointError(
            f"{where}: safetensors header length {n} runs past the end of the file "
            f"({file_size} bytes); the file is truncated or corrupt"
        )
    return n


def parse_header(raw: bytes, *, file_size: int, where: str) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse the JSON header (the bytes after the length prefix) of a file of ``file_size``.

    Returns the tensors by name and the ``__metadata__`` strings.

    Raises:
        UnsafeCheckpointError: anything that is not a well-formed, self-consistent header.
    """
    def bad(msg: str) -> UnsafeCheckpointError:
        return UnsafeCheckpointError(f"{where}: corrupt or hostile safetensors header: {msg}")

    try:
        obj = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as err:   # bad UTF-8 or JSON, huge ints, deep nesting
        raise bad(f"not UTF-8 JSON ({type(err).__name__}: {str(err)[:200]})") from None
    if not isinstance(obj, dict):
        raise bad("the header is not a JSON object")
    data_start = 8 + len(raw)
    data_size = file_size - data_start
    metadata = obj.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise bad("__metadata__ must map strings to strings")
    tensors: dict[str, TensorInfo] = {}
    for name, entry in obj.items():
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise bad(f"tensor {name!r} must have exactly dtype, shape and data_offsets")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
            raise bad(f"tensor {name!r} has unknown dtype {dtype!r}")
        if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
        ):
            raise bad(f"tensor {name!r} has an invalid shape {shape!r}")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
        ):
            raise bad(f"tensor {name!r} has invalid data_offsets {offsets!r}")
        begin, end = offsets
        if not 0 <= begin <= end <= data_size:
            raise bad(
                f"tensor {name!r} data_offsets {offsets} lie outside the data section "
                f"({data_size} bytes)"
            )
        expected = math.prod(shape) * DTYPE_SIZES[dtype]
        if end - begin != expected:
            raise bad(
                f"tensor {name!r} spans {end - begin} bytes but dtype {dtype} and shape "
                f"{shape} need {expected}"
            )
        tensors[name] = TensorInfo(
            name=name, dtype=dtype, shape=tuple(shape),
            start=data_start + begin, stop=data_start + end,
        )
    spans = sorted((t.start, t.stop, t.name) for t in tensors.values() if t.stop > t.start)
    for (s0, e0, n0), (s1, _, n1) in zip(spans, spans[1:]):
        if s1 < e0:
            raise bad(f"tensors {n0!r} and {n1!r} overlap")
    return tensors, metadata


def build_header(entries: list[tuple[str, str, tuple[int, ...], int, int]],
                 metadata: dict[str, str] | None = None) -> bytes:
    """Serialise a header (length prefix + JSON padded with spaces to 8 bytes).

    ``entries`` are ``(name, dtype, shape, begin, end)`` with offsets relative to the data
    section, in the order they lie in the file. ``metadata``: ``{"format": "pt"}`` when None;
    an empty mapping writes no ``__metadata__`` (as ``safetensors.torch.save`` without it).
    """
    metadata = {"format": "pt"} if metadata is None else dict(metadata)
    obj: dict[str, object] = {"__metadata__": metadata} if metadata else {}
    for name, dtype, shape, begin, end in entries:
        obj[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [begin, end]}
    raw = json.dumps(obj, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw
