"""memopt::AdamW and memopt::AdamMini, the LibTorch optimizers (cpp/include/memopt/optimizers.h),
driven through cpp/tests/optimizer_runner (tests/cpp_runner.py): their parameters after every
step against torch.optim.AdamW and against the fused op called directly, exact torch::save /
torch::load resume, checked loads, closures, parameters without gradients and bad input; and
the option checks of every LibTorch class (Apollo's and Frugal's too: one runner process). The
state stays inside the classes: exact resume and equal later steps are what prove it."""
from __future__ import annotations

import pytest
import torch

from conftest import make_grads
from cpp_runner import (assert_failed_and_changed_nothing, assert_raises, assert_same_trajectory,
                        job, load, save, step, steps, trajectory)
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
OPTIONS = {"adamw": {**HP, "weight_decay": WD}, "adam_mini": {**HP, "weight_decay": WD, **GEOMETRY}}


def make_params(seed: int = 0, requires_grad: bool = False):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen).requires_grad_(requires_grad) for _, s in NAMED_SHAPES]


def cpp(name, params, actions, roles=None, **kw):
    return job(name, zip(NAMES, params), {**OPTIONS[name], **kw}, actions, roles=roles)


def decays(role, p):
    return p.dim() >= 2 and role not in ("norm", "bias")


