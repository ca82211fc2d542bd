"""torch.ops.memopt.frugal_ on CUDA (cpp/src/cuda/frugal.cu) at the op level, against the CPU op
on identical inputs and against the float64 reference math (tests/reference/frugal_ref.py): every
mode (AdamW, active / state-free block, columns, rows, randk, right / left projections on SVD,
random-orthogonal and permutation bases), every state-free rule, 8 steps, odd sizes, fp32 / bf16 /
fp16 / fp64, non-contiguous gradients, many tensors per call. Each comparison runs per device:
"emu" runs the real CUDA kernels and glue on the host (tools/cuda_emu: an emulated CUDA runtime),
so CI checks them without a GPU; "cuda" needs a GPU and a CUDA build of memopt_core."""
from __future__ import annotations

import copy

import pytest
import torch

import memopt_core
from conftest import make_grads, make_llama, rounding_atol
from cuda_util import (EMU, TOL, assert_cuda_build, non_contiguous, ops, rel_err, requires_cuda,
                       tensor_device)
from reference.frugal_ref import FrugalRef

DEVICES = [EMU, pytest.param("cuda", marks=[pytest.mark.cuda, requires_cuda])]
ADAM, ACTIVE, FREE, COLUMNS, ROWS, RANDK, RIGHT, LEFT = range(8)
RULES = {"sign_sgd": 2, "sgd": 1, None: 0}
HP = dict(lr=3e-3, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1, proj_params_lr_scale=0.5,
          state_free_lr_scale=0.7)
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]

# (mode, shape[, density[, basis]]): odd sizes; 2-D splits in one tile and in 2 x 2 tiles
# (300 > 256 columns, 600 rows > 436 rows a tile), randk over two flat tiles of several windows,
# projections on both sides.
ALL_MODES = [
    (ADAM, (37, 53)), (ADAM, (91,)), (ACTIVE, (53, 37)), (ACTIVE, (3, 5, 7)),
    (FREE, (37, 53)), (FREE, (1001,)),
    (COLUMNS, (37, 53), 0.25), (COLUMNS, (600, 300), 0.5),
    (ROWS, (53, 37), 0.25), (ROWS, (300, 7), 0.3), (ROWS, (700, 300), 0.3),
    (RANDK, (37, 53), 0.25), (RANDK, (70001,), 0.1),
    (RIGHT, (53, 37), 0.25, "svd"), (LEFT, (37, 53), 0.25, "random"),
    (RIGHT, (64, 16), 0.5, "randperm"), (LEFT, (9, 91), 0.34, "svd"),
]
# Projections of more than 2^18 elements run in several row / column chunks (the last one short).
BIG_PROJECTIONS = [(RIGHT, (1031, 509), 0.25, "svd"), (LEFT, (509, 1031), 0.25, "random")]
EDGES = [  # empty tensors and subspaces, full subspaces, one element
    (ADAM, (0, 3)), (FREE, (0,)), (COLUMNS, (0, 5), 0.4), (COLUMNS, (7, 5), 0.0),
    (ROWS, (7, 5), 1.0), (RANDK, (50,), 0.0), (RANDK, (1,), 1.0), (COLUMNS, (1, 1), 1.0),
    (RIGHT, (6, 4), 0.0, "zero"), (LEFT, (4, 6), 1.0, "randperm"),  # (exact zero residual)
]


def device_op(device):
    """The op under test on `device` (the dispatcher picks the device's kernel)."""
    return ops(device).frugal_


def check_device(device):
    if device == "cuda":
        assert_cuda_build()


