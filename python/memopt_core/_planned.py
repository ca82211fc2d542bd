"""What state each parameter of a memopt optimizer keeps, and the check of a checkpoint against it.

An optimizer whose decisions live in a C++ plan (memopt::OptimizerPlan: _C.BlockPlan for AdamW,
Adam-mini and SlimAdam) adopts it with `_adopt_plan(plan, params)`; every hook here then answers
from the plan's StateSpecs, so the optimizer writes none of them:

    _state_shapes(p)          {key: shape} of p's state but step
    _state_dtype(p, key)      its dtype (the parameter's unless the plan says float32, int64, ...)
    _state_follows_param      elementwise with p: takes p's memory layout
    _state_sharded            split like a DTensor parameter, or replicated
    _state_fill(p, key)       its initial value
    _check_loadable           a checkpoint's keys, shapes and dtypes (plan.check_saved)

and planned_state_bytes (reporting.py) follows from them. An optimizer without a plan overrides
`_state_shapes` (and the others where their defaults do not fit); its checkpoint check compares
shapes only."""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from . import _C
from .state_bits import check_sharded_codes


class PlannedState:
    """Mixin of MemoptOptimizer (it reads self.plan, self.param_groups and _shard_layout)."""

    plan = None             # the plan adopted last (FRUGAL's is not an OptimizerPlan yet)
    _plan_state: dict = {}  # p -> {key: _Planned}, from _adopt_plan; empty: no OptimizerPlan
    _plan_of: dict = {}     # p -> (its plan, its index there)

    def _adopt_plan(self, plan, params: list) -> None:
        """Adopt `plan`, a _C.OptimizerPlan (_C.BlockPlan, ...) whose tensor i is params[i]: the
        state hooks below, planned_state_bytes and the checkpoint check then answer for them
        from plan.state(i) and plan.check_saved, so the optimizer overrides none of them.
        Parameters adopted earlier keep their plan (a group added later brings its own). The
        layouts are read here, once, because the hooks also run inside a compiled step, which
        cannot trace a call into C++; a plan whose layouts change is adopted again. A dtype
        other than the parameter's own is resolved for the parameter's dtype now. Raises,
        adopting nothing, for 8-bit state that the parameters' shards would cut."""
        check_sharded_codes(self, params, [plan.state(i) for i in range(len(params))])
        self.plan = plan
        if "_plan_state" not in self.__dict__:  # the class's empty dicts are everyone's
            self._plan_state, self._plan_of = {}, {}
        for i, p in enumerate(params):
            self._plan_of[p] = (plan, i)
            self._plan_state[p] = {
                key: _Planned(tuple(shape), None if dtype == _C.StateDType.Param
                              else _C.state_dtype(dtype, p), follows, tuple(along), fill,
                              _C.state_on_host(dtype, list(shape)))
                for key, shape, dtype, follows, along, fill in plan.state(i)}

    def _planned(self, p: torch.Tensor) -> Optional[dict]:
        """p's planned state {key: _Planned}; None without a plan. A parameter the plan does not
        know (a group added after construction) cannot be stepped: its decisions were never made."""
        if not self._plan_state:  # (not the plan itself: a compiled step cannot look at it)
            return None
        if p not in self._plan_state:
            raise ValueError(f"{type(self).__name__}: a parameter of shape {tuple(p.shape)} was not "
                             "given to the constructor, so nothing was decided for it (construct "
                             "the optimizer with it)")
        return self._plan_state[p]

    def _state_shapes(self, p: torch.Tensor) -> dict:
        """{key: shape} of p's state tensors but 'step' (in the plan's key order)."""
        planned = self._planned(p)
        if planned is None:
            raise NotImplementedError(f"{type(self).__name__} has neither a plan nor _state_shapes")
        return {key: s.shape for key, s in planned.items()}

    def _state_dtype(self, p: torch.Tensor, key: str) -> torch.dtype:
        """dtype of state `key` of `p`: the plan's; without one, the parameter's."""
        planned = self._planned(p)
        return (planned[key].dtype or p.dtype) if planned else p.dtype

    def _state_device(self, p: torch.Tensor, key: str) -> torch.device:
        """Where state `key` of `p` lives: the plan's state_on_host (seeds) on the CPU, the rest
        with the parameter (a DTensor's: its local shard's)."""
        planned = self._planned(p)
        return torch.device("cpu") if planned and planned[key].on_host else p.device

    def _state_follows_param(self, p: torch.Tensor, key: str) -> bool:
        """Whether state `key` is elementwise with `p` (then, shaped like a dense `p`, it takes
        p's layout). Without a plan: True (APOLLO's projected moments override it)."""
        planned = self._planned(p)
        return planned[key].follows_param if planned else True

    def _state_sharded(self, p, key: str, shape: tuple) -> bool:
        """Whether state `key` of a DTensor parameter is split like the parameter (the plan: if
        the parameter's shard dim is one it is sharded along) or replicated (small statistics,
        which every rank updates alike). Without a plan: full-size state is split."""
        planned = self._planned(p)
        if planned:
            return self._shard_layout(p).dim in planned[key].sharded_along
        return tuple(shape) == tuple(p.shape)

    def _state_fill(self, p: torch.Tensor, key: str) -> float:
        """Initial value of state `key` (a seed, "no norm yet"); 0 without a plan."""
        planned = self._planned(p)
        return planned[key].fill if planned else 0.0

    def _check_loadable(self, state_dict: dict) -> None:
        """Raises (changing nothing) unless `state_dict` has this optimizer's groups and, for
        each parameter with saved state, the state it keeps: with a plan, plan.check_saved
        (every key, shape and dtype); without, the shapes of `_state_shapes`."""
        saved_groups = state_dict.get("param_groups")
        if not isinstance(saved_groups, list) or len(saved_groups) != len(self.param_groups):
            raise ValueError(
                f"loaded state_dict has {len(saved_groups or [])} parameter groups, this "
                f"optimizer has {len(self.param_groups)}"
            )
        for mine, saved in zip(self.param_groups, saved_groups):
            if len(mine["params"]) != len(saved["params"]):
                raise ValueError("loaded state_dict has a group of a different size")
            names = mine.get("param_names") or [f"parameter {pid}" for pid in saved["params"]]
            for p, pid, name in zip(mine["params"], saved["params"], names):
                entry = state_dict["state"].get(pid)
                if entry is None:
                    continue
                if self._planned(p) is not None:
                    plan, i = self._plan_of[p]
                    where = f"{type(self).__name__}: the loaded state of {name} {tuple(p.shape)}"
                    plan.check_saved(i, [(k, _as_saved(k, v)) for k, v in entry.items()], p, where)
                    continue
                expected = dict(self._state_shapes(p), step=())
                for key, shape in expected.items():
                    value = entry.get(key)
                    got = tuple(value.shape) if isinstance(value, torch.Tensor) else None
                    if got != tuple(shape) and not (key == "step" and value is not None and got in ((), (1,), None)):
                        raise ValueError(
                            f"cannot load state '{key}' of shape {got} for a parameter of shape "
                            f"{tuple(p.shape)}: {type(self).__name__} expects {tuple(shape)}"
                        )


class _Planned(NamedTuple):
    """One state tensor as the plan lays it out (memopt::StateSpec); dtype None: the param's."""
    shape: tuple
    dtype: Optional[torch.dtype]
    follows_param: bool
    sharded_along: tuple
    fill: float
    on_host: bool  # on the CPU whatever the parameter's device (seeds: memopt::state_on_host)


def _as_saved(key: str, value):
    """A checkpoint's value as plan.check_saved reads it: a meta tensor of its shape and dtype
    (nothing copied, a DTensor by its global shape), None for anything else. `step` is taken in
    every form torch's optimizers have saved it: a number, or a 0-dim or (1,) tensor of any dtype."""
    if key == "step" and (isinstance(value, (int, float)) or isinstance(value, torch.Tensor)
                          and tuple(value.shape) in ((), (1,))):
        return torch.zeros((), dtype=torch.float32, device="meta")
    if isinstance(value, torch.Tensor):
        return torch.empty(value.shape, dtype=value.dtype, device="meta")
    return None
