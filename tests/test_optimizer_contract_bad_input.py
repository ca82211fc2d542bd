"""The torch.optim contract, bad input, for every optimizer in memopt_core.registry.OPTIMIZERS:
a bad gradient or hyperparameter raises a clear exception with parameters and state untouched;
an integer or complex parameter is rejected at construction."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import memopt_core
from conftest import assert_snapshot_equal, make_grads, make_llama, set_grads, snapshot
from contract_util import all_params, make, run


def _bad_grad(kind, p):
    if kind == "sparse":
        idx = torch.tensor([[0] * p.dim()]).t() if p.dim() else torch.zeros(0, 1, dtype=torch.long)
        return torch.sparse_coo_tensor(idx, torch.ones(1, dtype=p.dtype), p.shape,
                                       check_invariants=True)
    if kind == "complex":
        return torch.ones(p.shape, dtype=torch.complex64)
    if kind == "shape":
        return torch.ones(p.numel() + 1, dtype=p.dtype)
    raise AssertionError(kind)


BAD_GRADS = {"sparse": (ValueError, "sparse"), "complex": (TypeError, "complex"),
             "shape": (ValueError, "shape")}


@pytest.mark.parametrize("where", ["first", "last"])
@pytest.mark.parametrize("kind", sorted(BAD_GRADS))
@pytest.mark.parametrize("after_steps", [0, 2], ids=["first_step", "later_step"])
def test_bad_grad_raises_and_changes_nothing(opt_name, kind, where, after_steps):
    model = make_llama(seed=30)
    opt = make(opt_name, model)
    run(model, opt, after_steps)
    params = list(model.parameters())
    set_grads(params, make_grads(params, after_steps))
    ordered = all_params(opt)                   # the optimizer's order: "last" is in the last group
    victim = ordered[0] if where == "first" else ordered[-1]
    if kind == "shape":
        victim.grad.data = _bad_grad(kind, victim)          # bypasses the .grad setter's check
    else:
        if kind == "complex":
            victim.grad_dtype = None                        # let a complex grad be assigned
        victim.grad = _bad_grad(kind, victim)
    before = snapshot(opt, params)
    exc, word = BAD_GRADS[kind]
    with pytest.raises(exc, match=word):
        opt.step()
    assert_snapshot_equal(snapshot(opt, params), before)
    if after_steps == 0:
        assert len(opt.state) == 0 or all(len(s) == 0 for s in opt.state.values())


BAD_HPARAMS = [("lr", -1e-3, "learning rate"), ("betas", (1.0, 0.999), "beta1"),
               ("betas", (0.9, 1.0), "beta2"), ("betas", (-0.1, 0.999), "beta1"),
               ("eps", -1e-8, "eps"), ("weight_decay", -0.1, "weight_decay"),
               ("lr", float("nan"), "learning rate")]


@pytest.mark.parametrize("key,value,word", BAD_HPARAMS)
def test_bad_hparam_at_construction_raises_value_error(opt_name, key, value, word):
    with pytest.raises(ValueError, match=word):
        make(opt_name, make_llama(), **{key: value})


@pytest.mark.parametrize("key,value,word", BAD_HPARAMS)
@pytest.mark.parametrize("after_steps", [0, 2], ids=["first_step", "later_step"])
def test_bad_hparam_set_after_construction_fails_step_atomically(opt_name, key, value, word,
                                                                  after_steps):
    model = make_llama(seed=31)
    opt = make(opt_name, model)
    run(model, opt, after_steps)
    params = list(model.parameters())
    set_grads(params, make_grads(params, after_steps))
    opt.param_groups[-1][key] = value                  # the last group: earlier ones are valid
    before = snapshot(opt, params)
    with pytest.raises(ValueError, match=word):
        opt.step()
    assert_snapshot_equal(snapshot(opt, params), before)
    if after_steps == 0:
        assert len(opt.state) == 0 or all(len(s) == 0 for s in opt.state.values())


def test_integer_or_complex_parameter_rejected_at_construction(opt_name):
    class M(nn.Module):
        def __init__(self, bad):
            super().__init__()
            self.mlp = nn.Linear(4, 4)
            self.bad = bad

    complex_model = M(nn.Parameter(torch.zeros(3, dtype=torch.complex64)))
    with pytest.raises(TypeError, match="complex|dtype"):
        make(opt_name, complex_model)
    int_model = M(nn.Parameter(torch.zeros(3, dtype=torch.long), requires_grad=False))
    spec = memopt_core.OPTIMIZERS[opt_name]
    try:
        opt = make(opt_name, int_model)
    except TypeError as e:
        assert "int64" in str(e) or "Long" in str(e) or "dtype" in str(e) or "float" in str(e)
    else:
        # only acceptable for optimizers built from names, which skip requires_grad=False tensors
        assert spec.needs_names
        assert all(p is not int_model.bad for p in all_params(opt))
    with pytest.raises(TypeError):
        memopt_core.AdamW([nn.Parameter(torch.zeros(3, dtype=torch.long), requires_grad=False)])
