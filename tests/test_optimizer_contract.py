"""The torch.optim contract, for every optimizer in memopt_core.registry.OPTIMIZERS: state_dict
resume, LR schedulers, closures, skipped params, zero_grad, bad input rejected atomically, no
parameter-sized temporaries, exact state bytes, pooled state."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import memopt_core
from conftest import (assert_snapshot_equal, make_grads, make_llama, roundtrip, set_grads,
                      snapshot)

HP = dict(lr=3e-3, weight_decay=0.1)


def make(opt_name, model, **kw):
    return memopt_core.OPTIMIZERS[opt_name].make(model, **{**HP, **kw})


def all_params(opt):
    return [p for g in opt.param_groups for p in g["params"]]


def run(model, opt, steps, start=0, grads_fn=make_grads):
    params = list(model.parameters())
    for step in range(start, start + steps):
        set_grads(params, grads_fn(params, step))
        opt.step()


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


# ---- bad input: a clear exception, parameters and state untouched ----------------------------
def _bad_grad(kind, p):
    if kind == "sparse":
        idx = torch.tensor([[0] * p.dim()]).t() if p.dim() else torch.zeros(0, 1, dtype=torch.long)
        return torch.sparse_coo_tensor(idx, torch.ones(1, dtype=p.dtype), p.shape,
                                       check_invariants=True)
    if kind == "complex":
        return torch.ones(p.shape, dtype=torch.complex64)
    if kind == "shape":
        return torch.ones(p.numel() + 1, dtype=p.dtype)
    raise AssertionError(kind)


BAD_GRADS = {"sparse": (ValueError, "sparse"), "complex": (TypeError, "complex"),
             "shape": (ValueError, "shape")}


@pytest.mark.parametrize("where", ["first", "last"])
@pytest.mark.parametrize("kind", sorted(BAD_GRADS))
@pytest.mark.parametrize("after_steps", [0, 2], ids=["first_step", "later_step"])
def test_bad_grad_raises_and_changes_nothing(opt_name, kind, where, after_steps):
    model = make_llama(seed=30)
    opt = make(opt_name, model)
    run(model, opt, after_steps)
    params = list(model.parameters())
    set_grads(params, make_grads(params, after_steps))
    ordered = all_params(opt)                   # the optimizer's order: "last" is in the last group
    victim = ordered[0] if where == "first" else ordered[-1]
    if kind == "shape":
        victim.grad.data = _bad_grad(kind, victim)          # bypasses the .grad setter's check
    else:
        if kind == "complex":
            victim.grad_dtype = None                        # let a complex grad be assigned
        victim.grad = _bad_grad(kind, victim)
    before = snapshot(opt, params)
    exc, word = BAD_GRADS[kind]
    with pytest.raises(exc, match=word):
        opt.step()
    assert_snapshot_equal(snapshot(opt, params), before)
    if after_steps == 0:
        assert len(opt.state) == 0 or all(len(s) == 0 for s in opt.state.values())


BAD_HPARAMS = [("lr", -1e-3, "learning rate"), ("betas", (1.0, 0.999), "beta1"),
               ("betas", (0.9, 1.0), "beta2"), ("betas", (-0.1, 0.999), "beta1"),
               ("eps", -1e-8, "eps"), ("weight_decay", -0.1, "weight_decay"),
               ("lr", float("nan"), "learning rate")]


@pytest.mark.parametrize("key,value,word", BAD_HPARAMS)
def test_bad_hparam_at_construction_raises_value_error(opt_name, key, value, word):
    with pytest.raises(ValueError, match=word):
        make(opt_name, make_llama(), **{key: value})


@pytest.mark.parametrize("key,value,word", BAD_HPARAMS)
@pytest.mark.parametrize("after_steps", [0, 2], ids=["first_step", "later_step"])
def test_bad_hparam_set_after_construction_fails_step_atomically(opt_name, key, value, word,
                                                                  after_steps):
    model = make_llama(seed=31)
    opt = make(opt_name, model)
    run(model, opt, after_steps)
    params = list(model.parameters())
    set_grads(params, make_grads(params, after_steps))
    opt.param_groups[-1][key] = value                  # the last group: earlier ones are valid
    before = snapshot(opt, params)
    with pytest.raises(ValueError, match=word):
        opt.step()
    assert_snapshot_equal(snapshot(opt, params), before)
    if after_steps == 0:
        assert len(opt.state) == 0 or all(len(s) == 0 for s in opt.state.values())


def test_integer_or_complex_parameter_rejected_at_construction(opt_name):
    class M(nn.Module):
        def __init__(self, bad):
            super().__init__()
            self.mlp = nn.Linear(4, 4)
            self.bad = bad

    complex_model = M(nn.Parameter(torch.zeros(3, dtype=torch.complex64)))
    with pytest.raises(TypeError, match="complex|dtype"):
        make(opt_name, complex_model)
    int_model = M(nn.Parameter(torch.zeros(3, dtype=torch.long), requires_grad=False))
    spec = memopt_core.OPTIMIZERS[opt_name]
    try:
        opt = make(opt_name, int_model)
    except TypeError as e:
        assert "int64" in str(e) or "Long" in str(e) or "dtype" in str(e) or "float" in str(e)
    else:
        # only acceptable for optimizers built from names, which skip requires_grad=False tensors
        assert spec.needs_names
        assert all(p is not int_model.bad for p in all_params(opt))
    with pytest.raises(TypeError):
        memopt_core.AdamW([nn.Parameter(torch.zeros(3, dtype=torch.long), requires_grad=False)])


# ---- memory ------------------------------------------------------------------------------------
class Wide(nn.Module):
    """A 1M-element weight among small tensors (names the partitioners understand)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(64, 32)
        self.mlp = nn.Module()
        self.mlp.up_proj = nn.Linear(1024, 1024, bias=False)
        self.mlp.down_proj = nn.Linear(32, 64)
        self.norm = nn.LayerNorm(32)


