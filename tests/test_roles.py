"""Role inference (memopt_core.roles): each family's key tensors get the paper's Adam-mini blocks.

Block counts come from the C++ partitioner (_C.adam_mini_blocks), so these tests check the roles
AND that the head sizes handed to C++ cut Q/K per head, V/O/MLP per output neuron, embedding and
output per token, norms whole, biases elementwise. Models are tiny and built from configs.
"""
import re

import pytest
import torch
import torch.nn as nn

transformers = pytest.importorskip("transformers")

import memopt_core.app.models as mm  # noqa: E402
from memopt_core import _C  # noqa: E402
from memopt_core.roles import TensorRole, infer_roles, model_dims  # noqa: E402

import models_zoo as zoo  # noqa: E402

D, H, KV, V, FF = 32, 4, 2, 64, 48  # hidden, heads, kv heads, vocab, MLP width
HF_KW = dict(hidden_size=D, num_attention_heads=H, num_key_value_heads=KV, vocab_size=V,
             intermediate_size=FF, num_hidden_layers=1, max_position_embeddings=16)


def llama(**kw):
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**HF_KW, **kw}))


def gpt2():
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_embd=D, n_head=H, n_layer=1, vocab_size=V, n_positions=16, bos_token_id=0,
        eos_token_id=0))


def bert():
    kw = {k: v for k, v in HF_KW.items() if k != "num_key_value_heads"}
    return transformers.BertForMaskedLM(transformers.BertConfig(**kw))


MODELS = {
    "llama": llama,
    "llama_tied": lambda: llama(tie_word_embeddings=True),
    "mistral": lambda: transformers.MistralForCausalLM(transformers.MistralConfig(**HF_KW)),
    "qwen2": lambda: transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**HF_KW)),
    "gemma": lambda: transformers.GemmaForCausalLM(transformers.GemmaConfig(
        **{**HF_KW, "num_key_value_heads": 1, "head_dim": 16})),
    "gpt2": gpt2,
    "bert": bert,
    "nanogpt": lambda: zoo.NanoGPT(zoo.GPTConfig(vocab_size=V)),
    "torchtitan": lambda: zoo.Titan(zoo.ModelArgs(vocab_size=V)),
    "memopt_llama": lambda: mm.Llama(mm.llama_config("tiny", num_hidden_layers=1)),
    "memopt_gpt": lambda: mm.GPT(mm.gpt_config("tiny")),
    "head_first_tied": zoo.HeadFirstTied,
    "cnn": zoo.TinyCNN,
    "vit_mha": zoo.TinyViT,
    "mlp": lambda: nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.LayerNorm(16), nn.Linear(16, 3)),
}
_built = {}


def build(key):
    if key not in _built:  # build each model once per session: HF construction is the slow part
        _built[key] = MODELS[key]()
    return _built[key]


