"""AdamW's 8-bit states on CUDA (cpp/src/cuda/adamw_codes.cu) against the CPU op on the same
inputs: "emu" runs the kernel and glue on the host (tools/cuda_emu), "cuda" on a GPU (skipped
without one). Both compute in float32 and may differ in FMA contraction, so a code may land on
the other side of a rounding boundary now and then: at most 0.1% of codes differ, by one."""
from __future__ import annotations

import pytest
import torch

import memopt_core
from cuda_util import EMU, assert_cuda_build, ops, requires_cuda, tensor_device
from reference import state_codes_ref as Q

CUDA = pytest.param("cuda", marks=requires_cuda)
LR = torch.tensor(3e-3, dtype=torch.float64)
# a chunk and a partial one, one partial block, several tensors in one launch
SHAPES = [(64, 128), (4096 + 300,), (33, 250)]


def _state(shape, where):
    n = torch.Size(shape).numel()
    blocks = (n + Q.BLOCK - 1) // Q.BLOCK
    return (torch.zeros(shape, dtype=torch.int8, device=where),
            torch.zeros(shape, dtype=torch.uint8, device=where),
            torch.zeros(blocks, device=where), torch.zeros(blocks, device=where))


def _run(op, where, dtype, steps=4, rule="torch", rounding=()):
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=gen).to(dtype).to(where) for s in SHAPES]
    states = [_state(s, where) for s in SHAPES]
    counters = [torch.zeros(()) for _ in SHAPES]
    for step in range(steps):
        grads = [(torch.randn(s, generator=gen) * torch.logspace(-3, 0, s[0]).view(
            -1, *([1] * (len(s) - 1)))).to(dtype).to(where) for s in SHAPES]
        if step == 2:
            grads[1][5] = 0.0  # (a zero among the values)
        op.adamw_(params, grads, [s[0] for s in states], [s[1] for s in states], counters, LR,
                  0.9, 0.95, 1e-8, 0.1, rule, list(rounding), None,
                  [s[2] for s in states] + [s[3] for s in states])
    return params, states


# p against the CPU op's after several steps, where a code one apart on a rounding boundary
# (FMA contraction) moves its block (test_float64_steps_in_float64 checks float64 exactly)
P_TOL = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.float64: dict(rtol=1e-5, atol=1e-6),
         torch.bfloat16: dict(rtol=1e-2, atol=1e-3), torch.float16: dict(rtol=1e-2, atol=1e-3)}


@pytest.mark.parametrize("device", [EMU, CUDA])
@pytest.mark.parametrize("dtype, rule, rounding", [
    (torch.float32, "torch", ()), (torch.float32, "apollo", ()),
    (torch.bfloat16, "torch", (7, 0, 0, 1, 2)), (torch.float16, "torch", ()),
    (torch.float64, "torch", ())])
def test_adamw_8bit_kernel_matches_the_cpu_op(device, dtype, rule, rounding):
    if device == "cuda":
        assert_cuda_build()
    cpu_p, cpu_s = _run(torch.ops.memopt, "cpu", dtype, rule=rule, rounding=rounding)
    dev_p, dev_s = _run(ops(device), tensor_device(device), dtype, rule=rule, rounding=rounding)
    for a, b in zip(cpu_p, dev_p):
        torch.testing.assert_close(b.cpu(), a, **P_TOL[dtype])
    for a, b in zip(cpu_s, dev_s):
        for x, y in zip(a[:2], b[:2]):
            differ = x != y.cpu()
            assert differ.float().mean() <= 1e-3
            assert bool(((x.int() - y.cpu().int()).abs() <= 1).all())
        for x, y in zip(a[2:], b[2:]):
            torch.testing.assert_close(y.cpu(), x, rtol=1e-5, atol=0)


@pytest.mark.parametrize("device", [EMU, CUDA])
@pytest.mark.parametrize("op", ["adamw_", "adam_mini_"])
def test_float64_steps_in_float64(device, op):
    """A float64 parameter with 8-bit states computes in float64 on the device, as on the CPU:
    after two steps (codes equal: no value on a rounding boundary here) p within 1e-13, where a
    float32 computation would be 1e-8 away."""
    if device == "cuda":
        assert_cuda_build()
    out = []
    for namespace, where in ((torch.ops.memopt, "cpu"), (ops(device), tensor_device(device))):
        gen = torch.Generator().manual_seed(0)
        p = torch.randn(64, 128, generator=gen).double().to(where)
        m, v, ms, vs = _state((64, 128), where)
        v64 = torch.zeros(64, dtype=torch.float64, device=where)  # Adam-mini: a v per row
        step = torch.zeros(())
        for _ in range(2):
            g = torch.randn(64, 128, generator=gen).double().to(where)
            if op == "adamw_":
                namespace.adamw_([p], [g], [m], [v], [step], LR, 0.9, 0.95, 1e-8, 0.1,
                                 "torch", [], None, [ms, vs])
            else:
                namespace.adam_mini_([p], [g], [m], [v64], [step],
                                     [1, 0, 64, 128, 128, 1, 128], LR, 0.9, 0.95, 1e-8, 0.1, [],
                                     None, [ms])
        out.append((p.cpu(), m.cpu(), ms.cpu()))
    (p0, m0, s0), (p1, m1, s1) = out
    assert torch.equal(m1, m0) and torch.equal(s1, s0)
    torch.testing.assert_close(p1, p0, rtol=1e-13, atol=0)


