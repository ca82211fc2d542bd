"""memopt_core.SlimAdam against the float64 reference (tests/reference/slim_adam_ref.py) on tiny
HF LLaMA and GPT-2 models, the paper's static table on HF LLaMA / HF GPT-2 / nanoGPT / torchtitan
layouts, GPT-2-small's second-moment saving (meta device, no download), rules dicts and JSON
files, and error cases. The torch.optim contract (state_dict resume, schedulers, closures, bad
input) is tested for every registry entry in test_optimizer_contract.py."""
from __future__ import annotations

import json
import warnings

import pytest
import torch
from torch import nn

import memopt_core
from conftest import (assert_close, assert_within_low_precision_budget, make_gpt2, make_grads,
                      make_llama, rounding_atol, set_grads)
from models_zoo import GPTConfig, ModelArgs, NanoGPT, Titan
from reference.slim_adam_ref import SlimAdamRef

STEPS = 8
D, H, HD = 32, 4, 8  # the tiny models' hidden size, heads and head_dim


# ---- the paper's Table 1, written here from names and layouts (independent of the C++) -------
def llama_rule(name, shape):
    """HF LLaMA: nn.Linear weights are (out, in)."""
    if "norm" in name:
        return None
    if any(k in name for k in ("embed_tokens", "lm_head", "q_proj", "k_proj")):
        return (1,)                                   # per token / per output row (fan-in mean)
    return (0,)                                       # v, o, gate, up, down: per input column


def gpt2_rule(name, shape):
    """HF GPT-2: Conv1D weights are (in, out), so fan-in is dim 0 and fan-out dim 1; c_attn is
    [q | k | v] along the columns: q, k averaged over fan-in, v over fan-out."""
    if len(shape) < 2:
        return None                                   # biases and LayerNorm
    if "wte" in name or "wpe" in name:
        return (1,)
    if "c_attn" in name:
        return [(1, 0, 2 * D, (0,)), (1, 2 * D, 3 * D, (1,))]
    return (1,)                                       # c_proj, c_fc: per input row


def _run(model, rule_of, opt, *, lr=2e-3, wd=0.1, betas=(0.9, 0.95), low_dtype=None):
    named = list(model.named_parameters())
    params = [p for _, p in named]
    entries = [(p, rule_of(n, tuple(p.shape))) for n, p in named]
    ref = SlimAdamRef(entries, lr=lr, betas=betas, weight_decay=wd)
    low = SlimAdamRef(entries, lr=lr, betas=betas, weight_decay=wd,
                      storage_dtype=low_dtype) if low_dtype else None
    for step in range(STEPS):
        grads = make_grads(params, step)
        set_grads(params, grads)
        opt.step()
        for r in (ref, low):
            if r is not None:
                r.step(grads)
    return named, ref, low


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_matches_float64_reference(family):
    model, rule_of = (make_llama(), llama_rule) if family == "llama" else (make_gpt2(), gpt2_rule)
    opt = memopt_core.SlimAdam(model, lr=2e-3, betas=(0.9, 0.95), weight_decay=0.1)
    named, ref, _ = _run(model, rule_of, opt)
    for i, (name, p) in enumerate(named):
        s = ref.state(i)
        assert opt.state[p]["step"].item() == STEPS
        assert_close(p, ref.p[i], 1e-5, f"{name} param", origin=ref.p0[i],
                     atol=rounding_atol(p, STEPS))
        assert_close(opt.state[p]["exp_avg"], s["exp_avg"], 1e-6, f"{name} m")
        assert_close(opt.state[p]["exp_avg_sq"], s["exp_avg_sq"], 1e-6, f"{name} v")