def make_case(spec, dtype, state_dtype=None, seed=0):
    """CPU tensors of one call: parameters, fresh states, steps, subspaces and modes."""
    gen = torch.Generator().manual_seed(seed)
    state_dtype = state_dtype or dtype
    case = dict(params=[], m=[], v=[], steps=[], subs=[], modes=[])
    for j, (mode, shape, *rest) in enumerate(spec):
        p = (0.05 * torch.randn(shape, generator=gen, dtype=torch.float64)).to(dtype)  # ~LLM weights
        sub, mshape = torch.empty(0, dtype=dtype), shape
        if mode in (COLUMNS, ROWS, RANDK):
            total = {COLUMNS: shape[-1], ROWS: shape[0], RANDK: p.numel()}[mode]
            k = int(total * rest[0])
            sub = torch.randperm(total, generator=gen)[:k].sort().values.to(torch.int32)
            mshape = {COLUMNS: (shape[0], k), ROWS: (k, shape[-1]), RANDK: (k,)}[mode]
        elif mode in (RIGHT, LEFT):
            right = mode == RIGHT
            rank = round(shape[1 if right else 0] * rest[0])
            if rest[1] == "zero":
                sub = torch.zeros((0, shape[1]) if right else (shape[0], 0), dtype=dtype)
            else:
                g0 = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
                rng = torch.Generator().manual_seed(seed + j).get_state()
                sub, _ = memopt_core._C.frugal_projection(g0, rank, right, rest[1], rng)
            mshape = (shape[0], rank) if right else (rank, shape[1])
        free = mode == FREE
        case["params"].append(p)
        case["m"].append(torch.zeros(0 if free else mshape, dtype=state_dtype))
        case["v"].append(torch.zeros(0 if free else mshape, dtype=state_dtype))
        case["steps"].append(torch.zeros(0 if free else (), dtype=torch.float32))
        case["subs"].append(sub)
        case["modes"].append(mode)
    return case


def grads_at(case, step):
    """conftest's deterministic gradients, every 7th entry exactly zero (sign(0) = 0)."""
    grads = make_grads(case["params"], step)
    for g in grads:
        g.view(-1)[::7] = 0
    return grads


def scalars(rule, hp):
    return (float(hp["lr"]), *map(float, hp["betas"]), float(hp["eps"]),
            float(hp["weight_decay"]), float(hp["proj_params_lr_scale"]),
            float(hp["state_free_lr_scale"]), RULES[rule])


def run_op(device, case, rule, steps=8, contiguous=True, hp=HP, op=None, on_device=False):
    """`steps` calls of frugal_ on `device` from copies of `case`; returns the final tensors on
    the CPU. `on_device` also puts lr and the step counters on the device."""
    op = op or device_op(device)
    device = tensor_device(device)
    t = {k: [x.to(device, copy=True) for x in v] for k, v in case.items() if k != "modes"}
    if not on_device:
        t["steps"] = [s.clone() for s in case["steps"]]
    lr, *rest = scalars(rule, hp)
    lr = torch.tensor(lr, dtype=torch.float64, device=device if on_device else "cpu")
    for step in range(steps):
        grads = [g.to(device) for g in grads_at(case, step)]
        if not contiguous:
            grads = [non_contiguous(g) for g in grads]
        op(t["params"], grads, t["m"], t["v"], t["steps"], t["subs"], case["modes"], lr, *rest)
    return {k: [x.cpu() for x in v] for k, v in t.items()}


