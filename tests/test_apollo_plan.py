"""memopt::ApolloPlan (_C.ApolloPlan, _C.apollo_ranks, _C.apollo_rank_groups), the one statement
of APOLLO's decisions that both front ends apply, against an independent pure-Python statement
of apollo-torch 1.0.3's rules (GaLore's projection sides, one group per rank, seeds = 1-based
positions) and the memopt state layout: which tensors are projected at which rank, every
tensor's state (keys, shapes, dtypes, layout, sharding, fills), seeds across groups, settings
checks and checkpoint checks; and what the Python front end does with it on loading. Its
trajectories against apollo-torch itself: test_apollo_vs_apollo_torch.py, test_fuzz_apollo.py."""
from __future__ import annotations

import itertools

import pytest
import torch


def _dtype(code, param_dtype):
    """The torch.dtype of a state of StateDType `code` for a parameter of `param_dtype`."""
    return _C.state_dtype(code, torch.empty(0, dtype=param_dtype))


def _check_saved(plan, i, saved: dict, param_dtype, where):
    plan.check_saved(i, list(saved.items()), torch.empty(0, dtype=param_dtype), where)

import memopt_core
from memopt_core import _C

PARAM, INT64, SCALAR = 0, 2, 4  # memopt::StateDType codes
# roles whose 2-D tensors apollo-torch's pre-training scripts project (attention and MLP
# linears, and other hidden linears)
HIDDEN = {"query", "key", "value", "attn_out", "qkv", "mlp", "linear"}
SETTINGS = dict(proj="random", proj_type="std", scale_type="channel", update_proj_gap=200,
                scale=1.0, norm_growth_limit=1.01, scale_front=False, store_projection=True,
                adamw_rule="apollo")


def oracle_ranks(shapes, roles, rank):
    return [max(1, min(rank, *s)) if rank > 0 and len(s) == 2 and (r is None or r in HIDDEN)
            else 0 for s, r in zip(shapes, roles)]


def oracle_groups(ranks):
    order = list(dict.fromkeys(r for r in ranks if r))
    groups = [(r, [i for i, x in enumerate(ranks) if x == r]) for r in order]
    rest = [i for i, x in enumerate(ranks) if x == 0]
    return groups + ([(0, rest)] if rest else [])


def oracle_state(shape, seed, rank=None, proj="random", proj_type="std",
                 store_projection=True, **_):
    """GaLore / apollo-torch: "std" compresses the smaller side (right if m >= n), R = G P^T
    (m, r) on the right, P^T G (r, n) on the left; SVD keeps at most min(m, n) vectors."""
    if rank is None:
        dims = list(range(len(shape)))
        return [("exp_avg", list(shape), PARAM, True, dims, 0.0),
                ("exp_avg_sq", list(shape), PARAM, True, dims, 0.0)]
    m, n = shape
    right = {"std": m >= n, "reverse_std": m < n, "right": True, "left": False}[proj_type]
    r = min(rank, m, n) if proj == "svd" else rank
    low, p_shape, channels_dim = ([m, r], [r, n], [0]) if right else ([r, n], [m, r], [1])
    out = [("exp_avg", low, PARAM, False, channels_dim, 0.0),
           ("exp_avg_sq", low, PARAM, False, channels_dim, 0.0)]
    if store_projection:
        out.append(("proj", p_shape, PARAM, False, [], 0.0))
    if proj == "random":
        out.append(("seed", [], INT64, False, [], float(seed)))
    return out + [("limiter_norm", [], SCALAR, False, [], -1.0)]


def add(plan, shapes, rank=None, split=(), **kw):
    s = {**SETTINGS, **kw}
    plan.add_group([list(x) for x in shapes], rank, s["proj"], s["proj_type"], s["scale_type"],
                   s["update_proj_gap"], s["scale"], s["norm_growth_limit"], s["scale_front"],
                   s["store_projection"], s["adamw_rule"], list(split))


# ---- which tensors are projected ---------------------------------------------------------
SHAPES = [(8, 6), (4, 10), (6, 6), (12,), (3, 5), (2, 3, 4), (1, 9), (40, 32)]
ROLES = ["mlp", "query", "embedding", "norm", "linear", "conv", "attn_out", "output"]


@pytest.mark.parametrize("rank", [0, 1, 3, 5, 256])
@pytest.mark.parametrize("named", [True, False])
def test_ranks_and_groups_match_the_rule(rank, named):
    roles = ROLES if named else [None] * len(SHAPES)
    ranks = _C.apollo_ranks([list(s) for s in SHAPES], roles, rank)
    assert ranks == oracle_ranks(SHAPES, roles, rank)
    assert [(r, list(i)) for r, i in _C.apollo_rank_groups(ranks)] == oracle_groups(ranks)


