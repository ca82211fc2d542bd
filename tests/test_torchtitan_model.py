"""memopt on torchtitan 0.3.0's llama3 models (torchtitan_util.py: the real debug model on CPU):
the roles and Adam-mini / SlimAdam blocks read from the real modules (fused, kv-interleaved wqkv,
GQA), and the CPU attention swap the training tests rely on.

Skipped unless torchtitan 0.3.0 and triton are installed (pip install torchtitan==0.3.0 triton).
"""
import pytest
import torch

# first: skips this module without torchtitan and triton
from torchtitan_util import BATCH, SEQ, batch, debug_model, llama3

import memopt_core
from memopt_core.roles import infer_roles


@pytest.fixture(scope="module")
def base_model():
    return debug_model()


def test_roles_of_the_real_model(base_model):
    """tok_embeddings per token, lm_head output, norms whole, w1/w2/w3 MLP, wo attention output,
    and the fused wqkv cut per kv group: per head for q and k, per row for v."""
    roles = infer_roles(base_model.named_parameters(), base_model)
    a = base_model.layers["0"].attention
    hd, h, kv = a.head_dim, a.n_heads, a.n_kv_heads
    assert {n: r.role for n, r in roles.items() if not n.startswith("layers.")} == {
        "tok_embeddings.weight": "embedding", "norm.weight": "norm", "lm_head.weight": "output"}
    layer = {n.removeprefix("layers.0."): r for n, r in roles.items() if n.startswith("layers.0.")}
    assert {n: r.role for n, r in layer.items()} == {
        "attention.qkv_linear.wqkv.weight": "qkv", "attention.wo.weight": "attn_out",
        "feed_forward.w1.weight": "mlp", "feed_forward.w2.weight": "mlp",
        "feed_forward.w3.weight": "mlp", "attention_norm.weight": "norm", "ffn_norm.weight": "norm"}
    wqkv = layer["attention.qkv_linear.wqkv.weight"]
    assert (wqkv.kv_interleaved, wqkv.head_dim, wqkv.q_heads, wqkv.kv_heads) == (True, hd, h, kv)
    opt = memopt_core.AdamMini(base_model)
    assert opt.blocks[a.qkv_linear.wqkv.weight].count == h + kv + kv * hd


def test_slim_adam_table_on_the_interleaved_wqkv(base_model):
    """SlimAdam's table on torchtitan's wqkv, whose rows are per kv group [its q heads | k | v]:
    q and k averaged over fan-in (one value per row), v over fan-out (one value per column), and
    each block inside one kv group's rows (the stacked q|k|v reading would average v rows
    together with q rows of the next group)."""
    a = base_model.layers["0"].attention
    w = a.qkv_linear.wqkv.weight
    hd, h, kv, dim = a.head_dim, a.n_heads, a.n_kv_heads, w.shape[1]
    lay = memopt_core.SlimAdam(base_model).blocks[w]
    assert lay.count == kv * ((h // kv + 1) * hd + dim)
    group = (h // kv + 2) * hd * dim  # elements of one kv group's rows
    for off, rows, cols, stride, tr, tc in lay.segments:
        first, last = off, off + (rows - 1) * stride + cols - 1
        assert first // group == last // group, "a segment spans two kv groups"


def test_roles_of_a_gqa_model():
    """Llama 3 1B (GQA: 32 query heads, 8 kv heads of 64), on the meta device: per kv group 4
    query heads and a key head per head, 64 value rows per row."""
    with torch.device("meta"):
        model = llama3.llama3_configs["1B"]("flex").build()
    roles = infer_roles(model.named_parameters(), model)
    r = roles["layers.0.attention.qkv_linear.wqkv.weight"]
    assert (r.role, r.kv_interleaved, r.head_dim, r.q_heads, r.kv_heads) == ("qkv", True, 64, 32, 8)
    segments, note = r.blocks(model.layers["0"].attention.qkv_linear.wqkv.weight.shape)
    assert not note and sum((s[1] // s[4]) * (s[2] // s[5]) for s in segments) == 32 + 8 + 8 * 64
    assert roles["tok_embeddings.weight"].role == "embedding"  # tied to lm_head in 1B


@pytest.mark.slow
def test_sdpa_swap_matches_flex_forward():
    flex, swapped = debug_model(cpu_attention=False), debug_model()
    x, _ = batch(0)
    positions = torch.arange(SEQ).expand(BATCH, SEQ)
    with torch.no_grad():
        ref = flex(x, attention_masks=flex.get_attention_masks(positions=positions))
        torch.testing.assert_close(swapped(x), ref)
