"""Adam-mini on the fused memopt core. What it decides (blocks, weight decay, state) is
memopt::BlockPlan's (cpp/include/memopt/block_plan.h); this module reads the roles and applies it."""
from __future__ import annotations

from collections import namedtuple

import torch

from . import _C
from ._base import MemoptOptimizer
from .int8_weights import weight_args
from .state_bits import check_state_bits, state_scale_args
from .distributed import ShardedCall, local
from .roles import infer_roles, model_dims
from .sources import need_names, resolve


# What the plan decided for one tensor (_C.BlockPlan.blocks), kept in plain Python so that a
# compiled step reads it without calling C++: role, segments (offset, rows, cols, row_stride,
# tile_rows, tile_cols), number of blocks, weight decay, why the paper's blocks were not used,
# SlimAdam's v_shape (the reference's keepdim v), dims and rule, and the op's flat block list.
Blocks = namedtuple("Blocks", "name role segments count decay note v_shape dims rule encoded")


def adopt(opt, src, roles, weight_decay: float, algorithm: str, **options) -> list:
    """Builds the BlockPlan of src.named (roles: infer_roles', or None) and adopts it for `opt`,
    with `opt.blocks` {param: Blocks}; returns src's groups for torch, each split by the plan's
    decay: the decaying tensors with the group's weight_decay, the others with 0."""
    named = src.named
    plan = _C.BlockPlan([(n, list(p.shape), roles[n].info if roles else None,
                          roles[n].note if roles else "") for n, p in named], algorithm, **options)
    opt._adopt_plan(plan, [p for _, p in named])
    opt.blocks = {p: Blocks(n, *plan.blocks(i)) for i, (n, p) in enumerate(named)}
    return [{**g, "params": [p for _, p in part], "param_names": [n for n, _ in part],
             "weight_decay": g.get("weight_decay", weight_decay) if decay else 0.0}
            for g in src.groups for decay in (True, False)
            if (part := [(n, p) for n, p in g["params"] if opt.blocks[p].decay == decay])]


class AdamMini(MemoptOptimizer):
    r"""Adam-mini (Zhang et al., arXiv 2406.16793): Adam with one second moment per Hessian block
    (per head for Q/K, per output neuron for V, attention output and MLP, per token for the
    embedding and output, per norm tensor; ``partition="reference"``: PyPI adam-mini 1.1.1's).
    State: m plus ~0.02% of the parameters for v, 0.5x AdamW (state_bits=8: m as 8-bit block
    codes, about 1.02 bytes/param; 16: bfloat16). Norms, biases and 1-D tensors do not decay. Roles, ``dim``/``n_heads``/``roles=`` overrides: README, "Use".

    Example::

        opt = memopt_core.AdamMini(model, lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1)
        print(opt.describe())
    """

    _device_skip = True  # memopt::adam_mini_ takes found_inf (nonfinite.py)

    def __init__(self, named_params_or_model, lr=1e-3, betas=(0.9, 0.999), eps=1e-8,
                 weight_decay=0.0, *, dim=None, n_heads=None, n_kv_heads=None,
                 partition="auto", roles=None, model=None, nonfinite="propagate",
                 stochastic_rounding=False, rounding_seed=0, state_bits=32):
        src = resolve(named_params_or_model, model)
        self.state_bits = check_state_bits(self, state_bits)
        need_names(src, type(self).__name__, "its blocks (attention heads, embedding rows, "
                   "norms) and which tensors decay")
        auto, reference = partition == "auto", partition == "reference"  # else: the plan says
        found = model_dims(src.model) if reference and src.model is not None else {}
        groups = adopt(self, src, infer_roles(src.named, src.model, dim=dim, n_heads=n_heads,
                                              n_kv_heads=n_kv_heads, roles=roles) if auto else None,
                       weight_decay, "adam_mini", partition=partition, role_overrides=bool(roles),
                       dim=dim or found.get("dim") or 0, n_heads=n_heads or found.get("n_heads") or 0,
                       state_bits=self.state_bits)
        super().__init__(groups, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay),
                         nonfinite, stochastic_rounding, rounding_seed)

    def _describe_row(self, p):
        return self.blocks[p].role, self.blocks[p].count

    def _op_call(self, group, params, grads, states):
        return torch.ops.memopt.adam_mini_, adam_mini_args(
            self, group, params, grads, states, [v for p in params for v in self.blocks[p].encoded],
            self._rounding(group, params))

    # ---- DTensor (FSDP2) parameters ----------------------------------------------------------
    def _sharded_call(self, group, params, grads, states, **found_inf):
        return block_sharded_call(self, group, params, grads, states,
                                  [v for p in params for v in self.blocks[p].encoded], **found_inf)


def adam_mini_args(opt, group, params, grads, states, blocks, rounding) -> tuple:
    """torch.ops.memopt.adam_mini_'s arguments for `params` of `group` with their blocks
    (`blocks`, encoded) and `rounding` (the ops' last int list): AdamMini's and SlimAdam's step,
    and the per-token embedding mode of APOLLO and FRUGAL."""
    beta1, beta2 = group["betas"]
    stored, scales = weight_args(params)
    return (stored, grads, [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states],
            [s["step"] for s in states], blocks, opt._lr(group), float(beta1), float(beta2),
            float(group["eps"]), float(group["weight_decay"]), rounding, scales,
            state_scale_args(states, ("exp_avg",)))


def block_sharded_call(opt, group, params, grads, states, blocks, **found_inf) -> ShardedCall:
    """The Adam-mini step of DTensor `params` whose blocks (`blocks`, encoded) may be cut by
    shard boundaries: each shard's sums of g^2 per block of the full tensor (this rank's
    partials, reduced by the caller), then v of every block and the update of the local
    elements from the totals (cpp/src/adam_mini_shard.cpp), which a set `found_inf` (the
    step's reduced flag) makes skip. Also APOLLO's and FRUGAL's per-token mode."""
    layouts = [opt._shard_layout(p) for p in params]
    shards = [v for p, lay in zip(params, layouts) for v in (lay.flat_lo, p.numel())]
    # one sum per block: as many as v has entries (replicated, full on every rank)
    sums = torch.zeros(sum(s["exp_avg_sq"].numel() for s in states), dtype=torch.float64,
                       device=local(params[0]).device)
    beta1, beta2 = group["betas"]
    grads = [local(g) for g in grads]
    scales = state_scale_args(states, ("exp_avg",))
    args = ([local(p) for p in params], grads, [local(s["exp_avg"]) for s in states],
            [local(s["exp_avg_sq"]) for s in states], [s["step"] for s in states], blocks,
            shards, sums, opt._lr(group), float(beta1), float(beta2), float(group["eps"]),
            float(group["weight_decay"]), opt._rounding(group, params),
            None if scales is None else [local(t) for t in scales])
    torch.ops.memopt.check_adam_mini_shard_update_(*args, **found_inf)
    torch.ops.memopt.adam_mini_block_sums_(grads, blocks, shards, sums)
    return ShardedCall(lambda: torch.ops.memopt.adam_mini_shard_update_(*args, **found_inf), sums,
                       layouts[0].group)

