"""memopt::Apollo / memopt::ApolloMini, the LibTorch optimizers, driven through _C.CppApollo:
the same trajectory as the Python front end (same op, same seeds: bit-identical) under both
adamw_rule values, torch::save / torch::load resume (a checkpoint from before adamw_rule resumes
with torch's rule), group options kept by add_param_group, and bad input refused."""
from __future__ import annotations

import zipfile

import pytest
import torch

import memopt_core
from conftest import make_grads, set_grads
from memopt_core import _C
from test_cpp_optimizers import NAMES, RAISES, make_params

STEPS = 8
KW = dict(lr=1e-2, weight_decay=0.1, update_proj_gap=3)  # refreshes at steps 0, 3, 6
VARIANTS = {
    "apollo": dict(mini=False, rank=4),
    "mini": dict(mini=True),
    "tensor_front_unstored": dict(mini=False, rank=2, scale_type="tensor", scale_front=True,
                                  store_projection=False),
    "svd_no_limiter": dict(mini=False, rank=3, proj="svd", norm_growth_limit=0.0),
    "torch_rule": dict(mini=False, rank=4, adamw_rule="torch"),
    "mini_torch_rule": dict(mini=True, adamw_rule="torch"),
}


def cpp(params, variant):
    return _C.CppApollo(list(zip(NAMES, params)), **{**KW, **VARIANTS[variant]})


def python(params, variant):
    kw = {**KW, **VARIANTS[variant]}
    cls = memopt_core.ApolloMini if kw.pop("mini") else memopt_core.Apollo
    if kw.get("norm_growth_limit") == 0.0:
        kw["norm_growth_limit"] = None
    return cls(list(zip(NAMES, params)), **kw)


def run(opt, params, steps, start=0):
    for step in range(start, start + steps):
        set_grads(params, make_grads(params, step))
        opt.step()


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_same_groups_and_trajectory_as_the_python_front_end(variant):
    a, b = make_params(requires_grad=True), make_params(requires_grad=True)
    ours, ref = cpp(a, variant), python(b, variant)
    # the same split into projected and AdamW groups, in the same order (so the same seeds)
    def position(tensors, p):
        return next(i for i, q in enumerate(tensors) if q is p)
    groups = [[position(a, p) for p in g[0]] for g in ours.param_groups()]
    ref_groups = [[position(b, p) for p in g["params"]] for g in ref.param_groups]
    assert groups == ref_groups and len(groups) == 2
    run(ours, a, STEPS)
    run(ref, b, STEPS)
    for i, (p, q) in enumerate(zip(a, b)):
        assert torch.equal(p, q), f"parameter {i} ({NAMES[i]})"
        step, m, v = ours.state(p)
        st = ref.state[q]
        assert torch.equal(m, st["exp_avg"]) and torch.equal(v, st["exp_avg_sq"]), NAMES[i]
        assert step.item() == st["step"].item() == STEPS
        proj, seed, norm = ours.extra_state(p)
        assert (proj is None) == ("proj" not in st) and (seed is None) == ("seed" not in st)
        if proj is not None:
            assert torch.equal(proj, st["proj"]), NAMES[i]
        if seed is not None:
            assert seed.item() == st["seed"].item(), NAMES[i]
        if norm is not None:
            assert norm.item() == st["limiter_norm"].item(), NAMES[i]


@pytest.mark.parametrize("variant", ["apollo", "mini", "tensor_front_unstored", "torch_rule"])
def test_save_load_resume_is_bit_identical(variant, tmp_path):
    straight = make_params(requires_grad=True)
    opt = cpp(straight, variant)
    run(opt, straight, STEPS)
    resumed = make_params(requires_grad=True)
    first = cpp(resumed, variant)
    run(first, resumed, 4)  # stops between two refreshes, after the limiter has a norm
    first.save(str(tmp_path / "opt.pt"))
    second = cpp(resumed, variant)
    second.load(str(tmp_path / "opt.pt"))
    run(second, resumed, STEPS - 4, start=4)
    for i, (p, q) in enumerate(zip(straight, resumed)):
        assert torch.equal(p, q), f"parameter {i} ({NAMES[i]})"


