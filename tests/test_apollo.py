"""memopt_core.Apollo / ApolloMini against PyPI apollo-torch 1.0.3 (same groups, so the same
seeds and projections) and against the float64 paper reference (tests/reference/apollo_ref.py):
parameters, both moments, P, seed chain and limiter norm, over runs crossing >= 2 projection
refreshes; every parameter of a whole model (the AdamW groups under both adamw_rule values);
plus the Projector, model-based construction, state bytes and error cases."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import memopt_core
from conftest import (assert_close, assert_snapshot_equal, assert_within_low_precision_budget,
                      make_grads, make_gpt2, make_llama, roundtrip, set_grads, snapshot)
from memopt_core import _C
from memopt_core.app.models import Llama, llama_config
from reference import apollo_ref as R
from reference.adamw_ref import AdamWRef

apollo_torch = pytest.importorskip("apollo_torch")
from apollo_torch.random_projector import next_seed as their_next_seed  # noqa: E402
from apollo_torch.random_projector import stable_randn  # noqa: E402

STEPS, GAP, RANK = 8, 3, 4        # refreshes at steps 0, 3 and 6
SHAPES = [(24, 40), (40, 24), (32, 32)]  # wide (left, per-column), tall and square (right, per-row)


def _params(dtype=torch.float32, shapes=SHAPES, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(s, generator=gen, dtype=torch.float64).to(dtype)) for s in shapes]


# ---- the Projector -------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [1, 7, 123456789, 2**62 + 12345])
def test_seed_chain_is_apollo_torchs(seed):
    assert _C.Projector.next_seed(seed) == their_next_seed(seed)


@pytest.mark.parametrize("shape,side", [((24, 40), "left"), ((40, 24), "right"), ((32, 32), "right")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gaussian_projection_is_bit_identical_to_stable_randn(shape, side, dtype):
    proj = _C.Projector("random", "std", RANK, list(shape))
    assert proj.side == side
    ps = (shape[0], RANK) if side == "left" else (RANK, shape[1])
    assert tuple(proj.proj_shape) == ps
    expected = (stable_randn(ps, seed=5) / math.sqrt(RANK)).to(dtype)
    assert torch.equal(proj.gaussian(5, torch.empty(0, dtype=dtype)), expected)


@pytest.mark.parametrize("proj_type,tall,wide", [("std", "right", "left"), ("reverse_std", "left", "right"),
                                                 ("left", "left", "left"), ("right", "right", "right")])
def test_projection_side_rule(proj_type, tall, wide):
    assert _C.Projector("random", proj_type, 2, [8, 4]).side == tall
    assert _C.Projector("random", proj_type, 2, [4, 8]).side == wide


def test_svd_projection_matches_galore_projector():
    from apollo_torch.svd_projector import GaLoreProjector
    for shape in SHAPES:
        g = make_grads(_params(shapes=[shape]), 0)[0]
        theirs = GaLoreProjector(RANK, proj_type="std")
        theirs.project(g, 0)
        assert torch.equal(_C.Projector("svd", "std", RANK, list(shape)).svd(g), theirs.ortho_matrix)
    assert _C.Projector("svd", "std", 64, [8, 16]).rank == 8  # at most min(m, n) vectors


# ---- parity with apollo-torch 1.0.3 -------------------------------------------------------------
CASES = {  # name: (group settings, optimizer-level apollo-torch flags)
    "channel": (dict(scale_type="channel"), {}),
    "channel_no_limiter": (dict(scale_type="channel"), dict(disable_nl=True)),
    "tensor": (dict(scale_type="tensor"), {}),
    "tensor_no_limiter": (dict(scale_type="tensor"), dict(disable_nl=True)),
    "mini_scale_front": (dict(scale_type="tensor", scale=128, rank=1), dict(scale_front=True)),
    "svd_channel": (dict(scale_type="channel", proj="svd"), {}),
    "svd_tensor_no_limiter": (dict(scale_type="tensor", proj="svd"), dict(disable_nl=True)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_apollo_torch(case):
    settings, flags = CASES[case]
    group = dict(dict(rank=RANK, proj="random", proj_type="std", update_proj_gap=GAP, scale=1.0),
                 **settings)
    hp = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-6, weight_decay=0.05)
    ours_p, their_p = _params(), _params()
    bias, their_bias = nn.Parameter(torch.zeros(5)), nn.Parameter(torch.zeros(5))
    # the AdamW group first (README order): the projected tensors' seeds are 2, 3, 4
    ours = memopt_core.Apollo([{"params": [bias]}, {"params": ours_p, **group}], **hp,
                              norm_growth_limit=None if flags.get("disable_nl") else 1.01,
                              scale_front=flags.get("scale_front", False))
    theirs = apollo_torch.APOLLOAdamW([{"params": [their_bias]}, {"params": their_p, **group}],
                                      **hp, **flags)
    start = [p.detach().clone() for p in ours_p]
    for step in range(STEPS):
        grads = make_grads(ours_p + [bias], step)
        set_grads(ours_p + [bias], grads)
        set_grads(their_p + [their_bias], grads)
        ours.step()
        theirs.step()
    s, t = ours.state[bias], theirs.state[their_bias]  # the AdamW group: apollo-torch's rule
    assert_close(bias, their_bias, 2e-5, f"{case} bias")
    assert_close(s["exp_avg"], t["exp_avg"], 2e-5, f"{case} bias exp_avg")
    assert_close(s["exp_avg_sq"], t["exp_avg_sq"], 2e-5, f"{case} bias exp_avg_sq")
    for i, (p, q, p0) in enumerate(zip(ours_p, their_p, start)):
        s, t = ours.state[p], theirs.state[q]
        what = f"{case} tensor {i} {tuple(p.shape)}"
        assert s["step"].item() == t["step"] == STEPS
        assert_close(p, q, 2e-5, f"{what} param", origin=p0)
        assert_close(s["exp_avg"], t["exp_avg"], 2e-5, f"{what} exp_avg")
        assert_close(s["exp_avg_sq"], t["exp_avg_sq"], 2e-5, f"{what} exp_avg_sq")
        assert_close(s["proj"], t["projector"].ortho_matrix, 1e-6, f"{what} P")
        if group["proj"] == "random":   # ours: seed of the current P; theirs: the next one
            assert torch.equal(s["proj"], t["projector"].ortho_matrix)
            assert _C.Projector.next_seed(int(s["seed"])) == t["projector"].seed
        if flags.get("disable_nl"):
            assert s["limiter_norm"].item() == -1.0 and "scaled_grad" not in t
        else:
            assert_close(s["limiter_norm"], t["scaled_grad"], 2e-5, f"{what} limiter norm")


def test_several_tiles_match_apollo_torch():
    """K * r beyond one workspace tile: R is formed in several GEMM tiles (fp32 and bf16)."""
    shape, rank = (96, 2 * _C.apollo_tile_elements() // 32 + 8), 32
    for dtype in (torch.float32, torch.bfloat16):
        p, q = _params(dtype, [shape]), _params(dtype, [shape])
        # scratch: one R tile (+ a widened gradient slice for bf16), well under the parameter
        assert _C.apollo_workspace_bytes(list(shape), p[0], rank, "random", "std", "channel", 1.01,
                                         True) < p[0].numel() * (1 if dtype == torch.float32 else 2)
        group = dict(rank=rank, proj="random", update_proj_gap=2, scale_type="channel", proj_type="std", scale=1.0)
        ours = memopt_core.Apollo([{"params": p, **group}], lr=1e-2)
        theirs = apollo_torch.APOLLOAdamW([{"params": q, **group}], lr=1e-2)
        for step in range(3):
            g = make_grads(p, step)
            set_grads(p, g)
            set_grads(q, g)
            ours.step()
            theirs.step()
        if dtype == torch.float32:
            assert_close(ours.state[p[0]]["exp_avg_sq"], theirs.state[q[0]]["exp_avg_sq"], 2e-5, "v")
            assert_close(p[0], q[0], 2e-5, "param")
        else:  # apollo-torch projects in bf16, we in fp32: agree to bf16 precision
            assert_close(ours.state[p[0]]["exp_avg"], theirs.state[q[0]]["exp_avg"], 2e-2, "m")


# ---- every parameter of a whole model ---------------------------------------------------------------
MODEL_STEPS, MODEL_GAP = 13, 4  # projection refreshes at steps 0, 4, 8 and 12
MODEL_HP = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-6, weight_decay=0.1)
MODEL_CASES = {  # apollo-torch README's groups: APOLLO (per channel) and APOLLO-Mini
    "apollo": (memopt_core.Apollo, dict(rank=8, scale_type="channel", scale=1.0)),
    "apollo_mini": (memopt_core.ApolloMini, dict(rank=1, scale_type="tensor", scale=128.0)),
}


def _apollo_torch_groups(model, settings):
    """apollo-torch's own group format (its main_pretrain.py): the weights of the attention and
    MLP linears in a `rank` group, every other parameter (embedding, norms, lm_head) in a plain
    one, first, so the projected weights' seeds follow theirs."""
    lowrank = [m.weight for name, m in model.named_modules()
               if isinstance(m, nn.Linear) and ("attn" in name or "mlp" in name)]
    ids = {id(p) for p in lowrank}
    return [{"params": [p for p in model.parameters() if id(p) not in ids]},
            {"params": lowrank, "proj": "random", "proj_type": "std",
             "update_proj_gap": MODEL_GAP, **settings}]