def test_bf16_error_within_twice_the_bf16_reference():
    model = make_llama(dtype=torch.bfloat16)
    opt = memopt_core.SlimAdam(model, lr=2e-3, betas=(0.9, 0.95), weight_decay=0.1)
    named, ref, low = _run(model, llama_rule, opt, low_dtype=torch.bfloat16)
    assert all(opt.state[p]["exp_avg_sq"].dtype == torch.bfloat16 for _, p in named)
    assert_within_low_precision_budget(opt, [p for _, p in named], ref, low)


class Shapes(nn.Module):
    """Tensors of 1 to 4 dims for explicit rules (names match no role on purpose)."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.a = nn.Parameter(torch.randn(6, 5, 4, generator=g))
        self.b = nn.Parameter(torch.randn(3, 4, 5, 6, generator=g))
        self.c = nn.Parameter(torch.randn(4, 1, 7, generator=g))
        self.d = nn.Parameter(torch.randn(9, generator=g))
        self.e = nn.Parameter(torch.randn(5, 4, generator=g))


RULES = {"a": [0, 2], "b": [1, 3], "c": [-1], "d": [0], "e": None}


def test_explicit_rules_on_nd_tensors_match_reference_and_keepdim_shapes():
    model = Shapes()
    opt = memopt_core.SlimAdam(model, lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1, rules=RULES)
    rule = {k: (None if v is None else tuple(d % getattr(model, k).dim() for d in v))
            for k, v in RULES.items()}
    named, ref, _ = _run(model, lambda n, s: rule[n], opt, lr=1e-2, wd=0.1)
    for i, (name, p) in enumerate(named):
        assert opt.second_moment(p).shape == ref.nu[i][0].shape, name   # the reference's nu
        assert_close(p, ref.p[i], 1e-5, f"{name} param", origin=ref.p0[i],
                     atol=rounding_atol(p, STEPS))
        assert_close(opt.state[p]["exp_avg_sq"], ref.v[i], 1e-6, f"{name} v")
    assert [g["weight_decay"] for g in opt.param_groups if any(p is model.d for p in g["params"])] == [0.0]


def _v_shapes(model, **kw):
    opt = memopt_core.SlimAdam(model, **kw)
    return {b.name: b.v_shape for b in opt.blocks.values()}, opt


def test_table_on_hf_llama_gives_the_papers_v_shapes(llama):
    shapes, _ = _v_shapes(llama)
    V, I = 64, 64
    assert shapes["model.embed_tokens.weight"] == (V, 1)
    assert shapes["lm_head.weight"] == (V, 1)
    assert shapes["model.layers.0.self_attn.q_proj.weight"] == (D, 1)
    assert shapes["model.layers.0.self_attn.k_proj.weight"] == (16, 1)      # GQA: kv rows
    assert shapes["model.layers.0.self_attn.v_proj.weight"] == (1, D)
    assert shapes["model.layers.0.self_attn.o_proj.weight"] == (1, D)
    assert shapes["model.layers.1.mlp.gate_proj.weight"] == (1, D)
    assert shapes["model.layers.1.mlp.up_proj.weight"] == (1, D)
    assert shapes["model.layers.1.mlp.down_proj.weight"] == (1, I)
    assert shapes["model.layers.1.input_layernorm.weight"] == (D,)           # uncompressed
    assert shapes["model.norm.weight"] == (D,)


def test_table_on_hf_gpt2_handles_conv1d_and_fused_qkv(gpt2):
    shapes, opt = _v_shapes(gpt2)
    assert shapes["transformer.wte.weight"] == (64, 1)                      # tied lm_head
    assert shapes["transformer.wpe.weight"] == (32, 1)
    assert shapes["transformer.h.0.attn.c_attn.weight"] == (2 * D + D,)     # q,k cols + v rows
    assert shapes["transformer.h.0.attn.c_proj.weight"] == (D, 1)           # (in, out): per input
    assert shapes["transformer.h.0.mlp.c_fc.weight"] == (D, 1)
    assert shapes["transformer.h.0.mlp.c_proj.weight"] == (4 * D, 1)
    assert shapes["transformer.h.0.attn.c_attn.bias"] == (3 * D,)           # biases: full Adam
    assert shapes["transformer.ln_f.weight"] == (D,)
    assert opt.rules()["transformer.h.0.attn.c_attn.weight"] == "table"


def test_table_on_nanogpt_and_torchtitan_layouts():
    shapes, _ = _v_shapes(NanoGPT(GPTConfig()))
    assert shapes["transformer.wte.weight"] == (96, 1)                      # tied with lm_head
    assert shapes["transformer.h.0.attn.c_attn.weight"] == (2 * D + D,)     # nn.Linear (3d, d)
    assert shapes["transformer.h.0.attn.c_proj.weight"] == (1, D)
    assert shapes["transformer.h.0.mlp.c_fc.weight"] == (1, D)
    assert shapes["transformer.h.0.mlp.c_proj.weight"] == (1, 4 * D)
    assert shapes["transformer.h.0.attn.c_attn.bias"] == (3 * D,)
    shapes, _ = _v_shapes(Titan(ModelArgs()))
    assert shapes["tok_embeddings.weight"] == (96, 1)
    assert shapes["output.weight"] == (96, 1)        # the reference's names miss it: full Adam
    assert shapes["layers.0.attention.wq.weight"] == (D, 1)
    assert shapes["layers.0.attention.wk.weight"] == (16, 1)
    assert shapes["layers.0.attention.wv.weight"] == (1, D)
    assert shapes["layers.0.attention.wo.weight"] == (1, D)                 # missed by reference
    assert shapes["layers.0.feed_forward.w2.weight"] == (1, 48)
    assert shapes["layers.0.attention_norm.weight"] == (D,)


def test_nanogpt_fused_qkv_matches_reference_split():
    model = NanoGPT(GPTConfig(bias=False))
    opt = memopt_core.SlimAdam(model, lr=2e-3, betas=(0.9, 0.95), weight_decay=0.1)

    def rule(name, shape):
        if len(shape) < 2:
            return None
        if "c_attn" in name:   # nn.Linear (3d, d): q, k rows over fan-in, v rows over fan-out
            return [(0, 0, 2 * D, (1,)), (0, 2 * D, 3 * D, (0,))]
        return (1,) if "wte" in name or "wpe" in name else (0,)

    named, ref, _ = _run(model, rule, opt)
    for i, (name, p) in enumerate(named):
        assert_close(p, ref.p[i], 1e-5, f"{name} param", origin=ref.p0[i], atol=rounding_atol(p, STEPS))
        assert_close(opt.state[p]["exp_avg_sq"], ref.v[i], 1e-6, f"{name} v")


def test_gpt2_small_saves_the_papers_share_of_second_moments():
    """GPT-2 small built on the meta device from configs (no weights, no download)."""
    from transformers import GPT2Config, GPT2LMHeadModel
    with torch.device("meta"):
        hf = GPT2LMHeadModel(GPT2Config())                       # 124M, Conv1D, biases
        nano = NanoGPT(GPTConfig(block_size=1024, vocab_size=50304, n_layer=12, n_head=12,
                                 n_embd=768, bias=False))       # the paper's bias-free model
    opt = memopt_core.SlimAdam(hf)
    assert opt.v_saved(only_2d=True) >= 0.9985
    adamw = memopt_core.AdamW(hf.parameters()).planned_state_bytes()
    assert opt.planned_state_bytes() <= 0.505 * adamw
    assert "% saved" in opt.describe().splitlines()[-1]
    # the reference's log for its bias-free GPT-2 small: 153,472 v entries, "saving 99.88%"
    opt = memopt_core.SlimAdam(nano)
    assert opt.v_entries() == 153_472
    assert f"{100 * opt.v_saved():.2f}" == "99.88"


# ---- rules: dicts, JSON files, None ----------------------------------------------------------
def test_rules_json_round_trip_gives_identical_training(tmp_path, llama):
    table = memopt_core.SlimAdam(llama)
    path = tmp_path / "rules.json"
    path.write_text(json.dumps(table.rules()))
    twin = make_llama()
    from_file = memopt_core.SlimAdam(twin, rules=str(path))
    assert [b.segments for b in from_file.blocks.values()] == [b.segments for b in table.blocks.values()]
    for step in range(3):
        for m, o in ((llama, table), (twin, from_file)):
            set_grads(list(m.parameters()), make_grads(list(m.parameters()), step))
            o.step()
    assert all(torch.equal(a, b) for a, b in zip(llama.parameters(), twin.parameters()))


def test_rules_none_is_adamw_with_decay_on_matrices_only(llama):
    opt = memopt_core.SlimAdam(llama, lr=2e-3, betas=(0.9, 0.95), weight_decay=0.1, rules=None)
    assert opt.v_entries() == sum(p.numel() for p in llama.parameters())
    named, ref, _ = _run(llama, lambda n, s: None, opt)
    for i, (name, p) in enumerate(named):
        assert opt.second_moment(p).shape == p.shape
        assert_close(p, ref.p[i], 1e-5, name, origin=ref.p0[i], atol=rounding_atol(p, STEPS))


def test_compile_prefix_and_table_entries_in_rules(llama):
    rules = {"_orig_mod.lm_head.weight": [0], "model.embed_tokens.weight": "table"}
    with pytest.warns(UserWarning, match="not in the rules stay uncompressed"):
        opt = memopt_core.SlimAdam(llama, rules=rules)
    shapes = {b.name: b.v_shape for b in opt.blocks.values()}
    assert shapes["lm_head.weight"] == (1, D)
    assert shapes["model.embed_tokens.weight"] == (64, 1)
    assert shapes["model.layers.0.self_attn.q_proj.weight"] == (D, D)      # missing: full Adam


@pytest.mark.parametrize("rules,exc,word", [
    ({"lm_head.weight": [2]}, ValueError, "out of range"),
    ({"lm_head.weight": [1, 1]}, ValueError, "repeat"),
    ({"lm_head.weight": [1.5]}, ValueError, "list of dims"),
    ({"lm_head.weight": "rows"}, ValueError, "list of dims"),
    (42, TypeError, "rules must be"),
])
def test_bad_rules_raise(llama, rules, exc, word):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(exc, match=word):
            memopt_core.SlimAdam(llama, rules=rules)


def test_unsupported_dim_set_is_rejected_with_the_parameter_name():
    with pytest.raises(ValueError, match=r"rules\['b'\].*not supported"):
        memopt_core.SlimAdam(Shapes(), rules={**RULES, "b": [0, 2]})
    assert not memopt_core._C.slim_adam_dims_supported([3, 4, 5, 6], [0, 2])
    assert memopt_core._C.slim_adam_dims_supported([3, 4, 5, 6], [0, 1, 3])


def test_needs_names():
    with pytest.raises(TypeError, match="names"):
        memopt_core.SlimAdam(make_llama().parameters())


def test_state_dict_round_trip_keeps_v_layout(llama, tmp_path):
    opt = memopt_core.SlimAdam(llama, lr=1e-3, weight_decay=0.1)
    params = list(llama.parameters())
    set_grads(params, make_grads(params, 0))
    opt.step()
    torch.save(opt.state_dict(), tmp_path / "o.pt")
    fresh = memopt_core.SlimAdam(llama, lr=1e-3, weight_decay=0.1)
    fresh.load_state_dict(torch.load(tmp_path / "o.pt", weights_only=True))
    for p in params:
        assert torch.equal(fresh.second_moment(p), opt.second_moment(p))
    other = memopt_core.SlimAdam(llama, rules=None)       # uncompressed v: shapes differ
    with pytest.raises(ValueError, match="exp_avg_sq"):
        other.load_state_dict(torch.load(tmp_path / "o.pt", weights_only=True))