def test_every_role_and_a_negative_rank():
    for role in _C.role_names():
        assert _C.apollo_ranks([[4, 6]], [role], 2) == oracle_ranks([(4, 6)], [role], 2), role
    with pytest.raises(ValueError, match="rank must be >= 0"):
        _C.apollo_ranks([[4, 6]], ["mlp"], -1)
    with pytest.raises(ValueError, match="unknown role|role"):
        _C.apollo_ranks([[4, 6]], ["attention"], 2)


# ---- the plan: layouts and seeds ---------------------------------------------------------
CASES = list(itertools.product(["random", "svd"], ["std", "reverse_std", "left", "right"],
                               [True, False]))


@pytest.mark.parametrize("proj,proj_type,store", [c for c in CASES if c[0] == "random" or c[2]])
def test_state_layouts_and_seeds_across_groups(proj, proj_type, store):
    plan = _C.ApolloPlan()
    groups = [([(8, 6), (4, 10)], dict(rank=3)), ([(5,), (2, 3)], {}),
              ([(6, 6), (2, 9)], dict(rank=4))]   # a rank above a side: SVD keeps min(m, n)
    for shapes, kw in groups:
        add(plan, shapes, proj=proj, proj_type=proj_type, store_projection=store, **kw)
    assert len(plan) == 6
    flat = [(s, kw) for shapes, kw in groups for s in shapes]
    for i, (shape, kw) in enumerate(flat):
        want = oracle_state(shape, i + 1, proj=proj, proj_type=proj_type,
                            store_projection=store, **kw)
        assert [tuple(x) for x in plan.state(i)] == [tuple(x) for x in want], (i, shape)
        assert plan.projected(i) == ("rank" in kw)
        assert plan.seed(i) == i + 1  # apollo-torch: 1-based position among all parameters


def test_reporting_figures():
    plan = _C.ApolloPlan()
    add(plan, [(8, 6), (4, 10)], rank=3)
    add(plan, [(4, 10)], rank=3, scale_type="tensor", proj_type="right")
    add(plan, [(7,)])
    assert [plan.side(i) for i in range(3)] == ["right", "left", "right"]
    assert [plan.rank(i) for i in range(3)] == [3, 3, 3]
    assert [plan.scale_factors(i) for i in range(4)] == [8, 10, 1, 0]  # channels / tensor / AdamW
    like = torch.empty(0, dtype=torch.bfloat16)
    for i, shape, kw in [(0, [8, 6], {}), (2, [4, 10], dict(proj_type="right", st="tensor"))]:
        assert plan.workspace_bytes(i, torch.bfloat16) == _C.apollo_workspace_bytes(
            shape, like, 3, "random", kw.get("proj_type", "std"), kw.get("st", "channel"), 1.01,
            True)
    assert plan.workspace_bytes(3, torch.float32) == 0
    with pytest.raises(ValueError, match="no projector"):
        plan.side(3)
    assert _dtype(SCALAR, torch.float64) == torch.float64
    assert _dtype(SCALAR, torch.bfloat16) == torch.float32
    assert _dtype(INT64, torch.float16) == torch.int64
    assert _dtype(PARAM, torch.float16) == torch.float16


# ---- settings checks ---------------------------------------------------------------------
@pytest.mark.parametrize("kw,match", [
    (dict(rank=0), "rank"), (dict(rank=2, proj="qr"), "proj"),
    (dict(rank=2, proj_type="full"), "proj_type"), (dict(rank=2, scale_type="row"), "scale_type"),
    (dict(rank=2, update_proj_gap=0), "update_proj_gap"), (dict(rank=2, scale=-1.0), "scale"),
    (dict(rank=2, norm_growth_limit=float("nan")), "norm_growth_limit"),
    (dict(adamw_rule="adam"), "adamw_rule must be 'apollo'"), (dict(adamw_rule=None), "adamw_rule"),
    (dict(rank=2, proj="svd", store_projection=False), "store_projection=True"),
    (dict(rank=2, proj="svd", split=[False, True]), "proj='random'"),
    (dict(rank=2, shapes=[(4, 6), (5,)]), "2-D"), (dict(rank=2, shapes=[(0, 6)]), "empty")])
def test_bad_settings_raise_and_leave_the_plan_as_it_was(kw, match):
    plan = _C.ApolloPlan()
    add(plan, [(4, 6)], rank=2)
    shapes = kw.pop("shapes", [(4, 6), (6, 4)])
    with pytest.raises(ValueError, match=match):
        add(plan, shapes, **kw)
    assert len(plan) == 1
    add(plan, [(6, 4)], rank=2)  # positions and seeds go on where they were
    assert [tuple(x) for x in plan.state(1)] == oracle_state((6, 4), 2, rank=2)
    add(plan, [(4, 6)], rank=2, proj="random", split=[True])  # random projection: sharded is fine
    add(plan, [(4, 6)], rank=None, proj="qr", scale=-1.0)     # an AdamW group's other keys: unused


