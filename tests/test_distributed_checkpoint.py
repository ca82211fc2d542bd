"""torch.distributed.checkpoint (DCP) with every optimizer's state: get_state_dict /
set_state_dict of model and optimizer saved by 2 FSDP2 ranks and loaded by 2 ranks continues
bit-identically; loaded by one process (and saved by one, loaded by 2) it continues within
float64 rounding of the uninterrupted single-process run. APOLLO's also with its Left weights
sharded by columns (apollo_shard_placement), whose moments are column shards."""
import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_state_dict,
                                                     set_model_state_dict, set_state_dict)

from torch.distributed.tensor import Shard

import memopt_core
from dist_cases import build, max_rel_err, snapshot, train
from dist_util import run_workers

NAMES = sorted(memopt_core.OPTIMIZERS)
CASES = [(n, "fsdp") for n in NAMES] + [("apollo", "fsdp-columns"), ("apollo_mini", "fsdp-columns")]
IDS = [f"{n}-{w}" for n, w in CASES]
# DCP says so when it saves or loads in one process (the 1 -> 2 and 2 -> 1 directions).
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
BEFORE, AFTER = 2, 2  # steps before the checkpoint, steps after it


def save(model, opt, path):
    msd, osd = get_state_dict(model, opt)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=path)


def load(model, opt, path):
    if hasattr(opt, "load_checkpoint"):  # Frugal: its selection decides which state exists
        msd = get_model_state_dict(model)
        dcp.load({"model": msd}, checkpoint_id=path)
        set_model_state_dict(model, msd)
        opt.load_checkpoint(model, path, key="optim")
        return
    msd, osd = get_state_dict(model, opt)
    sd = {"model": msd, "optim": osd}
    dcp.load(sd, checkpoint_id=path)
    set_state_dict(model, opt, model_state_dict=sd["model"], optim_state_dict=sd["optim"])


def fresh(name, wrapper, world=1):
    return build(name, wrapper, torch.float64, straddle=True, world=world)


def worker(rank, world, root):
    """Per optimizer: uninterrupted, resumed from our own checkpoint, and resumed from a
    single-process checkpoint (root/<name>-single), all on FSDP2."""
    out = {}
    for (name, wrapper), key in zip(CASES, IDS):
        try:
            model, inner, opt = fresh(name, wrapper, world)
            train(model, inner, opt, BEFORE, False, rank, world)
            save(model, opt, f"{root}/{key}")
            train(model, inner, opt, AFTER, False, rank, world, start=BEFORE)
            straight = snapshot(inner, opt)
            model, inner, opt = fresh(name, wrapper, world)
            load(model, opt, f"{root}/{key}")
            train(model, inner, opt, AFTER, False, rank, world, start=BEFORE)
            resumed = snapshot(inner, opt)
            model, inner, opt = fresh(name, wrapper, world)
            load(model, opt, f"{root}/{name}-single")
            train(model, inner, opt, AFTER, False, rank, world, start=BEFORE)
            columns = [k for p in inner.parameters() for k, v in opt.state.get(p, {}).items()
                       if getattr(v, "placements", (None,))[-1] == Shard(1)]
            out[key] = dict(straight=straight, resumed=resumed, from_single=snapshot(inner, opt),
                            column_states=len(columns))
        except Exception:  # noqa: BLE001  (the test of this optimizer reports it)
            import traceback
            out[key] = {"error": traceback.format_exc()}
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("dcp")
    singles = {}
    for name in NAMES:  # single-process checkpoints for the 1 -> 2 direction
        model, inner, opt = fresh(name, None)
        train(model, inner, opt, BEFORE, False)
        save(model, opt, f"{root}/{name}-single")
        train(model, inner, opt, AFTER, False, start=BEFORE)
        singles[name] = snapshot(inner, opt)
    return root, singles, run_workers(worker, 2, str(root))


@pytest.mark.parametrize("name,wrapper", CASES, ids=IDS)
def test_dcp_round_trips(runs, name, wrapper):
    root, singles, ranks = runs
    key = f"{name}-{wrapper}"
    for r, res in enumerate(ranks):
        assert "error" not in res[key], f"rank {r}:\n{res[key]['error']}"
    res = ranks[0][key]
    assert (res["column_states"] > 0) == (wrapper == "fsdp-columns")
    # 2 -> 2: bit-identical continuation
    assert max_rel_err(res["resumed"], res["straight"]) == 0.0
    # 1 -> 2 and the sharded run against one process
    assert max_rel_err(res["from_single"], singles[name]) <= 1e-12
    assert max_rel_err(res["straight"], singles[name]) <= 1e-12
    # 2 -> 1: a single process loads the sharded checkpoint and continues
    model, inner, opt = fresh(name, None)
    load(model, opt, f"{root}/{key}")
    train(model, inner, opt, AFTER, False, start=BEFORE)
    assert max_rel_err(snapshot(inner, opt), singles[name]) <= 1e-12
