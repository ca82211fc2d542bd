"""Role inference (memopt_core.roles) on each model family: the key tensors of LLaMA-family (GQA),
Gemma, GPT-2, nanoGPT, torchtitan (plain and fused qkv), BERT, CNN, MHA and plain MLP models get
the paper's Adam-mini blocks.

Block counts come from the C++ partitioner (_C.adam_mini_blocks), so these tests check the roles
AND that the head sizes handed to C++ cut Q/K per head, V/O/MLP per output neuron, embedding and
output per token, norms whole, biases elementwise. Models are tiny and built from configs
(tests/roles_util.py). No head count, names only, explicit dims, overrides, model_dims, refusals
and the role table shared with C++: test_roles.py.
"""
import pytest
import torch
import torch.nn as nn

pytest.importorskip("transformers")

from memopt_core import _C  # noqa: E402
from memopt_core.roles import TensorRole, infer_roles  # noqa: E402

from roles_util import D, FF, H, KV, MODELS, V, build, roles_and_blocks  # noqa: E402


@pytest.mark.parametrize("key", sorted(MODELS))
def test_every_parameter_gets_a_valid_role(key):
    model = build(key)
    counts, roles = roles_and_blocks(model)
    assert set(roles) == {n for n, _ in model.named_parameters()}
    for name, r in roles.items():
        assert isinstance(r, TensorRole) and r.name == name
        assert r.role in _C.role_names() and r.source in ("module", "name", "override")
    for name, p in model.named_parameters():
        if p.dim() <= 1:  # a 1-D tensor is never cut per row
            assert roles[name].role in ("bias", "norm", "scalar"), name


def _layer(prefix, counts):
    return {k[len(prefix):]: v for k, v in counts.items() if k.startswith(prefix)}


