"""Fuzzing APOLLO / APOLLO-Mini (param groups and named parameters) against the float64 reference
(settings and strategies: fuzz_common)."""
from __future__ import annotations

import pytest
import torch

from fuzz_common import (APOLLO_BETA2, Case, FUZZ, SIZES, adam_rows, bf16_rule, cases, check,
                         hparams, make_params, named, named_cases, quiet, role_overrides, run,
                         shapes, steps_taken)
from hypothesis import given  # noqa: E402  (fuzz_common skips the module without hypothesis)
from hypothesis import strategies as st  # noqa: E402

import memopt_core  # noqa: E402
from reference.adamw_ref import AdamWRef  # noqa: E402
from reference.apollo_ref import ApolloRef  # noqa: E402


# ---- APOLLO / APOLLO-Mini ------------------------------------------------------------------
PROJECTED_ROLES = ("query", "key", "value", "attn_out", "qkv", "mlp", "linear")


@st.composite
def apollo_options(draw):
    proj = draw(st.sampled_from(["random", "random", "svd"]))
    return dict(
        rank=draw(st.integers(1, 6)), proj=proj,
        proj_type=draw(st.sampled_from(["std", "reverse_std", "left", "right"])),
        scale_type=draw(st.sampled_from(["channel", "tensor"])),
        update_proj_gap=draw(st.integers(1, 3)),
        scale=draw(st.sampled_from([1.0, 0.25, 128.0])),
        norm_growth_limit=draw(st.sampled_from([None, 1.01, 1.5])),
        scale_front=draw(st.booleans()),
        store_projection=proj == "svd" or draw(st.booleans()),
        adamw_rule=draw(st.sampled_from(["apollo", "torch"])))


@st.composite
def apollo_group_cases(draw):
    """apollo-torch-style groups: projected matrices (a group with 'rank'), the rest AdamW."""
    projected = st.lists(st.tuples(st.tuples(SIZES, SIZES), st.just("apollo")), min_size=1, max_size=3)
    others = st.lists(st.tuples(shapes(0, 4), st.just("adam")), max_size=2)
    tensors = st.tuples(projected, others).map(lambda t: t[0] + t[1])
    case = draw(cases(tensors, max_steps=5, beta2=APOLLO_BETA2))
    case.opts = dict(apollo=draw(apollo_options()), adamw_first=draw(st.booleans()))
    return no_broadcast_grads(case) if case.opts["apollo"]["proj"] == "svd" else case


def no_broadcast_grads(case: Case) -> Case:
    """A broadcast (rank-1) gradient leaves SVD basis vectors orthogonal to it: their projected
    gradient is rounding noise (or exactly 0: 0/0 with eps = 0), and Adam's M / sqrt(V) of
    noise is O(1) and arbitrary. No reference can pin that down, so SVD cases get other
    layouts."""
    case.grad_layouts = ["strided" if x == "expanded" else x for x in case.grad_layouts]
    return case


def apollo_refs(case: Case, opt, params):
    """Per tensor: its reference (ApolloRef or AdamWRef, exact and bf16-stored) and the index in
    it. Seeds are apollo-torch's: the parameter's 1-based position across the groups."""
    position = {id(p): k + 1 for k, p in enumerate(q for g in opt.param_groups for q in g["params"])}
    hp = hparams(case)
    exact, low, where = [], [], {}
    for group in opt.param_groups:
        ps = group["params"]
        kw = dict(lr=group["lr"], betas=hp["betas"], eps=hp["eps"], weight_decay=group["weight_decay"])
        if group.get("rank") is None:  # AdamW under the group's rule (apollo-torch's or torch's)
            make = lambda dt: AdamWRef(ps, **kw, storage_dtype=dt, rule=group["adamw_rule"])  # noqa: E731
        else:
            opts = {k: group[k] for k in ("rank", "proj", "proj_type", "scale_type", "update_proj_gap",
                                          "scale", "norm_growth_limit", "scale_front")}
            seeds = [position[id(p)] for p in ps]
            make = lambda dt: ApolloRef(ps, seeds, **kw, **opts, storage_dtype=dt)  # noqa: E731
        exact.append(make(torch.float64))
        low.append(make(case.dtype))
        for j, p in enumerate(ps):
            where[p] = (len(exact) - 1, j)
    index = {id(p): i for i, p in enumerate(params)}

    def step(refs):
        def go(plain):
            for r, ref in enumerate(refs):
                ref.step([plain[index[id(p)]] for p in opt.param_groups[r]["params"]])
        return go
    return exact, low, where, step


def projection_condition(ref: ApolloRef, j: int, g: torch.Tensor) -> torch.Tensor:
    """Per element of the weight: K * kappa of its channel, where R = P G is a sum of K products
    and kappa = || |P| |G| || / ||R|| over the channel (the whole tensor for tensor-wise
    scaling). Floating point forms R with a relative error up to about K * u * kappa (Higham's
    dot-product bound), and APOLLO's s_c = ||Rt_c|| / ||R_c|| passes it on: a channel whose
    projection nearly cancels is ill-conditioned in any precision (float32 GEMM, as in
    apollo-torch)."""
    P = ref.P[j]
    if ref.right[j]:
        R, bound, dim, k = g @ P.t(), g.abs() @ P.abs().t(), 1, g.shape[1]
    else:
        R, bound, dim, k = P.t() @ g, P.abs().t() @ g.abs(), 0, g.shape[0]
    if ref.scale_type == "channel":
        kappa = bound.norm(dim=dim, keepdim=True) / R.norm(dim=dim, keepdim=True).clamp_min(1e-300)
    else:
        kappa = (bound.norm() / R.norm().clamp_min(1e-300)).reshape(1, 1)
    return (k * kappa).expand(g.shape)


