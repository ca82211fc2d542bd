"""memopt_core.Apollo / ApolloMini against the float64 paper reference
(tests/reference/apollo_ref.py): parameters, both moments, P and seed chain over runs crossing >= 2
projection refreshes, and bf16 within twice the bf16 reference's error; the adamw_rule option
(saved, loaded from older checkpoints, checked); projection storage, exact resume across a
refresh, model-based construction, state bytes and error cases. Parity with apollo-torch 1.0.3
(the Projector, trajectories, every parameter of a whole model): test_apollo_vs_apollo_torch.py."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import memopt_core
from apollo_util import GAP, RANK, STEPS, _params
from conftest import (assert_close, assert_snapshot_equal, assert_within_low_precision_budget,
                      make_grads, make_gpt2, make_llama, roundtrip, set_grads, snapshot)
from memopt_core import _C
from memopt_core.app.models import Llama, llama_config
from reference import apollo_ref as R


# ---- adamw_rule: saved, loaded from older checkpoints, checked -----------------------------------
def _with_bias(rule=None):
    params, bias = _params(), nn.Parameter(torch.linspace(-1, 1, 5))
    kw = {} if rule is None else dict(adamw_rule=rule)
    opt = memopt_core.Apollo([{"params": [bias]}, {"params": params, "rank": RANK}], lr=1e-2,
                             weight_decay=0.1, update_proj_gap=GAP, **kw)
    return params + [bias], opt


def _steps(opt, params, start, stop):
    for step in range(start, stop):
        set_grads(params, make_grads(params, step))
        opt.step()


def test_adamw_rule_is_saved_and_a_checkpoint_without_it_resumes_with_torchs_rule():
    """state_dict() keeps adamw_rule per group. A checkpoint saved before the option existed
    (no key) was stepped with torch's rule: it loads as "torch" and resumes bit-identically."""
    straight_p, straight = _with_bias("torch")
    _steps(straight, straight_p, 0, STEPS)
    params, opt = _with_bias("torch")
    _steps(opt, params, 0, 4)
    sd = roundtrip(opt.state_dict())
    assert [g["adamw_rule"] for g in sd["param_groups"]] == ["torch", "torch"]
    old = copy.deepcopy(sd)
    for g in old["param_groups"]:
        del g["adamw_rule"]
    fresh_p = [nn.Parameter(p.detach().clone()) for p in params]
    fresh = memopt_core.Apollo([{"params": fresh_p[-1:]}, {"params": fresh_p[:-1], "rank": RANK}],
                               lr=1e-2, weight_decay=0.1, update_proj_gap=GAP)  # "apollo"
    fresh.load_state_dict(old)
    assert [g["adamw_rule"] for g in fresh.param_groups] == ["torch", "torch"]
    _steps(fresh, fresh_p, 4, STEPS)
    assert all(torch.equal(a, b) for a, b in zip(fresh_p, straight_p))
    # a current checkpoint's own rule wins over the constructor's, as every option does
    params, opt = _with_bias()
    _steps(opt, params, 0, 2)
    other_p, other = _with_bias("torch")
    other.load_state_dict(roundtrip(opt.state_dict()))
    assert [g["adamw_rule"] for g in other.param_groups] == ["apollo", "apollo"]


@pytest.mark.parametrize("rule", ["adam", "Torch", "", None, 1])
def test_bad_adamw_rule_raises_value_error(rule):
    with pytest.raises(ValueError, match="adamw_rule must be 'apollo'.* or 'torch'"):
        memopt_core.Apollo(_params(), rank=RANK, adamw_rule=rule)
    with pytest.raises(ValueError, match="adamw_rule"):  # a group's own value
        memopt_core.ApolloMini([{"params": _params()[:1], "rank": 1},
                                {"params": [nn.Parameter(torch.zeros(3))], "adamw_rule": rule}])


@pytest.mark.parametrize("after_steps", [0, 2], ids=["first_step", "later_step"])
def test_bad_adamw_rule_set_after_construction_fails_step_atomically(after_steps):
    model = make_llama(seed=5)
    opt = memopt_core.Apollo(model, rank=4)
    params = list(model.parameters())
    _steps(opt, params, 0, after_steps)
    set_grads(params, make_grads(params, after_steps))
    opt.param_groups[-1]["adamw_rule"] = "adam"   # the AdamW group, stepped after the projected
    before = snapshot(opt, params)
    with pytest.raises(ValueError, match="adamw_rule"):
        opt.step()
    assert_snapshot_equal(snapshot(opt, params), before)


