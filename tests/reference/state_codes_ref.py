"""8-bit optimizer states as cpp/include/memopt/state_codes.h specifies them, written again from
that specification in torch, as the tests' oracle: blocks of 256 elements (flat, in memory order),
power-law codes, every operation in float32 with one rounding each; r = 1/a is a float32 division
by a tensor (by a Python number torch would multiply by a rounded reciprocal):

    m: scale a = max |m|,      code c = round(127 sqrt(|m| r)) sign(m),    m = a (f |f|), f = c (1/127)
    v: scale a = max sqrt(v),  code c = round(255 sqrt(sqrt(v) r)),       sqrt(v) = a (f f), f = c (1/255)
       (a positive v takes at least code 1; 1/127 and 1/255 are float32 constants)

A block whose largest value is zero or subnormal has scale 0 and codes 0; a block with a NaN or an
infinity has scale NaN, codes 0.
Square roots are correctly rounded, as IEEE sqrtf is: float64's, rounded to float32 (exact for
float32 inputs); torch's float32 sqrt on the CPU is vectorized to within 0.5001 ulp, and differs."""
from __future__ import annotations

import math

import torch

BLOCK = 256
MIN_NUMEL = 4096  # smaller tensors keep float states


def low_bit(shape) -> bool:
    """Whether a tensor of `shape` keeps state_bits' format: at least 2-D and MIN_NUMEL
    elements (vectors and small tensors keep float states)."""
    return len(shape) >= 2 and math.prod(shape) >= MIN_NUMEL


def _blocks(x: torch.Tensor) -> torch.Tensor:
    """x (float32, flat) as (blocks, 256), the last block padded with zeros."""
    x = x.reshape(-1).float()
    pad = (-x.numel()) % BLOCK
    return torch.cat([x, x.new_zeros(pad)]).view(-1, BLOCK)


def _sqrt(x: torch.Tensor) -> torch.Tensor:
    return torch.sqrt(x.double()).float()


TINY = torch.finfo(torch.float32).tiny


def _scales(absmax: torch.Tensor, finite: torch.Tensor) -> torch.Tensor:
    absmax = torch.where(absmax >= TINY, absmax, torch.zeros_like(absmax))
    return torch.where(finite & (absmax <= 3.4028234663852886e38), absmax,
                       torch.full_like(absmax, math.nan))


def _inverse(scales: torch.Tensor) -> torch.Tensor:
    """(blocks, 1): 1/a for the blocks that are coded (a normal and finite), 0 for the rest."""
    ok = (scales >= TINY) & torch.isfinite(scales)
    one = torch.ones_like(scales)
    return torch.where(ok, one / torch.where(ok, scales, one), torch.zeros_like(scales)).unsqueeze(1)


def _step(code_max: float) -> torch.Tensor:
    """The float32 constant 1 / code_max, as C++ folds 1.0f / 127.0f."""
    return torch.tensor(1.0) / torch.tensor(code_max)


def encode_moment(x: torch.Tensor):
    """(int8 codes shaped like x, float32 scales) of a first moment."""
    xb = _blocks(x)
    scales = _scales(xb.abs().amax(1), torch.isfinite(xb).all(1))
    inv = _inverse(scales)
    t = torch.round(_sqrt(torch.where(inv > 0, xb.abs() * inv, 0.0)) * torch.tensor(127.0))
    codes = torch.where(xb < 0, -t, t)
    return codes.reshape(-1)[:x.numel()].to(torch.int8).view(x.shape), scales


def decode_moment(codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    f = codes.reshape(-1).float() * _step(127.0)
    per = scales.repeat_interleave(BLOCK)[:codes.numel()]
    return (per * (f * f.abs())).view(codes.shape)


def encode_square(v: torch.Tensor):
    """(uint8 codes shaped like v, float32 scales) of a second moment (v >= 0)."""
    vb = _blocks(v)
    root = _sqrt(vb)
    scales = _scales(root.amax(1), torch.isfinite(vb).all(1))
    inv = _inverse(scales)
    t = torch.round(_sqrt(torch.where(inv > 0, root * inv, 0.0)) * torch.tensor(255.0))
    codes = torch.where((root > 0) & (t < 1) & (inv > 0), torch.ones_like(t), t)
    return codes.reshape(-1)[:v.numel()].to(torch.uint8).view(v.shape), scales


def decode_square(codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    f = codes.reshape(-1).float() * _step(255.0)
    per = scales.repeat_interleave(BLOCK)[:codes.numel()]
    r = per * (f * f)
    return (r * r).view(codes.shape)


def requantize_moment(x: torch.Tensor) -> torch.Tensor:
    """x (any float dtype) as its 8-bit codes decode it, in x's dtype: what a step keeps of m."""
    return decode_moment(*encode_moment(x.float())).to(x.dtype)


def requantize_square(v: torch.Tensor) -> torch.Tensor:
    return decode_square(*encode_square(v.float())).to(v.dtype)