def run_apollo(case: Case, opt, params):
    """Steps `opt` and the references, then compares every tensor (P, seed and limiter norm
    too); bf16 by the DESIGN's rule. A projected weight's tolerance grows with the condition
    of its projections (projection_condition) along the path it moved."""
    exact, low, where, step = apollo_refs(case, opt, params)
    cond = {p: torch.zeros(p.shape, dtype=torch.float64) for p in params}
    path = {p: torch.zeros(p.shape, dtype=torch.float64) for p in params}

    def exact_step(plain):
        before = {p: exact[where[p][0]].p[where[p][1]] for p in params}
        step(exact)(plain)
        for p, g in zip(params, plain):
            ref, j = exact[where[p][0]], where[p][1]
            if g is not None and isinstance(ref, ApolloRef):
                cond[p] = torch.maximum(cond[p], projection_condition(ref, j, g.double()))
            path[p] += (ref.p[j] - before[p]).abs()

    run(case, opt, params, exact_step, step(low))
    unit = torch.finfo(case.dtype).eps / 2
    rows = []
    for i, p in enumerate(params):
        r, j = where[p]
        ref, n = exact[r], steps_taken(case, i)
        what = f"tensor {i} {tuple(p.shape)} {type(ref).__name__}"
        if not n:
            assert p not in opt.state, what
            continue
        s = opt.state[p]
        assert s["step"].item() == n, what
        check(case, p, ref.p[j], f"{what} param", origin=ref.p0[j], atol=4 * unit * cond[p] * path[p])
        check(case, s["exp_avg"], ref.m[j], f"{what} exp_avg")
        check(case, s["exp_avg_sq"], ref.v[j], f"{what} exp_avg_sq")
        if isinstance(ref, ApolloRef):
            group = next(g for g in opt.param_groups if any(q is p for q in g["params"]))
            if "proj" in s and case.dtype != torch.bfloat16:
                check(case, s["proj"], ref.P[j], f"{what} P", rtol=0 if group["proj"] == "random" else None)
            if "seed" in s:
                assert int(s["seed"]) == ref.seeds[j], what
            if ref.gamma and case.dtype != torch.bfloat16:
                norm = ref.norm[j].reshape(())  # ||U||: as ill-conditioned as its worst channel
                check(case, s["limiter_norm"], norm, f"{what} limiter norm",
                      atol=4 * unit * cond[p].max() * norm.abs())
        rows += adam_rows(opt, p, ref, low[r], j)
    if case.dtype == torch.bfloat16:
        bf16_rule(rows)


def fuzz_apollo_groups(case: Case):
    params = make_params(case)
    k = sum(r == "apollo" for r in case.roles)
    settings = dict(case.opts["apollo"])
    rule = settings.pop("adamw_rule")
    projected = {"params": params[:k], **settings}
    groups = [projected] + ([{"params": params[k:]}] if params[k:] else [])
    if case.opts["adamw_first"]:
        groups.reverse()
    opt = memopt_core.Apollo(groups, **hparams(case), adamw_rule=rule)
    run_apollo(case, opt, params)


@FUZZ
@given(case=apollo_group_cases())
def test_apollo_groups_match_reference(case):
    fuzz_apollo_groups(case)


@st.composite
def apollo_named_cases(draw):
    case = draw(named_cases(max_steps=5, beta2=APOLLO_BETA2))
    case.opts.update(mini=draw(st.booleans()), rank=draw(st.sampled_from([None, 1, 2, 3, 8])),
                     apollo=draw(apollo_options()))
    return no_broadcast_grads(case) if case.opts["apollo"]["proj"] == "svd" else case


def fuzz_apollo_named(case: Case):
    """Apollo / ApolloMini built from names: attention and MLP matrices projected (rank
    clamped to the smaller side), everything else AdamW; an empty projected matrix raises."""
    params = make_params(case)
    cls = memopt_core.ApolloMini if case.opts["mini"] else memopt_core.Apollo
    a = case.opts["apollo"]
    kw = {k: a[k] for k in ("proj", "proj_type", "update_proj_gap", "norm_growth_limit", "scale_front",
                            "adamw_rule")}
    projected = [p.dim() == 2 and r in PROJECTED_ROLES for p, r in zip(params, case.roles)]
    build = lambda: cls(named(case, params), **hparams(case), rank=case.opts["rank"], **kw,  # noqa: E731
                        roles=role_overrides(case))
    if any(f and p.numel() == 0 for f, p in zip(projected, params)):
        with pytest.raises(ValueError, match="empty"):
            quiet(build)
        return
    opt = quiet(build)
    default_rank = 1 if case.opts["mini"] else 256
    for p, f in zip(params, projected):
        group = next(g for g in opt.param_groups if any(q is p for q in g["params"]))
        assert (group.get("rank") is not None) == f, tuple(p.shape)
        if f:
            assert group["rank"] == max(1, min(case.opts["rank"] or default_rank, *p.shape))
            assert group["scale_type"] == ("tensor" if case.opts["mini"] else "channel")
    run_apollo(case, opt, params)


@FUZZ
@given(case=apollo_named_cases())
def test_apollo_and_mini_from_named_parameters_match_reference(case):
    fuzz_apollo_named(case)
