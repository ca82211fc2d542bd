"""Optimizer step under FSDP2 on CPU: step time against torch.optim.AdamW, bytes all-reduced per
step, and optimizer state per rank.

    .venv/bin/python bench/bench_distributed.py [--size 50m] [--layers 4] [--ranks 2] [--write]

`--ranks` processes (gloo, one thread each) shard a LLaMA with fully_shard per decoder layer and
root, set the same fixed gradients (distributed with each parameter's placements), and step
every contender in rotated rounds, each step between two barriers so a rank waiting on another's
all-reduce counts. Bytes all-reduced are counted by wrapping torch.distributed.all_reduce during
the step, so every contender (adam-mini 1.1.1 included, with model_sharding=True) is counted the
same way. Medians over rounds; rank 0 prints a markdown table (--write appends it to
bench/RESULTS.md).
"""
from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import (HP, Adam_mini, append_results, arg_parser, commit, machine,  # noqa: E402
                     model_config, state_bytes)

import memopt_core  # noqa: E402
from memopt_core.app.models import Llama  # noqa: E402

CONTENDERS = {
    "torch AdamW": lambda m: torch.optim.AdamW(m.parameters(), **HP),
    "memopt AdamW": lambda m: memopt_core.AdamW(m.parameters(), **HP),
    "memopt AdamMini": lambda m: memopt_core.AdamMini(m, **HP),
    "memopt SlimAdam": lambda m: memopt_core.SlimAdam(m, **HP),
    "memopt Apollo": lambda m: memopt_core.make_optimizer("apollo", m, **HP),
    "memopt ApolloMini": lambda m: memopt_core.ApolloMini(m, **HP),
    "memopt Apollo, Left by columns": lambda m: memopt_core.make_optimizer("apollo", m, **HP),
    "memopt ApolloMini, Left by columns": lambda m: memopt_core.ApolloMini(m, **HP),
    "memopt Frugal rho=0.25": lambda m: memopt_core.Frugal(m, **HP, density=0.25),
}
# contenders whose model FSDP2 shards with the optimizer's own placement (Apollo.fsdp_placement)
BY_COLUMNS = {n for n in CONTENDERS if n.endswith("Left by columns")}
if Adam_mini is not None:
    CONTENDERS["adam-mini 1.1.1"] = lambda m: Adam_mini(
        m.named_parameters(), **HP, dim=m.config.hidden_size, n_heads=m.config.num_attention_heads,
        n_kv_heads=m.config.num_key_value_heads, model_sharding=True, verbose=False)


class AllReduceCounter:
    """Counts the bytes passed to torch.distributed.all_reduce while active."""

    def __init__(self):
        self.bytes, self._orig = 0, dist.all_reduce

    def __enter__(self):
        def counted(tensor, *a, **k):
            local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
            self.bytes += local.numel() * local.element_size()
            return self._orig(tensor, *a, **k)
        dist.all_reduce = counted
        return self

    def __exit__(self, *exc):
        dist.all_reduce = self._orig


def build(size, layers, placement=None):
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import distribute_tensor
    torch.manual_seed(0)
    model = Llama(model_config(size, layers))
    for layer in model.model.layers:
        fully_shard(layer, shard_placement_fn=placement)
    fully_shard(model, shard_placement_fn=placement)
    gen = torch.Generator().manual_seed(1)
    for p in model.parameters():
        g = torch.randn(p.shape, generator=gen).mul_(1e-3)
        p.grad = distribute_tensor(g, p.device_mesh, p.placements)
    return model


def rank_main(rank, world, port, a):
    import os
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    rows, times = {}, {}
    opts = {}
    for name, make in CONTENDERS.items():
        model = build(a.size, a.layers,
                      memopt_core.Apollo.fsdp_placement(world) if name in BY_COLUMNS else None)
        try:
            opts[name] = (make(model), model)
            with AllReduceCounter() as c:
                opts[name][0].step()  # warm-up; state allocated
            rows[name] = c.bytes
        except Exception as e:  # noqa: BLE001  (reported in the table)
            rows[name] = f"fails: {type(e).__name__}: {str(e).splitlines()[0][:90]}"
            opts.pop(name, None)
        dist.barrier()
    names = list(opts)
    for r in range(a.rounds):
        for n in names[r % len(names):] + names[:r % len(names)]:
            dist.barrier()
            t0 = time.perf_counter()
            opts[n][0].step()
            dist.barrier()
            times.setdefault(n, []).append(time.perf_counter() - t0)
    state = {n: state_bytes(o) for n, (o, _) in opts.items()}  # this rank's shards
    if rank == 0:
        report(a, world, rows, times, state, opts)
    dist.destroy_process_group()


def report(a, world, rows, times, state, opts):
    model = next(iter(opts.values()))[1] if opts else build(a.size, a.layers)
    pbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    base = statistics.median(times["torch AdamW"]) if "torch AdamW" in times else None
    lines = [f"### FSDP2 step, {a.size} LLaMA ({a.layers} layers, {pbytes / 4e6:.1f}M params), "
             f"{world} ranks gloo, fp32",
             f"{machine()}; torch {torch.__version__}; commit {commit()}; median of {a.rounds} "
             f"rounds; command: `python bench/bench_distributed.py --size {a.size} --layers "
             f"{a.layers} --ranks {world}`", "",
             "| optimizer | step ms | x torch AdamW | all-reduced bytes/step | % of param bytes | "
             "state MiB/rank |", "|---|---:|---:|---:|---:|---:|"]
    for name, sent in rows.items():
        if isinstance(sent, str):
            lines.append(f"| {name} | {sent} | | | | |")
            continue
        ms = statistics.median(times[name]) * 1e3
        ratio = f"{ms / (base * 1e3):.2f}" if base else "-"
        lines.append(f"| {name} | {ms:.1f} | {ratio} | {sent:,} | {100 * sent / pbytes:.3f} | "
                     f"{state[name] / 2**20:.1f} |")
    table = "\n".join(lines)
    print(table)
    if a.write:
        append_results(table)


def main():
    from torch.multiprocessing import spawn
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from dist_util import free_port
    ap = arg_parser(__doc__, rounds=5, sizes=("50m", "200m", "llama-130m"))
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--ranks", type=int, default=2)
    a = ap.parse_args()
    spawn(rank_main, args=(a.ranks, free_port(), a), nprocs=a.ranks, join=True)


if __name__ == "__main__":
    main()
