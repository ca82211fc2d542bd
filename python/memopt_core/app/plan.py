"""`memopt plan`: the memory a training run needs, before buying the GPU.

The model is built on the meta device (shapes only, no memory), the optimizer is constructed on
it and reports its own state through `planned_state_bytes()` (the same accounting as
`state_bytes()` after a step, not a formula), and weights/gradients are summed from the real
parameter list. Activations are an estimate, documented at `activation_bytes`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .memory import distinct_bytes
from .models import build, num_params
from ..registry import make_optimizer

GB = 1e9  # decimal, as the papers report (Adam-mini: 53.92 GB for Llama-2-7B AdamW state)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass
class Plan:
    model: str
    optimizer: str
    dtype: str
    layerwise: bool
    params: int
    weights: int
    grads: int
    state: int
    activations: int

    @property
    def total(self) -> int:
        return self.weights + self.grads + self.state + self.activations


def activation_bytes(cfg, batch_size: int, seq_len: int, elem: int) -> int:
    """Estimate of the activations autograd keeps for one micro-batch of this repo's Llama,
    with a fused attention kernel (no seq^2 score matrix; what SDPA runs on GPUs and CPUs) and
    no activation checkpointing. Per token and layer (h hidden, k kv width, i intermediate,
    e bytes per element; RMSNorm works in fp32): attention e*(5h + 3k) + 8h, MLP e*(2h + 4i)
    + 8h; plus the final norm and the logits with their fp32 loss copies, (e + 8)*(h + V)."""
    h, i, v = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    k = cfg.num_key_value_heads * (h // cfg.num_attention_heads)
    per_layer = elem * (7 * h + 3 * k + 4 * i) + 16 * h
    tokens = batch_size * seq_len
    return tokens * (cfg.num_hidden_layers * per_layer + (elem + 8) * (h + v))


def plan(model: str, optimizer: str, *, dtype: str = "fp32", layerwise: bool = False,
         batch_size: int = 1, seq_len: int = 2048, **opt_kwargs) -> Plan:
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    net = build(model, device="meta").to(DTYPES[dtype])
    opt = make_optimizer(optimizer, net, lr=1e-3, **opt_kwargs)
    if layerwise and not opt.steps_single_params:
        raise ValueError(f"{optimizer} cannot be stepped layer-wise")
    params = list(net.parameters())
    weights = distinct_bytes(params)
    # Layer-wise stepping frees each gradient as soon as it is used: at most one exists at a
    # time (the largest bounds it); otherwise every gradient exists before step().
    grads = max(distinct_bytes([p]) for p in params) if layerwise else weights
    return Plan(model, optimizer, dtype, layerwise, num_params(net), weights, grads,
                int(opt.planned_state_bytes()),
                activation_bytes(net.config, batch_size, seq_len, DTYPES[dtype].itemsize))


def _count(n: int) -> str:
    """A parameter count as the papers write it: 6.74B, 60.3M, 120.5K."""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g}{unit}" if n < 100 * scale else f"{n / scale:.0f}{unit}"
    return str(n)


def format_plans(plans: list[Plan], baseline: Plan) -> str:
    """Markdown table, one row per plan, with the state and total against `baseline`."""
    rows = ["| model | optimizer | dtype | layer-wise | weights GB | grads GB | state GB "
            "| state vs AdamW | activations GB | total GB |",
            "|---|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for p in [baseline] + plans:
        rows.append(f"| {p.model} ({_count(p.params)}) | {p.optimizer} | {p.dtype} | "
                    f"{'yes' if p.layerwise else 'no'} | {p.weights / GB:.2f} | "
                    f"{p.grads / GB:.2f} | {p.state / GB:.2f} | "
                    f"{p.state / baseline.state:.3f} | {p.activations / GB:.2f} | "
                    f"{p.total / GB:.2f} |")
    return "\n".join(rows)
