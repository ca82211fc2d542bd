"""The sharded APOLLO ops on CUDA (memopt::apollo_shard_stats_ / apollo_shard_update_) against
the CPU shard ops on the weights, splits and settings of tests/apollo_shard_util.py, and their
validation before any write. "emu" runs the CUDA kernels and glue on the host (tools/cuda_emu),
"cuda" runs them on a GPU build and skips without one."""
from __future__ import annotations

import pytest
import torch

from apollo_shard_util import (CONFIGS, LAYOUTS, SHAPES, STATS, STEPS, _grads, _make_shards,
                               _one_shard_args, _relerr, _shard_step)
from cuda_util import EMU, TOL as CUDA_TOL, assert_cuda_build, ops, requires_cuda, tensor_device


@pytest.mark.parametrize("device", [EMU, pytest.param("cuda", marks=requires_cuda)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("store", [True, False], ids=["stored", "redrawn"])
@pytest.mark.parametrize("config", ["apollo", "apollo-nolimiter", "apollo-tensor",
                                    "mini-front-nolimiter", "mini-front"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_gpu_shards_equal_cpu_shards(layout, config, store, dtype, device):
    """The CUDA shard ops (on a GPU, or the host-emulated glue) against the CPU shard ops on 1..3
    row shards of a Left and a Right weight, over 8 steps with refreshes at 0, 3 and 6: every
    shard's parameter, moments, P, seed, limiter norm and step, within the CPU-vs-CUDA
    tolerance of the dtype (cuda_util.TOL). Seeds and limiter norms live on the device."""
    if device == "cuda":
        assert_cuda_build()
    ns, dev = ops(device), tensor_device(device)
    cfg, dims = CONFIGS[config], LAYOUTS[layout]
    gen = torch.Generator().manual_seed(0)
    full = [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype) for s in SHAPES]
    worst = 0.0
    for n_shards in (1, 2, 3):
        cpu = _make_shards(full, cfg, store, n_shards, dims=dims)
        gpu = _make_shards(full, cfg, store, n_shards, dev, dims)
        for step in range(STEPS):
            grads = _grads(SHAPES, step, dtype)
            _shard_step(cpu, grads, cfg, store, dims=dims)
            _shard_step(gpu, grads, cfg, store, ns, dev, dims)
        for k, (row_c, row_g) in enumerate(zip(cpu, gpu)):
            for i, ((pc, sc, _), (pg, sg, _)) in enumerate(zip(row_c, row_g)):
                where = (config, n_shards, k, i)
                for name, a, b in (("param", pg, pc), ("m", sg["m"], sc["m"]),
                                   ("v", sg["v"], sc["v"]), ("norm", sg["norm"], sc["norm"])):
                    err = _relerr(a.cpu(), b)
                    worst = max(worst, err)
                    assert err <= CUDA_TOL[dtype], (where, name, err)
                if store:
                    assert torch.equal(sg["proj"].cpu(), sc["proj"]), (where, "proj")
                assert sg["seed"].item() == sc["seed"].item() and sg["step"].item() == STEPS
                assert sg["norm"].device == sg["m"].device
    print(f"{device} {config} {dtype}: worst relative error {worst:.2e}")


@pytest.mark.parametrize("device", [EMU, pytest.param("cuda", marks=requires_cuda)])
def test_gpu_bad_input_raises_and_writes_nothing(device):
    """The CUDA ops run the CPU op's validator before any write: a wrong-sized statistics
    buffer raises the same ValueError and leaves every tensor untouched."""
    dev = tensor_device(device)
    args = [[t.to(dev) for t in a] if k < 7 and isinstance(a, list) else
            (a.to(dev) if k == STATS else a)
            for k, a in enumerate(_one_shard_args(stats_numel_delta=1))]
    before = [[t.clone() for t in a] if isinstance(a, list) and a and isinstance(a[0], torch.Tensor)
              else a for a in args]
    ns = ops(device)
    for op in (ns.apollo_shard_stats_, ns.apollo_shard_update_):
        with pytest.raises(ValueError, match="stats must be"):
            op(*args)
    for a, b in zip(args, before):
        if isinstance(b, list) and b and isinstance(b[0], torch.Tensor):
            assert all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("device", ["cpu", EMU, pytest.param("cuda", marks=requires_cuda)])
@pytest.mark.parametrize("config", ["apollo", "mini-front"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_a_found_inf_shard_step_is_a_step_never_taken(layout, config, device):
    """The shard ops' found_inf (FSDP2 APOLLO decided on the device): after a first step without
    it (a refresh), steps 1-3 pass it, step 1 with a NaN gradient and the flag set; 2 shards of
    each weight end equal to the run that never took step 1 (no count it reaches is due for a
    refresh, gap 3): parameters, moments, limiter norms, P, seeds and step counts, bit for bit
    (within float32 rounding on a GPU)."""
    ns, dev = ops(device), tensor_device(device)
    cfg, dims = CONFIGS[config], LAYOUTS[layout]
    gen = torch.Generator().manual_seed(0)
    full = [torch.randn(s, generator=gen, dtype=torch.float32) for s in SHAPES]
    runs = []
    for with_found in (True, False):
        shards = _make_shards(full, cfg, True, 2, dev, dims)
        for step in range(4):
            if step == 1 and not with_found:
                continue
            grads = _grads(SHAPES, step, torch.float32)
            if step == 1:
                grads[0].view(-1)[3] = float("nan")
            found = {}
            if with_found and step > 0:
                for row in shards:  # the counters live beside the parameters
                    for _, state, _ in row:
                        state["step"] = state["step"].to(dev)
                found = {"found_inf": torch.full((1,), float(step == 1), device=dev)}
            _shard_step(shards, grads, cfg, True, ns, dev, dims, **found)
        runs.append(shards)
    for row_f, row_r in zip(*runs):
        for (pf, sf, _), (pr, sr, _) in zip(row_f, row_r):
            assert pf.isfinite().all() and float(sf["step"]) == 3
            for a, b in ((pf, pr), *((sf[k], sr[k]) for k in ("m", "v", "norm", "proj", "seed"))):
                if device == "cuda":
                    torch.testing.assert_close(a.cpu(), b.cpu(), rtol=1e-5, atol=1e-7)
                else:
                    assert torch.equal(a, b)
