"""Row-sharded FRUGAL ops (memopt::frugal_shard_stats_ / frugal_shard_update_), in one process:
every weight is cut into 1..4 row shards (uneven, some empty), the statistics op runs on every
shard, the buffers are summed by hand (what the front end's all-reduce does), the update op
finishes every shard. Parameters and every state tensor must equal the whole-tensor frugal_ op's
over 6 steps with re-selections (fresh P, zeroed moments) at steps 0, 2 and 4, for each
projection selection, fp64 and fp32. One call mixes two left and one right projection and an
AdamW tensor, so the statistics layout of several tensors and the modes around them are
exercised. The CUDA ops (on a GPU, or their glue on the emulated device) run the same shards
against the same whole-tensor CPU op."""
from __future__ import annotations

import pytest
import torch

from memopt_core import _C
from cuda_util import EMU, TOL as CUDA_TOL, assert_cuda_build, ops, requires_cuda, tensor_device

ADAM, RIGHT, LEFT = 0, 6, 7
STEPS, GAP, LR, WD = 6, 2, 1e-2, 0.1
# (shape, mode, rank): two left (rows < cols), one right (rows >= cols), one AdamW tensor
TENSORS = [((6, 10), LEFT, 2), ((5, 9), LEFT, 3), ((10, 4), RIGHT, 2), ((7, 3), ADAM, 0)]
SPLITS = {  # rows per shard for 1..4 shards: FSDP2's chunking (trailing empty) and others
    5: [[5], [3, 2], [0, 4, 1], [2, 2, 1, 0]], 6: [[6], [1, 5], [2, 2, 2], [0, 3, 0, 3]],
    10: [[10], [5, 5], [4, 0, 6], [3, 3, 3, 1]], 7: [[7], [4, 3], [3, 3, 1], [2, 2, 2, 1]]}
TOL = {torch.float64: 1e-12, torch.float32: 2e-5}
HP = (0.9, 0.999, 1e-8, WD, 1.0, 0.5, 2)  # betas, eps, wd, proj / state-free lr scales, sign_sgd


def _lr():
    return torch.tensor(LR, dtype=torch.float64)


def _grads(step, dtype):
    gen = torch.Generator().manual_seed(100 + step)
    out = []
    for shape, _, _ in TENSORS:
        g = torch.randn(shape, generator=gen, dtype=torch.float64)
        out.append((g * torch.exp(torch.randn(shape[0], 1, generator=gen, dtype=torch.float64))
                    * (0.5 + step % 3)).to(dtype))
    return out


def _moments(shape, mode, r, dtype):
    rows, cols = shape
    m = {ADAM: shape, RIGHT: (rows, r), LEFT: (r, cols)}[mode]
    return torch.zeros(m, dtype=dtype), torch.zeros(m, dtype=dtype)


def _rows(t, a, n):
    return t.narrow(0, a, n).clone()


def _relerr(a, b):
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item() if b.numel() else 0.0


def _run(selection, dtype, n_shards, ns=torch.ops.memopt, device="cpu"):
    """Max relative error of the shard ops (`ns`, on `device`; steps stay on the CPU) against
    frugal_ on the whole tensors (CPU)."""
    dev = (lambda t: t.to(device)) if device != "cpu" else (lambda t: t)
    gen = torch.Generator().manual_seed(0)
    whole = [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype) for s, _, _ in TENSORS]
    modes = [mode for _, mode, _ in TENSORS]
    cuts = [[sum(SPLITS[s[0]][n_shards - 1][:k]) for k in range(n_shards + 1)] for s, _, _ in TENSORS]
    shard_p = [[dev(_rows(p, c[k], c[k + 1] - c[k])) for p, c in zip(whole, cuts)]
               for k in range(n_shards)]
    rng = torch.Generator().manual_seed(5).get_state()
    empty = torch.empty(0, dtype=dtype)
    for step in range(STEPS):
        grads = _grads(step, dtype)
        if step % GAP == 0:  # re-selection: a new P from the full gradient, moments restart
            subs = []
            for (shape, mode, r), g in zip(TENSORS, grads):
                if mode == ADAM:
                    subs.append(empty)
                    continue
                P, rng = _C.frugal_projection(g, r, mode == RIGHT, selection, rng)
                subs.append(P)
            w_state = [_moments(s, m, r, dtype) + (torch.zeros(1),) for s, m, r in TENSORS]
            # a shard's right moments are its rows, its left moments a whole copy
            s_state = [[(dev(_rows(m, c[k], c[k + 1] - c[k])), dev(_rows(v, c[k], c[k + 1] - c[k])),
                         st.clone())
                        if mode in (RIGHT, ADAM) else (dev(m.clone()), dev(v.clone()), st.clone())
                        for (m, v, st), (_, mode, _), c in zip(w_state, TENSORS, cuts)]
                       for k in range(n_shards)]
        torch.ops.memopt.frugal_(whole, grads, [s[0] for s in w_state], [s[1] for s in w_state],
                                 [s[2] for s in w_state], subs, modes, _lr(), *HP)
        calls = []
        for k in range(n_shards):
            g = [dev(_rows(gr, c[k], c[k + 1] - c[k])) for gr, c in zip(grads, cuts)]
            sub = [dev(_rows(P, c[k], c[k + 1] - c[k]) if mode == LEFT else P)
                   for P, (_, mode, _), c in zip(subs, TENSORS, cuts)]
            st = s_state[k]
            args = [shard_p[k], g, [s[0] for s in st], [s[1] for s in st], [s[2] for s in st],
                    sub, modes]
            stats = torch.full((_C.frugal_shard_stats_numel(args[2], modes),), float("nan"),
                               dtype=torch.float64, device=device)
            before = [p.clone() for p in shard_p[k]] + [t.clone() for s in st for t in s]
            ns.frugal_shard_stats_(*args, stats, _lr(), *HP)
            after = list(shard_p[k]) + [t for s in st for t in s]
            assert all(torch.equal(a, b) for a, b in zip(before, after))  # writes only stats
            calls.append((args, stats))
        total = sum(s for _, s in calls)  # the all-reduce
        for args, _ in calls:
            ns.frugal_shard_update_(*args, total, _lr(), *HP)
    errs = []
    for i, (p, c) in enumerate(zip(whole, cuts)):
        errs.append(_relerr(torch.cat([shard_p[k][i].cpu() for k in range(n_shards)]), p))
        for j in range(3):
            want = w_state[i][j]
            if modes[i] in (RIGHT, ADAM) and j < 2:
                errs.append(_relerr(torch.cat([s_state[k][i][j].cpu() for k in range(n_shards)]),
                                    want))
            else:  # replicated: every shard holds the whole value
                errs += [_relerr(s_state[k][i][j].cpu(), want) for k in range(n_shards)]
    return max(errs)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("selection", ["svd", "random", "randperm"])
