"""memopt::Apollo / memopt::ApolloMini, the LibTorch optimizers, driven through
cpp/tests/optimizer_runner (tests/cpp_runner.py): the same groups and, at every step, the same
parameters as the Python front end (same op, same seeds: bit-identical) under both adamw_rule
values, torch::save / torch::load resume (a checkpoint from before adamw_rule resumes with
torch's rule), group options kept by add_param_group, and bad input refused (bad options:
test_cpp_optimizers.py, with the other classes')."""
from __future__ import annotations

import zipfile

import pytest
import torch

import memopt_core
from conftest import make_grads
from cpp_runner import (add_param_group, assert_failed_and_changed_nothing, assert_raises,
                        assert_same_trajectory, job, load, run_variants, save, step, steps,
                        trajectory)
from test_cpp_optimizers import NAMES, make_params

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
    # the embedding mode: the head (and embeddings) in a group of their own, per-row v
    "mini_embeddings": dict(mini=True, embeddings="adam_mini"),
}


def cpp(params, variant, actions, **kw):
    options = {**KW, **VARIANTS[variant], **kw}
    name = "apollo_mini" if options.pop("mini") else "apollo"
    return job(name, zip(NAMES, params), options, actions)


def python(params, variant, **kw):
    kw = {**KW, **VARIANTS[variant], **kw}
    cls = memopt_core.ApolloMini if kw.pop("mini") else memopt_core.Apollo
    if kw.get("norm_growth_limit") == 0.0:
        kw["norm_growth_limit"] = None
    return cls(list(zip(NAMES, params)), **kw)


def indices(groups, params):
    """Each group's parameters as positions in `params` (the runner reports positions)."""
    return [[next(i for i, q in enumerate(params) if q is p) for p in g["params"]] for g in groups]


@pytest.fixture(scope="module")
def every_variant(cpp_runner):
    """STEPS steps of each variant from make_params(), all in one runner process."""
    return run_variants(cpp_runner, cpp, make_params(), VARIANTS, STEPS)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_same_groups_and_trajectory_as_the_python_front_end(every_variant, variant):
    """The same split into projected and AdamW groups in the same order (so the same seeds), and
    the same parameters after every step, across three projection refreshes."""
    params = make_params(requires_grad=True)
    ref, groups = python(params, variant), every_variant[variant][0]["groups"]
    assert [g[2] for g in groups] == indices(ref.param_groups, params)
    assert len(groups) == (3 if "embeddings" in variant else 2)
    assert_same_trajectory(every_variant[variant], trajectory(ref, params, STEPS), NAMES, variant)


def test_embedding_mode_with_8bit_states_as_the_python_front_end(cpp_runner, tmp_path):
    """Tensors large enough for 8-bit codes: ApolloMini's embedding and head on adam_mini_ with
    per-row v and 8-bit m, the other AdamW tensors 8-bit too, bit for bit as
    memopt_core.ApolloMini over a refresh, and a torch::save / torch::load resume."""
    torch.manual_seed(3)
    names = ["model.embed_tokens.weight", "model.layers.0.mlp.up_proj.weight",
             "model.layers.0.self_attn.o_proj.weight", "model.norm.weight", "lm_head.weight"]
    params = [torch.randn(s) for s in [(256, 32), (128, 32), (32, 32), (32,), (256, 32)]]
    kw = dict(KW, embeddings="adam_mini", state_bits=8)
    path = tmp_path / "opt.pt"
    straight = cpp_runner(job("apollo_mini", zip(names, params), kw,
                              [*steps(params, 0, 4), save(path), *steps(params, 4, 2)]))
    mine = [p.clone().requires_grad_() for p in params]
    opt = memopt_core.ApolloMini(list(zip(names, mine)), **kw)
    assert_same_trajectory(straight[:4] + straight[5:], trajectory(opt, mine, 6), names)
    assert all(opt.state[mine[i]]["exp_avg"].dtype == torch.int8 for i in (0, 4))
    resumed = cpp_runner(job("apollo_mini", zip(names, straight[3]["params"]), kw,
                             [load(path), *steps(params, 4, 2)]))
    for a, b in zip(resumed[-1]["params"], straight[-1]["params"]):
        assert torch.equal(a, b)


def resumed_at_4(cpp_runner, cases, tmp):
    """For each (saving variant, loading variant, rewrite of the checkpoint or None): the last
    parameters of a run saved after 4 steps (between two refreshes, after the limiter has a
    norm) and of one loaded from that checkpoint that steps on. Two runner processes in all."""
    params = make_params()
    paths = [tmp / f"{i}.pt" for i in range(len(cases))]
    straight = cpp_runner(*[cpp(params, saved, [*steps(params, 0, 4), save(path),
                                                *steps(params, 4, STEPS - 4)])
                            for (saved, _, _), path in zip(cases, paths)])
    again = cpp_runner(*[cpp(s[3]["params"], loading,
                             [load(rewrite(path) if rewrite else path),
                              *steps(params, 4, STEPS - 4)])
                         for (_, loading, rewrite), path, s in zip(cases, paths, straight)])
    return [(s[-1]["params"], a[-1]["params"]) for s, a in zip(straight, again)]


def _without_adamw_rule(src):
    """A copy of a torch::save archive in which no group has an adamw_rule (renamed to a key
    nothing reads, same length): a checkpoint saved before the option existed."""
    dst = src.with_name("old.pt")
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            zout.writestr(info, zin.read(info).replace(b"adamw_rule", b"adamw_xxxx"))
    return dst


