"""Counter-based random numbers: the same uniform for the same (seed, expert, tensor, element)
whatever the slicing, the executor or the device.

Each element's number is a hash of its key (METHODS.md "Randomness"): the seed, the expert's
index, the tensor's name (its CRC-32) and the element's global flat index in the tensor. The
hash is murmur3's 32-bit finaliser applied in a chain, computed with int64 tensor ops that never
overflow (every product is split into 16-bit halves), so CPU and CUDA give the same bits.
"""

from __future__ import annotations

import zlib

import torch

MASK32 = 0xFFFFFFFF


def _mul32(a: torch.Tensor, c: int) -> torch.Tensor:
    """(a · c) mod 2³² for a in [0, 2³²) without int64 overflow."""
    lo = a & 0xFFFF
    hi = a >> 16
    return (lo * c + (((hi * c) & 0xFFFF) << 16)) & MASK32


def _fmix32(h: torch.Tensor) -> torch.Tensor:
    h = h ^ (h >> 16)
    h = _mul32(h, 0x85EBCA6B)
    h = h ^ (h >> 13)
    h = _mul32(h, 0xC2B2AE35)
    return h ^ (h >> 16)


def tensor_key(name: str) -> int:
    return zlib.crc32(name.encode("utf-8"))


def uniform(*, seed: int, expert: int, tensor: str, start: int, shape: tuple[int, ...],
            device: torch.device | str = "cpu") -> torch.Tensor:
    """fp32 uniforms in [0, 1) for the elements with global flat indices
    ``start .. start + prod(shape)`` of ``tensor``, shaped ``shape``."""
    n = 1
    for d in shape:
        n *= d
    idx = torch.arange(start, start + n, dtype=torch.int64, device=device)
    key = torch.tensor([
        (seed ^ 0x9E3779B9) & MASK32, (expert * 0x27D4EB2F + 0x165667B1) & MASK32, tensor_key(tensor),
    ], dtype=torch.int64, device=device)
    h = _fmix32(key[0] ^ key[1])
    h = _fmix32(h ^ key[2])
    h = _fmix32(h ^ (idx & MASK32))
    h = _fmix32(h ^ (idx >> 32))
    return ((h >> 8).to(torch.float32) * (1.0 / (1 << 24))).view(shape)
