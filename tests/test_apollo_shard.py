"""Sharded APOLLO ops (memopt::apollo_shard_stats_ / apollo_shard_update_), in one process:
each weight is cut into 1..4 shards (uneven, one empty) by rows, or (a Left weight) by columns,
the statistics op runs on every shard, the buffers are summed (what the front end's all-reduce
does), the update op finishes every shard; parameters and every state tensor must equal the
whole-tensor apollo_ op's over 8 steps with projection refreshes at steps 0, 3 and 6. Left and
Right tensors share each call (so the statistics layout of several tensors is exercised). Also the
statistics buffer's size, the ops' refusals (before any write), Meta kernels, opcheck and their
allocations. The CUDA shard ops against these: test_cuda_apollo_shard.py."""
from __future__ import annotations

import pytest
import torch

from apollo_shard_util import (CONFIGS, LAYOUTS, SHAPES, SPLITS, STATS, STEPS, TOL, _channels_split,
                               _grads, _hp, _lists, _make_shards, _one_shard_args, _relerr,
                               _shard_step, _state)
from memopt_core import _C


def _run(cfg, store, dtype, n_shards, dims):
    gen = torch.Generator().manual_seed(0)
    full = [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype) for s in SHAPES]
    ref_p = [p.clone() for p in full]
    ref_s = [_state(p, cfg[0], store) for p in full]
    shards = _make_shards(full, cfg, store, n_shards, dims=dims)
    hp = _hp(cfg)
    for step in range(STEPS):
        grads = _grads(SHAPES, step, dtype)
        torch.ops.memopt.apollo_(ref_p, grads, *_lists(ref_s, store), *hp)
        _shard_step(shards, grads, cfg, store, dims=dims)
    return ref_p, ref_s, shards


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("store", [True, False], ids=["stored", "redrawn"])
@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_shards_equal_whole_tensor(layout, config, store, dtype):
    tol, dims = TOL[dtype], LAYOUTS[layout]
    for n_shards in (1, 2, 3, 4):
        ref_p, ref_s, shards = _run(CONFIGS[config], store, dtype, n_shards, dims)
        where = f"{layout} {config} {n_shards} shards"
        for i, (p_ref, s_ref) in enumerate(zip(ref_p, ref_s)):
            got = torch.cat([row[i][0] for row in shards], dims[i])
            assert _relerr(got, p_ref) <= tol, (where, i, "param", _relerr(got, p_ref))
            for key in ("m", "v"):
                if _channels_split(s_ref["side"], dims[i]):   # shards of the moments
                    got = torch.cat([row[i][1][key] for row in shards], dims[i])
                    assert _relerr(got, s_ref[key]) <= tol, (where, i, key)
                else:                          # whole on every shard
                    for row in shards:
                        assert _relerr(row[i][1][key], s_ref[key]) <= tol, (where, i, key)
            for row in shards:
                st = row[i][1]
                assert st["seed"].item() == s_ref["seed"].item() != 7 + SHAPES[i][0]
                assert st["step"].item() == STEPS
                if store:
                    assert torch.equal(st["proj"], s_ref["proj"]), (where, i, "proj")
                assert _relerr(st["norm"], s_ref["norm"]) <= tol, (where, i, "norm")
                if CONFIGS[config][2] == 0.0:
                    assert st["norm"].item() == -1.0



def test_stats_layout_sizes():
    # Left: partial R (r x n) + column sums (or their total); Right: a few scalars
    assert _C.apollo_shard_stats_numel([13, 29], 4, "random", "std", "channel", 1.01) == 4 * 29 + 29
    assert _C.apollo_shard_stats_numel([13, 29], 1, "random", "std", "tensor", 1.01) == 29 + 1
    assert _C.apollo_shard_stats_numel([13, 29], 4, "random", "std", "channel", 0.0) == 4 * 29
    assert _C.apollo_shard_stats_numel([29, 13], 4, "random", "std", "channel", 1.01) == 1
    assert _C.apollo_shard_stats_numel([29, 13], 4, "random", "std", "channel", 0.0) == 0
    assert _C.apollo_shard_stats_numel([29, 13], 1, "random", "std", "tensor", 1.01) == 3
    # a Left weight by columns: R's channels are the shard's, so scalars as a Right row shard
    assert _C.apollo_shard_stats_numel([13, 29], 4, "random", "std", "channel", 1.01, 1) == 1
    assert _C.apollo_shard_stats_numel([13, 29], 4, "random", "std", "channel", 0.0, 1) == 0
    assert _C.apollo_shard_stats_numel([13, 29], 1, "random", "std", "tensor", 1.01, 1) == 3


@pytest.mark.parametrize("bad,match", [
    (dict(stats_numel_delta=1), "stats must be"),
    (dict(proj="svd"), "svd"),
])
def test_bad_input_raises_and_writes_nothing(bad, match):
    args = _one_shard_args(**bad)
    before = [[t.clone() for t in a] if isinstance(a, list) and a and isinstance(a[0], torch.Tensor)
              else a for a in args]
    with pytest.raises(ValueError, match=match):
        torch.ops.memopt.check_apollo_shard_update_(*args)
    for op in (torch.ops.memopt.apollo_shard_stats_, torch.ops.memopt.apollo_shard_update_):
        with pytest.raises(ValueError, match=match):
            op(*args)
    for a, b in zip(args, before):
        if isinstance(b, list) and b and isinstance(b[0], torch.Tensor):
            assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_shard_outside_the_weight_is_refused():
    args = _one_shard_args()
    args[8] = [9]  # rows 9..14 of a 12-row weight
    with pytest.raises(ValueError, match="does not fit"):
        torch.ops.memopt.check_apollo_shard_update_(*args)
    args = _one_shard_args()
    args[2] = [torch.zeros(12, 2, dtype=torch.float64)]  # Right moments must be the shard's rows
    with pytest.raises(ValueError, match="Adam moments"):
        torch.ops.memopt.apollo_shard_update_(*args)


