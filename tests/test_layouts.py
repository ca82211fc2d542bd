"""Non-contiguous parameters (issue 17): every optimizer steps a model whose parameters are a
channels_last conv weight, a transposed (dense, column-major) linear weight and a view with gaps
exactly as it steps the same model held contiguously (the oracle), on the CPU ops and on the CUDA
kernels and glue (the host-emulated "emu" device). Also: channels_last takes no parameter-sized
copy, overlapping (expanded) parameters are refused with nothing written, state is created in
the parameter's layout and a contiguous checkpoint loads into a channels_last model, and the
LibTorch classes accept the same layouts.

Bit-for-bit where the arithmetic per element is the same in both runs (AdamW, APOLLO, FRUGAL: the
layout only changes which memory an element lives in, or the tensor is staged in logical order).
Adam-mini and SlimAdam sum g^2 over each block in memory order, which for a channels_last block
is another order of the same terms: equal to float rounding (rtol 1e-6 on float32)."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import memopt_core
from memopt_core import _C
from cuda_util import EMU, TOL, ops, rel_err

OPTIMIZERS = sorted(memopt_core.OPTIMIZERS)
REORDERING = {"adam_mini", "slim_adam"}  # block sums taken in memory order (see docstring)
OP_NAMES = ("adamw_", "adam_mini_", "apollo_", "frugal_")
HP = dict(lr=1e-2, weight_decay=0.1)
EXTRA = dict(frugal=dict(density=0.5, seed=0), apollo=dict(rank=2))


class Net(nn.Module):
    """Names the role inference understands: a conv, two MLP weights, a norm."""

    def __init__(self, conv=(8, 3, 3)):
        super().__init__()
        self.conv = nn.Conv2d(conv[1], conv[0], conv[2])
        self.mlp = nn.Module()
        self.mlp.up_proj = nn.Linear(12, 16)
        self.mlp.down_proj = nn.Linear(16, 12, bias=False)
        self.norm = nn.LayerNorm(12)


def contiguous_net(seed=0, **kw) -> Net:
    torch.manual_seed(seed)
    return Net(**kw)


def strided_net(oracle: Net, gapped=True) -> Net:
    """The oracle's values in non-contiguous layouts: channels_last conv weight, a transposed
    up_proj weight, and (gapped) a down_proj weight that is every other column of a wider tensor."""
    net = copy.deepcopy(oracle).to(memory_format=torch.channels_last)
    w = oracle.mlp.up_proj.weight.detach()
    net.mlp.up_proj.weight = nn.Parameter(w.t().contiguous().t())
    if gapped:
        d = oracle.mlp.down_proj.weight.detach()
        wide = torch.full((d.shape[0], 2 * d.shape[1]), float("nan"))
        wide[:, ::2] = d
        net.mlp.down_proj.weight = nn.Parameter(wide[:, ::2])
    assert net.conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert not net.conv.weight.is_contiguous() and not net.mlp.up_proj.weight.is_contiguous()
    return net


def make(name, model, **kw):
    return memopt_core.OPTIMIZERS[name].make(model, **{**HP, **EXTRA.get(name, {}), **kw})


def step_both(name, oracle, net, steps=4, net_ops=None, **kw):
    """Steps an optimizer on each model with the same gradients: in the parameter's own layout
    on even steps (what autograd produces), contiguous on odd steps (staged in its memory order).
    net_ops: the op namespace the strided model's optimizer runs on (default torch.ops.memopt)."""
    opts = [make(name, oracle, **kw), make(name, net, **kw)]
    gen = torch.Generator().manual_seed(1)
    for t in range(steps):
        for p, q in zip(oracle.parameters(), net.parameters()):
            g = torch.randn(p.shape, generator=gen) * 1e-1
            p.grad = g.clone()
            q.grad = torch.empty_like(q).copy_(g) if t % 2 == 0 else g.clone()
        opts[0].step()
        with pytest.MonkeyPatch.context() as patch:
            for op in OP_NAMES if net_ops else ():
                getattr(torch.ops.memopt, op)  # resolved first, so that the patch is undone
                patch.setattr(torch.ops.memopt, op, getattr(net_ops, op))
            opts[1].step()
    return opts


def assert_same(name, oracle, net, opts, exact=True, cuda=False):
    """Parameters and every state tensor equal: bit for bit (exact), to float rounding of a
    reordered sum (rtol 1e-6), or (cuda) within tests/test_cuda_*.py's norm-wise tolerance."""
    def check(actual, expected, what):
        if cuda:
            assert rel_err(actual, expected) <= TOL[torch.float32], what
        else:
            tol = dict(rtol=0, atol=0) if exact else dict(rtol=1e-6, atol=1e-9)
            torch.testing.assert_close(actual, expected, **tol, msg=lambda m: f"{what}: {m}")
    for (n, p), q in zip(oracle.named_parameters(), net.parameters()):
        check(q, p, f"{name} {n}")
        mine, theirs = opts[1].state.get(q, {}), opts[0].state.get(p, {})
        assert set(mine) == set(theirs), (name, n)
        for key, ref in theirs.items():
            if isinstance(ref, torch.Tensor):
                check(mine[key], ref, f"{name} {n} {key}")


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_strided_params_step_like_the_contiguous_oracle(name):
    oracle = contiguous_net()
    net = strided_net(oracle)
    opts = step_both(name, oracle, net)
    assert_same(name, oracle, net, opts, exact=name not in REORDERING)


