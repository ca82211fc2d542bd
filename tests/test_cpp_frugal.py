"""memopt::Frugal, the LibTorch optimizer, driven through _C.CppFrugal: the same selections,
states and parameters as the Python front end for every selection (both apply the same
memopt::FrugalPlan and op: bit-identical, end to end), exact torch::save / torch::load resume
across a re-selection, and checked loads."""
from __future__ import annotations

import pytest
import torch

import memopt_core
from conftest import make_grads, set_grads
from memopt_core import _C
from test_cpp_optimizers import NAMES, RAISES, make_params

STEPS = 8
KW = dict(lr=1e-2, weight_decay=0.1, update_gap=3, seed=1234, density=0.5)
VARIANTS = {
    "block": dict(selection="block"),
    "block_random_sgd": dict(selection="block", block_order="random", state_free="sgd"),
    "columns": dict(selection="columns"),
    "rows_no_reset": dict(selection="rows", reset_statistics=False),
    "randk": dict(selection="randk", state_free_lr_scale=0.1),
    "svd": dict(selection="svd"),
    "random": dict(selection="random", state_free="none"),
    "randperm": dict(selection="randperm", proj_params_lr_scale=0.5),
    # embeddings, norms and the head projectable too (one plan rule for both front ends)
    "block_proj_all": dict(selection="block", proj_embeds=True, proj_norms=True, proj_logits=True),
    "randk_proj_norms": dict(selection="randk", proj_norms=True, proj_embeds=True),
}


def cpp(params, variant):
    return _C.CppFrugal(list(zip(NAMES, params)), **{**KW, **VARIANTS[variant]})


def python(params, variant):
    kw = {**KW, **VARIANTS[variant]}
    if kw.get("state_free") == "none":
        kw["state_free"] = None
    return memopt_core.Frugal(list(zip(NAMES, params)), **kw)


def run(opt, params, steps, start=0):
    for step in range(start, start + steps):
        set_grads(params, make_grads(params, step))
        opt.step()


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_same_selection_state_and_parameters_as_the_python_front_end(variant):
    a, b = make_params(requires_grad=True), make_params(requires_grad=True)
    ours, ref = cpp(a, variant), python(b, variant)
    for step in range(STEPS):
        run(ours, a, 1, start=step)
        run(ref, b, 1, start=step)
        if VARIANTS[variant]["selection"] == "block":
            assert list(ours.active_blocks()) == list(ref.plan.selection.active), f"step {step}"
        for i, (p, q) in enumerate(zip(a, b)):
            assert torch.equal(p, q), f"step {step}: parameter {i} ({NAMES[i]})"
            mine, theirs = ours.state(p), ref.state.get(q, {})
            assert (mine is None) == (not theirs), f"step {step}: who holds state ({NAMES[i]})"
            if mine is None:
                continue
            step_t, m, v = mine
            assert torch.equal(m, theirs["exp_avg"]) and torch.equal(v, theirs["exp_avg_sq"])
            assert step_t.item() == theirs["step"].item()
            sub = ours.subspace(p)
            assert (sub is None) == ("subspace" not in theirs)
            if sub is not None:
                assert torch.equal(sub, theirs["subspace"]), f"step {step}: subspace {NAMES[i]}"


@pytest.mark.parametrize("variant", ["block", "block_random_sgd", "columns", "svd"])
def test_save_load_resume_is_bit_identical(variant, tmp_path):
    straight = make_params(requires_grad=True)
    run(cpp(straight, variant), straight, STEPS)
    resumed = make_params(requires_grad=True)
    first = cpp(resumed, variant)
    run(first, resumed, 4)  # saved mid-cycle: the next re-selection (step 6) comes after load
    first.save(str(tmp_path / "opt.pt"))
    second = _C.CppFrugal(list(zip(NAMES, resumed)), **{**KW, **VARIANTS[variant], "seed": 99})
    second.load(str(tmp_path / "opt.pt"))  # the generator state comes from the checkpoint
    run(second, resumed, STEPS - 4, start=4)
    for i, (p, q) in enumerate(zip(straight, resumed)):
        assert torch.equal(p, q), f"parameter {i} ({NAMES[i]})"


def test_load_of_another_selection_raises_and_changes_nothing(tmp_path):
    params = make_params(requires_grad=True)
    opt = cpp(params, "columns")
    run(opt, params, 2)
    opt.save(str(tmp_path / "opt.pt"))
    other = make_params(requires_grad=True)
    block = cpp(other, "block")
    run(block, other, 1)
    before = list(block.active_blocks())
    with pytest.raises(RAISES, match="selection='block'"):
        block.load(str(tmp_path / "opt.pt"))
    assert list(block.active_blocks()) == before


@pytest.mark.parametrize("kw, match", [
    (dict(density=1.5), "density"), (dict(update_gap=0), "update_gap"),
    (dict(selection="topk"), "selection"), (dict(state_free="adam"), "state_free"),
    (dict(state_free_lr_scale=-1.0), "state_free_lr_scale"), (dict(lr=-1.0), "learning rate"),
])
def test_invalid_options_raise(kw, match):
    with pytest.raises(RAISES, match=match):
        _C.CppFrugal(list(zip(NAMES, make_params())), **{**KW, **kw})


def test_bad_gradient_raises_before_anything_is_written():
    params = make_params(requires_grad=True)
    opt = cpp(params, "block")
    run(opt, params, 1)
    before = [p.clone() for p in params]
    active = list(opt.active_blocks())
    set_grads(params, make_grads(params, 1))
    params[-1].grad = params[-1].grad.to_sparse()
    with pytest.raises(RAISES, match="sparse"):
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(params, before))
    assert list(opt.active_blocks()) == active
