"""Small reference models for the demo, tests and benchmarks.

`Llama`: LLaMA-style decoder (RMSNorm, RoPE, SwiGLU, grouped-query attention) with Hugging Face's
parameter names, so optimizers (and the name-matching adam-mini reference) see what real training
shows them; its forward matches transformers' LlamaForCausalLM given the same weights.
`GPT`: nanoGPT-style, fused QKV (`attn.c_attn`) and tied embeddings, the layout that breaks
name-matching partitioners. Both carry `model.config` with `hidden_size`, `num_attention_heads`
and `num_key_value_heads`, where the optimizers read dim and head counts.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..int8_weights import Int8Linear, quantize_weights_
from .compute_dtype import LayerNorm, Linear
from .train_config import INT8_GROUP, WEIGHT_FORMATS


@dataclass
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    num_hidden_layers: int
    max_position_embeddings: int
    tie_word_embeddings: bool = False
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


# Vocabulary 256 for the models trained on the byte-level corpus; 32000 (LLaMA's tokenizer) for the
# benchmark and paper sizes, so the embedding and output matrices weigh what they do in a real model.
_LLAMA_PRESETS = {
    "tiny": dict(vocab_size=256, hidden_size=128, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=384, num_hidden_layers=4, max_position_embeddings=256),
    "small": dict(vocab_size=256, hidden_size=384, num_attention_heads=6, num_key_value_heads=2,
                  intermediate_size=1024, num_hidden_layers=6, max_position_embeddings=512),
    "50m": dict(vocab_size=32000, hidden_size=512, num_attention_heads=8, num_key_value_heads=4,
                intermediate_size=1408, num_hidden_layers=6, max_position_embeddings=2048),
    "200m": dict(vocab_size=32000, hidden_size=1024, num_attention_heads=16, num_key_value_heads=8,
                 intermediate_size=2816, num_hidden_layers=11, max_position_embeddings=2048),
}
# The sizes of the GaLore / APOLLO / FRUGAL pre-training papers (GaLore's configs/llama_*.json);
# llama-7b is Llama-2-7B's shape (6.74B parameters), the model of Adam-mini's 53.92 GB figure.
for _name, (_d, _i, _h, _l) in {"llama-60m": (512, 1376, 8, 8), "llama-130m": (768, 2048, 12, 12),
                                "llama-350m": (1024, 2736, 16, 24), "llama-1b": (2048, 5461, 32, 24),
                                "llama-7b": (4096, 11008, 32, 32)}.items():
    _LLAMA_PRESETS[_name] = dict(vocab_size=32000, hidden_size=_d, intermediate_size=_i,
                                 num_attention_heads=_h, num_key_value_heads=_h,
                                 num_hidden_layers=_l, max_position_embeddings=2048)
LLAMA_PRESETS = tuple(_LLAMA_PRESETS)


def _preset(cls, table, name, overrides):
    if name not in table:
        raise ValueError(f"unknown {cls.__name__} preset {name!r}; choose from {sorted(table)}")
    return cls(**{**table[name], **overrides})


def llama_config(name: str, **overrides) -> LlamaConfig:
    """Preset configs: "tiny" (~0.9M params), "small" (~10M), "50m" (~50M), "200m" (~195M) and
    the papers' "llama-60m", "-130m", "-350m", "-1b", "-7b" (vocabulary 32000)."""
    return _preset(LlamaConfig, _LLAMA_PRESETS, name, overrides)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # Normalise in fp32 so bf16 activations do not lose the mean-square.
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def _rope_tables(head_dim: int, max_pos: int, theta: float):
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    freqs = torch.outer(torch.arange(max_pos, dtype=torch.float32), inv_freq)
    emb = torch.cat([freqs, freqs], dim=-1)  # HF's rotate_half layout
    return emb.cos(), emb.sin()


