"""Frugal's checkpointing (the selection travels with the state_dict) and its input helpers."""
from __future__ import annotations

import torch
from torch import nn


class FrugalCheckpoint:
    """state_dict / load_state_dict for memopt_core.Frugal: the step count, block cursor, active
    set, per-tensor selection cycles and the generator state are saved with the moments, and
    subspace indices are restored without torch's cast of state to the parameter dtype."""

    def state_dict(self) -> dict:
        sd = super().state_dict()
        sd["state"] = {k: v for k, v in sd["state"].items() if v}  # no empty entries
        fr = self._fr
        sd["frugal"] = dict(t=fr["t"], rng=fr["rng"].clone(), cursor=fr["cursor"],
                            active=list(fr["active"]), block_cycle=fr["block_cycle"],
                            cycle=list(fr["cycle"]), selection=self.selection,
                            num_projectable=len(self._projs))
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        saved = state_dict.get("frugal")
        if not isinstance(saved, dict) or saved.get("selection") != self.selection or \
                saved.get("num_projectable") != len(self._projs):
            raise ValueError(
                f"not a state_dict of a Frugal optimizer with selection={self.selection!r} and "
                f"{len(self._projs)} projectable tensors")
        fr = {k: saved[k] for k in ("t", "cursor", "active", "block_cycle", "cycle")}
        fr["rng"] = saved["rng"].clone()
        if any(not 0 <= j < len(self._projs) for j in fr["active"]):
            raise ValueError("loaded state_dict names an active block that does not exist")
        # Subspace indices must not go through torch's cast of state to the parameter dtype.
        pids = [pid for g in state_dict["param_groups"] for pid in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        state = {k: dict(v) for k, v in state_dict["state"].items()}
        subs = {params[pids.index(k)]: v.pop("subspace") for k, v in state.items()
                if "subspace" in v and k in pids}
        old = self._fr
        self._fr, self._loaded_subs = fr, subs
        try:
            super().load_state_dict({**state_dict, "state": state})
        except Exception:
            self._fr = old
            raise
        finally:
            self._loaded_subs = {}

    def _check_loadable(self, state_dict: dict) -> None:
        super()._check_loadable(state_dict)  # groups, sizes, moment and step shapes
        subs = getattr(self, "_loaded_subs", {})
        for g, saved in zip(self.param_groups, state_dict["param_groups"]):
            for p, pid in zip(g["params"], saved["params"]):
                entry = state_dict["state"].get(pid)
                lay = self._layout(p)
                if entry and lay is None:
                    raise ValueError(f"loaded state has state for a tensor of shape "
                                     f"{tuple(p.shape)} that FRUGAL keeps state-free now")
                if entry and "subspace" in lay:
                    sub = subs.get(p)
                    shape, _ = lay["subspace"]
                    if sub is None or tuple(sub.shape) != tuple(shape):
                        raise ValueError(f"loaded subspace of a {tuple(p.shape)} tensor must have "
                                         f"shape {shape}")

    def _pack_states(self, params: list, values: dict) -> None:
        # after torch's load: the subspaces set aside by load_state_dict go back in unconverted
        for p, sub in getattr(self, "_loaded_subs", {}).items():
            dtype = self._layout(p)["subspace"][1]
            values[(p, "subspace")] = sub.to(dtype=dtype, device=p.device)
        params = [p for p in params if self._layout(p) is not None]
        for p, st in self._build_states(params, values).items():
            self.state[p] = st


def named_groups(source) -> list[dict]:
    """Param groups of (name, tensor) pairs from a model, named parameters or dict groups of
    named parameters; tensors that do not require grad are left out."""
    if isinstance(source, nn.Module):
        source = source.named_parameters()
    items = list(source)
    groups = [dict(g, params=list(g["params"])) for g in items] \
        if items and isinstance(items[0], dict) else [{"params": items}]
    for g in groups:
        for entry in g["params"]:
            if not (isinstance(entry, tuple) and len(entry) == 2 and isinstance(entry[0], str)
                    and isinstance(entry[1], torch.Tensor)):
                raise TypeError("Frugal needs parameter names to find the projectable tensors: "
                                "pass a model, model.named_parameters(), or groups whose "
                                "'params' are (name, tensor) pairs")
        g["params"] = [(n, p) for n, p in g["params"] if p.requires_grad]
    return groups
