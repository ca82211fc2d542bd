"""memopt_core.AdamMini against the float64 paper reference (tests/reference/adam_mini_ref.py,
partition="auto") on tiny HF LLaMA (GQA) and GPT-2 models: parameters, m and v after >= 7 steps,
plus block counts and state bytes. Against PyPI adam-mini 1.1.1 (partition="reference"):
test_adam_mini_vs_pypi.py."""
from __future__ import annotations

import pytest
import torch

import memopt_core
from adam_mini_util import (D, GPT2_COUNTS, H, HKV, LLAMA_COUNTS, STEPS, _expected_count,
                            gpt2_blocks, llama_blocks)
from conftest import (assert_close, step_with_scheduler, assert_within_low_precision_budget, make_gpt2, make_grads, make_llama, rounding_atol,
                      set_grads)
from reference import adam_mini_ref as R


def _by_name(opt):
    out = {}
    for g in opt.param_groups:
        for n, p in zip(g["param_names"], g["params"]):
            out[n] = p
    return out


def _run_against_reference(model, blocks_of, lr=2e-3, wd=0.1, betas=(0.9, 0.95), eps=1e-8,
                           dtype_storage=torch.float64, opt=None, steps=STEPS):
    named = list(model.named_parameters())
    params = [p for _, p in named]
    opt = opt or memopt_core.AdamMini(model, lr=lr, betas=betas, eps=eps, weight_decay=wd)
    entries = [(p, *blocks_of(n, tuple(p.shape))) for n, p in named]
    ref = R.AdamMiniRef(entries, lr=lr, betas=betas, eps=eps, weight_decay=wd)
    low = (R.AdamMiniRef(entries, lr=lr, betas=betas, eps=eps, weight_decay=wd,
                         storage_dtype=dtype_storage) if dtype_storage != torch.float64 else None)
    for step in range(steps):
        grads = make_grads(params, step)
        set_grads(params, grads)
        opt.step()
        ref.step(grads)
        if low is not None:
            low.step(grads)
    return named, opt, ref, low


# ---- partition="auto" vs the float64 paper reference ---------------------------------------------
def _check_against_reference(named, opt, ref, counts, rtol=1e-5):
    for i, (name, p) in enumerate(named):
        s = opt.state[p]
        assert s["exp_avg"].shape == p.shape
        assert s["exp_avg_sq"].dim() == 1
        assert s["exp_avg_sq"].numel() == ref.nblocks[i] == opt.blocks[p].count \
            == _expected_count(counts, name), f"{name}: block count"
        assert s["step"].item() == ref.steps[i] == STEPS
        assert_close(p, ref.p[i], rtol, f"{name} param", origin=ref.p0[i],
                     atol=rounding_atol(p, STEPS))
        assert_close(s["exp_avg"], ref.m[i], rtol, f"{name} exp_avg")
        assert_close(s["exp_avg_sq"], ref.v[i], rtol, f"{name} exp_avg_sq")


def test_auto_partition_matches_reference_on_llama_gqa():
    named, opt, ref, _ = _run_against_reference(make_llama(seed=1), llama_blocks)
    _check_against_reference(named, opt, ref, LLAMA_COUNTS)
    # weight decay: decay group has every 2-D tensor, the no-decay group the norms
    for g in opt.param_groups:
        for n, p in zip(g["param_names"], g["params"]):
            assert (g["weight_decay"] > 0) == (p.dim() == 2), n


def test_auto_partition_matches_reference_on_gpt2_conv1d_fused_qkv():
    # eps comparable to sqrt(v): pins down where eps enters (after sqrt and bias correction)
    named, opt, ref, _ = _run_against_reference(make_gpt2(seed=2), gpt2_blocks, eps=3e-3)
    _check_against_reference(named, opt, ref, GPT2_COUNTS)
    roles = {b.name: b.role for b in opt.blocks.values()}
    assert roles["transformer.h.1.attn.c_attn.weight"] == "qkv"


