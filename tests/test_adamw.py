"""memopt_core.AdamW against its float64 paper reference (tests/reference/adamw_ref.py) and
against torch.optim.AdamW: parameters and every state tensor after >= 7 steps."""
from __future__ import annotations

import copy

import pytest
import torch

import memopt_core
from conftest import (assert_close, step_with_scheduler, assert_within_low_precision_budget, assert_snapshot_equal, make_grads, make_llama, rounding_atol,
                      set_grads, snapshot)
from reference.adamw_ref import AdamWRef

STEPS = 8


def _three_groups(model):
    """Embeddings/head, layer 0, the rest: different lr and weight decay per group."""
    named = list(model.named_parameters())
    g0 = [p for n, p in named if "embed" in n or "lm_head" in n]
    g1 = [p for n, p in named if ".layers.0." in n]
    g2 = [p for n, p in named if not ("embed" in n or "lm_head" in n or ".layers.0." in n)]
    return [dict(params=g0, lr=2e-3, weight_decay=0.1),
            dict(params=g1, lr=5e-3),                     # default weight decay (0.05 below)
            dict(params=g2, lr=7e-4, weight_decay=0.0)]


def _group_hparams(groups, default_wd):
    lrs, wds = [], []
    for g in groups:
        for _ in g["params"]:
            lrs.append(g["lr"])
            wds.append(g.get("weight_decay", default_wd))
    return lrs, wds


def test_matches_reference_and_torch_adamw_with_groups():
    betas, eps, wd = (0.9, 0.95), 1e-8, 0.05
    ours_model, torch_model = make_llama(seed=3), make_llama(seed=3)
    ours = memopt_core.AdamW(_three_groups(ours_model), lr=1e-3, betas=betas, eps=eps, weight_decay=wd)
    theirs = torch.optim.AdamW(_three_groups(torch_model), lr=1e-3, betas=betas, eps=eps,
                               weight_decay=wd, foreach=False)
    ours_params = [p for g in ours.param_groups for p in g["params"]]
    torch_params = [p for g in theirs.param_groups for p in g["params"]]
    lrs, wds = _group_hparams(ours.param_groups, wd)
    assert len(set(lrs)) == 3 and len(set(wds)) == 3
    ref = AdamWRef(ours_params, betas=betas, eps=eps, lrs=lrs, weight_decays=wds)

    for step in range(STEPS):
        grads = make_grads(ours_params, step)
        set_grads(ours_params, grads)
        set_grads(torch_params, grads)
        ours.step()
        theirs.step()
        ref.step(grads)

    for i, (p, q) in enumerate(zip(ours_params, torch_params)):
        s, t = ours.state[p], theirs.state[q]
        assert s["step"].item() == t["step"].item() == STEPS
        # fp32 vs torch's fp32: the same math, tight tolerance
        assert_close(p, q, 1e-6, f"param {i} vs torch", origin=ref.p0[i],
                     atol=rounding_atol(p, STEPS, 3))  # ours rounds p once a step, torch twice
        assert_close(s["exp_avg"], t["exp_avg"], 1e-6, f"exp_avg {i} vs torch")
        assert_close(s["exp_avg_sq"], t["exp_avg_sq"], 1e-6, f"exp_avg_sq {i} vs torch")
        # fp32 vs the float64 oracle
        r = ref.state(i)
        assert_close(p, ref.p[i], 1e-5, f"param {i} vs reference", origin=ref.p0[i],
                     atol=rounding_atol(p, STEPS))
        assert_close(s["exp_avg"], r["exp_avg"], 1e-5, f"exp_avg {i} vs reference")
        assert_close(s["exp_avg_sq"], r["exp_avg_sq"], 1e-5, f"exp_avg_sq {i} vs reference")
        assert s["exp_avg"].shape == p.shape and s["exp_avg_sq"].shape == p.shape
        assert s["step"].dtype == torch.float32 and s["step"].dim() == 0


def test_float64_params_match_reference_to_float64_precision():
    model = make_llama(seed=4, dtype=torch.float64)
    params = list(model.parameters())
    opt = memopt_core.AdamW(params, lr=3e-3, betas=(0.8, 0.99), weight_decay=0.1)
    ref = AdamWRef(params, lr=3e-3, betas=(0.8, 0.99), weight_decay=0.1)
    for step in range(STEPS):
        grads = make_grads(params, step)
        set_grads(params, grads)
        opt.step()
        ref.step(grads)
    for i, p in enumerate(params):
        assert opt.state[p]["exp_avg"].dtype == torch.float64
        assert_close(p, ref.p[i], 1e-12, f"param {i}", origin=ref.p0[i],
                     atol=rounding_atol(p, STEPS))
        assert_close(opt.state[p]["exp_avg"], ref.m[i], 1e-12, f"exp_avg {i}")
        assert_close(opt.state[p]["exp_avg_sq"], ref.v[i], 1e-12, f"exp_avg_sq {i}")


@pytest.mark.parametrize("sched", ["lambda", "cosine"])
def test_lr_scheduler_lr_reaches_the_update(sched):
    model = make_llama(seed=5)
    params = list(model.parameters())
    opt = memopt_core.AdamW(params, lr=4e-3, weight_decay=0.1)
    if sched == "lambda":
        scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    else:
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=STEPS, eta_min=1e-4)
    ref = AdamWRef(params, lr=4e-3, weight_decay=0.1)
    seen = []
    seen += step_with_scheduler(opt, ref, scheduler, params, STEPS)
    assert len(set(seen)) == STEPS  # the schedule really moved the lr every step
    for i, p in enumerate(params):
        assert_close(p, ref.p[i], 1e-5, f"param {i}", origin=ref.p0[i],
                     atol=rounding_atol(p, STEPS))
        assert_close(opt.state[p]["exp_avg"], ref.m[i], 1e-5, f"exp_avg {i}")