# ---- checkpoint checks -------------------------------------------------------------------
def saved_state(plan, i, param_dtype=torch.float32):
    out = {"step": torch.tensor(3.0)}
    for key, shape, code, *_ in plan.state(i):
        out[key] = torch.zeros(shape, dtype=_dtype(code, param_dtype))
    return out


def test_check_saved():
    plan = _C.ApolloPlan()
    add(plan, [(8, 6)], rank=3)
    add(plan, [(5,)])
    for i in range(2):
        _check_saved(plan, i, saved_state(plan, i), torch.float32, "p")
    _check_saved(plan, 0, saved_state(plan, 0, torch.bfloat16), torch.bfloat16, "p")
    fp32 = saved_state(plan, 0)  # float32 moments for a bf16 parameter are accepted
    fp32["limiter_norm"] = fp32["limiter_norm"].float()
    _check_saved(plan, 0, fp32, torch.bfloat16, "p")
    bad = [({"seed": None}, ValueError, "lacks state 'seed'"),
           ({"proj": torch.zeros(3, 8)}, ValueError, "'proj' has shape"),
           ({"seed": torch.zeros((), dtype=torch.float32)}, TypeError, "'seed' has dtype"),
           ({"extra": torch.zeros(1)}, ValueError, "does not keep"),
           ({"step": torch.tensor(3)}, ValueError, "step must be")]
    for change, exc, match in bad:
        saved = {**saved_state(plan, 0), **change}
        saved = {k: v for k, v in saved.items() if v is not None}
        with pytest.raises(exc, match=f"where.*{match}|{match}"):
            _check_saved(plan, 0, saved, torch.float32, "where")
    with pytest.raises(ValueError, match="'proj', which this optimizer does not keep"):
        _check_saved(plan, 1, {**saved_state(plan, 1), "proj": torch.zeros(1)}, torch.float32, "p")


# ---- the Python front end on the plan (its trajectories: test_apollo_vs_apollo_torch.py) ---
def _steps(opt, params, start, stop):
    for step in range(start, stop):
        for i, p in enumerate(params):
            p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(100 * step + i))
        opt.step()


def _params(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in [(6, 10), (9, 4), (5,)]]


@pytest.mark.parametrize("saved_store", [True, False])
def test_a_loaded_checkpoint_brings_its_layout_settings(saved_store):
    """torch takes a group's settings from the checkpoint: the plan is rebuilt from them, so a
    checkpoint saved with the other store_projection loads and resumes exactly."""

    def make(params, store):
        return memopt_core.Apollo([{"params": params[:2], "rank": 3}, {"params": params[2:]}],
                                  lr=1e-2, update_proj_gap=2, store_projection=store)
    straight_p = _params()
    straight = make(straight_p, saved_store)
    _steps(straight, straight_p, 0, 5)
    params = _params()
    opt = make(params, saved_store)
    _steps(opt, params, 0, 3)
    fresh_p = [torch.nn.Parameter(p.detach().clone()) for p in params]
    fresh = make(fresh_p, not saved_store)
    fresh.load_state_dict(opt.state_dict())
    assert ("proj" in fresh.state[fresh_p[0]]) == saved_store
    assert fresh.param_groups[0]["store_projection"] == saved_store
    _steps(fresh, fresh_p, 3, 5)
    assert all(torch.equal(a, b) for a, b in zip(fresh_p, straight_p))


def test_a_checkpoint_the_plan_refuses_changes_nothing():
    params = _params()
    opt = memopt_core.Apollo([{"params": params[:2], "rank": 3}, {"params": params[2:]}], lr=1e-2)
    _steps(opt, params, 0, 2)
    for change, exc in [({"seed": torch.zeros(())}, TypeError),
                        ({"extra": torch.zeros(1)}, ValueError)]:
        sd = opt.state_dict()
        sd["state"] = {k: dict(v) for k, v in sd["state"].items()}
        sd["state"][0].update(change)
        sd["param_groups"][0]["scale_type"] = "tensor"  # the plan loading it would have
        before = {k: v.clone() for k, v in opt.state[params[0]].items()}
        with pytest.raises(exc, match="Apollo: the loaded state of parameter 0"):
            opt.load_state_dict(sd)
        assert opt.param_groups[0]["scale_type"] == "channel" and len(opt.plan) == 3
        assert opt.plan.scale_factors(0) == 10  # the constructor's plan: one per column
        assert all(torch.equal(opt.state[params[0]][k], v) for k, v in before.items())
    _steps(opt, params, 2, 3)


def test_rank_zero_projects_nothing_and_a_negative_rank_is_refused():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 4))
    opt = memopt_core.Apollo(model, rank=0, roles={r"\.weight$": "mlp"})
    assert [g.get("rank") for g in opt.param_groups] == [None]
    with pytest.raises(ValueError, match="rank must be >= 0"):
        memopt_core.Apollo(model, rank=-1)