# The last case: the options' default is "apollo", but a checkpoint without the key was stepped
# with torch's rule (the only one before the option): it resumes with it, bit-identically.
RESUMED = {v: (v, v, None) for v in ["apollo", "mini", "tensor_front_unstored", "torch_rule"]}
RESUMED["checkpoint_without_adamw_rule_resumes_with_torchs_rule"] = (
    "torch_rule", "apollo", _without_adamw_rule)


@pytest.fixture(scope="module")
def resumed(cpp_runner, tmp_path_factory):
    return dict(zip(RESUMED, resumed_at_4(cpp_runner, list(RESUMED.values()),
                                          tmp_path_factory.mktemp("apollo"))))


@pytest.mark.parametrize("case", list(RESUMED))
def test_save_load_resume_is_bit_identical(resumed, case):
    for i, (p, q) in enumerate(zip(*resumed[case])):
        assert torch.equal(p, q), f"parameter {i} ({NAMES[i]})"


def test_load_of_another_rank_raises_and_changes_nothing(cpp_runner, tmp_path):
    """Rank 4 moments into APOLLO-Mini (rank 1): raises; Mini then steps on as if it had never
    tried."""
    params = make_params()
    cpp_runner(cpp(params, "apollo", [*steps(params, 0, 2), save(tmp_path / "opt.pt")]))
    tried, never = cpp_runner(
        cpp(params, "mini", [*steps(params, 0, 1), load(tmp_path / "opt.pt", may_fail=True),
                             *steps(params, 1, 2)]),
        cpp(params, "mini", steps(params, 0, 3)))
    assert_failed_and_changed_nothing(tried, never, 1, "exp_avg")


def test_add_param_group_keeps_its_options_and_checks_them(cpp_runner):
    """A group the optimizer cannot project (1-D) is refused and not added; the others keep their
    own lr and rank, and step as the Python front end's (projected with R's shape and
    apollo-torch's seed, the parameter's 1-based position: the same bits)."""
    params = make_params(requires_grad=True)
    extra = [torch.randn(6, 10, requires_grad=True), torch.randn(5, requires_grad=True)]
    every = params + extra
    results = cpp_runner(cpp(params, "apollo", [
        add_param_group(extra, rank=2, lr=0.5, may_fail=True),
        add_param_group(extra[:1], rank=2, lr=0.5), add_param_group(extra[1:], rank=0, lr=0.25),
        *steps(every, 0, 2)]))
    assert_raises(results[0]["error"], "2-D")
    assert len(results[0]["groups"]) == 2
    assert [g[:1] + (g[2],) for g in results[2]["groups"][-2:]] == [(0.5, [10]), (0.25, [11])]
    ref = python(params, "apollo")
    ref.add_param_group({"params": extra[:1], "param_names": ["extra0"], "rank": 2, "lr": 0.5})
    ref.add_param_group({"params": extra[1:], "param_names": ["extra1"], "lr": 0.25})
    assert_same_trajectory(results[3:], trajectory(ref, every, 2), NAMES + ["extra0", "extra1"])


def test_explicit_groups_step_as_the_python_front_end(cpp_runner):
    """apollo-torch-style groups, each with its own options (rank 0 in C++, no rank in Python:
    AdamW at its own lr): the same bits as the Python front end."""
    params = make_params(requires_grad=True)
    proj = [i for i, n in enumerate(NAMES) if "proj.weight" in n]
    rest = [i for i in range(len(params)) if i not in proj]
    options = {k: v for k, v in KW.items() if k != "update_proj_gap"}
    results = cpp_runner(job("apollo", zip(NAMES, params), options, steps(params, 0, 4),
                             groups=[(proj, dict(rank=2, update_proj_gap=2)),
                                     (rest, dict(rank=0, lr=5e-3))]))
    assert [g[2] for g in results[0]["groups"]] == [proj, rest]
    ref = memopt_core.Apollo(
        [{"params": [params[i] for i in proj], "rank": 2, "update_proj_gap": 2},
         {"params": [params[i] for i in rest], "lr": 5e-3}], **options)
    assert_same_trajectory(results, trajectory(ref, params, 4), NAMES)


def test_bad_gradient_raises_before_anything_is_written(cpp_runner):
    """A sparse gradient in the AdamW group (lm_head) fails its check before the projected group
    is stepped: nothing changes, so that with a dense one it steps as one that never tried."""
    params = make_params()
    grads = make_grads(params, 1)
    sparse = step(grads, sparse=[len(grads) - 1], may_fail=True)
    tried, never = cpp_runner(cpp(params, "apollo", [*steps(params, 0, 1), sparse, step(grads)]),
                              cpp(params, "apollo", [*steps(params, 0, 1), step(grads)]))
    assert_failed_and_changed_nothing(tried, never, 1, "sparse")


def test_a_rank_above_a_tensors_smaller_side_is_capped_per_tensor_as_in_python(cpp_runner):
    """rank 12 on 16x16 weights and 8x16 k/v: groups of effective rank 12 and 8 (then AdamW), in
    the same order in both front ends (so the same seeds), and the same trajectory."""
    params = make_params(requires_grad=True)
    results = cpp_runner(cpp(params, "apollo", steps(params, 0, STEPS), rank=12))
    ref = python(params, "apollo", rank=12)
    assert [g[2] for g in results[0]["groups"]] == indices(ref.param_groups, params)
    assert [g.get("rank") for g in ref.param_groups] == [12, 8, None]
    assert_same_trajectory(results, trajectory(ref, params, STEPS), NAMES)
