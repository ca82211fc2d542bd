"""Shared fixtures for the optimizer tests: tiny Hugging Face models built from configs (never
downloaded), a deterministic gradient generator, and helpers to snapshot and compare parameters
and optimizer state."""
from __future__ import annotations

import copy
import io
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))  # `from reference.adamw_ref import ...`

import memopt_core  # noqa: E402

# The tiny LLaMA of the brief: GQA (4 query heads, 2 kv heads, head_dim 8), hidden 32.
LLAMA_KW = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                tie_word_embeddings=False, bos_token_id=0, eos_token_id=1, pad_token_id=None)
GPT2_KW = dict(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=32,
               bos_token_id=0, eos_token_id=1)


def make_llama(seed: int = 0, dtype: torch.dtype = torch.float32, **overrides):
    """A freshly initialised HF LlamaForCausalLM (deterministic for a seed)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**{**LLAMA_KW, **overrides}))
    return model.to(dtype)


def make_gpt2(seed: int = 0, dtype: torch.dtype = torch.float32, **overrides):
    """A freshly initialised HF GPT2LMHeadModel (Conv1D weights stored (in, out), fused c_attn,
    lm_head tied to wte)."""
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(GPT2Config(**{**GPT2_KW, **overrides}))
    return model.to(dtype)


def slim_adam_blocks(shape, dims=None, role=("linear", False, 0, 0, 0, False)):
    """SlimAdam's blocks of one tensor as memopt::BlockPlan decides them: v averaged over `dims`
    (a rules entry) or, dims None, the static table's choice for `role` (as _C.BlockPlan takes
    it: role, transposed, head_dim, q_heads, kv_heads, kv_interleaved). Returns (segments,
    v_shape, dims, rule)."""
    rules = "table" if dims is None else {"t": list(dims)}
    plan = memopt_core._C.BlockPlan([("t", list(shape), role, "")], "slim_adam", rules=rules)
    _, segments, _, _, _, v_shape, got, rule, _ = plan.blocks(0)
    return segments, v_shape, got, rule


def make_grads(params, step: int, seed: int = 1234):
    """Deterministic gradients for `params` at `step`: Gaussian with a per-row scale (so blocks
    differ in magnitude) and a per-step scale, in each parameter's dtype. Same call, same values."""
    gen = torch.Generator().manual_seed(seed * 100003 + step)
    out = []
    for p in params:
        g = torch.randn(p.shape, generator=gen, dtype=torch.float64)
        if p.dim() >= 1:
            rows = torch.exp(torch.randn(p.shape[0], generator=gen, dtype=torch.float64))
            g = g * rows.view(-1, *([1] * (p.dim() - 1)))
        g = g * (0.5 + step % 3) * 1e-2
        out.append(g.to(p.dtype))
    return out


def set_grads(params, grads):
    for p, g in zip(params, grads):
        p.grad = None if g is None else g.clone()


def snapshot(opt: torch.optim.Optimizer, params=None) -> dict:
    """Deep copy of parameters and every optimizer state value, keyed by position."""
    params = list(params) if params is not None else [p for g in opt.param_groups for p in g["params"]]
    return {
        "params": [p.detach().clone() for p in params],
        "state": [{k: (v.detach().clone() if isinstance(v, torch.Tensor) else copy.deepcopy(v))
                   for k, v in opt.state[p].items()} if p in opt.state else None for p in params],
    }


def assert_snapshot_equal(a: dict, b: dict) -> None:
    """Bit-identical parameters and state (same keys, shapes, dtypes and values)."""
    assert len(a["params"]) == len(b["params"])
    for i, (x, y) in enumerate(zip(a["params"], b["params"])):
        assert x.dtype == y.dtype and x.shape == y.shape, f"param {i}"
        assert torch.equal(x, y), f"param {i} changed"
    for i, (x, y) in enumerate(zip(a["state"], b["state"])):
        assert (x is None) == (y is None), f"state {i}: one side has no state"
        if x is None:
            continue
        assert set(x) == set(y), f"state {i} keys {sorted(x)} != {sorted(y)}"
        for k in x:
            if isinstance(x[k], torch.Tensor):
                assert x[k].dtype == y[k].dtype and x[k].shape == y[k].shape, f"state {i}[{k}]"
                assert torch.equal(x[k], y[k]), f"state {i}[{k}] differs"
            else:
                assert x[k] == y[k], f"state {i}[{k}]"


