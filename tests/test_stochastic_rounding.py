"""Stochastic rounding of bf16 parameters (cpp/include/memopt/rounding.h), in every op and both
front ends. Oracles: the same op on float32 twins of the inputs (the fp32 result each bf16
element is rounded from), rounded by tests/reference/rounding_ref.py, written again from the
header's specification; the statistics of an unbiased rounding; an uninterrupted run (resume);
the CPU op (the CUDA kernels on the emulated device)."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import memopt_core
from cuda_frugal_util import ALL_MODES, HP, make_case, grads_at, scalars
from cuda_util import EMU, ops
from reference import rounding_ref

SEED, COUNTER = 1234, 7
COMPILABLE = {"adamw": lambda m, **kw: memopt_core.AdamW(m.parameters(), **kw),
              "adam_mini": lambda m, **kw: memopt_core.AdamMini(m, dim=32, n_heads=4, **kw),
              "slim_adam": lambda m, **kw: memopt_core.SlimAdam(m, dim=32, n_heads=4, **kw),
              "apollo": lambda m, **kw: memopt_core.Apollo(m, rank=4, update_proj_gap=1000, **kw),
              "apollo_mini": lambda m, **kw: memopt_core.ApolloMini(m, update_proj_gap=1000, **kw)}
FRONT_ENDS = {**COMPILABLE, "frugal": lambda m, **kw: memopt_core.Frugal(
    m, density=0.5, update_gap=2, state_free="sign_sgd", **kw)}


class Tiny(nn.Module):
    """Attention, MLP, norm, embedding and head: every role the optimizers tell apart."""

    def __init__(self):
        super().__init__()
        self.tok_embeddings = nn.Embedding(50, 32)
        self.wq, self.wk = nn.Linear(32, 32, bias=False), nn.Linear(32, 32, bias=False)
        self.wv, self.wo = nn.Linear(32, 32, bias=False), nn.Linear(32, 32, bias=False)
        self.w1, self.w2 = nn.Linear(32, 88, bias=False), nn.Linear(88, 32, bias=False)
        self.norm = nn.LayerNorm(32)
        self.output = nn.Linear(32, 50, bias=False)


def tiny(dtype=torch.bfloat16, seed=0) -> nn.Module:
    torch.manual_seed(seed)
    return Tiny().to(dtype)


def set_grads(model, step):
    gen = torch.Generator().manual_seed(100 + step)
    for p in model.parameters():
        p.grad = (torch.randn(p.shape, generator=gen) * 1e-2).to(p.dtype)


def expected_rounding(fp32_params, args_rounding, steps):
    """Each fp32 result rounded as the op must round it: key(seed, counter, id_i, step_i)."""
    seed, counter, *ids = args_rounding
    return [rounding_ref.round_bf16(p, rounding_ref.key(seed, counter, ids[i], int(steps[i])))
            for i, p in enumerate(fp32_params)]


def state_lists(op) -> range:
    """Indices of an op's state-list arguments (exp_avgs ... steps)."""
    return range(2, 8) if op is torch.ops.memopt.apollo_ else range(2, 5)


