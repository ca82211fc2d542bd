"""torch.ops.memopt.apollo_ on CUDA (cpp/src/cuda/apollo.cu) against the CPU op on identical
inputs and against the float64 paper reference (tests/reference/apollo_ref.py): parameters, both
moments, P, the seed chain, the limiter norm and the steps, over 9 steps with projection
refreshes at steps 0, 3 and 6, several odd-sized tensors of both projection sides per call.

Every comparison is parametrized over the device: "emu" runs the real CUDA kernels and glue on
the host (tools/cuda_emu: an emulated CUDA runtime; cuBLAS is replaced by the CPU matmul), so CI
checks them without a GPU; "cuda" runs them on a GPU build and skips without one."""
from __future__ import annotations

import pytest
import torch

from conftest import assert_close, make_grads
from cuda_util import (EMU, TOL, assert_cuda_build, non_contiguous, ops, rel_err, requires_cuda,
                       tensor_device)
from memopt_core import _C
from reference import apollo_ref as R

CUDA = pytest.param("cuda", marks=[pytest.mark.cuda, requires_cuda])
DEVICES = [EMU, CUDA]  # EMU: the CUDA kernels and glue on the host (tools/cuda_emu)
STEPS, GAP, RANK = 9, 3, 4
# wide (Left: per-column channels), tall (Right: per-row), square, and thin odd ones
SHAPES = [(24, 40), (40, 24), (33, 33), (7, 61), (61, 7)]
HP = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-6, weight_decay=0.05)
BASE = dict(rank=RANK, proj="random", proj_type="std", scale_type="channel", update_proj_gap=GAP,
            scale=1.0, norm_growth_limit=1.01, scale_front=False, store=True)
CASES = {
    "channel": {},
    "channel_no_limiter": dict(norm_growth_limit=0.0),
    "tensor": dict(scale_type="tensor"),
    "tensor_no_limiter": dict(scale_type="tensor", norm_growth_limit=0.0),
    "mini_scale_front": dict(rank=1, scale_type="tensor", scale=128.0, scale_front=True),
    "mini_not_stored": dict(rank=1, scale_type="tensor", scale=128.0, store=False),
    "channel_not_stored": dict(store=False),
    "svd_channel": dict(proj="svd"),
    "svd_tensor_no_limiter": dict(proj="svd", scale_type="tensor", norm_growth_limit=0.0),
    "reverse_std": dict(proj_type="reverse_std"),
    "always_left_rank_over_min_dim": dict(proj_type="left", rank=9),
    "always_right": dict(proj_type="right", scale_front=True, scale=4.0),
}


@pytest.fixture(params=DEVICES)
def device(request):
    if request.param == "cuda":
        assert_cuda_build()
    return request.param


def _initial(dtype, shapes, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype) for s in shapes]


class Run:
    """One op call per step on `device`, with state laid out as memopt_core.Apollo keeps it
    (moments of R's shape, P, int64 seeds 1..n, limiter norms -1, float32 CPU steps)."""

    def __init__(self, device, dtype, shapes=SHAPES, state_dtype=None, host_scalars=False, **case):
        self.cfg = {**BASE, **case}
        self.ops = ops(device)
        device = tensor_device(device)
        self.start = _initial(dtype, shapes)
        self.params = [p.clone().to(device) for p in self.start]
        scalars = "cpu" if host_scalars else device
        c = self.cfg
        self.m, self.v, self.projs, self.seeds, self.norms = [], [], [], [], []
        for i, p in enumerate(self.params):
            proj = _C.Projector(c["proj"], c["proj_type"], c["rank"], list(p.shape))
            for lst in (self.m, self.v):
                lst.append(torch.zeros(proj.low_rank_shape, dtype=state_dtype or dtype,
                                       device=device))
            if c["store"]:
                self.projs.append(torch.zeros(proj.proj_shape, dtype=dtype, device=device))
            if c["proj"] == "random":
                self.seeds.append(torch.tensor(i + 1, dtype=torch.int64, device=scalars))
            norm_dtype = torch.float64 if dtype == torch.float64 else torch.float32
            self.norms.append(torch.tensor(-1.0, dtype=norm_dtype, device=scalars))
        self.steps = [torch.zeros((), dtype=torch.float32) for _ in self.params]

    def args(self, grads):
        c = self.cfg
        return (self.params, grads, self.m, self.v, self.projs, self.seeds, self.norms, self.steps,
                torch.tensor(HP["lr"], dtype=torch.float64), *HP["betas"], HP["eps"],
                HP["weight_decay"], c["rank"], c["proj"], c["proj_type"], c["scale_type"],
                c["update_proj_gap"], c["scale"], c["norm_growth_limit"], c["scale_front"])

    def step(self, grads):
        self.ops.apollo_(*self.args(grads))

    def run(self, steps=STEPS, contiguous=True):
        for step in range(steps):
            grads = [g.to(p.device) for g, p in zip(make_grads(self.start, step), self.params)]
            self.step(grads if contiguous else [non_contiguous(g) for g in grads])
        if any(p.is_cuda for p in self.params):
            torch.cuda.synchronize()
        return self


