"""APOLLO's torch param groups from resolved sources (memopt_core.sources). Which tensors are
projected, at which rank, and how they are grouped is the plan's rule (_C.apollo_ranks,
_C.apollo_rank_groups: cpp/src/apollo_plan.cpp); this module gives it the roles and the rank."""
from __future__ import annotations

import warnings

from . import _C
from .roles import infer_roles
from .sources import need_names


def apollo_groups(src, rank, roles, opt, embeddings: str = "adamw") -> list:
    """apollo-torch-style groups (any with a 'rank' key) as given; otherwise each group split
    into one group per effective rank, then its AdamW tensors. rank None: the optimizer's
    default_rank for the model, which needs names (roles decide what is projected).
    embeddings="adam_mini": the AdamW tensors whose role is embedding or output go in a group
    of their own with embeddings="adam_mini" (per-token v), the rest with "adamw"."""
    if embeddings not in ("adamw", "adam_mini"):  # (the plan checks a group's own value)
        raise ValueError(f"embeddings must be 'adamw' or 'adam_mini' (per-token v, 8-bit "
                         f"friendly), got {embeddings!r}")
    if any("rank" in g for g in src.groups):
        return [_torch_group(g, g["params"]) for g in src.groups if g["params"]]
    if rank is None:
        need_names(src, type(opt).__name__, "which weights are projected (the paper projects "
                   "attention and MLP weights, not embeddings, norms or the head)")
        rank = opt.default_rank(src.model)
    named = src.named
    kinds = [None] * len(named)  # bare tensors: every matrix is projected
    if src.all_named:
        with warnings.catch_warnings():  # head-count fallbacks matter to Adam-mini, not here
            warnings.simplefilter("ignore")
            inferred = infer_roles(named, src.model, roles=roles)
        kinds = [inferred[n].role for n, _ in named]
    ranks = iter(_C.apollo_ranks([list(p.shape) for _, p in named], kinds, int(rank)))
    per_token = {id(p) for (_, p), kind in zip(named, kinds) if kind in ("embedding", "output")}
    if embeddings == "adam_mini" and not per_token:
        raise ValueError(f"{type(opt).__name__}(embeddings='adam_mini'): no embedding or output "
                         "tensor found; pass the model or named parameters so that roles are known")
    groups = []
    for g in src.groups:
        members = g["params"]
        split = _C.apollo_rank_groups([next(ranks) for _ in members])
        for r, idx in split:
            part = [members[k] for k in idx]
            if r or embeddings == "adamw":
                groups.append(_torch_group(g, part, **({"rank": r} if r else {})))
                continue
            rows = [m for m in part if id(m[1]) in per_token]
            rest = [m for m in part if id(m[1]) not in per_token]
            groups += [_torch_group(g, ms, embeddings=kind)
                       for ms, kind in ((rows, "adam_mini"), (rest, "adamw")) if ms]
    return groups


def _torch_group(g: dict, members: list, **extra) -> dict:
    """A torch param group: g's settings, `members`' tensors and, where all are named, their
    names."""
    out = {**{k: v for k, v in g.items() if k != "params"}, **extra,
           "params": [p for _, p in members]}
    if members and all(n is not None for n, _ in members):
        out["param_names"] = [n for n, _ in members]
    return out
