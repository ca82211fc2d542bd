"""docs/adding_an_optimizer.md, checked: a sixth optimizer (plain SGD with momentum) added the way
the walk-through says, through its own op, its own front-end class and one registry entry, and
nothing else, passes the torch.optim contract tests that every registered optimizer passes
(tests/test_optimizer_contract*.py, run here against it) and matches torch.optim.SGD bit for bit.

The op is defined with torch.library in Python here so that the test needs no C++ build; a real
optimizer registers its op in C++ (cpp/src/ops_<name>.cpp), which is the same dispatcher path."""
from __future__ import annotations

import re

import pytest
import torch
from torch import nn

import memopt_core
import test_optimizer_contract as contract
import test_optimizer_contract_bad_input as contract_bad_input
import test_optimizer_contract_memory as contract_memory
from conftest import make_grads, make_llama, set_grads
from memopt_core._base import MemoptOptimizer
from memopt_core.registry import OptimizerSpec

# ---- 1. the op: one fused call per (group, device), mutable schema, CPU and fake kernels, and
# its validator check_<op> from the same schema (as cpp/src/define_op.h registers them) ----
_LIB = torch.library.Library("memopt_toy", "DEF")
_SCHEMA = ("sgd_momentum_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] bufs, "
           "Tensor(c!)[] steps, Tensor lr, float momentum, float weight_decay) -> ()")
_LIB.define(_SCHEMA)
_LIB.define("check_" + re.sub(r"\([a-z]!\)", "", _SCHEMA))


@torch.library.impl(_LIB, "check_sgd_momentum_", "CompositeExplicitAutograd")
def check_sgd_momentum_(params, grads, bufs, steps, lr, momentum, weight_decay):
    """The op's validator: everything the kernel needs, checked before anything is written."""
    if not 0.0 <= momentum < 1.0 or weight_decay < 0.0 or float(lr) < 0.0:
        raise ValueError(f"bad hyperparameters: lr {float(lr)}, momentum {momentum}, "
                         f"weight_decay {weight_decay}")
    for i, (p, g, b) in enumerate(zip(params, grads, bufs)):
        if g.is_sparse or g.is_complex() or g.shape != p.shape or b.shape != p.shape \
                or g.dtype != p.dtype or g.device != p.device:
            raise ValueError(f"sgd_momentum_: gradient {i} does not match its parameter")


@torch.library.impl(_LIB, "sgd_momentum_", "CPU")
def _sgd_momentum_cpu(params, grads, bufs, steps, lr, momentum, weight_decay):
    check_sgd_momentum_(params, grads, bufs, steps, lr, momentum, weight_decay)
    for p, g, b, s in zip(params, grads, bufs, steps):  # torch.optim.SGD's order of operations
        d = g.add(p, alpha=weight_decay) if weight_decay else g
        b.mul_(momentum).add_(d)
        p.add_(b, alpha=-float(lr))
        s.add_(1)


@torch.library.register_fake("memopt_toy::sgd_momentum_")
def _sgd_momentum_fake(params, grads, bufs, steps, lr, momentum, weight_decay):
    return None


# ---- 2. the front end: state shapes, the op call, its own hyperparameter check ----------------
class SGDMomentum(MemoptOptimizer):
    """p -= lr * buf, buf = momentum * buf + (g + wd * p): torch.optim.SGD(momentum=m)."""

    def __init__(self, params, lr=1e-2, momentum=0.9, weight_decay=0.0, *, model=None,
                 nonfinite="propagate"):
        if isinstance(params, nn.Module):
            params = params.parameters()
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay),
                         nonfinite)

    def _check_hparams(self, group):
        check_sgd_momentum_([], [], [], [], torch.tensor(float(group["lr"])),
                            float(group["momentum"]), float(group["weight_decay"]))

    def _state_shapes(self, p):
        return {"momentum_buffer": tuple(p.shape)}

    def _op_call(self, group, params, grads, states):
        args = (params, grads, [s["momentum_buffer"] for s in states],
                [s["step"] for s in states], self._lr(group), float(group["momentum"]),
                float(group["weight_decay"]))
        return torch.ops.memopt_toy.sgd_momentum_, args


# ---- 3. one registry entry ---------------------------------------------------------------------
@pytest.fixture
def toy(monkeypatch):
    spec = OptimizerSpec("toy_sgd", SGDMomentum, needs_names=False, lr=1e-2)
    monkeypatch.setitem(memopt_core.OPTIMIZERS, "toy_sgd", spec)
    return "toy_sgd"


CONTRACT = [contract.test_state_pool_after_first_step,
            contract.test_loading_its_own_state_dict_changes_nothing,
            contract.test_closure_is_evaluated_and_its_loss_returned,
            contract.test_params_without_grad_are_skipped,
            contract.test_zero_grad_set_to_none_then_step_changes_nothing,
            contract.test_noncontiguous_grads_give_the_same_result,
            contract_bad_input.test_integer_or_complex_parameter_rejected_at_construction,
            contract_memory.test_state_bytes_is_the_sum_of_state_tensors_and_describe_lists_each,
            contract_memory.test_planned_state_bytes_match_the_state_after_a_step]


@pytest.mark.parametrize("check", CONTRACT, ids=lambda f: f.__name__)
def test_the_toy_passes_the_contract(toy, check):
    check(toy)


def test_the_toy_resumes_bit_identically(toy, tmp_path):
    contract.test_state_dict_resume_is_bit_identical(toy, tmp_path)


@pytest.mark.parametrize("target_has_state", [False, True])
def test_the_toy_refuses_a_mismatched_checkpoint(toy, target_has_state):
    contract.test_load_mismatched_state_dict_raises_and_changes_nothing(toy, target_has_state)


def test_the_toy_matches_torch_sgd_bit_for_bit(toy):
    """The independent oracle: torch.optim.SGD with the same momentum and (L2) weight decay."""
    a, b = make_llama(seed=4), make_llama(seed=4)
    ours = memopt_core.make_optimizer(toy, a, lr=1e-2, weight_decay=0.01)
    ref = torch.optim.SGD(b.parameters(), lr=1e-2, momentum=0.9, weight_decay=0.01)
    pa, pb = list(a.parameters()), list(b.parameters())
    for step in range(5):
        set_grads(pa, make_grads(pa, step))
        set_grads(pb, make_grads(pb, step))
        ours.step()
        ref.step()
    for p, q in zip(pa, pb):
        assert torch.equal(p, q)
    assert all(torch.equal(ours.state[p]["momentum_buffer"], ref.state[q]["momentum_buffer"])
               for p, q in zip(pa, pb))


def test_the_toy_rejects_its_own_bad_hyperparameters(toy):
    with pytest.raises(ValueError, match="momentum"):
        memopt_core.make_optimizer(toy, make_llama(), momentum=1.5)
