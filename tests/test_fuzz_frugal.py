"""Fuzzing FRUGAL against its float64 reference (settings and strategies: fuzz_common)."""
from __future__ import annotations

import pytest
import torch

from fuzz_common import (Case, FRUGAL_RTOL, FUZZ, bf16_rule, check, hparams, make_params, named,
                         named_cases, quiet, role_overrides, run)
from hypothesis import given  # noqa: E402  (fuzz_common skips the module without hypothesis)
from hypothesis import strategies as st  # noqa: E402

import memopt_core  # noqa: E402
from reference.frugal_ref import FrugalRef  # noqa: E402
from test_fuzz_apollo import no_broadcast_grads  # noqa: E402


# ---- FRUGAL --------------------------------------------------------------------------------
FRUGAL_PROJECTABLE = ("query", "key", "value", "attn_out", "qkv", "mlp")


FRUGAL_OPTS = ("density", "update_gap", "selection", "block_order", "state_free",
               "state_free_lr_scale", "proj_params_lr_scale", "reset_statistics", "seed")


def frugal_projectable(case: Case) -> list:
    """FRUGAL's split tensors (paper §4): attention and MLP matrices, plus embeddings, norms and
    the output layer when asked."""
    o = case.opts
    extra = {"embedding": o["proj_embeds"], "norm": o["proj_norms"], "output": o["proj_logits"]}
    return [(r in FRUGAL_PROJECTABLE and len(s) == 2) or extra.get(r, False)
            for s, r in zip(case.shapes, case.roles)]


def frugal_residual_is_rounding(case: Case) -> bool:
    """Whether a projection keeps all of some gradient (rank round(rho * smaller side) equal to
    that side): its residual G - up(down(G)) is then rounding noise, whose sign (signSGD) no
    reference can pin down."""
    o = case.opts
    if o["selection"] not in ("svd", "random"):
        return False
    return any(f and len(shape) == 2 and min(shape) and round(min(shape) * o["density"]) == min(shape)
               for shape, f in zip(case.shapes, frugal_projectable(case)))


@st.composite
def frugal_cases(draw):
    case = draw(named_cases(roles=FRUGAL_PROJECTABLE + ("embedding", "output", "norm", "linear", "conv"),
                            flat_roles=("norm", "bias", "scalar"), max_tensors=5, max_steps=5))
    case.opts.update(
        density=draw(st.sampled_from([0.0, 0.25, 0.5, 1 / 3, 0.75, 1.0])),
        update_gap=draw(st.integers(1, 3)),
        selection=draw(st.sampled_from(["block", "block", "columns", "rows", "randk", "svd",
                                        "random", "randperm"])),
        block_order=draw(st.sampled_from(["descending", "ascending", "mirror", "random"])),
        state_free=draw(st.sampled_from(["sign_sgd", "sgd", None])),
        state_free_lr_scale=draw(st.sampled_from([1.0, 0.5])),
        proj_params_lr_scale=draw(st.sampled_from([1.0, 0.7])),
        reset_statistics=draw(st.booleans()),
        proj_embeds=draw(st.booleans()), proj_norms=draw(st.booleans()),
        proj_logits=draw(st.booleans()), seed=draw(st.integers(0, 1000)))
    if case.opts["state_free"] == "sign_sgd" and frugal_residual_is_rounding(case):
        case.opts["state_free"] = draw(st.sampled_from(["sgd", None]))
    if case.opts["selection"] == "randk":  # a projectable 0-D tensor crashes (test_known_frugal_...)
        proj = frugal_projectable(case)
        case.shapes = [(1,) if s == () and f else s for s, f in zip(case.shapes, proj)]
    if case.opts["selection"] in ("svd", "random"):  # the projected gradient is a GEMM's output
        if case.hp["betas"][1] == 0:  # m / |g_low|: ill-conditioned where g_low nearly cancels
            case.hp["betas"] = (case.hp["betas"][0], draw(st.sampled_from([0.5, 0.9, 0.99, 0.999])))
        if case.opts["selection"] == "svd":
            no_broadcast_grads(case)
    return case


class FrugalStoredRef(FrugalRef):
    """FrugalRef whose low-precision run also stores a projection subspace in that dtype, as
    Frugal keeps it (in the parameter dtype): the bf16 budget then includes the sign flips of
    small state-free residuals that a bf16 P causes (FrugalRef rounds only p, m and v). And a
    0-D projectable tensor (proj_norms with selection='randk'), where FrugalRef raises."""

    def _new_subspace(self, i, g):
        if g.dim() == 0:  # FrugalRef reads g.shape[0] first; for randk a 0-D tensor is 1 element
            g = g.reshape(1)
        sub = super()._new_subspace(i, g)
        return self._round(sub) if sub is not None and sub.is_floating_point() else sub


def fuzz_frugal(case: Case):
    params = make_params(case)
    o, hp = case.opts, hparams(case)
    proj = frugal_projectable(case)
    kw = {k: o[k] for k in FRUGAL_OPTS}
    flags = {k: o[k] for k in ("proj_embeds", "proj_norms", "proj_logits")}
    build = lambda: memopt_core.Frugal(named(case, params), **hp, **kw, **flags,  # noqa: E731
                                       roles=role_overrides(case))
    if o["selection"] not in ("block", "randk") and any(f and p.dim() != 2 for f, p in zip(proj, params)):
        with pytest.raises(ValueError, match="2-D"):
            quiet(build)
        return
    if o["selection"] == "block" and o["block_order"] == "mirror" and round(sum(proj) * o["density"]) % 2:
        with pytest.raises(ValueError, match="mirror"):
            quiet(build)
        return
    opt = quiet(build)
    assert [p in opt._index for p in params] == proj
    exact = FrugalStoredRef(params, proj, **hp, **kw)
    low = FrugalStoredRef(params, proj, **hp, **kw, storage_dtype=case.dtype)
    run(case, opt, params, exact.step, low.step)
    rtol = FRUGAL_RTOL.get(case.dtype)
    for i, p in enumerate(params):
        what = f"tensor {i} ({case.roles[i]} {tuple(p.shape)}{' projectable' if proj[i] else ''})"
        st_ref = exact.state[i]
        if case.dtype != torch.bfloat16:
            check(case, p, exact.p[i], f"{what} param", origin=exact.p0[i], rtol=rtol)
        if st_ref is None:
            assert p not in opt.state, f"{what} holds state while its reference does not"
            continue
        ours = opt.state[p]
        assert set(ours) == set(st_ref), (what, sorted(ours), sorted(st_ref))
        assert ours["step"].item() == st_ref["step"], what
        for key in ("exp_avg", "exp_avg_sq"):
            check(case, ours[key], st_ref[key], f"{what} {key}", rtol=rtol)
        if "subspace" in st_ref and case.dtype != torch.bfloat16:
            check(case, ours["subspace"].double(), st_ref["subspace"].double(), f"{what} subspace",
                  rtol=rtol)
    if case.dtype == torch.bfloat16:  # test_frugal's rule: the parameters (state layouts vary)
        bf16_rule([("param", p, exact.p[i], low.p[i]) for i, p in enumerate(params)])


@FUZZ
@given(case=frugal_cases())
def test_frugal_matches_reference(case):
    fuzz_frugal(case)
