"""Shared by the torchtitan integration tests (tests/test_torchtitan*.py): torchtitan 0.3.0's
real llama3 debug model (Llama3Model: fused GQA wqkv, RMSNorm, RoPE, SwiGLU, lm_head) on CPU, the
hyperparameters and options the optimizers run with on it, and a deterministic batch and backward.

CPU limit: the debug model's flex attention runs forward on CPU (torch.compile'd, ~40 s) but its
backward raises "FlexAttention does not support backward on CPU", and torchtitan refuses sdpa as
a backend. debug_model() therefore swaps each layer's inner attention for causal
scaled_dot_product_attention; test_torchtitan_model.py's test_sdpa_swap_matches_flex_forward
(slow) checks the swap gives flex's forward exactly. Everything else is torchtitan's own code.

Importing this module skips the importing test module unless torchtitan 0.3.0 and triton are
installed (pip install torchtitan==0.3.0 triton).
"""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

pytest.importorskip("triton", reason="torchtitan's model code imports triton: pip install triton")
llama3 = pytest.importorskip("torchtitan.models.llama3",
                             reason="needs torchtitan: pip install torchtitan==0.3.0 triton")

HP = dict(lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
# Small projections refreshed every 2 steps, so a refresh falls on both sides of the checkpoint
# (steps 0-2 saved at 3, resumed for 3-4); Frugal's selection seed fixed so two instances
# choose alike, and its re-selection after the checkpoint (see test_torchtitan.py's
# FRUGAL_RESELECTED).
OPTIONS = {"apollo": dict(rank=16, update_proj_gap=2), "apollo_mini": dict(update_proj_gap=2),
           "frugal": dict(update_gap=4, seed=0)}
VOCAB, BATCH, SEQ = 2048, 2, 16


class CausalSDPA(nn.Module):
    """torchtitan's inner-attention interface ((B, L, N, H) in and out) over causal SDPA."""

    def forward(self, q, k, v, *, attention_masks=None, scale=None, enable_gqa=False, **_):
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                             v.transpose(1, 2), is_causal=True, scale=scale,
                                             enable_gqa=enable_gqa)
        return out.transpose(1, 2)


def debug_model(cpu_attention=True) -> nn.Module:
    torch.manual_seed(0)
    model = llama3.llama3_configs["debugmodel"]("flex").build()
    model.init_states()
    if cpu_attention:
        for layer in model.layers.values():
            layer.attention.inner_attention = CausalSDPA()
    return model


def batch(step):
    g = torch.Generator().manual_seed(step)
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=g)
    return tokens[:, :-1], tokens[:, 1:]


def backward(model, step):
    x, y = batch(step)
    F.cross_entropy(model(x).flatten(0, 1).float(), y.flatten()).backward()
