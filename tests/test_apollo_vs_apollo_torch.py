"""memopt_core.Apollo / ApolloMini against PyPI apollo-torch 1.0.3 (same groups, so the same
seeds and projections): the Projector (seed chain, Gaussian and SVD projections, which side is
projected); parameters, both moments, P, seed chain and limiter norm, over runs crossing >= 2
projection refreshes; every parameter of a whole model (the AdamW groups under both adamw_rule
values). The float64 paper reference, state, construction and error cases: test_apollo.py."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import memopt_core
from apollo_util import GAP, RANK, SHAPES, STEPS, _params
from conftest import assert_close, make_grads, make_llama, set_grads
from memopt_core import _C
from reference.adamw_ref import AdamWRef

apollo_torch = pytest.importorskip("apollo_torch")
from apollo_torch.random_projector import next_seed as their_next_seed  # noqa: E402
from apollo_torch.random_projector import stable_randn  # noqa: E402


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
