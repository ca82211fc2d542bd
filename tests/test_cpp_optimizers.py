"""memopt::AdamW and memopt::AdamMini, the LibTorch optimizers (cpp/include/memopt/optimizers.h),
driven from Python through _C.CppAdamW / _C.CppAdamMini: against torch.optim.AdamW, the fused op,
a float64 Adam-mini loop, torch::save/torch::load round trips, closures, skipped parameters and
bad input."""
from __future__ import annotations

import math

import pytest
import torch

from conftest import make_grads, set_grads
from memopt_core import _C

STEPS = 8
HP = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8)
GEOMETRY = dict(dim=16, n_heads=4, n_kv_heads=2)  # head_dim 4
HEAD_DIM = 4
WD = 0.1
# A small LLaMA-like layer: every Adam-mini role the name rules know, GQA and a fused QKV.
NAMED_SHAPES = [
    ("model.embed_tokens.weight", (32, 16)),
    ("model.layers.0.self_attn.q_proj.weight", (16, 16)),
    ("model.layers.0.self_attn.k_proj.weight", (8, 16)),
    ("model.layers.0.self_attn.v_proj.weight", (8, 16)),
    ("model.layers.0.self_attn.o_proj.weight", (16, 16)),
    ("model.layers.1.attn.qkv_proj.weight", (32, 16)),
    ("model.layers.0.mlp.up_proj.weight", (24, 16)),
    ("model.layers.0.mlp.up_proj.bias", (24,)),
    ("model.layers.0.input_layernorm.weight", (16,)),
    ("lm_head.weight", (32, 16)),
]
NAMES = [n for n, _ in NAMED_SHAPES]
ROLES = [_C.role_from_name(n, list(s)) for n, s in NAMED_SHAPES]
RAISES = (RuntimeError, ValueError, TypeError)  # c10::Error and its typed subclasses


def close(actual, expected, rtol, atol, what):
    torch.testing.assert_close(actual.detach().double().reshape(-1),
                               expected.detach().double().reshape(-1), rtol=rtol, atol=atol,
                               msg=lambda m: f"{what}: {m}")


def make_params(seed: int = 0, requires_grad: bool = False):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen).requires_grad_(requires_grad) for _, s in NAMED_SHAPES]


def adam_mini(params, **kw):
    return _C.CppAdamMini(list(zip(NAMES, params)), **{**HP, "weight_decay": WD, **GEOMETRY, **kw})


def adamw(params, **kw):
    return _C.CppAdamW(params, **{**HP, "weight_decay": WD, **kw})


def segments(role, shape):
    segs, _ = _C.adam_mini_blocks(role, list(shape), False, HEAD_DIM, GEOMETRY["n_heads"],
                                  GEOMETRY["n_kv_heads"])
    return segs


