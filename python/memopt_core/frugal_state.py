"""Frugal's checkpointing (the plan's selection travels with the state_dict) and the tensor
descriptions its plan is built from. What a saved selection must satisfy is checked by
memopt::FrugalPlan (read / check_loaded), shared with the LibTorch front end."""
from __future__ import annotations

import warnings

import torch
from torch import nn


def tensor_specs(named: list, all_named, model, roles) -> list:
    """(name, shape, role, heads_unknown) of every (name, tensor) in `named`, the plan's input:
    roles from roles.infer_roles over `all_named` (the model's parameters, so that module
    context is seen), and whether an attention weight fell back to "linear" because its head
    count is unknown (the plan still splits it)."""
    from .roles import infer_roles
    with warnings.catch_warnings():  # head counts do not matter here, only which linear it is
        warnings.simplefilter("ignore")
        inferred = infer_roles(all_named, model, roles=roles)
    return [(name, list(p.shape), inferred[name].role,
             inferred[name].role == "linear" and bool(inferred[name].note)) for name, p in named]


class FrugalCheckpoint:
    """state_dict / load_state_dict for memopt_core.Frugal: the step count, block cursor, active
    set, per-tensor selection cycles, generator state and which projectable tensors hold state
    are saved with the moments, and subspace indices are restored without torch's cast of state
    to the parameter dtype.

    The selection is saved under the key "frugal" of every param group (live groups hold None
    there): torch.distributed.checkpoint's get/set_optimizer_state_dict keep param group keys,
    flattened or not, but drop top-level keys. Which tensors hold moments depends on the
    selection ("block"), so a loader whose state must match the checkpoint's keys and shapes
    (DCP, flattened state dicts) adopts the selection first: load_checkpoint() does both."""

    _loaded_selection, _loaded_subs = None, {}  # set while load_state_dict checks and packs

    def state_dict(self) -> dict:
        self._count_device_steps()  # the saved step count is exact
        sd = super().state_dict()
        # an entry for every parameter, empty for those holding no state (inactive blocks), as
        # get/set_optimizer_state_dict expect one (strict loading) for each trainable parameter
        pids = [pid for g in sd["param_groups"] for pid in g["params"]]
        sd["state"] = {pid: sd["state"].get(pid) or {} for pid in pids}
        saved = self.plan.save(self._holding())
        for g in sd["param_groups"]:
            g["frugal"] = saved
        return sd

    def _read_selection(self, state_dict: dict):
        """The plan's validated selection from a state_dict in any form: state_dict(),
        get_optimizer_state_dict with or without flattening, or a checkpoint with the selection
        at top level (before it moved)."""
        saved = None
        groups = state_dict.get("param_groups")
        if isinstance(groups, list):
            saved = next((g["frugal"] for g in groups if g.get("frugal") is not None), None)
        if saved is None:  # flattened: "param_groups.<name>.frugal" (the same for every name)
            saved = next((v for k, v in state_dict.items() if isinstance(k, str) and
                          k.startswith("param_groups.") and k.endswith(".frugal")), None)
        if saved is None:
            saved = state_dict.get("frugal")
        return self.plan.read(saved if isinstance(saved, dict) else {})

    def load_state_dict(self, state_dict: dict) -> None:
        self._count_device_steps()  # (a failed load keeps the plan: its count exact)
        sel = self._read_selection(state_dict)
        # Subspace indices must not go through torch's cast of state to the parameter dtype.
        pids = [pid for g in state_dict["param_groups"] for pid in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        # DCP's unflattening gives {} for a key this optimizer's state has and the saved one
        # lacks; such values and empty entries are absent state
        state = {k: {n: v for n, v in e.items() if not (isinstance(v, dict) and not v)}
                 for k, e in state_dict["state"].items()}
        state = {k: e for k, e in state.items() if e}
        subs = {params[pids.index(k)]: v.pop("subspace") for k, v in state.items()
                if "subspace" in v and k in pids}
        groups = [dict(g, frugal=None) for g in state_dict["param_groups"]]
        old = self.plan.selection
        self.plan.adopt(sel)  # the layout the loaded state is checked against and packed in
        self._loaded_selection, self._loaded_subs = sel, subs
        try:
            super().load_state_dict({**state_dict, "state": state, "param_groups": groups})
        except Exception:
            self.plan.adopt(old)
            raise
        finally:
            self._loaded_selection, self._loaded_subs = None, {}

    @torch.no_grad()
    def load_selection(self, state_dict: dict) -> None:
        """Adopt the selection saved in `state_dict` (any form load_state_dict takes, or just
        its "frugal" entries) and lay out the state as the checkpoint's: with selection="block"
        the saved active tensors that held state get zeroed moments (as after a re-selection),
        the others none. Then get_optimizer_state_dict gives the checkpoint's keys and shapes,
        which DCP's load and flattened state dicts need. Parameters are not touched."""
        sel = self._read_selection(state_dict)
        holders = self.plan.holders(sel, self._holding())
        if holders is not None:
            modes = [self.plan.mode(j, sel) for j in range(len(self._projs))]
            new = self._build_states([self._projs[j] for j in holders], {}, modes)
            for p in self._projs:
                self.state.pop(p, None)
            self.state.update(new)
        self.plan.adopt(sel)

    def load_checkpoint(self, model: nn.Module, checkpoint_id, key: str = "optim",
                        options=None, **load_kwargs) -> None:
        """Load this optimizer's state from a torch.distributed.checkpoint saved as
        {key: get_optimizer_state_dict(model, opt, options=options), ...} (other keys, the
        model's, are left to the caller): the selection first, so that the state laid out here
        has the checkpoint's keys and shapes, then the state. Collective under a process group
        (call it on every rank); also works in one process without one."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import (get_optimizer_state_dict,
                                                             set_optimizer_state_dict)
        osd = get_optimizer_state_dict(model, self, options=options)
        if "param_groups" in osd:
            selection = {"param_groups": [{"frugal": osd["param_groups"][0]["frugal"]}]}
        else:  # flattened: one name's copy is enough
            name = next(k for k in osd if k.startswith("param_groups.") and k.endswith(".frugal"))
            selection = {name: osd[name]}
        dcp.load({key: selection}, checkpoint_id=checkpoint_id, **load_kwargs)
        self.load_selection(selection)
        osd = get_optimizer_state_dict(model, self, options=options)
        dcp.load({key: osd}, checkpoint_id=checkpoint_id, **load_kwargs)
        set_optimizer_state_dict(model, self, osd, options=options)

    def _check_loadable(self, state_dict: dict) -> None:
        super()._check_loadable(state_dict)  # groups, sizes, moment and step shapes
        sel = self._loaded_selection or self.plan.selection
        for g, saved in zip(self.param_groups, state_dict["param_groups"]):
            for p, pid in zip(g["params"], saved["params"]):
                if p in self._index:
                    sub = self._loaded_subs.get(p)
                    self.plan.check_loaded(self._index[p], sel, bool(state_dict["state"].get(pid)),
                                           None if sub is None else list(sub.shape))

    def _pack_states(self, params: list, values: dict) -> None:
        # after torch's load: the subspaces set aside by load_state_dict go back in unconverted
        for p, sub in self._loaded_subs.items():
            values[(p, "subspace")] = sub
        params = [p for p in params if self._layout(p) is not None]
        for p, st in self._build_states(params, values).items():
            self.state[p] = st