@pytest.mark.parametrize("name", list(COMPILABLE))
def test_ops_round_their_fp32_result_as_specified(name):
    """The op calls of each front end, three steps, on bf16 parameters with stochastic rounding
    and on float32 twins (every other input equal): the bf16 parameters are the twins' results
    rounded by the reference, bit for bit."""
    model = tiny(torch.float32)
    with torch.no_grad():
        for p in model.parameters():  # values a bf16 parameter holds exactly
            p.copy_(p.to(torch.bfloat16))
    opt = COMPILABLE[name](model, lr=3e-3, weight_decay=0.1, stochastic_rounding=True,
                           rounding_seed=SEED)
    opt.init_state(pooled=False)
    for step in range(3):
        set_grads(model, step)
        for group in opt.param_groups:
            params = list(group["params"])
            op, args = opt._op_call(group, params, [p.grad for p in params],
                                    [opt.state[p] for p in params])
            apollo = op is torch.ops.memopt.apollo_
            twin, bf16 = list(copy.deepcopy(args)), list(copy.deepcopy(args))
            bf16[0] = [p.detach().to(torch.bfloat16) for p in args[0]]
            bf16[1] = [g.to(torch.bfloat16) for g in args[1]]
            twin[0] = [p.detach().clone() for p in args[0]]
            twin[1] = [g.to(torch.bfloat16).float() for g in args[1]]
            at = [a.name for a in op.default._schema.arguments].index("rounding")
            twin[at] = []  # the twins round to nearest (float32: nothing to round)
            if apollo:  # past the refresh, so that P is the stored one (bf16 values in both)
                bf16[4] = [q.to(torch.bfloat16) for q in args[4]]
                twin[4] = [q.to(torch.bfloat16).float() for q in args[4]]
                for s in bf16[7] + twin[7]:
                    s.fill_(step + 1)
            op(*bf16)
            op(*twin)
            steps = bf16[7] if apollo else bf16[4]
            want = expected_rounding(twin[0], bf16[at], [float(s) for s in steps])
            for i, (g, w) in enumerate(zip(bf16[0], want)):
                assert torch.equal(g.view(torch.int16), w.view(torch.int16)), \
                    f"{name} step {step} tensor {i} {tuple(g.shape)}"
            with torch.no_grad():  # the bf16 result and the state go on to the next step
                for p, g in zip(params, bf16[0]):
                    p.copy_(g.float())
                for k in state_lists(op):
                    for mine, new in zip(args[k], twin[k]):
                        mine.copy_(new)


def test_frugal_op_rounds_every_mode_as_specified():
    """frugal_ over every mode (whole, state-free, columns, rows, randk, both projections)."""
    case = make_case(ALL_MODES, torch.float32, torch.float32)
    for p in case["params"]:
        p.copy_(p.to(torch.bfloat16))
    case["subs"] = [s.to(torch.bfloat16).float() if s.is_floating_point() else s
                    for s in case["subs"]]
    n = len(case["params"])
    rounding = [SEED, COUNTER, *range(10, 10 + n)]
    lr, *rest = scalars("sign_sgd", HP)
    lr = torch.tensor(lr, dtype=torch.float64)
    for step in range(2):
        grads = [g.to(torch.bfloat16) for g in grads_at(case, step)]
        twin = [copy.deepcopy(case[k]) for k in ("params", "m", "v", "steps", "subs")]
        bf16 = copy.deepcopy(twin)
        bf16[0] = [p.to(torch.bfloat16) for p in bf16[0]]
        bf16[4] = [s.to(torch.bfloat16) if s.is_floating_point() else s for s in bf16[4]]
        torch.ops.memopt.frugal_(bf16[0], grads, bf16[1], bf16[2], bf16[3], bf16[4],
                                 case["modes"], lr, *rest, rounding)
        torch.ops.memopt.frugal_(twin[0], [g.float() for g in grads], twin[1], twin[2], twin[3],
                                 twin[4], case["modes"], lr, *rest)
        steps = [float(s) if s.numel() == 1 else 0.0 for s in bf16[3]]
        want = expected_rounding(twin[0], rounding, steps)
        for i, (g, w) in enumerate(zip(bf16[0], want)):
            assert torch.equal(g.view(torch.int16), w.view(torch.int16)), \
                f"mode {case['modes'][i]} {tuple(g.shape)} step {step}"
        case["params"] = [g.float() for g in bf16[0]]
        case["m"], case["v"], case["steps"] = twin[1], twin[2], twin[3]