def run_reference(case, rule, steps=8, hp=HP, storage=torch.float64):
    """The float64 reference (FrugalRef's update math) on the same inputs, tensor by tensor;
    `storage` rounds p, m and v after every step as low-precision storage does. `ambiguous`
    marks the coordinates whose signSGD residual G - Gp came within 1e-3 of its terms' size
    (not exactly 0) at some step: there a projection computed in another order may flip it."""
    ref = FrugalRef([], [], lr=hp["lr"], betas=hp["betas"], eps=hp["eps"],
                    weight_decay=hp["weight_decay"], state_free=rule,
                    state_free_lr_scale=hp["state_free_lr_scale"],
                    proj_params_lr_scale=hp["proj_params_lr_scale"], storage_dtype=storage)
    lr, wd = hp["lr"], hp["weight_decay"]
    ps, fs = hp["proj_params_lr_scale"], hp["state_free_lr_scale"]
    selection = {COLUMNS: "columns", ROWS: "rows", RANDK: "randk", RIGHT: "svd", LEFT: "svd"}
    p = [x.double() for x in case["params"]]
    st = [dict(exp_avg=m.double(), exp_avg_sq=v.double(), step=0)
          for m, v in zip(case["m"], case["v"])]
    subs = [s.long() if s.dtype == torch.int32 else s.double() for s in case["subs"]]
    ambiguous = [torch.zeros(x.shape, dtype=torch.bool) for x in p]
    for step in range(steps):
        for i, (mode, g) in enumerate(zip(case["modes"], grads_at(case, step))):
            g, q = g.double(), p[i] * (1 - lr * wd)
            if mode in (ADAM, ACTIVE):
                q = q - ref._adam(st[i], g, lr if mode == ADAM else lr * ps)
            elif mode == FREE:
                q = q - lr * ps * fs * ref._free(g)
            else:  # FrugalRef picks the projection side from the shape, as these cases do
                ref.selection, sub = selection[mode], subs[i]
                low = ref._down(g, sub)
                upd = ref._up(ref._adam(st[i], low, lr * ps), sub, g.shape)
                resid = g - ref._up(low, sub, g.shape)
                q = q - upd - lr * ps * fs * ref._free(resid)
                if rule == "sign_sgd" and mode in (RIGHT, LEFT):
                    size = g.abs() + (g - resid).abs()
                    ambiguous[i] |= (resid != 0) & (resid.abs() < 1e-3 * size)
            p[i] = ref._round(q)
    return dict(params=p, m=[s["exp_avg"] for s in st], v=[s["exp_avg_sq"] for s in st],
                steps=[s["step"] for s in st], ambiguous=ambiguous)


def assert_matches(ours, expected, case, tol, what, ambiguous, steps=8):
    """Parameters, but for the `ambiguous` coordinates: ||ours - expected|| <= tol * ||expected
    - start|| plus the rounding of the stored weights (two roundings a step: storage, and FMA
    contraction or not), which dominates where a step moves a weight by less than its ulp (SGD
    or no rule on state-free parts). States: relative error <= tol. Steps: equal."""
    for i, (a, e, o) in enumerate(zip(ours["params"], expected["params"], case["params"])):
        keep = ~ambiguous[i]
        a, e, o = a.double()[keep], e.double()[keep], o[keep]
        if e.numel():
            err = (a - e).norm()
            budget = tol * (e - o.double()).norm() + rounding_atol(o, steps, 2).norm()
            assert err <= budget, f"{what}: param {i} (mode {case['modes'][i]}): {err:.2e} > " \
                f"{budget:.2e} (relative {rel_err(a, e, origin=o):.2e})"
    for i, mode in enumerate(case["modes"]):
        if mode == FREE:
            continue
        assert float(ours["steps"][i]) == float(expected["steps"][i]), f"{what}: step of {i}"
        for key in ("m", "v"):
            if expected[key][i].numel():
                err = rel_err(ours[key][i], expected[key][i])
                assert err <= tol, f"{what}: {key} {i} (mode {mode}): {err:.2e}"


def assert_within_low_precision_budget(ours, case, rule, dtype, exact, hp=HP, steps=8):
    """DESIGN's rule: the error against float64 (`exact`) is at most twice that of the same
    reference math with `dtype` storage (displacements of p but its ambiguous coordinates, and
    m, v)."""
    low = run_reference(case, rule, steps, hp, storage=dtype)
    for key in ("params", "m", "v"):
        origin = case["params"] if key == "params" else [torch.zeros_like(x) for x in case[key]]
        keep = [~a if key == "params" else torch.ones(x.shape, dtype=torch.bool)
                for a, x in zip(exact["ambiguous"], case[key])]
        flat = lambda ts: torch.cat([(t.double() - o.double())[k].reshape(-1)  # noqa: E731
                                     for t, o, k in zip(ts, origin, keep)])
        err = (flat(ours[key]) - flat(exact[key])).norm()
        budget = (flat(low[key]) - flat(exact[key])).norm()
        assert err <= 2 * budget + 1e-12, f"{key}: error {err:.3e} > 2 x {budget:.3e}"


