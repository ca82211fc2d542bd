"""`memopt plan`: the memory a training run needs, before buying the GPU.

The model is built on the meta device (shapes only, no memory), the optimizer is constructed on
it and reports its own state through `planned_state_bytes()` (the same accounting as
`state_bytes()` after a step, not a formula), and weights/gradients are summed from the real
parameter list. Activations are an estimate, documented at `activation_bytes`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from .memory import distinct_bytes, weight_bytes
from .models import build, num_params, to_weight_format
from .train_config import DTYPES, WEIGHT_FORMATS, rounding_kwargs
from ..registry import make_optimizer

GB = 1e9  # decimal, as the papers report (Adam-mini: 53.92 GB for Llama-2-7B AdamW state)


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


def activation_bytes(cfg, batch_size: int, seq_len: int, elem: int,
                     checkpointed: bool = False) -> int:
    """Estimate of the activations autograd keeps for one micro-batch of this repo's Llama,
    with a fused attention kernel (no seq^2 score matrix; what SDPA runs on GPUs and CPUs).
    Per token and layer (h hidden, k kv width, i intermediate, e bytes per element of the
    compute dtype; RMSNorm works in fp32): attention e*(5h + 3k) + 8h, MLP e*(2h + 4i) + 8h;
    plus the final norm and the logits with their fp32 loss copies, (e + 8)*(h + V). With
    activation checkpointing (models.run_layers) each layer keeps only its input, e*h, and one
    layer's activations exist again while it is recomputed in backward."""
    h, i, v = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    k = cfg.num_key_value_heads * (h // cfg.num_attention_heads)
    per_layer = elem * (7 * h + 3 * k + 4 * i) + 16 * h
    layers = (cfg.num_hidden_layers * elem * h + per_layer if checkpointed
              else cfg.num_hidden_layers * per_layer)
    return batch_size * seq_len * (layers + (elem + 8) * (h + v))


def plan(model: str, optimizer: str, *, dtype: str = "fp32", layerwise: bool = False,
         batch_size: int = 1, seq_len: int = 2048, checkpoint_activations: bool = False,
         compute_dtype: Optional[str] = None, label: Optional[str] = None,
         **opt_kwargs) -> Plan:
    """The memory of a run; compute_dtype (None: the weights' storage dtype, bf16 for int8)
    sizes the activations. int8 weights count their codes and group scales. label: the row's
    name (default: optimizer), e.g. with its settings (opt_kwargs, the constructor's)."""
    if dtype not in WEIGHT_FORMATS:
        raise ValueError(f"dtype must be one of {sorted(WEIGHT_FORMATS)}, got {dtype!r}")
    if compute_dtype is not None and compute_dtype not in DTYPES:
        raise ValueError(f"compute_dtype must be one of {sorted(DTYPES)}, got {compute_dtype!r}")
    compute = DTYPES[compute_dtype] if compute_dtype else WEIGHT_FORMATS[dtype]
    net = to_weight_format(build(model, device="meta"), dtype)
    # as `memopt train` makes it: low-precision weights with stochastic rounding (no state)
    opt = make_optimizer(optimizer, net, lr=1e-3, **{**rounding_kwargs("stochastic", dtype),
                                                     **opt_kwargs})
    if layerwise and not opt.steps_single_params:
        raise ValueError(f"{optimizer} cannot be stepped layer-wise")
    params = list(net.parameters())
    weights = weight_bytes(params)
    # Layer-wise stepping frees each gradient as soon as it is used: at most one exists at a
    # time (the largest bounds it); otherwise every gradient exists before step().
    grads = max(distinct_bytes([p]) for p in params) if layerwise else distinct_bytes(params)
    return Plan(model, label or optimizer, dtype, layerwise, num_params(net), weights, grads,
                int(opt.planned_state_bytes()),
                activation_bytes(net.config, batch_size, seq_len, compute.itemsize,
                                 checkpoint_activations))


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