def assert_runs_match(got: Run, want: Run, dtype):
    """`got` (any device) against `want` (the CPU op) within the CUDA-vs-CPU rounding budget;
    P, seeds and steps exactly (P is drawn, or decomposed, on the host in both)."""
    tol = TOL[dtype]
    for i, (pg, pw, p0) in enumerate(zip(got.params, want.params, want.start)):
        assert rel_err(pg, pw, origin=p0) <= tol, f"param {i}"
        assert rel_err(got.m[i], want.m[i]) <= tol, f"exp_avg {i}"
        assert rel_err(got.v[i], want.v[i]) <= tol, f"exp_avg_sq {i}"
        if got.projs:
            assert torch.equal(got.projs[i].cpu(), want.projs[i]), f"P {i}"
        if got.seeds:
            assert int(got.seeds[i]) == int(want.seeds[i]), f"seed {i}"
        assert float(got.steps[i]) == float(want.steps[i]) == STEPS
        if want.cfg["norm_growth_limit"]:
            assert rel_err(got.norms[i], want.norms[i]) <= tol, f"limiter norm {i}"
        else:
            assert float(got.norms[i]) == -1.0


# ---- CUDA against the CPU op -----------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16],
                         ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_cpu_op(device, case, dtype):
    got = Run(device, dtype, **CASES[case]).run()
    assert_runs_match(got, Run("cpu", dtype, **CASES[case]).run(), dtype)


@pytest.mark.parametrize("case", ["channel", "mini_not_stored", "svd_channel"])
def test_strided_grads_match_contiguous_on_cpu(device, case):
    got = Run(device, torch.float32, **CASES[case]).run(contiguous=False)
    assert_runs_match(got, Run("cpu", torch.float32, **CASES[case]).run(), torch.float32)


def test_float32_moments_of_bf16_params(device):
    got = Run(device, torch.bfloat16, state_dtype=torch.float32).run()
    want = Run("cpu", torch.bfloat16, state_dtype=torch.float32).run()
    assert got.m[0].dtype == torch.float32
    assert_runs_match(got, want, torch.bfloat16)


@pytest.mark.parametrize("case", ["channel", "mini_not_stored"])
def test_seeds_and_limiter_norms_on_the_host(device, case):
    """The op takes its scalars on the CPU too (the CUDA path reads and writes them back)."""
    got = Run(device, torch.float32, host_scalars=True, **CASES[case]).run()
    assert all(s.device.type == "cpu" for s in got.seeds + got.norms)
    assert_runs_match(got, Run("cpu", torch.float32, **CASES[case]).run(), torch.float32)


@pytest.mark.parametrize("scale_type", ["channel", "tensor"])
def test_many_tensors_and_large_ones_in_one_call(device, scale_type):
    """Over 32 tensors (several factor launches and update batches), tensors spanning several
    update chunks, and wide gradients whose column norms are split into row ranges."""
    shapes = [(3 + i % 5, 5 + (7 * i) % 11) for i in range(37)] + [(300, 517), (517, 300)]
    case = dict(scale_type=scale_type, update_proj_gap=2)
    got = Run(device, torch.float32, shapes=shapes, **case).run(steps=STEPS)
    assert_runs_match(got, Run("cpu", torch.float32, shapes=shapes, **case).run(), torch.float32)


# ---- against the float64 paper reference -------------------------------------------------------
def _reference(run: Run, storage=torch.float64):
    c = run.cfg
    ref = R.ApolloRef(run.start, seeds=list(range(1, len(run.start) + 1)), **HP, rank=c["rank"],
                      proj=c["proj"], proj_type=c["proj_type"], scale_type=c["scale_type"],
                      update_proj_gap=c["update_proj_gap"], scale=c["scale"],
                      norm_growth_limit=c["norm_growth_limit"] or None,
                      scale_front=c["scale_front"], storage_dtype=storage)
    for step in range(STEPS):
        ref.step(make_grads(run.start, step))
    return ref


# float32 against float64: rounding of R, the moments and the weights, over 9 steps
REF_TOL = {torch.float64: 1e-10, torch.float32: 1e-4}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_float64_reference(device, case, dtype):
    run = Run(device, dtype, **CASES[case]).run()
    ref, tol = _reference(run), REF_TOL[dtype]
    for i, p in enumerate(run.params):
        assert_close(p.cpu(), ref.p[i], tol, f"param {i}", origin=ref.p0[i])
        assert_close(run.m[i].cpu(), ref.m[i], tol, f"exp_avg {i}")
        assert_close(run.v[i].cpu(), ref.v[i], tol, f"exp_avg_sq {i}")
        if run.projs:  # the reference rounds P to float64 from the same float32 draw (or SVD)
            exact = dtype == torch.float64
            assert_close(run.projs[i].cpu(), ref.P[i], 0 if exact else 1e-7, f"P {i}")
        if run.seeds:
            assert int(run.seeds[i]) == ref.seeds[i]
        if ref.norm[i] is not None:
            assert_close(run.norms[i].cpu(), ref.norm[i], tol, f"limiter norm {i}")