def assert_close(actual, expected, rtol, what="", floor=None, origin=None, atol=0.0):
    """|actual - expected| <= rtol * (|expected| + floor), elementwise, in float64.

    `floor` defaults to the largest |expected| of the tensor, so the tolerance is relative to the
    tensor's scale (elements near zero after cancellation, e.g. an EMA of signed gradients, carry
    the absolute rounding error of the larger terms they came from). With `origin` (the starting
    parameters) the displacements actual - origin and expected - origin are compared, so the
    tolerance is relative to what the optimizer changed, not to the weights' magnitude; `atol`
    (see `rounding_atol`) then adds the rounding of the stored weights themselves."""
    a = actual.detach().to(torch.float64).reshape(-1)
    e = expected.detach().to(torch.float64).reshape(-1)
    if origin is not None:
        o = origin.detach().to(torch.float64).reshape(-1)
        a, e = a - o, e - o
    assert a.shape == e.shape, f"{what}: {tuple(a.shape)} vs {tuple(e.shape)}"
    floor = e.abs().max().item() if floor is None else floor
    err = (a - e).abs()
    atol = atol.detach().to(torch.float64).reshape(-1) if torch.is_tensor(atol) else atol
    bad = err > rtol * (e.abs() + floor) + atol
    assert not bool(bad.any()), (
        f"{what}: {int(bad.sum())}/{a.numel()} elements off; max abs err {err.max().item():.3e}, "
        f"max err relative to the tensor's scale {(err.max() / max(floor, 1e-300)).item():.3e}, "
        f"max elementwise rel err {(err / e.abs().clamp_min(1e-300)).max().item():.3e}")



def assert_within_low_precision_budget(opt, params, exact, low):
    """DESIGN's bf16 rule: our error against the float64 reference (`exact`) is at most twice the
    error of the same reference math run with low-precision storage (`low`), for p, m and v."""
    for key, ours_of, ex, lo in (
            ("param", lambda p: p, exact.p, low.p),
            ("exp_avg", lambda p: opt.state[p]["exp_avg"], exact.m, low.m),
            ("exp_avg_sq", lambda p: opt.state[p]["exp_avg_sq"], exact.v, low.v)):
        ours = torch.cat([ours_of(p).double().reshape(-1) for p in params])
        e = torch.cat([t.reshape(-1) for t in ex])
        lw = torch.cat([t.reshape(-1) for t in lo])
        err, budget = (ours - e).norm().item(), (lw - e).norm().item()
        assert budget > 0
        assert err <= 2 * budget, f"{key}: error {err:.3e} > 2 x bf16 reference error {budget:.3e}"


def step_with_scheduler(opt, ref, scheduler, params, steps):
    """Steps `opt` and the float64 `ref` on the same grads for `steps` steps, giving the reference
    the lr the scheduler set for that step; returns the lrs seen (one param group's)."""
    seen = []
    for step in range(steps):
        group_lrs = {g["lr"] for g in opt.param_groups}
        assert len(group_lrs) == 1
        lr = group_lrs.pop()
        seen.append(lr)
        grads = make_grads(params, step)
        set_grads(params, grads)
        opt.step()
        ref.step(grads, lrs=[lr] * len(params))
        scheduler.step()
    return seen

def rounding_atol(param, steps: int, roundings_per_step: int = 1):
    """Elementwise bound on the error that storing `param` in its dtype adds over `steps` steps:
    half an ulp per rounding, `roundings_per_step` roundings of the weight per step."""
    unit = torch.finfo(param.dtype).eps / 2
    return steps * roundings_per_step * unit * param.detach().to(torch.float64).abs()


def roundtrip(obj):
    """torch.save to memory and torch.load back (what a checkpoint does)."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.fixture
def llama():
    return make_llama()


@pytest.fixture
def gpt2():
    return make_gpt2()


@pytest.fixture(params=sorted(memopt_core.OPTIMIZERS))
def opt_name(request):
    """Every optimizer in memopt_core.registry.OPTIMIZERS."""
    return request.param


@pytest.fixture(scope="session")
def cpp_builds(tmp_path_factory):
    """cpp/tests (the ctest programs and optimizer_runner) and examples/cpp_trainer, built once
    per run against the installed package: {"tests": dir, "trainer": dir}. Skips without cmake."""
    from cpp_runner import build_cpp
    return build_cpp(tmp_path_factory.mktemp("cpp"))


@pytest.fixture(scope="session")
def cpp_runner(cpp_builds, tmp_path_factory):
    """Runs jobs on the LibTorch optimizers (tests/cpp_runner.py)."""
    from cpp_runner import Runner
    runner = Runner(cpp_builds["tests"] / "optimizer_runner", tmp_path_factory.mktemp("runner"))
    yield runner
    runner.close()
