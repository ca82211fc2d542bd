"""8-bit optimizer states as cpp/include/memopt/state_codes.h specifies them, written again from
that specification in torch, as the tests' oracle: blocks of 256 elements (flat, in memory order),
power-law codes, every operation in float32 with one rounding each (a division by a tensor, not
by a Python number, which torch turns into a multiplication by the reciprocal):

    m: scale a = max |m|,       code c = round(127 sqrt(|m| / a)) sign(m),   m = a f |f|,  f = c/127
    v: scale a = max sqrt(v),   code c = round(255 sqrt(sqrt(v) / a)),       sqrt(v) = a f^2, f = c/255
       (a positive v takes at least code 1)

A zero block has scale 0 and codes 0; a block with a NaN or an infinity has scale NaN, codes 0.
Square roots are correctly rounded, as IEEE sqrtf is: float64's, rounded to float32 (exact for
float32 inputs); torch's float32 sqrt on the CPU is vectorized to within 0.5001 ulp, and differs."""
from __future__ import annotations

import math

import torch

BLOCK = 256
MIN_NUMEL = 4096  # smaller tensors keep float states


def _blocks(x: torch.Tensor) -> torch.Tensor:
    """x (float32, flat) as (blocks, 256), the last block padded with zeros."""
    x = x.reshape(-1).float()
    pad = (-x.numel()) % BLOCK
    return torch.cat([x, x.new_zeros(pad)]).view(-1, BLOCK)


def _sqrt(x: torch.Tensor) -> torch.Tensor:
    return torch.sqrt(x.double()).float()


def _scales(absmax: torch.Tensor, finite: torch.Tensor) -> torch.Tensor:
    return torch.where(finite & (absmax <= 3.4028234663852886e38), absmax,
                       torch.full_like(absmax, math.nan))


def encode_moment(x: torch.Tensor):
    """(int8 codes shaped like x, float32 scales) of a first moment."""
    xb = _blocks(x)
    scales = _scales(xb.abs().amax(1), torch.isfinite(xb).all(1))
    ok = (scales > 0) & torch.isfinite(scales)
    a = torch.where(ok, scales, torch.ones_like(scales)).unsqueeze(1)
    t = torch.round(_sqrt(xb.abs() / a) * torch.tensor(127.0))
    codes = torch.where(ok.unsqueeze(1), torch.where(xb < 0, -t, t), torch.zeros_like(t))
    return codes.reshape(-1)[:x.numel()].to(torch.int8).view(x.shape), scales


def decode_moment(codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    f = codes.reshape(-1).float() / torch.full((codes.numel(),), 127.0)
    per = scales.repeat_interleave(BLOCK)[:codes.numel()]
    return (per * (f * f.abs())).view(codes.shape)


def encode_square(v: torch.Tensor):
    """(uint8 codes shaped like v, float32 scales) of a second moment (v >= 0)."""
    vb = _blocks(v)
    scales = _scales(_sqrt(vb.amax(1)), torch.isfinite(vb).all(1))
    ok = (scales > 0) & torch.isfinite(scales)
    a = torch.where(ok, scales, torch.ones_like(scales)).unsqueeze(1)
    t = torch.round(_sqrt(_sqrt(vb) / a) * torch.tensor(255.0))
    t = torch.where((vb > 0) & (t < 1), torch.ones_like(t), t)
    codes = torch.where(ok.unsqueeze(1), t, torch.zeros_like(t))
    return codes.reshape(-1)[:v.numel()].to(torch.uint8).view(v.shape), scales


def decode_square(codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    f = codes.reshape(-1).float() / torch.full((codes.numel(),), 255.0)
    per = scales.repeat_interleave(BLOCK)[:codes.numel()]
    r = per * (f * f)
    return (r * r).view(codes.shape)


def requantize_moment(x: torch.Tensor) -> torch.Tensor:
    """x (any float dtype) as its 8-bit codes decode it, in x's dtype: what a step keeps of m."""
    return decode_moment(*encode_moment(x.float())).to(x.dtype)


def requantize_square(v: torch.Tensor) -> torch.Tensor:
    return decode_square(*encode_square(v.float())).to(v.dtype)
