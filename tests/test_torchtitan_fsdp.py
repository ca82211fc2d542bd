"""memopt optimizers through torchtitan 0.3.0's optimizer container on its llama3 debug model
(torchtitan_util.py) sharded by FSDP2 on 2 gloo ranks: each equals the single-process run,
resumes bit for bit from its sharded DCP checkpoint, and the checkpoint reshards into one process.

Skipped unless torchtitan 0.3.0 and triton are installed (pip install torchtitan==0.3.0 triton).
"""
import pytest
import torch

# first: skips this module without torchtitan and triton
from torchtitan_util import HP, OPTIONS, backward, debug_model

import torch.distributed.checkpoint as dcp

import memopt_core
from memopt_core.integrations.torchtitan import MemoptOptimizersContainer


def _fsdp_worker(rank, world, root):
    """Each optimizer through the container on the debug model sharded by FSDP2 (fully_shard per
    block and root, as torchtitan's parallelize does): 2 steps, a DCP save of the container
    (sharded state), 2 more; then a fresh sharded run loads the checkpoint and repeats them."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import distribute_tensor

    from dist_util import full

    def sharded(name, values=None):
        model = debug_model()
        for layer in model.layers.values():
            fully_shard(layer)
        fully_shard(model)
        for p, v in zip(model.parameters(), values or []):
            p.data.copy_(distribute_tensor(v, p.device_mesh, p.placements))
        config = MemoptOptimizersContainer.Config(name=name, **HP, options=OPTIONS.get(name, {}))
        return model, config.build(model_parts=[model])

    def train(model, container, steps):
        for step in steps:  # every rank the same batch: FSDP2's mean of equal gradients is exact
            backward(model, step)
            container.step()
            container.zero_grad()
        return [full(p).detach().clone() for p in model.parameters()]

    out = {}
    for name in NAMES:
        try:
            model, container = sharded(name)
            at_save = train(model, container, range(2))
            dcp.save({"optimizer": container}, checkpoint_id=f"{root}/{name}")
            straight = train(model, container, range(2, 4))
            model, container = sharded(name, at_save)
            dcp.load({"optimizer": container}, checkpoint_id=f"{root}/{name}")
            out[name] = dict(at_save=at_save, straight=straight,
                             resumed=train(model, container, range(2, 4)))
        except Exception:  # noqa: BLE001  (reported by this optimizer's test)
            import traceback
            out[name] = {"error": traceback.format_exc()}
    return out


NAMES = sorted(memopt_core.OPTIMIZERS)


@pytest.fixture(scope="module")
def fsdp_runs(tmp_path_factory):
    from dist_util import run_workers
    root = tmp_path_factory.mktemp("fsdp")
    return root, run_workers(_fsdp_worker, 2, str(root))


def _same(got, want, exact):
    for a, b in zip(got, want, strict=True):
        if exact:
            assert torch.equal(a, b)
        else:  # statistics summed across shards: float32 rounding of the one-process sums
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
@pytest.mark.parametrize("name", NAMES)
def test_fsdp2_through_the_container_with_dcp_resharding(name, fsdp_runs):
    """2 gloo ranks: the sharded run equals the single-process one (AdamW bit for bit, the others
    to float32 rounding of their cross-shard statistics), resumes from its own sharded checkpoint
    bit for bit, and the same checkpoint loads into one process (DCP reshards the state the
    container saved) and continues like the uninterrupted run."""
    root, ranks = fsdp_runs
    for r in ranks:
        assert "error" not in r[name], r[name].get("error")
    exact = name == "adamw"
    model = debug_model()
    direct = memopt_core.make_optimizer(name, model, **HP, **OPTIONS.get(name, {}))
    for step in range(4):
        backward(model, step)
        direct.step()
        direct.zero_grad()
        if step == 1:
            at_save = [p.detach().clone() for p in model.parameters()]
    expected = [p.detach() for p in model.parameters()]
    for r in ranks:
        _same(r[name]["at_save"], at_save, exact)
        _same(r[name]["straight"], expected, exact)
        _same(r[name]["resumed"], r[name]["straight"], exact=True)
    single = debug_model()
    with torch.no_grad():
        for p, v in zip(single.parameters(), ranks[0][name]["at_save"]):
            p.copy_(v)
    config = MemoptOptimizersContainer.Config(name=name, **HP, options=OPTIONS.get(name, {}))
    container = config.build(model_parts=[single])
    dcp.load({"optimizer": container}, checkpoint_id=f"{root}/{name}")
    for step in range(2, 4):
        backward(single, step)
        container.step()
        container.zero_grad()
    _same(list(single.parameters()), ranks[0][name]["straight"], exact)
