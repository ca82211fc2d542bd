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

Distributed:
- FSDP2 (DTensor parameters): nothing to pass. FSDP2 runs the post-accumulate-grad hooks on the
  sharded parameter after its reduce-scatter, so each shard steps on the reduced gradient.
  `grad_accum` counts those reductions: reduce every micro-batch, or skip the sync
  (`set_requires_gradient_sync(False)`) on the first K-1 and pass grad_accum=1.
- DDP: pass the DDP module, `LayerwiseStep(opt, grad_accum=K, ddp=ddp_model)`. Its hooks fire
  on the local gradient before DDP's all-reduce, so stepping there would step unreduced
  gradients; instead a DDP comm hook all-reduces each bucket and steps the bucket's parameters
  on the reduced gradient. `grad_accum` counts micro-batches (backward passes), with or without
  `no_sync()` on the first K-1; the K-th must run outside `no_sync()`.
- Any other multi-process setup with plain-tensor parameters is refused, unless the gradients
  are already the same on every rank when they are accumulated (`grads_reduced=True`).

What it cannot do: anything that needs all gradients before the update, such as clipping by the
global gradient norm (`clip_grad_norm_`) or a closure that re-evaluates the loss. The gradients
are gone after backward, so `p.grad` is None for every stepped parameter.
"""
from __future__ import annotations

import threading

import torch
import torch.distributed as dist

from .distributed import is_dtensor


def _multi_process() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _queue_after_backward(fn) -> None:
    """Run `fn` at the end of the current backward, after DDP's own end-of-backward callback
    (which writes the reduced buckets back into .grad). That callback is queued during backward,
    after ours, so ours queues `fn` again from inside the callback phase: callbacks queued there
    run after every one queued before."""
    engine = torch.autograd.Variable._execution_engine
    engine.queue_callback(lambda: engine.queue_callback(fn))


class LayerwiseStep:
    """Registers a post-accumulate-grad hook on every parameter of `optimizer` that steps that
    parameter (`optimizer.step_params([p])`) on every `grad_accum`-th gradient it accumulates and
    then frees its gradient. Equivalent to calling `optimizer.step()` after the `grad_accum`-th
    backward, parameter by parameter (tested: same trajectory, also under DDP and FSDP2)."""

    def __init__(self, optimizer: torch.optim.Optimizer, grad_accum: int = 1, *, ddp=None,
                 grads_reduced: bool = False):
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
        params = [p for g in optimizer.param_groups for p in g["params"] if p.requires_grad]
        self._params = params
        self._ddp = None
        if ddp is not None:
            self._attach_ddp(ddp, params)
        elif not grads_reduced and _multi_process() and not all(is_dtensor(p) for p in params):
            raise RuntimeError(
                "LayerwiseStep in a multi-process run steps each parameter as soon as its local "
                "gradient is accumulated, before any data-parallel all-reduce: every rank would "
                "step its own unreduced gradient and the ranks would diverge silently. Under "
                "DDP pass the DDP module: LayerwiseStep(opt, ddp=ddp_model). FSDP2 (fully_shard) "
                "parameters need nothing. If your gradients are already identical on every rank "
                "when accumulated (e.g. you reduce them yourself in a hook), pass "
                "grads_reduced=True.")
        self._accumulated: dict[int, int] = {id(p): 0 for p in params}
        hook = self._count_backward if self._ddp is not None else self._hook
        self._handles = [p.register_post_accumulate_grad_hook(hook) for p in params]

    # ---- single process, FSDP2, or gradients reduced before accumulation -----------------
    def _hook(self, p: torch.Tensor) -> None:
        n = self._accumulated[id(p)] + 1
        if n < self.grad_accum:
            self._accumulated[id(p)] = n
            return
        self._accumulated[id(p)] = 0
        self.optimizer.step_params([p])
        p.grad = None

    # ---- DDP ------------------------------------------------------------------------------
    def _attach_ddp(self, ddp, params) -> None:
        from torch.nn.parallel import DistributedDataParallel
        if not isinstance(ddp, DistributedDataParallel):
            raise TypeError(f"ddp= must be the DistributedDataParallel module, got "
                            f"{type(ddp).__name__}")
        managed = {id(p) for n, p in ddp.module.named_parameters()
                   if n not in ddp.parameters_to_ignore}
        outside = [p for p in params if id(p) not in managed]
        if outside:
            raise ValueError(
                f"{len(outside)} parameter(s) of the optimizer (first of shape "
                f"{tuple(outside[0].shape)}) are not reduced by this DDP module, so their "
                "gradients would stay local to each rank; optimize only the DDP module's "
                "parameters, or wrap the rest in DDP too")
        # A parameter whose gradient is None after DDP's reduction is not stepped by step();
        # with unused parameters (or static_graph's first iteration) that is known only at the
        # end of backward, so those runs step there; otherwise each bucket steps as soon as
        # its all-reduce completes, overlapping the step with the rest of backward.
        self._step_at_end = bool(ddp.find_unused_parameters or ddp.static_graph)
        self._ddp, self._group = ddp, ddp.process_group
        self._ids = {id(p) for p in params}
        self._lock = threading.Lock()  # bucket callbacks run on the communication threads
        self._micro, self._in_backward, self._reduced = 0, False, False
        ddp.register_comm_hook(None, self._comm_hook)

    def _count_backward(self, p: torch.Tensor) -> None:
        """Post-accumulate-grad hook under DDP: counts backward passes (micro-batches), once
        per backward, and arranges the end-of-backward bookkeeping. Runs before DDP's own
        hook of the same parameter, so a bucket's comm hook sees this backward's count."""
        if self._in_backward:
            return
        self._in_backward, self._micro = True, self._micro + 1
        _queue_after_backward(self._end_backward)

    def _comm_hook(self, state, bucket):
        """DDP's default all-reduce (mean over the process group); at a window's last
        micro-batch the bucket's parameters are stepped on the reduced gradient when it
        arrives, with p.grad set to its bucket view, so DDP's write-back copies in place."""
        fut = dist.all_reduce(bucket.buffer().div_(self._group.size()), group=self._group,
                              async_op=True).get_future()
        self._reduced = True
        if not self._handles or self._step_at_end or self._micro < self.grad_accum:
            return fut.then(lambda f: f.value()[0])
        pairs = [(p, g) for p, g in zip(bucket.parameters(), bucket.gradients())
                 if id(p) in self._ids]

        def step(f):
            result = f.value()[0]  # raises if the all-reduce failed
            with self._lock:
                for p, g in pairs:
                    p.grad = g
                self.optimizer.step_params([p for p, _ in pairs])
            return result
        return fut.then(step)

    def _end_backward(self) -> None:
        """After DDP has written the reduced gradients back: at a window's end, step what is
        left to step (unused-parameter runs) and free every gradient, so that a following
        opt.step() finds none and is a true no-op."""
        self._in_backward, reduced, self._reduced = False, self._reduced, False
        if not self._handles or self._micro < self.grad_accum:
            return
        self._micro = 0
        if not reduced:
            raise RuntimeError(
                f"LayerwiseStep(grad_accum={self.grad_accum}): the backward that ends the "
                "accumulation window ran inside ddp.no_sync(), so no gradient was reduced and "
                "nothing was stepped (the local gradients are kept). Run the last micro-batch "
                "of each window outside no_sync(), or check grad_accum.")
        if self._step_at_end:
            with self._lock:
                self.optimizer.step_params([p for p in self._params if p.grad is not None])
        for p in self._params:
            p.grad = None

    # ---- common ---------------------------------------------------------------------------
    @property
    def at_boundary(self) -> bool:
        """True when no parameter holds a partly accumulated gradient (after the last
        micro-batch of an accumulation window)."""
        if self._ddp is not None:
            return self._micro == 0
        return not any(self._accumulated.values())

    def state_dict(self) -> dict:
        """The accumulation counters, so a checkpoint taken mid-window resumes exactly."""
        if self._ddp is not None:
            return {"grad_accum": self.grad_accum, "accumulated": [self._micro] * len(self._params)}
        return {"grad_accum": self.grad_accum, "accumulated": list(self._accumulated.values())}

    def load_state_dict(self, state: dict) -> None:
        if state["grad_accum"] != self.grad_accum or len(state["accumulated"]) != len(self._accumulated):
            raise ValueError("layer-wise state is for a different grad_accum or parameter set")
        if self._ddp is not None:
            if len(set(state["accumulated"])) > 1:
                raise ValueError("layer-wise state has per-parameter counters; under DDP every "
                                 "parameter is at the same micro-batch")
            self._micro = state["accumulated"][0] if state["accumulated"] else 0
        self._accumulated = dict(zip(self._accumulated, state["accumulated"]))

    def remove(self) -> None:
        """Unregister the hooks: the optimizer steps in `step()` again. (DDP cannot unregister
        a comm hook; ours then only all-reduces, as DDP's default does.)"""
        for h in self._handles:
            h.remove()
        self._handles.clear()
