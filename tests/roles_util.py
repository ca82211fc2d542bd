"""Shared by the role-inference tests (tests/test_roles.py, tests/test_roles_of_model_families.py):
the tiny models they infer roles on (Hugging Face families built from configs, the zoo's
hand-written ones, memopt's own; each built once per session) and roles_and_blocks, which checks
that every tensor's block spec tiles it and counts its blocks. Needs transformers: the test modules
importorskip it before importing this."""
import torch.nn as nn
import transformers

import memopt_core.app.models as mm
from memopt_core import _C
from memopt_core.roles import infer_roles

import models_zoo as zoo

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