def _apply_rope(x, cos, sin):
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class LlamaAttention(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        d, hd = cfg.hidden_size, cfg.head_dim
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, hd
        self.q_proj = Linear(d, self.n_heads * hd, bias=False)
        self.k_proj = Linear(d, self.n_kv * hd, bias=False)
        self.v_proj = Linear(d, self.n_kv * hd, bias=False)
        self.o_proj = Linear(self.n_heads * hd, d, bias=False)

    def forward(self, x, cos, sin):
        B, T, _ = x.shape
        q, k, v = (proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        q, k = _apply_rope(q, cos, sin), _apply_rope(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                           enable_gqa=self.n_kv != self.n_heads)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        d, i = cfg.hidden_size, cfg.intermediate_size
        self.self_attn = LlamaAttention(cfg)
        self.mlp = nn.Module()  # SwiGLU; a name scope only
        self.mlp.gate_proj, self.mlp.up_proj = Linear(d, i, bias=False), Linear(d, i, bias=False)
        self.mlp.down_proj = Linear(i, d, bias=False)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        h, mlp = self.post_attention_layernorm(x), self.mlp
        return x + mlp.down_proj(F.silu(mlp.gate_proj(h)) * mlp.up_proj(h))


class Llama(nn.Module):
    """LLaMA-style causal LM. forward(idx, targets=None) -> (logits, loss or None).
    `checkpoint_activations = True`: see run_layers. `compute_dtype` (None: the weights'):
    the dtype activations and arithmetic use, apart from the weights' storage (compute_dtype.py)."""

    checkpoint_activations = False
    compute_dtype = None

    def __init__(self, config: LlamaConfig):
        super().__init__()
        if config.hidden_size % config.num_attention_heads or \
                config.num_attention_heads % config.num_key_value_heads:
            raise ValueError("need hidden_size % num_attention_heads == 0 and "
                             "num_attention_heads % num_key_value_heads == 0")
        self.config = config
        self.model = nn.Module()  # HF's LlamaModel: holds the names, forward lives here
        self.model.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.model.layers = nn.ModuleList(LlamaDecoderLayer(config)
                                          for _ in range(config.num_hidden_layers))
        self.model.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        cos, sin = self._rope_tables()
        # Not persistent: derived from the config, so they stay out of state_dict.
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(_init_weights)

    def _rope_tables(self, device=None) -> tuple:
        """The fp32 RoPE tables (cos, sin) of this config, on `device` (None: the default)."""
        c = self.config
        tables = _rope_tables(c.head_dim, c.max_position_embeddings, c.rope_theta)
        return tables if device is None else tuple(t.to(device) for t in tables)

    def _apply(self, fn, recurse=True):
        # The RoPE tables stay fp32 whatever dtype the weights are cast to: bf16 angles would
        # shift the positions of an fp32 compute (they are cast to the activations' dtype).
        super()._apply(fn, recurse)
        if self.rope_cos.dtype != torch.float32:
            self.rope_cos, self.rope_sin = self._rope_tables(self.rope_cos.device)
        return self

    def forward(self, idx, targets=None):
        T = _check_len(idx, self.config.max_position_embeddings)
        x = _in_compute_dtype(self, self.model.embed_tokens(idx))
        cos, sin = self.rope_cos[:T].to(x.dtype), self.rope_sin[:T].to(x.dtype)
        x = run_layers(self, self.model.layers, x, cos, sin)
        logits = self.lm_head(self.model.norm(x))
        return logits, _loss(logits, targets)


@dataclass
class GPTConfig:
    vocab_size: int
    n_embd: int
    n_head: int
    n_layer: int
    block_size: int
    bias: bool = True

    # The names the optimizers read (HF's GPT2Config aliases them the same way).
    hidden_size = property(lambda self: self.n_embd)
    num_attention_heads = property(lambda self: self.n_head)
    num_key_value_heads = property(lambda self: self.n_head)


_GPT_PRESETS = {"tiny": dict(vocab_size=256, n_embd=128, n_head=4, n_layer=4, block_size=256)}


def gpt_config(name: str, **overrides) -> GPTConfig:
    """Preset configs: "tiny" (~0.9M params)."""
    return _preset(GPTConfig, _GPT_PRESETS, name, overrides)


class GPTBlock(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        d, self.n_head = cfg.n_embd, cfg.n_head
        self.ln_1, self.ln_2 = LayerNorm(d, bias=cfg.bias), LayerNorm(d, bias=cfg.bias)
        self.attn, self.mlp = nn.Module(), nn.Module()  # name scopes only, as in nanoGPT
        self.attn.c_attn = Linear(d, 3 * d, bias=cfg.bias)  # output rows: [q; k; v]
        self.attn.c_proj = Linear(d, d, bias=cfg.bias)
        self.mlp.c_fc = Linear(d, 4 * d, bias=cfg.bias)
        self.mlp.c_proj = Linear(4 * d, d, bias=cfg.bias)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
                   for t in self.attn.c_attn(self.ln_1(x)).split(C, dim=2))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.attn.c_proj(y.transpose(1, 2).reshape(B, T, C))
        return x + self.mlp.c_proj(F.gelu(self.mlp.c_fc(self.ln_2(x))))


class GPT(nn.Module):
    """nanoGPT-style causal LM with tied embeddings. forward(idx, targets=None) -> (logits, loss).
    `checkpoint_activations`, `compute_dtype`: as Llama's."""

    checkpoint_activations = False
    compute_dtype = None

    def __init__(self, config: GPTConfig):
        super().__init__()
        if config.n_embd % config.n_head:
            raise ValueError("n_embd must divide by n_head")
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            h=nn.ModuleList(GPTBlock(config) for _ in range(config.n_layer)),
            ln_f=LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight
        self.apply(_init_weights)

    def forward(self, idx, targets=None):
        T = _check_len(idx, self.config.block_size)
        pos = self.transformer.wpe(torch.arange(T, device=idx.device))
        x = _in_compute_dtype(self, self.transformer.wte(idx)) + _in_compute_dtype(self, pos)
        x = run_layers(self, self.transformer.h, x)
        logits = self.lm_head(self.transformer.ln_f(x))
        return logits, _loss(logits, targets)


def _in_compute_dtype(model: nn.Module, x):
    return x if model.compute_dtype is None else x.to(model.compute_dtype)


def run_layers(model: nn.Module, layers, x, *args):
    """x through each layer. With model.checkpoint_activations and grad enabled, each layer is
    recomputed in backward (torch.utils.checkpoint, non-reentrant), so only the layers' inputs
    are kept from the forward, not everything inside them: the same gradients (the recompute
    does the same arithmetic) for about one extra forward of compute."""
    recompute = model.checkpoint_activations and torch.is_grad_enabled()
    for layer in layers:
        x = checkpoint(layer, x, *args, use_reentrant=False) if recompute else layer(x, *args)
    return x


def _init_weights(module):
    # GPT-2 / HF LLaMA initialisation: N(0, 0.02) weights, zero biases.
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if getattr(module, "bias", None) is not None:
            nn.init.zeros_(module.bias)


def _check_len(idx, limit):
    if idx.shape[1] > limit:
        raise ValueError(f"sequence length {idx.shape[1]} exceeds the model's {limit} positions")
    return idx.shape[1]


def _loss(logits, targets):
    if targets is None:
        return None
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1))


