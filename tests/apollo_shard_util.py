"""Shared by the sharded APOLLO op tests (tests/test_apollo_shard.py,
tests/test_cuda_apollo_shard.py): the weights (a Left and a Right one), their uneven 1..4-way
splits (one shard empty) and the two layouts (all by rows, or the Left weight by columns), the
Apollo / ApolloMini settings, zeroed state for a weight or its shard, the ops' argument lists, the
shards of a run on a device, one sharded step (statistics on every shard, their sum as the
all-reduce gives it, the update on every shard), and one Right row shard's arguments for the
error cases."""
from __future__ import annotations

import torch

from memopt_core import _C

STEPS, GAP, LR, WD = 8, 3, 1e-2, 0.1
SHAPES = [(13, 29), (29, 13)]   # wide: Left (per-column channels), tall: Right (per-row)
SPLITS = {13: [[13], [4, 9], [5, 0, 8], [3, 4, 0, 6]], 29: [[29], [10, 19], [9, 0, 20], [7, 8, 0, 14]]}
# the dim each of SHAPES is sharded along: all by rows (FSDP2's default), or the Left weight by
# columns (distributed.apollo_shard_placement: then only scalars cross shards)
LAYOUTS = {"rows": (0, 0), "left-by-columns": (1, 0)}
STATS = 11  # index of the stats buffer in the shard ops' arguments
# (rank, scale_type, norm_growth_limit, scale, scale_front): Apollo, and ApolloMini settings
CONFIGS = {
    "apollo": (4, "channel", 1.01, 1.0, False),
    "apollo-nolimiter": (4, "channel", 0.0, 1.0, False),
    "apollo-tensor": (3, "tensor", 1.01, 2.0, False),
    "mini": (1, "tensor", 1.01, 128.0, False),
    "mini-front-nolimiter": (1, "tensor", 0.0, 128.0, True),
    "mini-front": (1, "tensor", 1.01, 128.0, True),
}
TOL = {torch.float64: 1e-12, torch.float32: 2e-5, torch.bfloat16: 2e-2}


def _channels_split(side, dim):
    """Whether a shard along `dim` splits R's channels (its moments are shards too)."""
    return (side, dim) in (("right", 0), ("left", 1))


def _state(p, rank, store, size=None, dim=0):
    """Zeroed APOLLO state of a (global) weight like p, for its shard of `size` along `dim`:
    moments split like the weight where the shard splits R's channels."""
    proj = _C.Projector("random", "std", rank, list(p.shape))
    low = list(proj.low_rank_shape)
    if size is not None and _channels_split(proj.side, dim):
        low[dim] = size
    mdt = p.dtype
    return {"m": torch.zeros(low, dtype=mdt), "v": torch.zeros(low, dtype=mdt),
            "proj": torch.zeros(proj.proj_shape, dtype=p.dtype) if store else None,
            "seed": torch.tensor(7 + p.shape[0], dtype=torch.int64),
            "norm": torch.tensor(-1.0, dtype=torch.float64 if p.dtype == torch.float64 else torch.float32),
            "step": torch.zeros((), dtype=torch.float32), "side": proj.side}


def _lists(states, store):
    return ([s["m"] for s in states], [s["v"] for s in states],
            [s["proj"] for s in states] if store else [], [s["seed"] for s in states],
            [s["norm"] for s in states], [s["step"] for s in states])


def _hp(cfg):
    rank, scale_type, gamma, scale, front = cfg
    return (torch.tensor(LR, dtype=torch.float64), 0.9, 0.999, 1e-6, WD, rank, "random", "std",
            scale_type, GAP, scale, gamma, front)


def _grads(shapes, step, dtype):
    gen = torch.Generator().manual_seed(1000 + step)
    out = []
    for s in shapes:
        g = torch.randn(s, generator=gen, dtype=torch.float64)
        g = g * torch.exp(torch.randn(s[0], 1, generator=gen, dtype=torch.float64)) * (0.5 + step % 3)
        out.append(g.to(dtype))
    return out


def _relerr(a, b):
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item() if b.numel() else 0.0


def _to(state, device):
    """The state with its tensors on `device` (the step counter stays on the CPU)."""
    return {k: (v.to(device) if isinstance(v, torch.Tensor) and k != "step" else v)
            for k, v in state.items()}


def _make_shards(full, cfg, store, n_shards, device="cpu", dims=(0, 0)):
    """shards[k] = this "rank"'s list of (param shard, state, offset) for every tensor, each
    split along its dim in `dims`."""
    shards = []
    for k in range(n_shards):
        row = []
        for p, dim in zip(full, dims):
            sp = SPLITS[p.shape[dim]][n_shards - 1]
            at, m = sum(sp[:k]), sp[k]
            row.append((p.narrow(dim, at, m).clone().to(device),
                        _to(_state(p, cfg[0], store, m, dim), device), at))
        shards.append(row)
    return shards


def _shard_step(shards, grads, cfg, store, ns=torch.ops.memopt, device="cpu", dims=(0, 0),
                **found_inf):
    """One sharded step: statistics on every shard, their sum, the update on every shard
    (found_inf: the ops' flag)."""
    hp = _hp(cfg)
    numel = sum(_C.apollo_shard_stats_numel(list(s), cfg[0], "random", "std", cfg[1], cfg[2], d)
                for s, d in zip(SHAPES, dims))
    calls, total = [], None
    for row in shards:
        ps = [p for p, _, _ in row]
        gs = [g.narrow(d, at, p.shape[d]).contiguous().to(device)
              for g, d, (p, _, at) in zip(grads, dims, row)]
        stats = torch.full((numel,), float("nan"), dtype=torch.float64, device=device)  # all written
        args = [ps, gs, *_lists([s for _, s, _ in row], store), [at for _, _, at in row],
                [s[d] for s, d in zip(SHAPES, dims)], list(dims), stats, *hp]
        torch.ops.memopt.check_apollo_shard_update_(*args, **found_inf)
        ns.apollo_shard_stats_(*args, **found_inf)
        total = stats.clone() if total is None else total + stats
        calls.append(args)
    for args in calls:  # the all-reduce: every shard finishes from the same sum
        args[STATS] = total
        ns.apollo_shard_update_(*args, **found_inf)


def _one_shard_args(stats_numel_delta=0, proj="random", rows=(0, 5), dtype=torch.float64):
    p = torch.randn(12, 7, dtype=dtype)  # tall: Right; shard of rows 2..7 of a 12-row weight
    full_shape = [12, 7]
    st = _state(torch.empty(full_shape, dtype=dtype), 2, True, rows[1])
    shard = p[2:2 + rows[1]].clone()
    numel = _C.apollo_shard_stats_numel(full_shape, 2, "random", "std", "tensor", 1.01)
    stats = torch.zeros(numel + stats_numel_delta, dtype=torch.float64)
    hp = list(_hp((2, "tensor", 1.01, 1.0, False)))
    hp[6] = proj
    return [[shard], [torch.randn_like(shard)], *_lists([st], True), [2], [12], [0], stats, *hp]
