"""Shared front end: every memopt optimizer is a torch.optim.Optimizer whose step() makes one
call per (param group, device) into a fused C++ op. Validation of tensors and hyperparameters
lives once, in the C++ ops; this layer only keeps torch's bookkeeping (groups, state, closures,
state_dict) and guarantees that a rejected step leaves parameters and state untouched."""
from __future__ import annotations

from collections import defaultdict
from typing import Callable, Optional

import torch

from . import _C
from .distributed import (ShardedCall, as_dtensor, is_dtensor, local, local_args, local_shape,
                          local_value, reduce_stats, shard_layout)
from ._planned import PlannedState
from .nonfinite import count_device_skip, device_found_inf, saved_skipped_steps, skips_step
from .reporting import Reporting
from .rounding import StochasticRounding

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Change every group's learning rate in place. With tensor learning rates (pass
    lr=torch.tensor(...)) a compiled step() reads the new value without recompiling; a float lr
    is a constant of the compiled graph, so changing it recompiles."""
    for group in optimizer.param_groups:
        if isinstance(group["lr"], torch.Tensor):
            group["lr"].fill_(lr)
        else:
            group["lr"] = lr


def validator(op):
    """The validator of a memopt op: torch.ops.<namespace>.check_<name>, registered beside the op
    from the same schema (cpp/src/define_op.h); same arguments, writes nothing, raises for
    anything the op would reject."""
    namespace, name = op._qualified_op_name.split("::")
    return getattr(getattr(torch.ops, namespace), "check_" + name)


def _in_param_layout(state: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """State shaped like a dense non-contiguous parameter (channels_last, transposed) takes its
    strides, so the ops step both in one memory order without staging (cpp/include/memopt/
    layout.h decides, _C.state_strides); anything else stays as allocated (contiguous)."""
    if state.shape != p.shape or p.is_contiguous():
        return state
    return state.as_strided(state.shape, _C.state_strides(list(state.shape), p))


class MemoptOptimizer(Reporting, PlannedState, StochasticRounding, torch.optim.Optimizer):
    """Base class. Subclasses define `_op_call(group, params, grads, states)` -> (op, args): the
    fused torch op and its arguments, which its validator (`validator(op)`) checks before any op
    of the step runs; and either adopt a C++ plan (`_adopt_plan`), which then lays out every state tensor and
    checks checkpoints, or define `_state_shapes(p)` (name -> shape of each state tensor but
    'step') and, where the defaults do not fit, the other `_state_*` hooks (_planned.py)."""

    # Capabilities. An optimizer whose step makes a decision across all tensors at once (FRUGAL's
    # subspace selection) cannot step one parameter at a time (layer-wise stepping), and its
    # host-side selection logic is not traceable by torch.compile.
    steps_single_params = True
    compilable = True
    # torch.amp.GradScaler hands this optimizer `grad_scale` and `found_inf` (attributes set for
    # the duration of step()) instead of unscaling and checking the gradients itself, as it does
    # for torch's fused optimizers; see nonfinite.py.
    _step_supports_amp_scaling = True
    # Every op of its steps takes found_inf (memopt::adamw_, adam_mini_, apollo_, frugal_), so
    # on a GPU a step's skip is decided on the device, without a host synchronisation
    # (nonfinite.py), on the steps _decides_on_device allows.
    _device_skip = False

    def __init__(self, params, defaults: dict, nonfinite: str = "propagate",
                 stochastic_rounding: bool = False, rounding_seed: int = 0):
        """nonfinite: "propagate" (torch's behaviour: an inf/NaN gradient reaches the parameter)
        or "skip" (a step with any non-finite gradient changes nothing; counted in
        `skipped_steps`). stochastic_rounding: bf16 parameters are rounded stochastically from
        the fp32 update (unbiased; bits drawn from rounding_seed, the parameter and its step),
        instead of to nearest; group options, saved with the groups. README, "Low-precision
        weights"."""
        self.nonfinite = nonfinite
        self.skipped_steps = 0
        super().__init__(params, dict(defaults, stochastic_rounding=stochastic_rounding,
                                      rounding_seed=rounding_seed))

    @property
    def skipped_steps(self) -> int:
        """Steps (step_params calls, layer-wise) left out for a non-finite gradient. Skips decided
        on a GPU are counted there; reading this waits for them."""
        device = self.__dict__.get("_device_skips")
        return self.__dict__.get("_host_skips", 0) + (0 if device is None else int(device.item()))

    @skipped_steps.setter
    def skipped_steps(self, value: int) -> None:
        self._host_skips = value
        self.__dict__.pop("_device_skips", None)

    @property
    def nonfinite(self) -> str:
        return self.__dict__.get("_nonfinite", "propagate")  # (pickles from before it existed)

    @nonfinite.setter
    def nonfinite(self, value: str) -> None:
        self._skips_nonfinite = _C.skips_nonfinite(value)  # ValueError unless propagate / skip
        self._nonfinite = value

    def add_param_group(self, param_group: dict) -> None:
        """torch's add_param_group (also used by __init__), then the checks a group must pass:
        floating parameters and valid hyperparameters (the C++ validator's rules)."""
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        for p in group["params"]:
            if p.dtype not in _FLOAT_DTYPES:
                del self.param_groups[-1]
                raise TypeError(
                    f"{type(self).__name__} can only optimize float32, bfloat16, float16 or "
                    f"float64 parameters, got a {p.dtype} parameter of shape {tuple(p.shape)}")
        try:
            self._check_hparams(group)
            self._check_rounding(group)
        except Exception:
            del self.param_groups[-1]
            raise

    def _check_hparams(self, group: dict) -> None:
        """Raises for an invalid hyperparameter of `group`: the Adam family's (the C++ rule);
        an optimizer with other hyperparameters overrides it."""
        beta1, beta2 = group["betas"]
        _C.check_adam_hparams(float(group["lr"]), float(beta1), float(beta2),
                              float(group["eps"]), float(group["weight_decay"]))

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._step_params(None)
        return loss

    @torch.no_grad()
    def init_state(self, pooled: bool = True) -> None:
        """Create (zeroed) state for every parameter now instead of at its first step. Before
        compiling step(), call init_state(pooled=False): the compiled step then finds the state
        it will keep (no recompilation), and separate tensors, unlike views of one pool, can be
        updated in place by the compiled graph (pooled views make it copy the whole pool)."""
        if not self.compilable:
            raise TypeError(f"{type(self).__name__} creates its state in step(); it cannot be "
                            "created ahead or compiled")
        self._pool_state = pooled
        self._init_states([p for g in self.param_groups for p in g["params"]
                           if p.requires_grad and p not in self.state])

    @torch.no_grad()
    def step_params(self, params) -> None:
        """Step only `params` (each with its group's options), as step() would: the primitive
        of layer-wise stepping (memopt_core.LayerwiseStep), which steps each parameter inside
        backward as soon as its gradient is accumulated."""
        self._step_params({id(p) for p in params})

    def _device_batches(self, only: Optional[set] = None) -> list:
        """[(group, its parameters with a gradient on one device)]: one op call each. DTensor
        parameters are batched apart from plain ones, and by the process group their
        statistics reduce over. `only`: ids of the parameters to step (all when None)."""
        batches = []
        for group in self.param_groups:
            by_device = {}
            for p in group["params"]:
                if p.grad is not None and (only is None or id(p) in only):
                    key = (p.device, self._shard_layout(p).group) if is_dtensor(p) else (p.device,)
                    by_device.setdefault(key, []).append(p)
            batches += [(group, params) for params in by_device.values()]
        return batches

    # The dims a DTensor parameter may be sharded along (FSDP2's Shard(d)): rows everywhere;
    # columns too where the optimizer's ops handle them (shard_placement_fn layouts).
    _shard_dims = (0,)

    @classmethod
    def fsdp_placement(cls, mesh=None, **options):
        """The `shard_placement_fn` to give fully_shard for this optimizer with `options` (the
        ones its constructor takes), or None for FSDP2's default (rows). mesh: fully_shard's
        DeviceMesh or the shard group's size (None: the default group's)."""
        return None

    def _shard_layout(self, p):
        """p's ShardLayout (DTensor parameters only), computed once."""
        layouts = self.__dict__.setdefault("_layouts", {})
        if p not in layouts:
            layouts[p] = shard_layout(p, self._shard_dims, type(self).__name__)
        return layouts[p]

    def _skips_step(self, batches: list) -> bool:
        """Whether this step must change nothing (nonfinite.py); it has unscaled the gradients
        of `batches` by GradScaler's grad_scale if one was set, and counted a skip."""
        return skips_step(self, batches)

    def _step_params(self, only: Optional[set]) -> None:
        batches = self._device_batches(only)
        found = device_found_inf(self, batches)  # {device: flag}: the ops decide; else the host
        if found is None:
            self._steps_home([p for _, params in batches for p in params if p in self.state])
            if self._skips_step(batches):
                return
        if torch.compiler.is_compiling():
            return self._traced_step(batches)
        calls, fresh = [], []
        try:
            # Validate every (group, device) call before running any, so that a bad input
            # anywhere leaves all parameters and state as they were.
            for group, params in batches:
                new = [p for p in params if p not in self.state]
                self._init_states(new)
                fresh += new
                grads, states = [p.grad for p in params], [self.state[p] for p in params]
                kw = {}
                if found is not None:  # the ops advance the step counters beside the params
                    self._steps_beside(params)
                    kw["found_inf"] = found[local(params[0].grad).device]
                if is_dtensor(params[0]):
                    calls.append(self._sharded_call(group, params, grads, states, **kw))
                    continue
                op, args = self._op_call(group, params, grads, states)
                validator(op)(*args, **kw)
                calls.append(ShardedCall(lambda op=op, args=args, kw=kw: op(*args, **kw)))
        except Exception:
            for p in fresh:
                del self.state[p]
            raise
        self.reduced_bytes = reduce_stats(calls)
        for call in calls:
            call.finish()
        if found is not None:
            count_device_skip(self, found)
            for p in (p for _, params in batches for p in params if p in self._beside):
                self._beside[p][1] += 1

    def _decides_on_device(self, batches: list) -> bool:
        """Whether the skip of the step of `batches` may be decided on the device (nonfinite.py),
        for an optimizer with _device_skip: always, unless a subclass's ops must see that
        decision on the host (APOLLO's projection refresh, FRUGAL's selection)."""
        return True

    def _steps_beside(self, params) -> None:
        """Moves the step counters of `params` to their parameters' devices (a DTensor's: its
        local shard's; the counters stay plain tensors), where ops given found_inf advance them
        (a counter stays there, as torch's fused optimizers keep theirs, until a step decided on
        the host or a checkpoint's load brings it back). From here until then the host knows a
        count only within a range: `_beside[p]` = [its count now, steps decided on the device
        since], which _step_range reports."""
        beside = self.__dict__.setdefault("_beside", {})
        for p in params:
            state = self.state[p]
            if p not in beside:
                beside[p] = [int(state["step"]), 0]  # (a CPU counter, read for free)
            if state["step"].device != local(p).device:
                state["step"] = state["step"].to(local(p).device)

    def _steps_home(self, params) -> None:
        """Brings step counters of `params` kept on a device back to the CPU, for a step decided
        on the host: one read per device (a synchronisation, which that decision made already),
        so that the ops read them there and _step_range is exact again."""
        beside, away = self.__dict__.get("_beside"), defaultdict(list)
        if not beside:  # no counter has left the CPU (every step decided on the host)
            return
        for p in params:
            beside.pop(p, None)
            if self.state[p]["step"].device.type != "cpu":
                away[self.state[p]["step"].device].append(p)
        for ps in away.values():
            counts = torch.stack([self.state[p]["step"] for p in ps]).cpu()
            for p, count in zip(ps, counts):
                self.state[p]["step"] = count.clone()

    def _step_range(self, p):
        """(lo, hi): the bounds of p's step count the host knows without reading a device:
        exact for a counter the host has stepped; since _steps_beside, its count then plus up to
        one per step decided on the device (each taken or skipped)."""
        lo, calls = self.__dict__.get("_beside", {}).get(p, (None, 0))
        if lo is None:
            lo = int(self.state[p]["step"])  # a CPU counter
        return lo, lo + calls

    def _sharded_call(self, group, params, grads, states, **found_inf) -> ShardedCall:
        """The step of a batch of DTensor parameters (grads and states DTensors too), validated
        and ready to run; `found_inf` (an optimizer with _device_skip only): the step's reduced
        flag, for the ops. This default suits elementwise updates: the op on the local shards.
        Optimizers with statistics that span shards override it (partials, then finish)."""
        op, args = self._op_call(group, params, grads, states)
        args = local_args(args)
        validator(op)(*args, **found_inf)
        return ShardedCall(lambda: op(*args, **found_inf))

    def _traced_step(self, batches: list) -> None:
        """step() under torch.compile: the same op calls with nothing Dynamo cannot trace. The
        C++ validator is skipped because the op's Meta kernel runs the same checks while
        tracing; new state is made of plain tensors (the pool allocator is not traceable)."""
        for group, params in batches:
            if is_dtensor(params[0]):
                raise TypeError("step() of an optimizer over DTensor (FSDP2) parameters cannot "
                                "be compiled: its partial statistics and all-reduce run eagerly. "
                                "Compile the model and call opt.step() outside the compiled code")
            new = [p for p in params if p not in self.state]
            if new:
                pooled, self._pool_state = getattr(self, "_pool_state", True), False
                self._init_states(new)
                self._pool_state = pooled
            op, args = self._op_call(group, params, [p.grad for p in params],
                                        [self.state[p] for p in params])
            op(*args)

    @staticmethod
    def _lr(group: dict) -> torch.Tensor:
        lr = group["lr"]
        return lr if isinstance(lr, torch.Tensor) else torch.tensor(float(lr), dtype=torch.float64)

    # ---- state: one flat pool per (dtype, device) ----------------------------------------
    def _init_states(self, params: list) -> None:
        """Zeroed state for `params`, every tensor a view of one flat allocation per dtype and
        device (the steps of one float32 CPU pool), so state memory is exact and unfragmented."""
        self._pack_states(params, {})

    def _pack_states(self, params: list, values: dict) -> None:
        if not params:
            return
        wanted = defaultdict(list)  # (pool key, dtype, device) -> [(param, key, shape)]
        for p in params:
            for key, shape in self._state_shapes(p).items():
                wanted[(self._pool_key(p), self._state_dtype(p, key),
                        self._state_device(p, key))].append(
                    (p, key, shape))
        allocated = self._allocate(params, wanted, values)
        for p in params:  # each parameter's keys in the plan's order, the same on every rank
            for key in (*self._state_shapes(p), "step"):
                self.state[p][key] = allocated[(p, key)]

    def _allocate(self, params: list, wanted: dict, values: dict) -> dict:
        """{(param, key): tensor} for wanted[(pool key, dtype, device)] = [(param, key, shape)],
        plus the "step" of each of `params` (a float32 CPU pool per pool key): one flat pool per entry
        (or one tensor each after init_state(pooled=False)), values[(param, key)] copied in, the
        rest zero."""
        wanted = defaultdict(list, {k: list(v) for k, v in wanted.items()})
        for p in params:
            wanted[(self._pool_key(p), torch.float32, torch.device("cpu"))].append((p, "step", ()))
        out = {}
        for (_, dtype, device), items in wanted.items():
            shapes = [self._local_state_shape(p, key, shape) for p, key, shape in items]
            if getattr(self, "_pool_state", True):
                like = torch.empty(0, dtype=dtype, device=device)
                views = _C.pool_views([list(shape) for shape in shapes], like)
            else:  # init_state(pooled=False): one tensor each, for torch.compile
                views = [torch.zeros(shape, dtype=dtype, device=device) for shape in shapes]
            for (p, key, shape), view in zip(items, views):
                layout = self._shard_layout(p) if key != "step" and len(shape) else None
                if layout is None and key != "step" and self._state_follows_param(p, key):
                    view = _in_param_layout(view, p)
                sharded = layout is not None and self._state_sharded(p, key, shape)
                if (p, key) in values:
                    value = values[(p, key)]
                    if (isinstance(value, torch.Tensor) and not is_dtensor(value) and key != "step"
                            and tuple(value.shape) != tuple(shape)):  # plan.h: flat scales
                        value = value.reshape(shape)
                    view.copy_(local_value(value, layout, sharded) if layout else local(value))
                elif key != "step" and self._state_fill(p, key):
                    view.fill_(self._state_fill(p, key))
                out[(p, key)] = as_dtensor(view, layout, tuple(shape), sharded) if layout else view
        return out

    def _local_state_shape(self, p, key: str, shape: tuple) -> tuple:
        """This rank's shape of state `key` of global `shape`. Scalars and step counters stay
        plain tensors (as torch's own optimizers keep `step`); other state of a DTensor
        parameter is a DTensor, sharded like it or replicated (see _state_sharded)."""
        layout = self._shard_layout(p) if key != "step" and len(shape) else None
        if layout is None:
            return tuple(shape)
        return local_shape(layout, tuple(shape), self._state_sharded(p, key, shape))

    def _pool_key(self, p: torch.Tensor):
        """Capability hook: state of parameters with different keys lives in different pools.
        An optimizer that rebuilds part of its state (FRUGAL's re-selected subspace) keeps that
        part apart so the old pool is freed whole. The contract tests expect one pool per key."""
        return None

    def _holds_state(self, p: torch.Tensor) -> bool:
        """Capability hook: whether `p` holds optimizer state once it has had a gradient. False
        for tensors updated without any state (FRUGAL's inactive blocks); the contract tests
        expect state exactly for the tensors where this is True."""
        return True

    # ---- state_dict -------------------------------------------------------------------
    def state_dict(self) -> dict:
        """torch's, with `skipped_steps` in every param group (where torch.distributed.checkpoint
        keeps it too)."""
        sd = super().state_dict()
        for g in sd["param_groups"]:
            g["skipped_steps"] = self.skipped_steps
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        """torch's load, preceded by a check that the saved state is the state this optimizer
        keeps (_check_loadable: a mismatched checkpoint raises and changes nothing), and followed
        by repacking the loaded state into flat pools."""
        self._check_loadable(state_dict)
        skipped = saved_skipped_steps(state_dict)
        self.__dict__.pop("_beside", None)  # the loaded counters are exact (on the CPU)
        super().load_state_dict(state_dict)
        self.skipped_steps = skipped
        for g in self.param_groups:
            g.pop("skipped_steps", None)
        params = [p for g in self.param_groups for p in g["params"] if p in self.state]
        values = {(p, k): v for p in params for k, v in self.state[p].items()}
        for p in params:
            self.state[p] = {}
        self._pack_states(params, values)