@pytest.mark.parametrize("dims,match", [([1], "right and sharded by columns"),
                                        ([2], "rows \\(0\\) or columns \\(1\\)")])
def test_unsupported_shard_dims_are_refused(dims, match):
    """A Right weight split by columns (P contracts them: R would have to be summed whole, which
    the ops do only for Left row shards) and dims other than 0/1 raise before any write."""
    args = _one_shard_args()
    args[0], args[1] = [torch.randn(12, 3, dtype=torch.float64)], [torch.ones(12, 3, dtype=torch.float64)]
    args[8], args[9], args[10] = [2], [7], dims  # columns 2..4 of a tall (12, 7) weight
    before = args[0][0].clone()
    for call in (torch.ops.memopt.check_apollo_shard_update_, torch.ops.memopt.apollo_shard_stats_,
                 torch.ops.memopt.apollo_shard_update_):
        with pytest.raises(ValueError, match=match):
            call(*args)
    assert torch.equal(args[0][0], before)


def test_meta_kernels_check_shapes():
    args = _one_shard_args()
    meta = [[t.to("meta") for t in a] if isinstance(a, list) and a and isinstance(a[0], torch.Tensor)
            else (a.to("meta") if isinstance(a, torch.Tensor) and a.dim() else a) for a in args]
    torch.ops.memopt.apollo_shard_stats_(*meta)
    torch.ops.memopt.apollo_shard_update_(*meta)
    meta[STATS] = torch.zeros(1, dtype=torch.float64, device="meta")
    with pytest.raises(ValueError, match="stats must be"):
        torch.ops.memopt.apollo_shard_update_(*meta)


@pytest.mark.parametrize("store", [True, False], ids=["stored", "redrawn"])
def test_opcheck(store):
    """torch.library.opcheck on both ops (schema mutations, fake/Meta kernels, dispatch) for
    the second shard of a Left and a Right weight, with the limiter and tensor scaling."""
    gen = torch.Generator().manual_seed(3)
    cfg = CONFIGS["apollo-tensor"]
    rows = [SPLITS[s[0]][1] for s in SHAPES]
    ps = [torch.randn(r[1], s[1], generator=gen, dtype=torch.float64) for r, s in zip(rows, SHAPES)]
    gs = [torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in ps]
    states = [_state(torch.empty(s, dtype=torch.float64), cfg[0], store, r[1])
              for r, s in zip(rows, SHAPES)]
    numel = sum(_C.apollo_shard_stats_numel(list(s), cfg[0], "random", "std", cfg[1], cfg[2])
                for s in SHAPES)
    args = [ps, gs, *_lists(states, store), [r[0] for r in rows], [s[0] for s in SHAPES],
            [0, 0], torch.zeros(numel, dtype=torch.float64), *_hp(cfg)]
    torch.library.opcheck(torch.ops.memopt.apollo_shard_stats_.default, tuple(args))
    args[STATS] = torch.rand(numel, dtype=torch.float64, generator=gen)
    torch.library.opcheck(torch.ops.memopt.apollo_shard_update_.default, tuple(args))


@pytest.mark.parametrize("store", [True, False], ids=["stored", "redrawn"])
def test_no_parameter_sized_allocation(store):
    """Once the workspace is sized, neither op allocates anything near a weight's size, at a
    refresh step or a plain one (the statistics buffer is the caller's: r x n for Left)."""
    from test_optimizer_contract import _allocations_during
    shapes, rank = [(256, 1024), (1024, 256)], 16    # Left and Right
    cfg = (rank, "channel", 1.01, 1.0, False)
    gen = torch.Generator().manual_seed(0)
    shards = [(0, 100), (100, 156)]                 # rows of 256 / of 1024 split alike
    calls = []
    for row0, m in shards:
        ps, gs, states, r0s = [], [], [], []
        for s in shapes:
            r0, mm = (row0, m) if s[0] == 256 else (row0 * 4, m * 4)
            ps.append(torch.randn(mm, s[1], generator=gen))
            gs.append(torch.randn(mm, s[1], generator=gen))
            states.append(_state(torch.empty(s), rank, store, mm))
            r0s.append(r0)
        numel = sum(_C.apollo_shard_stats_numel(list(s), rank, "random", "std", "channel", 1.01)
                    for s in shapes)
        calls.append([ps, gs, *_lists(states, store), r0s, [s[0] for s in shapes], [0, 0],
                      torch.zeros(numel, dtype=torch.float64), *_hp(cfg)[:6], "random", "std",
                      "channel", 2, 1.0, 1.01, False])

    def step():
        for args in calls:
            torch.ops.memopt.apollo_shard_stats_(*args)
        for args in calls:
            torch.ops.memopt.apollo_shard_update_(*args)

    step()
    step()                                          # state and workspace sized
    for _ in range(2):                              # a refresh step (t = 2), then a plain one
        sizes = _allocations_during(step)
        assert max(sizes, default=0) < 0.01 * 256 * 1024 * 4, max(sizes)
