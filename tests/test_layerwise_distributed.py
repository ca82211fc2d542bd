"""LayerwiseStep with data parallelism, 2 ranks on gloo: under DDP (comm-hook stepping) and under
FSDP2 (post-accumulate-grad hooks on the sharded parameters) it gives the same parameters as the
ordinary step() of the same wrapper, on every rank alike, and as one process on the full batch;
the trailing opt.step() is a true no-op; a plain multi-process run without ddp= is refused.
Each test is one spawn that runs every configuration (spawns dominate the run time)."""
from __future__ import annotations

import contextlib

import pytest
import torch

import memopt_core
from conftest import make_llama
from dist_util import full, run_workers

STEPS, WORLD = 3, 2
LAYERWISE_NAMES = [n for n, s in memopt_core.OPTIMIZERS.items() if s.cls.steps_single_params]

# (optimizer, grad_accum, gradient_as_bucket_view, find_unused_parameters, no_sync on the
# first K-1 micro-batches). find_unused runs add a parameter that is used on one rank only,
# in some windows only, so "which parameters have a gradient" differs by rank and by window.
DDP_CONFIGS = [
    ("adamw", 1, False, False, False),
    ("adamw", 2, True, False, True),
    ("adam_mini", 1, True, False, False),
    ("adam_mini", 2, False, False, False),
    ("adamw", 2, False, True, True),
    ("adam_mini", 2, True, True, False),
]


class Wrap(torch.nn.Module):
    """The tiny LLaMA, plus (extra=True) a projection of the embeddings that adds to the loss
    only when asked, so DDP sees a parameter that is unused on some ranks or steps."""

    def __init__(self, extra: bool):
        super().__init__()
        self.lm = make_llama(dtype=torch.float64)
        self.extra = torch.nn.Linear(32, 32, bias=False).double() if extra else None

    def forward(self, ids, use_extra=False):
        loss = self.lm(input_ids=ids, labels=ids).loss
        return loss + self.extra_loss(ids) if use_extra else loss

    def extra_loss(self, ids):
        return self.extra(self.lm.model.embed_tokens(ids)).pow(2).mean()


def batch(step: int, micro: int, rank: int):
    gen = torch.Generator().manual_seed(1000 * step + 10 * micro + rank)
    return torch.randint(0, 64, (2, 8), generator=gen)


def uses_extra(extra: bool, step: int, micro: int, rank: int) -> bool:
    return extra and rank == 1 and step % 2 == 0 and micro == 0


def _train_ddp(rank, name, accum, bav, find_unused, no_sync, layerwise):
    from torch.nn.parallel import DistributedDataParallel as DDP
    model = Wrap(extra=find_unused)
    ddp = DDP(model, gradient_as_bucket_view=bav, find_unused_parameters=find_unused,
              bucket_cap_mb=0.01)  # several buckets, rebuilt after the first iteration
    opt = memopt_core.make_optimizer(name, model, lr=1e-2, weight_decay=0.1)
    lw = memopt_core.LayerwiseStep(opt, grad_accum=accum, ddp=ddp) if layerwise else None
    for step in range(STEPS):
        for micro in range(accum):
            sync = not no_sync or micro == accum - 1
            with contextlib.nullcontext() if sync else ddp.no_sync():
                loss = ddp(batch(step, micro, rank), uses_extra(find_unused, step, micro, rank))
                (loss / accum).backward()
            assert lw is None or lw.at_boundary == (micro == accum - 1)
        if lw is not None:
            # what DDP wrote back was freed: the trailing step finds no gradient, changes nothing
            assert all(p.grad is None for p in model.parameters())
            before = [p.detach().clone() for p in model.parameters()]
        opt.step()
        opt.zero_grad()
        if lw is not None:
            assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    return [p.detach().clone() for p in model.parameters()]


def _refusals(rank):
    """Messages of the refused setups (and that grads_reduced=True is accepted)."""
    from torch.nn.parallel import DistributedDataParallel as DDP
    out = {}
    model = torch.nn.Linear(4, 3).double()
    try:
        memopt_core.LayerwiseStep(memopt_core.AdamW(model.parameters()))
    except RuntimeError as e:
        out["plain"] = str(e)
    memopt_core.LayerwiseStep(memopt_core.AdamW(model.parameters()), grads_reduced=True).remove()
    other = torch.nn.Linear(4, 3).double()
    ddp = DDP(model)
    try:
        memopt_core.LayerwiseStep(memopt_core.AdamW(list(model.parameters()) + list(other.parameters())), ddp=ddp)
    except ValueError as e:
        out["outside"] = str(e)
    lw = memopt_core.LayerwiseStep(memopt_core.AdamW(model.parameters()), ddp=ddp)
    try:
        with ddp.no_sync():  # grad_accum=1: this backward ends the window, and reduces nothing
            ddp(torch.ones(2, 4, dtype=torch.float64)).sum().backward()
    except RuntimeError as e:
        out["no_sync"] = str(e)
    out["kept_local_grads"] = all(p.grad is not None for p in model.parameters())
    lw.remove()
    return out


def _ddp_worker(rank, world):
    results = {cfg: [_train_ddp(rank, *cfg, layerwise=lw) for lw in (False, True)]
               for cfg in DDP_CONFIGS}
    return results, _refusals(rank)


