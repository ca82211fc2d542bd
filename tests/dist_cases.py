"""Training runs for the distributed tests, written once for both sides of each comparison: a
tiny LLaMA wrapped in DDP, FSDP2 (fully_shard per decoder layer and root) or HSDP, stepped by a
registry optimizer, and the same run in one process on the full batch (wrapper None).

Gradients come from a real forward/backward on a fixed batch, each rank taking its slice, so DDP's
all-reduce and FSDP2's reduce-scatter are part of what is checked (float64 and float32), or are
set directly from conftest.make_grads (`synthetic`, for bf16, whose backward would differ by
reduction order alone), distributed with the parameter's placements."""
from __future__ import annotations

import traceback

import torch

import memopt_core
from conftest import make_grads, make_llama
from dist_util import full

# Head blocks straddle FSDP2's shards: 3 heads of 8 rows over 2 ranks cut head 1 in half, one kv
# head is cut in two, and 67 vocabulary rows split 34/33.
STRADDLE = dict(hidden_size=24, num_attention_heads=3, num_key_value_heads=1, intermediate_size=40,
                vocab_size=67)
HPARAMS = {"adamw": {}, "adam_mini": {}, "slim_adam": {}, "apollo": dict(update_proj_gap=2),
           "apollo_mini": dict(update_proj_gap=2), "frugal": dict(update_gap=2, density=0.5)}
BATCH, SEQ = 4, 8


def batch(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (BATCH, SEQ), generator=torch.Generator().manual_seed(7))


def device_of(rank: int) -> torch.device:
    """cuda:rank in an NCCL run, else the CPU."""
    import torch.distributed as dist
    nccl = dist.is_initialized() and dist.get_backend() == "nccl"
    return torch.device("cuda", rank) if nccl else torch.device("cpu")


def build(name, wrapper, dtype, straddle=False, world=1, rank=0):
    """(model, its optimizer, the module to call) for one case."""
    model = make_llama(dtype=dtype, **(STRADDLE if straddle else {})).to(device_of(rank))
    inner = model
    if wrapper == "ddp":
        model = torch.nn.parallel.DistributedDataParallel(model)
    elif wrapper in ("fsdp", "hsdp", "fsdp-columns"):  # columns: APOLLO's Left weights
        from torch.distributed.fsdp import fully_shard
        from memopt_core.distributed import apollo_shard_placement
        mesh, place = None, {}
        if wrapper == "hsdp":
            from torch.distributed.device_mesh import init_device_mesh
            mesh = init_device_mesh(device_of(rank).type, (2, world // 2),
                                    mesh_dim_names=("replicate", "shard"))
        if wrapper == "fsdp-columns":
            place = dict(shard_placement_fn=apollo_shard_placement(world))
        for layer in inner.model.layers:
            fully_shard(layer, mesh=mesh, **place)
        fully_shard(inner, mesh=mesh, **place)
    opt = memopt_core.make_optimizer(name, inner, lr=1e-2, **HPARAMS[name])
    return model, inner, opt


def train(model, inner, opt, steps, synthetic, rank=0, world=1, start=0):
    params = list(inner.parameters())
    ids = batch(inner.config.vocab_size).to(device_of(rank))
    per = BATCH // world
    for step in range(start, start + steps):
        if synthetic:
            for p, g in zip(params, make_grads(params, step)):
                g = g.to(device_of(rank))
                p.grad = g if not hasattr(p, "device_mesh") else _distribute(g, p)
        else:
            mine = ids[rank * per:(rank + 1) * per]
            model(input_ids=mine, labels=mine).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def _distribute(g, p):
    from torch.distributed.tensor import distribute_tensor
    return distribute_tensor(g, p.device_mesh, p.placements)


def snapshot(inner, opt) -> dict:
    """Full parameters and state (every rank must call: DTensors gather)."""
    params = list(inner.parameters())
    return {"params": [full(p).detach().clone() for p in params],  # (on the CPU)
            "state": [{k: full(v).detach().clone() for k, v in opt.state[p].items()
                       if isinstance(v, torch.Tensor)} for p in params],
            "state_bytes": opt.state_bytes(), "reduced_bytes": getattr(opt, "reduced_bytes", 0)}


def run_case(case, rank=0, world=1) -> dict:
    """case = (optimizer, wrapper or None, dtype name, straddle, synthetic, steps)."""
    name, wrapper, dtype, straddle, synthetic, steps = case
    model, inner, opt = build(name, wrapper, getattr(torch, dtype), straddle, world, rank)
    train(model, inner, opt, steps, synthetic, rank, world)
    return snapshot(inner, opt)


def reference(case) -> dict:
    """The same case in this process, unwrapped, on the full batch."""
    name, _, dtype, straddle, synthetic, steps = case
    return run_case((name, None, dtype, straddle, synthetic, steps))


def worker(rank, world, cases):
    """{case: snapshot, or the error a case raised (as text, so one failing case does not hide
    the others)}; ranks other than 0 return their state bytes only."""
    out = {}
    for case in cases:
        try:
            out[case] = run_case(case, rank, world)
        except Exception:  # noqa: BLE001  (reported by the test that checks this case)
            out[case] = {"error": traceback.format_exc()}
    if rank:
        return {c: {"state_bytes": r.get("state_bytes"), "error": r.get("error")} for c, r in out.items()}
    return out


def max_rel_err(got: dict, want: dict) -> float:
    """Largest |got - want| over every parameter and state tensor, relative to that tensor's
    largest |want|."""
    worst = 0.0
    pairs = list(zip(got["params"], want["params"]))
    for gs, ws in zip(got["state"], want["state"]):
        assert set(gs) == set(ws), f"state keys {sorted(gs)} vs {sorted(ws)}"
        pairs += [(gs[k], ws[k]) for k in ws if k != "step"]
    for a, b in pairs:
        a, b = a.double(), b.double()
        assert a.shape == b.shape
        scale = b.abs().max().item() if b.numel() else 0.0
        if scale:
            worst = max(worst, (a - b).abs().max().item() / scale)
    return worst

