"""Float64 pure-PyTorch APOLLO: the oracle for memopt_core.Apollo / ApolloMini.

Written from Zhu et al., "APOLLO: SGD-like Memory, AdamW-level Performance" (arXiv 2412.05270),
Algorithm 1 (APOLLO / APOLLO-Mini) with §3.2 (channel-wise scaling along the larger dimension,
tensor-wise for APOLLO-Mini) and §4 (norm-growth limiter, gamma = 1.01, after Fira):

    every T steps:  P <- N_seed(0, 1/r)  (seed advanced every refresh)
    R_t   = P G_t                                   # r-dim projection of the gradient
    M_t   = b1 M + (1 - b1) R_t ;  V_t = b2 V + (1 - b2) R_t^2
    Rt    = M_t / (sqrt(V_t) + eps)                 # Adam direction in the projected space
    s_c   = ||Rt[:, c]|| / ||R_t[:, c]||            # per channel c (or one s for the tensor)
    G~    = G_t diag(s) ;  G~ <- G~ / max(||G~|| / (gamma ||G~_{t-1}||), 1)   # limiter
    W_t   = W_{t-1} - eta alpha G~ - eta lambda W

where the published code (apollo-torch 1.0.3, which the paper's numbers come from) fixes the
details this reference follows: alpha = sqrt(scale); Adam's bias correction sits in eta
(eta = lr sqrt(1-b2^t)/(1-b1^t), eps added to sqrt(V) uncorrected); 1e-8 is added to ||R_c|| and
to the previous norm; the projection side is chosen by shape (m >= n: R = G P^T with P (r, n);
else R = P^T G with P (m, r)); P is redrawn when the step *before* its increment is a multiple of
T, from torch.Generator(CPU).manual_seed(seed) and randn in float32, / sqrt(r); the seed chain is
seed_{k+1} = last of 15 randint(0, 2^63-1) draws seeded with seed_k; weight decay comes after the
update with the uncorrected lr. P is generated here from those rules directly (no memopt code).

`storage_dtype` simulates low-precision storage: float64 math, with p, M, V and P rounded to that
dtype (the DESIGN's "same reference run in bf16").
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch


def gaussian_projection(shape, seed: int, rank: int) -> torch.Tensor:
    """randn(shape) / sqrt(rank) from a CPU generator seeded with `seed`, drawn in float32."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen, dtype=torch.float32) / math.sqrt(rank)


def next_seed(seed: int) -> int:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, torch.iinfo(torch.int64).max, (15,), generator=gen).tolist()[-1]


class ApolloRef:
    """One projected 2-D tensor per entry. `seeds` are the initial seeds (apollo-torch: the
    1-based position of the parameter among all parameters)."""

    def __init__(self, params: Sequence[torch.Tensor], seeds: Sequence[int], lr=1e-3,
                 betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0, rank=4, proj="random", proj_type="std",
                 scale_type="channel", update_proj_gap=200, scale=1.0, norm_growth_limit=1.01,
                 scale_front=False, storage_dtype: torch.dtype = torch.float64):
        self.p = [t.detach().to(torch.float64).clone() for t in params]
        self.p0 = [t.clone() for t in self.p]
        self.seeds = list(seeds)
        self.lr, (self.b1, self.b2), self.eps, self.wd = lr, betas, eps, weight_decay
        self.rank, self.proj, self.scale_type, self.gap = rank, proj, scale_type, update_proj_gap
        self.alpha, self.gamma, self.front = math.sqrt(scale), norm_growth_limit, scale_front
        self.storage_dtype = storage_dtype
        # R = G P^T (channels are G's rows) or P^T G (channels are columns). apollo-torch picks
        # the channel dim from the shape alone, which only fits proj_type="std"; for the other
        # types the channels here are the dimension R keeps, as in memopt.
        tall = [t.shape[0] >= t.shape[1] for t in self.p]
        self.right = {"std": tall, "reverse_std": [not x for x in tall], "left": [False] * len(tall),
                      "right": [True] * len(tall)}[proj_type]
        self.P: list = [None] * len(self.p)
        self.m: list = [None] * len(self.p)
        self.v: list = [None] * len(self.p)
        self.norm: list = [None] * len(self.p)
        self.steps = [0] * len(self.p)

    def _round(self, t):
        return t if self.storage_dtype == torch.float64 else t.to(self.storage_dtype).to(torch.float64)

    def _new_projection(self, i, g):
        m, n = g.shape
        if self.proj == "svd":  # GaLore's basis: top singular vectors of the float32 gradient
            U, _, Vh = torch.linalg.svd(g.float(), full_matrices=False)
            P = Vh[:self.rank] if self.right[i] else U[:, :self.rank]
        else:
            if self.steps[i] > 0:
                self.seeds[i] = next_seed(self.seeds[i])
            shape = (self.rank, n) if self.right[i] else (m, self.rank)
            P = gaussian_projection(shape, self.seeds[i], self.rank)
        return self._round(P.to(torch.float64))

    def step(self, grads: Sequence[Optional[torch.Tensor]], lrs: Optional[Sequence[float]] = None):
        for i, g in enumerate(grads):
            if g is None:
                continue
            lr = lrs[i] if lrs is not None else self.lr
            g = g.detach().to(torch.float64)
            if self.steps[i] % self.gap == 0:
                self.P[i] = self._new_projection(i, g)
            R = g @ self.P[i].t() if self.right[i] else self.P[i].t() @ g
            if self.m[i] is None:
                self.m[i], self.v[i] = torch.zeros_like(R), torch.zeros_like(R)
            self.steps[i] += 1
            t = self.steps[i]
            M = self._round(self.b1 * self.m[i] + (1 - self.b1) * R)
            V = self._round(self.b2 * self.v[i] + (1 - self.b2) * R * R)
            Rt = M / (V.sqrt() + self.eps)
            if self.scale_type == "channel":
                dim = 1 if self.right[i] else 0
                s = Rt.norm(dim=dim) / (R.norm(dim=dim) + 1e-8)
                U = g * (s.unsqueeze(1) if self.right[i] else s)
            else:
                U = g * (Rt.norm() / (R.norm() + 1e-8))
            if self.front:
                U = U * self.alpha
            if self.gamma:
                u = U.norm()
                if self.norm[i] is None:
                    self.norm[i] = u
                else:
                    limit = max(u / (self.norm[i] + 1e-8), self.gamma) / self.gamma
                    U = U / limit
                    self.norm[i] = u / limit
            if not self.front:
                U = U * self.alpha
            eta = lr * math.sqrt(1 - self.b2 ** t) / (1 - self.b1 ** t)
            p = self.p[i] - eta * U
            p = p - lr * self.wd * p
            self.p[i], self.m[i], self.v[i] = self._round(p), M, V
