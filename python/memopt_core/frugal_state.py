"""Frugal's checkpointing (the selection travels with the state_dict) and its input helpers."""
from __future__ import annotations

import warnings

import torch
from torch import nn

PROJECTABLE_ROLES = ("query", "key", "value", "attn_out", "qkv", "mlp")
_KEYS = ("t", "cursor", "active", "block_cycle", "cycle")


def _check_selection(saved: dict, n: int, k_blocks: int, density: float) -> None:
    """Raises a ValueError naming the first field of a saved selection that this optimizer
    (n projectable tensors, k_blocks active per cycle, `density`) could not step from: every
    field is checked before anything is loaded."""
    def bad(what):
        raise ValueError(f"Frugal checkpoint: {what}; it was damaged or written by another "
                         "configuration, so nothing was loaded")

    def is_int(v, lo, hi=None):
        return isinstance(v, int) and not isinstance(v, bool) and v >= lo and (hi is None or v < hi)

    missing = [k for k in (*_KEYS, "rng") if k not in saved]
    if missing:
        bad(f"the selection lacks {missing}")
    if "density" in saved and saved["density"] != density:  # older checkpoints lack it
        bad(f"saved with density={saved['density']}, this optimizer has density={density}")
    for key, lo in (("t", 0), ("block_cycle", 0)):
        if not is_int(saved[key], lo):
            bad(f"{key} must be an int >= {lo}, got {saved[key]!r}")
    if not is_int(saved["cursor"], -1, n):
        bad(f"cursor must be an int in [-1, {n}), got {saved['cursor']!r}")
    for key, values, length in (("active", saved["active"], k_blocks),
                                ("cycle", saved["cycle"], n),
                                ("held", saved.get("held") or [], None)):
        if not isinstance(values, (list, tuple)):
            bad(f"{key} must be a list, got {type(values).__name__}")
        lo = -1 if key == "cycle" else 0
        if not all(is_int(v, lo, n if key != "cycle" else None) for v in values):
            bad(f"{key} holds an entry that is not a projectable tensor's ({values!r})")
        if key != "cycle" and len(set(values)) != len(values):
            bad(f"{key} names a tensor twice ({values!r})")
        if length is not None and len(values) != length:
            bad(f"{key} has {len(values)} entries, this optimizer needs {length}")
    rng = saved["rng"]
    try:
        torch.Generator().set_state(rng)
    except (TypeError, RuntimeError) as e:
        bad(f"rng is not a torch generator state ({type(e).__name__}: {e})")


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

    def state_dict(self) -> dict:
        sd = super().state_dict()
        # an entry for every parameter, empty for those holding no state (inactive blocks), as
        # get/set_optimizer_state_dict expect one (strict loading) for each trainable parameter
        pids = [pid for g in sd["param_groups"] for pid in g["params"]]
        sd["state"] = {pid: sd["state"].get(pid) or {} for pid in pids}
        fr = self._fr
        saved = dict(t=fr["t"], rng=fr["rng"].clone(), cursor=fr["cursor"],
                     active=list(fr["active"]), block_cycle=fr["block_cycle"],
                     cycle=list(fr["cycle"]), selection=self.selection,
                     num_projectable=len(self._projs), density=self.density,
                     held=[j for j, p in enumerate(self._projs) if self.state.get(p)])
        for g in sd["param_groups"]:
            g["frugal"] = saved
        return sd

    def _read_selection(self, state_dict: dict) -> tuple:
        """(selection dict like self._fr, indices of projectable tensors holding state or None)
        from a state_dict in any form: state_dict(), get_optimizer_state_dict with or without
        flattening, or a checkpoint with the selection at top level (before it moved)."""
        saved = None
        groups = state_dict.get("param_groups")
        if isinstance(groups, list):
            saved = next((g["frugal"] for g in groups if g.get("frugal") is not None), None)
        if saved is None:  # flattened: "param_groups.<name>.frugal" (the same for every name)
            saved = next((v for k, v in state_dict.items() if isinstance(k, str) and
                          k.startswith("param_groups.") and k.endswith(".frugal")), None)
        if saved is None:
            saved = state_dict.get("frugal")
        n = len(self._projs)
        if not isinstance(saved, dict) or saved.get("selection") != self.selection or \
                saved.get("num_projectable") != n:
            raise ValueError(
                f"not a state_dict of a Frugal optimizer with selection={self.selection!r} and "
                f"{n} projectable tensors")
        _check_selection(saved, n, self._k_blocks if self.selection == "block" else 0,
                         self.density)
        fr = {k: saved[k] for k in _KEYS}
        fr["active"], fr["cycle"] = list(fr["active"]), list(fr["cycle"])
        fr["rng"] = saved["rng"].clone()
        held = saved.get("held")
        return fr, None if held is None else set(held)

    def load_state_dict(self, state_dict: dict) -> None:
        fr, held = self._read_selection(state_dict)
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
        old = self._fr
        self._fr, self._loaded_subs, self._loaded_held = fr, subs, held
        try:
            super().load_state_dict({**state_dict, "state": state, "param_groups": groups})
        except Exception:
            self._fr = old
            raise
        finally:
            self._loaded_subs, self._loaded_held = {}, None

    @torch.no_grad()
    def load_selection(self, state_dict: dict) -> None:
        """Adopt the selection saved in `state_dict` (any form load_state_dict takes, or just
        its "frugal" entries) and lay out the state as the checkpoint's: with selection="block"
        the saved active tensors that held state get zeroed moments (as after a re-selection),
        the others none. Then get_optimizer_state_dict gives the checkpoint's keys and shapes,
        which DCP's load and flattened state dicts need. Parameters are not touched."""
        fr, held = self._read_selection(state_dict)
        if self.selection == "block":
            holds = [p for j, p in enumerate(self._projs) if self._layout(p, fr) is not None
                     and (j in held if held is not None else bool(self.state.get(p)))]
            new = self._build_states(holds, {}, fr)
            for p in self._projs:
                self.state.pop(p, None)
            self.state.update(new)
        self._fr = fr

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
        subs, held = getattr(self, "_loaded_subs", {}), getattr(self, "_loaded_held", None)
        for g, saved in zip(self.param_groups, state_dict["param_groups"]):
            for p, pid in zip(g["params"], saved["params"]):
                entry = state_dict["state"].get(pid)
                lay = self._layout(p)
                if entry and lay is None:
                    raise ValueError(f"loaded state has state for a tensor of shape "
                                     f"{tuple(p.shape)} that FRUGAL keeps state-free now")
                if held is not None and p in self._index and \
                        bool(entry) != (self._index[p] in held):
                    raise ValueError(
                        f"loaded state {'lacks' if not entry else 'has'} the moments of a "
                        f"projectable {tuple(p.shape)} tensor that the saved selection says it "
                        f"{'holds' if not entry else 'does not hold'}: a DCP or flattened state "
                        f"dict was made with another selection's layout. Load with "
                        f"opt.load_checkpoint(model, path), or call opt.load_selection(sd) "
                        f"before get_optimizer_state_dict")
                if entry and "subspace" in lay:
                    sub = subs.get(p)
                    shape, _ = lay["subspace"]
                    if sub is None or tuple(sub.shape) != tuple(shape):
                        raise ValueError(f"loaded subspace of a {tuple(p.shape)} tensor must have "
                                         f"shape {shape}")

    def _pack_states(self, params: list, values: dict) -> None:
        # after torch's load: the subspaces set aside by load_state_dict go back in unconverted
        for p, sub in getattr(self, "_loaded_subs", {}).items():
            values[(p, "subspace")] = sub
        params = [p for p in params if self._layout(p) is not None]
        for p, st in self._build_states(params, values).items():
            self.state[p] = st


def projectable(named, model, roles, proj_embeds, proj_norms, proj_logits) -> dict:
    """{tensor: name} of the tensors FRUGAL splits: attention and MLP weights (roles from
    roles.infer_roles), plus embeddings / norms / output layer when asked."""
    from .roles import infer_roles
    with warnings.catch_warnings():  # head counts do not matter here, only which linear it is
        warnings.simplefilter("ignore")
        inferred = infer_roles(named, model, roles=roles)
    extra = {"embedding": proj_embeds, "norm": proj_norms, "output": proj_logits}
    out = {}
    for name, p in named:
        r = inferred[name]
        if (r.role in PROJECTABLE_ROLES and p.dim() == 2) or extra.get(r.role, False) or \
                (r.role == "linear" and r.note and p.dim() == 2):  # a q/k whose heads are unknown
            out[p] = name
    return out
