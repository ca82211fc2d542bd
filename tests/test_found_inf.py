"""The `found_inf` argument of memopt::adamw_, adam_mini_, apollo_ and frugal_ (every optimizer):
with it the step counters live on the parameters' device, the CUDA kernels compute each tensor's
bias corrections and rounding key there (cpp/src/cuda/step_scalars.cu) and return at once where
found_inf is set, so a skipped step needs no host synchronisation.

Oracle: the same op on the same device never asked to take the skipped steps, with host step
counters and no found_inf: parameters, every state tensor and the step counts must be equal
(bit for bit on the CPU and the host-emulated kernels, "emu"; within float32 rounding on a GPU,
whose pow may differ from the host's in the last bit). Every kernel path is covered: AdamW's
float, bf16 and 8-bit kernels (with stochastic rounding), Adam-mini's fused and two-pass blocks,
its 8-bit m and its elementwise (bias) segments."""
from __future__ import annotations

import math

import pytest
import torch

import memopt_core
from conftest import make_grads, make_llama
from cuda_util import EMU, ops, requires_cuda, tensor_device

CUDA = pytest.param("cuda", marks=[pytest.mark.cuda, requires_cuda])
DEVICES = ["cpu", EMU, CUDA]
STEPS, SKIPPED = 5, (0, 3)  # the first step skipped too: GradScaler's first steps often are
SMALL = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=1, num_attention_heads=4,
             num_key_value_heads=2)  # rows of whole 256-element code blocks: 8-bit state
CASES = {
    "adamw": ("adamw", {}, torch.float32),
    "adamw_8bit": ("adamw", dict(state_bits=8), torch.float32),
    "adamw_bf16_stochastic": ("adamw", dict(stochastic_rounding=True, rounding_seed=3),
                              torch.bfloat16),
    "adam_mini": ("adam_mini", {}, torch.float32),
    "adam_mini_8bit": ("adam_mini", dict(state_bits=8), torch.float32),
    "adam_mini_bf16_stochastic": ("adam_mini", dict(stochastic_rounding=True), torch.bfloat16),
    "slim_adam": ("slim_adam", {}, torch.float32),
    # apollo_: no call with found_inf may be due for a projection refresh, so the first step
    # (which draws P) is taken without it, and the gap is longer than the run
    "apollo": ("apollo", dict(update_proj_gap=100), torch.float32),
    "apollo_mini": ("apollo_mini", dict(update_proj_gap=100), torch.float32),
    "apollo_mini_bf16_stochastic": ("apollo_mini", dict(update_proj_gap=100,
                                                        stochastic_rounding=True), torch.bfloat16),
}
FIRST_ON_HOST = {"apollo", "apollo_mini"}  # their first step: no found_inf, and never skipped


def _model(device, dtype):
    model = make_llama(seed=2, dtype=dtype, **SMALL).to(tensor_device(device))
    model.model.layers[0].mlp.up_proj.bias = torch.nn.Parameter(  # an elementwise segment
        torch.zeros(512, dtype=dtype, device=tensor_device(device)))
    return model


def run(device, case, with_found: bool):
    """(params, states) after STEPS steps; with_found: every step passes found_inf, the SKIPPED
    ones with NaN gradients and found_inf = 1; else the SKIPPED steps are left out. APOLLO:
    the first step is taken without found_inf, and the steps after it are skipped."""
    name, kw, dtype = CASES[case]
    first_on_host = name in FIRST_ON_HOST
    skipped_steps = tuple(s + 1 for s in SKIPPED) if first_on_host else SKIPPED
    where = tensor_device(device)
    model = _model(device, dtype)
    opt = memopt_core.OPTIMIZERS[name].make(model, lr=1e-3, weight_decay=0.1, **kw)
    params = [p for g in opt.param_groups for p in g["params"]]
    opt._init_states(params)
    if with_found:  # the counters live beside the parameters (a no-op on the CPU)
        for p in params:
            opt.state[p]["step"] = opt.state[p]["step"].to(where)
    for step in range(STEPS):
        skipped = step in skipped_steps
        if skipped and not with_found:
            continue
        grads = make_grads(params, step)
        if skipped:
            grads[step % len(grads)].view(-1)[0] = math.nan
        for p, g in zip(params, grads):
            p.grad = g.to(where)
        flag = ({"found_inf": torch.full((1,), float(skipped), device=where)}
                if with_found and not (first_on_host and step == 0) else {})
        for group, batch in opt._device_batches():
            op, args = opt._op_call(group, batch, [p.grad for p in batch],
                                    [opt.state[p] for p in batch])
            getattr(ops(device), op._qualified_op_name.split("::")[1])(*args, **flag)
    return ([p.detach().cpu() for p in params],
            [{k: v.cpu() for k, v in opt.state[p].items()} for p in params])


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("device", DEVICES)
def test_a_found_inf_step_is_a_step_never_taken(device, case):
    assert_never_taken(device, run(device, case, with_found=True),
                       run(device, case, with_found=False), STEPS - len(SKIPPED))


def assert_never_taken(device, got, want, steps: int) -> None:
    """got = (params, states) of the run with found_inf equals want, the run that never took
    the skipped steps: bit for bit but on a GPU (float32 rounding; codes and indices exact);
    every step counter at `steps`."""
    exact = device != "cuda"
    for i, (p, r) in enumerate(zip(got[0], want[0])):
        assert p.isfinite().all(), f"param {i}: the NaN step was not skipped"
        if exact:
            assert torch.equal(p, r), f"param {i}"
        else:
            torch.testing.assert_close(p, r, rtol=1e-5, atol=1e-6)
    for i, (s, r) in enumerate(zip(got[1], want[1])):
        assert s.keys() == r.keys() and ("step" not in s or float(s["step"]) == steps), i
        for k in r:
            if exact or s[k].dtype in (torch.int8, torch.uint8, torch.int32):
                assert torch.equal(s[k], r[k]), f"state {i}[{k}]"
            else:
                torch.testing.assert_close(s[k], r[k], rtol=1e-5, atol=1e-7)