@pytest.mark.parametrize("n_shards", [1, 2, 3, 4])
def test_shards_equal_whole_tensor_op(selection, dtype, n_shards):
    assert _run(selection, dtype, n_shards) <= TOL[dtype]


def _one_shard_args(stats_numel=None):
    """A 2-row shard of the (6, 10) left tensor and a right tensor, with stats."""
    g = torch.Generator().manual_seed(1)
    p = [torch.randn(2, 10, generator=g, dtype=torch.float64),
         torch.randn(3, 4, generator=g, dtype=torch.float64)]
    grads = [torch.randn_like(t) for t in p]
    m = [torch.zeros(2, 10, dtype=torch.float64), torch.zeros(3, 2, dtype=torch.float64)]
    subs = [torch.randn(2, 2, dtype=torch.float64), torch.randn(2, 4, dtype=torch.float64)]
    n = 20 if stats_numel is None else stats_numel
    return [p, grads, m, [t.clone() for t in m], [torch.zeros(1), torch.zeros(1)], subs,
            [LEFT, RIGHT], torch.zeros(n, dtype=torch.float64), _lr(), *HP]


def test_shard_ops_pass_opcheck():
    for op in (torch.ops.memopt.frugal_shard_stats_, torch.ops.memopt.frugal_shard_update_):
        torch.library.opcheck(op.default, _one_shard_args())


@pytest.mark.parametrize("bad", ["stats_size", "stats_dtype", "left_proj_rows", "lr"])
def test_bad_input_raises_and_writes_nothing(bad):
    args = _one_shard_args(19 if bad == "stats_size" else None)
    if bad == "stats_dtype":
        args[7] = args[7].float()
    if bad == "left_proj_rows":  # P's rows must be the shard's rows
        args[5][0] = torch.randn(3, 2, dtype=torch.float64)
    if bad == "lr":
        args[8] = torch.tensor(-1.0, dtype=torch.float64)
    args[7].fill_(7.0)
    before = [t.clone() for t in args[0] + args[2] + args[3] + args[4] + [args[7]]]
    for check in (torch.ops.memopt.check_frugal_shard_update_, torch.ops.memopt.frugal_shard_stats_,
                  torch.ops.memopt.frugal_shard_update_):
        with pytest.raises(ValueError):
            check(*args)
    after = args[0] + args[2] + args[3] + args[4] + [args[7]]
    assert all(torch.equal(a, b) for a, b in zip(before, after))


@pytest.mark.parametrize("device", [EMU, pytest.param("cuda", marks=requires_cuda)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("selection", ["svd", "random", "randperm"])
def test_gpu_shards_equal_whole_tensor_op(selection, dtype, device):
    """The CUDA shard ops on 1..3 shards against the whole-tensor CPU op, within the CPU-vs-CUDA
    tolerance of the dtype (cuda_util.TOL)."""
    if device == "cuda":
        assert_cuda_build()
    for n_shards in (1, 2, 3):
        err = _run(selection, dtype, n_shards, ops(device), tensor_device(device))
        assert err <= CUDA_TOL[dtype], (n_shards, err)


@pytest.mark.parametrize("device", [EMU, pytest.param("cuda", marks=requires_cuda)])
def test_gpu_bad_input_raises_and_writes_nothing(device):
    """The CUDA ops run the CPU op's validator first: stats of the wrong size (or, on a GPU,
    on the CPU) raise and leave every tensor untouched."""
    dev = tensor_device(device)
    args = _one_shard_args(19)
    args[:4] = [[t.to(dev) for t in a] for a in args[:4]]
    args[5] = [t.to(dev) for t in args[5]]
    args[7] = args[7].to(dev)
    before = [t.clone() for t in args[0] + args[2] + args[3]]
    for op in (ops(device).frugal_shard_stats_, ops(device).frugal_shard_update_):
        with pytest.raises(ValueError, match="stats must be"):
            op(*args)
    assert all(torch.equal(a, b) for a, b in zip(before, args[0] + args[2] + args[3]))
