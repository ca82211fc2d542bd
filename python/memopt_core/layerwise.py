"""Layer-wise stepping: each parameter is stepped inside backward, as soon as its gradient is
complete, and its gradient is freed at once, so the full set of gradients never exists.

    opt = memopt_core.ApolloMini(model, lr=1e-2)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    layerwise = memopt_core.LayerwiseStep(opt, grad_accum=4)
    for micro_batch in loader:
        model(x, y)[1].div(4).backward()   # parameters are stepped here, at the 4th micro-batch
        if layerwise.at_boundary:
            opt.step()                     # a no-op (no gradients left): keeps user code unchanged
            sched.step()                   # schedulers work as usual: group["lr"] is read per step
    layerwise.remove()                     # back to ordinary stepping

What it cannot do: anything that needs all gradients before the update, such as clipping by the
global gradient norm (`clip_grad_norm_`) or a closure that re-evaluates the loss. The gradients
are gone after backward, so `p.grad` is None for every stepped parameter.
"""
from __future__ import annotations

import torch


class LayerwiseStep:
    """Registers a post-accumulate-grad hook on every parameter of `optimizer` that steps that
    parameter (`optimizer.step_params([p])`) on every `grad_accum`-th gradient it accumulates and
    then frees its gradient. Equivalent to calling `optimizer.step()` after the `grad_accum`-th
    backward, parameter by parameter (tested: same trajectory)."""

    def __init__(self, optimizer: torch.optim.Optimizer, grad_accum: int = 1):
        if not hasattr(optimizer, "step_params"):
            raise TypeError(f"{type(optimizer).__name__} cannot step single parameters; "
                            "layer-wise stepping needs a memopt_core optimizer")
        if not getattr(optimizer, "steps_single_params", True):
            raise TypeError(f"{type(optimizer).__name__} chooses its subspace across all tensors "
                            "once per step, so it cannot step parameters one at a time; use "
                            "ordinary step()")
        if int(grad_accum) != grad_accum or grad_accum < 1:
            raise ValueError(f"grad_accum must be a positive integer, got {grad_accum!r}")
        self.optimizer, self.grad_accum = optimizer, int(grad_accum)
        self._accumulated: dict[int, int] = {}
        self._handles = []
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.requires_grad:
                    self._accumulated[id(p)] = 0
                    self._handles.append(p.register_post_accumulate_grad_hook(self._hook))

    def _hook(self, p: torch.Tensor) -> None:
        n = self._accumulated[id(p)] + 1
        if n < self.grad_accum:
            self._accumulated[id(p)] = n
            return
        self._accumulated[id(p)] = 0
        self.optimizer.step_params([p])
        p.grad = None

    @property
    def at_boundary(self) -> bool:
        """True when no parameter holds a partly accumulated gradient (after the last
        micro-batch of an accumulation window)."""
        return not any(self._accumulated.values())

    def state_dict(self) -> dict:
        """The accumulation counters, so a checkpoint taken mid-window resumes exactly."""
        return {"grad_accum": self.grad_accum, "accumulated": list(self._accumulated.values())}

    def load_state_dict(self, state: dict) -> None:
        if state["grad_accum"] != self.grad_accum or len(state["accumulated"]) != len(self._accumulated):
            raise ValueError("layer-wise state is for a different grad_accum or parameter set")
        self._accumulated = dict(zip(self._accumulated, state["accumulated"]))

    def remove(self) -> None:
        """Unregister the hooks: the optimizer steps in `step()` again."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
