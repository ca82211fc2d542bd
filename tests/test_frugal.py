"""memopt_core.Frugal against the float64 reference (tests/reference/frugal_ref.py) for every
selection, the density 0 / 1 edge cases, exact state bytes, mid-cycle resume, bf16 and errors."""
from __future__ import annotations

import pytest
import torch

import memopt_core
from conftest import (assert_close, assert_snapshot_equal, make_grads, make_llama, rounding_atol,
                      roundtrip, set_grads, snapshot)
from reference.frugal_ref import FrugalRef

HP = dict(lr=3e-3, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
VARIANTS = [("block", "descending"), ("block", "ascending"), ("block", "mirror"),
            ("block", "random"), ("columns", None), ("rows", None), ("randk", None),
            ("svd", None), ("random", None), ("randperm", None)]


def make_pair(selection, order="descending", dtype=torch.float64, seed=5, **kw):
    model = make_llama(seed=3, dtype=dtype)
    kw = {**HP, "density": 0.25, "update_gap": 3, "selection": selection, "seed": seed, **kw}
    if order:
        kw["block_order"] = order
    opt = memopt_core.Frugal(model, **kw)
    params = [p for g in opt.param_groups for p in g["params"]]
    proj = [p in opt._index for p in params]
    ref_kw = {k: v for k, v in kw.items() if k not in ("roles",)}
    ref = FrugalRef(params, proj, **ref_kw)  # float64 storage: the exact reference
    return model, opt, params, ref


def compare(opt, params, ref, rtol):
    for i, p in enumerate(params):
        assert_close(p, ref.p[i], rtol, f"param {i}", origin=ref.p0[i])
        st = ref.state[i]
        if st is None:
            assert p not in opt.state, f"tensor {i} holds state while its reference does not"
            continue
        ours = opt.state[p]
        assert set(ours) == set(st), (sorted(ours), sorted(st))
        assert ours["step"].item() == st["step"], f"step of {i}"
        for key in ("exp_avg", "exp_avg_sq"):
            assert_close(ours[key], st[key], rtol, f"{key} {i}")
        if "subspace" in st:
            assert_close(ours["subspace"].double(), st["subspace"].double(), rtol, f"subspace {i}")


def run(opt, ref, params, steps, start=0):
    for step in range(start, start + steps):
        grads = make_grads(params, step)
        set_grads(params, grads)
        opt.step()
        ref.step(grads)


@pytest.mark.parametrize("selection,order", VARIANTS)
def test_matches_reference_across_two_subspace_changes(selection, order):
    model, opt, params, ref = make_pair(selection, order, proj_params_lr_scale=0.5,
                                        state_free_lr_scale=0.7)
    run(opt, ref, params, 8)  # re-selections at steps 3 and 6
    compare(opt, params, ref, 1e-9)


@pytest.mark.parametrize("rule", ["sgd", None])
@pytest.mark.parametrize("selection", ["block", "columns", "svd"])
def test_state_free_rules_and_kept_statistics(rule, selection):
    model, opt, params, ref = make_pair(selection, state_free=rule, reset_statistics=False)
    run(opt, ref, params, 7)
    compare(opt, params, ref, 1e-9)


@pytest.mark.parametrize("selection", ["block", "columns", "svd"])
def test_density_zero_is_sign_sgd_without_state(selection):
    model, opt, params, ref = make_pair(selection, density=0.0)
    run(opt, ref, params, 7)
    compare(opt, params, ref, 1e-9)
    assert all(p not in opt.state for p in opt._projs)
    assert opt.state_bytes() == sum(2 * p.numel() * 8 + 4 for p in params if p not in opt._index)


def test_density_one_block_equals_torch_adamw_at_every_step():
    model, twin = make_llama(seed=4), make_llama(seed=4)
    opt = memopt_core.Frugal(model, density=1.0, update_gap=2, **HP)
    ref = torch.optim.AdamW(twin.parameters(), **HP)
    params, tparams = list(model.parameters()), list(twin.parameters())
    start = [p.detach().clone() for p in params]
    for step in range(7):  # re-selections at 2, 4, 6 keep every block and its state
        grads = make_grads(params, step)
        set_grads(params, grads)
        set_grads(tparams, grads)
        opt.step()
        ref.step()
        for p, q, s in zip(params, tparams, start):
            assert_close(p, q, 1e-5, f"step {step}", origin=s, atol=rounding_atol(q, step + 1, 2))
            assert_close(opt.state[p]["exp_avg_sq"], ref.state[q]["exp_avg_sq"], 1e-5)
    assert opt.state_bytes() == sum(2 * p.numel() * 4 + 4 for p in params)


def test_state_bytes_block_and_columns():
    model = make_llama()
    params = list(model.parameters())
    block = memopt_core.Frugal(model, density=0.25)
    active = {block._projs[j] for j in block.plan.selection.active}
    assert len(active) == round(0.25 * len(block._projs)) == 4
    set_grads(params, make_grads(params, 0))
    block.step()
    adamw = lambda p: 2 * p.numel() * p.element_size() + 4  # noqa: E731
    assert block.state_bytes() == sum(adamw(p) for p in params if p not in block._index or p in active)
    assert set(block.state) == {p for p in params if p not in block._index} | active
    cols = memopt_core.Frugal(model, density=0.25, selection="columns")
    cols.step()
    for p in cols._projs:
        k = int(p.shape[1] * 0.25)
        assert cols.state[p]["exp_avg"].shape == (p.shape[0], k)
        assert cols.state[p]["subspace"].dtype == torch.int32 and cols.state[p]["subspace"].numel() == k
    assert cols.planned_state_bytes() == cols.state_bytes()
    assert "4/14 projectable tensors active" in block.describe()


@pytest.mark.parametrize("selection,order", [("block", "random"), ("columns", None),
                                             ("randk", None), ("random", None), ("svd", None)])
def test_resume_mid_cycle_is_exact(selection, order):
    def build(seed_model):
        model = make_llama(seed=seed_model)
        return model, memopt_core.Frugal(model, density=0.25, update_gap=3, selection=selection,
                                         block_order=order or "descending", seed=11, **HP)

    def steps(model, opt, a, b):
        params = list(model.parameters())
        for s in range(a, b):
            set_grads(params, make_grads(params, s))
            opt.step()

    m1, straight = build(6)
    steps(m1, straight, 0, 9)
    m2, opt = build(6)
    steps(m2, opt, 0, 4)  # one re-selection done, mid-cycle
    ckpt = roundtrip({"model": m2.state_dict(), "optim": opt.state_dict()})
    m3, fresh = build(7)
    m3.load_state_dict(ckpt["model"])
    fresh.load_state_dict(ckpt["optim"])
    steps(m3, fresh, 4, 9)  # crosses the re-selections at 6 (random draws from the saved RNG)
    assert_snapshot_equal(snapshot(fresh), snapshot(straight))


def test_bf16_within_twice_the_bf16_reference_error():
    _, opt, params, exact = make_pair("block", dtype=torch.bfloat16)
    low = FrugalRef(params, [p in opt._index for p in params], **{**HP, "density": 0.25,
                    "update_gap": 3, "seed": 5}, storage_dtype=torch.bfloat16)
    for step in range(8):
        grads = make_grads(params, step)
        set_grads(params, grads)
        opt.step()
        exact.step(grads)
        low.step(grads)
    ours = torch.cat([p.double().reshape(-1) - p0.reshape(-1) for p, p0 in zip(params, exact.p0)])
    e = torch.cat([(t - p0).reshape(-1) for t, p0 in zip(exact.p, exact.p0)])
    lw = torch.cat([(t - p0).reshape(-1) for t, p0 in zip(low.p, exact.p0)])
    assert (ours - e).norm() <= 2 * (lw - e).norm()


@pytest.mark.parametrize("kw,exc,word", [
    (dict(density=1.5), ValueError, "density"), (dict(update_gap=0), ValueError, "update_gap"),
    (dict(selection="lowrank"), ValueError, "selection"),
    (dict(state_free="adam"), ValueError, "state_free"),
    (dict(block_order="sideways"), ValueError, "block_order"),
    (dict(block_order="mirror", density=3 / 14), ValueError, "mirror"),
    (dict(selection="columns", proj_norms=True), ValueError, "2-D"),
    (dict(state_free_lr_scale=-1.0), ValueError, "state_free_lr_scale"),
    (dict(proj_params_lr_scale=float("nan")), ValueError, "proj_params_lr_scale")])
def test_bad_options_raise(kw, exc, word):
    with pytest.raises(exc, match=word):
        memopt_core.Frugal(make_llama(), **kw)


def test_needs_names():
    with pytest.raises(TypeError, match="name"):
        memopt_core.Frugal(list(make_llama().parameters()))


@pytest.mark.parametrize("selection", ["columns", "randk", "svd"])
def test_split_makes_no_parameter_sized_temporary(selection):
    """The state-free and state-full parts are one pass by index; projections use r-sized
    scratch only (a rank-256 basis of a 1024x1024 weight is 25% of it) outside re-selections."""
    from test_optimizer_contract import Wide, _allocations_during
    model = Wide()
    opt = memopt_core.Frugal(model, density=0.25, selection=selection, update_gap=100)
    params = list(model.parameters())
    set_grads(params, make_grads(params, 0))
    opt.step()  # selection and state: allowed to allocate
    set_grads(params, make_grads(params, 1))
    largest = 1024 * 1024 * 4
    biggest = max(_allocations_during(opt.step), default=0)
    memopt_core._C.workspace_release("cpu")  # the rank-256 scratch is not other tests' business
    assert biggest < (0.01 if selection != "svd" else 0.3) * largest, biggest


@pytest.mark.parametrize("found", [{}, {"found_inf": torch.zeros(1)}, {"found_inf": torch.ones(1)}],
                         ids=["", "found_inf=0", "found_inf=1"])
def test_op_passes_opcheck(found):
    """torch.library.opcheck on a call mixing AdamW, a stateless block and a column split."""
    p = [torch.randn(8, 6) for _ in range(3)]
    args = (p, [torch.randn(8, 6) for _ in p], [torch.zeros(8, 6), torch.zeros(0), torch.zeros(8, 2)],
            [torch.zeros(8, 6), torch.zeros(0), torch.zeros(8, 2)],
            [torch.zeros(()), torch.zeros(0), torch.zeros(())],
            [torch.zeros(0), torch.zeros(0), torch.tensor([1, 4], dtype=torch.int32)],
            [0, 2, 3], torch.tensor(1e-3), 0.9, 0.999, 1e-8, 0.1, 1.0, 1.0, 2)
    torch.library.opcheck(torch.ops.memopt.frugal_.default, args, kwargs=found)


def test_unsorted_indices_rejected_before_any_write():
    p, g = torch.randn(4, 6), torch.randn(4, 6)
    before = p.clone()
    with pytest.raises(ValueError, match="sorted"):
        torch.ops.memopt.frugal_([p], [g], [torch.zeros(4, 2)], [torch.zeros(4, 2)], [torch.zeros(())],
                                 [torch.tensor([4, 1], dtype=torch.int32)], [3], torch.tensor(1e-3),
                                 0.9, 0.999, 1e-8, 0.0, 1.0, 1.0, 2)
    assert torch.equal(p, before)


def _damage(sd, key, value):
    import copy
    sd = copy.deepcopy(sd)
    for g in sd["param_groups"]:
        g["frugal"][key] = value(g["frugal"][key]) if callable(value) else value
    return sd


@pytest.mark.parametrize("key,value,match", [
    ("cycle", lambda c: c[:-1], "cycle has"),
    ("rng", "garbage", "rng is not a torch generator state"),
    ("rng", lambda r: r[:10], "rng is not a torch generator state"),
    ("density", 1.0, "density=1.0"),
    ("active", lambda a: list(range(len(a) + 1)), "active has"),
    ("active", lambda a: [a[0], a[0]] + list(a[2:]), "names a tensor twice"),
    ("t", -1, "t must be"),
    ("t", "3", "t must be"),
    ("cursor", 10**6, "cursor must be"),
    ("held", [10**6], "held holds"),
])
def test_damaged_selection_raises_and_loads_nothing(key, value, match):
    """Every field of a saved selection is checked before anything is loaded: a damaged or
    foreign checkpoint raises a ValueError naming the field, and the optimizer steps on exactly
    as an untouched one."""
    model, twin = make_llama(), make_llama()
    opts = [memopt_core.Frugal(m, density=0.25, update_gap=2, seed=0) for m in (model, twin)]
    for step in range(3):
        for m, opt in zip((model, twin), opts):
            set_grads(list(m.parameters()), make_grads(list(m.parameters()), step))
            opt.step()
    with pytest.raises(ValueError, match=match):
        opts[0].load_state_dict(_damage(opts[0].state_dict(), key, value))
    for step in range(3, 6):  # re-selections included: the generator state was not replaced
        for m, opt in zip((model, twin), opts):
            set_grads(list(m.parameters()), make_grads(list(m.parameters()), step))
            opt.step()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters()))
