"""The non-finite gradient policy (nonfinite="skip") and torch.amp.GradScaler, for every optimizer
in memopt_core.registry.OPTIMIZERS. The oracle of a skipped step is the same optimizer never
asked to take it: parameters and every state tensor bit-identical."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import memopt_core
from conftest import assert_snapshot_equal, make_grads, make_llama, set_grads, snapshot
from dist_util import run_workers

HP = dict(lr=3e-3, weight_decay=0.1)
BAD_STEP = 2  # the step whose gradients hold a non-finite value (its 3rd)


def make(name, model, **kw):
    return memopt_core.OPTIMIZERS[name].make(model, **{**HP, **kw})


def poisoned(params, step, value=math.nan, where=-1):
    """make_grads, with `value` in one element of parameter `where` at BAD_STEP."""
    grads = make_grads(params, step)
    if step == BAD_STEP:
        grads[where].view(-1)[0] = value
    return grads


def train(name, steps, skip_bad: bool, value=math.nan, **kw):
    """(model, opt) after `steps` steps with poisoned gradients; skip_bad: the oracle, which
    never calls step() at BAD_STEP."""
    model = make_llama(seed=5)
    opt = make(name, model, **kw)
    params = list(model.parameters())
    for step in range(steps):
        if skip_bad and step == BAD_STEP:
            continue
        set_grads(params, poisoned(params, step, value))
        opt.step()
    return model, opt


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_skip_leaves_everything_as_if_the_step_was_never_taken(opt_name, value):
    model, opt = train(opt_name, 5, skip_bad=False, value=value, nonfinite="skip")
    _, oracle = train(opt_name, 5, skip_bad=True)
    assert opt.skipped_steps == 1 and oracle.skipped_steps == 0
    assert_snapshot_equal(snapshot(opt), snapshot(oracle))


def test_a_skipped_first_step_creates_no_state(opt_name):
    model = make_llama(seed=5)
    opt = make(opt_name, model, nonfinite="skip")
    params = list(model.parameters())
    before = [p.detach().clone() for p in params]
    grads = make_grads(params, 0)
    grads[0].view(-1)[-1] = math.inf  # the first parameter: found before any state is made
    set_grads(params, grads)
    opt.step()
    assert not opt.state and opt.skipped_steps == 1
    assert all(torch.equal(p, b) for p, b in zip(params, before))


def test_propagate_is_the_default_and_torchs_behaviour(opt_name):
    model, opt = train(opt_name, 3, skip_bad=False)
    assert opt.nonfinite == "propagate" and opt.skipped_steps == 0
    assert not torch.isfinite(list(model.parameters())[-1]).all()  # the NaN reached the weight


def test_skipped_steps_survive_state_dict_and_old_checkpoints_load(opt_name):
    model, opt = train(opt_name, 4, skip_bad=False, nonfinite="skip")
    sd = opt.state_dict()
    assert all(g["skipped_steps"] == 1 for g in sd["param_groups"])
    fresh = make(opt_name, model, nonfinite="skip")
    fresh.load_state_dict(sd)
    assert fresh.skipped_steps == 1
    assert all("skipped_steps" not in g for g in fresh.param_groups)
    for g in sd["param_groups"]:  # a checkpoint from before the counter: 0
        del g["skipped_steps"]
    fresh.load_state_dict(sd)
    assert fresh.skipped_steps == 0


@pytest.mark.parametrize("bad", [-1, 1.5, "2", True])
def test_a_bad_skipped_steps_count_is_refused(bad):
    model, opt = train("adamw", 3, skip_bad=False, nonfinite="skip")
    sd = opt.state_dict()
    sd["param_groups"][0]["skipped_steps"] = bad
    fresh = make("adamw", model)
    with pytest.raises(ValueError, match="skipped_steps"):
        fresh.load_state_dict(sd)
    assert not fresh.state


@pytest.mark.parametrize("bad", ["Skip", None, "nan", 1])
def test_bad_nonfinite_option_raises(opt_name, bad):
    with pytest.raises(ValueError, match="nonfinite must be"):
        make(opt_name, make_llama(), nonfinite=bad)


# ---- torch.amp.GradScaler ------------------------------------------------------------------
def batches(steps):
    return torch.randint(0, 64, (steps, 2, 12), generator=torch.Generator().manual_seed(1))


def lm_loss(model, ids):
    return model(input_ids=ids, labels=ids).loss


def scaled_run(name, unscale_first: bool, steps=5):
    """Training with GradScaler (the loss scaled by 2^10, gradients made by backward), the loss
    at BAD_STEP times inf. unscale_first: the gradient-clipping recipe (scaler.unscale_(opt)
    before scaler.step(opt))."""
    model = make_llama(seed=3)
    opt = make(name, model)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, growth_interval=1000)
    scales = []
    for step, ids in enumerate(batches(steps)):
        opt.zero_grad()
        loss = lm_loss(model, ids) * (math.inf if step == BAD_STEP else 1.0)
        scaler.scale(loss).backward()
        if unscale_first:
            scaler.unscale_(opt)
        scaler.step(opt)
        scaler.update()
        scales.append(scaler.get_scale())
    return model, opt, scales


@pytest.mark.parametrize("unscale_first", [False, True])
def test_grad_scaler_unscales_in_step_and_skips_an_inf_step(opt_name, unscale_first):
    model, opt, scales = scaled_run(opt_name, unscale_first)
    assert opt.skipped_steps == 1
    assert scales == [2.0 ** 10] * BAD_STEP + [2.0 ** 9] * (len(scales) - BAD_STEP)
    assert not hasattr(opt, "grad_scale") and not hasattr(opt, "found_inf")
    assert_equals_unscaled_oracle(opt_name, model)


def assert_equals_unscaled_oracle(name, model, steps=5):
    """`model` after scaled_run equals the same optimizer on the unscaled loss with BAD_STEP
    left out; the scales are powers of two, so the unscaled gradients are exact and the
    trajectories bit-identical."""
    ref_model = make_llama(seed=3)
    ref_opt = make(name, ref_model)
    for step, ids in enumerate(batches(steps)):
        if step != BAD_STEP:
            ref_opt.zero_grad()
            lm_loss(ref_model, ids).backward()
            ref_opt.step()
    for p, q in zip(model.parameters(), ref_model.parameters()):
        assert torch.equal(p, q)


# ---- layer-wise, compile, DTensor ----------------------------------------------------------
def test_layerwise_skips_each_parameter_whose_gradient_is_not_finite():
    """Layer-wise stepping cannot skip the whole step (earlier parameters are stepped before a
    later gradient exists): each step_params call is decided alone and counted."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    opt = memopt_core.AdamW(model.parameters(), nonfinite="skip", **HP)
    layerwise = memopt_core.LayerwiseStep(opt)
    before = [p.detach().clone() for p in model.parameters()]
    model[1].weight.register_hook(lambda g: torch.full_like(g, math.nan))
    model(torch.randn(3, 4)).sum().backward()
    layerwise.remove()
    changed = [not torch.equal(p, b) for p, b in zip(model.parameters(), before)]
    assert changed == [True, True, False, True]  # 1.weight skipped, the rest stepped
    assert opt.skipped_steps == 1


