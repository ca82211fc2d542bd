"""The torch.optim contract, memory, for every optimizer in memopt_core.registry.OPTIMIZERS: no
parameter-sized temporaries during a step (seen by the profiler), a workspace that stops growing
after the first step, exact state bytes (state_bytes, describe, planned_state_bytes)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import memopt_core
from conftest import make_grads, make_llama, set_grads
from contract_util import Wide, _allocations_during, all_params, make, run


def test_profiler_sees_parameter_sized_temporaries():
    """Positive control for the method below: torch's single-tensor Adam allocates a full-size
    denominator each step, and the profiler reports it."""
    w = nn.Parameter(torch.randn(1024, 1024))
    opt = torch.optim.Adam([w], foreach=False)
    w.grad = torch.randn_like(w)
    opt.step()
    sizes = _allocations_during(opt.step)
    assert max(sizes) >= w.numel() * w.element_size()


@pytest.mark.parametrize("threads", [1, None], ids=["1thread", "default_threads"])
def test_no_parameter_sized_temporary_during_step(opt_name, threads):
    old = torch.get_num_threads()
    try:
        if threads:
            torch.set_num_threads(threads)
        model = Wide()
        opt = make(opt_name, model)
        params = list(model.parameters())
        largest = max(p.numel() * p.element_size() for p in params)
        memopt_core._C.workspace_release("cpu")   # earlier tests may have grown it
        run(model, opt, 1)                       # first step: state pool and workspace sized
        grows = memopt_core._C.workspace_stats("cpu")[2]
        set_grads(params, make_grads(params, 1))
        sizes = _allocations_during(opt.step)
        assert all(p in opt.state for p in params if opt._holds_state(p))
        biggest = max(sizes, default=0)
        assert biggest < 0.01 * largest, f"a {biggest}-byte allocation during step ({largest} param)"
        run(model, opt, 2, start=2)
        capacity, _, grows_after = memopt_core._C.workspace_stats("cpu")
        assert grows_after == grows, "workspace grew after the first step"
        # scratch an optimizer declares (APOLLO: one tile of its projected gradient, r-sized)
        declared = opt.scratch_bytes() if hasattr(opt, "scratch_bytes") else 0
        assert declared < 0.5 * largest, f"declared scratch of {declared} bytes"
        assert capacity < 0.01 * largest + declared, f"workspace of {capacity} bytes for contiguous grads"
    finally:
        torch.set_num_threads(old)


def test_state_bytes_is_the_sum_of_state_tensors_and_describe_lists_each(opt_name):
    model = make_llama(seed=32)
    opt = make(opt_name, model)
    text_before = opt.describe()
    run(model, opt, 1)
    total = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values()
                if isinstance(t, torch.Tensor))
    assert opt.state_bytes() == total > 0
    # describe(): one row per tensor, and its byte column adds up to the real state bytes
    params = all_params(opt)
    rows = [ln for ln in opt.describe().splitlines()[1:-1] if ln.strip()]
    assert len(rows) == len(params)
    row_bytes = sum(int(ln.split()[-1].replace(",", "")) for ln in rows)
    assert row_bytes == opt.state_bytes()
    assert text_before == opt.describe()       # describe() predicts the state before it exists
    for p, ln in zip(params, rows):
        shape = "x".join(map(str, p.shape))
        assert shape in ln.split()
        own = sum(t.numel() * t.element_size() for t in opt.state[p].values())
        assert int(ln.split()[-1].replace(",", "")) == own


def test_planned_state_bytes_match_the_state_after_a_step(opt_name):
    model = make_llama()
    opt = make(opt_name, model)
    planned = opt.planned_state_bytes()
    run(model, opt, 2)
    assert planned == opt.state_bytes()