def fused_adam_mini(params, roles, count, skip=lambda i, t: False):
    """The oracle of the LibTorch AdamMini: one torch.ops.memopt.adam_mini_ call per group
    (decaying tensors, then the others) with the partitioner's blocks, parameters without a
    gradient left out; the parameters after each step."""
    specs = [_C.adam_mini_blocks(r, list(p.shape), False, HEAD_DIM, GEOMETRY["n_heads"],
                                 GEOMETRY["n_kv_heads"])[0] for r, p in zip(roles, params)]
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros(sum((rows // tr) * (cols // tc) for _, rows, cols, _, tr, tc in s))
         for s in specs]
    step_counts = [torch.zeros((), dtype=torch.float32) for _ in params]
    groups = [[i for i, (r, p) in enumerate(zip(roles, params)) if decays(r, p) == d]
              for d in (True, False)]
    out = []
    for t in range(count):
        grads = make_grads(params, t)
        for group, wd in zip(groups, (WD, 0.0)):
            idx = [i for i in group if not skip(i, t)]
            torch.ops.memopt.adam_mini_(
                [params[i] for i in idx], [grads[i] for i in idx], [m[i] for i in idx],
                [v[i] for i in idx], [step_counts[i] for i in idx],
                _C.encode_block_specs([specs[i] for i in idx]),
                torch.tensor(HP["lr"], dtype=torch.float64), *HP["betas"], HP["eps"], wd)
        out.append([p.clone() for p in params])
    return out


def oracle(name, count, skip=lambda i, t: False):
    """What the LibTorch class must do, from make_params(): torch.optim.AdamW, or the fused op."""
    params = make_params()
    if name == "adam_mini":
        return fused_adam_mini(params, ROLES, count, skip)
    opt = torch.optim.AdamW([p.requires_grad_() for p in params], **HP, weight_decay=WD)
    return trajectory(opt, params, count, skip=skip)


def assert_close_trajectory(results, expected):
    """torch.optim.AdamW computes in another order: equal to float32 rounding."""
    for t, (done, want) in enumerate(zip(results, expected)):
        for name, a, b in zip(NAMES, done["params"], want):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6,
                                       msg=lambda m: f"step {t} {name}: {m}")


def test_roles_cover_the_partition():
    assert set(ROLES) >= {"embedding", "query", "key", "value", "attn_out", "qkv", "mlp", "bias",
                          "norm", "output"}


def test_adamw_matches_torch_adamw_at_every_step(cpp_runner):
    params = make_params()
    assert_close_trajectory(cpp_runner(cpp("adamw", params, steps(params, 0, STEPS))),
                            oracle("adamw", STEPS))


@pytest.mark.parametrize("explicit", [False, True], ids=["roles_from_names", "explicit_roles"])
def test_adam_mini_groups_and_fused_op_bits_at_every_step(cpp_runner, explicit):
    """Two groups (decay, then norms/biases/1-D without), and one adam_mini_ call per group with
    the partitioner's blocks: the same bits. Explicit roles override the names: q_proj as an MLP
    weight gets one block per row instead of per head."""
    roles = ["mlp" if r == "query" else r for r in ROLES] if explicit else ROLES
    params = make_params()
    results = cpp_runner(cpp("adam_mini", params, steps(params, 0, STEPS),
                             roles=roles if explicit else None))
    groups = results[0]["groups"]
    assert [(lr, wd) for lr, wd, _ in groups] == [(HP["lr"], WD), (HP["lr"], 0.0)]
    for i, (p, role) in enumerate(zip(params, roles)):
        assert i in groups[0 if decays(role, p) else 1][2], NAMES[i]
    assert_same_trajectory(results, fused_adam_mini(params, roles, STEPS), NAMES)
    if explicit:  # the roles reached the blocks (per row and per head differ)
        assert not torch.equal(results[-1]["params"][1], oracle("adam_mini", STEPS)[-1][1])


def skip_early(i, t):
    """The last parameter gets no gradient before step 5: it has no state when saved."""
    return i == len(NAMED_SHAPES) - 1 and t < 5


@pytest.fixture(scope="module")
def resumed(cpp_runner, tmp_path_factory):
    """Per optimizer, a run saved after 3 steps that goes on, and one loaded from its checkpoint
    into an optimizer made with other options (they come back from the checkpoint) that steps
    on. The last parameter starts after the load, so a state made up for it would show."""
    tmp, params, names = tmp_path_factory.mktemp("resume"), make_params(), list(OPTIONS)
    straight = cpp_runner(*[cpp(n, params, [*steps(params, 0, 3, skip_early), save(tmp / n),
                                            *steps(params, 3, STEPS - 3, skip_early)])
                            for n in names])
    again = cpp_runner(*[cpp(n, s[2]["params"], [load(tmp / n),
                                                 *steps(params, 3, STEPS - 3, skip_early)],
                             lr=0.5, weight_decay=0.3) for n, s in zip(names, straight)])
    return dict(zip(names, zip(straight, again)))


@pytest.mark.parametrize("name", list(OPTIONS))
def test_save_load_resume_is_bit_identical(resumed, name):
    straight, again = resumed[name]
    assert again[0]["groups"] == straight[3]["groups"]
    for t, (a, b) in enumerate(zip(straight[4:], again[1:])):
        assert all(torch.equal(x, y) for x, y in zip(a["params"], b["params"])), f"step {3 + t}"


MISMATCHES = ["blocks", "shape", "groups"]


def mismatched(mismatch):
    """An AdamMini job maker whose checkpoint cannot load one saved from make_params():
    other blocks (same shapes, other heads), another shape, or one group (no norms or biases)."""
    names, other, kw = NAMES, make_params(1), {}
    if mismatch == "blocks":
        kw = dict(n_heads=2, n_kv_heads=1)
    elif mismatch == "shape":
        other[1] = torch.randn(16, 8)
    else:
        keep = [i for i, (r, p) in enumerate(zip(ROLES, other)) if decays(r, p)]
        names, other = [NAMES[i] for i in keep], [other[i] for i in keep]
    return other, lambda actions: job("adam_mini", zip(names, other),
                                      {**OPTIONS["adam_mini"], **kw}, actions)


@pytest.fixture(scope="module")
def mismatches(cpp_runner, tmp_path_factory):
    """Per mismatch, (tried, never): a job that tries to load the checkpoint after one step, and
    the same job without the load."""
    params, path = make_params(), tmp_path_factory.mktemp("adam_mini") / "opt.pt"
    cpp_runner(cpp("adam_mini", params, [*steps(params, 0, 2), save(path)]))
    jobs = []
    for other, make in map(mismatched, MISMATCHES):
        jobs += [make([*steps(other, 0, 1), load(path, may_fail=True), *steps(other, 1, 2)]),
                 make(steps(other, 0, 3))]
    results = cpp_runner(*jobs)
    return {m: results[2 * i:2 * i + 2] for i, m in enumerate(MISMATCHES)}


@pytest.mark.parametrize("mismatch", MISMATCHES)
def test_load_mismatch_raises_and_changes_nothing(mismatches, mismatch):
    """The load raises; the optimizer then steps on as one that never tried, with its groups as
    they were."""
    assert_failed_and_changed_nothing(*mismatches[mismatch], 1, "exp_avg_sq|exp_avg|param groups")


def skip_two(i, t):
    """Every other parameter has no gradient for the first two steps."""
    return i % 2 == 1 and t < 2


@pytest.fixture(scope="module")
def closure_and_skip(cpp_runner):
    """Per optimizer: a closure step then a plain one; three steps with skip_two. One process."""
    params = make_params()
    results = cpp_runner(*[cpp(n, params, actions) for n in OPTIONS for actions in
                           ([step(closure=True), step()], steps(params, 0, 3, skip_two))])
    return {n: results[2 * i:2 * i + 2] for i, n in enumerate(OPTIONS)}


@pytest.mark.parametrize("name", list(OPTIONS))
def test_closure_runs_with_grad_and_returns_loss(closure_and_skip, name):
    """step(closure) under no_grad: the closure (loss = sum of p^2, backward) runs with grad
    enabled and its loss comes back; step() without one returns nothing."""
    (with_closure, without), params = closure_and_skip[name][0], make_params()
    assert with_closure["grad_enabled"] and with_closure["loss_requires_grad"]
    torch.testing.assert_close(with_closure["loss"], sum((p * p).sum() for p in params),
                               rtol=1e-6, atol=0)
    assert all(not torch.equal(p, q) for p, q in zip(with_closure["params"], params))
    assert without["loss"] is None


@pytest.mark.parametrize("name", list(OPTIONS))
def test_params_without_grad_are_skipped(closure_and_skip, name):
    """Parameters without a gradient for two steps stay unchanged and get no state (their first
    step, the third, is a first step: bias correction of step 1), as the oracle does."""
    results, params = closure_and_skip[name][1], make_params()
    for i, p in enumerate(params):
        assert torch.equal(results[1]["params"][i], p) == bool(i % 2), NAMES[i]
    if name == "adam_mini":
        assert_same_trajectory(results, oracle(name, 3, skip_two), NAMES)
    else:
        assert_close_trajectory(results, oracle(name, 3, skip_two))


def test_bad_step_raises_before_any_group_is_written(cpp_runner):
    """An overlapping norm weight (any other layout is valid, tests/test_layouts.py) in the
    second (no-decay) group: the step raises with nothing written, parameters or state, so
    that without that gradient the optimizer steps as one that never tried."""
    params = make_params()
    norm = NAMES.index("model.layers.0.input_layernorm.weight")
    params[norm] = torch.randn(1).expand(16)
    later = step([None if i == norm else g for i, g in enumerate(make_grads(params, 1))])
    tried, never = cpp_runner(
        cpp("adam_mini", params, [step(make_grads(params, 0), may_fail=True), later]),
        cpp("adam_mini", params, [later]))
    assert_failed_and_changed_nothing(tried, never, 0, "overlapping", ValueError, before=params)


# Construction errors of every LibTorch class, all from one runner process. BASE: valid options
# each case changes one of.
BASE = {**OPTIONS, "apollo": dict(lr=1e-2, weight_decay=0.1, rank=4),
        "frugal": dict(lr=1e-2, weight_decay=0.1, density=0.5, update_gap=3, seed=1234)}
_W = make_params()[0]
_HPARAMS = [(dict(lr=-1.0), "learning rate"), (dict(betas=(0.9, 1.0)), "beta2"),
            (dict(eps=-1e-8), "eps"), (dict(weight_decay=-0.1), "weight_decay")]
INVALID = [  # (optimizer, options, message, named parameters (None: the layer's), roles)
    *[(name, kw, match, None, None) for name in OPTIONS for kw, match in _HPARAMS],
    ("adam_mini", dict(dim=15), "multiple of n_heads", None, None),
    ("adam_mini", dict(n_kv_heads=3), "n_kv_heads", None, None),
    ("adam_mini", {}, "more than once", [("a.weight", _W), ("b.weight", _W)], None),
    ("adam_mini", {}, "unknown role", [("a.weight", _W)], ["attention"]),
    ("apollo", dict(rank=-1), "rank", None, None),
    ("apollo", dict(proj="qr"), "proj", None, None),
    ("apollo", dict(scale_type="row"), "scale_type", None, None),
    ("apollo", dict(proj="svd", store_projection=False), "store_projection", None, None),
    ("apollo", dict(lr=-1.0), "learning rate", None, None),
    ("apollo", dict(adamw_rule="adam"), "adamw_rule must be 'apollo'", None, None),
    ("apollo", dict(embeddings="adam"), "embeddings must be", None, None),
    ("apollo", dict(embeddings="adam_mini"), "no embedding or output",
     [("a.weight", _W), ("b.weight", _W.clone())], None),
    ("frugal", dict(density=1.5), "density", None, None),
    ("frugal", dict(update_gap=0), "update_gap", None, None),
    ("frugal", dict(selection="topk"), "selection", None, None),
    ("frugal", dict(state_free="adam"), "state_free", None, None),
    ("frugal", dict(state_free_lr_scale=-1.0), "state_free_lr_scale", None, None),
    ("frugal", dict(lr=-1.0), "learning rate", None, None),
    ("frugal", dict(embeddings="adam"), "embeddings", None, None),
]


@pytest.fixture(scope="module")
def construction_errors(cpp_runner):
    return cpp_runner.construction_errors(*[
        job(name, named or zip(NAMES, make_params()), {**BASE[name], **kw}, [], roles=roles)
        for name, kw, _, named, roles in INVALID])


@pytest.mark.parametrize("case", range(len(INVALID)), ids=[f"{c[0]}-{c[2]}" for c in INVALID])
def test_invalid_options_and_inputs_raise(construction_errors, case):
    assert_raises(construction_errors[case], INVALID[case][2])


def test_adamw_groups_keep_their_options(cpp_runner):
    """Explicit groups, each with its own lr and weight decay: kept as given (LibTorch would put
    the defaults in their place) and stepped as torch.optim.AdamW steps the same groups."""
    params = make_params()
    decay = [i for i, (r, p) in enumerate(zip(ROLES, params)) if decays(r, p)]
    rest = [i for i in range(len(params)) if i not in decay]
    results = cpp_runner(job("adamw", zip(NAMES, params), OPTIONS["adamw"], steps(params, 0, 3),
                             groups=[(decay, {}), (rest, dict(lr=5e-3, weight_decay=0.0))]))
    assert results[0]["groups"] == [(HP["lr"], WD, decay), (5e-3, 0.0, rest)]
    ref = [p.requires_grad_() for p in make_params()]
    opt = torch.optim.AdamW([{"params": [ref[i] for i in decay]},
                             {"params": [ref[i] for i in rest], "lr": 5e-3, "weight_decay": 0.0}],
                            **HP, weight_decay=WD)
    assert_close_trajectory(results, trajectory(opt, ref, 3))


# ---- state_bits: the LibTorch classes keep the same 8-bit / bf16 states as the Python front end --
BIG = [("model.embed_tokens.weight", (64, 128)), ("model.layers.0.mlp.up_proj.weight", (96, 128)),
       ("model.layers.0.input_layernorm.weight", (128,))]


@pytest.mark.parametrize("name, bits", [("adamw", 8), ("adam_mini", 8), ("adamw", 16),
                                        ("apollo", 8), ("frugal", 8)])
def test_state_bits_match_the_python_front_end_bit_for_bit(cpp_runner, tmp_path, name, bits):
    """Both front ends call the same op with the same codes: equal parameters after every step,
    and a LibTorch run resumed from its checkpoint equals the uninterrupted one."""
    import memopt_core
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=gen) for _, s in BIG]
    names = [n for n, _ in BIG]
    options = {**HP, "weight_decay": WD, "state_bits": bits}
    if name == "adam_mini":
        options.update(dim=128, n_heads=4)
    if name == "apollo":
        options.update(rank=0)  # AdamW groups: the op that takes 8-bit states
    if name == "frugal":  # the up_proj an active block (AdamW's 8-bit step, FRUGAL's lr)
        options.update(density=1.0, update_gap=2, seed=0, proj_params_lr_scale=0.5)
    path = tmp_path / "opt.pt"
    straight = cpp_runner(job(name, zip(names, params), options,
                              [*steps(params, 0, 3), save(path), *steps(params, 3, 2)]))
    resumed = cpp_runner(job(name, zip(names, straight[2]["params"]), options,
                             [load(path), *steps(params, 3, 2)]))
    ours = [p.clone().requires_grad_() for p in params]
    py_opts = {k: v for k, v in options.items() if k not in ("rank",)}
    if name == "apollo":
        opt = memopt_core.Apollo([{"params": ours, "rank": None}], **py_opts)  # an AdamW group
    elif name == "adam_mini":
        opt = memopt_core.AdamMini(list(zip(names, ours)), **py_opts)
    elif name == "frugal":
        opt = memopt_core.Frugal(list(zip(names, ours)), **py_opts)
    else:
        opt = memopt_core.AdamW(ours, **py_opts)
    for t in range(5):
        for p, g in zip(ours, make_grads(params, t)):
            p.grad = g
        opt.step()
        after = straight[t if t < 3 else t + 1]  # (result 3 is the save's)
        for a, b in zip(after["params"], ours):
            assert torch.equal(a, b.detach()), f"step {t}"
    for a, b in zip(straight[4:], resumed[1:]):
        assert all(torch.equal(x, y) for x, y in zip(a["params"], b["params"]))
    kept = {v.dtype for s in opt.state.values() for v in s.values()}
    assert (torch.int8 if bits == 8 else torch.bfloat16) in kept
