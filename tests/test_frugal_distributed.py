"""Frugal under FSDP2 (2 ranks on gloo, the tiny LLaMA in float64, fully_shard per decoder layer
and at the root) and torch.distributed.checkpoint:

- selection="block" (density 0.25, 0.5, 1 with re-selections every 2 steps), "columns" and the
  projections "svd" / "random" / "randperm" give the parameters and every state tensor of one
  process stepping the same full gradients, with one frugal_ op call per step (one param group,
  one device, one process group), or for the projections (the tiny LLaMA has left- and
  right-projected weights) one frugal_shard_stats_ / frugal_shard_update_ pair around one
  all-reduce of exactly the left projections' partial P^T G;
- "rows" / "randk", which cannot step on row shards, raise a ValueError naming the others;
- a DCP checkpoint saved on 2 ranks (block: another active set than a fresh optimizer's, so the
  loader must adopt the selection first; flattened and nested) resumes bit-identically on 2
  ranks, and within float64 rounding in one process without a process group;
- in one process, get/set_optimizer_state_dict and a DCP save/load round trip the selection.
The distributed tests share one spawn that runs every configuration."""
from __future__ import annotations

import warnings

import pytest
import torch

import memopt_core
from conftest import make_grads, make_llama
from dist_util import full, run_workers

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
WORLD, STEPS, SAVE_AT = 2, 6, 3
HP = dict(lr=1e-2, weight_decay=0.1, update_gap=2, seed=3)
CONFIGS = {"block-0.25": dict(density=0.25), "block-0.5": dict(density=0.5),
           "block-1.0": dict(density=1.0), "columns-0.25": dict(density=0.25, selection="columns"),
           "svd-0.25": dict(density=0.25, selection="svd"),
           "random-0.25": dict(density=0.25, selection="random"),
           "randperm-0.5": dict(density=0.5, selection="randperm")}
PROJECTIONS = ("svd-0.25", "random-0.25", "randperm-0.5")
UNSHARDABLE = ("rows", "randk")
_OPS = ("memopt::frugal_", "memopt::frugal_shard_stats_", "memopt::frugal_shard_update_")
# (config, flatten_optimizer_state_dict) of the DCP checkpoints saved at step SAVE_AT
DCP_CASES = [("block-0.5", True), ("block-0.25", False), ("columns-0.25", True),
             ("random-0.25", False)]


def _model(seed=0, shard=False):
    model = make_llama(seed=seed, dtype=torch.float64)
    if shard:
        from torch.distributed.fsdp import fully_shard
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
    return model


def _steps(model, opt, a, b):
    from torch.distributed.tensor import distribute_tensor
    params = list(model.parameters())
    for s in range(a, b):
        for p, g in zip(params, make_grads(params, s)):
            p.grad = distribute_tensor(g, p.device_mesh, p.placements) if hasattr(p, "placements") else g
        opt.step()


def _snapshot(model, opt):
    """Full parameters and full state values (a collective under a process group)."""
    params = list(model.parameters())
    state = [{k: full(v).detach().clone() for k, v in sorted(opt.state[p].items())}
             if p in opt.state else {} for p in params]
    return [full(p).detach().clone() for p in params], state


def _options(flatten):
    from torch.distributed.checkpoint.state_dict import StateDictOptions
    return StateDictOptions(flatten_optimizer_state_dict=flatten)


def _save(model, opt, path, flatten):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict
    dcp.save({"model": get_model_state_dict(model),
              "optim": get_optimizer_state_dict(model, opt, options=_options(flatten))},
             checkpoint_id=path)


