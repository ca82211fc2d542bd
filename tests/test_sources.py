"""One rule for where roles come from (memopt_core.sources), the same in every optimizer: a model
or named parameters give the names (so the roles); param groups give hyperparameters; groups of
bare tensors with model= (the HF Trainer's optimizer_cls_and_kwargs path) keep the groups'
settings with the model's roles. Without names an optimizer that needs them raises and says how
to pass the model: never a silent fall-back to AdamW."""
from __future__ import annotations

import pytest
import torch

import memopt_core
from conftest import make_llama

NEEDS_NAMES = ["AdamMini", "SlimAdam", "Frugal", "Apollo", "ApolloMini"]


def _trainer_groups(model):
    """HF Trainer's two groups of bare tensors: decay (2-D) and no decay (the rest)."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


def _partition(opt) -> dict:
    """What the optimizer decided per parameter name: role/blocks, projection rank, or block."""
    names = {p: n for g in opt.param_groups for n, p in zip(g.get("param_names", []), g["params"])}
    if isinstance(opt, memopt_core.Apollo):
        return {names[p]: g.get("rank") for g in opt.param_groups for p in g["params"]}
    if isinstance(opt, memopt_core.Frugal):
        return {names[p]: p in opt._index for g in opt.param_groups for p in g["params"]}
    return {names[p]: (opt.blocks[p].role, opt.blocks[p].count)
            for g in opt.param_groups for p in g["params"]}


@pytest.mark.parametrize("cls", NEEDS_NAMES)
def test_bare_tensors_raise_and_say_how_to_pass_the_model(cls):
    model = make_llama()
    for params in (model.parameters(), _trainer_groups(model)):
        with pytest.raises(TypeError, match=rf"{cls}\(groups, model=model"):
            getattr(memopt_core, cls)(params, lr=1e-3)


@pytest.mark.parametrize("cls", NEEDS_NAMES)
def test_groups_with_model_keep_settings_and_take_the_models_roles(cls):
    model = make_llama()
    by_model = getattr(memopt_core, cls)(model, lr=1e-3)
    by_groups = getattr(memopt_core, cls)(_trainer_groups(model), lr=1e-3, model=model)
    assert _partition(by_groups) == _partition(by_model)
    if cls in ("Apollo", "ApolloMini"):
        assert any(g.get("rank") for g in by_groups.param_groups)  # projected, not AdamW
    wd = {n: g["weight_decay"] for g in by_groups.param_groups
          for n in g.get("param_names", [])}
    assert all(wd[n] == 0.0 for n, p in model.named_parameters() if p.dim() < 2)
    assert any(v == 0.1 for v in wd.values())
    by_groups.zero_grad()
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    by_groups.step()


@pytest.mark.parametrize("cls", NEEDS_NAMES + ["AdamW"])
def test_empty_parameter_list_raises(cls):
    with pytest.raises(ValueError, match="empty parameter list"):
        getattr(memopt_core, cls)([], lr=1e-3)


def test_adamw_takes_every_form():
    model = make_llama()
    for params, kw in ((model, {}), (model.parameters(), {}), (_trainer_groups(model), {"model": model})):
        opt = memopt_core.AdamW(params, lr=1e-3, **kw)
        assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))


def test_apollo_rank_defaults_from_the_model_and_fits_each_tensor():
    model = make_llama()  # hidden 32: APOLLO's d/4 = 8; k/v weights are (16, 32)
    ranks = _partition(memopt_core.Apollo(model))
    assert {r for r in ranks.values() if r} == {8}
    assert ranks["model.embed_tokens.weight"] is None and ranks["lm_head.weight"] is None
    assert set(_partition(memopt_core.ApolloMini(model)).values()) == {1, None}
    big = _partition(memopt_core.Apollo(model, rank=64))  # never above a tensor's smaller side
    assert big["model.layers.0.self_attn.k_proj.weight"] == 16
    assert big["model.layers.0.self_attn.q_proj.weight"] == 32
    # bare tensors with an explicit rank: every 2-D tensor given is projected, as documented
    w = torch.nn.Parameter(torch.randn(6, 10))
    opt = memopt_core.Apollo([w], rank=4)
    assert opt.param_groups[0]["rank"] == 4 and opt.param_groups[0]["params"] == [w]


def test_a_model_given_twice_or_a_stranger_tensor_is_refused():
    model = make_llama()
    with pytest.raises(ValueError, match="pass the model once"):
        memopt_core.AdamMini(make_llama(), model=model)
    with pytest.raises(ValueError, match="not in the model"):
        memopt_core.AdamMini([torch.nn.Parameter(torch.zeros(3))], model=model)


@pytest.mark.parametrize("cls", ["AdamMini", "SlimAdam"])
def test_n_heads_alone_is_enough_when_shapes_tell_the_rest(cls, recwarn):
    """Named parameters without a model, and n_heads=: head_dim follows from each q/k weight's
    input width (the hidden size), so the blocks are the model's own."""
    model = make_llama()  # hidden 32, 4 heads, 2 kv heads
    by_model = getattr(memopt_core, cls)(model, lr=1e-3)
    named = getattr(memopt_core, cls)(list(model.named_parameters()), lr=1e-3, n_heads=4)
    assert _partition(named) == _partition(by_model)
    assert not [w for w in recwarn if "per output neuron" in str(w.message)]


def test_describe_numbers_unnamed_parameters_across_groups_and_marks_elementwise_rows():
    a, b = torch.nn.Parameter(torch.zeros(2, 3)), torch.nn.Parameter(torch.zeros(4))
    rows = memopt_core.AdamW([{"params": [a]}, {"params": [b]}]).describe().splitlines()[1:-1]
    assert [r.split()[0] for r in rows] == ["param0", "param1"]  # as state_dict() numbers them
    assert all(r.split()[3] == "elementwise" for r in rows)
    apollo = memopt_core.Apollo(make_llama(), rank=4).describe()
    assert "adamw     elementwise" in apollo and "apollo-" in apollo
