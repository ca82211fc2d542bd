"""int8 weights (cpp/include/memopt/int8_weights.h) in the CUDA kernels (cpp/src/cuda/weights.cuh:
one CTA owns whole groups, measures their new absmax, then encodes): adamw_, adam_mini_ (every
block geometry, and its elementwise segments), apollo_ and frugal_ (every mode and rule) against
the CPU op on identical inputs, and int8_encode_ against the oracle.
The CPU op is itself checked against a float32 twin and the float64-exact encoder
(tests/test_int8_weights.py); here the device must give the same codes and scales, to nearest
and stochastically, with float32 and bf16 gradients, over several steps. "emu" runs the real
kernels and glue on the host (tools/cuda_emu); "cuda" runs them on a GPU and skips without one."""
from __future__ import annotations

import copy

import pytest
import torch

import memopt_core
from cuda_frugal_util import (ACTIVE, ADAM, COLUMNS, FREE, LEFT, RANDK, RIGHT, ROWS, make_case,
                               RULES as FRUGAL_RULES)
from cuda_util import (EMU, TOL, assert_cuda_build, ops, rel_err, requires_cuda,
                       steady_step_bytes, tensor_device)
from reference import int8_ref
from test_cuda_apollo import CASES as APOLLO_CASES, Run as ApolloRun

CUDA = pytest.param("cuda", marks=[pytest.mark.cuda, requires_cuda])
DEVICES = [EMU, CUDA]
LR = torch.tensor(1e-2, dtype=torch.float64)


def rounding(stochastic, n):
    """The ops' rounding argument (rounding.h): [] to nearest, else seed 7, counter 0 and one id
    per parameter."""
    return [7, 0, *range(n)] if stochastic else []


# (rows, cols, group): groups of 32; 96 (chunks of 8160 elements: several rows, a row cut
# between CTAs); 4096 (one group a row, the widest), and 16 (512 groups a chunk, the most).
SHAPES = [(48, 128, 32), (100, 192, 96), (3, 4096, 4096), (40, 64, 16)]


@pytest.fixture(params=DEVICES)
def device(request):
    if request.param == "cuda":
        assert_cuda_build()
    return request.param


