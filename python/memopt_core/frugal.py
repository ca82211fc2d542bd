"""FRUGAL on the fused memopt core: AdamW state on a rho-subspace, signSGD on the rest. Every
decision (which tensors are projectable, their modes and state shapes, the selection state
machine, checkpoint validation) is memopt::FrugalPlan's (cpp/src/frugal_plan.cpp, _C.FrugalPlan),
shared with the LibTorch memopt::Frugal; this front end applies them to torch's state."""
from __future__ import annotations

import math
from collections import defaultdict
from typing import Callable, Optional

import torch

from . import _C
from ._base import MemoptOptimizer
from .nonfinite import count_device_skip, device_found_inf
from .state_bits import check_state_bits, state_scale_args
from .int8_weights import weight_args
from .adam_mini import adam_mini_args, block_sharded_call
from .distributed import ShardedCall, is_dtensor, local, local_args
from .frugal_shard import FrugalShard
from .frugal_state import FrugalCheckpoint, tensor_specs
from .sources import need_names, resolve

_M, _CHANGE = _C.FrugalMode, _C.FrugalStateChange  # the plan's codes
_NOT_COMPILABLE = (
    "Frugal.step() cannot be compiled: every update_gap steps it moves Adam state between "
    "tensors (inactive blocks hold none) or redraws subspaces on the host, which changes the "
    "step's graph. Compile the model's forward/backward and call opt.step() eagerly (outside "
    "the compiled function); the step is one fused op per param group either way.")
_MODE_NAMES = {_M.Adam: "adamw", _M.ActiveBlock: "active", _M.FreeBlock: "free",
               _M.Columns: "columns", _M.Rows: "rows", _M.RandK: "randk", _M.ProjRight: "proj-r",
               _M.ProjLeft: "proj-l"}


