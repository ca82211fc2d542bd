"""Adam-mini on the fused memopt core."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import _C
from ._base import MemoptOptimizer
from .distributed import ShardedCall, local
from .roles import infer_roles, model_dims, role_has
from .sources import need_names, resolve

# adam-mini 1.1.1's defaults, used by partition="reference" when no model config says otherwise.
_REFERENCE_DIM, _REFERENCE_HEADS = 2048, 32


@dataclass(frozen=True)
class Blocks:
    """How one tensor is partitioned: its role, the C++ segments, and any fallback note."""
    name: str
    role: str
    segments: tuple
    decay: bool
    note: str = ""

    @property
    def encoded(self) -> list:
        """The op's flat block list for this tensor (memopt::encode_block_specs' layout):
        [number of segments, then 6 ints per segment]. Plain Python, so torch.compile traces it."""
        return [len(self.segments)] + [int(v) for seg in self.segments for v in seg]

    @property
    def count(self) -> int:
        return sum((s[1] // s[4]) * (s[2] // s[5]) for s in self.segments)


class AdamMini(MemoptOptimizer):
    r"""Adam-mini (Zhang et al., arXiv 2406.16793): Adam with one second-moment value per
    Hessian block instead of one per parameter.

    Update for block b (computed in fp32, one fused pass per tensor)::

        t += 1;  v_b = b2*v_b + (1-b2)*mean_{i in b}(g_i^2)
        p *= 1 - lr*wd;  m = b1*m + (1-b1)*g
        p -= lr/(1-b1^t) * m / (sqrt(v_b)/sqrt(1-b2^t) + eps)

    Blocks (paper §3, ``partition="auto"``): one per head for Q and K, one per output neuron for
    V, attention output, MLP and other linear/conv weights, one per token for embedding and
    output, one per norm tensor, plain Adam for biases. Roles come from the module tree and the
    model config (dim/heads read from ``model.config``) or, for bare named parameters, from
    names; ``roles={"regex or glob": "role"}`` overrides. ``partition="reference"`` reproduces
    PyPI ``adam-mini`` 1.1.1's name-substring partition exactly (per-head blocks of
    ``dim*dim/n_heads`` elements).

    State: m in the parameter dtype plus ~0.02% of parameters for v: about 4 bytes/param in
    fp32, 0.5x AdamW. Norms, biases and 1-D tensors get no weight decay.

    When not to use it: models whose blocks the partition cannot see (check ``describe()``),
    or short runs where AdamW memory is not the constraint. Hyperparameters: AdamW's.

    Example::

        opt = memopt_core.AdamMini(model, lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1)
        print(opt.describe())
    """

    def __init__(self, named_params_or_model, lr=1e-3, betas=(0.9, 0.999), eps=1e-8,
                 weight_decay=0.0, *, dim=None, n_heads=None, n_kv_heads=None,
                 partition="auto", roles=None, model=None, nonfinite="propagate"):
        src = resolve(named_params_or_model, model)
        need_names(src, type(self).__name__, "its blocks (attention heads, embedding rows, "
                   "norms) and which tensors decay")
        model, groups, named = src.model, src.groups, src.named
        self.blocks = _partition(named, model, partition, roles, dim, n_heads, n_kv_heads)
        torch_groups = []
        for g in groups:
            opts = {k: v for k, v in g.items() if k != "params"}
            decay = [(n, p) for n, p in g["params"] if self.blocks[p].decay]
            keep = [(n, p) for n, p in g["params"] if not self.blocks[p].decay]
            for members, wd in ((decay, opts.get("weight_decay", weight_decay)), (keep, 0.0)):
                if members:
                    torch_groups.append({**opts, "params": [p for _, p in members],
                                         "param_names": [n for n, _ in members], "weight_decay": wd})
        super().__init__(torch_groups, dict(lr=lr, betas=tuple(betas), eps=eps,
                                            weight_decay=weight_decay), nonfinite)

    def _state_shapes(self, p):
        return {"exp_avg": tuple(p.shape), "exp_avg_sq": (self.blocks[p].count,)}

    def _describe_row(self, p):
        return self.blocks[p].role, self.blocks[p].count

    def _op_call(self, group, params, grads, states):
        blocks = [v for p in params for v in self.blocks[p].encoded]
        beta1, beta2 = group["betas"]
        args = (params, grads, [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states],
                [s["step"] for s in states], blocks, self._lr(group), float(beta1),
                float(beta2), float(group["eps"]), float(group["weight_decay"]))
        return torch.ops.memopt.adam_mini_, args

    # ---- DTensor (FSDP2) parameters ----------------------------------------------------------
    def _state_sharded(self, p, key, shape):
        return key == "exp_avg"  # v holds every block of the full tensor, the same on every rank

    def _sharded_call(self, group, params, grads, states):
        """Blocks cut by shard boundaries: each shard's sums of g^2 per block of the full tensor
        (this rank's partials, reduced by the caller), then v of every block and the update of
        the local elements from the totals (cpp/src/adam_mini_shard.cpp)."""
        blocks = [v for p in params for v in self.blocks[p].encoded]
        shards = [v for p in params for v in (self._shard_layout(p).flat_lo, p.numel())]
        sums = torch.zeros(sum(self.blocks[p].count for p in params), dtype=torch.float64,
                           device=local(params[0]).device)
        beta1, beta2 = group["betas"]
        grads = [local(g) for g in grads]
        args = ([local(p) for p in params], grads, [local(s["exp_avg"]) for s in states],
                [local(s["exp_avg_sq"]) for s in states], [s["step"] for s in states], blocks,
                shards, sums, self._lr(group), float(beta1), float(beta2), float(group["eps"]),
                float(group["weight_decay"]))
        torch.ops.memopt.check_adam_mini_shard_update_(*args)
        torch.ops.memopt.adam_mini_block_sums_(grads, blocks, shards, sums)
        return ShardedCall(lambda: torch.ops.memopt.adam_mini_shard_update_(*args), sums,
                           self._shard_layout(params[0]).group)


def _partition(named, model, partition, roles, dim, n_heads, n_kv_heads) -> dict:
    if partition == "auto":
        inferred = infer_roles(named, model, dim=dim, n_heads=n_heads, n_kv_heads=n_kv_heads, roles=roles)
        out = {}
        for name, p in named:
            r = inferred[name]
            segments, note = r.blocks(list(p.shape))
            note = r.note or note  # why the paper's blocks could not be used, if they could not
            decay = role_has(r.role, "decays") and p.dim() > 1
            out[p] = Blocks(name, r.role, tuple(segments), decay, note)
        return out
    if partition == "reference":
        if roles:
            raise ValueError("roles= overrides apply to partition='auto' only")
        found = model_dims(model) if model is not None else {}
        d = dim or found.get("dim") or _REFERENCE_DIM
        h = n_heads or found.get("n_heads") or _REFERENCE_HEADS
        out = {}
        for name, p in named:
            segments, role, decay = _C.adam_mini_reference_blocks(name, list(p.shape), d, h)
            out[p] = Blocks(name, role, tuple(segments), decay)  # adam-mini: decay by name
        return out
    raise ValueError(f"partition must be 'auto' or 'reference', got {partition!r}")