@pytest.mark.parametrize("device", [EMU])
@pytest.mark.parametrize("name", list(COMPILABLE) + ["frugal"])
def test_cuda_kernels_round_as_the_cpu_op(device, name):
    """The CUDA kernels (on the emulated device) draw the CPU loops' bits: the same bf16 results,
    but where the two fp32 results differ in their last bit (reduction order), by one bf16 step
    at most, rarely."""
    if name == "frugal":
        case = make_case(ALL_MODES, torch.bfloat16, torch.float32)
        lr, *rest = scalars("sign_sgd", HP)
        rounding = [SEED, COUNTER, *range(len(case["params"]))]
        calls = [(torch.ops.memopt.frugal_, lambda: (
            [p.clone() for p in case["params"]], grads_at(case, 0), copy.deepcopy(case["m"]),
            copy.deepcopy(case["v"]), copy.deepcopy(case["steps"]), case["subs"], case["modes"],
            torch.tensor(lr, dtype=torch.float64), *rest, rounding))]
    else:
        model = tiny()
        opt = COMPILABLE[name](model, lr=3e-3, weight_decay=0.1, stochastic_rounding=True,
                               rounding_seed=SEED)
        opt.init_state(pooled=False)
        set_grads(model, 0)
        calls = []
        for group in opt.param_groups:
            params = list(group["params"])
            op, args = opt._op_call(group, params, [p.grad for p in params],
                                    [opt.state[p] for p in params])
            calls.append((op, lambda args=args: (
                [p.detach().clone() for p in args[0]], *copy.deepcopy(args[1:]))))
    for op, make in calls:
        cpu_args, emu_args = make(), make()
        op(*cpu_args)
        getattr(ops(device), op._qualified_op_name.split("::")[1])(*emu_args)
        for a, b in zip(cpu_args[0], emu_args[0]):
            ai, bi = a.view(torch.int16).int(), b.view(torch.int16).int()
            assert (ai - bi).abs().max().item() <= 1 if a.numel() else True
            assert (ai == bi).float().mean().item() >= 0.999, tuple(a.shape)


def run(cls_name, steps, seed=SEED, sr=True, resume_at=None, layerwise=False):
    """`steps` steps of a bf16 tiny model; resume_at: a fresh model and optimizer load the
    checkpoint taken there (through torch.save) and go on."""
    model = tiny()
    make = FRONT_ENDS[cls_name]
    opt = make(model, lr=1e-3, stochastic_rounding=sr, rounding_seed=seed)
    for step in range(steps):
        if step == resume_at:
            saved = copy.deepcopy((model.state_dict(), opt.state_dict()))
            model = tiny(seed=99)
            opt = make(model, lr=1e-3, stochastic_rounding=sr, rounding_seed=seed + 1)
            model.load_state_dict(saved[0])
            opt.load_state_dict(saved[1])
        set_grads(model, step)
        if layerwise:
            for p in model.parameters():
                opt.step_params([p])
        else:
            opt.step()
    return [p.detach().clone() for p in model.parameters()]


def same(a, b):
    return all(torch.equal(x.view(torch.int16), y.view(torch.int16)) for x, y in zip(a, b))


@pytest.mark.parametrize("name", ["adamw", "adam_mini", "apollo_mini", "frugal"])
def test_reproducible_resumable_and_seeded(name):
    """Same seed, same bits; another seed, other bits; a run resumed from its checkpoint (whose
    groups carry the seed, whose steps carry the position) is the uninterrupted run; layer-wise
    stepping draws the bits of the whole step. FRUGAL's state-free blocks, which have no step
    count, take the optimizer's (its re-selection every 2 steps is resumed across too)."""
    base = run(name, 5)
    assert same(base, run(name, 5))
    assert not same(base, run(name, 5, seed=SEED + 1))
    assert same(base, run(name, 5, resume_at=3))
    if name != "frugal":  # (FRUGAL steps all tensors at once)
        assert same(base, run(name, 5, layerwise=True))
    assert not same(base, run(name, 5, sr=False))


