"""Shared by the CUDA FRUGAL op tests (tests/test_cuda_frugal.py): the modes and hyperparameters
of torch.ops.memopt.frugal_, the cases (odd sizes, tile splits, chunked projections, edges), one
call's CPU tensors, the op run for 8 steps on a device, the float64 reference (FrugalRef's update
math) on the same inputs, and the comparisons of a device's result with the CPU op's and with
the reference (DESIGN's low-precision budget for bf16 / fp16)."""
from __future__ import annotations

import torch

import memopt_core
from conftest import make_grads, rounding_atol
from cuda_util import TOL, assert_cuda_build, non_contiguous, ops, rel_err, tensor_device
from reference.frugal_ref import FrugalRef

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
    (|G| plus |P|(|P|^T|G|), what float32 GEMMs err relative to; not exactly 0) at some step:
    there a projection computed in another order or blocking may flip it."""
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
                    # the terms' size: float32 GEMMs err relative to the sum of the products'
                    # magnitudes, |P|(|P|^T|G|), not to the (cancelling) projection itself
                    size = g.abs() + ref._up(ref._down(g.abs(), sub.abs()), sub.abs(), g.shape)
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