def _run_frugal(op, where, dtype, steps=4):
    """frugal_ with 8-bit moments on an AdamW tensor (mode 0) and an active block (mode 1), and
    a free block (mode 2, no state) in the same call."""
    gen = torch.Generator().manual_seed(1)
    shapes = SHAPES[:2] + [(40, 64)]
    params = [torch.randn(s, generator=gen).to(dtype).to(where) for s in shapes]
    states = [_state(s, where) for s in shapes[:2]]
    empty = torch.empty(0, device=where)
    counters = [torch.zeros(()) for _ in shapes]
    for _ in range(steps):
        grads = [torch.randn(s, generator=gen).to(dtype).to(where) for s in shapes]
        op.frugal_(params, grads, [s[0] for s in states] + [empty], [s[1] for s in states] + [empty],
                   counters, [empty] * 3, [0, 1, 2], LR, 0.9, 0.95, 1e-8, 0.1, 0.5, 1.0, 2, [],
                   None, [s[2] for s in states] + [empty] + [s[3] for s in states] + [empty])
    return params, states


@pytest.mark.parametrize("device", [EMU, CUDA])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_frugal_8bit_whole_tensor_modes_match_the_cpu_op(device, dtype):
    """FRUGAL's Adam and active-block tensors with 8-bit moments take AdamW's 8-bit kernel (at
    FRUGAL's learning rates and decay); the free block its own kernel."""
    if device == "cuda":
        assert_cuda_build()
    cpu_p, cpu_s = _run_frugal(torch.ops.memopt, "cpu", dtype)
    dev_p, dev_s = _run_frugal(ops(device), tensor_device(device), dtype)
    for a, b in zip(cpu_p, dev_p):
        torch.testing.assert_close(b.cpu(), a, rtol=1e-2 if dtype != torch.float32 else 1e-5,
                                   atol=1e-3 if dtype != torch.float32 else 1e-6)
    for a, b in zip(cpu_s, dev_s):
        for x, y in zip(a[:2], b[:2]):
            assert (x != y.cpu()).float().mean() <= 1e-3
            assert bool(((x.int() - y.cpu().int()).abs() <= 1).all())
    assert any(bool(s[0].any()) for s in cpu_s)


@pytest.mark.parametrize("device", [EMU, CUDA])
def test_nan_poisons_only_its_block_on_the_device(device):
    if device == "cuda":
        assert_cuda_build()
    where = tensor_device(device)
    p, g = torch.zeros(1024, device=where), torch.ones(1024, device=where)
    g[300] = float("nan")
    m, v, ms, vs = _state((1024,), where)
    ops(device).adamw_([p], [g], [m], [v], [torch.zeros(())], LR, 0.9, 0.999, 1e-8, 0.0,
                       "torch", [], None, [ms, vs])
    assert torch.isnan(ms[1]) and torch.isnan(vs[1])
    assert not torch.isnan(ms[torch.arange(4) != 1]).any() and int(m[:256].abs().sum()) > 0


