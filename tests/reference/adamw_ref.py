"""Float64 pure-PyTorch AdamW: the oracle for memopt_core.AdamW.

Written from Loshchilov & Hutter, "Decoupled Weight Decay Regularization" (arXiv 1711.05101),
Algorithm 2 ("Adam with decoupled weight decay (AdamW)"), lines 6-12:

    g_t   = grad
    m_t   = beta1 * m_{t-1} + (1 - beta1) * g_t
    v_t   = beta2 * v_{t-1} + (1 - beta2) * g_t^2
    m^_t  = m_t / (1 - beta1^t)
    v^_t  = v_t / (1 - beta2^t)
    theta_t = theta_{t-1} - eta_t * (alpha * m^_t / (sqrt(v^_t) + eps) + lambda * theta_{t-1})

with torch.optim.AdamW's parameterisation of the schedule: eta_t = 1, alpha = lr, and the decay
scaled by the learning rate (lambda -> lr * weight_decay), so the decay is applied to the
*previous* parameter: theta <- theta * (1 - lr*wd) - lr * m^ / (sqrt(v^) + eps).

rule="apollo" is instead apollo-torch 1.0.3's AdamW, what its APOLLOAdamW.step does to a
parameter of a group without `rank` (apollo_torch/apollo.py): eps is added to the uncorrected
sqrt(v), the bias corrections go into the step size, and the decay follows the update with the
uncorrected lr:

    theta' = theta - lr * sqrt(1 - beta2^t) / (1 - beta1^t) * m_t / (sqrt(v_t) + eps)
    theta  = theta' - lr * wd * theta'

The reference keeps its own float64 copies of the parameters, m and v, so tests can compare every
state tensor. `storage_dtype` simulates low-precision storage (e.g. bfloat16): the math runs in
float64 and p, m and v are rounded to that dtype after every step — this is "the same reference
run in bf16" of the DESIGN's bf16 tolerance rule.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch


class AdamWRef:
    """Per-tensor float64 AdamW. `params` are the starting values (any dtype); `lrs` optionally
    gives one learning rate per tensor (param groups with different lr)."""

    def __init__(self, params: Sequence[torch.Tensor], lr: float = 1e-3,
                 betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 1e-2,
                 lrs: Optional[Sequence[float]] = None,
                 weight_decays: Optional[Sequence[float]] = None,
                 storage_dtype: torch.dtype = torch.float64, rule: str = "torch"):
        assert rule in ("torch", "apollo"), rule
        self.rule = rule
        self.p = [t.detach().to(torch.float64).clone() for t in params]
        self.p0 = [t.clone() for t in self.p]  # starting values, for displacement comparisons
        self.m = [torch.zeros_like(t) for t in self.p]
        self.v = [torch.zeros_like(t) for t in self.p]
        self.steps = [0 for _ in self.p]
        self.lrs = list(lrs) if lrs is not None else [lr] * len(self.p)
        self.wds = list(weight_decays) if weight_decays is not None else [weight_decay] * len(self.p)
        self.beta1, self.beta2 = betas
        self.eps = eps
        self.storage_dtype = storage_dtype

    def _round(self, t: torch.Tensor) -> torch.Tensor:
        if self.storage_dtype == torch.float64:
            return t
        return t.to(self.storage_dtype).to(torch.float64)

    def step(self, grads: Sequence[Optional[torch.Tensor]], lrs: Optional[Sequence[float]] = None):
        """One step; a None gradient skips that tensor (no step counted), like torch."""
        lrs = list(lrs) if lrs is not None else self.lrs
        b1, b2, eps = self.beta1, self.beta2, self.eps
        for i, g in enumerate(grads):
            if g is None:
                continue
            g = g.detach().to(torch.float64)
            lr, wd = lrs[i], self.wds[i]
            self.steps[i] += 1
            t = self.steps[i]
            m = b1 * self.m[i] + (1 - b1) * g                      # Alg. 2 line 7
            v = b2 * self.v[i] + (1 - b2) * g * g                  # line 8
            if self.rule == "apollo":  # apollo-torch: eps before bias correction, decay after
                p = self.p[i] - lr * (1 - b2 ** t) ** 0.5 / (1 - b1 ** t) * m / (v.sqrt() + eps)
                p = p - lr * wd * p
            else:
                m_hat = m / (1 - b1 ** t)                              # line 9
                v_hat = v / (1 - b2 ** t)                              # line 10
                p = self.p[i] - lr * wd * self.p[i] - lr * m_hat / (v_hat.sqrt() + eps)  # line 12
            self.p[i], self.m[i], self.v[i] = self._round(p), self._round(m), self._round(v)

    def state(self, i: int) -> dict:
        return {"exp_avg": self.m[i], "exp_avg_sq": self.v[i], "step": float(self.steps[i])}