def check_all(device, spec, dtype, rule, contiguous=True, hp=HP, **kw):
    """The op on `device` against the CPU op (TOL) and against the float64 reference."""
    check_device(device)
    case = make_case(spec, dtype)
    ours = run_op(device, case, rule, contiguous=contiguous, hp=hp, **kw)
    cpu = run_op("cpu", case, rule, hp=hp, op=torch.ops.memopt.frugal_)
    exact = run_reference(case, rule, hp=hp)
    assert_matches(ours, cpu, case, TOL[dtype], f"{device} vs the CPU op", exact["ambiguous"])
    if dtype in (torch.float32, torch.float64):
        tol = 1e-10 if dtype == torch.float64 else 1e-5
        assert_matches(ours, exact, case, tol, "vs float64", exact["ambiguous"])
    else:
        assert_within_low_precision_budget(ours, case, rule, dtype, exact, hp)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("rule", list(RULES))
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16", "fp16", "fp64"])
def test_every_mode_and_rule(device, dtype, rule):
    check_all(device, ALL_MODES, dtype, rule)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("rule", list(RULES))
def test_projections_in_several_chunks(device, rule):
    check_all(device, BIG_PROJECTIONS, torch.float32, rule)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_non_contiguous_grads_lr_and_steps_on_device(device, dtype):
    check_all(device, ALL_MODES, dtype, "sign_sgd", contiguous=False, on_device=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("rule", list(RULES))
def test_empty_and_full_subspaces(device, rule):
    check_all(device, EDGES, torch.float32, rule)


@pytest.mark.parametrize("device", DEVICES)
def test_rule_none_without_weight_decay_leaves_free_tensors(device):
    check_all(device, ALL_MODES, torch.float32, None, hp={**HP, "weight_decay": 0.0})


@pytest.mark.parametrize("device", DEVICES)
def test_many_tensors_several_launches(device):
    """48 tensors (over a launch's tensor limit) and a rows split of 331 tiles (over a launch's
    chunk limit, so one tensor continues in the next launch)."""
    check_all(device, ALL_MODES * 3 + [(ROWS, (331 * 4096 + 77, 1), 0.5), (FREE, (5, 3))],
              torch.float32, "sign_sgd")


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_params_with_fp32_state(device):
    check_device(device)
    case = make_case(ALL_MODES, torch.bfloat16, state_dtype=torch.float32)
    ours = run_op(device, case, "sign_sgd")
    cpu = run_op("cpu", case, "sign_sgd", op=torch.ops.memopt.frugal_)
    assert_matches(ours, cpu, case, TOL[torch.bfloat16], f"{device} vs the CPU op",
                   run_reference(case, "sign_sgd")["ambiguous"])


@pytest.mark.parametrize("device", DEVICES)
def test_bad_input_raises_before_any_write(device):
    check_device(device)
    case = make_case(ALL_MODES, torch.float32)
    case["m"][-1] = case["m"][-1][:-1]  # the last tensor's state has the wrong shape
    where = tensor_device(device)
    t = {k: [x.to(where, copy=True) for x in v] for k, v in case.items() if k != "modes"}
    before = {k: [x.clone() for x in v] for k, v in t.items()}
    grads = [g.to(where) for g in grads_at(case, 0)]
    with pytest.raises(ValueError, match="exp_avg"):
        device_op(device)(t["params"], grads, t["m"], t["v"], t["steps"], t["subs"],
                          case["modes"], torch.tensor(HP["lr"]), *scalars("sign_sgd", HP)[1:])
    for k in t:
        assert all(torch.equal(a, b) for a, b in zip(t[k], before[k])), f"{k} changed"


@pytest.mark.cuda
@requires_cuda
def test_cuda_rejects_indices_on_the_cpu():
    assert_cuda_build()
    case = make_case([(COLUMNS, (8, 6), 0.5)], torch.float32)
    t = {k: [x.cuda() for x in v] for k, v in case.items() if k != "modes"}
    before = t["params"][0].clone()
    with pytest.raises((TypeError, ValueError), match="subspace"):  # the CPU check's TypeError
        torch.ops.memopt.frugal_(t["params"], [torch.ones(8, 6, device="cuda")], t["m"], t["v"],
                                 case["steps"], case["subs"], case["modes"],
                                 torch.tensor(HP["lr"]), *scalars("sign_sgd", HP)[1:])
    assert torch.equal(t["params"][0], before) and case["steps"][0].item() == 0


@pytest.mark.cuda
@requires_cuda
def test_projections_stay_fp32_when_tf32_is_allowed():
    """The op turns TF32 off for its GEMMs: with torch allowing it, results still match the CPU
    within fp32 rounding (TF32 would be ~1e-3 off)."""
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        check_all("cuda", BIG_PROJECTIONS + ALL_MODES[-4:], torch.float32, "sign_sgd")
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("mode,spec,limit", [
    ("free", (FREE, (1024, 1024)), 0.01), ("columns", (COLUMNS, (1024, 1024), 0.25), 0.01),
    ("rows", (ROWS, (1024, 1024), 0.25), 0.01), ("randk", (RANDK, (1024, 1024), 0.25), 0.01),
    # scratch (1 + rho) * 2 / 8 of the tensor in fp32: 31% of an fp32 parameter's bytes
    ("svd", (RIGHT, (2048, 1024), 0.25, "svd"), 0.35),
    ("random", (LEFT, (1024, 2048), 0.25, "random"), 0.35)])
def test_step_allocates_no_parameter_sized_memory(mode, spec, limit):
    assert_cuda_build()
    case = make_case([spec], torch.float32)
    t = {k: [x.cuda() for x in v] for k, v in case.items() if k != "modes"}
    grads = [g.cuda() for g in grads_at(case, 0)]
    args = (t["params"], grads, t["m"], t["v"], case["steps"], t["subs"], case["modes"],
            torch.tensor(HP["lr"]), *scalars("sign_sgd", HP)[1:])
    torch.ops.memopt.frugal_(*args)
    torch.cuda.synchronize()
    start = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    torch.ops.memopt.frugal_(*args)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - start
    size = t["params"][0].numel() * 4
    assert extra <= limit * size, f"{mode}: {extra} bytes during a step of a {size}-byte tensor"


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("selection", ["columns", "rows", "randk", "random", "randperm"])
def test_optimizer_selections_match_cpu(selection):
    """memopt_core.Frugal with a non-block selection on CUDA as on the CPU, 8 steps across two
    re-selections (subspaces are drawn on the CPU generator and moved to the parameters'
    device). SVD bases are left out: CPU and GPU SVDs differ in signs and rounding."""
    assert_cuda_build()
    cpu_model = make_llama(hidden_size=36, intermediate_size=91, vocab_size=67,
                           num_attention_heads=4, num_key_value_heads=2)
    cuda_model = copy.deepcopy(cpu_model).cuda()
    origin = [q.detach().clone() for q in cpu_model.parameters()]
    runs = []
    for model in (cpu_model, cuda_model):
        opt = memopt_core.Frugal(model, lr=3e-3, weight_decay=0.1, density=0.25, update_gap=3,
                                 selection=selection, seed=7)
        params = list(model.parameters())
        for step in range(8):
            for q, g in zip(params, make_grads([q.detach().cpu() for q in params], step)):
                q.grad = g.to(q.device)
            opt.step()
        runs.append((opt, params))
    (cpu_opt, cpu_params), (cuda_opt, cuda_params) = runs
    for i, (pc, pg, o) in enumerate(zip(cpu_params, cuda_params, origin)):
        assert rel_err(pg, pc, origin=o) <= TOL[torch.float32], f"parameter {i}"
        assert cpu_opt.state[pc].keys() == cuda_opt.state[pg].keys()
        for key, value in cpu_opt.state[pc].items():
            other = cuda_opt.state[pg][key].cpu()
            if value.is_floating_point() and key != "subspace":
                assert rel_err(other, value) <= TOL[torch.float32], f"{key} of {i}"
            else:
                assert torch.equal(other, value), f"{key} of {i}"