def _without_adamw_rule(src, dst):
    """A copy of a torch::save archive in which no group has an adamw_rule (renamed to a key
    nothing reads, same length): a checkpoint saved before the option existed."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            data = zin.read(info)
            zout.writestr(info, data.replace(b"adamw_rule", b"adamw_xxxx"))


def test_checkpoint_without_adamw_rule_resumes_with_torchs_rule(tmp_path):
    """The options' default is "apollo", but a checkpoint without the key was stepped with
    torch's rule (the only one before the option): it resumes with it, bit-identically."""
    straight = make_params(requires_grad=True)
    run(cpp(straight, "torch_rule"), straight, STEPS)
    resumed = make_params(requires_grad=True)
    first = cpp(resumed, "torch_rule")
    run(first, resumed, 4)
    first.save(str(tmp_path / "new.pt"))
    _without_adamw_rule(tmp_path / "new.pt", tmp_path / "old.pt")
    second = cpp(resumed, "apollo")  # adamw_rule "apollo" until the load
    second.load(str(tmp_path / "old.pt"))
    run(second, resumed, STEPS - 4, start=4)
    for i, (p, q) in enumerate(zip(straight, resumed)):
        assert torch.equal(p, q), f"parameter {i} ({NAMES[i]})"


def test_load_of_another_rank_raises_and_changes_nothing(tmp_path):
    params = make_params(requires_grad=True)
    opt = cpp(params, "apollo")
    run(opt, params, 2)
    opt.save(str(tmp_path / "opt.pt"))
    other = make_params(requires_grad=True)
    mini = cpp(other, "mini")
    run(mini, other, 1)
    before = [t.clone() for t in mini.state(other[1])]
    with pytest.raises(RAISES, match="exp_avg"):
        mini.load(str(tmp_path / "opt.pt"))
    assert all(torch.equal(x, y) for x, y in zip(before, mini.state(other[1])))


def test_add_param_group_keeps_its_options_and_checks_them():
    params = make_params(requires_grad=True)
    opt = cpp(params, "apollo")
    extra = [torch.randn(6, 10), torch.randn(5)]
    with pytest.raises(RAISES, match="2-D"):
        opt.add_param_group(extra, rank=2, lr=0.5)  # a 1-D tensor cannot be projected
    assert len(opt.param_groups()) == 2
    opt.add_param_group(extra[:1], rank=2, lr=0.5)
    opt.add_param_group(extra[1:], rank=0, lr=0.25)
    assert [g[1] for g in opt.param_groups()][-2:] == [0.5, 0.25]
    for t in extra:
        t.grad = torch.randn_like(t)
    opt.step()
    assert tuple(opt.state(extra[0])[1].shape) == (2, 10)  # projected: R's shape
    assert tuple(opt.state(extra[1])[1].shape) == (5,)     # AdamW
    assert opt.extra_state(extra[0])[1].item() == len(params) + 1  # apollo-torch's seed order


@pytest.mark.parametrize("kw, match", [
    (dict(rank=-1), "rank"), (dict(proj="qr"), "proj"), (dict(scale_type="row"), "scale_type"),
    (dict(proj="svd", store_projection=False), "store_projection"), (dict(lr=-1.0), "learning rate"),
    (dict(adamw_rule="adam"), "adamw_rule must be 'apollo'"),
])
def test_invalid_options_raise(kw, match):
    with pytest.raises(RAISES, match=match):
        _C.CppApollo(list(zip(NAMES, make_params(requires_grad=True))), **{**KW, "rank": 4, **kw})


def test_bad_gradient_raises_before_anything_is_written():
    params = make_params(requires_grad=True)
    opt = cpp(params, "apollo")
    run(opt, params, 1)
    before = [p.clone() for p in params]
    set_grads(params, make_grads(params, 1))
    params[-1].grad = params[-1].grad.to_sparse()  # the AdamW group (lm_head) fails its check
    with pytest.raises(RAISES, match="sparse"):
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(params, before))


def test_a_rank_above_a_tensors_smaller_side_is_capped_per_tensor_as_in_python():
    """rank 12 on 16x16 weights and 8x16 k/v: groups of effective rank 12 and 8 (then AdamW), in
    the same order in both front ends (so the same seeds), and the same trajectory."""
    a, b = make_params(requires_grad=True), make_params(requires_grad=True)
    ours = _C.CppApollo(list(zip(NAMES, a)), **KW, mini=False, rank=12)
    ref = memopt_core.Apollo(list(zip(NAMES, b)), **KW, rank=12)
    assert [len(g[0]) for g in ours.param_groups()] == [len(g["params"]) for g in ref.param_groups]
    assert [g.get("rank") for g in ref.param_groups] == [12, 8, None]
    run(ours, a, STEPS)
    run(ref, b, STEPS)
    for p, q in zip(a, b):
        assert torch.equal(p, q)
