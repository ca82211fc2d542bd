"""Float64 pure-PyTorch SlimAdam: the oracle for memopt_core.SlimAdam.

Written from Kalra et al., "When Can You Get Away with Low Memory Adam?" (arXiv 2503.01843), §3
(compressing Adam's second moment along dims K by its mean) and the authors' SlimAdamW.step
(dayal-kalra/low-memory-adam, utils/slimadam.py), in the reference's order of operations:

    mu = b1*mu + (1-b1)*g
    nu = b2*nu + (1-b2)*mean(g*g, dim=K, keepdim=True)      # K = compress dims; None: g*g
    if wd > 0 and p.dim() >= 2: p *= 1 - lr*wd              # decoupled decay, >= 2-D tensors
    t += 1;  mu_hat = mu/(1-b1^t);  nu_hat = nu/(1-b2^t)
    p -= lr * mu_hat / (sqrt(nu_hat) + eps)                 # nu broadcasts over K

A rule is None (uncompressed), a tuple of dims K, or a split: a list of (axis, start, stop, K)
parts, each a slice of the tensor along `axis` with its own K (a fused [q; k; v] weight with
the paper's rules for its q, k and v parts). v is kept in the reference's keepdim shape;
`state(i)["exp_avg_sq"]` flattens it (parts concatenated in order), the order memopt stores.
Nothing here uses memopt's segments. `storage_dtype` rounds p, mu and nu to that dtype after
every step (the DESIGN's "same reference run in bf16").
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch


def _mean_sq(g: torch.Tensor, dims) -> torch.Tensor:
    return g * g if dims is None else (g * g).mean(dim=tuple(dims), keepdim=True)


class SlimAdamRef:
    def __init__(self, entries: Sequence[tuple], lr: float = 1e-3, betas=(0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0,
                 storage_dtype: torch.dtype = torch.float64):
        """entries: (param, rule) per tensor; decay follows the reference (p.dim() >= 2)."""
        self.p = [p.detach().to(torch.float64).clone() for p, _ in entries]
        self.p0 = [t.clone() for t in self.p]
        self.rules = [rule for _, rule in entries]
        self.m = [torch.zeros_like(t) for t in self.p]
        self.nu = [self._parts(torch.zeros_like(t), rule) for t, rule in zip(self.p, self.rules)]
        self.steps = [0] * len(self.p)
        self.lr, (self.beta1, self.beta2), self.eps, self.wd = lr, betas, eps, weight_decay
        self.storage_dtype = storage_dtype

    @staticmethod
    def _slices(rule):
        return rule if isinstance(rule, list) else [(0, None, None, rule)]

    def _parts(self, g, rule):
        """nu's value for g: one keepdim mean per part."""
        out = []
        for axis, start, stop, dims in self._slices(rule):
            sub = g if start is None else g.narrow(axis, start, stop - start)
            out.append(_mean_sq(sub, dims))
        return out

    def _round(self, t):
        return t if self.storage_dtype == torch.float64 else t.to(self.storage_dtype).to(torch.float64)

    def step(self, grads: Sequence[Optional[torch.Tensor]], lrs: Optional[Sequence[float]] = None):
        b1, b2 = self.beta1, self.beta2
        for i, g in enumerate(grads):
            if g is None:
                continue
            lr = self.lr if lrs is None else lrs[i]
            g = g.detach().to(torch.float64)
            p = self.p[i]
            m = b1 * self.m[i] + (1 - b1) * g
            nu = [b2 * n + (1 - b2) * s for n, s in zip(self.nu[i], self._parts(g, self.rules[i]))]
            if self.wd > 0 and p.dim() >= 2:
                p = p * (1 - lr * self.wd)
            self.steps[i] += 1
            t = self.steps[i]
            m_hat = m / (1 - b1 ** t)
            upd = torch.empty_like(p)
            for (axis, start, stop, _), n in zip(self._slices(self.rules[i]), nu):
                nu_hat = n / (1 - b2 ** t)
                mh = m_hat if start is None else m_hat.narrow(axis, start, stop - start)
                piece = mh / (nu_hat.sqrt() + self.eps)
                (upd if start is None else upd.narrow(axis, start, stop - start)).copy_(piece)
            self.p[i] = self._round(p - lr * upd)
            self.m[i] = self._round(m)
            self.nu[i] = [self._round(n) for n in nu]

    @property
    def v(self):
        """Flat v per tensor (parts concatenated), as memopt stores exp_avg_sq."""
        return [torch.cat([n.reshape(-1) for n in parts]) for parts in self.nu]

    def state(self, i: int) -> dict:
        return {"exp_avg": self.m[i], "exp_avg_sq": self.v[i], "step": float(self.steps[i])}
