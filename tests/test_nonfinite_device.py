"""nonfinite="skip" and torch.amp.GradScaler decided on the device (nonfinite.device_found_inf)
for the optimizers whose ops take found_inf: AdamW, AdamMini, SlimAdam. On a GPU the flag goes
into the ops and nothing is read back (the cuda tests run a step under
torch.cuda.set_sync_debug_mode("error")); FSDP2 batches all-reduce the flag on the device
first (2 gloo ranks against one process). Without a GPU, the CPU stands in: "cpu" joins
nonfinite.DEVICE_TYPES, so the same front-end path runs with the CPU op honouring found_inf, and
the host decision is made to fail if it is used. The oracle is test_nonfinite.py's: the same
optimizer never asked to take the skipped step."""
from __future__ import annotations

import math

import pytest
import torch

import memopt_core
from conftest import assert_snapshot_equal, make_grads, make_llama, set_grads, snapshot
from cuda_util import requires_cuda
from memopt_core import nonfinite
from test_nonfinite import (BAD_STEP, assert_equals_unscaled_oracle, make, scaled_run,
                            train)
from test_nonfinite import \
    test_layerwise_skips_each_parameter_whose_gradient_is_not_finite as layerwise_case

DEVICE_SKIP = ["adamw", "adam_mini", "slim_adam"]


@pytest.fixture
def on_device(monkeypatch):
    monkeypatch.setattr(nonfinite, "DEVICE_TYPES", ("cpu", "cuda"))

    def host_decision(opt, batches):
        policy = opt._skips_nonfinite or getattr(opt, "found_inf", None) is not None
        assert not policy, "the skip was decided on the host"
        return nonfinite.skips_step(opt, batches)
    monkeypatch.setattr(memopt_core._base, "skips_step", host_decision)


@pytest.mark.parametrize("value", [math.nan, math.inf])
@pytest.mark.parametrize("name", DEVICE_SKIP)
def test_a_skip_decided_on_the_device_is_a_step_never_taken(on_device, name, value):
    model, opt = train(name, 5, skip_bad=False, value=value, nonfinite="skip")
    _, oracle = train(name, 5, skip_bad=True)
    assert opt.skipped_steps == 1
    assert_snapshot_equal(snapshot(opt), snapshot(oracle))


@pytest.mark.parametrize("name", DEVICE_SKIP)
def test_a_skipped_first_step_on_the_device_makes_zero_state_only(on_device, name):
    """The host cannot know the first step is skipped, so its state exists (zeros, step 0);
    the next step is then exactly a fresh optimizer's first."""
    model = make_llama(seed=5)
    opt = make(name, model, nonfinite="skip")
    params = list(model.parameters())
    before = [p.detach().clone() for p in params]
    grads = make_grads(params, 0)
    grads[0].view(-1)[-1] = math.inf
    set_grads(params, grads)
    opt.step()
    assert opt.skipped_steps == 1
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    assert all(float(s["step"]) == 0 and all(not t.any() for t in s.values())
               for s in opt.state.values())
    oracle_model = make_llama(seed=5)
    oracle = make(name, oracle_model)
    for m, o in ((model, opt), (oracle_model, oracle)):
        set_grads(list(m.parameters()), make_grads(params, 1))
        o.step()
    assert_snapshot_equal(snapshot(opt), snapshot(oracle))


@pytest.mark.parametrize("unscale_first", [False, True])
@pytest.mark.parametrize("name", DEVICE_SKIP)
def test_grad_scaler_decided_on_the_device(on_device, name, unscale_first):
    model, opt, scales = scaled_run(name, unscale_first)
    assert opt.skipped_steps == 1
    assert_equals_unscaled_oracle(name, model)


def test_layerwise_decides_each_call_on_the_device(on_device):
    layerwise_case()


def test_skipped_steps_counted_on_the_device_are_saved_and_reset(on_device):
    model, opt = train("adamw", 4, skip_bad=False, nonfinite="skip")
    sd = opt.state_dict()
    assert all(g["skipped_steps"] == 1 for g in sd["param_groups"])
    opt.skipped_steps = 0
    assert opt.skipped_steps == 0
    opt.load_state_dict(sd)
    assert opt.skipped_steps == 1


@pytest.mark.parametrize("name", ["adamw", "apollo_mini", "frugal"])
def test_the_host_decides_on_the_cpu_and_for_host_scheduled_optimizers(name):
    """Only GPU batches of optimizers whose ops take found_inf are decided on the device."""
    model = make_llama(seed=5)
    opt = make(name, model, nonfinite="skip")
    params = list(model.parameters())
    set_grads(params, make_grads(params, 0))
    assert nonfinite.device_found_inf(opt, [(opt.param_groups[0], params)]) is None


# ---- APOLLO and FRUGAL: on the device away from their schedules' host decisions --------------
SCHEDULED_BAD = (1, 3, 4)  # of 9 steps, with update_proj_gap / update_gap 3
SCHEDULED = {"apollo": dict(update_proj_gap=3), "apollo_mini": dict(update_proj_gap=3),
             "apollo-unstored": dict(update_proj_gap=3, store_projection=False),
             "frugal": dict(update_gap=3, density=0.5),
             "frugal-columns": dict(update_gap=3, density=0.5, selection="columns"),
             "frugal-random": dict(update_gap=3, density=0.5, selection="random")}