def roles_and_blocks(model, **kw):
    """{name: (role, block count)} and the TensorRoles, checking every spec tiles its tensor."""
    params = dict(model.named_parameters())
    roles = infer_roles(params.items(), model, **kw)
    counts = {}
    for name, p in params.items():
        segments, _ = roles[name].blocks(p.shape)
        _C.check_block_spec(segments, p.numel())
        counts[name] = (roles[name].role, sum((s[1] // s[4]) * (s[2] // s[5]) for s in segments))
    return counts, roles


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


def test_no_head_count_falls_back_to_per_neuron_and_says_so():
    with pytest.warns(UserWarning, match="per output neuron"):
        counts, roles = roles_and_blocks(zoo.HeadlessAttention())
    assert counts["q_proj.weight"] == ("linear", 16) and counts["k_proj.weight"] == ("linear", 16)
    assert "no head count" in roles["q_proj.weight"].note
    assert counts["v_proj.weight"] == ("value", 16)
    counts, roles = roles_and_blocks(zoo.HeadlessAttention(), n_heads=2, dim=16)
    assert counts["q_proj.weight"] == ("query", 2) and not roles["q_proj.weight"].note


def test_names_only():
    params = list(build("llama").named_parameters())
    with pytest.warns(UserWarning):
        roles = infer_roles(params)
    assert roles["model.layers.0.self_attn.q_proj.weight"].role == "linear"
    roles = infer_roles(params, dim=D, n_heads=H, n_kv_heads=KV)
    for name, p in params:
        _C.check_block_spec(roles[name].blocks(p.shape)[0], p.numel())
        assert roles[name].source == "name"
    assert len(roles["model.layers.0.self_attn.k_proj.weight"].blocks([KV * D // H, D])[0]) == 1
    q = roles["model.layers.0.self_attn.q_proj.weight"]
    assert q.role == "query" and q.head_dim == D // H
    assert roles["lm_head.weight"].role == "output"
    # GPT-2 by name: the (dim, 3*dim) shape shows the fused weight is stored (in, out)
    gpt = dict(build("gpt2").named_parameters())
    c_attn = infer_roles(gpt.items(), dim=D, n_heads=H)["transformer.h.0.attn.c_attn.weight"]
    assert c_attn.role == "qkv" and c_attn.transposed and c_attn.q_heads == c_attn.kv_heads == H


def test_explicit_dims_override_config():
    counts, _ = roles_and_blocks(build("llama"), head_dim=4)
    assert counts["model.layers.0.self_attn.q_proj.weight"] == ("query", D // 4)
    assert counts["model.layers.0.self_attn.k_proj.weight"] == ("key", KV * D // H // 4)
    counts, _ = roles_and_blocks(build("nanogpt"), n_heads=2)  # explicit beats the attention module
    assert counts["transformer.h.0.attn.c_attn.weight"] == ("qkv", 2 + 2 + D)


def test_overrides():
    model = build("llama")
    counts, roles = roles_and_blocks(model, roles={
        "lm_head.*": "adam", r"\.v_proj\.": "scalar", r"layers\.0\.self_attn\.v": "mlp",
        "*.o_proj.weight": "query"})
    assert counts["lm_head.weight"] == ("adam", V * D)
    assert roles["lm_head.weight"].source == "override"
    assert counts["model.layers.0.self_attn.v_proj.weight"] == ("scalar", 1)  # first match wins
    assert counts["model.layers.0.self_attn.o_proj.weight"] == ("query", H)  # gets head sizes
    assert counts["model.embed_tokens.weight"] == ("embedding", V)
    _, roles = roles_and_blocks(zoo.TinyCNN(), roles={"fc.weight": "key"})
    assert roles["fc.weight"].role == "key" and "no head count" in roles["fc.weight"].note
    with pytest.raises(ValueError, match=re.escape("valid roles: embedding, output")):
        infer_roles(model.named_parameters(), model, roles={"lm_head": "head"})
    with pytest.raises(ValueError, match="regex"):
        infer_roles(model.named_parameters(), model, roles={"(": "norm"})


def test_model_dims():
    assert model_dims(build("llama")) == dict(dim=D, n_heads=H, n_kv_heads=KV, head_dim=D // H)
    assert model_dims(build("gemma"))["head_dim"] == 16
    assert model_dims(build("gpt2")) == dict(dim=D, n_heads=H, n_kv_heads=H, head_dim=D // H)
    assert model_dims(build("nanogpt")) == dict(dim=D, n_heads=H, n_kv_heads=H, head_dim=D // H)
    assert model_dims(build("torchtitan")) == dict(dim=D, n_heads=H, n_kv_heads=KV, head_dim=D // H)
    wrapper = nn.Module()
    wrapper.module = build("llama")  # DDP-like: the config sits one level down
    assert model_dims(wrapper)["n_kv_heads"] == KV
    assert model_dims(build("vit_mha")) == dict(dim=16, n_heads=4, n_kv_heads=4, head_dim=4)
    assert model_dims(build("cnn")) == dict(dim=None, n_heads=None, n_kv_heads=None, head_dim=None)


def test_flattened_parameters_are_refused_with_the_fix():
    import torch
    from conftest import make_llama
    """DeepSpeed ZeRO / FSDP1 flat parameters hide shapes: a clear error naming FSDP2, not a
    partition of a flat buffer as if it were a bias."""
    import memopt_core
    model = make_llama()
    flat = torch.nn.Parameter(torch.zeros(32 * 32))
    model.model.layers[0].self_attn.q_proj.weight = flat  # what a flattening wrapper leaves
    with pytest.raises(ValueError, match="fully_shard"):
        memopt_core.AdamMini(model)
    zero = torch.nn.Parameter(torch.zeros(0))
    zero.ds_id = 3  # DeepSpeed ZeRO-3 marks its partitioned parameters so
    with pytest.raises(ValueError, match="DeepSpeed ZeRO"):
        memopt_core.SlimAdam([("model.layers.0.mlp.up_proj.weight", zero)])
    memopt_core.AdamW(model.parameters())  # elementwise needs no shape


class _Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj, self.k_proj = nn.Linear(32, 32, bias=False), nn.Linear(32, 16, bias=False)
        self.v_proj, self.o_proj = nn.Linear(32, 16, bias=False), nn.Linear(32, 32, bias=False)


class _Layer(nn.Module):
    def __init__(self):
        super().__init__()
        self.self_attn, self.input_layernorm = _Attention(), nn.LayerNorm(32)
        self.up_proj = nn.Linear(32, 48)


class _Tiny(nn.Module):
    """The LLaMA-shaped model cpp/tests/test_core.cpp builds in LibTorch (test_module_roles)."""

    def __init__(self):
        super().__init__()
        self.embed_tokens, self.layers = nn.Embedding(64, 32), nn.ModuleList([_Layer()])
        self.lm_head = nn.Linear(32, 64, bias=False)


def test_module_tree_roles_are_those_the_cpp_front_end_gets():
    """Python reads the facts from nn.Module types, the LibTorch front end (memopt::module_roles)
    from torch::nn ones; C++ infer_role decides for both. The C++ test asserts the same string."""
    inferred = infer_roles(_Tiny().named_parameters(), _Tiny(), dim=32, n_heads=4, n_kv_heads=2)
    got = " ".join(f"{r.role}/{r.head_dim}" for r in inferred.values()) + " "
    assert got == "embedding/0 query/8 key/8 value/0 attn_out/0 norm/0 bias/0 mlp/0 bias/0 output/0 "


def test_one_role_traits_table_drives_every_optimizer():
    """What APOLLO projects, FRUGAL splits, Adam-mini decays: the C++ table (memopt/roles.h)."""
    traits = _C.role_traits()
    assert set(traits) == set(_C.role_names())
    hidden = {r for r, t in traits.items() if t["hidden_matrix"]}
    split = {r for r, t in traits.items() if t["attention_or_mlp"]}
    assert split == {"query", "key", "value", "attn_out", "qkv", "mlp"}
    assert hidden == split | {"linear"}
    assert {r for r, t in traits.items() if not t["decays"]} == {"norm", "bias", "scalar"}
    named = list(llama().named_parameters())
    import memopt_core
    apollo = memopt_core.Apollo(named, rank=2)
    projected = {n for g in apollo.param_groups if g.get("rank") for n in g["param_names"]}
    roles = infer_roles(named)
    assert projected == {n for n, p in named if p.dim() == 2 and
                         traits[roles[n].role]["hidden_matrix"]}