@requires_cuda
def test_front_end_adamw_8bit_on_cuda_matches_cpu():
    assert_cuda_build()
    torch.manual_seed(0)
    cpu = torch.nn.Linear(256, 512)
    gpu = torch.nn.Linear(256, 512).cuda()
    gpu.load_state_dict(cpu.state_dict())
    opts = [memopt_core.AdamW(m.parameters(), lr=1e-3, state_bits=8) for m in (cpu, gpu)]
    for _ in range(3):
        x = torch.randn(32, 256)
        for m, o in zip((cpu, gpu), opts):
            o.zero_grad()
            m(x.to(next(m.parameters()).device)).square().mean().backward()
            o.step()
    torch.testing.assert_close(gpu.weight.cpu(), cpu.weight, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("device", [EMU, CUDA])
@pytest.mark.parametrize("op", ["adamw_", "adam_mini_"])
def test_bf16_states_of_float32_params_match_the_cpu_op(device, op):
    """state_bits=16: float32 parameters with bfloat16 moments (both ops' state dispatch)."""
    if device == "cuda":
        assert_cuda_build()
    out = []
    for namespace, where in ((torch.ops.memopt, "cpu"), (ops(device), tensor_device(device))):
        gen = torch.Generator().manual_seed(0)
        p = torch.randn(96, 160, generator=gen).to(where)
        m = torch.zeros(96, 160, dtype=torch.bfloat16, device=where)
        v = torch.zeros((96, 160) if op == "adamw_" else (96,), dtype=torch.bfloat16,
                        device=where)
        step = torch.zeros(())
        for _ in range(3):
            g = torch.randn(96, 160, generator=gen).to(where)
            if op == "adamw_":
                namespace.adamw_([p], [g], [m], [v], [step], LR, 0.9, 0.95, 1e-8, 0.1)
            else:  # one block per row
                namespace.adam_mini_([p], [g], [m], [v], [step], [1, 0, 96, 160, 160, 1, 160],
                                     LR, 0.9, 0.95, 1e-8, 0.1)
        out.append((p.cpu(), m.cpu().float(), v.cpu().float()))
    for a, b in zip(*out):
        torch.testing.assert_close(b, a, rtol=1e-2, atol=1e-5)


# Adam-mini's 8-bit m (two-pass update in units of whole code blocks): (shape, segments), a
# segment (offset, rows, cols, row_stride, tile_rows, tile_cols) as partition.h has it.
GEOMETRIES = {
    "per row": ((48, 512), [(0, 48, 512, 512, 1, 512)]),
    "per head": ((64, 256), [(0, 64, 256, 256, 16, 256)]),
    "per column": ((40, 512), [(0, 40, 512, 512, 40, 1)]),
    "strided halves": ((32, 1024), [(0, 32, 512, 1024, 1, 512), (512, 32, 512, 1024, 32, 64)]),
    "one run, partial last block": ((3000,), [(0, 1, 3000, 3000, 1, 3000)]),
}


@pytest.mark.parametrize("device", [EMU, CUDA])
@pytest.mark.parametrize("geometry", list(GEOMETRIES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_adam_mini_8bit_m_kernel_matches_the_cpu_op(device, geometry, dtype):
    if device == "cuda":
        assert_cuda_build()
    shape, segs = GEOMETRIES[geometry]
    blocks = [len(segs)] + [x for seg in segs for x in seg]
    nblocks = sum(rows // tr * (cols // tc) for _, rows, cols, _, tr, tc in segs)
    out = []
    for namespace, where in ((torch.ops.memopt, "cpu"), (ops(device), tensor_device(device))):
        gen = torch.Generator().manual_seed(0)
        p = torch.randn(shape, generator=gen).to(dtype).to(where)
        m = torch.zeros(shape, dtype=torch.int8, device=where)
        v = torch.zeros(nblocks, dtype=dtype, device=where)
        ms = torch.zeros((p.numel() + 255) // 256, device=where)
        step = torch.zeros(())
        for _ in range(3):
            g = (torch.randn(shape, generator=gen) *
                 torch.logspace(-2, 0, shape[-1])).to(dtype).to(where)
            namespace.adam_mini_([p], [g], [m], [v], [step], blocks, LR, 0.9, 0.95, 1e-8, 0.1,
                                 [], None, [ms])
        out.append((p.cpu(), m.cpu(), v.cpu(), ms.cpu()))
    (p0, m0, v0, s0), (p1, m1, v1, s1) = out
    torch.testing.assert_close(p1, p0, **P_TOL[dtype])
    torch.testing.assert_close(v1, v0, rtol=1e-5, atol=0)
    torch.testing.assert_close(s1, s0, rtol=1e-5, atol=0)
    assert (m1 != m0).float().mean() <= 1e-3 and bool(((m1.int() - m0.int()).abs() <= 1).all())


@pytest.mark.parametrize("device", [EMU, CUDA])
def test_adam_mini_8bit_m_refuses_unaligned_block_rows_on_the_device(device):
    if device == "cuda":
        assert_cuda_build()
    where = tensor_device(device)
    p = torch.randn(48, 100, device=where)
    before = p.clone()
    m = torch.zeros(48, 100, dtype=torch.int8, device=where)
    with pytest.raises(NotImplementedError, match="whole code blocks"):
        ops(device).adam_mini_([p], [torch.ones_like(p)], [m], [torch.zeros(48, device=where)],
                               [torch.zeros(())],  # two halves: a code block spans both
                               [2, 0, 24, 100, 100, 1, 100, 2400, 24, 100, 100, 1, 100], LR, 0.9,
                               0.95, 1e-8, 0.0, [], None, [torch.zeros(19, device=where)])
    assert torch.equal(p, before)


@requires_cuda
@pytest.mark.parametrize("name", ["adam_mini", "apollo_mini"])
def test_front_end_8bit_states_on_cuda_match_cpu(name):
    """AdamMini (8-bit m) and ApolloMini (8-bit AdamW groups, per-token v for the embeddings)
    through the front end on a GPU against the same run on the CPU."""
    from conftest import make_grads, make_llama, set_grads
    assert_cuda_build()
    cpu = make_llama(vocab_size=256, intermediate_size=256)
    gpu = make_llama(vocab_size=256, intermediate_size=256).cuda()
    kw = dict(lr=1e-3, state_bits=8) | ({"embeddings": "adam_mini"} if name == "apollo_mini" else {})
    opts = [memopt_core.make_optimizer(name, m, **kw) for m in (cpu, gpu)]
    for step in range(3):
        grads = make_grads(list(cpu.parameters()), step)
        set_grads(list(cpu.parameters()), grads)
        set_grads(list(gpu.parameters()), [g.cuda() for g in grads])
        for o in opts:
            o.step()
    for a, b in zip(cpu.parameters(), gpu.parameters()):
        torch.testing.assert_close(b.cpu(), a, rtol=1e-4, atol=1e-5)
