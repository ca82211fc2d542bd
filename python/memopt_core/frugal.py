"""FRUGAL on the fused memopt core: AdamW state on a rho-subspace, signSGD on the rest."""
from __future__ import annotations

import math
from collections import defaultdict
from typing import Callable, Optional

import torch

from . import _C
from ._base import MemoptOptimizer
from .distributed import local_args
from .frugal_shard import FrugalShard
from .frugal_state import FrugalCheckpoint, projectable
from .sources import need_names, resolve

SELECTIONS = ("block", "columns", "rows", "randk", "svd", "random", "randperm")
_PROJECTIONS = ("svd", "random", "randperm")
_RULES = {None: 0, "sgd": 1, "sign_sgd": 2}
_ADAM, _ACTIVE, _FREE, _COLUMNS, _ROWS, _RANDK, _RIGHT, _LEFT = range(8)
_NOT_COMPILABLE = (
    "Frugal.step() cannot be compiled: every update_gap steps it moves Adam state between "
    "tensors (inactive blocks hold none) or redraws subspaces on the host, which changes the "
    "step's graph. Compile the model's forward/backward and call opt.step() eagerly (outside "
    "the compiled function); the step is one fused op per param group either way.")
_MODE_NAMES = {_ADAM: "adamw", _ACTIVE: "active", _FREE: "free", _COLUMNS: "columns",
               _ROWS: "rows", _RANDK: "randk", _RIGHT: "proj-r", _LEFT: "proj-l"}