def test_auto_partition_user_groups_with_different_lr():
    model = make_llama(seed=7)
    named = list(model.named_parameters())
    first = [(n, p) for n, p in named if "layers.0." in n]
    rest = [(n, p) for n, p in named if "layers.0." not in n]
    opt = memopt_core.AdamMini([{"params": first, "lr": 5e-3}, {"params": rest}], lr=1e-3,
                               betas=(0.9, 0.95), weight_decay=0.1, dim=D, n_heads=H,
                               n_kv_heads=HKV)  # groups of names: no model to read heads from
    # each user group is split into a decay and a no-decay group, keeping its lr
    assert sorted((g["lr"], g["weight_decay"]) for g in opt.param_groups) == \
        [(1e-3, 0.0), (1e-3, 0.1), (5e-3, 0.0), (5e-3, 0.1)]
    lrs = [5e-3 if "layers.0." in n else 1e-3 for n, _ in named]
    entries = [(p, *llama_blocks(n, tuple(p.shape))) for n, p in named]
    ref = R.AdamMiniRef(entries, betas=(0.9, 0.95), weight_decay=0.1, lrs=lrs)
    params = [p for _, p in named]
    for step in range(STEPS):
        grads = make_grads(params, step)
        set_grads(params, grads)
        opt.step()
        ref.step(grads)
    _check_against_reference(named, opt, ref, LLAMA_COUNTS)


@pytest.mark.parametrize("sched", ["lambda", "cosine"])
def test_lr_scheduler_lr_reaches_the_update(sched):
    model = make_llama(seed=8)
    named = list(model.named_parameters())
    params = [p for _, p in named]
    opt = memopt_core.AdamMini(model, lr=4e-3, weight_decay=0.1)
    if sched == "lambda":
        scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    else:
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=STEPS, eta_min=1e-4)
    ref = R.AdamMiniRef([(p, *llama_blocks(n, tuple(p.shape))) for n, p in named], lr=4e-3,
                        weight_decay=0.1)
    seen = []
    seen += step_with_scheduler(opt, ref, scheduler, params, STEPS)
    assert len(set(seen)) == STEPS
    _check_against_reference(named, opt, ref, LLAMA_COUNTS)


def test_float64_params_match_reference_to_float64_precision():
    named, opt, ref, _ = _run_against_reference(make_llama(seed=9, dtype=torch.float64),
                                                llama_blocks)
    _check_against_reference(named, opt, ref, LLAMA_COUNTS, rtol=1e-11)


@pytest.mark.parametrize("make_model,blocks_of", [(make_llama, llama_blocks),
                                                  (make_gpt2, gpt2_blocks)], ids=["llama", "gpt2"])
def test_bf16_error_within_twice_bf16_reference_error(make_model, blocks_of):
    named, opt, exact, low = _run_against_reference(make_model(seed=10, dtype=torch.bfloat16),
                                                    blocks_of, dtype_storage=torch.bfloat16)
    params = [p for _, p in named]
    assert opt.state[params[0]]["exp_avg"].dtype == torch.bfloat16
    assert_within_low_precision_budget(opt, params, exact, low)


def test_noncontiguous_grads_match_reference():
    model = make_llama(seed=11)
    named = list(model.named_parameters())
    params = [p for _, p in named]
    opt = memopt_core.AdamMini(model, lr=2e-3, weight_decay=0.1)
    ref = R.AdamMiniRef([(p, *llama_blocks(n, tuple(p.shape))) for n, p in named], lr=2e-3,
                        weight_decay=0.1)
    for step in range(STEPS):
        grads = make_grads(params, step)
        for p, g in zip(params, grads):
            # 2-D: the transpose of a transposed copy; 1-D: every other element of a longer buffer
            p.grad = g.t().contiguous().t() if g.dim() == 2 else \
                torch.stack([g, torch.zeros_like(g)], 1)[:, 0]
            assert not p.grad.is_contiguous()
        opt.step()
        ref.step(grads)
    _check_against_reference(named, opt, ref, LLAMA_COUNTS)


# ---- memory accounting -----------------------------------------------------------------------
def _adamw_state_bytes(model):
    ps = list(model.parameters())
    return sum(2 * p.numel() * p.element_size() + 4 for p in ps)


def test_state_bytes_exact_on_tiny_llama():
    """m (param-shaped) + one v per block + one fp32 step per tensor, exactly; and the ratio to
    AdamW that this implies for hidden size 32 (per-row blocks cost 1/32 of a matrix)."""
    model = make_llama()
    named = list(model.named_parameters())
    params = [p for _, p in named]
    opt = memopt_core.AdamMini(model, lr=1e-3)
    set_grads(params, make_grads(params, 0))
    opt.step()
    blocks = sum(len(llama_blocks(n, tuple(p.shape))[0]) for n, p in named)
    numel = sum(p.numel() for p in params)
    expected = 4 * numel + 4 * blocks + 4 * len(params)
    assert opt.state_bytes() == expected
    adamw = memopt_core.AdamW(model.parameters())
    adamw.step()
    assert adamw.state_bytes() == _adamw_state_bytes(model)
    assert opt.state_bytes() / adamw.state_bytes() == pytest.approx(expected / _adamw_state_bytes(model))


