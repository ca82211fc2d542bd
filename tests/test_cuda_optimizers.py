"""Every optimizer in the registry gives the same result on CUDA as on the CPU, through the
Python front end (so the CUDA dispatch of every op is exercised as users reach it): a LLaMA with
odd sizes (head_dim 9, intermediate 91, vocabulary 67), 8 steps, parameters and every state
tensor compared, fp32 and bf16 storage, contiguous and non-contiguous gradients."""
from __future__ import annotations

import copy

import pytest
import torch

import memopt_core
from conftest import make_grads, make_llama
from cuda_util import (TOL, assert_cuda_build, non_contiguous, rel_err, requires_cuda,
                       steady_step_bytes)

pytestmark = [pytest.mark.cuda, requires_cuda]

ODD = dict(hidden_size=36, intermediate_size=91, vocab_size=67, num_attention_heads=4,
           num_key_value_heads=2)


def _run(name, model, steps, contiguous):
    opt = memopt_core.OPTIMIZERS[name].make(model, lr=3e-3, weight_decay=0.1)
    params = list(model.parameters())
    for step in range(steps):
        grads = make_grads([p.detach().cpu() for p in params], step)
        for p, g in zip(params, grads):
            g = g.to(p.device)
            p.grad = g if contiguous else non_contiguous(g)
        opt.step()
    if p.is_cuda:
        torch.cuda.synchronize()
    return opt, params


@pytest.mark.parametrize("contiguous", [True, False], ids=["contiguous", "strided_grads"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", list(memopt_core.OPTIMIZERS))
def test_cuda_matches_cpu(name, dtype, contiguous):
    assert_cuda_build()
    cpu_model = make_llama(dtype=dtype, **ODD)
    cuda_model = copy.deepcopy(cpu_model).cuda()
    origin = [p.detach().clone() for p in cpu_model.parameters()]
    cpu_opt, cpu_params = _run(name, cpu_model, 8, contiguous)
    cuda_opt, cuda_params = _run(name, cuda_model, 8, contiguous)
    for i, (pc, pg, o) in enumerate(zip(cpu_params, cuda_params, origin)):
        assert rel_err(pg, pc, origin=o) <= TOL[dtype], f"{name}: parameter {i}"
        cpu_state, cuda_state = cpu_opt.state[pc], cuda_opt.state[pg]
        assert cpu_state.keys() == cuda_state.keys()
        for key, value in cpu_state.items():
            if isinstance(value, torch.Tensor) and value.is_floating_point() and value.numel():
                assert rel_err(cuda_state[key], value) <= TOL[dtype], f"{name}: {key} of {i}"
            elif isinstance(value, torch.Tensor):
                assert torch.equal(cuda_state[key].cpu(), value.cpu()), f"{name}: {key} of {i}"
    assert cuda_opt.state_bytes() == cpu_opt.state_bytes()


def test_cuda_step_allocates_no_parameter_sized_memory():
    """Peak memory during a steady-state step above what it started with stays under 1% of the
    largest parameter, for every optimizer (torch.cuda.max_memory_allocated)."""
    assert_cuda_build()
    for name in memopt_core.OPTIMIZERS:
        model = make_llama(hidden_size=256, intermediate_size=704, vocab_size=4096,
                           num_attention_heads=4, num_key_value_heads=4).cuda()
        opt = memopt_core.OPTIMIZERS[name].make(model, lr=3e-3, weight_decay=0.1)
        params = list(model.parameters())
        for p in params:
            p.grad = torch.randn_like(p)
        extra = steady_step_bytes(opt)
        largest = max(p.numel() * p.element_size() for p in params)
        assert extra <= 0.01 * largest, f"{name}: {extra} bytes during step (largest param "\
            f"{largest} bytes)"
