"""APOLLO and APOLLO-Mini on the fused memopt core."""
from __future__ import annotations

from typing import Optional

import torch

from . import _C
from ._base import MemoptOptimizer
from .int8_weights import weight_args
from .state_bits import check_sharded_codes, check_state_bits, state_scale_args
from .distributed import ShardedCall, apollo_shard_placement, local_args
from .apollo_groups import apollo_groups
from .adam_mini import adam_mini_args, block_sharded_call
from .sources import resolve

_LEGACY_ADAMW_RULE = _C.ApolloPlan.legacy_adamw_rule  # of a group saved before the option


class Apollo(MemoptOptimizer):
    r"""APOLLO (Zhu et al., arXiv 2412.05270), matching PyPI ``apollo-torch`` 1.0.3's APOLLOAdamW
    given the same groups: Adam moments of a rank-r random projection R = P G of each attention
    and MLP weight scale the raw gradient per channel (or per tensor), with a norm-growth
    limiter; embeddings, norms, the output layer and biases get AdamW (``adamw_rule``). One fused
    op per group; nothing gradient-sized is allocated. Every option: README, "APOLLO and
    APOLLO-Mini"; FSDP2: README, "Distributed training".

    Example::

        opt = memopt_core.Apollo(model, lr=1e-2, rank=256, update_proj_gap=200)
        print(opt.describe())
    """

    _device_skip = True  # memopt::apollo_ takes found_inf, away from refreshes (nonfinite.py)

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0, *,
                 rank=None, proj="random", proj_type="std", scale_type="channel",
                 update_proj_gap=200, scale=1.0, norm_growth_limit: Optional[float] = 1.01,
                 scale_front=False, store_projection=True, adamw_rule="apollo", roles=None,
                 model=None, nonfinite="propagate", stochastic_rounding=False, rounding_seed=0,
                 state_bits=32, embeddings="adamw"):
        groups = apollo_groups(resolve(params, model), rank, roles, self, embeddings)
        # before super().__init__, which calls add_param_group: every decision is the plan's
        # (cpp/src/apollo_plan.cpp); _index: each parameter's position in it
        self.plan, self._index = _C.ApolloPlan(), {}
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, proj=proj,
                        proj_type=proj_type, scale_type=scale_type,
                        update_proj_gap=update_proj_gap, scale=scale,
                        norm_growth_limit=norm_growth_limit, scale_front=scale_front,
                        store_projection=store_projection, adamw_rule=adamw_rule,
                        state_bits=check_state_bits(self, state_bits), embeddings=embeddings)
        super().__init__(groups, defaults, nonfinite, stochastic_rounding, rounding_seed)

    @staticmethod
    def default_rank(model) -> int:
        """APOLLO's pre-training scripts: rank d/4 up to 256 (60M 128, 130M 192, 350M-7B 256);
        256 when the model does not give its hidden size (model.config.hidden_size)."""
        d = getattr(getattr(model, "config", None), "hidden_size", None)
        return max(1, min(256, int(d) // 4)) if d else 256

    def add_param_group(self, param_group: dict) -> None:
        """torch's add_param_group, then the group's tensors added to the plan (which checks
        its settings and raises, leaving the optimizer as it was, on a bad one)."""
        super().add_param_group(param_group)
        group, start = self.param_groups[-1], len(self.plan)
        try:
            check_state_bits(self, group["state_bits"])
            probe = _C.ApolloPlan()  # the group's layouts, before the plan takes it
            self._plan_group(probe, group)
            check_sharded_codes(self, group["params"],
                                [probe.state(i) for i in range(len(group["params"]))])
            self._plan_group(self.plan, group)
        except Exception:
            del self.param_groups[-1]
            raise
        for k, p in enumerate(group["params"]):
            self._index.setdefault(p, start + k)
        self._adopt(self.plan)

    def _plan_group(self, plan, group: dict) -> None:
        rank = group.get("rank")  # None: the group takes AdamW
        plan.add_group([list(p.shape) for p in group["params"]],
                       None if rank is None else int(rank), group["proj"], group["proj_type"],
                       group["scale_type"], int(group["update_proj_gap"]),
                       float(group["scale"]), _gamma(group), bool(group["scale_front"]),
                       bool(group["store_projection"]), group["adamw_rule"],
                       [] if rank is None else [self._split(p) for p in group["params"]],
                       int(group.get("state_bits", 32)),
                       group.get("embeddings", "adamw") if rank is None else "adamw")

    # ---- state: as the plan lays it out (_planned.py), seeds and limiter norms its fills -------
    def _adopt(self, plan) -> None:
        """Adopt `plan` for every parameter (in its order, self._index), with the per-row
        blocks of the tensors under embeddings='adam_mini' (read now: a compiled step cannot
        call the plan)."""
        self._adopt_plan(plan, sorted(self._index, key=self._index.get))
        per_row = {p for g in self.param_groups if g.get("rank") is None
                   and g.get("embeddings", "adamw") == "adam_mini" for p in g["params"]}
        self._row_blocks = {p: plan.row_blocks(i) for p, i in self._index.items()
                            if p in per_row and i < len(plan)}

    def __setstate__(self, state: dict) -> None:
        """torch's load_state_dict and unpickling end here: a group saved before adamw_rule
        existed gets "torch", the rule it was stepped with (as torch's optimizers default
        options added later to their old behaviour)."""
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("adamw_rule", _LEGACY_ADAMW_RULE)

    def load_state_dict(self, state_dict: dict) -> None:
        """The base load under a plan of the loaded groups' settings (torch takes them from the
        checkpoint); then the state not kept in the parameter's dtype (seeds, limiter norms)
        put back exactly: torch casts it to the parameter dtype, which would round a seed."""
        plan, old, exact = _C.ApolloPlan(), self.plan, {}
        for mine, saved in zip(self.param_groups, state_dict.get("param_groups", [])):
            self._plan_group(plan, {**self.defaults, "adamw_rule": _LEGACY_ADAMW_RULE, **saved,
                                    "params": mine["params"]})
            for p, pid in zip(mine["params"], saved.get("params", [])):
                entry = state_dict.get("state", {}).get(pid, {})
                exact.update({(p, key): entry[key] for key, _, code, *_ in
                              plan.state(self._index[p]) if code != _C.StateDType.Param
                              and isinstance(entry.get(key), torch.Tensor)})
        self._adopt(plan)
        try:
            super().load_state_dict(state_dict)
        except Exception:
            self._adopt(old)
            raise
        for (p, key), value in exact.items():
            if key in self.state.get(p, {}):
                self.state[p][key].copy_(value.reshape(self.state[p][key].shape))

    # ---- the op ---------------------------------------------------------------------------
    def _op_call(self, group, params, grads, states):
        # the group's settings, read as plain dicts so that torch.compile traces this
        beta1, beta2 = group["betas"]
        hp = (self._lr(group), float(beta1), float(beta2), float(group["eps"]),
              float(group["weight_decay"]))
        m, v = [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states]
        steps = [s["step"] for s in states]
        rounding = self._rounding(group, params)
        stored, scales = weight_args(params)
        if group.get("rank") is None and group.get("embeddings", "adamw") == "adam_mini":
            # the low-memory embedding mode: Adam-mini's per-token v on these tensors
            return torch.ops.memopt.adam_mini_, adam_mini_args(
                self, group, params, grads, states,
                [b for p in params for b in self._row_blocks[p]], rounding)
        if group.get("rank") is None:
            return torch.ops.memopt.adamw_, (stored, grads, m, v, steps, *hp, group["adamw_rule"],
                                             rounding, scales,
                                             state_scale_args(states, ("exp_avg", "exp_avg_sq")))
        projs = [s["proj"] for s in states] if group["store_projection"] else []
        seeds = [s["seed"] for s in states] if group["proj"] == "random" else []
        args = (stored, grads, m, v, projs, seeds, [s["limiter_norm"] for s in states], steps,
                *hp, int(group["rank"]), group["proj"], group["proj_type"], group["scale_type"],
                int(group["update_proj_gap"]), float(group["scale"]), _gamma(group),
                bool(group["scale_front"]), rounding, scales)
        return torch.ops.memopt.apollo_, args

    def _decides_on_device(self, batches: list) -> bool:
        """apollo_ given found_inf refreshes no projection (its counters are not read), so a
        step decides its skip on the device only when no projected tensor can be due for a
        refresh: each step count the host may not know exactly (_step_range) holds no multiple
        of update_proj_gap. So about one step per gap is decided on the host (the first
        included), which reads the counters back. (store_projection=False draws P from the
        seeds every step: they live on the CPU, memopt::state_on_host, so that reads nothing.)"""
        for group, params in batches:
            if group.get("rank") is None:
                continue  # AdamW or Adam-mini's ops
            gap = int(group["update_proj_gap"])
            for p in params:
                if p not in self.state:
                    return False
                if _C.Projector.refresh_maybe_due(*self._step_range(p), gap):
                    return False
        return True

    # ---- DTensor (FSDP2) parameters --------------------------------------------------------
    _shard_dims = (0, 1)  # column shards of Left weights: see distributed.apollo_shard_placement

    @classmethod
    def fsdp_placement(cls, mesh=None, **options):
        """Left weights by columns (distributed.apollo_shard_placement): only norms cross
        ranks and each rank holds its share of the moments."""
        return apollo_shard_placement(mesh, options.get("proj_type", "std"))

    def _split(self, p) -> bool:
        """Whether p is a DTensor split over more than one rank."""
        layout = self._shard_layout(p)  # None for a plain tensor
        return layout is not None and layout.group is not None

    def _sharded_call(self, group, params, grads, states, **found_inf) -> ShardedCall:
        """Sharded projected weights: apollo_shard_stats_ writes this rank's partial
        statistics now, the base sums them over the shard group (one all-reduce), and
        apollo_shard_update_ finishes. Unsplit DTensors and AdamW groups take the base path."""
        if group.get("rank") is None and group.get("embeddings", "adamw") == "adam_mini":
            return block_sharded_call(self, group, params, grads, states,
                                      [b for p in params for b in self._row_blocks[p]],
                                      **found_inf)
        if group.get("rank") is None or not self._split(params[0]):
            return super()._sharded_call(group, params, grads, states, **found_inf)
        layouts = [self._shard_layout(p) for p in params]
        _, args = self._op_call(group, params, grads, states)
        args = local_args(args)
        rank, proj, proj_type, scale_type = args[13:17]
        numel = sum(_C.apollo_shard_stats_numel(list(lay.global_shape), rank, proj, proj_type,
                                                scale_type, args[19], lay.dim) for lay in layouts)
        # on the parameters' device: NCCL reduces GPU buffers, the CUDA ops read them there
        stats = torch.zeros(numel, dtype=torch.float64, device=args[0][0].device)
        full = (*args[:8], [lay.offset for lay in layouts],
                [lay.global_shape[lay.dim] for lay in layouts], [lay.dim for lay in layouts],
                stats, *args[8:-1])  # (the shard ops take no weight_scales)
        # (refuses proj="svd" too, should a group switch to it)
        torch.ops.memopt.check_apollo_shard_update_(*full, **found_inf)
        torch.ops.memopt.apollo_shard_stats_(*full, **found_inf)  # writes nothing but stats
        return ShardedCall(finish=lambda: torch.ops.memopt.apollo_shard_update_(*full, **found_inf),
                           stats=stats, group=layouts[0].group)

    # ---- reporting ------------------------------------------------------------------------
    def _describe_row(self, p):
        i = self._index[p]
        if p in getattr(self, "_row_blocks", {}):
            return "adam_mini", "per row"
        if not self.plan.projected(i):
            return "adamw", "elementwise"
        side = self.plan.side(i)[0].upper()
        return f"apollo-{side}{self.plan.rank(i)}", self.plan.scale_factors(i)

    def scratch_bytes(self) -> int:
        """Workspace the largest projected tensor's update carves (its R tile, P in fp32 where
        needed, per-channel sums): r-sized, reused across tensors and steps."""
        return max((self.plan.workspace_bytes(self._index[p], p.dtype)
                    for g in self.param_groups for p in g["params"]), default=0)


class ApolloMini(Apollo):
    r"""APOLLO-Mini (arXiv 2412.05270 §3.3): :class:`Apollo` with rank 1, one tensor-wise factor
    and scale 128; 2 n + m state values per m x n weight (m <= n) instead of AdamW's 2 m n.

    Example::

        opt = memopt_core.ApolloMini(model, lr=1e-2)
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0, *,
                 rank=None, proj="random", proj_type="std", scale_type="tensor",
                 update_proj_gap=200, scale=128.0, norm_growth_limit: Optional[float] = 1.01,
                 scale_front=False, store_projection=True, adamw_rule="apollo", roles=None,
                 model=None, nonfinite="propagate", stochastic_rounding=False, rounding_seed=0,
                 state_bits=32, embeddings="adamw"):
        # the full signature: `memopt compare` reads the settings an optimizer takes from it
        super().__init__(params, lr, betas, eps, weight_decay, rank=rank, proj=proj,
                         proj_type=proj_type, scale_type=scale_type,
                         update_proj_gap=update_proj_gap, scale=scale,
                         norm_growth_limit=norm_growth_limit, scale_front=scale_front,
                         store_projection=store_projection, adamw_rule=adamw_rule, roles=roles,
                         model=model, nonfinite=nonfinite,
                         stochastic_rounding=stochastic_rounding, rounding_seed=rounding_seed,
                         state_bits=state_bits, embeddings=embeddings)

    @staticmethod
    def default_rank(model) -> int:
        return 1  # the paper's APOLLO-Mini


def _gamma(group) -> float:
    gamma = group["norm_growth_limit"]
    return 0.0 if gamma is None else float(gamma)