@pytest.mark.parametrize("key", ["llama", "mistral", "qwen2"])
def test_llama_family_gqa(key):
    counts, _ = roles_and_blocks(build(key))
    a = _layer("model.layers.0.", counts)
    assert a["self_attn.q_proj.weight"] == ("query", H)
    assert a["self_attn.k_proj.weight"] == ("key", KV)  # GQA: kv heads, via head_dim
    assert a["self_attn.v_proj.weight"] == ("value", KV * D // H)
    assert a["self_attn.o_proj.weight"] == ("attn_out", D)
    for w in ("gate_proj", "up_proj"):
        assert a[f"mlp.{w}.weight"] == ("mlp", FF)
    assert a["mlp.down_proj.weight"] == ("mlp", D)
    assert a["input_layernorm.weight"] == ("norm", 1)
    assert counts["model.embed_tokens.weight"] == ("embedding", V)
    assert counts["lm_head.weight"] == ("output", V)
    if key == "qwen2":
        assert a["self_attn.q_proj.bias"] == ("bias", D)
        assert a["self_attn.k_proj.bias"] == ("bias", KV * D // H)


def test_tied_embedding_is_per_token_embedding():
    counts, _ = roles_and_blocks(build("llama_tied"))
    assert "lm_head.weight" not in counts
    assert counts["model.embed_tokens.weight"] == ("embedding", V)
    # head registered first: the shared tensor is named lm_head.weight, still the embedding
    counts, roles = roles_and_blocks(build("head_first_tied"))
    assert counts == {"lm_head.weight": ("embedding", 50)}
    assert roles["lm_head.weight"].source == "module"


def test_gemma_head_dim_not_hidden_over_heads():
    counts, roles = roles_and_blocks(build("gemma"))
    a = _layer("model.layers.0.self_attn.", counts)
    assert roles["model.layers.0.self_attn.q_proj.weight"].head_dim == 16  # config, not 32 // 4
    assert a["q_proj.weight"] == ("query", H) and a["k_proj.weight"] == ("key", 1)
    assert a["o_proj.weight"] == ("attn_out", D)


def test_gpt2_conv1d_is_transposed_and_c_attn_fused():
    counts, roles = roles_and_blocks(build("gpt2"))
    a = _layer("transformer.h.0.", counts)
    c_attn = roles["transformer.h.0.attn.c_attn.weight"]
    assert c_attn.transposed
    assert (c_attn.q_heads, c_attn.kv_heads, c_attn.head_dim) == (H, H, D // H)
    assert a["attn.c_attn.weight"] == ("qkv", H + H + D)  # q, k per head; v per neuron
    assert a["attn.c_proj.weight"] == ("attn_out", D)
    assert a["mlp.c_fc.weight"] == ("mlp", 4 * D)  # columns of (in, out): output neurons
    assert a["mlp.c_proj.weight"] == ("mlp", D)
    assert all(roles[f"transformer.h.0.{n}.weight"].transposed
               for n in ("attn.c_proj", "mlp.c_fc", "mlp.c_proj"))
    assert a["attn.c_attn.bias"] == ("bias", 3 * D) and a["ln_1.weight"] == ("norm", 1)
    assert counts["transformer.wte.weight"] == ("embedding", V)  # tied with lm_head


def test_nanogpt_fused_linear_not_transposed():
    counts, roles = roles_and_blocks(build("nanogpt"))
    c_attn = roles["transformer.h.0.attn.c_attn.weight"]
    assert not c_attn.transposed and counts[c_attn.name] == ("qkv", H + H + D)
    assert counts["transformer.wte.weight"] == ("embedding", V)
    assert counts["transformer.h.0.attn.c_proj.weight"] == ("attn_out", D)
    assert counts["transformer.h.0.mlp.c_fc.weight"] == ("mlp", 4 * D)


def test_torchtitan_names():
    counts, _ = roles_and_blocks(build("torchtitan"))
    a = _layer("layers.0.", counts)
    assert a["attention.wq.weight"] == ("query", H) and a["attention.wk.weight"] == ("key", KV)
    assert a["attention.wv.weight"] == ("value", KV * D // H)
    assert a["attention.wo.weight"] == ("attn_out", D)
    assert a["feed_forward.w1.weight"] == ("mlp", FF) and a["feed_forward.w2.weight"] == ("mlp", D)
    assert a["attention_norm.weight"] == ("norm", 1) and a["ffn_norm.weight"] == ("norm", 1)
    assert counts["tok_embeddings.weight"] == ("embedding", V)
    assert counts["output.weight"] == ("output", V)



class _FusedQKVLinear(nn.Module):
    """torchtitan 0.3.0's FusedQKVLinear layout: wqkv rows viewed as (n_kv, heads_per_kv + 2,
    head_dim), i.e. per kv head its query heads, then its key head, then its value head."""

    def __init__(self, dim, n_heads, n_kv, head_dim):
        super().__init__()
        self.head_dim, self.heads_per_kv = head_dim, n_heads // n_kv
        self.r_dim = self.heads_per_kv + 2
        self.wqkv = nn.Linear(dim, n_kv * self.r_dim * head_dim, bias=False)


class _TitanFusedAttention(nn.Module):
    def __init__(self, dim=D, n_heads=H, n_kv=KV, head_dim=D // H):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv, head_dim
        self.qkv_linear = _FusedQKVLinear(dim, n_heads, n_kv, head_dim)
        self.wo = nn.Linear(n_heads * head_dim, dim, bias=False)


def block_ids(segs, numel):
    """Block index of every element of a tensor, from its segments (tiles numbered row-major)."""
    ids, base = torch.full((numel,), -1, dtype=torch.long), 0
    for off, rows, cols, stride, tr, tc in segs:
        r, c = torch.arange(rows).view(-1, 1), torch.arange(cols).view(1, -1)
        block = base + (r // tr) * (cols // tc) + c // tc
        ids[(off + r * stride + c).reshape(-1)] = block.reshape(-1)
        base += (rows // tr) * (cols // tc)
    assert bool((ids >= 0).all()), "segments do not cover the tensor"
    return ids


def test_torchtitan_fused_qkv_is_cut_per_kv_group():
    """Per kv head: one block per query head and for the key head, one per value row; the
    q | k | v segments of a stacked fused qkv would cut v heads per head and q/k per row."""
    hd, hpk = D // H, H // KV
    model = _TitanFusedAttention()
    w = model.qkv_linear.wqkv.weight
    r = infer_roles(model.named_parameters(), model)["qkv_linear.wqkv.weight"]
    assert (r.role, r.kv_interleaved, r.q_heads, r.kv_heads, r.head_dim) == ("qkv", True, H, KV, hd)
    segments, note = r.blocks(w.shape)
    assert not note
    ids = block_ids(segments, w.numel()).view(KV, hpk + 2, hd, D)
    heads = ids[:, :hpk + 1]  # query heads and the key head of every group
    assert bool((heads == heads[..., :1, :1]).all())  # one block per head
    assert heads[..., 0, 0].unique().numel() == KV * (hpk + 1)
    v = ids[:, hpk + 1]  # value rows: one block per output neuron
    assert bool((v == v[..., :1]).all()) and v[..., 0].unique().numel() == KV * hd
    assert ids.unique().numel() == H + KV + KV * hd
    # The same weight outside a FusedQKVLinear keeps the stacked q | k | v cut.
    plain = nn.Module()
    plain.attention = _TitanFusedAttention()
    plain.attention.qkv_linear = nn.Module()  # no heads_per_kv / r_dim
    plain.attention.qkv_linear.wqkv = nn.Linear(D, (H + 2 * KV) * hd, bias=False)
    stacked = infer_roles(plain.named_parameters(), plain)["attention.qkv_linear.wqkv.weight"]
    assert stacked.role == "qkv" and not stacked.kv_interleaved and stacked.kv_heads == KV

def test_bert_one_dim_output_layernorm_is_norm():
    counts, _ = roles_and_blocks(build("bert"))
    a = _layer("bert.encoder.layer.0.", counts)
    assert a["attention.output.LayerNorm.weight"] == ("norm", 1)  # adam-mini 1.1.1 crashes here
    assert a["attention.output.LayerNorm.bias"] == ("bias", D)
    assert a["attention.self.query.weight"] == ("query", H)
    assert a["attention.self.key.weight"] == ("key", H)
    assert a["attention.self.value.weight"] == ("value", D)
    assert a["attention.output.dense.weight"] == ("attn_out", D)
    assert a["intermediate.dense.weight"] == ("mlp", FF) and a["output.dense.weight"] == ("mlp", D)
    assert counts["bert.embeddings.word_embeddings.weight"] == ("embedding", V)  # tied decoder
    assert counts["cls.predictions.bias"] == ("bias", V)


def test_conv_mha_and_plain_models():
    counts, _ = roles_and_blocks(build("cnn"))
    assert counts["conv1.weight"] == ("conv", 4) and counts["conv2.weight"] == ("conv", 8)
    assert counts["conv3.weight"] == ("conv", 2) and counts["bn.weight"] == ("norm", 1)
    assert counts["conv2.bias"] == ("bias", 8) and counts["fc.weight"] == ("linear", 10)
    counts, _ = roles_and_blocks(build("vit_mha"))
    assert counts["patch_embed.proj.weight"] == ("conv", 16)  # adam-mini 1.1.1 crashes here
    assert counts["encoder.self_attn.in_proj_weight"] == ("qkv", 4 + 4 + 16)
    assert counts["encoder.self_attn.in_proj_bias"] == ("bias", 48)
    assert counts["encoder.self_attn.out_proj.weight"] == ("attn_out", 16)
    assert counts["cross.q_proj_weight"] == ("query", 4)
    assert counts["cross.k_proj_weight"] == ("key", 4)
    assert counts["cross.v_proj_weight"] == ("value", 16)
    counts, _ = roles_and_blocks(build("mlp"))
    assert counts == {"0.weight": ("linear", 16), "0.bias": ("bias", 16),
                      "2.weight": ("norm", 1), "2.bias": ("bias", 16),
                      "3.weight": ("linear", 3), "3.bias": ("bias", 3)}
