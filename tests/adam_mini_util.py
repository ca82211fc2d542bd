"""Shared by the Adam-mini front-end tests (tests/test_adam_mini.py,
tests/test_adam_mini_vs_pypi.py): the run length, the tiny models' head sizes, and the paper's
blocks of the tiny HF LLaMA and GPT-2 tensors with the block count each tensor should get."""
from __future__ import annotations

from reference import adam_mini_ref as R

STEPS = 8
H, HKV, HD, D = 4, 2, 8, 32  # the tiny models' heads, kv heads, head_dim, hidden


# ---- the paper's blocks, built here from names and shapes (independent of memopt's C++) -------
def llama_blocks(name: str, shape, n_heads=H, n_kv=HKV):
    """(index sets, decay) for HF LLaMA tensors (arXiv 2406.16793 §3)."""
    if name.endswith("norm.weight"):
        return R.whole(shape), False                     # one block per norm tensor
    if "embed_tokens" in name or "lm_head" in name:
        return R.per_row(shape), True                    # one block per token
    if "q_proj" in name:
        return R.per_head(shape, n_heads), True          # one block per query head
    if "k_proj" in name:
        return R.per_head(shape, n_kv), True             # one block per kv head (GQA)
    if any(k in name for k in ("v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")):
        return R.per_row(shape), True                    # nn.Linear (out, in): per output neuron
    raise AssertionError(f"unexpected tensor {name}")


def gpt2_blocks(name: str, shape):
    """(index sets, decay) for HF GPT-2 tensors: Conv1D weights are stored (in, out), so output
    neurons are columns; c_attn is [q | k | v] along the columns."""
    if name.endswith(".bias"):
        return R.elementwise(shape), False
    if ".ln_" in name:
        return R.whole(shape), False
    if "wte" in name or "wpe" in name:
        return R.per_row(shape), True                    # per token / per position
    if "c_attn" in name:
        return R.fused_qkv(shape, H, H, HD, transposed=True), True
    if any(k in name for k in ("attn.c_proj", "mlp.c_fc", "mlp.c_proj")):
        return R.per_col(shape), True
    raise AssertionError(f"unexpected tensor {name}")


LLAMA_COUNTS = {"embed_tokens": 64, "q_proj": H, "k_proj": HKV, "v_proj": HKV * HD,
                "o_proj": D, "gate_proj": 64, "up_proj": 64, "down_proj": D, "norm": 1,
                "lm_head": 64}
GPT2_COUNTS = {"wte": 64, "wpe": 32, "ln_1.weight": 1, "ln_1.bias": D, "c_attn.weight": H + H + D,
               "c_attn.bias": 3 * D, "attn.c_proj.weight": D, "attn.c_proj.bias": D,
               "ln_2.weight": 1, "ln_2.bias": D, "c_fc.weight": 4 * D, "c_fc.bias": 4 * D,
               "mlp.c_proj.weight": D, "mlp.c_proj.bias": D, "ln_f.weight": 1, "ln_f.bias": D}


def _expected_count(table, name):
    hits = [v for k, v in table.items() if k in name]
    assert len(hits) == 1 or len(set(hits)) == 1, name
    return hits[0]