# frugal_: every mode family (whole-tensor AdamW, its 8-bit kernel, the split kernel's columns
# and state-free blocks, the projections' kernels), steps 2 and 4 of 1-5 skipped after a first
# step through the optimizer (which selects and makes the state)
FRUGAL_CASES = {
    "block": dict(selection="block"),
    "block_8bit": dict(selection="block", state_bits=8),
    "columns": dict(selection="columns"),
    "random": dict(selection="random"),
}


def frugal_run(device, case, with_found: bool):
    where = tensor_device(device)
    model = _model(device, torch.float32)
    opt = memopt_core.Frugal(model, lr=1e-3, weight_decay=0.1, update_gap=100, density=0.5,
                             **FRUGAL_CASES[case])
    params = [p for g in opt.param_groups for p in g["params"]]
    for p, g in zip(params, make_grads(params, 0)):
        p.grad = g.to(where)
    opt.step()
    if with_found:
        for st in opt.state.values():
            st["step"] = st["step"].to(where)
    for step in range(1, 6):
        skipped = step in (2, 4)
        if skipped and not with_found:
            continue
        grads = make_grads(params, step)
        if skipped:
            grads[step].view(-1)[0] = math.nan
        for p, g in zip(params, grads):
            p.grad = g.to(where)
        flag = {"found_inf": torch.full((1,), float(skipped), device=where)} if with_found else {}
        for group, batch in opt._device_batches():
            args = opt._op_args(group, batch, [opt.state.get(p) for p in batch],
                                [opt._mode(p) for p in batch])
            ops(device).frugal_(*args, **flag)
    return ([p.detach().cpu() for p in params],
            [{k: v.cpu() for k, v in opt.state.get(p, {}).items()} for p in params])


@pytest.mark.parametrize("case", list(FRUGAL_CASES))
@pytest.mark.parametrize("device", DEVICES)
def test_frugal_found_inf_step_is_a_step_never_taken(device, case):
    got = frugal_run(device, case, with_found=True)
    assert any(got[1]), "no tensor holds state"
    assert_never_taken(device, got, frugal_run(device, case, with_found=False), 4)


@pytest.mark.parametrize("device", ["cpu", EMU])
def test_apollo_found_inf_refuses_a_call_due_for_a_refresh(device):
    """A call with found_inf cannot refresh the projection (on a GPU it does not read its
    counters); where the counters are on the host the op refuses one that is due, before any
    write: the first step (count 0) and every multiple of update_proj_gap."""
    model = _model(device, torch.float32)
    opt = memopt_core.Apollo(model, lr=1e-3, update_proj_gap=100)
    params = [p for g in opt.param_groups for p in g["params"]]
    opt._init_states(params)
    for p, g in zip(params, make_grads(params, 0)):
        p.grad = g
    group, batch = next((g, b) for g, b in opt._device_batches() if g.get("rank") is not None)
    before = [t.clone() for p in batch for t in (p, *opt.state[p].values())]
    op, args = opt._op_call(group, batch, [p.grad for p in batch], [opt.state[p] for p in batch])
    with pytest.raises(ValueError, match="due for a projection refresh at step 0"):
        getattr(ops(device), "apollo_")(*args, found_inf=torch.zeros(1))
    after = [t for p in batch for t in (p, *opt.state[p].values())]
    assert all(torch.equal(a, b) for a, b in zip(after, before))


def _one_tensor(where):
    p = torch.randn(64, 32, device=where)
    return ([p], [torch.randn_like(p)], [torch.zeros_like(p)], [torch.zeros_like(p)],
            [torch.zeros((), device=where)], torch.tensor(1e-3, dtype=torch.float64), 0.9,
            0.999, 1e-8, 0.0)


@pytest.mark.parametrize("bad, match", [
    (torch.zeros(2), "one-element float32"),
    (torch.zeros(1, dtype=torch.float64), "one-element float32"),
    (torch.zeros(1, dtype=torch.int32), "one-element float32"),
])
@pytest.mark.parametrize("device", DEVICES)
def test_a_bad_found_inf_is_refused_before_any_write(device, bad, match):
    where = tensor_device(device)
    args = _one_tensor(where)
    before = [t.clone() for t in (args[0][0], args[2][0], args[4][0])]
    with pytest.raises(ValueError, match=match):
        ops(device).adamw_(*args, found_inf=bad.to(where))
    for b, t in zip(before, (args[0][0], args[2][0], args[4][0])):
        assert torch.equal(b, t)


@pytest.mark.parametrize("device", DEVICES)
def test_a_set_found_inf_still_validates_the_call(device):
    """A skipped step is checked like a taken one: a bad input raises even when nothing runs."""
    where = tensor_device(device)
    args = list(_one_tensor(where))
    args[6] = 1.5  # beta1
    with pytest.raises(ValueError, match="beta1"):
        ops(device).adamw_(*args, found_inf=torch.ones(1, device=where))


@pytest.mark.cuda
@requires_cuda
def test_found_inf_needs_the_step_counters_on_the_device():
    args = _one_tensor("cuda")
    args[4][0] = torch.zeros(())  # a CPU counter
    with pytest.raises(ValueError, match="parameters' device"):
        torch.ops.memopt.adamw_(*args, found_inf=torch.zeros(1, device="cuda"))
    with pytest.raises(ValueError, match="parameters' device"):
        torch.ops.memopt.adamw_(*_one_tensor("cuda"), found_inf=torch.zeros(1))
