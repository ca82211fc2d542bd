"""The torch.optim contract, for every optimizer in memopt_core.registry.OPTIMIZERS: state_dict
resume, LR schedulers, closures, skipped params, zero_grad, non-contiguous gradients, pooled state.
The rest of the contract: bad input rejected atomically (test_optimizer_contract_bad_input.py),
no parameter-sized temporaries and exact state bytes (test_optimizer_contract_memory.py)."""
from __future__ import annotations

import pytest
import torch

from conftest import (assert_snapshot_equal, make_grads, make_llama, roundtrip, set_grads,
                      snapshot)
from contract_util import all_params, make, run
# imported from here by test_apollo.py, test_apollo_shard.py, test_frugal.py and test_layouts.py
from contract_util import Wide, _allocations_during  # noqa: F401


def tensor_states(opt, p):
    return {k: v for k, v in opt.state[p].items() if isinstance(v, torch.Tensor) and k != "step"}


# ---- state_dict -------------------------------------------------------------------------------
def holders(opt):
    """The parameters that hold state once they have a gradient (opt._holds_state hook)."""
    return [p for p in all_params(opt) if opt._holds_state(p)]


def assert_pooled(opt):
    """Every state tensor (but step) of a group is a view of one storage per pool key and dtype
    (an optimizer may keep e.g. int64 seeds beside its moments)."""
    for g in opt.param_groups:
        pools = {}
        for p in g["params"]:
            if p in opt.state:
                for t in tensor_states(opt, p).values():
                    pools.setdefault((opt._pool_key(p), t.dtype), set()).add(
                        t.untyped_storage().data_ptr())
        assert all(len(ptrs) == 1 for ptrs in pools.values()), f"group state spread over {pools}"


def test_state_pool_after_first_step(opt_name):
    model = make_llama()
    opt = make(opt_name, model)
    run(model, opt, 1)
    assert all(p in opt.state for p in holders(opt))
    assert not any(p in opt.state for p in all_params(opt) if not opt._holds_state(p))
    assert_pooled(opt)


def test_state_dict_resume_is_bit_identical(opt_name, tmp_path):
    straight_model = make_llama(seed=21)
    straight = make(opt_name, straight_model)
    run(straight_model, straight, 7)

    model = make_llama(seed=21)
    opt = make(opt_name, model)
    run(model, opt, 3)
    path = tmp_path / "ckpt.pt"
    torch.save({"model": model.state_dict(), "optim": opt.state_dict()}, path)
    del model, opt

    ckpt = torch.load(path, weights_only=True)
    fresh_model = make_llama(seed=99)  # different init: everything must come from the checkpoint
    fresh_model.load_state_dict(ckpt["model"])
    fresh = make(opt_name, fresh_model)
    fresh.load_state_dict(ckpt["optim"])
    assert_pooled(fresh)
    assert all(fresh.state[p]["step"].item() == 3 for p in holders(fresh))
    run(fresh_model, fresh, 4, start=3)

    assert_snapshot_equal(snapshot(fresh), snapshot(straight))
    assert [(g["lr"], g["weight_decay"]) for g in fresh.param_groups] == \
        [(g["lr"], g["weight_decay"]) for g in straight.param_groups]


def test_loading_its_own_state_dict_changes_nothing(opt_name):
    model = make_llama(seed=22)
    opt = make(opt_name, model)
    run(model, opt, 3)
    sd = roundtrip(opt.state_dict())
    before = snapshot(opt)
    opt.load_state_dict(sd)  # loading into itself changes nothing and keeps the pool
    assert_snapshot_equal(snapshot(opt), before)
    assert_pooled(opt)


@pytest.mark.parametrize("target_has_state", [True, False])
def test_load_mismatched_state_dict_raises_and_changes_nothing(opt_name, target_has_state):
    source_model = make_llama(seed=23)
    source = make(opt_name, source_model, lr=1e-3)
    run(source_model, source, 2)
    sd = roundtrip(source.state_dict())

    target_model = make_llama(seed=24, intermediate_size=48)  # same tensors, different MLP shapes
    target = make(opt_name, target_model, lr=2e-3)
    if target_has_state:
        run(target_model, target, 2)
    before = snapshot(target)
    groups_before = [{k: v for k, v in g.items() if k != "params"} for g in target.param_groups]
    with pytest.raises(ValueError):
        target.load_state_dict(sd)
    assert_snapshot_equal(snapshot(target), before)
    assert [{k: v for k, v in g.items() if k != "params"} for g in target.param_groups] == groups_before
    assert len(target.state) == (len(holders(target)) if target_has_state else 0)
    run(target_model, target, 1, start=5)  # still usable