def test_skip_under_compile_says_how_to_compile():
    p = nn.Parameter(torch.randn(4))
    opt = memopt_core.AdamW([p], nonfinite="skip")
    p.grad = torch.randn(4)
    with pytest.raises(Exception, match="outside compiled code"):
        torch.compile(opt.step, fullgraph=True)()


def _dtensor_skip(rank, world):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor
    mesh = init_device_mesh("cpu", (world,))
    torch.manual_seed(0)
    w = nn.Parameter(distribute_tensor(torch.randn(6, 3), mesh, [Shard(0)]))
    opt = memopt_core.AdamW([w], nonfinite="skip")
    before = w.full_tensor().clone()
    grad = distribute_tensor(torch.ones(6, 3), mesh, [Shard(0)])
    if rank == 1:  # only this rank's shard is bad: both ranks must skip
        grad.to_local()[0, 0] = math.inf
    w.grad = grad
    opt.step()
    skipped = (opt.skipped_steps, torch.equal(before, w.full_tensor()), len(opt.state))
    w.grad = distribute_tensor(torch.ones(6, 3), mesh, [Shard(0)])
    opt.step()
    return skipped, opt.skipped_steps, torch.equal(before, w.full_tensor())


def test_a_bad_shard_on_one_rank_skips_every_rank():
    for first, skipped, unchanged in run_workers(_dtensor_skip, 2):
        assert first == (1, True, 0)
        assert skipped == 1 and not unchanged


def test_nonfinite_can_be_changed_after_construction_and_is_checked():
    p = nn.Parameter(torch.ones(3))
    opt = memopt_core.AdamW([p], lr=0.1)
    with pytest.raises(ValueError, match="nonfinite must be"):
        opt.nonfinite = "always"
    assert opt.nonfinite == "propagate"
    opt.nonfinite = "skip"
    p.grad = torch.tensor([1.0, math.nan, 1.0])
    opt.step()
    assert opt.skipped_steps == 1 and torch.equal(p, torch.ones(3))