def n_blocks(segs):
    return sum((rows // tr) * (cols // tc) for _, rows, cols, _, tr, tc in segs)


def decays(role, p):
    return p.dim() >= 2 and role not in ("norm", "bias")


def run(opt, params, steps, start=0, skip=lambda i, t: False):
    """Steps `opt` on deterministic gradients; parameter i has no gradient where skip(i, t)."""
    for t in range(start, start + steps):
        grads = make_grads(params, t)
        set_grads(params, [None if skip(i, t) else g for i, g in enumerate(grads)])
        opt.step()


def test_roles_cover_the_partition():
    assert set(ROLES) >= {"embedding", "query", "key", "value", "attn_out", "qkv", "mlp", "bias",
                          "norm", "output"}


def test_adamw_matches_torch_adamw():
    ours, theirs = make_params(), [p.requires_grad_() for p in make_params()]
    opt = adamw(ours)
    ref = torch.optim.AdamW(theirs, **HP, weight_decay=WD)
    run(opt, ours, STEPS)
    run(ref, theirs, STEPS)  # the same gradients: make_grads is deterministic
    for i, (p, q) in enumerate(zip(ours, theirs)):
        step, m, v = opt.state(p)
        assert step.dim() == 0 and step.dtype == torch.float32 and step.item() == STEPS
        close(p, q, 1e-5, 1e-6, f"param {i}")
        close(m, ref.state[q]["exp_avg"], 1e-5, 1e-6, f"exp_avg {i}")
        close(v, ref.state[q]["exp_avg_sq"], 1e-5, 1e-9, f"exp_avg_sq {i}")


def test_adam_mini_groups_and_state_shapes():
    params = make_params()
    opt = adam_mini(params)
    groups = opt.param_groups()
    wd = {id(p): g_wd for g_params, _, g_wd in groups for p in g_params}
    assert len(groups) == 2 and [g[1] for g in groups] == [HP["lr"]] * 2
    for p, role in zip(params, ROLES):
        assert wd[id(p)] == (WD if decays(role, p) else 0.0), role
    run(opt, params, 1)
    for p, role in zip(params, ROLES):
        assert opt.state(p)[2].shape == (n_blocks(segments(role, p.shape)),), role
        assert opt.state(p)[1].shape == p.shape


def test_adam_mini_matches_fused_op():
    """One adam_mini_ op call per group with the partitioner's blocks: the same bits."""
    params, direct = make_params(), make_params()
    opt = adam_mini(params)
    run(opt, params, STEPS)
    specs = [segments(r, p.shape) for r, p in zip(ROLES, direct)]
    m = [torch.zeros_like(p) for p in direct]
    v = [torch.zeros(n_blocks(s)) for s in specs]
    steps = [torch.zeros((), dtype=torch.float32) for _ in direct]
    groups = [[i for i, (r, p) in enumerate(zip(ROLES, direct)) if decays(r, p) == d]
              for d in (True, False)]
    for t in range(STEPS):
        grads = make_grads(direct, t)
        for idx, wd in zip(groups, (WD, 0.0)):
            torch.ops.memopt.adam_mini_(
                [direct[i] for i in idx], [grads[i] for i in idx], [m[i] for i in idx],
                [v[i] for i in idx], [steps[i] for i in idx],
                _C.encode_block_specs([specs[i] for i in idx]),
                torch.tensor(HP["lr"], dtype=torch.float64), *HP["betas"], HP["eps"], wd)
    for i, p in enumerate(params):
        step, mi, vi = opt.state(p)
        assert torch.equal(p, direct[i]) and torch.equal(mi, m[i]) and torch.equal(vi, v[i]), i
        assert torch.equal(step, steps[i])


def block_ids(segs, numel):
    """Block index of every element of a tensor, from its segments (tiles numbered row-major)."""
    ids, base = torch.full((numel,), -1, dtype=torch.long), 0
    for off, rows, cols, stride, tr, tc in segs:
        r, c = torch.arange(rows).view(-1, 1), torch.arange(cols).view(1, -1)
        ids[(off + r * stride + c).reshape(-1)] = (base + (r // tr) * (cols // tc) + c // tc).reshape(-1)
        base += (rows // tr) * (cols // tc)
    assert bool((ids >= 0).all()), "segments do not cover the tensor"
    return ids


def test_adam_mini_matches_float64_loop():
    """The Adam-mini rule (arXiv 2406.16793, Algorithm 1) in float64, blocks from the partitioner."""
    params = make_params()
    opt = adam_mini(params)
    run(opt, params, STEPS)
    (b1, b2), lr, eps = HP["betas"], HP["lr"], HP["eps"]
    init = make_params()
    grads = [make_grads(init, t) for t in range(STEPS)]  # grads[t][i]
    for i, (p0, role) in enumerate(zip(init, ROLES)):
        segs = segments(role, p0.shape)
        ids = block_ids(segs, p0.numel())
        count = torch.bincount(ids, minlength=n_blocks(segs)).double()
        wd = WD if decays(role, p0) else 0.0
        p = p0.double().reshape(-1)
        m = torch.zeros_like(p)
        v = torch.zeros(n_blocks(segs), dtype=torch.float64)
        for t in range(1, STEPS + 1):
            g = grads[t - 1][i].double().reshape(-1)
            v = b2 * v + (1 - b2) * torch.zeros_like(v).index_add_(0, ids, g * g) / count
            m = b1 * m + (1 - b1) * g
            denom = (v.sqrt() / math.sqrt(1 - b2 ** t) + eps)[ids]
            p = p * (1 - lr * wd) - lr / (1 - b1 ** t) * m / denom
        _, mi, vi = opt.state(params[i])
        close(params[i], p, 1e-5, 1e-6, f"param {i} ({role})")
        close(mi, m, 1e-5, 1e-8, f"exp_avg {i} ({role})")
        close(vi, v, 1e-5, 1e-12, f"exp_avg_sq {i} ({role})")


def skip_early(i, t):
    """The last parameter gets no gradient before step 5: it has no state when saved."""
    return i == len(NAMED_SHAPES) - 1 and t < 5


@pytest.mark.parametrize("make", [adamw, adam_mini], ids=["adamw", "adam_mini"])
def test_save_load_resume_is_bit_identical(make, tmp_path):
    whole, resumed = make_params(), make_params()
    uninterrupted = make(whole)
    run(uninterrupted, whole, STEPS, skip=skip_early)

    first = make(resumed)
    run(first, resumed, 3, skip=skip_early)
    assert first.state(resumed[-1]) is None
    first.save(str(tmp_path / "opt.pt"))
    fresh = make(resumed, lr=0.5, weight_decay=0.3)  # options come back from the checkpoint
    fresh.load(str(tmp_path / "opt.pt"))
    assert [g[1:] for g in fresh.param_groups()] == [g[1:] for g in first.param_groups()]
    assert fresh.state(resumed[-1]) is None
    run(fresh, resumed, STEPS - 3, start=3, skip=skip_early)

    for i, (a, b) in enumerate(zip(whole, resumed)):
        assert torch.equal(a, b), f"param {i}"
        for x, y in zip(uninterrupted.state(a), fresh.state(b)):
            assert x.dtype == y.dtype and torch.equal(x, y), f"state {i}"


@pytest.mark.parametrize("make", [adamw, adam_mini], ids=["adamw", "adam_mini"])
def test_save_load_state_round_trip(make, tmp_path):
    params = make_params()
    opt = make(params)
    run(opt, params, 3)
    opt.save(str(tmp_path / "opt.pt"))
    fresh = make(params)
    fresh.load(str(tmp_path / "opt.pt"))
    for p in params:
        for a, b in zip(opt.state(p), fresh.state(p)):
            assert a.dtype == b.dtype and torch.equal(a, b)


def snapshot(opt, params):
    return [None if opt.state(p) is None else [x.clone() for x in opt.state(p)] for p in params]


@pytest.mark.parametrize("mismatch", ["blocks", "shape", "groups"])
def test_load_mismatch_raises_and_changes_nothing(mismatch, tmp_path):
    params = make_params()
    saved = adam_mini(params)
    run(saved, params, 2)
    saved.save(str(tmp_path / "opt.pt"))

    if mismatch == "blocks":  # same shapes, other heads: q/k blocks differ
        other = make_params(1)
        target = adam_mini(other, n_heads=2, n_kv_heads=1)
    elif mismatch == "shape":
        other = make_params(1)
        other[1] = torch.randn(16, 8)
        target = adam_mini(other)
    else:  # no norms or biases: one group
        named = [(n, p) for n, p, r in zip(NAMES, make_params(1), ROLES) if decays(r, p)]
        other = [p for _, p in named]
        target = _C.CppAdamMini(named, **GEOMETRY)
    run(target, other, 1)
    before, groups = snapshot(target, other), target.param_groups()
    with pytest.raises(RAISES, match="exp_avg_sq|exp_avg|param groups"):
        target.load(str(tmp_path / "opt.pt"))
    after = snapshot(target, other)
    assert all(all(torch.equal(x, y) for x, y in zip(a, b)) for a, b in zip(before, after))
    assert [g[1:] for g in target.param_groups()] == [g[1:] for g in groups]


@pytest.mark.parametrize("make", [adamw, adam_mini], ids=["adamw", "adam_mini"])
def test_closure_runs_with_grad_and_returns_loss(make):
    params = make_params(requires_grad=True)
    opt = make(params)
    before = [p.detach().clone() for p in params]

    def closure():
        assert torch.is_grad_enabled()
        opt.zero_grad()
        loss = sum((p * p).sum() for p in params)
        loss.backward()
        return loss

    with torch.no_grad():
        loss = opt.step(closure)
    assert isinstance(loss, torch.Tensor) and loss.requires_grad
    close(loss, sum((b * b).sum() for b in before), 1e-6, 0.0, "loss")
    assert all(not torch.equal(p, b) for p, b in zip(params, before))
    assert opt.step() is None
    with pytest.raises(RAISES, match="closure must return the loss"):
        opt.step(lambda: None)


@pytest.mark.parametrize("make", [adamw, adam_mini], ids=["adamw", "adam_mini"])
def test_params_without_grad_are_skipped(make):
    params = make_params()
    opt = make(params)
    before = [p.clone() for p in params]
    run(opt, params, 2, skip=lambda i, t: i % 2 == 1)
    for i, (p, b) in enumerate(zip(params, before)):
        if i % 2:
            assert opt.state(p) is None and torch.equal(p, b), i
        else:
            assert opt.state(p)[0].item() == 2 and not torch.equal(p, b), i


def test_bad_step_raises_before_any_group_is_written():
    params = make_params()
    norm = NAMES.index("model.layers.0.input_layernorm.weight")
    # overlapping memory (any other layout is valid, tests/test_layouts.py), in the second
    # (no-decay) group
    params[norm] = torch.randn(1).expand(16)
    opt = adam_mini(params)
    before = [p.clone() for p in params]
    set_grads(params, make_grads(params, 0))
    with pytest.raises(ValueError, match="overlapping"):
        opt.step()
    assert all(torch.equal(p, b) and opt.state(p) is None for p, b in zip(params, before))


@pytest.mark.parametrize("kw, match", [
    (dict(lr=-1.0), "learning rate"), (dict(betas=(0.9, 1.0)), "beta2"),
    (dict(eps=-1e-8), "eps"), (dict(weight_decay=-0.1), "weight_decay"),
])
@pytest.mark.parametrize("make", [adamw, adam_mini], ids=["adamw", "adam_mini"])
def test_invalid_hyperparameters_raise(make, kw, match):
    with pytest.raises(RAISES, match=match):
        make(make_params(), **kw)


def test_adam_mini_invalid_inputs_raise():
    params = make_params()
    with pytest.raises(RAISES, match="multiple of n_heads"):
        adam_mini(params, dim=15)
    with pytest.raises(RAISES, match="n_kv_heads"):
        adam_mini(params, n_kv_heads=3)
    with pytest.raises(RAISES, match="more than once"):
        _C.CppAdamMini([("a.weight", params[0]), ("b.weight", params[0])])
    with pytest.raises(RAISES, match="unknown role"):
        _C.CppAdamMini([("a.weight", params[0])], roles=["attention"])


def test_adam_mini_explicit_roles():
    """Explicit roles override the names: q_proj as an MLP weight gets one block per row."""
    params = make_params()
    roles = ["mlp" if r == "query" else r for r in ROLES]
    opt = _C.CppAdamMini(list(zip(NAMES, params)), roles=roles, **HP, **GEOMETRY)
    run(opt, params, 1)
    q = ROLES.index("query")
    assert opt.state(params[q])[2].shape == (params[q].shape[0],)
    k = ROLES.index("key")
    assert opt.state(params[k])[2].shape == (GEOMETRY["n_kv_heads"],)
