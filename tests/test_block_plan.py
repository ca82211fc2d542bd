"""memopt::BlockPlan (_C.BlockPlan), the decisions of AdamW, Adam-mini and SlimAdam, tested once
against oracles written without its C++: the paper's blocks as index sets
(reference/adam_mini_ref.py), adam-mini 1.1.1's name rules, the SlimAdam reference's keepdim
mean, torch.optim.AdamW's decay of every tensor. Then the state layouts and the checkpoint check
that every plan shares (OptimizerPlan.check_saved), and the base optimizer's use of them. The
front ends' trajectories are compared with the references in test_adam_mini.py,
test_slim_adam.py and test_adamw.py."""
from __future__ import annotations

import pytest
import torch

import memopt_core
from memopt_core import _C
from conftest import make_grads, make_llama, set_grads
from reference import adam_mini_ref as R


def role(name, transposed=False, head_dim=0, q_heads=0, kv_heads=0, interleaved=False):
    return (name, transposed, head_dim, q_heads, kv_heads, interleaved)


def block_of(segments, numel) -> torch.Tensor:
    """Element -> block number, read off the segments (the op's tile model)."""
    block, base = torch.full((numel,), -1), 0
    for off, rows, cols, stride, tr, tc in segments:
        for r in range(rows):
            for c in range(cols):
                block[off + r * stride + c] = base + (r // tr) * (cols // tc) + c // tc
        base += (rows // tr) * (cols // tc)
    return block


def set_of(sets, numel) -> torch.Tensor:
    """Element -> number of the index set holding it (the oracle's block order)."""
    out = torch.full((numel,), -1)
    for i, s in enumerate(sets):
        out[s] = i
    return out


def per_col_group(shape, width):
    """Columns in groups of `width` over all rows: a transposed Q/K weight's heads."""
    idx = torch.arange(shape[0] * shape[1]).view(shape)
    return [idx[:, c:c + width].reshape(-1) for c in range(0, shape[1], width)]


# (role, shape, the paper's blocks (§3) as index sets, decays)
AUTO = [
    (role("query", head_dim=4), (8, 6), R.per_head((8, 6), 2), True),
    (role("key", True, head_dim=2), (6, 4), per_col_group((6, 4), 2), True),
    (role("value"), (6, 5), R.per_row((6, 5)), True),
    (role("attn_out"), (5, 6), R.per_row((5, 6)), True),
    (role("mlp", True), (5, 7), R.per_col((5, 7)), True),
    (role("embedding"), (10, 4), R.per_row((10, 4)), True),
    (role("output"), (10, 4), R.per_row((10, 4)), True),
    (role("qkv", head_dim=2, q_heads=2, kv_heads=1), (8, 3), R.fused_qkv((8, 3), 2, 1, 2, False), True),
    (role("qkv", True, head_dim=2, q_heads=2, kv_heads=1), (3, 8), R.fused_qkv((3, 8), 2, 1, 2, True), True),
    (role("conv"), (4, 3, 2, 2), R.per_row((4, 3, 2, 2)), True),
    (role("norm"), (6,), R.whole((6,)), False),
    (role("bias"), (6,), R.elementwise((6,)), False),
    (role("linear"), (7,), R.whole((7,)), False),             # 1-D: one block, no decay
    (role("scalar"), (2, 3), R.whole((2, 3)), False),
]


@pytest.mark.parametrize("info,shape,sets,decay", AUTO, ids=lambda v: str(v)[:24])
def test_adam_mini_blocks_and_decay_are_the_papers(info, shape, sets, decay):
    plan = _C.BlockPlan([("t", list(shape), info, "")], "adam_mini")
    name, segments, count, decays, note, v_shape, dims, rule, encoded = plan.blocks(0)
    numel = torch.Size(shape).numel()
    assert torch.equal(block_of(segments, numel), set_of(sets, numel))
    assert (name, count, decays, note) == (info[0], len(sets), decay, "")
    assert encoded == _C.encode_block_specs([list(segments)])
    assert plan.state(0) == [("exp_avg", list(shape), _C.StateDType.Param, True, list(range(len(shape))), 0.0),
                             ("exp_avg_sq", [count], _C.StateDType.Param, False, [], 0.0)]


def test_heads_that_do_not_divide_fall_back_to_neurons_and_say_why():
    plan = _C.BlockPlan([("q", [7, 4], role("query", head_dim=2), ""),
                         ("k", [6, 4], role("key", head_dim=3), "no head count: set n_heads")],
                        "adam_mini")
    q, k = plan.blocks(0), plan.blocks(1)
    assert q[2] == 7 and "head_dim 2 does not divide 7" in q[4]
    assert k[4] == "no head count: set n_heads"   # the role's own reason comes first


REFERENCE = [  # adam-mini 1.1.1 (dim 8, 2 heads): name substrings decide blocks and decay
    ("model.layers.0.self_attn.q_proj.weight", (8, 8), "query", 2, True),
    ("model.layers.0.self_attn.v_proj.weight", (4, 8), "linear", 4, True),
    ("lm_head.weight", (10, 8), "linear", 10, True),
    ("model.layers.0.input_layernorm.weight", (8,), "scalar", 1, False),
    ("transformer.ln_f.weight", (8,), "scalar", 1, False),
    ("fc.bias", (5,), "adam", 5, False),
    ("something.weight", (3, 4), "scalar", 1, True),
]


def test_reference_partition_is_adam_minis_name_rule():
    plan = _C.BlockPlan([(n, list(s), None, "") for n, s, *_ in REFERENCE], "adam_mini",
                        partition="reference", dim=8, n_heads=2)
    for i, (name, shape, want_role, want_count, want_decay) in enumerate(REFERENCE):
        got_role, _, count, decay, *_ = plan.blocks(i)
        assert (got_role, count, decay) == (want_role, want_count, want_decay), name
    default = _C.BlockPlan([("wq.weight", [2048, 2048], None, "")], "adam_mini", partition="reference")
    assert default.blocks(0)[2] == 32     # adam-mini's defaults: dim 2048, 32 heads
    with pytest.raises(ValueError, match="not a multiple of dim"):
        _C.BlockPlan([("q_proj.weight", [3, 5], None, "")], "adam_mini", partition="reference",
                     dim=8, n_heads=2)


@pytest.mark.parametrize("kw,word", [
    (dict(partition="bogus"), "partition must be 'auto' or 'reference', got 'bogus'"),
    (dict(partition="reference", role_overrides=True), "roles= overrides apply"),
])
def test_bad_options_raise_value_error(kw, word):
    with pytest.raises(ValueError, match=word):
        _C.BlockPlan([("w", [4, 4], role("mlp"), "")], "adam_mini", **kw)
    with pytest.raises(ValueError, match="algorithm must be"):
        _C.BlockPlan([], "sgd")


def test_adamw_is_elementwise_and_decays_every_tensor_as_torch():
    plan = _C.BlockPlan([("", [4, 3], None, ""), ("", [5], None, ""), ("", [], None, "")], "adamw")
    for i, shape in enumerate(([4, 3], [5], [])):
        assert plan.blocks(i)[2:4] == (torch.Size(shape).numel(), True)
        every = list(range(len(shape)))
        assert plan.state(i) == [(k, shape, _C.StateDType.Param, True, every, 0.0)
                                 for k in ("exp_avg", "exp_avg_sq")]


# ---- SlimAdam -----------------------------------------------------------------------------------
def test_slim_adam_table_is_the_keepdim_mean_of_paper_table_1():
    """Per role (paper Table 1) the averaged dims; blocks in the row-major order of the kept
    dims, so v.view(v_shape) is the reference's torch.mean(g*g, dims, keepdim=True)."""
    cases = [(role("query"), (8, 6), (1,)), (role("mlp"), (6, 5), (0,)),
             (role("output", True), (4, 10), (0,)), (role("embedding"), (10, 4), (1,)),
             (role("norm"), (6,), None), (role("conv"), (4, 3, 2), None)]
    plan = _C.BlockPlan([(f"t{i}", list(s), r, "") for i, (r, s, _) in enumerate(cases)], "slim_adam")
    for i, (_, shape, dims) in enumerate(cases):
        _, segments, count, decay, _, v_shape, got_dims, _, _ = plan.blocks(i)
        assert got_dims == dims and decay == (len(shape) >= 2)
        assert v_shape == tuple(1 if d in (dims or ()) else s for d, s in enumerate(shape))
        numel = torch.Size(shape).numel()
        coords = torch.stack(torch.meshgrid(*[torch.arange(s) for s in shape], indexing="ij"), -1)
        kept = coords.reshape(numel, -1).clone()
        kept[:, list(dims or ())] = 0
        expected = sum(kept[:, d] * torch.Size(v_shape[d + 1:]).numel() for d in range(len(shape)))
        assert torch.equal(block_of(segments, numel), expected) and count == torch.Size(v_shape).numel()
    split = _C.BlockPlan([("qkv", [8, 3], role("qkv", head_dim=2, q_heads=2, kv_heads=1), "")],
                         "slim_adam").blocks(0)
    assert split[6] == "table" and split[5] == (6 + 3,)       # q,k per row; v per input column


def test_slim_adam_rules_map_strips_the_compile_prefix_and_reports_misses():
    tensors = [(n, s, role("mlp"), "") for n, s in
               (("a", [3, 4]), ("b", [3, 4, 5]), ("c", [3, 4]), ("d", [3, 4]), ("e", [4]))]
    rules = {"a": [0], "_orig_mod.b": [-1], "c": None, "d": "table", "gone": [0], "also.gone": None}
    plan = _C.BlockPlan(tensors, "slim_adam", rules=rules)
    got = [plan.blocks(i) for i in range(5)]
    assert [b[6] for b in got] == [(0,), (2,), None, (0,), None]
    assert [b[5] for b in got] == [(1, 4), (3, 4, 1), (3, 4), (1, 4), (4,)]
    assert [b[3] for b in got] == [True, True, True, True, False]   # decay: >= 2 dims
    assert plan.missing_rules == ["e"] and plan.unknown_rules == ["also.gone", "gone"]
    assert plan.rules_warning == ("SlimAdam rules: 1 parameter(s) not in the rules stay "
                                  "uncompressed (e, ...); 2 rule name(s) match no parameter "
                                  "(also.gone, ...)")
    assert _C.BlockPlan(tensors, "slim_adam").rules_warning == ""
    none = _C.BlockPlan(tensors, "slim_adam", rules=None)
    assert all(none.blocks(i)[2] == torch.Size(s).numel() for i, (_, s, _, _) in enumerate(tensors))


@pytest.mark.parametrize("rules,exc,word", [
    ({"a": [1.5]}, ValueError, r"rules\['a'\] must be a list of dims, null or 'table', got \[1.5\]"),
    ({"a": [True]}, ValueError, "list of dims"),
    ({"_orig_mod.a": "rows"}, ValueError, r"rules\['_orig_mod.a'\] must be .* got 'rows'"),
    ({"a": [2]}, ValueError, r"rules\['a'\]: SlimAdam: dim 2 is out of range"),
    ({"a": [1, -1]}, ValueError, "repeat"),
    (42, TypeError, "rules must be 'table', None, a dict or a JSON path, got int"),
])
def test_bad_slim_adam_rules_raise_naming_the_entry(rules, exc, word):
    with pytest.raises(exc, match=word):
        _C.BlockPlan([("a", [3, 4], role("mlp"), "")], "slim_adam", rules=rules)


# ---- the checkpoint check every plan shares ---------------------------------------------------------
def _saved(plan, i, dtype=torch.float32, **changes):
    saved = {"step": torch.zeros(())}
    saved.update({k: torch.zeros(s, dtype=dtype) for k, s, *_ in plan.state(i)})
    saved.update(changes)
    return [(k, v) for k, v in saved.items() if v is not None]   # None: left out


@pytest.mark.parametrize("changes,exc,word", [
    (dict(exp_avg=None), ValueError, "lacks state 'exp_avg'"),
    (dict(foo=torch.zeros(1)), ValueError, "state 'foo', which this optimizer does not keep"),
    (dict(exp_avg_sq=torch.zeros(12)), ValueError, "'exp_avg_sq' has shape \\[12\\] but this optimizer keeps \\[4\\]"),
    (dict(exp_avg=torch.zeros(4, 3, dtype=torch.float64)), TypeError, "'exp_avg' has dtype Double"),
    (dict(step=torch.zeros((), dtype=torch.int64)), ValueError, "step must be"),
    (dict(step=None), ValueError, "step must be"),
])
def test_check_saved_names_what_does_not_fit(changes, exc, word):
    plan = _C.BlockPlan([("w", [4, 3], role("mlp"), "")], "adam_mini")
    param = torch.empty(4, 3)
    plan.check_saved(0, _saved(plan, 0), param, "w")
    plan.check_saved(0, _saved(plan, 0), param.bfloat16(), "w")   # fp32 state: any param dtype
    with pytest.raises(exc, match=word):
        plan.check_saved(0, _saved(plan, 0, **changes), param, "AdamMini: w")
    with pytest.raises(TypeError, match="dtype"):   # bf16 state for an fp32 parameter
        plan.check_saved(0, _saved(plan, 0, torch.bfloat16), param, "w")


def test_state_dtype_resolves_relative_to_the_parameter():
    p64, p16 = torch.empty(1, dtype=torch.float64), torch.empty(1, dtype=torch.bfloat16)
    assert _C.state_dtype(_C.StateDType.Param, p16) == torch.bfloat16
    assert _C.state_dtype(_C.StateDType.Scalar, p64) == torch.float64
    assert _C.state_dtype(_C.StateDType.Scalar, p16) == torch.float32
    assert _C.state_dtype(_C.StateDType.Int64, p16) == torch.int64


# ---- the base optimizer on a plan (_planned.py) -------------------------------------------------------
@pytest.mark.parametrize("name", ["adamw", "adam_mini", "slim_adam"])
def test_loading_checks_dtypes_and_keys_and_changes_nothing(name):
    model = make_llama(seed=3)
    opt = memopt_core.make_optimizer(name, model, lr=1e-3)
    params = list(model.parameters())
    set_grads(params, make_grads(params, 0))
    opt.step()
    sd = opt.state_dict()
    first = next(iter(sd["state"]))
    for step in (torch.tensor([1.0]), torch.tensor(1, dtype=torch.int64)):  # old torch's forms
        opt._check_loadable({**sd, "state": {**sd["state"], first: {**sd["state"][first], "step": step}}})
    before = {k: v.clone() for k, v in opt.state[params[0]].items()}
    bad = [{**sd["state"][first], "exp_avg": sd["state"][first]["exp_avg"].double()},
           {**sd["state"][first], "extra": torch.zeros(1)}]
    for entry, exc in zip(bad, (TypeError, ValueError)):
        with pytest.raises(exc, match="the loaded state of"):
            opt.load_state_dict({**sd, "state": {**sd["state"], first: entry}})
    assert all(torch.equal(opt.state[params[0]][k], v) for k, v in before.items())


def test_a_parameter_the_plan_never_saw_is_refused_but_adamw_plans_new_groups():
    model, extra = make_llama(seed=4), torch.nn.Parameter(torch.randn(3, 2))
    mini = memopt_core.AdamMini(model)
    mini.add_param_group({"params": [extra], "param_names": ["extra"]})
    extra.grad = torch.ones(3, 2)
    with pytest.raises(ValueError, match="not given to the constructor"):
        mini.step()
    adamw = memopt_core.AdamW(model.parameters())
    adamw.add_param_group({"params": [extra], "lr": 0.5})
    adamw.step()
    assert adamw.state[extra]["exp_avg_sq"].shape == (3, 2)