@pytest.mark.parametrize("case", list(SCHEDULED))
def test_scheduled_optimizers_decide_on_the_device_between_their_host_decisions(monkeypatch,
                                                                                case):
    """apollo_ given found_inf refreshes no projection and frugal_ changes no selection, so the
    host decides each step where a refresh or a new cycle may be due for a step count it does
    not know exactly: counts 0 (the first step), 1 (1 skipped), 2, 2 (3 and 4 skipped), 2
    (step 5: 2 or 3), 3, ... With a gap of 3 the host decides steps 0, 3, 5 and 6, the device
    the others; the result equals the optimizer that never took the bad steps, bit for bit,
    FRUGAL's step count (in its state_dict) included."""
    name, kw = case.split("-")[0], SCHEDULED[case]
    monkeypatch.setattr(nonfinite, "DEVICE_TYPES", ("cpu", "cuda"))
    host, step = [], None
    real = nonfinite.skips_step

    def host_decision(opt, batches):
        if opt._skips_nonfinite:  # (not the oracle's)
            host.append(step)
        return real(opt, batches)
    monkeypatch.setattr(memopt_core._base, "skips_step", host_decision)
    models, opts = [], []
    for oracle in (False, True):
        models.append(make_llama(seed=5))
        opts.append(make(name, models[-1], **kw, nonfinite="propagate" if oracle else "skip"))
    params = list(models[0].parameters())
    for step in range(9):
        grads = make_grads(params, step)
        if step in SCHEDULED_BAD:
            grads[step].view(-1)[0] = math.inf
        set_grads(params, grads)
        opts[0].step()
        if step not in SCHEDULED_BAD:
            set_grads(list(models[1].parameters()), make_grads(params, step))
            opts[1].step()
    assert host == [0, 3, 5, 6] and opts[0].skipped_steps == len(SCHEDULED_BAD)
    assert_snapshot_equal(snapshot(opts[0]), snapshot(opts[1]))
    saved = [o.state_dict()["param_groups"][0].get("frugal", {}).get("t") for o in opts]
    assert saved[0] == saved[1]


# ---- FSDP2: the flag all-reduced on the device ------------------------------------------------
FSDP_SKIPPED = (1, 3)  # of 5 steps, each with an inf in one parameter's shard on rank 1 only
# name -> (optimizer, options, steps the host decides: APOLLO's first, which draws P, and
# FRUGAL's, which selects)
FSDP_CASES = {**{name: (name, {}, 0) for name in DEVICE_SKIP},
              "apollo": ("apollo", {}, 1), "apollo_mini": ("apollo_mini", {}, 1),
              "frugal": ("frugal", {}, 1),
              "frugal-random": ("frugal", dict(selection="random"), 1)}  # left projections


def _fsdp_run(case, rank=0, world=1):
    """(snapshot, skipped_steps) of 5 synthetic steps of a LLaMA whose heads and vocabulary
    straddle the shards. world > 1: FSDP2 with nonfinite="skip" decided on the device (the CPU
    standing in, the host decision made to fail), FSDP_SKIPPED poisoned on rank 1; world 1: the
    oracle, one process never asked to take FSDP_SKIPPED."""
    from dist_cases import STRADDLE, snapshot
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import distribute_tensor
    name, options, _ = FSDP_CASES[case]
    model = make_llama(dtype=torch.float64, **STRADDLE)
    if world > 1:
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
    opt = memopt_core.make_optimizer(name, model, lr=1e-2, weight_decay=0.1, **options,
                                     nonfinite="skip" if world > 1 else "propagate")
    params = list(model.parameters())
    for step in range(5):
        if world == 1 and step in FSDP_SKIPPED:
            continue
        for k, (p, g) in enumerate(zip(params, make_grads(params, step))):
            p.grad = distribute_tensor(g, p.device_mesh, p.placements) if world > 1 else g
            if world > 1 and step in FSDP_SKIPPED and rank == 1 and k == step:
                p.grad.to_local().view(-1)[0] = math.inf
        opt.step()
    return snapshot(model, opt), opt.skipped_steps


def _fsdp_device_skip(rank, world):
    """{case: (snapshot, skipped_steps, steps decided on the host)} on this rank."""
    from memopt_core import _base
    nonfinite.DEVICE_TYPES = ("cpu", "cuda")
    real, host = nonfinite.skips_step, []

    def host_decision(opt, batches):
        host.append(opt._skips_nonfinite)
        return real(opt, batches)
    _base.skips_step = host_decision
    out = {}
    for case in FSDP_CASES:
        host.clear()
        out[case] = (*_fsdp_run(case, rank, world), sum(host))
    return out


