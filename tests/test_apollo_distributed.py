"""Apollo / ApolloMini under FSDP2 (2 gloo ranks on CPU, one spawn for every configuration):
the tiny LLaMA in float64 with fully_shard per decoder layer and on the root, stepped with
projection refreshes, must equal a single-process run within 1e-12 relative, parameters and
every state tensor. A second LLaMA has sizes whose rows split unevenly (odd row counts on the
Left and the Right side), and a third runs as HSDP on a (1, 2) mesh. The "columns" cases shard
the Left weights by columns (distributed.apollo_shard_placement): then only scalars cross ranks
and every rank holds 1/world of the moments."""
from __future__ import annotations

import pytest
import torch

import memopt_core
from memopt_core import _C
from conftest import make_grads, make_llama
from dist_util import full, run_workers

STEPS = 5  # refreshes at steps 0, 2 and 4 (update_proj_gap=2)
# hidden 21 (3 heads of 4, 1 kv head), MLP 45: down (21, 45) Left with 11 + 10 rows; o (21, 12)
# and gate/up (45, 21) Right with 11 + 10 and 23 + 22 rows; q (12, 21), k/v (4, 21) Left
UNEVEN = dict(hidden_size=21, num_attention_heads=3, head_dim=4, num_key_value_heads=1,
              intermediate_size=45)
CASES = [  # (name, model overrides, optimizer, options, hsdp, Left weights by columns)
    ("apollo", {}, "Apollo", dict(rank=4), False, False),
    ("mini", {}, "ApolloMini", dict(scale_front=True), False, False),
    ("apollo-uneven", UNEVEN, "Apollo", dict(rank=3, scale_type="tensor"), False, False),
    ("mini-uneven-redrawn", UNEVEN, "ApolloMini", dict(store_projection=False), False, False),
    ("apollo-nolimiter-hsdp", UNEVEN, "Apollo", dict(rank=2, norm_growth_limit=None), True, False),
    ("apollo-empty-shard", "tiny", "Apollo", dict(rank=2), False, False),
    ("apollo-columns", {}, "Apollo", dict(rank=3), False, True),
    ("apollo-tensor-columns-redrawn", {}, "Apollo",
     dict(rank=2, scale_type="tensor", store_projection=False), False, True),
    # odd column counts cannot be split evenly: those Left weights stay row shards
    ("mini-columns-hsdp-mixed", dict(UNEVEN, intermediate_size=46), "ApolloMini",
     dict(scale_front=True), True, True),
    ("apollo-nolimiter-columns", "tiny", "Apollo", dict(rank=1, norm_growth_limit=None), False, True),
]


def _model(overrides):
    """The LLaMA with `overrides`, or ("tiny") two bias-free linears whose (1, 8) weight leaves
    rank 1 an empty row shard (Left; by columns 4 + 4) and whose (7, 3) weight splits 4 + 3
    (Right)."""
    if overrides == "tiny":
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(8, 1, bias=False),
                                   torch.nn.Linear(3, 7, bias=False)).double()
    return make_llama(dtype=torch.float64, **overrides)


def _run(model, cls, options, set_grad):
    opt = getattr(memopt_core, cls)(model, lr=1e-2, weight_decay=0.1, update_proj_gap=2,
                                    **options)
    params = list(model.parameters())
    for step in range(STEPS):
        for p, g in zip(params, make_grads(params, step)):
            set_grad(p, g)
        opt.step()
    return opt, params


def _snapshot(opt, params):
    return {"params": [full(p).detach().clone() for p in params],
            "state": [{k: full(v).detach().clone() for k, v in sorted(opt.state[p].items())}
                      for p in params]}