def test_bf16_error_within_twice_bf16_reference_error():
    """bf16 parameters and state: error against the float64 reference is at most 2x the error
    of the same reference math stored in bf16 (p, m, v rounded after every step)."""
    model = make_llama(seed=6, dtype=torch.bfloat16)
    params = list(model.parameters())
    hp = dict(lr=2e-3, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
    opt = memopt_core.AdamW(params, **hp)
    exact = AdamWRef(params, **hp)
    bf16 = AdamWRef(params, **hp, storage_dtype=torch.bfloat16)
    for step in range(STEPS):
        grads = make_grads(params, step)
        set_grads(params, grads)
        opt.step()
        exact.step(grads)
        bf16.step(grads)
    assert params[0].dtype == torch.bfloat16
    assert_within_low_precision_budget(opt, params, exact, bf16)


def test_noncontiguous_grads_match_reference():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(48, 40))
    params = [w]
    opt = memopt_core.AdamW(params, lr=1e-2, weight_decay=0.1)
    ref = AdamWRef(params, lr=1e-2, weight_decay=0.1)
    for step in range(STEPS):
        (g,) = make_grads([torch.empty(40, 48)], step)
        w.grad = g.t()                       # a transposed view: strides (1, 48)
        assert not w.grad.is_contiguous()
        opt.step()
        ref.step([g.t()])
    assert_close(w, ref.p[0], 1e-5, "param", origin=ref.p0[0],
                 atol=rounding_atol(w, STEPS))
    assert_close(opt.state[w]["exp_avg"], ref.m[0], 1e-5, "exp_avg")
    assert_close(opt.state[w]["exp_avg_sq"], ref.v[0], 1e-5, "exp_avg_sq")


@pytest.mark.parametrize("rule", [None, "torch", "apollo"])
def test_raw_op_matches_reference(rule):
    """torch.ops.memopt.adamw_ directly (tensor lr, one call for several tensors), by default and
    under each rule (apollo: apollo-torch's AdamW)."""
    torch.manual_seed(1)
    params = [torch.randn(7, 9), torch.randn(33), torch.randn(2, 3, 4)]
    ms = [torch.zeros_like(p) for p in params]
    vs = [torch.zeros_like(p) for p in params]
    steps = [torch.zeros((), dtype=torch.float32) for _ in params]
    # eps comparable to sqrt(v): pins down where eps enters (torch: after sqrt and bias
    # correction; apollo: before) and a large decay pins down when it applies
    ref = AdamWRef(params, lr=3e-3, betas=(0.9, 0.98), eps=3e-3, weight_decay=0.2,
                   rule=rule or "torch")
    for step in range(STEPS):
        grads = make_grads(params, step)
        torch.ops.memopt.adamw_(params, grads, ms, vs, steps, torch.tensor(3e-3, dtype=torch.float64),
                                0.9, 0.98, 3e-3, 0.2, *([rule] if rule else []))
        ref.step(grads)
    for i, p in enumerate(params):
        assert steps[i].item() == STEPS
        assert_close(p, ref.p[i], 1e-5, f"param {i}", origin=ref.p0[i],
                     atol=rounding_atol(p, STEPS))
        assert_close(ms[i], ref.m[i], 1e-5, f"exp_avg {i}")
        assert_close(vs[i], ref.v[i], 1e-5, f"exp_avg_sq {i}")


@pytest.mark.parametrize("kind", ["shape", "complex"])
def test_bad_grad_in_a_later_group_leaves_every_group_untouched(kind):
    """A step that fails on the last group must not have updated the first one."""
    model = make_llama(seed=13)
    opt = memopt_core.AdamW(_three_groups(model), lr=1e-3, weight_decay=0.05)
    params = [p for g in opt.param_groups for p in g["params"]]
    for step in range(2):
        set_grads(params, make_grads(params, step))
        opt.step()
    set_grads(params, make_grads(params, 2))
    victim = opt.param_groups[-1]["params"][-1]
    if kind == "shape":
        victim.grad.data = torch.ones(victim.numel() + 1)
    else:
        victim.grad_dtype = None
        victim.grad = torch.ones(victim.shape, dtype=torch.complex64)
    before = snapshot(opt)
    with pytest.raises((ValueError, TypeError), match=kind):
        opt.step()
    assert_snapshot_equal(snapshot(opt), before)


def test_bad_hparam_in_a_param_group_raises_at_construction():
    model = make_llama()
    groups = _three_groups(model)
    groups[1]["betas"] = (0.9, 1.5)
    with pytest.raises(ValueError, match="beta2"):
        memopt_core.AdamW(groups, lr=1e-3)


def test_takes_a_model_like_the_other_optimizers():
    """AdamW(model) is AdamW(model.parameters()), as every other memopt optimizer takes a model."""
    torch.manual_seed(0)
    a = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    b = copy.deepcopy(a)
    opts = [memopt_core.AdamW(a, lr=1e-2), memopt_core.AdamW(b.parameters(), lr=1e-2)]
    x = torch.randn(5, 4)
    for model, opt in zip((a, b), opts):
        model(x).square().sum().backward()
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
