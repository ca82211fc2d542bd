"""torch.ops.memopt.frugal_ on CUDA (cpp/src/cuda/frugal.cu) at the op level, against the CPU op
on identical inputs and against the float64 reference math (tests/reference/frugal_ref.py): every
mode (AdamW, active / state-free block, columns, rows, randk, right / left projections on SVD,
random-orthogonal and permutation bases), every state-free rule, 8 steps, odd sizes, fp32 / bf16 /
fp16 / fp64, non-contiguous gradients, many tensors per call. Each comparison runs per device:
"emu" runs the real CUDA kernels and glue on the host (tools/cuda_emu: an emulated CUDA runtime),
so CI checks them without a GPU; "cuda" needs a GPU and a CUDA build of memopt_core. The cases,
the runs of the op and of the reference, and the comparisons are in cuda_frugal_util.py."""
from __future__ import annotations

import copy

import pytest
import torch

import memopt_core
from conftest import make_grads, make_llama
from cuda_frugal_util import (ALL_MODES, BIG_PROJECTIONS, COLUMNS, DTYPES, EDGES, FREE, HP, LEFT,
                              RANDK, RIGHT, ROWS, RULES, assert_matches, check_all, check_device,
                              device_op, grads_at, make_case, run_op, run_reference, scalars)
from cuda_util import EMU, TOL, assert_cuda_build, rel_err, requires_cuda, tensor_device

DEVICES = [EMU, pytest.param("cuda", marks=[pytest.mark.cuda, requires_cuda])]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("rule", list(RULES))
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16", "fp16", "fp64"])
def test_every_mode_and_rule(device, dtype, rule):
    check_all(device, ALL_MODES, dtype, rule)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("rule", list(RULES))
