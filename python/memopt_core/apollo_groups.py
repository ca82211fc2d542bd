"""Which tensors APOLLO projects, at which rank: torch param groups from resolved sources
(memopt_core.sources). The roles' hidden matrices (role_traits, apollo-torch's main_pretrain:
attention and MLP linears) are projected; embeddings, the output layer, norms, biases and conv
kernels keep full AdamW state."""
from __future__ import annotations

import warnings

from .roles import infer_roles, role_has
from .sources import need_names


def apollo_groups(src, rank, roles, opt) -> list:
    """Torch param groups from resolved sources: apollo-torch-style groups (any with a 'rank'
    key) as given; otherwise each group split into projected tensors (by role, or every 2-D
    tensor of bare tensors given with an explicit rank), one group per effective rank (a
    tensor's never above its smaller side), and AdamW tensors."""
    if any("rank" in g for g in src.groups):
        return [_torch_group(g, g["params"]) for g in src.groups if g["params"]]
    if rank is None:
        need_names(src, type(opt).__name__, "which weights are projected (the paper projects "
                   "attention and MLP weights, not embeddings, norms or the head)")
        rank = opt.default_rank(src.model)
    named = src.named
    if src.all_named:
        with warnings.catch_warnings():  # head-count fallbacks matter to Adam-mini, not here
            warnings.simplefilter("ignore")
            inferred = infer_roles(named, src.model, roles=roles)
        chosen = {p: p.dim() == 2 and role_has(inferred[n].role, "hidden_matrix") for n, p in named}
    else:
        chosen = {p: p.dim() == 2 for _, p in named}
    groups = []
    for g in src.groups:
        by_rank, rest = {}, []
        for n, p in g["params"]:
            if chosen[p]:
                by_rank.setdefault(max(1, min(int(rank), *p.shape)), []).append((n, p))
            else:
                rest.append((n, p))
        groups += [_torch_group(g, members, rank=r) for r, members in by_rank.items()]
        if rest:
            groups.append(_torch_group(g, rest))
    return groups


def _torch_group(g: dict, members: list, **extra) -> dict:
    """A torch param group: g's settings, `members`' tensors and, where all are named, their
    names."""
    out = {**{k: v for k, v in g.items() if k != "params"}, **extra,
           "params": [p for _, p in members]}
    if members and all(n is not None for n, _ in members):
        out["param_names"] = [n for n, _ in members]
    return out