def test_fsdp2_skip_decided_on_the_device_is_a_step_never_taken_on_every_rank():
    """Each optimizer's FSDP2 batches (AdamW's elementwise op, Adam-mini's and SlimAdam's block
    sums and shard update, APOLLO's sharded projections, FRUGAL's op on the local shards or
    its sharded left projections)
    take the flag reduced across ranks on the device: a bad shard on one rank skips every
    rank, equal to one process that never took those steps."""
    from dist_cases import max_rel_err
    from dist_util import run_workers
    results = run_workers(_fsdp_device_skip, 2)
    for case, (_, _, host_steps) in FSDP_CASES.items():
        want, _ = _fsdp_run(case)
        got, _, _ = results[0][case]
        assert [r[case][1:] for r in results] == [(len(FSDP_SKIPPED), host_steps)] * 2, case
        assert all(float(s["step"]) == 5 - len(FSDP_SKIPPED) for s in got["state"]
                   if "step" in s), case
        assert max_rel_err(got, want) <= 1e-12, case


# ---- on a GPU --------------------------------------------------------------------------------
def _step_never_synchronising(opt, step: int, warmup: int = 1) -> None:
    """opt.step(); from step `warmup` on under set_sync_debug_mode("error") (the first steps
    make the state and move the step counters beside the parameters: a copy from the host)."""
    if step < warmup:
        opt.step()
        return
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        opt.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("name", DEVICE_SKIP)
def test_a_gpu_step_with_skip_or_grad_scaler_never_synchronises(name):
    model = make_llama(seed=5).cuda()
    opt = make(name, model, nonfinite="skip")
    params = list(model.parameters())
    for step in range(5):
        grads = make_grads(params, step)
        if step == BAD_STEP:
            grads[-1].view(-1)[0] = math.nan
        set_grads(params, [g.cuda() for g in grads])
        _step_never_synchronising(opt, step)
    assert opt.skipped_steps == 1
    cpu_model, cpu_opt = train(name, 5, skip_bad=True)
    for p, q in zip(model.parameters(), cpu_model.parameters()):
        torch.testing.assert_close(p.cpu(), q, rtol=1e-4, atol=1e-6)


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("case", ["apollo", "apollo_mini", "apollo-unstored", "frugal"])
def test_scheduled_gpu_steps_between_host_decisions_never_synchronise(case):
    """The first step (which draws P, or selects and makes FRUGAL's state) is decided on the
    host, the second moves the counters to the GPU; the next ones, a NaN one included, run
    with no synchronisation (the default gaps are 200 steps). APOLLO with store_projection=False
    draws P from its seeds every step: they live on the CPU, its limiter norms on the GPU."""
    name, kw = case.split("-")[0], ({"store_projection": False} if "unstored" in case else {})
    model = make_llama(seed=5).cuda()
    opt = make(name, model, nonfinite="skip", **kw)
    params = list(model.parameters())
    for step in range(6):
        grads = make_grads(params, step)
        if step == 3:
            grads[-1].view(-1)[0] = math.nan
        set_grads(params, [g.cuda() for g in grads])
        _step_never_synchronising(opt, step, warmup=2)
    assert opt.skipped_steps == 1
    if name.startswith("apollo"):
        state = [s for s in opt.state.values() if "limiter_norm" in s]
        assert state and all(s["seed"].device.type == "cpu" and s["limiter_norm"].is_cuda
                             for s in state if "seed" in s)
    cpu_model = make_llama(seed=5)
    cpu_opt = make(name, cpu_model, **kw)
    for step in (0, 1, 2, 4, 5):
        set_grads(list(cpu_model.parameters()), make_grads(params, step))
        cpu_opt.step()
    for p, q in zip(model.parameters(), cpu_model.parameters()):
        torch.testing.assert_close(p.cpu(), q, rtol=1e-4, atol=1e-6)


def _fsdp_gpu_steps_without_sync(rank, world):
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import distribute_tensor
    skipped = {}
    for case in [*DEVICE_SKIP, "adam_mini-8bit"]:  # (8-bit m: cuda/adam_mini_shard.cu's passes)
        name, kw = case.split("-")[0], ({"state_bits": 8} if "8bit" in case else {})
        model = make_llama(seed=5, **({"vocab_size": 256, "intermediate_size": 256} if kw
                                      else {})).cuda()
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        opt = make(name, model, nonfinite="skip", **kw)
        params = list(model.parameters())
        for step in range(4):
            for k, (p, g) in enumerate(zip(params, make_grads(params, step))):
                p.grad = distribute_tensor(g.cuda(), p.device_mesh, p.placements)
                if step == 2 and k == 1:
                    p.grad.to_local().view(-1)[0] = math.nan
            _step_never_synchronising(opt, step)
        if kw:
            assert any(t.dtype == torch.int8 for s in opt.state.values() for t in s.values())
        skipped[case] = opt.skipped_steps
    return skipped


@pytest.mark.cuda
@requires_cuda
def test_an_fsdp2_gpu_step_with_skip_never_synchronises():
    """FSDP2 over NCCL (one rank): the flag's all-reduce and the sharded ops stay on the GPU."""
    from dist_util import run_workers
    [skipped] = run_workers(_fsdp_gpu_steps_without_sync, 1, backend="nccl")
    assert skipped == {name: 1 for name in [*DEVICE_SKIP, "adam_mini-8bit"]}
