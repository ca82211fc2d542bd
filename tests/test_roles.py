"""Role inference (memopt_core.roles) beyond what a model's modules say: no head count (one block
per output neuron, with a warning), names only, explicit dims over the config, role overrides,
model_dims; flattened parameters refused; and the C++ decisions shared with the LibTorch front end
(module-tree roles, the one role traits table).

Block counts come from the C++ partitioner (_C.adam_mini_blocks). Models are tiny and built from
configs (tests/roles_util.py). Each model family's roles and blocks:
test_roles_of_model_families.py.
"""
import re

import pytest
import torch.nn as nn

pytest.importorskip("transformers")

from memopt_core import _C  # noqa: E402
from memopt_core.roles import infer_roles, model_dims  # noqa: E402

import models_zoo as zoo  # noqa: E402
from roles_util import D, H, KV, V, build, llama, roles_and_blocks  # noqa: E402


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