def test_projections_in_several_chunks(device, rule):
    check_all(device, BIG_PROJECTIONS, torch.float32, rule)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_non_contiguous_grads_lr_and_steps_on_device(device, dtype):
    check_all(device, ALL_MODES, dtype, "sign_sgd", contiguous=False, on_device=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("rule", list(RULES))
def test_empty_and_full_subspaces(device, rule):
    check_all(device, EDGES, torch.float32, rule)


@pytest.mark.parametrize("device", DEVICES)
def test_rule_none_without_weight_decay_leaves_free_tensors(device):
    check_all(device, ALL_MODES, torch.float32, None, hp={**HP, "weight_decay": 0.0})


@pytest.mark.parametrize("device", DEVICES)
def test_many_tensors_several_launches(device):
    """48 tensors (over a launch's tensor limit) and a rows split of 331 tiles (over a launch's
    chunk limit, so one tensor continues in the next launch)."""
    check_all(device, ALL_MODES * 3 + [(ROWS, (331 * 4096 + 77, 1), 0.5), (FREE, (5, 3))],
              torch.float32, "sign_sgd")


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_params_with_fp32_state(device):
    check_device(device)
    case = make_case(ALL_MODES, torch.bfloat16, state_dtype=torch.float32)
    ours = run_op(device, case, "sign_sgd")
    cpu = run_op("cpu", case, "sign_sgd", op=torch.ops.memopt.frugal_)
    assert_matches(ours, cpu, case, TOL[torch.bfloat16], f"{device} vs the CPU op",
                   run_reference(case, "sign_sgd")["ambiguous"])


@pytest.mark.parametrize("device", DEVICES)
def test_bad_input_raises_before_any_write(device):
    check_device(device)
    case = make_case(ALL_MODES, torch.float32)
    case["m"][-1] = case["m"][-1][:-1]  # the last tensor's state has the wrong shape
    where = tensor_device(device)
    t = {k: [x.to(where, copy=True) for x in v] for k, v in case.items() if k != "modes"}
    before = {k: [x.clone() for x in v] for k, v in t.items()}
    grads = [g.to(where) for g in grads_at(case, 0)]
    with pytest.raises(ValueError, match="exp_avg"):
        device_op(device)(t["params"], grads, t["m"], t["v"], t["steps"], t["subs"],
                          case["modes"], torch.tensor(HP["lr"]), *scalars("sign_sgd", HP)[1:])
    for k in t:
        assert all(torch.equal(a, b) for a, b in zip(t[k], before[k])), f"{k} changed"


@pytest.mark.cuda
@requires_cuda
def test_cuda_rejects_indices_on_the_cpu():
    assert_cuda_build()
    case = make_case([(COLUMNS, (8, 6), 0.5)], torch.float32)
    t = {k: [x.cuda() for x in v] for k, v in case.items() if k != "modes"}
    before = t["params"][0].clone()
    with pytest.raises((TypeError, ValueError), match="subspace"):  # the CPU check's TypeError
        torch.ops.memopt.frugal_(t["params"], [torch.ones(8, 6, device="cuda")], t["m"], t["v"],
                                 case["steps"], case["subs"], case["modes"],
                                 torch.tensor(HP["lr"]), *scalars("sign_sgd", HP)[1:])
    assert torch.equal(t["params"][0], before) and case["steps"][0].item() == 0


@pytest.mark.cuda
@requires_cuda
def test_projections_stay_fp32_when_tf32_is_allowed():
    """The op turns TF32 off for its GEMMs: with torch allowing it, results still match the CPU
    within fp32 rounding (TF32 would be ~1e-3 off)."""
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        check_all("cuda", BIG_PROJECTIONS + ALL_MODES[-4:], torch.float32, "sign_sgd")
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("mode,spec,limit", [
    ("free", (FREE, (1024, 1024)), 0.01), ("columns", (COLUMNS, (1024, 1024), 0.25), 0.01),
    ("rows", (ROWS, (1024, 1024), 0.25), 0.01), ("randk", (RANDK, (1024, 1024), 0.25), 0.01),
    # scratch (1 + rho) * 2 / 8 of the tensor in fp32: 31% of an fp32 parameter's bytes
    ("svd", (RIGHT, (2048, 1024), 0.25, "svd"), 0.35),
    ("random", (LEFT, (1024, 2048), 0.25, "random"), 0.35)])
def test_step_allocates_no_parameter_sized_memory(mode, spec, limit):
    assert_cuda_build()
    case = make_case([spec], torch.float32)
    t = {k: [x.cuda() for x in v] for k, v in case.items() if k != "modes"}
    grads = [g.cuda() for g in grads_at(case, 0)]
    args = (t["params"], grads, t["m"], t["v"], case["steps"], t["subs"], case["modes"],
            torch.tensor(HP["lr"]), *scalars("sign_sgd", HP)[1:])
    torch.ops.memopt.frugal_(*args)
    torch.cuda.synchronize()
    start = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    torch.ops.memopt.frugal_(*args)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - start
    size = t["params"][0].numel() * 4
    assert extra <= limit * size, f"{mode}: {extra} bytes during a step of a {size}-byte tensor"


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("selection", ["columns", "rows", "randk", "random", "randperm"])
def test_optimizer_selections_match_cpu(selection):
    """memopt_core.Frugal with a non-block selection on CUDA as on the CPU, 8 steps across two
    re-selections (subspaces are drawn on the CPU generator and moved to the parameters'
    device). SVD bases are left out: CPU and GPU SVDs differ in signs and rounding."""
    assert_cuda_build()
    cpu_model = make_llama(hidden_size=36, intermediate_size=91, vocab_size=67,
                           num_attention_heads=4, num_key_value_heads=2)
    cuda_model = copy.deepcopy(cpu_model).cuda()
    origin = [q.detach().clone() for q in cpu_model.parameters()]
    runs = []
    for model in (cpu_model, cuda_model):
        opt = memopt_core.Frugal(model, lr=3e-3, weight_decay=0.1, density=0.25, update_gap=3,
                                 selection=selection, seed=7)
        params = list(model.parameters())
        for step in range(8):
            for q, g in zip(params, make_grads([q.detach().cpu() for q in params], step)):
                q.grad = g.to(q.device)
            opt.step()
        runs.append((opt, params))
    (cpu_opt, cpu_params), (cuda_opt, cuda_params) = runs
    for i, (pc, pg, o) in enumerate(zip(cpu_params, cuda_params, origin)):
        assert rel_err(pg, pc, origin=o) <= TOL[torch.float32], f"parameter {i}"
        assert cpu_opt.state[pc].keys() == cuda_opt.state[pg].keys()
        for key, value in cpu_opt.state[pc].items():
            other = cuda_opt.state[pg][key].cpu()
            if value.is_floating_point() and key != "subspace":
                assert rel_err(other, value) <= TOL[torch.float32], f"{key} of {i}"
            else:
                assert torch.equal(other, value), f"{key} of {i}"