# ---- the float64 paper reference ------------------------------------------------------------------
def _run_reference(dtype, storage=torch.float64, steps=STEPS, **kw):
    settings = {**dict(rank=RANK, update_proj_gap=GAP), **kw}
    hp = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-6, weight_decay=0.05)
    params = _params(dtype)
    opt = memopt_core.Apollo([{"params": params, **settings}], **hp)
    ref_kw = {**hp, **settings, "norm_growth_limit": opt.param_groups[0]["norm_growth_limit"]}
    ref = R.ApolloRef(params, seeds=[1, 2, 3], **ref_kw)
    low = R.ApolloRef(params, seeds=[1, 2, 3], storage_dtype=storage, **ref_kw)
    for step in range(steps):
        grads = make_grads(params, step)
        set_grads(params, grads)
        opt.step()
        ref.step(grads)
        low.step(grads)
    return params, opt, ref, low


REF_CASES = [dict(scale_type="channel"), dict(scale_type="tensor", norm_growth_limit=None),
             dict(scale_type="tensor", scale=128.0, rank=1, scale_front=True),
             dict(scale_type="channel", proj="svd"), dict(scale_type="channel", proj_type="reverse_std")]


@pytest.mark.parametrize("kw", REF_CASES, ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()))
def test_float64_matches_paper_reference(kw):
    params, opt, ref, _ = _run_reference(torch.float64, **kw)
    for i, p in enumerate(params):
        s = opt.state[p]
        assert_close(p, ref.p[i], 1e-10, f"param {i}", origin=ref.p0[i])
        assert_close(s["exp_avg"], ref.m[i], 1e-10, f"exp_avg {i}")
        assert_close(s["exp_avg_sq"], ref.v[i], 1e-10, f"exp_avg_sq {i}")
        assert_close(s["proj"], ref.P[i], 0, f"P {i}")
        if kw.get("proj", "random") == "random":
            assert int(s["seed"]) == ref.seeds[i]


def test_bfloat16_within_twice_the_bf16_reference_error():
    params, opt, ref, low = _run_reference(torch.bfloat16, storage=torch.bfloat16)
    assert_within_low_precision_budget(opt, params, ref, low)


# ---- state: projection storage, state_dict, bytes --------------------------------------------------
def test_store_projection_false_gives_identical_results_with_less_state():
    runs = []
    for store in (True, False):
        params = _params(torch.bfloat16)
        opt = memopt_core.Apollo(params, lr=1e-2, rank=RANK, update_proj_gap=GAP, store_projection=store)
        for step in range(STEPS):
            set_grads(params, make_grads(params, step))
            opt.step()
        runs.append((params, opt))
    (p1, o1), (p2, o2) = runs
    for a, b in zip(p1, p2):
        assert torch.equal(a, b)
        assert torch.equal(o1.state[a]["exp_avg_sq"], o2.state[b]["exp_avg_sq"])
        assert int(o1.state[a]["seed"]) == int(o2.state[b]["seed"]) > 2**40  # past 2 refreshes
        assert "proj" not in o2.state[b]
    p_bytes = sum(o1.state[a]["proj"].numel() * 2 for a in p1)
    assert o1.state_bytes() - o2.state_bytes() == p_bytes
    with pytest.raises(ValueError, match="store_projection"):
        memopt_core.Apollo(_params(), rank=RANK, proj="svd", store_projection=False)


def test_resume_across_a_refresh_is_exact():
    def run(opt, params, start, stop):
        for step in range(start, stop):
            set_grads(params, make_grads(params, step))
            opt.step()

    straight_p = _params()
    straight = memopt_core.Apollo(straight_p, lr=1e-2, rank=RANK, update_proj_gap=GAP)
    run(straight, straight_p, 0, STEPS + 1)
    params = _params()
    opt = memopt_core.Apollo(params, lr=1e-2, rank=RANK, update_proj_gap=GAP)
    run(opt, params, 0, 4)  # seeds are now next_seed(i): far beyond float precision
    sd = roundtrip(opt.state_dict())
    assert sd["state"][0]["seed"].dtype == torch.int64 and int(sd["state"][0]["seed"]) > 2**53
    fresh_p = [nn.Parameter(p.detach().clone()) for p in params]
    fresh = memopt_core.Apollo(fresh_p, lr=1e-2, rank=RANK, update_proj_gap=GAP)
    fresh.load_state_dict(sd)
    assert [int(fresh.state[p]["seed"]) for p in fresh_p] == [int(opt.state[p]["seed"]) for p in params]
    run(fresh, fresh_p, 4, STEPS + 1)  # crosses the refresh at step 6 with the restored chain
    for a, b in zip(fresh_p, straight_p):
        assert torch.equal(a, b)
        assert all(torch.equal(fresh.state[a][k], straight.state[b][k]) for k in straight.state[b])


def _names(opt, projected):
    return {n for g in opt.param_groups if (g.get("rank") is not None) == projected
            for n in g["param_names"]}