@pytest.mark.parametrize("name", OPTIMIZERS)
@pytest.mark.parametrize("device", [EMU])
def test_cuda_kernels_step_strided_params_like_the_cpu_oracle(name, device):
    """The CUDA glue and kernels (emulated on the host) on the strided model against the CPU ops
    on the contiguous oracle: equal to float rounding (FMA contraction and reduction order
    differ between the kernels, as in tests/test_cuda_*.py)."""
    oracle = contiguous_net()
    net = strided_net(oracle)
    opts = step_both(name, oracle, net, steps=3, net_ops=ops(device))
    assert_same(name, oracle, net, opts, cuda=True)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_state_follows_the_parameter_layout(name):
    """Full-size state of a dense parameter has the parameter's strides (so the update is one
    pass over memory); a gapped parameter's state is contiguous (it has no dense layout)."""
    oracle = contiguous_net()
    net = strided_net(oracle)
    opt = step_both(name, oracle, net, steps=1)[1]
    for n, q in net.named_parameters():
        for key, s in opt.state.get(q, {}).items():
            if isinstance(s, torch.Tensor) and s.shape == q.shape and q.dim() > 1:
                want = q.stride() if n != "mlp.down_proj.weight" else s.contiguous().stride()
                assert s.stride() == want, (name, n, key, s.stride())


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_channels_last_takes_no_parameter_sized_copy(name):
    """A big channels_last conv weight is updated in its memory order: no allocation during step
    and no parameter-sized scratch or staging. The one documented exception: SlimAdam keeps a
    conv weight uncompressed (plain Adam), whose 1-D v is in logical order and is staged in the
    weight's memory order (memopt/adam_mini.h, AdamMiniLayouts): one state-sized buffer, reused."""
    from test_optimizer_contract import _allocations_during
    net = strided_net(contiguous_net(conv=(64, 64, 5)), gapped=False)
    net.mlp.up_proj.weight = nn.Parameter(net.mlp.up_proj.weight.detach().contiguous())
    opt = make(name, net)
    largest = net.conv.weight.numel() * 4
    _C.workspace_release("cpu")
    for t in range(2):
        for p in net.parameters():
            p.grad = torch.empty_like(p).normal_()
        sizes = _allocations_during(opt.step) if t else opt.step()
    assert max(sizes, default=0) < 0.01 * largest, f"{name}: allocation during step"
    declared = opt.scratch_bytes() if hasattr(opt, "scratch_bytes") else 0
    scratch = _C.workspace_stats("cpu")[0]
    assert scratch < 0.01 * largest + declared, f"{name}: {scratch}-byte scratch"
    staging = _C.workspace_stats("cpu", staging=True)[0]
    allowed = largest if name == "slim_adam" else 0
    assert staging <= allowed + 64, f"{name}: {staging}-byte staging"


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_overlapping_parameter_is_refused_and_nothing_changes(name):
    oracle = contiguous_net()
    oracle.mlp.down_proj.weight = nn.Parameter(torch.randn(1, 16).expand(12, 16))
    opt = make(name, oracle)
    for p in oracle.parameters():
        p.grad = torch.randn(p.shape)
    before = [p.detach().clone() for p in oracle.parameters()]
    with pytest.raises(ValueError, match="overlap"):
        opt.step()
    assert all(torch.equal(p, b) for p, b in zip(oracle.parameters(), before))
    assert not any(torch.is_tensor(s) and s.abs().sum() > 0
                   for st in opt.state.values() for k, s in st.items() if k != "step")


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_contiguous_checkpoint_loads_into_channels_last_model(name):
    """A state_dict saved by the contiguous model loads into the channels_last one (copied into
    the existing layout) and both go on alike; and a channels_last state_dict round-trips."""
    oracle = contiguous_net()
    net = strided_net(oracle, gapped=False)
    opts = step_both(name, oracle, net, steps=2)
    resumed = make(name, net)
    resumed.load_state_dict(copy.deepcopy(opts[0].state_dict()))
    for q in net.parameters():
        for key, s in resumed.state.get(q, {}).items():
            if torch.is_tensor(s) and s.shape == q.shape and q.dim() > 1:
                assert s.stride() == q.stride(), (name, key)
    round_trip = make(name, copy.deepcopy(net))
    round_trip.load_state_dict(resumed.state_dict())
    opts = [opts[0], resumed]
    gen = torch.Generator().manual_seed(5)
    for p, q in zip(oracle.parameters(), net.parameters()):
        g = torch.randn(p.shape, generator=gen)
        p.grad, q.grad = g.clone(), torch.empty_like(q).copy_(g)
    for opt in opts:
        opt.step()
    assert_same(name, oracle, net, opts, exact=name not in REORDERING)


