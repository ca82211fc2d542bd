"""Stochastic rounding to bf16 as cpp/include/memopt/rounding.h specifies it, written again from
that specification in Python (integers) and torch (int64 lanes), as the tests' oracle."""
from __future__ import annotations

import torch

M64, M32 = (1 << 64) - 1, (1 << 32) - 1


def mix64(z: int) -> int:  # SplitMix64's finalizer
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


def key(seed: int, counter: int, ident: int, step: int) -> int:
    k = mix64((seed + 0x9E3779B97F4A7C15) & M64)
    for x in (counter, ident, step):
        k = mix64(k ^ (x & M64))
    return k


def _mix32(x: torch.Tensor) -> torch.Tensor:  # lowbias32 on int64 lanes holding uint32 values
    x = x ^ (x >> 16)
    x = (x * 0x21F0AAAD) & M32
    x = x ^ (x >> 15)
    x = (x * 0x735A2D97) & M32
    return x ^ (x >> 15)


def bits(k: int, index: torch.Tensor) -> torch.Tensor:
    """The random bits of elements `index` (int64) under key k."""
    lo, hi = index & M32, index >> 32
    return _mix32(((lo ^ (k & M32)) + ((k >> 32) ^ ((hi * 0x9E3779B9) & M32))) & M32)


def round_bf16(x: torch.Tensor, k: int, first: int = 0) -> torch.Tensor:
    """float32 x (flat order = element index, from `first`) rounded stochastically to bf16."""
    u = x.contiguous().view(torch.int32).to(torch.int64) & M32
    idx = torch.arange(first, first + x.numel(), dtype=torch.int64).view(x.shape)
    r = bits(k, idx) & 0xFFFF
    out = (u + r) >> 16
    nan = (u & 0x7FFFFFFF) > 0x7F800000
    out = torch.where(nan, torch.full_like(out, 0x7FC0), out)
    return out.to(torch.int32).to(torch.int16).view(torch.bfloat16)