def test_state_bytes_at_most_half_of_adamw_fp32():
    """<= 0.505 x AdamW's state in fp32 once blocks are a small fraction of the parameters
    (hidden 256; at hidden 32 per-row blocks alone are 1/32 of each matrix, see above)."""
    model = make_llama(hidden_size=256, intermediate_size=512, num_attention_heads=4,
                       num_key_value_heads=2)
    params = list(model.parameters())
    opt = memopt_core.AdamMini(model, lr=1e-3)
    adamw = memopt_core.AdamW(make_llama(hidden_size=256, intermediate_size=512).parameters())
    grads = make_grads(params, 0)
    set_grads(params, grads)
    set_grads([p for g in adamw.param_groups for p in g["params"]], grads)
    opt.step()
    adamw.step()
    ratio = opt.state_bytes() / adamw.state_bytes()
    assert ratio <= 0.505, ratio
    assert ratio > 0.5


def test_describe_reports_role_and_blocks_per_tensor():
    model = make_gpt2()
    opt = memopt_core.AdamMini(model, lr=1e-3)
    text = opt.describe()
    lines = text.splitlines()
    for name, p in model.named_parameters():
        row = [ln for ln in lines if ln.split() and ln.split()[0] == name]
        assert len(row) == 1, f"{name} not listed once in describe()"
        fields = row[0].split()
        assert fields[2] == opt.blocks[p].role
        assert int(fields[3].replace(",", "")) == _expected_count(GPT2_COUNTS, name)
    assert "total state" in lines[-1]


def test_q_heads_need_not_equal_hidden_over_heads():
    """head_dim * n_heads != hidden (Gemma/Qwen3 style): adam-mini 1.1.1 crashes or cuts
    half-heads; the paper's per-head blocks still follow the real head size."""
    model = make_llama(seed=12, hidden_size=32, head_dim=16, num_attention_heads=4,
                       num_key_value_heads=2)
    assert model.model.layers[0].self_attn.q_proj.weight.shape == (64, 32)
    named, opt, ref, _ = _run_against_reference(
        model, lambda n, s: llama_blocks(n, s, n_heads=4, n_kv=2))
    counts = dict(LLAMA_COUNTS, v_proj=32, o_proj=32)
    _check_against_reference(named, opt, ref, counts)


def test_raw_op_matches_reference_with_explicit_blocks():
    """torch.ops.memopt.adam_mini_ on hand-written segments: per-head rows, per-column of a
    transposed weight, and elementwise, against index sets written independently."""
    torch.manual_seed(2)
    params = [torch.randn(16, 6), torch.randn(5, 12), torch.randn(7)]
    segs = [[(0, 16, 6, 6, 4, 6)],                  # 4 blocks of 4 rows
            [(0, 5, 12, 12, 5, 1)],                 # 12 column blocks
            [(0, 7, 1, 1, 1, 1)]]                   # elementwise
    sets = [R.per_head((16, 6), 4), R.per_col((5, 12)), R.elementwise((7,))]
    ms = [torch.zeros_like(p) for p in params]
    vs = [torch.zeros(len(s)) for s in sets]
    steps = [torch.zeros((), dtype=torch.float32) for _ in params]
    encoded = memopt_core._C.encode_block_specs(segs)
    ref = R.AdamMiniRef([(p, s, True) for p, s in zip(params, sets)], lr=3e-3, betas=(0.9, 0.98),
                        eps=1e-6, weight_decay=0.2)
    for step in range(STEPS):
        grads = make_grads(params, step)
        torch.ops.memopt.adam_mini_(params, grads, ms, vs, steps, encoded,
                                    torch.tensor(3e-3, dtype=torch.float64), 0.9, 0.98, 1e-6, 0.2)
        ref.step(grads)
    for i, p in enumerate(params):
        assert_close(p, ref.p[i], 1e-5, f"param {i}", origin=ref.p0[i],
                     atol=rounding_atol(p, STEPS))
        assert_close(ms[i], ref.m[i], 1e-5, f"exp_avg {i}")
        assert_close(vs[i], ref.v[i], 1e-5, f"exp_avg_sq {i}")



def test_bad_hparam_in_a_param_group_raises_at_construction():
    named = list(make_llama().named_parameters())
    with pytest.raises(ValueError, match="learning rate"):
        memopt_core.AdamMini([{"params": named[:3], "lr": -1.0}, {"params": named[3:]}],
                             lr=1e-3, dim=D, n_heads=H, n_kv_heads=HKV)