def build(name: str, arch: str = "llama", device=None, **overrides) -> nn.Module:
    """A freshly initialised model from a preset name (arch "llama" or "gpt"). On
    device="meta" nothing is allocated: shapes only, for memory planning."""
    if device is not None:
        with torch.device(device):
            return build(name, arch, **overrides)
    if arch == "llama":
        return Llama(llama_config(name, **overrides))
    if arch == "gpt":
        return GPT(gpt_config(name, **overrides))
    raise ValueError(f"unknown arch {arch!r}; choose 'llama' or 'gpt'")


def to_weight_format(model: nn.Module, fmt: str, device=None) -> nn.Module:
    """`model` (on `device`) in a run's weight format (train_config.WEIGHT_FORMATS): every weight
    in fp32 or bf16, or for "int8" the attention and MLP linears as int8 (quantize_weights_, the
    output head kept; groups of INT8_GROUP, or the largest divisor of a layer's input features
    below it) and the rest bf16. On the meta device only the structure changes."""
    model.to(device=device, dtype=WEIGHT_FORMATS[fmt])
    if fmt == "int8":
        quantize_weights_(model, group_size=INT8_GROUP, fit_groups=True)
    return model


def materialize(model: nn.Module, device, dtype: torch.dtype) -> nn.Module:
    """A model built on the meta device (int8 layers too: to_weight_format), allocated on
    `device` directly in `dtype` and initialised there tensor by tensor (as the constructor
    would), so that no copy in another dtype ever exists: how a 7B model is built in bf16
    within its 13.5 GB. An int8 layer draws its weight in fp32 and encodes it, one at a time."""
    model.to(dtype=dtype).to_empty(device=device)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (RMSNorm, nn.LayerNorm)):
                m.weight.fill_(1.0)
                if getattr(m, "bias", None) is not None:
                    m.bias.zero_()
            if isinstance(m, Int8Linear):
                m.load_float_weight_(torch.empty(m.out_features, m.in_features,
                                                 device=device).normal_(0.0, 0.02))
                if m.bias is not None:
                    m.bias.zero_()
            _init_weights(m)
    if isinstance(model, Llama):  # the RoPE tables (buffers, fp32) are not parameters
        model.rope_cos, model.rope_sin = model._rope_tables(device)
    return model


def num_params(model: nn.Module) -> int:
    """Parameter count; parameters() yields a tied tensor once."""
    return sum(p.numel() for p in model.parameters())