def _run_models(case, **ours_kw):
    """Our optimizer and apollo-torch's on two copies of a tiny HF LLaMA, the same gradients for
    MODEL_STEPS steps. Returns [(name, ours, theirs, start, projected)] per parameter, the
    optimizers, and the float64 torch-rule AdamW reference run on the non-projected tensors."""
    cls, settings = MODEL_CASES[case]
    ours_model, their_model = make_llama(seed=3), make_llama(seed=3)
    ours = cls(_apollo_torch_groups(ours_model, settings), **MODEL_HP, **ours_kw)
    theirs = apollo_torch.APOLLOAdamW(_apollo_torch_groups(their_model, settings), **MODEL_HP)
    projected = {id(p) for p in ours.param_groups[1]["params"]}
    named = list(ours_model.named_parameters())
    params, their_params = [p for _, p in named], list(their_model.parameters())
    start = [p.detach().clone() for p in params]
    plain = [p for p in params if id(p) not in projected]
    ref = AdamWRef(plain, lr=MODEL_HP["lr"], betas=MODEL_HP["betas"], eps=MODEL_HP["eps"],
                   weight_decay=MODEL_HP["weight_decay"])
    for step in range(MODEL_STEPS):
        grads = make_grads(params, step)
        set_grads(params, grads)
        set_grads(their_params, grads)
        ours.step()
        theirs.step()
        ref.step([g for p, g in zip(params, grads) if id(p) not in projected])
    rows = [(n, p, q, p0, id(p) in projected)
            for (n, p), q, p0 in zip(named, their_params, start)]
    return rows, ours, theirs, ref


