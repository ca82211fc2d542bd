"""Tiny models with the parameter names and module types of real families, for the role tests.

nanoGPT and torchtitan are not installable packages, so their layouts are rebuilt here with the
upstream attribute names (nanoGPT's fused `attn.c_attn` nn.Linear and tied `wte`/`lm_head`;
torchtitan's `wq..wo`, `w1..w3`, `attention_norm`, `model_args`). Forward passes are left out:
role inference only reads the module tree.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn


@dataclass
class GPTConfig:  # nanoGPT's model.GPTConfig fields
    block_size: int = 16
    vocab_size: int = 96
    n_layer: int = 2
    n_head: int = 4
    n_embd: int = 32
    bias: bool = True


class CausalSelfAttention(nn.Module):
    def __init__(self, c: GPTConfig):
        super().__init__()
        self.c_attn = nn.Linear(c.n_embd, 3 * c.n_embd, bias=c.bias)
        self.c_proj = nn.Linear(c.n_embd, c.n_embd, bias=c.bias)
        self.n_head, self.n_embd = c.n_head, c.n_embd


class MLP(nn.Module):
    def __init__(self, c: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(c.n_embd, 4 * c.n_embd, bias=c.bias)
        self.c_proj = nn.Linear(4 * c.n_embd, c.n_embd, bias=c.bias)


class Block(nn.Module):
    def __init__(self, c: GPTConfig):
        super().__init__()
        self.ln_1, self.attn = nn.LayerNorm(c.n_embd, bias=c.bias), CausalSelfAttention(c)
        self.ln_2, self.mlp = nn.LayerNorm(c.n_embd, bias=c.bias), MLP(c)


class NanoGPT(nn.Module):
    def __init__(self, c: GPTConfig):
        super().__init__()
        self.config = c
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(c.vocab_size, c.n_embd), wpe=nn.Embedding(c.block_size, c.n_embd),
            h=nn.ModuleList(Block(c) for _ in range(c.n_layer)),
            ln_f=nn.LayerNorm(c.n_embd, bias=c.bias)))
        self.lm_head = nn.Linear(c.n_embd, c.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # nanoGPT's weight tying


@dataclass
class ModelArgs:  # torchtitan's llama ModelArgs fields
    dim: int = 32
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int = 2
    vocab_size: int = 96
    ffn_hidden: int = 48


class RMSNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))


class Attention(nn.Module):
    def __init__(self, a: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = a.n_heads, a.n_kv_heads, a.dim // a.n_heads
        self.wq = nn.Linear(a.dim, a.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(a.dim, a.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(a.dim, a.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(a.n_heads * self.head_dim, a.dim, bias=False)


class FeedForward(nn.Module):
    def __init__(self, a: ModelArgs):
        super().__init__()
        self.w1 = nn.Linear(a.dim, a.ffn_hidden, bias=False)
        self.w2 = nn.Linear(a.ffn_hidden, a.dim, bias=False)
        self.w3 = nn.Linear(a.dim, a.ffn_hidden, bias=False)


class TransformerBlock(nn.Module):
    def __init__(self, a: ModelArgs):
        super().__init__()
        self.attention, self.feed_forward = Attention(a), FeedForward(a)
        self.attention_norm, self.ffn_norm = RMSNorm(a.dim), RMSNorm(a.dim)


class Titan(nn.Module):
    def __init__(self, a: ModelArgs):
        super().__init__()
        self.model_args = a
        self.tok_embeddings = nn.Embedding(a.vocab_size, a.dim)
        self.layers = nn.ModuleDict({str(i): TransformerBlock(a) for i in range(a.n_layers)})
        self.norm = RMSNorm(a.dim)
        self.output = nn.Linear(a.dim, a.vocab_size, bias=False)


class HeadFirstTied(nn.Module):
    """Tied weights whose head is registered before the embedding, so named_parameters() names
    the shared tensor `lm_head.weight`: it must still be treated as the embedding."""

    def __init__(self, vocab: int = 50, dim: int = 16):
        super().__init__()
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        self.embed = nn.Embedding(vocab, dim)
        self.embed.weight = self.lm_head.weight


class HeadlessAttention(nn.Module):
    """LLaMA-style q/k names with no head count anywhere (no config, no attributes)."""

    def __init__(self, dim: int = 16):
        super().__init__()
        self.q_proj, self.k_proj = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.v_proj, self.o_proj = nn.Linear(dim, dim), nn.Linear(dim, dim)


class TinyCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv1d(3, 4, 3)
        self.conv2 = nn.Conv2d(4, 8, 3)
        self.bn = nn.BatchNorm2d(8)
        self.conv3 = nn.Conv3d(8, 2, 1, bias=False)
        self.fc = nn.Linear(2, 10)


class TinyViT(nn.Module):
    """timm-style names: a conv patch embedding (crashes adam-mini 1.1.1) and a 3-D pos_embed."""

    def __init__(self, dim: int = 16, heads: int = 4):
        super().__init__()
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, dim, 4, 4)
        self.pos_embed = nn.Parameter(torch.zeros(1, 5, dim))
        self.encoder = nn.TransformerEncoderLayer(dim, heads, 2 * dim, batch_first=True)
        self.cross = nn.MultiheadAttention(dim, heads, kdim=8, vdim=8)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 7)
