"""Float64 pure-PyTorch FRUGAL: the oracle for memopt_core.Frugal.

Written from Zmushko et al., "FRUGAL: Memory-Efficient Optimization by Reducing State Overhead
for Scalable Training" (arXiv 2411.07837), Algorithm 1 (a gradient split into a state-full
subspace updated by AdamW and a state-free complement updated by signSGD) and §3-4 (block-wise,
column-wise and projection subspaces), and from the behaviour of the upstream code
(frugal/proj_optimizer_templates.py, coordinate_projector.py, galore_projector.py, adamw.py):

    every tensor with a gradient:   p <- p * (1 - lr*wd)
    non-projectable:                p <- p - lr * AdamW(g)
    projectable:   g_s = down(g)    p <- p - lr*ps * up(AdamW(g_s)) - lr*ps*fs * sign(g - up(g_s))
    AdamW(x) = m_hat / (sqrt(v)/sqrt(1 - b2^t) + eps) / (1 - b1^t) with m, v EMAs of x.

Subspaces are re-chosen every `update_gap` steps: blocks in upstream's orders (descending starts
at the last tensor; ascending; mirror; random = randperm(N)[:k]); columns / rows / random
coordinates = randperm(n)[:int(n*rho)]; projections of rank round(rho * compressed side) from
the SVD of the current gradient, torch.nn.init.orthogonal_, or a permutation matrix. Two
documented choices of memopt_core that the reference shares (the math is written here
independently of the C++ code): random draws come from one generator in optimizer order, and
index sets are kept sorted; a block that stays active across a re-selection keeps its state
(upstream clears it), so density 1 is AdamW.
"""
from __future__ import annotations

import torch