@pytest.mark.parametrize("case", ["channel", "mini_scale_front", "svd_channel"])
def test_bfloat16_within_twice_the_bf16_reference_error(device, case):
    """DESIGN's rule: error against float64 at most twice that of the reference run in bf16."""
    run = Run(device, torch.bfloat16, **CASES[case]).run()
    exact, low = _reference(run), _reference(run, storage=torch.bfloat16)
    for what, ours, ex, lo in (("param", run.params, exact.p, low.p),
                               ("exp_avg", run.m, exact.m, low.m),
                               ("exp_avg_sq", run.v, exact.v, low.v)):
        ours = torch.cat([t.cpu().double().reshape(-1) for t in ours])
        e, lw = (torch.cat([t.reshape(-1) for t in ts]) for ts in (ex, lo))
        err, budget = (ours - e).norm().item(), (lw - e).norm().item()
        assert 0 < budget and err <= 2 * budget, f"{what}: error {err:.3e}, budget {budget:.3e}"


# ---- errors and memory ---------------------------------------------------------------------
def test_bad_input_raises_and_changes_nothing(device):
    run = Run(device, torch.float32, **CASES["mini_not_stored"]).run(steps=4)
    state = lambda: run.params + run.m + run.v + run.seeds + run.norms + run.steps  # noqa: E731
    before = [t.clone() for t in state()]
    grads = [g.to(tensor_device(device)) for g in make_grads(run.start, 4)]
    good, run.v[-1] = run.v[-1], torch.zeros(3, device=tensor_device(device))  # misshapen
    with pytest.raises(ValueError, match="projected shape"):
        run.step(grads)
    run.v[-1] = good
    assert all(torch.equal(a, b) for a, b in zip(state(), before))


@pytest.mark.cuda
@requires_cuda
def test_fp16_accumulation_flag_is_refused_before_any_write():
    assert_cuda_build()
    run = Run("cuda", torch.float16).run(steps=1)
    state = lambda: run.params + run.m + run.seeds + run.steps  # noqa: E731
    before = [t.clone() for t in state()]
    grads = [g.cuda() for g in make_grads(run.start, 1)]
    old = torch.backends.cuda.matmul.allow_fp16_accumulation
    torch.backends.cuda.matmul.allow_fp16_accumulation = True
    try:
        with pytest.raises(ValueError, match="allow_fp16_accumulation"):
            run.step(grads)
    finally:
        torch.backends.cuda.matmul.allow_fp16_accumulation = old
    assert all(torch.equal(a, b) for a, b in zip(state(), before))


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("store", [True, False])
def test_step_allocates_no_parameter_sized_memory(store):
    """A steady-state step (P redrawn every step without store) allocates under 1% of the
    largest parameter beyond what it started with: R and the sums live in the workspace."""
    assert_cuda_build()
    shapes = [(1024, 2816), (2816, 1024)]
    run = Run("cuda", torch.float32, shapes=shapes, rank=8, store=store)
    grads = [torch.randn(s, device="cuda") for s in shapes]
    run.step(grads)
    run.step(grads)
    torch.cuda.synchronize()
    start = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    run.step(grads)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - start
    assert extra <= 0.01 * 1024 * 2816 * 4, f"{extra} bytes during a step"


@pytest.mark.parametrize("op_device", ["cpu", "dev"])
def test_failing_svd_refresh_writes_nothing(device, op_device):
    """proj="svd": the refresh of the second tensor fails (a NaN gradient: no SVD), after the
    first tensor's would have succeeded. The step raises and no tensor was written: every SVD is
    taken before the first write, on the CPU op and in the CUDA glue alike."""
    ns = torch.ops.memopt if op_device == "cpu" else ops(device)
    dev = "cpu" if op_device == "cpu" else tensor_device(device)
    gen = torch.Generator().manual_seed(0)
    shapes = [(6, 10), (12, 5)]
    ps = [torch.randn(s, generator=gen).to(dev) for s in shapes]
    gs = [torch.randn(s, generator=gen).to(dev) for s in shapes]
    gs[1][0, 0] = float("nan")
    projs = [torch.zeros(_C.Projector("svd", "std", 2, list(s)).proj_shape).to(dev) for s in shapes]
    ms = [torch.zeros(_C.Projector("svd", "std", 2, list(s)).low_rank_shape).to(dev) for s in shapes]
    vs = [m.clone() for m in ms]
    norms = [torch.tensor(-1.0) for _ in shapes]
    steps = [torch.zeros(()) for _ in shapes]
    tensors = ps + ms + vs + projs + norms + steps
    before = [t.clone() for t in tensors]
    with pytest.raises(RuntimeError):
        ns.apollo_(ps, gs, ms, vs, projs, [], norms, steps, torch.tensor(1e-2, dtype=torch.float64),
                   0.9, 0.999, 1e-6, 0.0, 2, "svd", "std", "channel", 2, 1.0, 1.01, False)
    assert all(torch.equal(a, b) for a, b in zip(tensors, before))