def _worker(rank, world):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import distribute_tensor
    from memopt_core.distributed import apollo_shard_placement, local

    def set_grad(p, g):
        p.grad = distribute_tensor(g, p.device_mesh, p.placements)

    out = {}
    for name, overrides, cls, options, hsdp, columns in CASES:
        model = _model(overrides)
        mesh = (init_device_mesh("cpu", (1, world), mesh_dim_names=("replicate", "shard"))
                if hsdp else init_device_mesh("cpu", (world,)))
        place = dict(shard_placement_fn=apollo_shard_placement(mesh)) if columns else {}
        for layer in model.model.layers if overrides != "tiny" else model:
            fully_shard(layer, mesh=mesh, **place)
        fully_shard(model, mesh=mesh, **place)
        opt, params = _run(model, cls, options, set_grad)
        out[name] = _snapshot(opt, params)
        out[name]["reduced_bytes"] = opt.reduced_bytes
        out[name]["state_bytes"] = opt.state_bytes()
        # this rank's moments of the projected weights, all of them, one slice of the split dim
        moments = [(local(opt.state[p][k]).numel(), opt.state[p][k].numel(),
                    opt.state[p][k].numel() // max(1, opt.state[p][k].shape[p.placements[-1].dim]))
                   for g in opt.param_groups if g.get("rank") for p in g["params"]
                   for k in ("exp_avg", "exp_avg_sq")]
        out[name]["moments"] = [sum(m[i] for m in moments) for i in range(3)]
        if name == "apollo":
            out["rejected"] = _rejected_step(opt, params, set_grad)
    out["columns"] = _column_shards_elsewhere(set_grad, apollo_shard_placement(world))
    model = make_llama(dtype=torch.float64)  # svd cannot be sharded: refused up front
    fully_shard(model)
    try:
        memopt_core.Apollo(model, rank=2, proj="svd")
        out["svd"] = None
    except ValueError as e:
        out["svd"] = str(e)
    return out


def _column_shards_elsewhere(set_grad, place):
    """AdamW on column shards (elementwise: any shard) after STEPS steps, and the error each
    optimizer whose statistics assume row shards raises, with every parameter unchanged."""
    from torch.distributed.fsdp import fully_shard
    from memopt_core.distributed import local
    out = {}
    for cls in ("AdamW", "AdamMini", "SlimAdam", "Frugal"):
        model = make_llama(dtype=torch.float64)
        for layer in model.model.layers:
            fully_shard(layer, shard_placement_fn=place)
        fully_shard(model, shard_placement_fn=place)
        params = list(model.parameters())
        before = [local(p).clone() for p in params]
        try:
            opt = getattr(memopt_core, cls)(params if cls == "AdamW" else model, lr=1e-2)
            for step in range(STEPS):
                for p, g in zip(params, make_grads(params, step)):
                    set_grad(p, g)
                opt.step()
            out[cls] = [full(p).detach().clone() for p in params]
        except ValueError as e:
            out[cls] = (str(e), all(torch.equal(local(p), b) for p, b in zip(params, before)))
    return out


def _rejected_step(opt, params, set_grad):
    """A step whose last group (AdamW) is invalid raises after the APOLLO group's statistics
    were computed, and leaves every local shard of parameters and state as it was."""
    from memopt_core.distributed import local
    for p, g in zip(params, make_grads(params, STEPS)):
        set_grad(p, g)
    before = [local(t).clone() for p in params for t in (p, *opt.state[p].values())]
    opt.param_groups[-1]["lr"] = -1.0
    try:
        opt.step()
        return "stepped"
    except ValueError as e:
        after = [local(t) for p in params for t in (p, *opt.state[p].values())]
        return ("learning rate" in str(e) and len(after) == len(before)
                and all(torch.equal(a, b) for a, b in zip(after, before)))


@pytest.fixture(scope="module")
def sharded():
    return run_workers(_worker, 2)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_fsdp2_equals_single_process(sharded, case):
    name, overrides, cls, options, _, columns = case
    from memopt_core.distributed import apollo_shard_placement
    dim_of = apollo_shard_placement(2) if columns else (lambda p: torch.distributed.tensor.Shard(0))

    def set_grad(p, g):
        p.grad = g

    opt, params = _run(_model(overrides), cls, options, set_grad)
    ref = _snapshot(opt, params)
    worst = 0.0
    for got in (sharded[0][name], sharded[1][name]):
        for a, b in zip(got["params"], ref["params"]):
            worst = max(worst, ((a - b).abs().max() / b.abs().max()).item())
        for sa, sb in zip(got["state"], ref["state"]):
            assert sa.keys() == sb.keys()
            for k in sb:
                a, b = sa[k].double(), sb[k].double()
                assert a.shape == b.shape, (name, k)
                if k in ("seed", "step"):
                    assert torch.equal(a, b), (name, k)
                else:
                    worst = max(worst, ((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item())
        # exactly the statistics of the projected weights cross ranks: the partial R of Left
        # row shards and a few scalars, nothing weight-sized (by columns: scalars only)
        sent = 8 * sum(
            _C.apollo_shard_stats_numel(list(p.shape), g["rank"], g["proj"], g["proj_type"],
                                        g["scale_type"], g["norm_growth_limit"] or 0.0,
                                        dim_of(p).dim)
            for g in opt.param_groups if g.get("rank") for p in g["params"])
        assert got["reduced_bytes"] == sent
        if overrides != "tiny":
            assert 0 < got["reduced_bytes"] < sum(p.numel() for p in params) * 8 // 4
        lefts = [p for g in opt.param_groups if g.get("rank") for p in g["params"]
                 if opt.plan.side(opt._index[p]) == "left"]
        if columns:
            assert any(dim_of(p).dim == 1 for p in lefts)
        if columns and all(dim_of(p).dim == 1 for p in lefts):
            assert got["reduced_bytes"] <= 8 * 3 * len(params)
            mine, whole, one_slice = got["moments"]  # unsharded / world + one slice
            assert mine <= whole / 2 + one_slice, (name, got["moments"])
        assert got["state_bytes"] < opt.state_bytes()
    assert worst <= 1e-12, (name, worst)


def test_rejected_sharded_step_changes_nothing(sharded):
    assert [r["rejected"] for r in sharded] == [True, True]


def test_svd_refused_on_sharded_weights(sharded):
    for r in sharded:
        assert r["svd"] is not None and "proj='random'" in r["svd"]


def test_column_shards_elsewhere(sharded):
    """AdamW steps column shards exactly as one process; AdamMini, SlimAdam and Frugal, whose
    statistics assume row shards, refuse them with the reason, before any write."""
    model = make_llama(dtype=torch.float64)
    params = list(model.parameters())
    opt = memopt_core.AdamW(params, lr=1e-2)
    for step in range(STEPS):
        for p, g in zip(params, make_grads(params, step)):
            p.grad = g
        opt.step()
    for r in sharded:
        got = r["columns"]
        assert all(torch.allclose(a, b, rtol=1e-12, atol=0) for a, b in zip(got["AdamW"], params))
        for cls in ("AdamMini", "SlimAdam", "Frugal"):
            message, untouched = got[cls]
            assert f"{cls} supports" in message and "Shard(0)" in message, message
            assert untouched, cls
