"""AdamW on the fused memopt core."""
from __future__ import annotations

import torch
from torch import nn

from . import _C
from ._base import MemoptOptimizer
from .int8_weights import weight_args
from .state_bits import check_state_bits, state_scale_args


class AdamW(MemoptOptimizer):
    r"""AdamW (Loshchilov & Hutter, arXiv 1711.05101) with torch.optim.AdamW's arguments, defaults
    and update, computed in fp32 whatever the storage dtype (fp64 for float64 parameters), one
    fused pass per tensor and one op call per group. State: m and v, 8 bytes/param in fp32: the
    baseline the other optimizers are measured against; state_bits=16 keeps them in bfloat16 (4
    bytes/param), state_bits=8 as 8-bit block codes (2.03 bytes/param; CPU and CUDA). README,
    "Use" and "8-bit states".

    Example::

        opt = memopt_core.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1)  # or AdamW(model)
    """

    _shard_dims = (0, 1)  # elementwise: any FSDP2 shard
    _device_skip = True  # memopt::adamw_ takes found_inf (nonfinite.py)

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, *,
                 model=None, nonfinite="propagate", stochastic_rounding=False, rounding_seed=0,
                 state_bits=32):
        # A model, or groups with model= (memopt_core.sources), as every other memopt optimizer
        # takes them; AdamW needs no names, so the model only stands in for its parameters.
        if isinstance(params, nn.Module):
            params = params.parameters()
        if model is not None and not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        self.state_bits = check_state_bits(self, state_bits)
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay),
                         nonfinite, stochastic_rounding, rounding_seed)

    def add_param_group(self, param_group: dict) -> None:
        """torch's (and the base's checks), then the group's plan (m, v shaped like each tensor;
        every tensor decays, as in torch): groups may be added after construction."""
        super().add_param_group(param_group)
        params = self.param_groups[-1]["params"]
        try:
            self._adopt_plan(_C.BlockPlan([("", list(p.shape), None, "") for p in params], "adamw",
                                          state_bits=getattr(self, "state_bits", 32)), params)
        except Exception:
            del self.param_groups[-1]
            raise

    def _op_call(self, group, params, grads, states):
        beta1, beta2 = group["betas"]
        stored, scales = weight_args(params)
        args = (stored, grads, [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states],
                [s["step"] for s in states], self._lr(group), float(beta1), float(beta2),
                float(group["eps"]), float(group["weight_decay"]), "torch",
                self._rounding(group, params), scales,
                state_scale_args(states, ("exp_avg", "exp_avg_sq")))
        return torch.ops.memopt.adamw_, args
