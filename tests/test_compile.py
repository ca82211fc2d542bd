"""torch.compile(fullgraph=True) of opt.step() for every registered optimizer: no graph break, no
recompilation after the first step (tensor lr, LR changed through memopt_core.set_lr), inside a
loop whose forward/backward is compiled too, and the same parameters as eager mode."""
from __future__ import annotations

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import memopt_core
from memopt_core.app.models import build

STEPS = 5


def train(opt_name, compiled: bool, backend="aot_eager", **options):
    torch.manual_seed(0)
    model = build("tiny", num_hidden_layers=2)
    opt = memopt_core.make_optimizer(opt_name, model, lr=torch.tensor(2e-3), weight_decay=0.1,
                                     **options)
    x = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(1))

    def fwd_bwd():
        loss = model(x, x.roll(1, 1))[1]
        loss.backward()
        return loss

    def step():
        opt.step()

    counter = None
    if compiled:
        torch._dynamo.reset()
        counter = CompileCounterWithBackend(backend)
        fwd_bwd = torch.compile(fwd_bwd, backend=counter)
        step = torch.compile(step, backend=counter, fullgraph=True)
        opt.init_state(pooled=False)  # the state the compiled step keeps: nothing to recompile
    frames = []
    for i in range(STEPS):
        fwd_bwd()
        step()
        opt.zero_grad(set_to_none=True)
        memopt_core.set_lr(opt, 2e-3 * (1 - i / STEPS))  # a schedule that must not recompile
        if counter is not None:
            frames.append(counter.frame_count)
    return [p.detach().clone() for p in model.parameters()], frames


@pytest.mark.parametrize("opt_name", [n for n, s in memopt_core.OPTIMIZERS.items()
                                      if s.cls.compilable])
def test_compiled_step_has_no_graph_break_no_recompile_and_matches_eager(opt_name):
    eager, _ = train(opt_name, compiled=False)
    compiled, frames = train(opt_name, compiled=True)
    assert frames[0] == frames[-1], f"recompiled after the first step: frames {frames}"
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("opt_name", ["adamw", "adam_mini"])
@pytest.mark.parametrize("bits", [16, 8])
def test_compiled_step_with_low_bit_state_matches_eager(opt_name, bits):
    """state_bits changes only the state's dtypes (and 8-bit scales): the compiled step keeps
    them exactly as eager mode does."""
    eager, _ = train(opt_name, compiled=False, state_bits=bits)
    compiled, frames = train(opt_name, compiled=True, state_bits=bits)
    assert frames[0] == frames[-1], f"recompiled after the first step: frames {frames}"
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_inductor_compiled_step_matches_eager():
    eager, _ = train("adam_mini", compiled=False)
    compiled, frames = train("adam_mini", compiled=True, backend="inductor")
    assert frames[0] == frames[-1]
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_compiled_step_creates_missing_state_like_eager():
    """Without init_state the first compiled call creates the state (AdamMini; APOLLO's state
    shapes come from its C++ Projector, so it needs init_state() before compiling)."""
    eager, _ = train("adam_mini", compiled=False)
    torch.manual_seed(0)
    model = build("tiny", num_hidden_layers=2)
    opt = memopt_core.make_optimizer("adam_mini", model, lr=torch.tensor(2e-3), weight_decay=0.1)
    step = torch.compile(opt.step, backend="aot_eager", fullgraph=True)
    x = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(1))
    for i in range(STEPS):
        model(x, x.roll(1, 1))[1].backward()
        step()
        opt.zero_grad(set_to_none=True)
        memopt_core.set_lr(opt, 2e-3 * (1 - i / STEPS))
    for a, b in zip(eager, model.parameters()):
        torch.testing.assert_close(a, b.detach(), rtol=1e-5, atol=1e-6)


def test_init_state_refuses_an_optimizer_that_cannot_compile():
    with pytest.raises(TypeError, match="cannot be created ahead"):
        memopt_core.Frugal(torch.nn.Linear(4, 3)).init_state()


def test_compiling_frugal_step_fails_with_the_reason():
    """FRUGAL is the registry's one optimizer outside torch.compile (its state moves between
    tensors every update_gap steps); compiling its step must say so, not fail obscurely."""
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 4))
    opt = memopt_core.Frugal(model, roles={"0.weight": "mlp", "1.weight": "mlp"})
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(Exception, match="Frugal.step\\(\\) cannot be compiled"):
        torch.compile(opt.step, fullgraph=True, backend="aot_eager")()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    opt.step()  # eagerly, as the message says
    assert not torch.equal(before[0], model[0].weight)
