"""torch.ops.memopt.adam_mini_ (AdamMini's and SlimAdam's op) on CUDA, at the op level: for every
segment kind and every kernel path of cpp/src/cuda/adam_mini*.cu, 8 steps against the CPU op on
identical inputs and against the float64 references (tests/reference/adam_mini_ref.py,
slim_adam_ref.py), comparing parameters, exp_avg and exp_avg_sq.

Every test is parametrized over the device: "emu" runs the real CUDA kernels and glue on the host
(tools/cuda_emu: an emulated CUDA runtime), so CI checks their indexing, reductions and numerics
without a GPU; "cuda" runs them on the GPU and skips without one.

Kernel paths by block (fp32; half the lengths for float64): contiguous runs of <= 256 elements
(one warp per block), <= 4096 / 8192 / 16384 (one CTA per block), longer runs (two-pass, in
pieces of 32768), every other tiling (two-pass rectangles: column blocks, strided multi-row
tiles, column parts of blocks wider than 256), elementwise (adamw.cu's kernel)."""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from conftest import assert_close, make_grads, rounding_atol, slim_adam_blocks
from cuda_util import (EMU, TOL, assert_cuda_build, non_contiguous, ops, rel_err, requires_cuda,
                       tensor_device)
from memopt_core import _C
from reference import adam_mini_ref as R
from reference.slim_adam_ref import SlimAdamRef

CUDA = pytest.param("cuda", marks=[pytest.mark.cuda, requires_cuda])
DEVICES = [EMU, CUDA]  # EMU: the CUDA kernels and glue on the host (tools/cuda_emu)
STEPS = 8
LR, BETAS, EPS, WD = 3e-3, (0.9, 0.98), 1e-6, 0.1


@dataclass
class Case:
    shape: tuple
    segs: list        # the op's segments (offset, rows, cols, row_stride, tile_rows, tile_cols)
    sets: list = None  # Adam-mini reference: the blocks as flat index sets, or
    rule: object = None  # SlimAdam reference: the averaged dims (or q,k | v parts)


def blocks(role, shape, **kw):
    return [tuple(s) for s in _C.adam_mini_blocks(role, list(shape), **kw)[0]]


def slim(shape, dims):
    return [tuple(s) for s in slim_adam_blocks(shape, dims)[0]]


def col_groups(shape, width):
    """Blocks of `width` neighbouring columns over all rows (a transposed weight's heads)."""
    idx = torch.arange(shape[0] * shape[1]).view(shape)
    return [idx[:, c:c + width].reshape(-1) for c in range(0, shape[1], width)]


def sub_tiles(shape, parts):
    """Blocks of rows [r0, r1) x cols [c0, c1), written out."""
    idx = torch.arange(shape[0] * shape[1]).view(shape)
    return [idx[r0:r1, c0:c1].reshape(-1) for r0, r1, c0, c1 in parts]