def _single_process(name, accum, extra):
    """The same training in one process on the full batch (both ranks' micro-batches)."""
    model = Wrap(extra)
    opt = memopt_core.make_optimizer(name, model, lr=1e-2, weight_decay=0.1)
    for step in range(STEPS):
        for micro in range(accum):
            ids = [batch(step, micro, r) for r in range(WORLD)]
            loss = model(torch.cat(ids))
            for r in range(WORLD):
                if uses_extra(extra, step, micro, r):
                    loss = loss + model.extra_loss(ids[r]) / WORLD
            (loss / accum).backward()
        opt.step()
        opt.zero_grad()
    return [p.detach() for p in model.parameters()]


def test_layerwise_under_ddp_equals_ddp_step_and_refuses_unreduced_gradients():
    ranks = run_workers(_ddp_worker, WORLD)
    for cfg in DDP_CONFIGS:
        name, accum, _, find_unused, _ = cfg
        (ordinary, layerwise), other = ranks[0][0][cfg], ranks[1][0][cfg]
        for a, b in zip(ordinary + layerwise, other[0] + other[1]):
            assert torch.equal(a, b), f"{cfg}: ranks differ"
        for a, b in zip(ordinary, layerwise):
            torch.testing.assert_close(b, a, rtol=1e-13, atol=1e-15, msg=f"{cfg}: layer-wise")
        assert any(not torch.equal(a, b) for a, b in zip(ordinary, Wrap(find_unused).parameters()))
        for a, b in zip(_single_process(name, accum, find_unused), layerwise):
            torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12, msg=f"{cfg}: full batch")
    refusals = ranks[0][1]
    assert "ddp=ddp_model" in refusals["plain"] and "grads_reduced=True" in refusals["plain"]
    assert "not reduced by this DDP module" in refusals["outside"]
    assert "outside no_sync()" in refusals["no_sync"] and refusals["kept_local_grads"]


# ---- FSDP2 --------------------------------------------------------------------------------
# Optimizers whose ordinary step() still raises under FSDP2 (their sharded support is being
# written): their cases xfail on exactly that error, strictly, so the mark must go once they pass.
FSDP2_PENDING: set = set()
FSDP_CONFIGS = [(n, 1) for n in LAYERWISE_NAMES] + [("adamw", 2), ("adam_mini", 2)]


class StepUnsupportedUnderFSDP2(Exception):
    """The ordinary FSDP2 step() raised: nothing to compare layer-wise stepping with."""


def _train_fsdp(rank, name, accum, layerwise):
    from torch.distributed.fsdp import fully_shard
    model = make_llama(dtype=torch.float64)
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    opt = memopt_core.make_optimizer(name, model, lr=1e-2, weight_decay=0.1)
    lw = memopt_core.LayerwiseStep(opt, grad_accum=accum) if layerwise else None
    for step in range(STEPS):
        for micro in range(accum):  # FSDP2 reduce-scatters every micro-batch here
            ids = batch(step, micro, rank)
            (model(input_ids=ids, labels=ids).loss / accum).backward()
        if lw is not None:
            assert lw.at_boundary and all(p.grad is None for p in model.parameters())
            before = [p.to_local().clone() for p in model.parameters()]
        opt.step()
        opt.zero_grad()
        if lw is not None:
            assert all(torch.equal(a, p.to_local()) for a, p in zip(before, model.parameters()))
    return [full(p).detach().clone() for p in model.parameters()]


def _fsdp_worker(rank, world):
    """{cfg: [ordinary, layer-wise] parameters, or ("step" | "layerwise", the error)}."""
    out = {}
    for cfg in FSDP_CONFIGS:
        for layerwise in (False, True):
            try:
                out.setdefault(cfg, []).append(_train_fsdp(rank, *cfg, layerwise=layerwise))
            except Exception as e:  # noqa: BLE001 - reported per case by the test below
                out[cfg] = ("layerwise" if layerwise else "step", f"{type(e).__name__}: {e}")
                break
    return out


@pytest.fixture(scope="module")
def fsdp_runs():
    return run_workers(_fsdp_worker, WORLD)


@pytest.mark.parametrize("cfg", [
    pytest.param(cfg, id=f"{cfg[0]}-accum{cfg[1]}", marks=pytest.mark.xfail(
        raises=StepUnsupportedUnderFSDP2, strict=True,
        reason=f"{cfg[0]}.step() raises under FSDP2 (sharded support pending)"))
    if cfg[0] in FSDP2_PENDING else pytest.param(cfg, id=f"{cfg[0]}-accum{cfg[1]}")
    for cfg in FSDP_CONFIGS])
def test_layerwise_under_fsdp2_equals_fsdp2_step(fsdp_runs, cfg):
    r0, r1 = fsdp_runs[0][cfg], fsdp_runs[1][cfg]
    for r in (r0, r1):
        if isinstance(r, tuple) and r[0] == "step":
            raise StepUnsupportedUnderFSDP2(r[1])
        assert not isinstance(r, tuple), f"layer-wise {cfg[0]} under FSDP2 raised: {r[1]}"
    (ordinary, layerwise), other = r0, r1
    for a, b in zip(ordinary + layerwise, other[0] + other[1]):
        assert torch.equal(a, b), f"{cfg}: ranks differ"
    for a, b in zip(ordinary, layerwise):
        torch.testing.assert_close(b, a, rtol=1e-13, atol=1e-15)
    assert any(not torch.equal(a, b) for a, b in zip(ordinary, make_llama(dtype=torch.float64).parameters()))
