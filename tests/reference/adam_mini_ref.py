"""Float64 pure-PyTorch Adam-mini: the oracle for memopt_core.AdamMini.

Written from Zhang et al., "Adam-mini: Use Fewer Learning Rates To Gain More" (arXiv 2406.16793),
Algorithm 1 (Adam-mini, general form) with the Transformer partition of §3 (Principle 1 and the
partition algorithm: Q and K by head, V / attention output / MLP by output neuron, embedding and
output layer by token, one block per remaining tensor such as norms; biases keep Adam's
elementwise second moment, as in the authors' release):

    for each parameter block b:
        m_b   = beta1 * m_b + (1 - beta1) * g_b
        v_b   = beta2 * v_b + (1 - beta2) * mean(g_b * g_b)      # ONE scalar per block
        m^_b  = m_b / (1 - beta1^t);   v^_b = v_b / (1 - beta2^t)
        w_b   = w_b - lr * m^_b / (sqrt(v^_b) + eps) - lr * wd * w_b   (decoupled decay)

The blocks are given explicitly, as a list of flat-index sets per tensor, built here from the
paper's rules with plain `view`/`arange` indexing (`per_head`, `per_row`, `per_col`,
`fused_qkv`, ...). Nothing here uses memopt's C++ segment logic. The order of the index sets is
the order of the tensor's `exp_avg_sq` entries that is compared against.

`storage_dtype` simulates low-precision storage: float64 math, then p, m and v rounded to that
dtype after every step (the DESIGN's "same reference run in bf16").
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

IndexSets = list  # list[torch.LongTensor] of flat element indices, one per block


# ---- block builders: the paper's rules, from shapes alone ------------------------------------
def _flat(shape) -> torch.Tensor:
    n = 1
    for s in shape:
        n *= s
    return torch.arange(n)


def whole(shape) -> IndexSets:
    """One block for the whole tensor (norm weights, other 1-D / scalar tensors)."""
    return [_flat(shape)]


def elementwise(shape) -> IndexSets:
    """Plain Adam: every element its own block (biases)."""
    return list(_flat(shape).view(-1, 1))


def per_head(shape, n_heads: int) -> IndexSets:
    """Q/K of nn.Linear (H*hd, dim): `p.view(heads, -1)` rows, one block per head."""
    return list(_flat(shape).view(n_heads, -1))


def per_row(shape) -> IndexSets:
    """One block per row: output neuron of nn.Linear (out, in), token of an embedding (V, d)."""
    return list(_flat(shape).view(shape[0], -1))


def per_col(shape) -> IndexSets:
    """One block per column: output neuron of a transposed (in, out) weight (HF Conv1D)."""
    idx = _flat(shape).view(shape[0], -1)
    return [idx[:, c] for c in range(idx.shape[1])]


def fused_qkv(shape, n_heads: int, n_kv_heads: int, head_dim: int,
              transposed: bool) -> IndexSets:
    """A fused [q; k; v] projection: q and k per head, v per output neuron.
    transposed=False: nn.Linear (q+2kv, in), outputs are rows; True: Conv1D (in, q+2kv)."""
    idx = _flat(shape).view(shape[0], -1)
    if transposed:
        idx = idx.t()  # rows are now the output features
    q, kv = n_heads * head_dim, n_kv_heads * head_dim
    assert idx.shape[0] == q + 2 * kv, "fused qkv shape does not match the head counts"
    sets = [idx[h * head_dim:(h + 1) * head_dim].reshape(-1) for h in range(n_heads)]
    sets += [idx[q + h * head_dim:q + (h + 1) * head_dim].reshape(-1) for h in range(n_kv_heads)]
    sets += [idx[q + kv + r] for r in range(kv)]
    return sets


def head_numel_blocks(shape, head_numel: int) -> IndexSets:
    """adam-mini 1.1.1's Q/K rule: contiguous runs of dim*dim/n_heads elements."""
    return list(_flat(shape).view(-1, head_numel))


# ---- the optimizer --------------------------------------------------------------------------
class AdamMiniRef:
    """Float64 Adam-mini over explicitly given blocks.

    entries: one (param, blocks, decay) per tensor, where blocks is a list of flat-index sets
    that partition the tensor, and decay says whether weight decay applies to it.
    """

    def __init__(self, entries: Sequence[tuple], lr: float = 1e-3, betas=(0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0,
                 lrs: Optional[Sequence[float]] = None,
                 storage_dtype: torch.dtype = torch.float64):
        self.p, self.block_id, self.nblocks, self.count, self.decay = [], [], [], [], []
        for p, blocks, decay in entries:
            n = p.numel()
            bid = torch.full((n,), -1, dtype=torch.long)
            for b, ix in enumerate(blocks):
                ix = torch.as_tensor(ix, dtype=torch.long).reshape(-1)
                assert bool((bid[ix] == -1).all()), "blocks overlap"
                bid[ix] = b
            assert bool((bid >= 0).all()), "blocks do not cover the tensor"
            self.p.append(p.detach().to(torch.float64).clone())
            self.block_id.append(bid)
            self.nblocks.append(len(blocks))
            self.count.append(torch.bincount(bid, minlength=len(blocks)).to(torch.float64))
            self.decay.append(bool(decay))
        self.p0 = [t.clone() for t in self.p]  # starting values, for displacement comparisons
        self.m = [torch.zeros_like(t) for t in self.p]
        self.v = [torch.zeros(nb, dtype=torch.float64) for nb in self.nblocks]
        self.steps = [0 for _ in self.p]
        self.lrs = list(lrs) if lrs is not None else [lr] * len(self.p)
        self.beta1, self.beta2 = betas
        self.eps, self.wd = eps, weight_decay
        self.storage_dtype = storage_dtype

    def _round(self, t: torch.Tensor) -> torch.Tensor:
        if self.storage_dtype == torch.float64:
            return t
        return t.to(self.storage_dtype).to(torch.float64)

    def step(self, grads: Sequence[Optional[torch.Tensor]],
             lrs: Optional[Sequence[float]] = None) -> None:
        lrs = list(lrs) if lrs is not None else self.lrs
        b1, b2, eps = self.beta1, self.beta2, self.eps
        for i, g in enumerate(grads):
            if g is None:
                continue
            g = g.detach().to(torch.float64).reshape(-1)
            lr = lrs[i]
            wd = self.wd if self.decay[i] else 0.0
            self.steps[i] += 1
            t = self.steps[i]
            bid = self.block_id[i]
            p = self.p[i].reshape(-1)
            m = b1 * self.m[i].reshape(-1) + (1 - b1) * g
            block_mean_sq = torch.zeros(self.nblocks[i], dtype=torch.float64).index_add_(
                0, bid, g * g) / self.count[i]
            v = b2 * self.v[i] + (1 - b2) * block_mean_sq
            m_hat = m / (1 - b1 ** t)
            v_hat = v / (1 - b2 ** t)
            denom = v_hat.sqrt()[bid] + eps        # the block's one value, broadcast to its elements
            p = p - lr * m_hat / denom - lr * wd * p
            shape = self.p[i].shape
            self.p[i] = self._round(p.view(shape))
            self.m[i] = self._round(m.view(shape))
            self.v[i] = self._round(v)

    def state(self, i: int) -> dict:
        return {"exp_avg": self.m[i], "exp_avg_sq": self.v[i], "step": float(self.steps[i])}