class Frugal(FrugalCheckpoint, FrugalShard, MemoptOptimizer):
    r"""FRUGAL (Zmushko et al., arXiv 2411.07837, Alg. 1): full-rank updates by gradient splitting.

    Each projectable gradient G (attention and MLP 2-D weights) is split into a state-full part
    G_s in a subspace, updated by AdamW with state only there, and the state-free rest
    G - G_s, updated by signSGD (or SGD, or not at all: GaLore-like), in one fused pass::

        p *= 1 - lr*wd                                  (every tensor, group lr)
        p -= lr*proj_params_lr_scale * AdamW(G_s)       (bias-corrected, torch's eps placement)
        p -= lr*proj_params_lr_scale*state_free_lr_scale * sign(G - G_s)

    Embeddings, norms and the output layer always take plain AdamW at ``lr`` (``proj_embeds``,
    ``proj_norms``, ``proj_logits`` make them projectable). The subspace is re-chosen every
    ``update_gap`` steps (counted in steps with at least one gradient):

    - ``selection="block"`` (paper's pre-training default): whole tensors, round(rho*N) of the N
      projectable ones active at a time, in ``block_order`` "descending" / "ascending" /
      "mirror" / "random". Inactive tensors hold no state at all; a block that stays active
      across a re-selection keeps its state (so density=1 equals AdamW), a newly active one
      starts from zero.
    - ``"columns"`` / ``"rows"`` / ``"randk"``: int(rho*n) random columns / rows / coordinates
      (state: rho of the tensor's moments plus int32 indices).
    - ``"svd"`` / ``"random"`` / ``"randperm"``: a rank round(rho*min side) GaLore-style
      projection (state: moments of the projected gradient plus the projection matrix).

    On a re-selection the Adam state of a changed subspace restarts from zero
    (``reset_statistics=True``, the paper's setting) or is carried over unprojected.

    State bytes vs AdamW (fp32, 8 bytes/param): non-projectable tensors 8, active blocks 8,
    inactive blocks 0; column/row/randk ~8*rho; so LLaMA pre-training with rho=0.25 keeps
    AdamW's state on embeddings/norms/head plus a quarter of the rest. ``density=0`` (the
    paper's 7B setting) is signSGD on every projectable tensor.

    When not to use it: fine-tuning with few steps between re-selections, or if the output
    layer/embeddings dominate the model (their AdamW state is kept in full). Random selections
    draw from the optimizer's own generator (``seed``), saved in the state_dict (under the key
    "frugal" of every param group, so torch.distributed.checkpoint keeps it).

    FSDP2 / DTensor parameters: "block", "columns", "svd", "random" and "randperm" step on each
    rank's row shard, equal to one process (every rank draws the same selection). Moments are
    sharded by rows except a left projection's (r, cols) moments, which are replicated: its
    g_low = P^T G contracts the sharded rows, so each rank's partial sum goes through one
    all-reduce per step and process group (small: r*cols values per left-projected tensor).
    "svd" all-gathers each split projectable gradient at every re-selection (every
    ``update_gap`` steps) to take the SVD of the full gradient, and warns once that it does.
    "rows" / "randk" raise at construction (see frugal_shard). A DCP checkpoint loads with
    ``opt.load_checkpoint(model, path)``, which adopts the saved selection before laying out
    the state it loads into (which blocks hold moments).

    Example::

        opt = memopt_core.Frugal(model, lr=1e-3, density=0.25, update_gap=200)
        print(opt.describe())
    """

    # The block/subspace selection is one decision over all tensors per step, made on the host.
    steps_single_params = False
    compilable = False
    _COLUMNS_MODE, _RIGHT_MODE, _LEFT_MODE = _COLUMNS, _RIGHT, _LEFT  # for frugal_shard

    def __init__(self, named_params_or_model, lr=1e-3, betas=(0.9, 0.999), eps=1e-8,
                 weight_decay=0.0, *, density=0.25, update_gap=200, selection="block",
                 block_order="descending", state_free="sign_sgd", state_free_lr_scale=1.0,
                 proj_params_lr_scale=1.0, reset_statistics=True, proj_embeds=False,
                 proj_norms=False, proj_logits=False, roles=None, seed=None, model=None,
                 nonfinite="propagate"):
        if not (isinstance(density, (int, float)) and 0.0 <= density <= 1.0):
            raise ValueError(f"density must be in [0, 1], got {density!r}")
        if not (isinstance(update_gap, int) and update_gap >= 1):
            raise ValueError(f"update_gap must be a positive int, got {update_gap!r}")
        if selection not in SELECTIONS:
            raise ValueError(f"selection must be one of {SELECTIONS}, got {selection!r}")
        if state_free not in _RULES:
            raise ValueError(f"state_free must be 'sign_sgd', 'sgd' or None, got {state_free!r}")
        self.density, self.update_gap, self.selection = float(density), update_gap, selection
        self.block_order, self.state_free = block_order, state_free
        self.reset_statistics = bool(reset_statistics)
        src = resolve(named_params_or_model, model)
        need_names(src, type(self).__name__, "which tensors are projectable blocks (attention "
                   "and MLP weights, not embeddings, norms or the head)")
        model, groups, named = src.model, src.groups, src.named
        proj = projectable(named, model, roles, proj_embeds, proj_norms, proj_logits)
        torch_groups = [{**{k: v for k, v in g.items() if k != "params"},
                         "params": [p for _, p in g["params"]],
                         "param_names": [n for n, _ in g["params"]]} for g in groups]
        self._empty: dict = {}
        super().__init__(torch_groups, dict(
            lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
            proj_params_lr_scale=proj_params_lr_scale, state_free_lr_scale=state_free_lr_scale,
            frugal=None), nonfinite)  # "frugal": the key state_dict() fills (frugal_state)
        for g in self.param_groups:  # the op's own check, for the two FRUGAL scales
            _C.check_frugal_([], [], [], [], [], [], [], torch.tensor(1.0), 0.9, 0.9, 0.0, 0.0,
                             float(g["proj_params_lr_scale"]), float(g["state_free_lr_scale"]), 0)
        # Projectable tensors in optimizer order; the index is the block number.
        self._projs = [p for g in self.param_groups for p in g["params"] if p in proj]
        self._index = {p: j for j, p in enumerate(self._projs)}
        self._sub = {p: self._subspace_shapes(p, proj[p]) for p in self._projs}
        self._check_sharding()
        if seed is None:  # from torch's global generator, so torch.manual_seed reproduces it
            seed = int(torch.randint(0, 2**62, (1,)).item())
        rng = torch.Generator().manual_seed(int(seed)).get_state()
        fr = dict(t=0, rng=rng, cursor=-1, active=[], block_cycle=0, cycle=[-1] * len(self._projs))
        self._k_blocks = _C.frugal_round(len(self._projs) * self.density)
        if selection == "block":  # chosen now, so describe() and planning know the active set
            fr["active"], fr["cursor"], fr["rng"] = _C.frugal_select_blocks(
                len(self._projs), self._k_blocks, block_order, -1, rng)
        self._fr = fr

    # ---- layout: which state each tensor holds ------------------------------------------------
    def _subspace_shapes(self, p, name):
        """(mode, moment shape, subspace shape, subspace dtype, k) for a non-block selection, or
        mode _FREE when its subspace is empty."""
        sel, d, shape = self.selection, self.density, tuple(p.shape)
        if sel == "block":
            return None
        if sel != "randk" and p.dim() != 2:
            raise ValueError(f"selection={sel!r} needs 2-D projectable tensors; {name} has shape "
                             f"{shape} (use selection='block' or 'randk')")
        if sel == "randk":
            k = int(p.numel() * d)
            return (_RANDK, (k,), (k,), torch.int32, k) if k else (_FREE,)
        rows, cols = shape
        if sel == "columns":
            k = int(cols * d)
            return (_COLUMNS, (rows, k), (k,), torch.int32, k) if k else (_FREE,)
        if sel == "rows":
            k = int(rows * d)
            return (_ROWS, (k, cols), (k,), torch.int32, k) if k else (_FREE,)
        right = rows >= cols  # GaLore's 'std' side: compress the smaller dimension
        r = _C.frugal_round((cols if right else rows) * d)
        if not r:
            return (_FREE,)
        if right:
            return (_RIGHT, (rows, r), (r, cols), p.dtype, r)
        return (_LEFT, (r, cols), (rows, r), p.dtype, r)

    def _mode(self, p, fr=None) -> int:
        fr = fr or self._fr
        j = self._index.get(p)
        if j is None:
            return _ADAM
        if self.selection == "block":
            return _ACTIVE if j in set(fr["active"]) else _FREE
        return self._sub[p][0]

    def _layout(self, p, fr=None) -> Optional[dict]:
        """{key: (shape, dtype)} of p's state tensors but step, or None if p holds no state."""
        mode = self._mode(p, fr)
        if mode == _FREE:
            return None
        if mode in (_ADAM, _ACTIVE):
            return {"exp_avg": (tuple(p.shape), p.dtype), "exp_avg_sq": (tuple(p.shape), p.dtype)}
        _, mshape, sshape, sdtype, _ = self._sub[p]
        return {"exp_avg": (mshape, p.dtype), "exp_avg_sq": (mshape, p.dtype),
                "subspace": (sshape, sdtype)}

    def _holds_state(self, p) -> bool:
        return self._layout(p) is not None

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
    def _build_states(self, params: list, values: dict, fr=None) -> dict:
        """Fresh state dicts for `params` (those holding state under `fr`): moments pooled per
        pool key, dtype and device, steps in a float32 CPU pool per key, subspace tensors as given
        in values[(p, 'subspace')]. Other values (p, key) are copied in; the rest start at zero."""
        out = {p: {} for p in params}
        wanted = defaultdict(list)
        for p in params:
            for key, (shape, dtype) in self._layout(p, fr).items():
                if key == "subspace":
                    out[p][key] = self._subspace_value(p, values[(p, key)], dtype)
                else:
                    wanted[(self._pool_key(p), dtype, p.device)].append((p, key, shape))
        for (p, key), tensor in self._allocate(params, wanted, values).items():
            out[p][key] = tensor
        return out

    # ---- step ----------------------------------------------------------------------------------
    def _placeholder(self, dtype, device):
        key = (dtype, device)
        if key not in self._empty:
            self._empty[key] = torch.empty(0, dtype=dtype, device=device)
        return self._empty[key]

    def _op_args(self, group, params, states, modes):
        """Arguments of torch.ops.memopt.frugal_ (and _C.check_frugal_) for one group/device,
        DTensors as their local shards."""
        def get(key, p, st, dtype):
            return st[key] if st is not None and key in st else self._placeholder(dtype, p.device)
        beta1, beta2 = group["betas"]
        return local_args((params, [p.grad for p in params],
                    [get("exp_avg", p, s, p.dtype) for p, s in zip(params, states)],
                    [get("exp_avg_sq", p, s, p.dtype) for p, s in zip(params, states)],
                    [get("step", p, s, torch.float32) for p, s in zip(params, states)],
                    [get("subspace", p, s, p.dtype) for p, s in zip(params, states)],
                    modes, self._lr(group), float(beta1), float(beta2), float(group["eps"]),
                    float(group["weight_decay"]), float(group["proj_params_lr_scale"]),
                    float(group["state_free_lr_scale"]), _RULES[self.state_free]))

    def _plan(self, with_grad: set):
        """The selection this step runs under, without changing anything: (fr, new_states) where
        new_states[p] is p's new state dict or None (p drops its state)."""
        fr = dict(self._fr, cycle=list(self._fr["cycle"]))
        cycle = fr["t"] // self.update_gap
        reselected = set()
        if self.selection == "block" and cycle != fr["block_cycle"]:
            fr["active"], fr["cursor"], fr["rng"] = _C.frugal_select_blocks(
                len(self._projs), self._k_blocks, self.block_order, fr["cursor"], fr["rng"])
            fr["block_cycle"] = cycle
        subspaces = {}
        if self.selection != "block":
            for j, p in enumerate(self._projs):
                if p not in with_grad or fr["cycle"][j] == cycle:
                    continue
                fr["cycle"][j] = cycle
                if self._sub[p][0] == _FREE:
                    continue
                mode, k = self._sub[p][0], self._sub[p][4]
                if mode in (_COLUMNS, _ROWS, _RANDK):  # global shapes: every rank draws alike
                    total = (p.numel() if mode == _RANDK else  # a 0-D tensor has no columns
                             p.shape[-1] if mode == _COLUMNS else p.shape[0])
                    sub, fr["rng"] = _C.frugal_select_indices(total, k, fr["rng"])
                else:
                    sub, fr["rng"] = _C.frugal_projection(  # the full weight's P
                        self._projection_source(p), k, mode == _RIGHT, self.selection, fr["rng"])
                subspaces[p] = sub  # CPU; _build_states puts it on p's device (and mesh)
                reselected.add(p)
        new = {}
        # tensors of the subspace pool after this step: repacked together whenever that set or a
        # selection changes, so the previous pool is freed whole
        has = lambda p: p in self.state and len(self.state[p]) > 0  # noqa: E731
        members = [p for p in self._projs if self._layout(p, fr) is not None
                   and (has(p) or p in with_grad)]
        if set(members) != {p for p in self._projs if has(p)} or reselected:
            values = {}
            for p in members:
                old = self.state[p] if has(p) else {}
                keep = p not in reselected or not self.reset_statistics
                for key, v in old.items():
                    if keep or key == "subspace":
                        values[(p, key)] = v
                if p in subspaces:
                    values[(p, "subspace")] = subspaces[p]
            new.update(self._build_states(members, values, fr))
            new.update({p: None for p in self._projs if has(p) and p not in new})
        fresh = [p for p in with_grad if p not in self._index and not has(p)]
        new.update(self._build_states(fresh, {}, fr))
        return fr, new

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None):
        if torch.compiler.is_compiling():
            raise TypeError(_NOT_COMPILABLE)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        calls = self._device_batches()
        if not calls or self._skips_step(calls):
            return loss
        # 1. gradients and hyperparameters, before anything is selected or allocated
        for group, params in calls:
            self._check_grads(group, params)
        # 2. this step's subspaces and states, as candidates; 3. the full check against them
        fr, new = self._plan({p for _, params in calls for p in params})
        runs = []
        for group, params in calls:
            states = [new[p] if p in new else (self.state[p] if p in self.state else None)
                      for p in params]
            args = self._op_args(group, params, states, [self._mode(p, fr) for p in params])
            runs.append(self._prepared_call(params, args))  # validated (frugal_shard)
        # 4. commit, then run
        for p, st in new.items():
            if st is None:
                self.state.pop(p, None)
            else:
                self.state[p] = st
        fr["t"] += 1
        self._fr = fr
        self._run_prepared(runs)
        return loss

    def _check_grads(self, group, params):
        """The op's check with every tensor state-free: gradients, dtypes, hyperparameters."""
        args = self._op_args(group, params, [None] * len(params), [_FREE] * len(params))
        _C.check_frugal_(*args)

    # ---- reporting -----------------------------------------------------------------------------
    def _describe_row(self, p):
        """(mode, number of coordinates with Adam state)."""
        mode = self._mode(p)
        lay = self._layout(p)
        return _MODE_NAMES[mode], math.prod(lay["exp_avg"][0]) if lay else 0

    def describe(self) -> str:
        lines = super().describe().splitlines()
        fr, n = self._fr, len(self._projs)
        if self.selection == "block":
            what = f"{len(fr['active'])}/{n} projectable tensors active (block_order={self.block_order})"
        else:
            what = f"{self.selection} subspaces of density {self.density:g} on {n} projectable tensors"
        lines[-1] += (f"; FRUGAL: {what}, state-free rule {self.state_free}, "
                      f"next re-selection at step {(fr['t'] // self.update_gap + 1) * self.update_gap}")
        return "\n".join(lines)