def test_model_construction_projects_attention_and_mlp_only():
    opt = memopt_core.ApolloMini(make_llama())
    projected, kept = _names(opt, True), _names(opt, False)
    assert len(projected) == 14 and all(
        any(k in n for k in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))
        for n in projected)
    assert "model.embed_tokens.weight" in kept and "lm_head.weight" in kept and "model.norm.weight" in kept
    gpt = memopt_core.Apollo(make_gpt2(), rank=4)   # Conv1D (in, out) weights, tied embedding
    assert {n.split(".", 3)[-1] for n in _names(gpt, True)} == {
        "attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight"}
    assert not any("wte" in n or "ln_" in n or n.endswith("bias") for n in _names(gpt, True))
    assert "apollo-" in opt.describe() and "adamw" in opt.describe()


def test_mini_state_is_under_one_percent_of_adamw_on_llama_7b_shapes():
    with torch.device("meta"):
        model = Llama(llama_config(
            "50m", hidden_size=4096, intermediate_size=11008, num_hidden_layers=2,
            num_attention_heads=32, num_key_value_heads=32))
    for store, limit in ((True, 0.01), (False, 0.005)):
        opt = memopt_core.ApolloMini(model, store_projection=store)
        projected = [p for g in opt.param_groups if g.get("rank") for p in g["params"]]
        ours = sum(opt._planned_bytes(p) for p in projected)
        adamw = sum(2 * p.numel() * 4 + 4 for p in projected)
        assert ours < limit * adamw, (store, ours / adamw)
    opt = memopt_core.Apollo(model, rank=256, store_projection=False)
    down = next(p for g in opt.param_groups for n, p in zip(g["param_names"], g["params"]) if "down_proj" in n)
    assert opt._planned_bytes(down) == 2 * 256 * 11008 * 4 + 8 + 4 + 4  # 2 r n + seed, norm, step


# ---- errors ----------------------------------------------------------------------------------
@pytest.mark.parametrize("group,word", [
    (dict(rank=0), "rank"), (dict(rank=2, proj="qr"), "proj"), (dict(rank=2, proj_type="full"), "proj_type"),
    (dict(rank=2, scale_type="row"), "scale_type"), (dict(rank=2, update_proj_gap=0), "update_proj_gap"),
    (dict(rank=2, scale=-1.0), "scale"), (dict(rank=2, norm_growth_limit=float("nan")), "norm_growth_limit")])
def test_bad_group_settings_raise_value_error(group, word):
    with pytest.raises(ValueError, match=word):
        memopt_core.Apollo([{"params": _params()}, {"params": [nn.Parameter(torch.zeros(3))], **group}])


def test_non_matrix_in_a_rank_group_is_rejected():
    with pytest.raises(ValueError, match="2-D"):
        memopt_core.Apollo([{"params": [nn.Parameter(torch.zeros(3))], "rank": 2}])


@pytest.mark.parametrize("found", [{}, {"found_inf": torch.zeros(1)}, {"found_inf": torch.ones(1)}],
                         ids=["", "found_inf=0", "found_inf=1"])
def test_opcheck_apollo(found):
    """With found_inf the counters start at 1, off the refresh every update_proj_gap (2) steps
    a call with found_inf may not make (test_found_inf.py)."""
    params = _params()
    projs = [_C.Projector("random", "std", 2, list(p.shape)) for p in params]
    m = [torch.zeros(pr.low_rank_shape) for pr in projs]
    v = [torch.zeros(pr.low_rank_shape) for pr in projs]
    P = [torch.zeros(pr.proj_shape) for pr in projs]
    args = ([p.detach() for p in params], make_grads(params, 0), m, v, P,
            [torch.tensor(i + 1) for i in range(3)], [torch.tensor(-1.0) for _ in params],
            [torch.full((), float(bool(found))) for _ in params], torch.tensor(1e-3), 0.9, 0.999,
            1e-6, 0.0, 2, "random", "std", "channel", 2, 1.0, 1.01, False)
    torch.library.opcheck(torch.ops.memopt.apollo_.default, args, kwargs=found)


@pytest.mark.parametrize("store", [True, False])
def test_no_parameter_sized_allocation_in_refresh_or_regeneration_steps(store):
    from test_optimizer_contract import _allocations_during
    w = nn.Parameter(torch.randn(256, 1024))
    opt = memopt_core.Apollo([w], lr=1e-3, rank=16, update_proj_gap=2, store_projection=store)
    w.grad = torch.randn_like(w)
    opt.step()
    opt.step()                                     # state and workspace sized
    for _ in range(2):                             # a refresh step (t = 2), then a plain one
        sizes = _allocations_during(opt.step)
        assert max(sizes, default=0) < 0.01 * w.numel() * 4, max(sizes)