@pytest.mark.parametrize("name", ["adamw", "adam_mini"])
def test_libtorch_classes_accept_strided_params(cpp_runner, name):
    """memopt::AdamW / AdamMini (driven through cpp/tests/optimizer_runner) step channels_last and
    transposed weights, with gradients in the same layouts, like contiguous ones."""
    from cpp_runner import job, step
    gen = torch.Generator().manual_seed(0)
    names, shapes = ["conv.weight", "mlp.up_proj.weight"], [(8, 3, 3, 3), (16, 12)]
    plain = [torch.randn(s, generator=gen) for s in shapes]
    strided = [plain[0].to(memory_format=torch.channels_last), plain[1].t().contiguous().t()]
    grads = [[torch.randn(s, generator=gen) for s in shapes] for _ in range(3)]
    in_layout = [[torch.empty_like(p).copy_(g) for p, g in zip(strided, gs)] for gs in grads]
    contiguous, laid_out = cpp_runner(
        job(name, zip(names, plain), {"lr": 1e-2}, [step(g) for g in grads]),
        job(name, zip(names, strided), {"lr": 1e-2}, [step(g) for g in in_layout]))
    for t, (a, b) in enumerate(zip(contiguous, laid_out)):
        for p, x, y in zip(strided, a["params"], b["params"]):
            assert y.stride() == p.stride()  # the runner stepped the layout it was given
            torch.testing.assert_close(y, x, rtol=1e-6, atol=0, msg=lambda m: f"step {t}: {m}")


def test_opcheck_on_strided_params():
    """Schema, fake (Meta) and dispatch checks of adamw_ and adam_mini_ on a channels_last, a
    transposed and a gapped parameter, with state in the parameter's layout where it is dense."""
    gen = torch.Generator().manual_seed(0)
    conv = torch.randn(4, 3, 2, 2, generator=gen).to(memory_format=torch.channels_last)
    params = [conv, torch.randn(6, 5, generator=gen).t(), torch.randn(5, 8, generator=gen)[:, ::2]]
    grads = [torch.randn(p.shape, generator=gen) for p in params]
    m = [torch.zeros_like(p) for p in params]
    steps = [torch.zeros(()) for _ in params]
    lr = torch.tensor(1e-3)
    torch.library.opcheck(torch.ops.memopt.adamw_.default,
                          (params, grads, m, [torch.zeros_like(p) for p in params], steps, lr,
                           0.9, 0.999, 1e-8, 0.01))
    specs = [_C.adam_mini_blocks("conv", list(p.shape))[0] if p.dim() == 4
             else _C.adam_mini_blocks("mlp", list(p.shape))[0] for p in params]
    v = [torch.zeros(p.shape[0]) for p in params]
    torch.library.opcheck(torch.ops.memopt.adam_mini_.default,
                          (params, grads, m, v, steps, _C.encode_block_specs(specs), lr, 0.9,
                           0.999, 1e-8, 0.0))


@pytest.mark.parametrize("layout", ["channels_last", "gapped"])
def test_adam_mini_shard_ops_on_a_strided_shard(layout):
    """FSDP2's Adam-mini shard ops (block sums, then the update) on rows 4..7 of a conv weight
    held channels_last (stepped in memory order) or with gaps (staged), against the same shard
    held contiguously: equal to float rounding of the reordered block sums."""
    gen = torch.Generator().manual_seed(0)
    full = torch.randn(8, 3, 2, 2, generator=gen)
    spec = _C.encode_block_specs([_C.adam_mini_blocks("conv", list(full.shape))[0]])
    shards, results = [4 * 12, full.numel()], []
    for strided in (False, True):
        p = full[4:].clone()
        if strided:
            p = (p.to(memory_format=torch.channels_last) if layout == "channels_last"
                 else torch.stack([p, torch.full_like(p, float("nan"))], -1)[..., 0])
        m, v, step = torch.zeros_like(p), torch.zeros(8), torch.zeros(())
        g2 = torch.Generator().manual_seed(1)
        for _ in range(3):
            g = torch.empty_like(p).copy_(torch.randn(p.shape, generator=g2))
            sums = torch.zeros(8, dtype=torch.float64)
            torch.ops.memopt.adam_mini_block_sums_([g], spec, shards, sums)
            torch.ops.memopt.adam_mini_shard_update_([p], [g], [m], [v], [step], spec, shards,
                                                     sums, torch.tensor(1e-2), 0.9, 0.99, 1e-8, 0.1)
        results.append((p, m, v))
    for ours, ref in zip(results[1], results[0]):
        torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-9)