@pytest.mark.parametrize("case", sorted(MODEL_CASES))
def test_every_parameter_of_a_model_matches_apollo_torch(case):
    """The default adamw_rule="apollo": embeddings, norms and lm_head (apollo-torch's groups
    without rank) step as apollo-torch steps them, and so do the projected weights: every
    parameter and moment within 1e-5 of apollo-torch after 13 float32 steps, 4 refreshes."""
    rows, ours, theirs, _ = _run_models(case)
    assert {g["adamw_rule"] for g in ours.param_groups} == {"apollo"}
    assert sum(not projected for *_, projected in rows) == 7  # embedding, 4+1 norms, lm_head
    for name, p, q, p0, _ in rows:
        s, t = ours.state[p], theirs.state[q]
        assert s["step"].item() == t["step"] == MODEL_STEPS
        assert_close(p, q, 1e-5, f"{case} {name} param", origin=p0)
        assert_close(s["exp_avg"], t["exp_avg"], 1e-5, f"{case} {name} exp_avg")
        assert_close(s["exp_avg_sq"], t["exp_avg_sq"], 1e-5, f"{case} {name} exp_avg_sq")


@pytest.mark.parametrize("case", sorted(MODEL_CASES))
def test_torch_rule_steps_the_other_tensors_as_torch_adamw(case):
    """adamw_rule="torch": the non-projected tensors follow a float64 torch.optim.AdamW (and
    differ from apollo-torch: the two rules are told apart here), the projected ones still
    follow apollo-torch."""
    rows, ours, theirs, ref = _run_models(case, adamw_rule="torch")
    plain = [row for row in rows if not row[-1]]
    for i, (name, p, q, p0, _) in enumerate(plain):
        s = ours.state[p]
        assert_close(p, ref.p[i], 1e-5, f"{case} {name} param", origin=p0)
        assert_close(s["exp_avg"], ref.m[i], 1e-5, f"{case} {name} exp_avg")
        assert_close(s["exp_avg_sq"], ref.v[i], 1e-5, f"{case} {name} exp_avg_sq")
        moved, apart = (q - p0).norm(), (p - q).norm()
        assert apart > 1e-3 * moved, f"{name}: the torch rule should differ from apollo-torch's"
    for name, p, q, p0, _ in (row for row in rows if row[-1]):
        assert_close(p, q, 1e-5, f"{case} {name} param", origin=p0)


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


def test_opcheck_apollo():
    params = _params()
    projs = [_C.Projector("random", "std", 2, list(p.shape)) for p in params]
    m = [torch.zeros(pr.low_rank_shape) for pr in projs]
    v = [torch.zeros(pr.low_rank_shape) for pr in projs]
    P = [torch.zeros(pr.proj_shape) for pr in projs]
    args = ([p.detach() for p in params], make_grads(params, 0), m, v, P,
            [torch.tensor(i + 1) for i in range(3)], [torch.tensor(-1.0) for _ in params],
            [torch.zeros(()) for _ in params], torch.tensor(1e-3), 0.9, 0.999, 1e-6, 0.0, 2,
            "random", "std", "channel", 2, 1.0, 1.01, False)
    torch.library.opcheck(torch.ops.memopt.apollo_.default, args)


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
