"""int8 weights: linear layers stored as int8 codes with one float32 scale per group of
`group_size` weights along each row (cpp/include/memopt/int8_weights.h defines the format and
how an update re-encodes it), updated by every memopt optimizer in its fused pass. README,
"Low-precision weights".

    memopt_core.quantize_weights_(model)                 # attention/MLP linears -> int8
    opt = memopt_core.ApolloMini(model, lr=1e-2, stochastic_rounding=True)

How it fits torch: an Int8Linear keeps its codes and scales as buffers and a `weight` parameter
that holds no memory (a scalar expanded to the weight's shape, the "carrier"). Forward and
backward decode the weight for their matmul only, one layer at a time, and the weight's gradient
reaches the carrier in the carrier's dtype, so `p.grad`, LayerwiseStep's hooks, gradient
clipping and the optimizers' groups see an ordinary parameter. The optimizers recognise a
carrier and hand the ops its codes and scales: the op decodes each span into float32, updates
it and encodes it again (stochastically under `stochastic_rounding=True`: without it, updates
smaller than half a code step are lost). Optimizer state follows the carrier's dtype.
"""
from __future__ import annotations

import contextlib
import copy
from typing import Iterable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import _C

DEFAULT_SKIP = ("lm_head", "output", "head")


def decode(codes: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The float32 values codes * scale (int8_weights.h), in `dtype`: one layer's weight."""
    group = codes.shape[1] // scales.shape[1]
    w = codes.to(torch.float32)
    w.view(codes.shape[0], -1, group).mul_(scales.unsqueeze(-1))
    return w if dtype == torch.float32 else w.to(dtype)


def encode_(values: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor) -> None:
    """codes, scales := values encoded to nearest (the ops' encoding, by the codes' device; a
    device without memopt kernels through the CPU, one weight at a time)."""
    if codes.device.type == "meta":
        return
    with torch.no_grad():
        if codes.device.type == "cpu" or (codes.is_cuda and _C.cuda_kernels):
            torch.ops.memopt.int8_encode_(values, codes, scales)
            return
        c, s = codes.cpu(), scales.cpu()
        torch.ops.memopt.int8_encode_(values.cpu(), c, s)
        codes.copy_(c)
        scales.copy_(s)


def _carrier(shape, dtype, device) -> torch.Tensor:
    return torch.zeros((), dtype=dtype, device=device).expand(*shape)


class _Carrier(nn.Parameter):
    """An Int8Linear's `weight`: a parameter that holds no memory (see the module's doc) and
    knows its layer (`_memopt_int8`), also when deep-copied (torch would copy the expanded
    tensor into a full one and drop the attribute)."""

    def __deepcopy__(self, memo):
        if id(self) not in memo:
            copied = _Carrier(_carrier(self.shape, self.dtype, self.device), self.requires_grad)
            memo[id(self)] = copied
            layer = self.__dict__.get("_memopt_int8")
            if layer is not None:
                copied._memopt_int8 = copy.deepcopy(layer, memo)
        return memo[id(self)]


class _Int8LinearFn(torch.autograd.Function):
    """y = x W^T + b with W decoded for the product only (forward and again in backward);
    returns W's gradient, in the carrier's dtype, as the carrier's."""

    @staticmethod
    def forward(ctx, x, carrier, codes, scales, bias):
        ctx.save_for_backward(x, codes, scales)
        ctx.carrier_dtype = carrier.dtype
        ctx.has_bias = bias is not None
        w = decode(codes, scales, x.dtype)
        return F.linear(x, w, None if bias is None else bias.to(x.dtype))

    @staticmethod
    def backward(ctx, grad_out):
        x, codes, scales = ctx.saved_tensors
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_out @ decode(codes, scales, grad_out.dtype)
        flat_g, flat_x = grad_out.reshape(-1, grad_out.shape[-1]), x.reshape(-1, x.shape[-1])
        grad_w = (flat_g.t() @ flat_x).to(ctx.carrier_dtype)
        grad_b = flat_g.sum(0).to(ctx.carrier_dtype) if ctx.has_bias else None
        return grad_x, grad_w, None, None, grad_b


class Int8Linear(nn.Module):
    """A linear layer with an int8 weight (codes (out, in) int8, scales (out, in / group_size)
    float32, buffers) and a memory-free `weight` parameter that receives the weight's gradient.
    Computes in its input's dtype. Its state_dict holds codes, scales and bias, not the carrier."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 group_size: int = 128, dtype: torch.dtype = torch.bfloat16, device=None):
        super().__init__()
        if group_size < 16 or group_size > 4096 or in_features % group_size:
            raise ValueError(f"group_size must be in [16, 4096] and divide in_features "
                             f"({in_features}), got {group_size}")
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self.register_buffer("weight_codes", torch.zeros(out_features, in_features,
                                                         dtype=torch.int8, device=device))
        self.register_buffer("weight_scales", torch.zeros(out_features, in_features // group_size,
                                                          dtype=torch.float32, device=device))
        self.weight = _Carrier(_carrier((out_features, in_features), dtype, device))
        self.weight._memopt_int8 = self
        self.bias = (nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device))
                     if bias else None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int = 128,
                    dtype: Optional[torch.dtype] = None) -> "Int8Linear":
        """The int8 twin of `linear`: its weight encoded to nearest, its bias kept; the gradient
        (and optimizer state) dtype is `dtype`, by default bf16 for a float32 layer, else the
        layer's own."""
        w = linear.weight
        dtype = dtype or (torch.bfloat16 if w.dtype == torch.float32 else w.dtype)
        q = cls(linear.in_features, linear.out_features, linear.bias is not None, group_size,
                dtype, w.device)
        q.load_float_weight_(w.detach())
        if linear.bias is not None:
            with torch.no_grad():
                q.bias.copy_(linear.bias.detach())
        return q

    def load_float_weight_(self, weight: torch.Tensor) -> None:
        """Encode a float weight (out, in) into this layer's codes and scales, to nearest."""
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise ValueError(f"weight of shape {tuple(weight.shape)} for an Int8Linear of "
                             f"{(self.out_features, self.in_features)}")
        encode_(weight, self.weight_codes, self.weight_scales)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return decode(self.weight_codes, self.weight_scales, dtype)

    def forward(self, x):
        return _Int8LinearFn.apply(x, self.weight, self.weight_codes, self.weight_scales,
                                   self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, group_size={self.group_size}")

    def _apply(self, fn, recurse=True):
        """.to(), .cuda(), to_empty(), .bfloat16() ...: codes and scales keep their dtypes (the
        format) and follow the device; the carrier takes the float dtype and device `fn` gives
        and stays memory-free (torch would materialize an expanded tensor)."""
        carrier, codes, scales = self.weight, self.weight_codes, self.weight_scales
        with _set_aside(self._parameters, "weight"), \
                _set_aside(self._buffers, "weight_codes", "weight_scales"):
            super()._apply(fn, recurse)
            target = fn(torch.zeros((), dtype=carrier.dtype, device=codes.device))
        if target.device != codes.device:
            move = ((lambda t: torch.empty_like(t, device=target.device)) if codes.is_meta
                    else (lambda t: t.to(target.device)))
            self._buffers["weight_codes"] = move(codes)
            self._buffers["weight_scales"] = move(scales)
        data = _carrier(carrier.shape, target.dtype, target.device)
        if torch._has_compatible_shallow_copy_type(carrier, data):
            carrier.data = data
            if carrier.grad is not None:
                carrier.grad = carrier.grad.to(device=target.device, dtype=target.dtype)
        else:  # (meta to a device: a new parameter, as Module._apply makes one)
            self._parameters["weight"] = _Carrier(data, carrier.requires_grad)
            self.weight._memopt_int8 = self
        return self

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination.pop(prefix + "weight", None)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        with _set_aside(self._parameters, "weight"):
            super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


@contextlib.contextmanager
def _set_aside(entries: dict, *keys):
    """`entries` (a module's _parameters or _buffers) without `keys` inside the block, then with
    them again, in the original order (the order parameters reach an optimizer)."""
    order, kept = list(entries), {k: entries.pop(k) for k in keys}
    try:
        yield
    finally:
        current = {**entries, **kept}
        entries.clear()
        entries.update((k, current[k]) for k in order if k in current)


def int8_layer(p: torch.Tensor) -> Optional[Int8Linear]:
    """The Int8Linear whose weight carrier `p` is, else None."""
    return getattr(p, "_memopt_int8", None)


def quantize_weights_(model: nn.Module, bits: int = 8, group_size: int = 128,
                      skip: Iterable[str] = DEFAULT_SKIP,
                      dtype: Optional[torch.dtype] = None, fit_groups: bool = False) -> list:
    """Replace model's nn.Linear layers by Int8Linear (weights encoded to nearest, in place, one
    layer at a time) and return their names. Layers whose qualified name contains any of `skip`
    (default: the output head), and weights tied to another module (an embedding), stay as they
    are; embeddings and norms are not linear layers and stay too. dtype: the gradient and state
    dtype of the int8 layers (default bf16 for float32 layers). A layer whose input features
    group_size does not divide raises, or with fit_groups takes the largest divisor of them up to
    group_size (at least 16). On the meta device only the structure changes (materialize it with
    memopt_core.app.models.materialize)."""
    if bits != 8:
        raise ValueError(f"only 8-bit weights are implemented, got bits={bits}")
    skip = tuple(skip)
    counts = {}
    for m in model.modules():
        for p in m.parameters(recurse=False):
            counts[p] = counts.get(p, 0) + 1
    targets = [(name, m) for name, m in model.named_modules()
               if isinstance(m, nn.Linear) and not any(s in name for s in skip)
               and counts.get(m.weight, 0) == 1]
    groups = {}
    for name, m in targets:
        fits = [g for g in range(min(group_size, m.in_features), 15, -1) if m.in_features % g == 0]
        if m.in_features % group_size and not (fit_groups and fits):
            raise ValueError(f"{name}: {m.in_features} input features are not a multiple of "
                             f"group_size={group_size}; choose another group_size, skip it or "
                             f"pass fit_groups=True")
        groups[name] = group_size if m.in_features % group_size == 0 else fits[0]
    done = []
    for name, m in targets:
        parent, _, leaf = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        setattr(owner, leaf, Int8Linear.from_linear(m, groups[name], dtype))
        done.append(name)
    return done


def weight_args(params: list) -> tuple:
    """(tensors, weight_scales) for an op call over `params`: each carrier replaced by its
    codes, and [] for scales unless some parameter is int8 (then one per parameter, an empty
    tensor for a float one): the ops' `params` and `weight_scales` arguments."""
    layers = [int8_layer(p) for p in params]
    if not any(layers):
        return params, None
    empty = torch.empty(0, device=params[0].device)
    tensors = [q.weight_codes if q is not None else p for p, q in zip(params, layers)]
    return tensors, [q.weight_scales if q is not None else empty for q in layers]