def _allocations_during(fn):
    """Sizes of every CPU allocation the profiler sees while fn runs (kineto memory events)."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = prof.profiler.kineto_results.events()
    return [e.nbytes() for e in events if e.name() == "[memory]" and e.nbytes() > 0]


def test_profiler_sees_parameter_sized_temporaries():
    """Positive control for the method below: torch's single-tensor Adam allocates a full-size
    denominator each step, and the profiler reports it."""
    w = nn.Parameter(torch.randn(1024, 1024))
    opt = torch.optim.Adam([w], foreach=False)
    w.grad = torch.randn_like(w)
    opt.step()
    sizes = _allocations_during(opt.step)
    assert max(sizes) >= w.numel() * w.element_size()


@pytest.mark.parametrize("threads", [1, None], ids=["1thread", "default_threads"])
def test_no_parameter_sized_temporary_during_step(opt_name, threads):
    old = torch.get_num_threads()
    try:
        if threads:
            torch.set_num_threads(threads)
        model = Wide()
        opt = make(opt_name, model)
        params = list(model.parameters())
        largest = max(p.numel() * p.element_size() for p in params)
        memopt_core._C.workspace_release("cpu")   # earlier tests may have grown it
        run(model, opt, 1)                       # first step: state pool and workspace sized
        grows = memopt_core._C.workspace_stats("cpu")[2]
        set_grads(params, make_grads(params, 1))
        sizes = _allocations_during(opt.step)
        assert all(p in opt.state for p in params if opt._holds_state(p))
        biggest = max(sizes, default=0)
        assert biggest < 0.01 * largest, f"a {biggest}-byte allocation during step ({largest} param)"
        run(model, opt, 2, start=2)
        capacity, _, grows_after = memopt_core._C.workspace_stats("cpu")
        assert grows_after == grows, "workspace grew after the first step"
        # scratch an optimizer declares (APOLLO: one tile of its projected gradient, r-sized)
        declared = opt.scratch_bytes() if hasattr(opt, "scratch_bytes") else 0
        assert declared < 0.5 * largest, f"declared scratch of {declared} bytes"
        assert capacity < 0.01 * largest + declared, f"workspace of {capacity} bytes for contiguous grads"
    finally:
        torch.set_num_threads(old)


def test_state_bytes_is_the_sum_of_state_tensors_and_describe_lists_each(opt_name):
    model = make_llama(seed=32)
    opt = make(opt_name, model)
    text_before = opt.describe()
    run(model, opt, 1)
    total = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values()
                if isinstance(t, torch.Tensor))
    assert opt.state_bytes() == total > 0
    # describe(): one row per tensor, and its byte column adds up to the real state bytes
    params = all_params(opt)
    rows = [ln for ln in opt.describe().splitlines()[1:-1] if ln.strip()]
    assert len(rows) == len(params)
    row_bytes = sum(int(ln.split()[-1].replace(",", "")) for ln in rows)
    assert row_bytes == opt.state_bytes()
    assert text_before == opt.describe()       # describe() predicts the state before it exists
    for p, ln in zip(params, rows):
        shape = "x".join(map(str, p.shape))
        assert shape in ln.split()
        own = sum(t.numel() * t.element_size() for t in opt.state[p].values())
        assert int(ln.split()[-1].replace(",", "")) == own


def test_planned_state_bytes_match_the_state_after_a_step(opt_name):
    model = make_llama()
    opt = make(opt_name, model)
    planned = opt.planned_state_bytes()
    run(model, opt, 2)
    assert planned == opt.state_bytes()
