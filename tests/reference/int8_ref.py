"""int8 weights as cpp/include/memopt/int8_weights.h specifies them, written again from that
specification in torch (float64 for the code arithmetic, as the header does), as the tests'
oracle: decode, and the re-encoding of float32 values to nearest or stochastically."""
from __future__ import annotations

import torch

from .rounding_ref import bits


def decode(codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """float32 values of int8 codes (rows, cols) with scales (rows, cols / group)."""
    group = codes.shape[1] // scales.shape[1]
    return (codes.float().view(codes.shape[0], -1, group) * scales.unsqueeze(-1)).view(codes.shape)


def encode(x: torch.Tensor, group: int, key: int | None = None):
    """(codes, scales) of float32 x (rows, cols): per group scale absmax / 127, codes of
    x * (127 / absmax) in float64, to nearest (key None) or up when the fraction exceeds
    (bits >> 8) / 2^24 of element e (flat index) under `key`."""
    rows, cols = x.shape
    xg = x.float().view(rows, cols // group, group)
    absmax = xg.abs().amax(-1)
    finite = torch.isfinite(xg).all(-1)
    zero = absmax == 0
    scales = torch.where(finite, absmax / 127.0, torch.full_like(absmax, float("nan")))
    # (a true float32 division, as the header's 127.0f / absmax: `127.0 / tensor` is torch's
    # reciprocal-then-multiply, which rounds twice)
    inv = torch.where(finite & ~zero, torch.full_like(absmax, 127.0).div(torch.where(
        zero, 1.0, absmax)), 0.0)
    t = xg.double() * inv.double().unsqueeze(-1)
    t = torch.where(torch.isfinite(t), t, 0.0)  # a non-finite group has inv 0, codes 0
    if key is None:
        q = torch.round(t)  # half to even, as nearbyint
    else:
        idx = torch.arange(x.numel(), dtype=torch.int64).view(rows, cols // group, group)
        u = (bits(key, idx) >> 8).double() * 2.0 ** -24
        fl = torch.floor(t)
        q = fl + ((t - fl) > u).double()
    return q.clamp(-127, 127).to(torch.int8).view(rows, cols), scales.float()