def _kinds():
    qkv = dict(head_dim=3, q_heads=2, kv_heads=1)            # q: 6 rows, k: 3, v: 3
    wide_qkv = dict(head_dim=64, q_heads=4, kv_heads=2)      # 512 outputs, heads 64 wide
    return {
        "per_head": [Case((16, 6), blocks("query", (16, 6), head_dim=4), R.per_head((16, 6), 4)),
                     Case((64, 1100), blocks("key", (64, 1100), head_dim=32),
                          R.per_head((64, 1100), 2))],                      # 35200: two pieces
        "per_row": [Case(s, blocks("mlp", s), R.per_row(s))
                    for s in [(7, 13), (3, 300), (2, 5000), (2, 9000), (1, 70000)]],
        "per_token": [Case((11, 36), blocks("embedding", (11, 36)), R.per_row((11, 36)))],
        "per_column": [Case(s, blocks("mlp", s, transposed=True), R.per_col(s))
                       for s in [(7, 13), (300, 700)]],
        "transposed_heads": [
            Case((5, 12), blocks("query", (5, 12), transposed=True, head_dim=4), col_groups((5, 12), 4)),
            Case((3, 500), blocks("query", (3, 500), transposed=True, head_dim=100),
                 col_groups((3, 500), 100)),                               # two heads a rectangle
            Case((10, 600), blocks("key", (10, 600), transposed=True, head_dim=300),
                 col_groups((10, 600), 300))],                             # parts of 256 + 44
        "fused_qkv": [Case((12, 5), blocks("qkv", (12, 5), **qkv), R.fused_qkv((12, 5), 2, 1, 3, False)),
                      Case((5, 12), blocks("qkv", (5, 12), transposed=True, **qkv),
                           R.fused_qkv((5, 12), 2, 1, 3, True)),
                      Case((40, 512), blocks("qkv", (40, 512), transposed=True, **wide_qkv),
                           R.fused_qkv((40, 512), 4, 2, 64, True))],
        "whole": [Case((5,), blocks("norm", (5,)), R.whole((5,))),
                  Case((20000,), blocks("norm", (20000,)), R.whole((20000,))),   # two-pass run
                  Case((3, 4), blocks("scalar", (3, 4)), R.whole((3, 4))),
                  Case((7,), blocks("mlp", (7,)), R.whole((7,)))],
        "elementwise": [Case((5,), blocks("bias", (5,)), R.elementwise((5,))),
                        Case((3, 4), blocks("bias", (3, 4)), R.elementwise((3, 4)))],
        "three_d": [Case((3, 4, 5), blocks("conv", (3, 4, 5)), R.per_row((3, 4, 5)))],
        "strided_tiles": [Case((6, 8), [(0, 6, 4, 8, 2, 4), (4, 6, 4, 8, 3, 4)],
                               sub_tiles((6, 8), [(0, 2, 0, 4), (2, 4, 0, 4), (4, 6, 0, 4),
                                                  (0, 3, 4, 8), (3, 6, 4, 8)]))],
        "slim_fan_in": [Case((9, 13), slim((9, 13), [1]), rule=(1,))],
        "slim_fan_out": [Case(s, slim(s, [0]), rule=(0,)) for s in [(9, 13), (300, 700)]],
        "slim_qkv": [
            Case((12, 5), list(slim_adam_blocks((12, 5), role=("qkv", False, 3, 2, 1, False))[0]),
                 rule=[(0, 0, 9, (1,)), (0, 9, 12, (0,))]),
            Case((5, 12), list(slim_adam_blocks((5, 12), role=("qkv", True, 3, 2, 1, False))[0]),
                 rule=[(1, 0, 9, (0,)), (1, 9, 12, (1,))])],
        "slim_3d": [Case((3, 4, 5), slim((3, 4, 5), [0, 2]), rule=(0, 2)),
                    Case((3, 4, 5), slim((3, 4, 5), [1]), rule=(1,))],
        # Written out: per-row blocks, then an elementwise tail (its v after the rows' blocks).
        "mixed_segments": [Case((4, 5), [(0, 2, 5, 5, 1, 5), (10, 10, 1, 1, 1, 1)],
                                R.per_row((2, 5)) + list(torch.arange(10, 20).view(-1, 1)))],
    }


KINDS = _kinds()
DTYPES = {"fp32": (torch.float32, torch.float32), "bf16": (torch.bfloat16, torch.bfloat16),
          "bf16_fp32_state": (torch.bfloat16, torch.float32),
          "fp16_fp32_state": (torch.float16, torch.float32), "fp64": (torch.float64, torch.float64)}


def _start(cases, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(c.shape, generator=gen, dtype=torch.float64).to(dtype) for c in cases]


