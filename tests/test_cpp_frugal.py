"""memopt::Frugal, the LibTorch optimizer, driven through cpp/tests/optimizer_runner
(tests/cpp_runner.py). Both front ends apply the same memopt::FrugalPlan (tested once, through
the Python front end: tests/test_frugal*.py); what is checked here is the LibTorch class's wiring
of it: the same parameters as the Python front end after every step for every selection (the
selection, the subspaces and which tensors hold Adam state all show in the update: bit-identical),
exact torch::save / torch::load resume across a re-selection, checked loads and bad gradients
(bad options: test_cpp_optimizers.py, with the other classes')."""
from __future__ import annotations

import pytest
import torch

import memopt_core
from conftest import make_grads
from cpp_runner import (assert_failed_and_changed_nothing, assert_same_trajectory, job, load,
                        run_variants, save, step, steps, trajectory)
from test_cpp_optimizers import NAMES, make_params

STEPS = 8
KW = dict(lr=1e-2, weight_decay=0.1, update_gap=3, seed=1234, density=0.5)
VARIANTS = {
    "block": dict(selection="block"),
    "block_random_sgd": dict(selection="block", block_order="random", state_free="sgd"),
    "columns": dict(selection="columns"),
    "rows_no_reset": dict(selection="rows", reset_statistics=False),
    "randk": dict(selection="randk", state_free_lr_scale=0.1),
    "svd": dict(selection="svd"),
    "random": dict(selection="random", state_free="none"),
    "randperm": dict(selection="randperm", proj_params_lr_scale=0.5),
    # embeddings, norms and the head projectable too (one plan rule for both front ends)
    "block_proj_all": dict(selection="block", proj_embeds=True, proj_norms=True, proj_logits=True),
    "randk_proj_norms": dict(selection="randk", proj_norms=True, proj_embeds=True),
    # the embedding mode: embeddings and head with per-row v (memopt::adam_mini_), 8-bit m too
    "block_embeddings": dict(selection="block", embeddings="adam_mini"),
    "columns_embeddings": dict(selection="columns", embeddings="adam_mini"),
    "block_embeddings_8bit": dict(selection="block", embeddings="adam_mini", state_bits=8),
}


def cpp(params, variant, actions, **kw):
    return job("frugal", zip(NAMES, params), {**KW, **VARIANTS[variant], **kw}, actions)


def python(params, variant):
    kw = {**KW, **VARIANTS[variant]}
    if kw.get("state_free") == "none":
        kw["state_free"] = None
    return memopt_core.Frugal(list(zip(NAMES, params)), **kw)


@pytest.fixture(scope="module")
def every_variant(cpp_runner):
    """STEPS steps of each variant from make_params(), all in one runner process."""
    return run_variants(cpp_runner, cpp, make_params(), VARIANTS, STEPS)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_same_parameters_as_the_python_front_end_at_every_step(every_variant, variant):
    params = make_params(requires_grad=True)
    assert_same_trajectory(every_variant[variant], trajectory(python(params, variant), params,
                                                              STEPS), NAMES, variant)


def test_embedding_mode_with_8bit_states_as_the_python_front_end(cpp_runner):
    """Tensors large enough for 8-bit codes (>= 4096 elements): the embedding and head take
    adam_mini_ with per-row v and an 8-bit m beside frugal_'s block selection, bit for bit as
    memopt_core.Frugal, and the codes exist."""
    torch.manual_seed(3)
    names = ["model.embed_tokens.weight", "model.layers.0.mlp.up_proj.weight",
             "model.layers.0.self_attn.o_proj.weight", "model.norm.weight", "lm_head.weight"]
    shapes = [(256, 32), (128, 32), (32, 32), (32,), (256, 32)]
    params = [torch.randn(s) for s in shapes]
    kw = dict(KW, selection="block", embeddings="adam_mini", state_bits=8)
    result = cpp_runner(job("frugal", zip(names, params), kw, steps(params, 0, 5)))
    mine = [p.clone().requires_grad_() for p in params]
    opt = memopt_core.Frugal(list(zip(names, mine)), **kw)
    assert_same_trajectory(result, trajectory(opt, mine, 5), names)
    assert all(opt.state[mine[i]]["exp_avg"].dtype == torch.int8 for i in (0, 4))


RESUMED = ["block", "block_random_sgd", "columns", "svd", "block_embeddings_8bit"]


@pytest.fixture(scope="module")
def resumed(cpp_runner, tmp_path_factory):
    """Per variant: the last parameters of a run saved after 4 steps and of one loaded from that
    checkpoint, made with another seed, that steps on."""
    tmp, params = tmp_path_factory.mktemp("frugal"), make_params()
    straight = cpp_runner(*[cpp(params, v, [*steps(params, 0, 4), save(tmp / f"{v}.pt"),
                                            *steps(params, 4, STEPS - 4)]) for v in RESUMED])
    again = cpp_runner(*[cpp(s[3]["params"], v, [load(tmp / f"{v}.pt"),
                                                 *steps(params, 4, STEPS - 4)], seed=99)
                         for v, s in zip(RESUMED, straight)])
    return {v: (s[-1]["params"], a[-1]["params"]) for v, s, a in zip(RESUMED, straight, again)}


@pytest.mark.parametrize("variant", RESUMED)
def test_save_load_resume_is_bit_identical(resumed, variant):
    """Saved mid-cycle (the next re-selection, at step 6, comes after the load) and loaded into an
    optimizer of another seed: the generator state comes from the checkpoint."""
    for i, (p, q) in enumerate(zip(*resumed[variant])):
        assert torch.equal(p, q), f"parameter {i} ({NAMES[i]})"


def test_load_of_another_selection_raises_and_changes_nothing(cpp_runner, tmp_path):
    """A columns checkpoint into a block optimizer raises; it then steps on (re-selecting at
    step 3) as one that never tried: its selection is untouched."""
    params, path = make_params(), tmp_path / "opt.pt"
    cpp_runner(cpp(params, "columns", [*steps(params, 0, 2), save(path)]))
    tried, never = cpp_runner(
        cpp(params, "block", [*steps(params, 0, 1), load(path, may_fail=True),
                              *steps(params, 1, 4)]),
        cpp(params, "block", steps(params, 0, 5)))
    assert_failed_and_changed_nothing(tried, never, 1, "selection='block'")


def test_bad_gradient_raises_before_anything_is_written(cpp_runner):
    """A sparse gradient (lm_head) raises with nothing written: with a dense one the optimizer
    then steps, re-selection included, as one that never tried."""
    params = make_params()
    grads = make_grads(params, 1)
    sparse = step(grads, sparse=[len(grads) - 1], may_fail=True)
    later = [step(grads), *steps(params, 2, 3)]
    tried, never = cpp_runner(cpp(params, "block", [*steps(params, 0, 1), sparse, *later]),
                              cpp(params, "block", [*steps(params, 0, 1), *later]))
    assert_failed_and_changed_nothing(tried, never, 1, "sparse")