class Frugal(FrugalCheckpoint, FrugalShard, MemoptOptimizer):
    r"""FRUGAL (Zmushko et al., arXiv 2411.07837, Alg. 1): each attention/MLP gradient is split into
    a subspace part updated by AdamW (state only there) and the rest updated by signSGD (or SGD,
    or nothing), in one fused pass; embeddings, norms and the output layer take AdamW. The
    subspace (``selection``: whole tensors "block", "columns", "rows", "randk", or a "svd" /
    "random" / "randperm" projection of density ``density``) is re-chosen every ``update_gap``
    steps. Options, state, checkpoints and FSDP2: README, "Frugal".

    Example::

        opt = memopt_core.Frugal(model, lr=1e-3, density=0.25, update_gap=200)
        print(opt.describe())
    """

    # The block/subspace selection is one decision over all tensors per step, made on the host.
    steps_single_params = False
    compilable = False
    _device_skip = True  # memopt::frugal_ takes found_inf, on steady steps (_decides_on_device)

    def __init__(self, named_params_or_model, lr=1e-3, betas=(0.9, 0.999), eps=1e-8,
                 weight_decay=0.0, *, density=0.25, update_gap=200, selection="block",
                 block_order="descending", state_free="sign_sgd", state_free_lr_scale=1.0,
                 proj_params_lr_scale=1.0, reset_statistics=True, proj_embeds=False,
                 proj_norms=False, proj_logits=False, roles=None, seed=None, model=None,
                 nonfinite="propagate", stochastic_rounding=False, rounding_seed=0,
                 state_bits=32, embeddings="adamw"):
        src = resolve(named_params_or_model, model)
        need_names(src, type(self).__name__, "which tensors are projectable blocks (attention "
                   "and MLP weights, not embeddings, norms or the head)")
        named = [np for g in src.groups for np in g["params"]]  # optimizer order
        if not (isinstance(density, (int, float)) and isinstance(update_gap, int)):
            raise ValueError(f"density must be a number and update_gap an int, got "
                             f"{density!r} and {update_gap!r}")  # their values: the plan's
        self.plan = _C.FrugalPlan(  # validates every option (ValueError naming it)
            tensor_specs(named, src.named, src.model, roles), density=density,
            update_gap=update_gap, selection=selection, block_order=block_order,
            state_free="none" if state_free is None else state_free,
            reset_statistics=bool(reset_statistics), seed=None if seed is None else int(seed),
            proj_embeds=proj_embeds, proj_norms=proj_norms, proj_logits=proj_logits,
            state_bits=check_state_bits(self, state_bits), embeddings=embeddings)
        if embeddings == "adam_mini" and not any(self.plan.per_row_v(i) for i in range(len(named))):
            raise ValueError("Frugal(embeddings='adam_mini'): no embedding or output tensor that "
                             "takes AdamW was found (roles; proj_embeds / proj_logits project them)")
        self.embeddings = embeddings
        self.density, self.update_gap, self.selection = float(density), update_gap, selection
        self.block_order, self.state_free = block_order, state_free
        self.reset_statistics = bool(reset_statistics)
        torch_groups = [{**{k: v for k, v in g.items() if k != "params"},
                         "params": [p for _, p in g["params"]],
                         "param_names": [n for n, _ in g["params"]]} for g in src.groups]
        self._empty: dict = {}
        self._position = {p: i for i, (_, p) in enumerate(named)}  # p -> its index in the plan
        super().__init__(torch_groups, dict(
            lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
            proj_params_lr_scale=proj_params_lr_scale, state_free_lr_scale=state_free_lr_scale,
            frugal=None), nonfinite, stochastic_rounding, rounding_seed)
        # ("frugal": the key state_dict() fills, frugal_state)
        for g in self.param_groups:  # the op's own check, for the two FRUGAL scales
            torch.ops.memopt.check_frugal_([], [], [], [], [], [], [], torch.tensor(1.0), 0.9, 0.9, 0.0, 0.0,
                             float(g["proj_params_lr_scale"]), float(g["state_free_lr_scale"]), 0)
        # Projectable tensors in the plan's order; the index j is the block number.
        self._projs = [named[i][1] for i in self.plan.projectable]
        self._index = {p: j for j, p in enumerate(self._projs)}
        self._check_sharding()

    # ---- layout: which state each tensor holds ------------------------------------------------
    def _mode(self, p, sel=None) -> int:
        j = self._index.get(p)
        return _M.Adam if j is None else self.plan.mode(j, sel)

    def _layout(self, p, mode=None) -> Optional[dict]:
        """{key: (shape, dtype)} of p's state tensors but step under `mode` (now by default), or
        None if p holds no state: the plan's layout (memopt::FrugalPlan::layout)."""
        i = self._position[p]
        specs = self.plan.state(i) if mode is None else self.plan.layout(i, mode)
        return {key: (tuple(shape), p.dtype if dtype == _C.StateDType.Param
                      else _C.state_dtype(dtype, p)) for key, shape, dtype, *_ in specs} or None

    def add_param_group(self, param_group: dict) -> None:
        """torch's (and the base's checks); parameters of a group added after construction join
        the plan as plain AdamW tensors, outside the selection."""
        super().add_param_group(param_group)
        new = [p for p in self.param_groups[-1]["params"] if p not in self._position]
        if new:
            self.plan.add_adamw([list(p.shape) for p in new])
            self._position.update({p: len(self._position) + k for k, p in enumerate(new)})

    def _holds_state(self, p) -> bool:
        return self._layout(p) is not None

    def _holding(self) -> list:
        """The projectable tensors (j) holding state now."""
        return [j for j, p in enumerate(self._projs) if self.state.get(p)]

    def _pool_key(self, p):
        return "subspace" if p in self._index else "static"

    def _state_shapes(self, p):  # the moments (the base class checks loaded ones against these)
        return {k: s for k, (s, _) in (self._layout(p) or {}).items() if k != "subspace"}

    def _planned_bytes(self, p) -> int:
        lay = self._layout(p)
        if lay is None:
            return 0
        size = {k: torch.empty(0, dtype=dt).element_size() for k, (_, dt) in lay.items()}
        return sum(size[k] * math.prod(self._local_state_shape(p, k, s))
                   for k, (s, _) in lay.items()) + 4

    # ---- state: pools per (pool key, dtype, device) -------------------------------------------
    def _build_states(self, params: list, values: dict, modes=None) -> dict:
        """Fresh state dicts for `params` (those holding state under `modes`, the projectable
        tensors' modes; now by default): moments pooled per pool key, dtype and device, steps in
        a float32 CPU pool per key, subspace tensors as given in values[(p, 'subspace')]. Other
        values (p, key) are copied in; the rest start at zero."""
        layouts, wanted = {}, defaultdict(list)
        for p in params:
            mode = modes[self._index[p]] if modes is not None and p in self._index else None
            layouts[p] = self._layout(p, mode)
            for key, (shape, dtype) in layouts[p].items():
                if key != "subspace":
                    wanted[(self._pool_key(p), dtype, p.device)].append((p, key, shape))
        allocated = self._allocate(params, wanted, values)
        out = {}
        for p in params:  # each parameter's keys in the plan's order, the same on every rank
            out[p] = {key: self._subspace_value(p, values[(p, key)], dtype) if key == "subspace"
                      else allocated[(p, key)] for key, (_, dtype) in layouts[p].items()}
            out[p]["step"] = allocated[(p, "step")]
        return out

    def _new_states(self, decision, with_grad: set) -> dict:
        """The states `decision` asks for, without changing anything: {p: its new state dict, or
        None (p drops its state)}. The subspace pool is rebuilt whole when the plan says so
        (every kept tensor's values copied in), so that the previous pool is freed whole."""
        new, values, members = {}, {}, []
        for j, p in enumerate(self._projs):
            change = decision.changes[j] if decision.repack else _CHANGE.None_
            if change == _CHANGE.Drop:
                new[p] = None
            if change in (_CHANGE.Keep, _CHANGE.Carry):  # a carried subspace is replaced below
                values.update({(p, key): v for key, v in self.state[p].items()})
            if change in (_CHANGE.Keep, _CHANGE.Carry, _CHANGE.Start):
                members.append(p)
                if decision.subspaces[j] is not None:  # CPU; put on p's device (and mesh)
                    values[(p, "subspace")] = decision.subspaces[j]
        new.update(self._build_states(members, values, decision.modes))
        # (in optimizer order, not the set's: every rank must lay out and list state alike)
        fresh = [p for p in self._position
                 if p in with_grad and p not in self._index and not self.state.get(p)]
        new.update(self._build_states(fresh, {}))  # AdamW state from the first gradient
        return new

    # ---- step ----------------------------------------------------------------------------------
    def _placeholder(self, dtype, device):
        key = (dtype, device)
        if key not in self._empty:
            self._empty[key] = torch.empty(0, dtype=dtype, device=device)
        return self._empty[key]

    def _op_args(self, group, params, states, modes):
        """Arguments of torch.ops.memopt.frugal_ (and its validator) for one group/device,
        DTensors as their local shards."""
        def get(key, p, st, dtype):
            return st[key] if st is not None and key in st else self._placeholder(dtype, p.device)
        beta1, beta2 = group["betas"]
        stored, scales = weight_args(params)
        return local_args((stored, [p.grad for p in params],
                    [get("exp_avg", p, s, p.dtype) for p, s in zip(params, states)],
                    [get("exp_avg_sq", p, s, p.dtype) for p, s in zip(params, states)],
                    [get("step", p, s, torch.float32) for p, s in zip(params, states)],
                    [get("subspace", p, s, p.dtype) for p, s in zip(params, states)],
                    modes, self._lr(group), float(beta1), float(beta2), float(group["eps"]),
                    float(group["weight_decay"]), float(group["proj_params_lr_scale"]),
                    float(group["state_free_lr_scale"]), self.plan.rule,
                    # the counter: steps taken, which changes the bits of state-free blocks
                    self._rounding(group, params, self.plan.selection.t), scales,
                    state_scale_args([s or {} for s in states], ("exp_avg", "exp_avg_sq"))))

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None):
        if torch.compiler.is_compiling():
            raise TypeError(_NOT_COMPILABLE)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        calls = self._device_batches()
        if not calls:
            return loss
        found = device_found_inf(self, calls)  # {device: flag} on a steady GPU step, else None
        kw = {}
        if found is None:
            self._count_device_steps()
            self._steps_home([p for _, params in calls for p in params if p in self.state])
            if self._skips_step(calls):
                return loss
        else:
            self._steps_beside([p for _, params in calls for p in params if p in self.state])
        # 1. gradients and hyperparameters, before anything is selected or allocated
        for group, params in calls:
            self._check_grads(group, params)
        # 2. the plan's decision and the states it asks for, as candidates; 3. the full check
        with_grad = {p for _, params in calls for p in params}
        decision = self.plan.begin_step(
            [j for j, p in enumerate(self._projs) if p in with_grad], self._holding(),
            lambda j: self._projection_source(self._projs[j]))
        new = self._new_states(decision, with_grad)
        runs = []
        for group, params in calls:
            states = [new[p] if p in new else (self.state[p] if p in self.state else None)
                      for p in params]
            # the embedding mode's tensors: the Adam-mini op (per-token v), the rest frugal_
            rows = {id(p) for p in params if self.plan.per_row_v(self._position[p])}
            if found is not None:
                kw = {"found_inf": found[local(params[0].grad).device]}
            if rows:
                runs.append(self._per_row_call(group, *zip(*[
                    (p, st) for p, st in zip(params, states) if id(p) in rows]), **kw))
                params, states = [p for p in params if id(p) not in rows], \
                    [st for p, st in zip(params, states) if id(p) not in rows]
            if not params:
                continue
            modes = [decision.modes[self._index[p]] if p in self._index else _M.Adam for p in params]
            runs.append(self._prepared_call(params, self._op_args(group, params, states, modes),
                                            **kw))
        # 4. commit, then run; a step decided on the device (steady: nothing to commit but the
        # count, which _count_device_steps adds once the host reads how many were skipped)
        for p, st in new.items():
            if st is None:
                self.state.pop(p, None)
            else:
                self.state[p] = st
        if found is None:
            self.plan.commit(decision)
        self._run_prepared(runs)
        if found is not None:
            count_device_skip(self, found)
            flag = (next(iter(found.values())) > 0).long()
            self._pending = self.__dict__.get("_pending", 0) + 1
            self._pending_skips = flag + self.__dict__.get("_pending_skips", 0)
        return loss

    def _decides_on_device(self, batches: list) -> bool:
        """frugal_ given found_inf runs a step whose selection and state stay as they are, and
        the host cannot know afterwards whether it was taken: so a step decides on the device
        only when the plan's decision is steady for every step count the host does not know
        (plan.steady, from its count to that plus the steps decided on the device since), and
        every tensor that steps with state already holds it. The host decides the rest (about
        one step per update_gap, where a cycle may begin), and steps with stochastic rounding
        (its bits follow the count)."""
        params = [p for _, ps in batches for p in ps]
        if (any(g["stochastic_rounding"] for g, _ in batches)
                or any(p not in self.state for p in params if self._holds_state(p))):
            return False
        with_grad = set(params)
        return self.plan.steady([j for j, p in enumerate(self._projs) if p in with_grad],
                                self._holding(), self.__dict__.get("_pending", 0))

    def _count_device_steps(self) -> None:
        """Adds the steps decided on the device since the last call, less those skipped, to
        the plan's step count: one read of their skip count (a synchronisation), made where the
        host needs the count (a step it decides, state_dict, describe)."""
        pending = self.__dict__.pop("_pending", 0)
        skipped = self.__dict__.pop("_pending_skips", None)
        if pending:
            self.plan.advance(pending - int(skipped))

    def _per_row_call(self, group, params, states, **found_inf):
        """(None, ShardedCall) of the embedding mode's tensors of one batch: Adam-mini's op with
        one block per row (FRUGAL's Adam rule at the group's lr), validated now; over DTensor
        the sharded Adam-mini step (partial sums now, reduced by _run_prepared)."""
        params, states = list(params), list(states)
        blocks = [b for p in params for b in self.plan.row_blocks(self._position[p])]
        grads = [p.grad for p in params]
        if is_dtensor(params[0]):
            return None, block_sharded_call(self, group, params, grads, states, blocks,
                                            **found_inf)
        args = adam_mini_args(self, group, params, grads, states, blocks,
                              self._rounding(group, params, self.plan.selection.t))
        torch.ops.memopt.check_adam_mini_(*args, **found_inf)
        return None, ShardedCall(lambda: torch.ops.memopt.adam_mini_(*args, **found_inf))

    def _check_grads(self, group, params):
        """The op's check with every tensor state-free: gradients, dtypes, hyperparameters."""
        args = self._op_args(group, params, [None] * len(params), [_M.FreeBlock] * len(params))
        torch.ops.memopt.check_frugal_(*args)

    # ---- reporting -----------------------------------------------------------------------------
    def _describe_row(self, p):
        """(mode, number of coordinates with Adam state)."""
        lay = self._layout(p)
        mode = "adam_mini" if self.plan.per_row_v(self._position[p]) else _MODE_NAMES[self._mode(p)]
        return mode, math.prod(lay["exp_avg"][0]) if lay else 0

    def describe(self) -> str:
        self._count_device_steps()
        lines = super().describe().splitlines()
        sel, n = self.plan.selection, len(self._projs)
        if self.selection == "block":
            what = f"{len(sel.active)}/{n} projectable tensors active (block_order={self.block_order})"
        else:
            what = f"{self.selection} subspaces of density {self.density:g} on {n} projectable tensors"
        lines[-1] += (f"; FRUGAL: {what}, state-free rule {self.state_free}, "
                      f"next re-selection at step {(sel.t // self.update_gap + 1) * self.update_gap}")
        return "\n".join(lines)