class FrugalRef:
    def __init__(self, params, projectable, lr=1e-3, betas=(0.9, 0.999), eps=1e-8,
                 weight_decay=0.0, density=0.25, update_gap=200, selection="block",
                 block_order="descending", state_free="sign_sgd", state_free_lr_scale=1.0,
                 proj_params_lr_scale=1.0, reset_statistics=True, seed=0,
                 storage_dtype=torch.float64):
        self.p = [t.detach().to(torch.float64).clone() for t in params]
        self.p0 = [t.clone() for t in self.p]
        self.proj = list(projectable)
        self.lr, (self.b1, self.b2), self.eps, self.wd = lr, betas, eps, weight_decay
        self.density, self.gap, self.selection = density, update_gap, selection
        self.order, self.rule = block_order, state_free
        self.fs, self.ps, self.reset = state_free_lr_scale, proj_params_lr_scale, reset_statistics
        self.gen = torch.Generator().manual_seed(seed)
        self.dtype = storage_dtype
        self.state = [None] * len(self.p)     # dict(exp_avg, exp_avg_sq, step[, subspace])
        self.t = 0
        self.pidx = [i for i, f in enumerate(self.proj) if f]  # block number -> tensor index
        n = len(self.pidx)
        self.k = round(n * density)
        self.next = None
        self.active = self._blocks() if selection == "block" else set()
        self.cycle = [-1] * len(self.p)

    # upstream BlockOptimizer._update_states, minus the reset of blocks that stay active
    def _blocks(self):
        n, k = len(self.pidx), self.k
        if self.order == "random":
            return set(torch.randperm(n, generator=self.gen)[:k].tolist())
        if self.order == "ascending":
            s = 0 if self.next is None else self.next
            out = {i % n for i in range(s, s + k)}
            self.next = s + k - n if s + k >= n else s + k
        elif self.order == "descending":
            s = n - 1 if self.next is None else self.next
            out = {i % n for i in range(s, s - k, -1)}
            self.next = s - k + n if s - k < 0 else s - k
        elif self.order == "mirror":
            half, s = n // 2, 0 if self.next is None else self.next
            out = set()
            for i in range(s, s + k // 2):
                out |= {i % half, n - 1 - i % half}
            self.next = s + k // 2 - half if s + k // 2 >= half else s + k // 2
        return out

    def _round(self, t):
        return t if self.dtype == torch.float64 else t.to(self.dtype).to(torch.float64)

    def _new_subspace(self, i, g):
        sel, d = self.selection, self.density
        rows = g.shape[0]
        if sel in ("columns", "rows", "randk"):
            total = {"columns": g.shape[-1], "rows": rows, "randk": g.numel()}[sel]
            k = int(total * d)
            return torch.randperm(total, generator=self.gen)[:k].sort().values if k else None
        cols = g.shape[1]
        right = rows >= cols
        r = round((cols if right else rows) * d)
        if r == 0:
            return None
        if sel == "svd":
            U, _, Vh = torch.linalg.svd(g, full_matrices=False)
            return Vh[:r] if right else U[:, :r]
        if sel == "random":
            shape = (r, cols) if right else (rows, r)
            return torch.nn.init.orthogonal_(torch.empty(shape), generator=self.gen).double()
        n = cols if right else rows  # randperm: part of a permutation matrix
        eye = torch.zeros(n, n, dtype=torch.float64)
        eye[torch.arange(n), torch.randperm(n, generator=self.gen)] = 1.0
        return eye[:r] if right else eye[:, :r]

    def _down(self, g, sub):
        sel = self.selection
        if sel == "columns":
            return g[:, sub]
        if sel == "rows":
            return g[sub]
        if sel == "randk":
            return g.reshape(-1)[sub]
        return g @ sub.T if g.shape[0] >= g.shape[1] else sub.T @ g

    def _up(self, low, sub, shape):
        sel = self.selection
        if sel in ("columns", "rows", "randk"):
            full = torch.zeros(shape, dtype=torch.float64)
            if sel == "columns":
                full[:, sub] = low
            elif sel == "rows":
                full[sub] = low
            else:
                full.view(-1)[sub] = low
            return full
        return low @ sub if shape[0] >= shape[1] else sub @ low

    def _adam(self, st, g, lr):
        st["step"] += 1
        st["exp_avg"] = self._round(self.b1 * st["exp_avg"] + (1 - self.b1) * g)
        st["exp_avg_sq"] = self._round(self.b2 * st["exp_avg_sq"] + (1 - self.b2) * g * g)
        t = st["step"]
        denom = st["exp_avg_sq"].sqrt() / (1 - self.b2 ** t) ** 0.5 + self.eps
        return lr / (1 - self.b1 ** t) * st["exp_avg"] / denom

    def _free(self, r):
        return {"sign_sgd": torch.sign, "sgd": lambda x: x, None: torch.zeros_like}[self.rule](r)

    @staticmethod
    def _zeros(like):
        return dict(exp_avg=torch.zeros_like(like), exp_avg_sq=torch.zeros_like(like), step=0)

    def step(self, grads, lr=None):
        lr = self.lr if lr is None else lr
        if all(g is None for g in grads):
            return
        cycle = self.t // self.gap
        if self.selection == "block" and self.t > 0 and self.t % self.gap == 0:
            new = self._blocks()
            for b, i in enumerate(self.pidx):
                if b not in new:
                    self.state[i] = None
            self.active = new
        for i, g in enumerate(grads):
            if g is None:
                continue
            g = g.to(torch.float64)
            p = self.p[i] * (1 - lr * self.wd)
            if not self.proj[i]:
                self.state[i] = self.state[i] or self._zeros(g)
                p = p - self._adam(self.state[i], g, lr)
            elif self.selection == "block":
                if self.pidx.index(i) in self.active:
                    self.state[i] = self.state[i] or self._zeros(g)
                    p = p - self._adam(self.state[i], g, lr * self.ps)
                else:
                    p = p - lr * self.ps * self.fs * self._free(g)
            else:
                if self.cycle[i] != cycle:
                    self.cycle[i] = cycle
                    sub = self._new_subspace(i, g)
                    if sub is not None:
                        old = self.state[i]
                        low = self._down(g, sub)
                        st = old if old is not None and not self.reset else self._zeros(low)
                        self.state[i] = dict(st, subspace=sub)
                st = self.state[i]
                if st is None:
                    p = p - lr * self.ps * self.fs * self._free(g)
                else:
                    low = self._down(g, st["subspace"])
                    upd = self._up(self._adam(st, low, lr * self.ps), st["subspace"], g.shape)
                    resid = g - self._up(low, st["subspace"], g.shape)
                    p = p - upd - lr * self.ps * self.fs * self._free(resid)
            self.p[i] = self._round(p)
        self.t += 1
