"""Shared by the torch.optim contract tests (tests/test_optimizer_contract*.py): building a
registry optimizer with the contract's hyperparameters, stepping it on conftest's deterministic
gradients, and the memory probes (a model with one parameter-sized weight, the allocations the
profiler sees while a function runs)."""
from __future__ import annotations

from torch import nn

import memopt_core
from conftest import make_grads, set_grads

HP = dict(lr=3e-3, weight_decay=0.1)


def make(opt_name, model, **kw):
    return memopt_core.OPTIMIZERS[opt_name].make(model, **{**HP, **kw})


def all_params(opt):
    return [p for g in opt.param_groups for p in g["params"]]


def run(model, opt, steps, start=0, grads_fn=make_grads):
    params = list(model.parameters())
    for step in range(start, start + steps):
        set_grads(params, grads_fn(params, step))
        opt.step()


class Wide(nn.Module):
    """A 1M-element weight among small tensors (names the partitioners understand)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(64, 32)
        self.mlp = nn.Module()
        self.mlp.up_proj = nn.Linear(1024, 1024, bias=False)
        self.mlp.down_proj = nn.Linear(32, 64)
        self.norm = nn.LayerNorm(32)


def _allocations_during(fn):
    """Sizes of every CPU allocation the profiler sees while fn runs (kineto memory events)."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = prof.profiler.kineto_results.events()
    return [e.nbytes() for e in events if e.name() == "[memory]" and e.nbytes() > 0]