def weights(shapes, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [int8_ref.encode(torch.randn(r, c, generator=gen) * 0.05, g) for r, c, g in shapes]


def grads_for(shapes, step, dtype):
    gen = torch.Generator().manual_seed(100 + step)
    return [(torch.randn(r, c, generator=gen) * 1e-2).to(dtype) for r, c, _ in shapes]


def assert_same_weights(got, want, what, scale_rtol=5e-7):
    """Codes and scales of the device equal the CPU op's: exactly where both compute the same
    float32 values; a last-bit difference in an update (FMA contraction on a GPU) may move a
    code by one where it lies on a rounding boundary, and a scale by an ulp or two (more where
    the update comes from GEMMs summed in another order: scale_rtol)."""
    for k, ((gc, gs), (wc, ws)) in enumerate(zip(got, want)):
        gc, gs = gc.cpu(), gs.cpu()
        torch.testing.assert_close(gs, ws, rtol=scale_rtol, atol=0, equal_nan=True,
                                   msg=f"{what}: scales of weight {k}")
        diff = (gc.int() - wc.int()).abs()
        assert diff.max() <= 1 and (diff > 0).float().mean() <= 1e-3, f"{what}: codes of {k}"


class Int8Call:
    """A list of int8 weights (and one float tensor) with fp32 state, stepped by one op."""

    def __init__(self, device, shapes, grad_dtype, state_shape):
        self.ops, dev = ops(device), tensor_device(device)
        self.shapes, self.grad_dtype = shapes, grad_dtype
        coded = weights(shapes)
        self.codes = [c.to(dev) for c, _ in coded]
        self.scales = [s.to(dev) for _, s in coded]
        self.m = [torch.zeros(r, c, device=dev) for r, c, _ in shapes]
        self.v = [torch.zeros(state_shape(r, c, g), device=dev) for r, c, g in shapes]
        self.steps = [torch.zeros(()) for _ in shapes]

    def grads(self, step):
        return [g.to(c.device) for g, c in zip(grads_for(self.shapes, step, self.grad_dtype),
                                                self.codes)]

    def result(self):
        return list(zip(self.codes, self.scales))


@pytest.mark.parametrize("stochastic", [False, True], ids=["nearest", "stochastic"])
@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_adamw(device, grad_dtype, stochastic):
    def run(dev):
        call = Int8Call(dev, SHAPES, grad_dtype, lambda r, c, g: (r, c))
        for step in range(3):
            call.ops.adamw_(call.codes, call.grads(step), call.m, call.v, call.steps, LR, 0.9,
                            0.99, 1e-8, 0.1, "torch", rounding(stochastic, len(SHAPES)), call.scales)
        return call
    got, want = run(device), run("cpu")
    assert_same_weights(got.result(), want.result(), "adamw")
    for a, b in zip(got.m + got.v, want.m + want.v):
        assert rel_err(a, b) <= TOL[torch.float32]


@pytest.mark.parametrize("stochastic", [False, True], ids=["nearest", "stochastic"])
@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_adamw_with_8bit_states(device, grad_dtype, stochastic):
    """int8 weights and 8-bit m and v together (cuda/adamw_codes.cu through weights.cuh's two
    sweeps), groups that divide a CTA's 4096 elements; the codes of the weights and of both
    moments as the CPU op's."""
    shapes = [s for s in SHAPES if 4096 % s[2] == 0]

    def run(dev):
        call = Int8Call(dev, shapes, grad_dtype, lambda r, c, g: (r, c))
        where = call.codes[0].device
        call.m = [torch.zeros(r, c, dtype=torch.int8, device=where) for r, c, _ in shapes]
        call.v = [torch.zeros(r, c, dtype=torch.uint8, device=where) for r, c, _ in shapes]
        scales = [[torch.zeros(-(-r * c // 256), device=where) for r, c, _ in shapes]
                  for _ in range(2)]
        for step in range(3):
            call.ops.adamw_(call.codes, call.grads(step), call.m, call.v, call.steps, LR, 0.9,
                            0.99, 1e-8, 0.1, "torch", rounding(stochastic, len(shapes)),
                            call.scales, scales[0] + scales[1])
        return call, scales
    (got, got_scales), (want, want_scales) = run(device), run("cpu")
    assert_same_weights(got.result(), want.result(), "adamw 8-bit states")
    assert_same_weights(list(zip(got.m + got.v, got_scales[0] + got_scales[1])),
                        list(zip(want.m + want.v, want_scales[0] + want_scales[1])),
                        "adamw 8-bit states: moments", scale_rtol=1e-5)
    assert all(m.any() for m in got.m)


def test_adamw_with_8bit_states_refuses_groups_a_cta_would_cut(device):
    """A group of 96 elements does not divide a CTA's 4096: refused, nothing written."""
    call = Int8Call(device, [(100, 192, 96)], torch.float32, lambda r, c, g: (r, c))
    where = call.codes[0].device
    before = call.codes[0].clone()
    m = [torch.zeros(100, 192, dtype=torch.int8, device=where)]
    v = [torch.zeros(100, 192, dtype=torch.uint8, device=where)]
    scales = [torch.zeros(75, device=where), torch.zeros(75, device=where)]
    with pytest.raises(NotImplementedError, match="does not divide 4096"):
        call.ops.adamw_(call.codes, call.grads(0), m, v, call.steps, LR, 0.9, 0.99, 1e-8, 0.1,
                        "torch", [], call.scales, scales)
    assert torch.equal(call.codes[0], before)


# Adam-mini block specs per (rows, cols, group): [offset, rows, cols, row_stride, tile_rows,
# tile_cols] segments, each covering whole groups along its rows.
def blocks_rows(r, c, g):      # one block per row (fused path for float weights)
    return [[0, r, c, c, 1, c]]


def blocks_heads(r, c, g):     # blocks of several rows, then an elementwise segment
    h = max(2, r // 4 * 2)
    return [[0, h, c, c, h // 2, c], [h * c, r - h, c, c, 1, 1]]


def blocks_columns(r, c, g):   # one block per column (rectangles)
    return [[0, r, c, c, r, 1]]


def blocks_interleaved(r, c, g):  # two strided column halves (fused-QKV parts), whole tensor
    half = c // 2 // g * g or c
    segs = [[0, r, half, c, r, half]]
    if half < c:
        segs.append([half, r, c - half, c, 1, c - half])
    return segs


BLOCKS = {"rows": blocks_rows, "heads_and_elementwise": blocks_heads,
          "columns": blocks_columns, "interleaved": blocks_interleaved}


def n_blocks(segs):
    return sum(rows // tr * (cols // tc) for _, rows, cols, _, tr, tc in segs)


@pytest.mark.parametrize("stochastic", [False, True], ids=["nearest", "stochastic"])
@pytest.mark.parametrize("layout", sorted(BLOCKS))
def test_adam_mini(device, layout, stochastic):
    flat = []  # adam_mini_'s blocks: per tensor, its segment count, then its segments
    for segs in (BLOCKS[layout](*s) for s in SHAPES):
        flat += [len(segs)] + [x for seg in segs for x in seg]

    def run(dev):
        shape_of = {(r, c, g): n_blocks(BLOCKS[layout](r, c, g)) for r, c, g in SHAPES}
        call = Int8Call(dev, SHAPES, torch.bfloat16, lambda r, c, g: (shape_of[(r, c, g)],))
        for step in range(3):
            call.ops.adam_mini_(call.codes, call.grads(step), call.m, call.v, call.steps, flat, LR,
                                0.9, 0.99, 1e-8, 0.1, rounding(stochastic, len(SHAPES)),
                                call.scales)
        return call
    got, want = run(device), run("cpu")
    assert_same_weights(got.result(), want.result(), f"adam_mini {layout}")
    for a, b in zip(got.m + got.v, want.m + want.v):
        assert rel_err(a, b) <= TOL[torch.float32]


# int8 weights with Adam-mini's 8-bit m: block rows of whole code blocks, groups whose CUDA
# units (whole groups within 8192 elements) are whole code blocks too.
CODED_SHAPES = [(48, 512, 32), (100, 512, 128), (3, 4096, 4096), (40, 512, 16)]


def adam_mini_coded_run(dev, layout, stochastic, shapes=CODED_SHAPES):
    """3 steps of adam_mini_ on int8 weights with 8-bit m; (call, m's block scales)."""
    flat = []
    for segs in (BLOCKS[layout](*s) for s in shapes):
        flat += [len(segs)] + [x for seg in segs for x in seg]
    call = Int8Call(dev, shapes, torch.bfloat16,
                    lambda r, c, g: (n_blocks(BLOCKS[layout](r, c, g)),))
    where = call.codes[0].device
    call.m = [torch.zeros(r, c, dtype=torch.int8, device=where) for r, c, _ in shapes]
    m_scales = [torch.zeros(-(-r * c // 256), device=where) for r, c, _ in shapes]
    for step in range(3):
        call.ops.adam_mini_(call.codes, call.grads(step), call.m, call.v, call.steps, flat, LR,
                            0.9, 0.99, 1e-8, 0.1, rounding(stochastic, len(shapes)), call.scales,
                            m_scales)
    return call, m_scales


@pytest.mark.parametrize("stochastic", [False, True], ids=["nearest", "stochastic"])
@pytest.mark.parametrize("layout", ["rows", "columns", "interleaved"])
def test_adam_mini_with_8bit_m(device, layout, stochastic):
    """int8 weights and Adam-mini's 8-bit m together (adam_mini_two_pass.cu: the two sweeps
    measure the weight groups and the code blocks alike, then encode both): the codes and scales
    of the weights and of m as the CPU op's, v as close as the float tests'."""
    (got, got_s), (want, want_s) = [adam_mini_coded_run(d, layout, stochastic)
                                    for d in (device, "cpu")]
    assert_same_weights(got.result(), want.result(), f"adam_mini 8-bit m {layout}")
    assert_same_weights(list(zip(got.m, got_s)), list(zip(want.m, want_s)),
                        f"adam_mini 8-bit m {layout}: m", scale_rtol=1e-5)
    for a, b in zip(got.v, want.v):
        assert rel_err(a, b) <= TOL[torch.float32]
    assert all(m.any() for m in got.m)


def test_adam_mini_with_8bit_m_refuses_groups_that_cut_code_blocks(device):
    """Groups of 96: CUDA units of 8160 elements would cut code blocks; refused, nothing
    written (the CPU op takes them: its codes move)."""
    cpu_codes = adam_mini_coded_run("cpu", "rows", False, [(100, 192, 96)])[0].codes[0]
    call = Int8Call(device, [(100, 192, 96)], torch.float32, lambda r, c, g: (r,))
    where = call.codes[0].device
    start = call.codes[0].clone()
    with pytest.raises(NotImplementedError, match="cut code blocks"):
        call.ops.adam_mini_(call.codes, call.grads(0),
                            [torch.zeros(100, 192, dtype=torch.int8, device=where)], call.v,
                            call.steps, [1, 0, 100, 192, 192, 1, 192], LR, 0.9, 0.99, 1e-8, 0.1,
                            [], call.scales, [torch.zeros(75, device=where)])
    assert torch.equal(call.codes[0], start) and not torch.equal(cpu_codes, start.cpu())


APOLLO_SHAPES = [(24, 64, 16), (64, 32, 32)]  # Left (per-column channels) and Right (per-row)


@pytest.mark.parametrize("stochastic", [False, True], ids=["nearest", "stochastic"])
@pytest.mark.parametrize("case", ["channel", "tensor", "mini_not_stored", "svd_channel"])
def test_apollo(device, case, stochastic):
    def run(dev):
        apollo = ApolloRun(dev, torch.float32, shapes=[s[:2] for s in APOLLO_SHAPES],
                           **APOLLO_CASES[case])
        coded = weights(APOLLO_SHAPES)
        apollo.params = [c.to(p.device) for (c, _), p in zip(coded, apollo.params)]
        scales = [s.to(p.device) for (_, s), p in zip(coded, apollo.params)]
        for step in range(4):  # (a projection refresh at step 3)
            grads = [g.to(p.device) for g, p in
                     zip(grads_for(APOLLO_SHAPES, step, torch.float32), apollo.params)]
            apollo.ops.apollo_(*apollo.args(grads), rounding(stochastic, len(grads)), scales)
        return apollo, list(zip(apollo.params, scales))
    (got_run, got), (want_run, want) = run(device), run("cpu")
    assert_same_weights(got, want, f"apollo {case}")
    for a, b in zip(got_run.m + got_run.v, want_run.m + want_run.v):
        assert rel_err(a, b) <= TOL[torch.float32]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("group", [16, 96, 192])
def test_int8_encode(device, group, dtype):
    """int8_encode_ (quantize_weights_ on the device) gives the oracle's codes exactly: no
    arithmetic but the encoder's; a NaN makes its group's scale NaN and codes 0."""
    values = (torch.randn(37, 192, generator=torch.Generator().manual_seed(group)) * 0.05)
    values[3, 5] = float("nan")
    values = values.to(dtype)
    dev = tensor_device(device)
    codes = torch.zeros(37, 192, dtype=torch.int8, device=dev)
    scales = torch.zeros(37, 192 // group, device=dev)
    ops(device).int8_encode_(values.to(dev), codes, scales)
    want_codes, want_scales = int8_ref.encode(values.float(), group)
    assert torch.equal(codes.cpu(), want_codes)
    torch.testing.assert_close(scales.cpu(), want_scales, rtol=0, atol=0, equal_nan=True)


def test_nonfinite_update_poisons_its_group_only(device):
    call = Int8Call(device, SHAPES[:1], torch.float32, lambda r, c, g: (r, c))
    grads = call.grads(0)
    grads[0][5, 40] = float("nan")  # group 1 of row 5
    call.ops.adamw_(call.codes, grads, call.m, call.v, call.steps, LR, 0.9, 0.99, 1e-8, 0.0,
                    "torch", [], call.scales)
    scales = call.scales[0].cpu()
    assert scales[5, 1].isnan() and scales.isnan().sum() == 1
    assert (call.codes[0][5, 32:64] == 0).all()


# FRUGAL: every mode on int8 weights, (mode, shape, group[, density[, basis]]); under signSGD
# (U and Gp from one GEMM) also two projections over 2^18 elements, which run in two chunks
# (left: of whole groups, 480 + 40 columns).
FRUGAL_SPEC = [
    (ADAM, (24, 64), 64), (ACTIVE, (16, 96), 32), (FREE, (8, 64), 16),
    (COLUMNS, (40, 64), 32, 0.25), (ROWS, (48, 96), 96, 0.3), (RANDK, (32, 128), 32, 0.2),
    (RIGHT, (48, 64), 32, 0.25, "svd"), (LEFT, (64, 96), 48, 0.25, "random"),
]
FRUGAL_LARGE = [(RIGHT, (520, 512), 128, 0.25, "random"), (LEFT, (512, 520), 40, 0.25, "svd")]


@pytest.mark.parametrize("stochastic", [False, True], ids=["nearest", "stochastic"])
@pytest.mark.parametrize("rule,decay", [("sign_sgd", 0.1), ("sgd", 0.1), (None, 0.1), (None, 0.0)],
                         ids=["sign_sgd", "sgd", "none", "none_no_decay"])
def test_frugal(device, rule, decay, stochastic):
    full = FRUGAL_SPEC + (FRUGAL_LARGE if rule == "sign_sgd" else [])
    spec = [(mode, shape, *rest) for mode, shape, _, *rest in full]
    shapes = [(*shape, group) for _, shape, group, *_ in full]
    case = make_case(spec, torch.bfloat16, state_dtype=torch.float32)  # bf16 gradients

    def run(dev):
        dev_ops, where = ops(dev), tensor_device(dev)
        t = {k: [x.to(where, copy=True) for x in v] for k, v in case.items() if k != "modes"}
        coded = weights(shapes)
        codes, scales = [c.to(where) for c, _ in coded], [s.to(where) for _, s in coded]
        for step in range(3):
            grads = [g.to(where) for g in grads_for(shapes, step, torch.bfloat16)]
            dev_ops.frugal_(codes, grads, t["m"], t["v"], t["steps"], t["subs"], case["modes"],
                            LR, 0.9, 0.99, 1e-8, decay, 0.5, 0.7, FRUGAL_RULES[rule],
                            rounding(stochastic, len(shapes)), scales)
        return list(zip(codes, scales)), t
    (got, got_t), (want, want_t) = run(device), run("cpu")
    # (the large left projection's GEMMs are chunked unlike the CPU op's: float32 weights
    # differ by up to 1.5e-6 of their magnitude there too, tests/test_cuda_frugal.py's budget)
    assert_same_weights(got, want, f"frugal {rule}", scale_rtol=5e-6)
    for a, b in zip(got_t["m"] + got_t["v"], want_t["m"] + want_t["v"]):
        if b.numel():
            assert rel_err(a, b) <= TOL[torch.float32]


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("name", ["adamw", "adam_mini", "slim_adam", "apollo", "apollo_mini",
                                  "frugal"])
def test_front_end_on_cuda_matches_cpu(name):
    """quantize_weights_ models on both devices, stepped by the optimizer with the same bf16
    gradients and stochastic rounding: the same codes and scales."""
    from test_int8_weights import OPTIMIZERS, int8_layers, pair
    assert_cuda_build()
    model = pair(torch.bfloat16)[0]
    gpu = copy.deepcopy(model).cuda()
    opts = [OPTIMIZERS[name](m, stochastic_rounding=True, rounding_seed=3) for m in (model, gpu)]
    for step in range(3):
        gen = torch.Generator().manual_seed(step)
        for p, q in zip(model.parameters(), gpu.parameters()):
            g = (torch.randn(p.shape, generator=gen) * 1e-2).to(p.dtype)
            p.grad, q.grad = g, g.cuda()
        for opt in opts:
            opt.step()
    torch.cuda.synchronize()
    layers = int8_layers(model)
    assert_same_weights([(q.weight_codes, q.weight_scales) for q in int8_layers(gpu).values()],
                        [(q.weight_codes, q.weight_scales) for q in layers.values()], name)


@pytest.mark.cuda
@requires_cuda
def test_cuda_int8_step_allocates_no_parameter_sized_memory():
    """A steady-state step of every optimizer on int8 weights allocates under 1% of the largest
    weight's int8 codes (the two sweeps keep their group maxima in shared memory)."""
    from conftest import make_llama
    assert_cuda_build()
    for name in memopt_core.OPTIMIZERS:
        model = make_llama(hidden_size=256, intermediate_size=768, vocab_size=4096,
                           num_attention_heads=4, num_key_value_heads=4)
        memopt_core.quantize_weights_(model, group_size=128, dtype=torch.float32)
        model.cuda()
        opt = memopt_core.OPTIMIZERS[name].make(model, lr=3e-3, weight_decay=0.1)
        for p in model.parameters():
            p.grad = torch.randn(p.shape, device="cuda") * 1e-2
        extra = steady_step_bytes(opt)
        largest = max(b.numel() for n, b in model.named_buffers() if n.endswith("weight_codes"))
        assert extra <= 0.01 * largest, f"{name}: {extra} bytes during step"