@pytest.mark.parametrize("name", ["adamw", "apollo_mini"])
def test_unbiased_where_nearest_stalls(name):
    """Updates far below half a bf16 step (lr 1e-4 on weights of 1.0, whose step is 2^-7):
    rounded to nearest the weights never move; stochastically their mean follows the fp32
    trajectory within the binomial spread of the roundings."""
    moved = {}
    for sr in (False, True):
        w = nn.Parameter(torch.ones(256, 256, dtype=torch.bfloat16))
        ref = nn.Parameter(torch.ones(256, 256, dtype=torch.float32))
        make = (lambda ps, **kw: memopt_core.AdamW(ps, **kw)) if name == "adamw" else \
            (lambda ps, **kw: memopt_core.ApolloMini([("wq.weight", ps[0])], **kw))
        opt = make([w], lr=1e-4, weight_decay=0.0, stochastic_rounding=sr)
        ref_opt = make([ref], lr=1e-4, weight_decay=0.0)
        for step in range(20):
            gen = torch.Generator().manual_seed(step)
            g = torch.rand(256, 256, generator=gen) + 0.5  # positive: the weights go down
            w.grad, ref.grad = g.to(torch.bfloat16), g.to(torch.bfloat16).float()
            opt.step()
            ref_opt.step()
        moved[sr] = (w.float().mean() - 1).item(), (ref.mean() - 1).item()
    assert moved[False][0] == 0.0  # the stall stochastic rounding exists for
    got, want = moved[True]
    # each element's rounding error is within one step 2^-8 below 1 (bounded, zero-mean): the
    # mean of 65536 has a standard deviation under 2^-8 / 256
    assert abs(got - want) < 6 * 2 ** -8 / 256 and want < -1e-4, (got, want)


def test_bad_options_and_arguments_raise_and_change_nothing():
    model = tiny()
    with pytest.raises(TypeError, match="stochastic_rounding"):
        memopt_core.AdamW(model.parameters(), stochastic_rounding="yes")
    with pytest.raises(ValueError, match="rounding_seed"):
        memopt_core.AdamMini(model, dim=32, n_heads=4, stochastic_rounding=True, rounding_seed=-1)
    p = torch.ones(4, dtype=torch.bfloat16)
    before = p.clone()
    with pytest.raises(ValueError, match="rounding must be"):
        torch.ops.memopt.adamw_([p], [p.clone()], [torch.zeros(4)], [torch.zeros(4)],
                                [torch.zeros(())], torch.tensor(0.1), 0.9, 0.99, 1e-8, 0.0,
                                "torch", [1, 2])
    assert torch.equal(p, before)


def test_checkpoint_from_before_the_option_rounds_to_nearest():
    """A state_dict saved without the keys (before the option existed) loads as it was stepped."""
    model = tiny()
    opt = memopt_core.AdamW(model.parameters(), lr=1e-3, stochastic_rounding=True)
    set_grads(model, 0)
    opt.step()
    sd = opt.state_dict()
    for g in sd["param_groups"]:
        del g["stochastic_rounding"], g["rounding_seed"]
    opt.load_state_dict(sd)
    assert all(g["stochastic_rounding"] is False for g in opt.param_groups)


def test_libtorch_classes_round_as_the_python_front_end(cpp_runner):
    """memopt's LibTorch classes with stochastic_rounding / rounding_seed (C++ options, saved with
    the groups) step bf16 parameters bit for bit as the Python front end does: the same ids
    (positions over the groups), seeds and, for FRUGAL, counter."""
    from cpp_runner import assert_same_trajectory, job, steps, trajectory
    from test_cpp_optimizers import HP, NAMES, OPTIONS, WD, make_params
    sr = dict(stochastic_rounding=True, rounding_seed=SEED)
    frugal = dict(lr=1e-2, weight_decay=0.1, update_gap=3, seed=1234, density=0.5)
    cases = {  # name: (LibTorch options, the Python optimizer of (params, names))
        "adamw": (OPTIONS["adamw"], lambda ps: memopt_core.AdamW(ps, **HP, weight_decay=WD, **sr)),
        "adam_mini": (OPTIONS["adam_mini"], lambda ps: memopt_core.AdamMini(
            list(zip(NAMES, ps)), **OPTIONS["adam_mini"], **sr)),
        "apollo_mini": (dict(lr=1e-2, update_proj_gap=3), lambda ps: memopt_core.ApolloMini(
            list(zip(NAMES, ps)), lr=1e-2, update_proj_gap=3, **sr)),
        "frugal": (frugal, lambda ps: memopt_core.Frugal(list(zip(NAMES, ps)), **frugal, **sr)),
    }
    start = [p.to(torch.bfloat16) for p in make_params()]
    results = cpp_runner(*[job(name, zip(NAMES, start), {**o, **sr}, steps(start, 0, 5))
                           for name, (o, _) in cases.items()])
    for (name, (_, make)), got in zip(cases.items(), results):
        params = [p.clone().requires_grad_() for p in start]
        want = trajectory(make(params), params, 5)
        assert_same_trajectory(got, want, NAMES, name)


