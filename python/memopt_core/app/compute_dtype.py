"""Storage dtype and compute dtype as separate choices in the reference models.

Weights may be stored in bf16 (half the memory) while the arithmetic runs in fp32: on a CPU
without native bf16 instructions torch's bf16 matmul is hundreds of times slower than fp32 (0.3
against 120 GFLOP/s for 256x4096 @ 4096x4096 on the 2-core AMD EPYC of bench/RESULTS.md). The
model casts the embedding's output to the compute dtype once; every layer below computes in its
input's dtype (`Linear`, `LayerNorm` here; RMSNorm and attention follow their inputs), upcasting
one weight at a time for its matmul and never keeping the upcast copy: backward upcasts it again.
Gradients reach the parameters in their storage dtype.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .train_config import DTYPES


class _UpcastLinear(torch.autograd.Function):
    """y = x W^T + b with W (and b) upcast to x's dtype for the product only; saves W in its
    storage dtype, so the fp32 copy lives for one matmul, and returns W's gradient in it."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return F.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        # an input that needs no gradient (a frozen embedding's output) skips that matmul
        grad_x = grad_out @ weight.to(grad_out.dtype) if ctx.needs_input_grad[0] else None
        flat_g, flat_x = grad_out.reshape(-1, grad_out.shape[-1]), x.reshape(-1, x.shape[-1])
        grad_w = (flat_g.t() @ flat_x).to(weight.dtype)
        grad_b = flat_g.sum(0).to(weight.dtype) if ctx.has_bias else None
        return grad_x, grad_w, grad_b


class Linear(nn.Linear):
    """nn.Linear that computes in its input's dtype when that differs from its weight's."""

    def forward(self, x):
        if x.dtype == self.weight.dtype:
            return super().forward(x)
        return _UpcastLinear.apply(x, self.weight, self.bias)


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm that computes in its input's dtype (its weights are tiny: cast whole)."""

    def forward(self, x):
        cast = (lambda t: None if t is None else t.to(x.dtype))
        return F.layer_norm(x, self.normalized_shape, cast(self.weight), cast(self.bias), self.eps)


@functools.lru_cache(maxsize=None)
def cpu_has_fast_bf16() -> bool:
    """Whether this CPU has bf16 dot-product instructions (AVX512-BF16 or AMX-BF16, from
    /proc/cpuinfo; False where it cannot be read)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split() for line in f if line.startswith("flags")), [])
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_compute_dtype(storage: torch.dtype, device, choice: Optional[str] = None) -> torch.dtype:
    """The dtype the model computes in: `choice` ("fp32" / "bf16") if given; else fp32 storage
    computes in fp32, and bf16 storage in bf16 on GPUs and CPUs with fast bf16, otherwise fp32."""
    if choice is not None:
        if choice not in DTYPES:
            raise ValueError(f"compute dtype must be one of {sorted(DTYPES)}, got {choice!r}")
        return DTYPES[choice]
    if storage == torch.float32:
        return torch.float32
    fast = torch.device(device).type != "cpu" or cpu_has_fast_bf16()
    return storage if fast else torch.float32
