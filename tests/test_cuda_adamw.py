"""torch.ops.memopt.adamw_ on CUDA (cpp/src/cuda/adamw.cu) at the op level, against the CPU op on
identical inputs and the float64 reference, under both rules (torch.optim.AdamW's and
apollo-torch's): odd sizes, every storage pair, strided gradients, more tensors than one launch
holds, a bad rule refused before any write. "emu" runs the kernel and glue on the host
(tools/cuda_emu), "cuda" on a GPU (skipped without one)."""
from __future__ import annotations

import math

import pytest
import torch

from conftest import assert_close, rounding_atol
from cuda_util import EMU, TOL, assert_cuda_build, non_contiguous, ops, requires_cuda, tensor_device
from reference.adamw_ref import AdamWRef

CUDA = pytest.param("cuda", marks=[pytest.mark.cuda, requires_cuda])
STEPS, LR, BETAS, EPS, WD = 8, 1e-2, (0.9, 0.99), 1e-8, 0.1
ODD = [(7, 13), (5,), (3, 4, 5), (1,), (0,), (129,), (33, 65)]
MANY = [(100 + 7 * i,) for i in range(30)] + [(3, 70001)]  # 31 tensors: two launches of 24
PAIRS = {"fp32": (torch.float32, torch.float32), "bf16": (torch.bfloat16, torch.bfloat16),
         "bf16_fp32_state": (torch.bfloat16, torch.float32), "fp16": (torch.float16, torch.float16),
         "fp64": (torch.float64, torch.float64)}


RULES = ["torch", "apollo"]


def run(device, shapes, dtype, state_dtype, contiguous=True, rule="torch"):
    where = tensor_device(device)
    gen = torch.Generator().manual_seed(0)
    start = [torch.randn(s, generator=gen).to(dtype) for s in shapes]
    p = [t.clone().to(where) for t in start]
    m = [torch.zeros(s, dtype=state_dtype, device=where) for s in shapes]
    v = [torch.zeros(s, dtype=state_dtype, device=where) for s in shapes]
    steps = [torch.zeros((), dtype=torch.float32) for _ in shapes]
    grads = []
    for step in range(STEPS):
        g = [(torch.randn(s, generator=gen) * (0.5 + step % 3) * 1e-2).to(dtype) for s in shapes]
        grads.append(g)
        gd = [t.to(where) if contiguous else non_contiguous(t.to(where)) for t in g]
        ops(device).adamw_(p, gd, m, v, steps, torch.tensor(LR, dtype=torch.float64), *BETAS, EPS, WD,
                           rule)
    assert all(float(s) == STEPS for s in steps)
    return start, grads, [[t.cpu() for t in ts] for ts in (p, m, v)]


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("contiguous", [True, False], ids=["contiguous", "strided_grads"])
@pytest.mark.parametrize("pair", list(PAIRS))
@pytest.mark.parametrize("device", [EMU, CUDA])
def test_matches_cpu_op_and_reference(device, pair, contiguous, rule):
    if device == "cuda":
        assert_cuda_build()
    dtype, state_dtype = PAIRS[pair]
    start, grads, ours = run(device, ODD, dtype, state_dtype, contiguous, rule)
    _, _, cpu = run("cpu", ODD, dtype, state_dtype, contiguous, rule)
    sized = [i for i, s in enumerate(ODD) if math.prod(s)]  # (0,) only has to pass through
    for i in sized:
        s = ODD[i]
        assert_close(ours[0][i], cpu[0][i], TOL[dtype], f"{s} param", origin=start[i],
                     atol=rounding_atol(cpu[0][i], STEPS))
        for j, what in ((1, "exp_avg"), (2, "exp_avg_sq")):
            assert_close(ours[j][i], cpu[j][i], TOL[state_dtype], f"{s} {what}")
    if dtype in (torch.float32, torch.float64):
        ref = AdamWRef(start, lr=LR, betas=BETAS, eps=EPS, weight_decay=WD, rule=rule)
        for g in grads:
            ref.step(g)
        rtol = 1e-5 if dtype == torch.float32 else 1e-10
        for i in sized:
            s = ODD[i]
            assert_close(ours[0][i], ref.p[i], rtol, f"{s} param vs float64", origin=start[i],
                         atol=rounding_atol(ours[0][i], STEPS))
            assert_close(ours[1][i], ref.m[i], rtol, f"{s} exp_avg vs float64")
            assert_close(ours[2][i], ref.v[i], rtol, f"{s} exp_avg_sq vs float64")


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("device", [EMU, CUDA])
def test_more_tensors_than_one_launch(device, rule):
    if device == "cuda":
        assert_cuda_build()
    start, _, ours = run(device, MANY, torch.float32, torch.float32, rule=rule)
    _, _, cpu = run("cpu", MANY, torch.float32, torch.float32, rule=rule)
    for i, s in enumerate(MANY):
        assert_close(ours[0][i], cpu[0][i], TOL[torch.float32], f"{s} param", origin=start[i],
                     atol=rounding_atol(cpu[0][i], STEPS))
        assert_close(ours[2][i], cpu[2][i], TOL[torch.float32], f"{s} exp_avg_sq")


@pytest.mark.parametrize("device", ["cpu", "meta", EMU, CUDA])
def test_bad_rule_raises_before_any_write(device):
    """The op's bad-input contract: an unknown rule is a ValueError naming both rules, and the
    parameters, moments and step counters are as they were."""
    if device == "cuda":
        assert_cuda_build()
    where = "meta" if device == "meta" else tensor_device(device)
    gen = torch.Generator().manual_seed(0)
    p = [torch.randn(s, generator=gen).to(where) for s in ODD]
    g = [torch.randn(s, generator=gen).to(where) for s in ODD]
    m, v = [torch.ones_like(t) for t in p], [torch.ones_like(t) for t in p]
    steps = [torch.full((), 3.0) for _ in p]
    before = [t.clone() for t in p + m + v + steps]
    op = torch.ops.memopt if device == "meta" else ops(device)
    with pytest.raises(ValueError, match="adamw_rule must be 'apollo'.* or 'torch'.*'Apollo'"):
        op.adamw_(p, g, m, v, steps, torch.tensor(LR, dtype=torch.float64), *BETAS, EPS, WD,
                  "Apollo")
    if device != "meta":
        assert all(torch.equal(a, b) for a, b in zip(p + m + v + steps, before))
    else:
        assert all(torch.equal(a, b) for a, b in zip(steps, before[-len(steps):]))