@pytest.mark.parametrize("dtype, rounding, expected", [
    ("bf16", "stochastic", True), ("bf16", "nearest", False), ("fp32", "stochastic", False)])
def test_memopt_train_rounds_bf16_weights_stochastically(dtype, rounding, expected, capsys):
    """`memopt train/compare --dtype bf16` make the optimizer with stochastic rounding seeded by
    --seed, unless --rounding nearest; --help says so."""
    from test_train import trainer
    t = trainer(optimizer="adamw", dtype=dtype, rounding=rounding, seed=5)
    groups = t.opt.param_groups
    assert all(g["stochastic_rounding"] is expected for g in groups)
    if expected:
        assert all(g["rounding_seed"] == 5 for g in groups)
    from memopt_core.app.cli import build_parser
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--help"])
    assert "stochastic rounding" in " ".join(capsys.readouterr().out.split())


def _fsdp_worker(rank, world, names):
    """Each optimizer with stochastic rounding on a bf16 tiny LLaMA under FSDP2 (dist_cases'
    model, synthetic gradients), three steps, twice, then rounded to nearest: the full parameters of the three runs."""
    from dist_cases import build, snapshot, train
    out = {}
    for name in names:
        runs = []
        for sr in (True, True, False):
            model, inner, opt = build(name, "fsdp", torch.bfloat16, world=world, rank=rank)
            for g in opt.param_groups:
                g.update(stochastic_rounding=sr, rounding_seed=SEED)
            train(model, inner, opt, 3, synthetic=True, rank=rank, world=world)
            runs.append(snapshot(inner, opt)["params"])
        out[name] = runs
    return out if rank == 0 else {}


def test_fsdp2_rounds_stochastically_and_reproducibly():
    """Under FSDP2 (2 ranks, gloo) every optimizer rounds its shards stochastically: a run is
    reproducible, and within the bf16 steps its roundings can part it by from the one-process
    run (each shard draws its own bits, README)."""
    from dist_cases import build, snapshot, train
    from dist_util import run_workers
    names = ["adamw", "adam_mini", "apollo_mini", "frugal"]
    got = run_workers(_fsdp_worker, 2, names)[0]
    for name in names:
        first, again, nearest = got[name]
        assert same(first, again) and not same(first, nearest), name
        model, inner, opt = build(name, None, torch.bfloat16)
        for g in opt.param_groups:
            g.update(stochastic_rounding=True, rounding_seed=SEED)
        train(model, inner, opt, 3, synthetic=True)
        for a, b in zip(first, snapshot(inner, opt)["params"]):
            # the updates are equal (so are the gradients); each step's rounding may part the
            # runs by one bf16 step of the values it rounds (at most the tensor's largest)
            step = 2.0 ** (torch.log2(b.float().abs().max()).floor() - 7)
            assert (a.float() - b.float()).abs().max() <= 3 * step, name


@pytest.mark.parametrize("name", ["adamw", "adam_mini", "apollo_mini"])
def test_compiled_step_rounds_as_eager(name):
    """torch.compile(opt.step, fullgraph=True): the rounding argument is a constant of the graph
    (the step count, which the key mixes in, is read by the op), so one compilation serves every
    step and draws the eager step's bits."""
    from torch._dynamo.testing import CompileCounterWithBackend
    runs, counter = [], None
    for compiled in (False, True):
        model = tiny()
        opt = COMPILABLE[name](model, lr=torch.tensor(1e-3), stochastic_rounding=True,
                               rounding_seed=SEED)
        step = opt.step
        if compiled:
            torch._dynamo.reset()
            counter = CompileCounterWithBackend("aot_eager")
            opt.init_state(pooled=False)
            step = torch.compile(opt.step, backend=counter, fullgraph=True)
        for s in range(3):
            set_grads(model, s)
            step()
        runs.append([p.detach().clone() for p in model.parameters()])
    assert same(*runs) and counter.frame_count == 1