def _n_blocks(segs):
    return sum((s[1] // s[4]) * (s[2] // s[5]) for s in segs)


def grads_of(start, steps=STEPS):
    """The gradients of every step (conftest.make_grads: per-row scales, so blocks differ)."""
    return [make_grads(start, step) for step in range(steps)]


def run_op(device, cases, start, state_dtype, grads, contiguous=True):
    """One op call per step of `grads` on `device` from `start`; returns (params, exp_avgs,
    exp_avg_sqs) on the CPU."""
    where = tensor_device(device)
    params = [p.clone().to(where) for p in start]
    ms = [torch.zeros_like(p, dtype=state_dtype) for p in params]
    vs = [torch.zeros(_n_blocks(c.segs), dtype=state_dtype, device=where) for c in cases]
    counters = [torch.zeros((), dtype=torch.float32) for _ in params]
    encoded = _C.encode_block_specs([list(c.segs) for c in cases])
    for step_grads in grads:
        g = [t.to(where) if contiguous else non_contiguous(t.to(where)) for t in step_grads]
        ops(device).adam_mini_(params, g, ms, vs, counters, encoded,
                               torch.tensor(LR, dtype=torch.float64), *BETAS, EPS, WD)
    if device == "cuda":
        torch.cuda.synchronize()
    assert all(float(c) == len(grads) for c in counters)
    return [[t.cpu() for t in ts] for ts in (params, ms, vs)]


def run_reference(cases, start, grads, storage=torch.float64):
    """The float64 references (Adam-mini's index sets, SlimAdam's dims) on the same grads;
    returns (p, m, v, p0) lists in case order."""
    mini = [i for i, c in enumerate(cases) if c.sets is not None]
    slim_ = [i for i, c in enumerate(cases) if c.sets is None]
    refs = [(R.AdamMiniRef([(start[i], cases[i].sets, True) for i in mini], lr=LR, betas=BETAS,
                           eps=EPS, weight_decay=WD, storage_dtype=storage), mini),
            (SlimAdamRef([(start[i], cases[i].rule) for i in slim_], lr=LR, betas=BETAS, eps=EPS,
                         weight_decay=WD, storage_dtype=storage), slim_)]
    for step_grads in grads:
        for ref, idx in refs:
            if idx:
                ref.step([step_grads[i] for i in idx])
    out = [[None] * len(cases) for _ in range(4)]
    for ref, idx in refs:
        for k, i in enumerate(idx):
            for j, t in enumerate((ref.p[k], ref.m[k], ref.v[k], ref.p0[k])):
                out[j][i] = t
    return out


def check(device, cases, dtype, state_dtype, contiguous=True):
    if device == "cuda":
        assert_cuda_build()
    start = _start(cases, dtype)
    grads = grads_of(start)
    ours = run_op(device, cases, start, state_dtype, grads, contiguous)
    cpu = run_op("cpu", cases, start, state_dtype, grads, contiguous)
    # (a) the CPU op on identical inputs.
    for i, c in enumerate(cases):
        for what, a, b in zip(("param", "exp_avg", "exp_avg_sq"), (o[i] for o in ours), (o[i] for o in cpu)):
            if what == "param":  # displacement, plus the rounding of the stored weights (FMA)
                assert_close(a, b, TOL[dtype], f"{c.shape} param vs the CPU op", origin=start[i],
                             atol=rounding_atol(b, STEPS))
            else:
                assert rel_err(a, b) <= TOL[dtype], f"{c.shape} {what} vs the CPU op"
    # (b) the float64 reference.
    p, m, v, p0 = run_reference(cases, start, grads)
    if dtype in (torch.float32, torch.float64):
        rtol = 1e-5 if dtype == torch.float32 else 1e-10
        for i, c in enumerate(cases):
            assert_close(ours[0][i], p[i], rtol, f"{c.shape} param", origin=p0[i],
                         atol=rounding_atol(ours[0][i], STEPS))
            assert_close(ours[1][i], m[i], rtol, f"{c.shape} exp_avg")
            assert_close(ours[2][i], v[i], rtol, f"{c.shape} exp_avg_sq")
        return
    # Low-precision storage (DESIGN): error <= 2x that of the reference run in that storage;
    # float32 state is held to float32's tolerance.
    low = run_reference(cases, start, grads, storage=dtype)
    for j, what in enumerate(("param", "exp_avg", "exp_avg_sq")):
        if j > 0 and state_dtype == torch.float32:
            for i, c in enumerate(cases):
                assert_close(ours[j][i], (m, v)[j - 1][i], 1e-5, f"{c.shape} {what}")
            continue
        cat = lambda ts: torch.cat([t.double().reshape(-1) for t in ts])  # noqa: E731
        exact = cat((p, m, v)[j])
        err, budget = (cat(ours[j]) - exact).norm().item(), (cat(low[j]) - exact).norm().item()
        assert err <= 2 * budget, f"{what}: error {err:.3e} > 2 x {dtype} reference's {budget:.3e}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtypes", list(DTYPES), ids=list(DTYPES))
@pytest.mark.parametrize("kind", list(KINDS))
def test_segment_kind(kind, dtypes, device):
    check(device, KINDS[kind], *DTYPES[dtypes])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("contiguous", [True, False], ids=["contiguous", "strided_grads"])
@pytest.mark.parametrize("dtypes", ["fp32", "bf16_fp32_state"])
def test_every_kind_in_one_call(dtypes, contiguous, device):
    """All kinds in one op call: more segments than one launch holds (26 per path) and more
    elementwise tensors than one adamw launch (24), every path batched with the others."""
    cases = [c for cs in KINDS.values() for c in cs]
    cases += [Case((n,), blocks("bias", (n,)), R.elementwise((n,))) for n in range(1, 31)]
    cases += [Case((2, n), blocks("mlp", (2, n)), R.per_row((2, n))) for n in range(3, 33)]
    cases += [Case((3, n), blocks("mlp", (3, n), transposed=True), R.per_col((3, n)))
              for n in range(2, 32)]
    check(device, cases, *DTYPES[dtypes], contiguous=contiguous)


@pytest.mark.parametrize("device", DEVICES)
def test_same_inputs_give_bitwise_identical_results(device):
    """No atomics: partial sums are added in a fixed order, so runs repeat to the bit."""
    cases = KINDS["per_column"] + KINDS["per_head"] + KINDS["whole"] + KINDS["slim_qkv"]
    start = _start(cases, torch.float32)
    grads = grads_of(start, 3)
    first, second = (run_op(device, cases, start, torch.float32, grads) for _ in range(2))
    for a, b in zip(first, second):
        assert all(torch.equal(x, y) for x, y in zip(a, b))


def _inputs(device, cases):
    start = _start(cases, torch.float32)
    params = [p.to(tensor_device(device)) for p in start]
    grads = [g.to(tensor_device(device)) for g in make_grads(start, 0)]
    ms = [torch.randn_like(p) for p in params]
    vs = [torch.rand(_n_blocks(c.segs), device=tensor_device(device)) for c in cases]
    steps = [torch.full((), 3.0) for _ in params]
    return params, grads, ms, vs, steps


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bad", ["v_length", "spec_coverage", "lr", "grad_shape"])
def test_bad_input_raises_before_any_write(bad, device):
    cases = KINDS["per_head"][:1] + KINDS["per_column"][:1] + KINDS["elementwise"][:1]
    params, grads, ms, vs, steps = _inputs(device, cases)
    specs = [list(c.segs) for c in cases]
    lr = torch.tensor(LR, dtype=torch.float64)
    if bad == "v_length":
        vs[1] = vs[1][:-1]
    elif bad == "spec_coverage":
        specs[2] = [(0, 4, 1, 1, 1, 1)]
    elif bad == "lr":
        lr = torch.tensor(-1.0, dtype=torch.float64)
    else:
        grads[2] = grads[2][:-1]
    before = [[t.clone() for t in ts] for ts in (params, ms, vs, steps)]
    with pytest.raises((ValueError, RuntimeError)):
        ops(device).adam_mini_(params, grads, ms, vs, steps, _C.encode_block_specs(specs), lr,
                               *BETAS, EPS, WD)
    for ts, olds in zip((params, ms, vs, steps), before):
        assert all(torch.equal(t, o) for t, o in zip(ts, olds))


@pytest.mark.parametrize("device", DEVICES)
def test_segments_sharing_elements_raise_on_cuda(device):
    """Interleaved segments that check_block_spec accepts (counts add up, extents may overlap)
    but that share elements: the CPU would update those twice, one segment after the other;
    the CUDA kernels update a tensor's segments at once, so the CUDA op refuses them."""
    if device == "cuda":
        assert_cuda_build()
    case = Case((4, 4), [(0, 4, 2, 4, 4, 2), (1, 4, 2, 4, 4, 2)])   # both hold column 1
    params, grads, ms, vs, steps = _inputs(device, [case])
    with pytest.raises(ValueError, match="share elements"):
        ops(device).adam_mini_(params, grads, ms, vs, steps, _C.encode_block_specs([case.segs]),
                               torch.tensor(LR, dtype=torch.float64), *BETAS, EPS, WD)


@pytest.mark.slow
@pytest.mark.parametrize("device", [CUDA])  # 21M elements: too many for the emulator
def test_elementwise_tensor_over_one_launch_matches_cpu(device):
    """A bias larger than one adamw launch holds (320 chunks of 65536 elements), between two
    small tensors: its chunks continue in the next launch. Against the CPU op (the float64
    reference's one index set per element would take minutes here)."""
    assert_cuda_build()
    n = 320 * 65536 + 1000
    cases = [KINDS["per_row"][0], Case((n,), blocks("bias", (n,))), KINDS["per_column"][0]]
    gen = torch.Generator().manual_seed(3)
    start = [torch.randn(c.shape, generator=gen) for c in cases]
    grads = [[torch.randn(c.shape, generator=gen) * 1e-2 for c in cases] for _ in range(2)]
    ours, cpu = (run_op(d, cases, start, torch.float32, grads) for d in (device, "cpu"))
    for a, b in zip(ours, cpu):
        for i, (x, y) in enumerate(zip(a, b)):
            assert rel_err(x, y, start[i] if a is ours[0] else None) <= TOL[torch.float32]
