"""Where an optimizer's parameters, names and roles come from: one rule for every optimizer.

- A model (nn.Module) or named parameters give each tensor its name, and so its role.
- Param groups (dicts) give hyperparameters; their 'params' may be tensors or (name, tensor)
  pairs.
- Both: `Opt(groups, model=model)` keeps the groups' settings and takes the names from the
  model. This is the HF Trainer path (`optimizer_cls_and_kwargs`, see integrations/hf.py), whose
  groups (decay / no decay) hold bare tensors.

An optimizer that needs roles and is given tensors it cannot name raises `need_names`'s error,
which says how to pass them; none falls back silently to plain AdamW.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn


@dataclass
class Sources:
    """groups: param groups whose 'params' are (name or None, tensor) pairs, tensors that do not
    require grad left out; model: the module the names come from, when there is one."""
    groups: list
    model: Optional[nn.Module]

    @property
    def named(self) -> list:
        return [np for g in self.groups for np in g["params"]]

    @property
    def all_named(self) -> bool:
        return all(n is not None for n, _ in self.named)


def resolve(params, model: Optional[nn.Module] = None) -> Sources:
    """Sources of `params` (a model, named parameters, tensors, or dict groups of either) with
    names looked up in `model` where `params` does not carry them."""
    if isinstance(params, nn.Module):
        if model is not None and model is not params:
            raise ValueError("pass the model once: as the parameters or as model=, not both")
        model, params = params, params.named_parameters()
    if isinstance(params, torch.Tensor):
        raise TypeError("params must be an iterable of tensors, (name, tensor) pairs or dict "
                        "groups, or a model; got a single tensor")
    items = list(params)
    if not items:
        raise ValueError("optimizer got an empty parameter list")
    groups = [dict(g, params=list(g["params"]) if not isinstance(g["params"], torch.Tensor)
                   else [g["params"]])
              if isinstance(g, dict) else None for g in items]
    if any(g is None for g in groups):
        if any(g is not None for g in groups):
            raise TypeError("params mixes dict groups with tensors; give one or the other")
        groups = [{"params": items}]
    names = {id(p): n for n, p in model.named_parameters()} if model is not None else {}
    for g in groups:
        pairs = []
        for entry in g["params"]:
            if isinstance(entry, tuple) and len(entry) == 2 and isinstance(entry[0], str) \
                    and isinstance(entry[1], torch.Tensor):
                pairs.append(entry)
            elif isinstance(entry, torch.Tensor):
                if model is not None and id(entry) not in names:
                    raise ValueError(f"a parameter of shape {tuple(entry.shape)} is not in the "
                                     "model passed as model=")
                pairs.append((names.get(id(entry)), entry))
            else:
                raise TypeError(f"a parameter must be a tensor or a (name, tensor) pair, got "
                                f"{type(entry).__name__}")
        g["params"] = [(n, p) for n, p in pairs if p.requires_grad]
    return Sources(groups, model)


def need_names(sources: Sources, who: str, why: str) -> None:
    """Raises a TypeError saying how to give `who` its parameters' names when some are missing.
    why: what the names decide, e.g. "its blocks (heads, embeddings, norms)"."""
    if sources.all_named:
        return
    raise TypeError(
        f"{who} needs each parameter's name: they decide {why}. Pass the model, "
        f"{who}(model, ...) or {who}(model.named_parameters(), ...), or with param groups of "
        f"bare tensors (HF Trainer's optimizer_cls_and_kwargs) {who}(groups, model=model, ...); "
        f"memopt_core.integrations.hf.optimizer_cls_and_kwargs builds that for the Trainer")
