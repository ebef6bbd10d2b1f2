"""Counter-based random numbers: the same uniform for the same (seed, expert, tensor, element)
whatever the slicing, the executor or the device.

Each element's number is a hash of its key (METHODS.md "Randomness"): the seed, the expert's
index, the tensor's name (its CRC-32) and the element's global flat index in the tensor. The
hash is murmur3's 32-bit finaliser applied in a chain::

    k = fmix(fmix(seed' ^ expert') ^ crc32(tensor))        # one number per (seed, expert, tensor)
    h = fmix(fmix(k ^ (index mod 2**32)) ^ (index >> 32))   # one per element
    u = (h >> 8) / 2**24                                   # fp32 in [0, 1), a multiple of 2**-24

with seed' = (seed ^ 0x9E3779B9) mod 2**32 and expert' = (expert · 0x27D4EB2F + 0x165667B1)
mod 2**32. The per-key part is computed with Python integers; the per-element part with int32
tensors that hold the uint32 bits (products and sums wrap modulo 2**32 on every backend, right
shifts are made logical by a mask), in place, so CPU and CUDA give the same bits.
``tests/test_methods_dare.py`` pins the output to a pure-Python transcription of the formula.
"""

from __future__ import annotations

import zlib

import torch

MASK32 = 0xFFFFFFFF
_M1, _M2 = 0x85EBCA6B, 0xC2B2AE35
# Elements per pass over the workspace; also keeps every int32 arange in range.
_SEGMENT = 1 << 30


def _i32(c: int) -> int:
    """The int32 whose bits are those of the uint32 ``c mod 2**32``."""
    c &= MASK32
    return c - (1 << 32) if c >> 31 else c


def fmix32(h: int) -> int:
    """murmur3's 32-bit finaliser on a Python integer in [0, 2**32)."""
    h ^= h >> 16
    h = (h * _M1) & MASK32
    h ^= h >> 13
    h = (h * _M2) & MASK32
    return h ^ (h >> 16)


def _xorshift_(h: torch.Tensor, k: int, tmp: torch.Tensor) -> None:
    """h ^= h >>> k (logical shift of the uint32 bits), in place."""
    torch.bitwise_right_shift(h, k, out=tmp)
    tmp &= (1 << (32 - k)) - 1
    h ^= tmp


def _fmix32_(h: torch.Tensor, tmp: torch.Tensor) -> None:
    """fmix32 on int32 tensors holding uint32 bits, in place (``tmp``: a workspace)."""
    _xorshift_(h, 16, tmp)
    h *= _i32(_M1)
    _xorshift_(h, 13, tmp)
    h *= _i32(_M2)
    _xorshift_(h, 16, tmp)


def tensor_key(name: str) -> int:
    return zlib.crc32(name.encode("utf-8"))


def stream_key(*, seed: int, expert: int, tensor: str) -> int:
    """The per-(seed, expert, tensor) part of the hash, in [0, 2**32)."""
    h = fmix32(((seed ^ 0x9E3779B9) & MASK32) ^ ((expert * 0x27D4EB2F + 0x165667B1) & MASK32))
    return fmix32(h ^ tensor_key(tensor))


def uniform(*, seed: int, expert: int, tensor: str, start: int, shape: tuple[int, ...],
            device: torch.device | str = "cpu") -> torch.Tensor:
    """fp32 uniforms in [0, 1) for the elements with global flat indices
    ``start .. start + prod(shape)`` of ``tensor``, shaped ``shape``."""
    n = 1
    for d in shape:
        n *= d
    key = _i32(stream_key(seed=seed, expert=expert, tensor=tensor))
    h = torch.empty(n, dtype=torch.int32, device=device)
    tmp = torch.empty(n, dtype=torch.int32, device=device)
    at = 0
    while at < n:
        g = start + at                  # global index of this segment's first element
        # a segment never crosses a multiple of 2**32, so index >> 32 is one number in it
        seg = min(n - at, (1 << 32) - (g & MASK32), _SEGMENT)
        x, t = h[at:at + seg], tmp[at:at + seg]
        torch.arange(seg, dtype=torch.int32, device=device, out=x)
        x += _i32(g)                    # index mod 2**32
        x ^= key
        _fmix32_(x, t)
        x ^= _i32(g >> 32)
        _fmix32_(x, t)
        at += seg
    torch.bitwise_right_shift(h, 8, out=tmp)
    tmp &= 0xFFFFFF                     # the top 24 bits of h
    return tmp.to(torch.float32).mul_(1.0 / (1 << 24)).view(shape)