def _resume(model, opt, path, flatten):
    """Model and optimizer from a DCP checkpoint (works with and without a process group)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict
    msd = {"model": get_model_state_dict(model)}
    dcp.load(msd, checkpoint_id=path)
    set_model_state_dict(model, msd["model"])
    opt.load_checkpoint(model, path, options=_options(flatten))


def _frugal(model, name):
    import warnings
    with warnings.catch_warnings():  # svd's all-gather warning (tested on its own)
        warnings.simplefilter("ignore")
        return memopt_core.Frugal(model, **HP, **CONFIGS[name])


def _count_calls(opt):
    """{op name: calls} of the FRUGAL ops in one step() (they dispatch on local shards)."""
    from torch.utils._python_dispatch import TorchDispatchMode
    counts = dict.fromkeys(_OPS, 0)

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func._schema.name in counts:
                counts[func._schema.name] += 1
            return func(*args, **(kwargs or {}))

    with Count():
        opt.step()
    return counts


def _worker(rank, world, ckpt_dir):
    out = {"exact": {}, "bytes": {}, "errors": {}, "dcp": {}}
    from torch.distributed.tensor import DTensor
    full_tensor = DTensor.full_tensor
    for name in CONFIGS:
        model = _model(shard=True)
        opt = _frugal(model, name)
        gathers = out.setdefault("gathers", {}).setdefault(name, [])  # the step of each
        DTensor.full_tensor = lambda self, *a, **k: (gathers.append(opt.plan.selection.t),
                                                     full_tensor(self, *a, **k))[1]
        try:
            _steps(model, opt, 0, STEPS)
        finally:
            DTensor.full_tensor = full_tensor
        out["exact"][name] = _snapshot(model, opt)
        out["bytes"][name] = opt.state_bytes(), opt.planned_state_bytes()
        # a 7th step with the last gradients
        out.setdefault("calls", {})[name] = _count_calls(opt), opt.reduced_bytes
    for sel in UNSHARDABLE:
        try:
            memopt_core.Frugal(_model(shard=True), selection=sel)
        except ValueError as e:
            out["errors"][sel] = str(e)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        memopt_core.Frugal(_model(shard=True), selection="svd")
    out["svd_warnings"] = [str(w.message) for w in caught]
    for name, flatten in DCP_CASES:
        path = f"{ckpt_dir}/{name}-{flatten}"
        model = _model(shard=True)
        opt = _frugal(model, name)
        _steps(model, opt, 0, SAVE_AT)
        _save(model, opt, path, flatten)
        _steps(model, opt, SAVE_AT, STEPS)
        straight = _snapshot(model, opt)
        model = _model(seed=1, shard=True)  # other weights, and a fresh optimizer's selection
        opt = _frugal(model, name)
        _resume(model, opt, path, flatten)
        _steps(model, opt, SAVE_AT, STEPS)
        out["dcp"][(name, flatten)] = (straight, _snapshot(model, opt))
    return out


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    ckpt_dir = str(tmp_path_factory.mktemp("frugal_dcp"))
    return run_workers(_worker, WORLD, ckpt_dir), ckpt_dir


def _rel_err(a, b):
    scale = max(max((x.abs().max().item() for x in b if x.numel()), default=0.0), 1e-300)
    return max(((x.double() - y.double()).abs().max().item() for x, y in zip(a, b) if x.numel()),
               default=0.0) / scale


def _assert_close(got, want, tol):
    (gp, gs), (wp, ws) = got, want
    assert _rel_err(gp, wp) <= tol
    for g, w in zip(gs, ws):
        assert sorted(g) == sorted(w)
        for k in w:
            assert g[k].shape == w[k].shape, k
            assert _rel_err([g[k]], [w[k]]) <= tol, k


@pytest.mark.parametrize("name", list(CONFIGS))
def test_fsdp2_equals_one_process(ranks, name):
    model = _model()
    opt = _frugal(model, name)
    _steps(model, opt, 0, STEPS)
    want = _snapshot(model, opt)
    # the left projections' g_low: the only statistics that cross ranks, float64
    left = sum(opt.state[p]["exp_avg"].numel() for p in opt._projs if opt._mode(p) == 7)
    for out in ranks[0]:
        _assert_close(out["exact"][name], want, 1e-12)
        calls, reduced = out["calls"][name]
        held, planned = out["bytes"][name]
        if name in PROJECTIONS:
            assert left and calls == {_OPS[0]: 0, _OPS[1]: 1, _OPS[2]: 1}
            assert reduced == 8 * left
            # left moments and right P are replicated, the rest split in halves
            assert held == planned and held < 0.75 * opt.state_bytes()
        else:
            assert calls == {_OPS[0]: 1, _OPS[1]: 0, _OPS[2]: 0} and reduced == 0
            # each rank holds its half of the moments
            assert held == planned and held < 0.55 * opt.state_bytes()


def test_unshardable_selections_raise_clearly(ranks):
    for out in ranks[0]:
        for sel in UNSHARDABLE:
            msg = out["errors"][sel]
            assert f"selection={sel!r}" in msg and "selection='block'" in msg and "'columns'" in msg


def test_svd_warns_once_and_gathers_only_at_reselections(ranks):
    n = len(_frugal(_model(), "svd-0.25")._projs)
    for out in ranks[0]:
        assert len(out["svd_warnings"]) == 1 and "full_tensor()" in out["svd_warnings"][0]
        # each projectable gradient once per update_gap steps; no other selection gathers
        assert sorted(out["gathers"]["svd-0.25"]) == [t for t in range(0, STEPS, 2) for _ in range(n)]
        assert not any(out["gathers"][name] for name in CONFIGS if name != "svd-0.25")


@pytest.mark.parametrize("name,flatten", DCP_CASES)
def test_dcp_resume_on_two_ranks_is_bit_identical(ranks, name, flatten):
    for out in ranks[0]:
        straight, resumed = out["dcp"][(name, flatten)]
        _assert_close(resumed, straight, 0.0)


@pytest.mark.parametrize("name,flatten", DCP_CASES)
def test_dcp_two_rank_checkpoint_resumes_in_one_process(ranks, name, flatten):
    results, ckpt_dir = ranks
    model = _model(seed=1)
    opt = _frugal(model, name)
    _resume(model, opt, f"{ckpt_dir}/{name}-{flatten}", flatten)
    _steps(model, opt, SAVE_AT, STEPS)
    _assert_close(_snapshot(model, opt), results[0]["dcp"][(name, flatten)][0], 1e-12)


# ---- one process ------------------------------------------------------------------------------
@pytest.mark.parametrize("flatten", [False, True])
def test_get_set_optimizer_state_dict_round_trips_the_selection(flatten):
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict
    model = _model()
    opt = _frugal(model, "block-0.25")
    _steps(model, opt, 0, SAVE_AT)
    sd = get_optimizer_state_dict(model, opt, options=_options(flatten))
    model2 = _model(seed=1)
    model2.load_state_dict(model.state_dict())
    fresh = _frugal(model2, "block-0.25")
    if flatten:  # which tensors hold moments depends on the selection: adopt it first
        with pytest.raises(ValueError, match="load_selection"):
            set_optimizer_state_dict(model2, fresh, sd, options=_options(flatten))
        fresh.load_selection(sd)
    set_optimizer_state_dict(model2, fresh, sd, options=_options(flatten))
    assert fresh.plan.selection.t == SAVE_AT
    assert fresh.plan.selection.active == opt.plan.selection.active
    _steps(model, opt, SAVE_AT, STEPS)
    _steps(model2, fresh, SAVE_AT, STEPS)
    _assert_close(_snapshot(model2, fresh), _snapshot(model, opt), 0.0)


def test_dcp_round_trip_in_one_process(tmp_path):
    model = _model()
    opt = _frugal(model, "block-0.25")
    _steps(model, opt, 0, SAVE_AT)
    _save(model, opt, str(tmp_path), True)
    _steps(model, opt, SAVE_AT, STEPS)
    model2 = _model(seed=1)
    fresh = _frugal(model2, "block-0.25")
    _resume(model2, fresh, str(tmp_path), True)
    _steps(model2, fresh, SAVE_AT, STEPS)
    _assert_close(_snapshot(model2, fresh), _snapshot(model, opt), 0.0)


def test_old_state_dict_with_top_level_selection_loads():
    model = _model()
    opt = _frugal(model, "columns-0.25")
    _steps(model, opt, 0, SAVE_AT)
    sd = opt.state_dict()
    sel = sd["param_groups"][0]["frugal"]
    old = {"state": sd["state"], "frugal": {k: v for k, v in sel.items() if k != "held"},
           "param_groups": [{k: v for k, v in g.items() if k != "frugal"} for g in sd["param_groups"]]}
    model2 = _model(seed=1)
    model2.load_state_dict(model.state_dict())
    fresh = _frugal(model2, "columns-0.25")
    fresh.load_state_dict(old)
    assert all(g["frugal"] is None for g in fresh.param_groups)
    _steps(model, opt, SAVE_AT, STEPS)
    _steps(model2, fresh, SAVE_AT, STEPS)
    _assert_close(_snapshot(model2, fresh), _snapshot(model, opt), 0.0)


def test_bad_selection_raises_and_changes_nothing():
    model = _model()
    opt = _frugal(model, "block-0.25")
    _steps(model, opt, 0, SAVE_AT)
    sd = opt.state_dict()
    before = _snapshot(model, opt), opt.plan.selection
    for bad in (dict(active=[99]), dict(num_projectable=3), dict(selection="columns"),
                dict(cycle=[0])):
        broken = {**sd, "param_groups": [dict(g, frugal={**g["frugal"], **bad})
                                         for g in sd["param_groups"]]}
        for load in (opt.load_state_dict, opt.load_selection):
            with pytest.raises(ValueError):
                load(broken)
    _assert_close(_snapshot(model, opt), before[0], 0.0)
    assert opt.plan.selection.t == before[1].t and opt.plan.selection.active == before[1].active
