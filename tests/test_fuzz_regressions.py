"""The mismatches the fuzzers found (all fixed), kept as regression tests with their minimal
@example cases."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from torch import nn

from fuzz_common import (Case, KNOWN)
from hypothesis import example, given  # noqa: E402  (fuzz_common skips it without hypothesis)
from hypothesis import strategies as st  # noqa: E402

import memopt_core  # noqa: E402
from test_fuzz import fuzz_adam_mini, fuzz_adamw, fuzz_slim_adam  # noqa: E402
from test_fuzz_apollo import fuzz_apollo_groups  # noqa: E402
from test_fuzz_frugal import fuzz_frugal  # noqa: E402


# ---- mismatches the fuzzer found (all fixed): minimal cases as regression tests -------------
FUZZERS = dict(adamw=fuzz_adamw, adam_mini=fuzz_adam_mini, slim_adam=fuzz_slim_adam,
               frugal=fuzz_frugal)
ONE_HEAD = dict(dim=1, q=1, kv=1, hd=1, kwargs={})


def with_defaults(name: str, case: Case) -> Case:
    """`case` completed with neutral options of optimizer `name`."""
    n = len(case.shapes)
    opts = dict(
        adamw=dict(groups=[0] * n, lr2=case.hp["lr"], wd2=0.0, tensor_lr=False),
        adam_mini=dict(heads=ONE_HEAD, groups=[0] * n, lr2=case.hp["lr"]),
        slim_adam=dict(heads=ONE_HEAD, rules="table"),
        frugal=dict(heads=ONE_HEAD, density=0.0, update_gap=1, selection="block",
                    block_order="descending", state_free="sign_sgd", state_free_lr_scale=1.0,
                    proj_params_lr_scale=1.0, reset_statistics=True, proj_embeds=False,
                    proj_norms=False, proj_logits=False, seed=0))[name]
    return replace(case, opts={**opts, **case.opts})


# m = b1 m + (1 - b1) g is g exactly when beta1 = 0, but the kernels computed
# m += (1 - b1)(g - m), which keeps the rounding of the previous m: after g = 1 then g = 1e-6,
# m = 1.0133e-6 in float32 and, with beta2 = 0 (update lr * m / |g|), the step was 1.3% too
# long. They now use torch.lerp's formula (cpu::lerp), which switches to g - (g - m) * b1 for
# weights >= 0.5, as torch.optim.AdamW does.
BETA1_ZERO = Case(shapes=[(1,)], roles=["norm"], dtype=torch.float32, init_scale=0.0, steps=2,
                  grads=[[[1.0]], [[1e-6]]],
                  hp=dict(lr=1.0, betas=(0.0, 0.0), eps=0.0, weight_decay=0.0))


@pytest.mark.parametrize("name", sorted(FUZZERS))
@KNOWN
@given(case=st.none())
@example(case=BETA1_ZERO)
def test_beta1_zero_keeps_m_equal_to_the_gradient(name, case):
    FUZZERS[name](with_defaults(name, case))


# APOLLO's moments (apollo_tiles.h adam_element) computed 1 - beta2 in float32 from beta2
# rounded to float32 for float32 / bfloat16 parameters: 1 - 0.9999f = 1.000166e-4, so V was
# 1.7e-4 too large and the first update 8.3e-5 too small. Now 1 - beta2 is formed in double
# (MomentCoefs), as apollo-torch and the reference do.
APOLLO_BETA2_NEAR_ONE = Case(
    shapes=[(1, 1)], roles=["apollo"], dtype=torch.float32, init_scale=0.0, steps=1,
    grads=[[[[1.0]]]], hp=dict(lr=1.0, betas=(0.9, 0.9999), eps=0.0, weight_decay=0.0),
    opts=dict(apollo=dict(rank=1, proj="random", proj_type="std", scale_type="tensor",
                          update_proj_gap=1, scale=1.0, norm_growth_limit=None, scale_front=False,
                          store_projection=True, adamw_rule="apollo"), adamw_first=False))


@KNOWN
@given(case=st.none())
@example(case=APOLLO_BETA2_NEAR_ONE)
def test_apollo_beta2_near_one(case):
    fuzz_apollo_groups(case)


@KNOWN
@given(shape=st.none(), dims=st.none())
@example(shape=(0, 5), dims=[0])
def test_slim_adam_second_moment_of_an_empty_tensor(shape, dims):
    """Was a RuntimeError: v_shape (1, 5), the keepdim shape, for 0 entries of exp_avg_sq. An
    empty tensor has no v entries; v_shape is now its own shape."""
    p = nn.Parameter(torch.zeros(shape))
    opt = memopt_core.SlimAdam([("w", p)], rules={"w": dims})
    p.grad = torch.zeros(shape)
    opt.step()
    assert opt.second_moment(p).numel() == opt.state[p]["exp_avg_sq"].numel()


# Frugal._plan builds {COLUMNS: p.shape[-1], ROWS: p.shape[0], RANDK: p.numel()} for every
# coordinate selection, so a 0-D projectable tensor (a scalar norm gain with proj_norms=True)
# under selection="randk" and k = int(density) >= 1 raises IndexError from step() (nothing is
# changed). Construction accepts it: randk is documented for tensors of any shape.
FRUGAL_RANDK_SCALAR = Case(shapes=[()], roles=["norm"], dtype=torch.float32, steps=1,
                           grads=[[0.5]], opts=dict(selection="randk", density=1.0, proj_norms=True))


@KNOWN
@given(case=st.none())
@example(case=FRUGAL_RANDK_SCALAR)
def test_frugal_randk_on_a_scalar(case):
    """Was an IndexError in the re-selection (p.shape[0] of a 0-D tensor); found by this fuzzer."""
    fuzz_frugal(with_defaults("frugal", case))