# ---- schedulers, closures, skipped params ------------------------------------------------------
@pytest.mark.parametrize("sched", ["lambda", "cosine"])
def test_lr_scheduler_changes_the_lr_used(opt_name, sched):
    def schedule(opt):
        if sched == "lambda":
            return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 ** s)
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=6, eta_min=1e-5)

    m1, m2, m3 = make_llama(seed=25), make_llama(seed=25), make_llama(seed=25)
    o1, o2, o3 = make(opt_name, m1), make(opt_name, m2), make(opt_name, m3)
    s1, s2 = schedule(o1), schedule(o2)
    lrs = []
    for step in range(6):
        lrs.append(o1.param_groups[0]["lr"])
        for g in o3.param_groups:  # the same lr, set by hand
            g["lr"] = lrs[-1]
        for m, o in ((m1, o1), (m3, o3)):
            set_grads(list(m.parameters()), make_grads(list(m.parameters()), step))
            o.step()
        s1.step()
        set_grads(list(m2.parameters()), make_grads(list(m2.parameters()), step))
        o2.step()
        s2.step()
    assert len(set(lrs)) == 6
    assert_snapshot_equal(snapshot(o1), snapshot(o3))   # scheduler lr == hand-set lr
    m4 = make_llama(seed=25)
    o4 = make(opt_name, m4)
    run(m4, o4, 6)                                       # constant lr: a different result
    assert not all(torch.equal(a, b) for a, b in zip(m1.parameters(), m4.parameters()))


def _batch(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 64, (2, 12), generator=gen)


def test_closure_is_evaluated_and_its_loss_returned(opt_name):
    model, twin = make_llama(seed=26), make_llama(seed=26)
    opt, twin_opt = make(opt_name, model), make(opt_name, twin)
    calls = []

    def closure():
        opt.zero_grad()
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        calls.append(loss.detach())
        return loss

    losses = []
    for step in range(3):
        batch = _batch(step)
        loss = opt.step(closure)
        assert len(calls) == step + 1 and torch.is_tensor(loss)
        assert torch.equal(loss.detach(), calls[-1])
        losses.append(loss.item())
        twin_opt.zero_grad()
        twin(input_ids=batch, labels=batch).loss.backward()
        twin_opt.step()
    assert len(set(losses)) == 3  # re-evaluated on the updated parameters each step
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters()))
    assert opt.step() is None


def test_params_without_grad_are_skipped(opt_name):
    model = make_llama(seed=27)
    opt = make(opt_name, model)
    params = list(model.parameters())
    idle = set(range(0, len(params), 3))

    def grads_fn(ps, step):
        return [None if i in idle else g for i, g in enumerate(make_grads(ps, step))]

    initial = [p.detach().clone() for p in params]
    run(model, opt, 3, grads_fn=grads_fn)
    for i, p in enumerate(params):
        if i in idle:
            assert p not in opt.state or len(opt.state[p]) == 0, f"state created for idle param {i}"
            assert torch.equal(p, initial[i])
        else:
            assert not opt._holds_state(p) or opt.state[p]["step"].item() == 3
            assert not torch.equal(p, initial[i])
    # now only the idle ones get grads: the others keep their state and values
    busy_before = snapshot(opt, [p for i, p in enumerate(params) if i not in idle])
    set_grads(params, [g if i in idle else None for i, g in enumerate(make_grads(params, 3))])
    opt.step()
    assert_snapshot_equal(snapshot(opt, [p for i, p in enumerate(params) if i not in idle]), busy_before)
    for i in idle:
        assert not opt._holds_state(params[i]) or opt.state[params[i]]["step"].item() == 1
        assert not torch.equal(params[i], initial[i])


def test_zero_grad_set_to_none_then_step_changes_nothing(opt_name):
    model = make_llama(seed=28)
    opt = make(opt_name, model)
    run(model, opt, 2)
    before = snapshot(opt)
    opt.zero_grad(set_to_none=True)
    assert all(p.grad is None for p in model.parameters())
    opt.step()
    assert_snapshot_equal(snapshot(opt), before)


def test_noncontiguous_grads_give_the_same_result(opt_name):
    m1, m2 = make_llama(seed=29), make_llama(seed=29)
    o1, o2 = make(opt_name, m1), make(opt_name, m2)

    def strided(ps, step):
        out = []
        for g in make_grads(ps, step):
            nc = g.t().contiguous().t() if g.dim() == 2 else g.repeat_interleave(2)[::2]
            assert not nc.is_contiguous() and torch.equal(nc, g)
            out.append(nc)
        return out

    run(m1, o1, 7)
    run(m2, o2, 7, grads_fn=strided)
    assert_snapshot_equal(snapshot(o2), snapshot(o1))
