#!/usr/bin/env python
"""APOLLO / APOLLO-Mini step() time, state bytes and step-time memory peak on CPU against PyPI
apollo-torch 1.0.3 and torch's fused AdamW, LLaMA-style models.

Command (from the repo root; about 1 min for 50m on 2 idle cores):
    python bench/bench_apollo.py --size 50m [--write]

Same method as bench/bench_step.py (whose harness this reuses): one shared model with a fixed
random gradient, contenders stepped round-robin with a rotating start, median step time and its
ratio to torch fused AdamW from the same rounds; memory peaks in fresh subprocesses. APOLLO
settings are the paper's (rank d/4 = 128 for the 50m model's d = 512, update_proj_gap 200,
channel scaling, limiter on; Mini: rank 1, tensor scaling, scale 128) and the apollo-torch groups
are the ones its main_pretrain.py builds: the weights of nn.Linear modules whose name contains
"attn" or "mlp" are projected, the rest (embeddings, norms, lm_head) get its AdamW. The timed
steps are between projection refreshes (the refresh at step 0 falls in the warm-up), the steady
state of 199 steps out of 200 for both implementations.
"""
from __future__ import annotations

import datetime
import gc
import statistics
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_step as B  # noqa: E402  (harness: model, timing, RSS peaks, machine, commit)

import memopt_core  # noqa: E402

RANK = 128
APOLLO = dict(rank=RANK, proj="random", proj_type="std", scale_type="channel", update_proj_gap=200,
              scale=1.0)
MINI = dict(rank=1, proj="random", proj_type="std", scale_type="tensor", update_proj_gap=200,
            scale=128.0)

try:
    import apollo_torch
except ImportError:
    apollo_torch = None


def _apollo_torch(settings):
    def make(model):
        lowrank = projected(model)
        ids = {id(p) for p in lowrank}
        rest = [p for p in model.parameters() if id(p) not in ids]
        return apollo_torch.APOLLOAdamW([{"params": rest}, {"params": lowrank, **settings}], **B.HP)
    return make


def _ours(cls, settings):
    return lambda model: cls(model, **B.HP, **settings)


CONTENDERS = {
    f"memopt Apollo r={RANK}": _ours(memopt_core.Apollo, APOLLO),
    f"memopt Apollo r={RANK}, no P stored": _ours(memopt_core.Apollo,
                                                  dict(APOLLO, store_projection=False)),
    "memopt ApolloMini": _ours(memopt_core.ApolloMini, MINI),
    "torch AdamW fused": B.CONTENDERS["torch AdamW fused"],
}
if apollo_torch is not None:
    CONTENDERS[f"apollo-torch 1.0.3 r={RANK}"] = _apollo_torch(APOLLO)
    CONTENDERS["apollo-torch 1.0.3 Mini"] = _apollo_torch(MINI)
else:
    print("apollo-torch not installed (pip install apollo-torch==1.0.3): reference left out",
          file=sys.stderr)
B.CONTENDERS.update(CONTENDERS)  # the harness looks contenders up by name


def state_bytes(opt, params=None) -> int:
    """Bytes of every state tensor, apollo-torch's projection matrices included (they live in a
    GradientProjector object in its state, where bench_step's count does not look)."""
    wanted = None if params is None else {id(p) for p in params}
    total = 0
    for p, s in opt.state.items():
        if wanted is not None and id(p) not in wanted:
            continue
        for v in s.values():
            v = getattr(v, "ortho_matrix", v)
            total += v.numel() * v.element_size() if torch.is_tensor(v) else 0
    return total


B.state_bytes = state_bytes  # used by the harness's timing and memory children


def projected(model) -> list:
    """The weights both implementations project (apollo-torch's main_pretrain rule; memopt's
    role-based choice picks the same tensors on this model)."""
    return [m.weight for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and ("attn" in n or "mlp" in n)]


def projected_state_ratio(size: str, name: str) -> float:
    """State of the projected weights against AdamW's 8 bytes/param on them, after one step."""
    model = B.build_model(size)
    opt = CONTENDERS[name](model)
    opt.step()
    weights = projected(model)
    return state_bytes(opt, weights) / (8 * sum(p.numel() for p in weights))


def main() -> None:
    args = B.arg_parser(__doc__, rounds=7).parse_args()
    if args.memory_child:
        return B.memory_child(args.size, args.memory_child)

    names = list(CONTENDERS)
    model = B.build_model(args.size)
    n = B.num_params(model)
    n_proj = sum(p.numel() for p in projected(model))
    print(f"timing {len(names)} optimizers on {args.size} ({n / 1e6:.1f}M params)...", file=sys.stderr)
    times, sbytes = B.time_steps(model, names, args.warmup, args.rounds)
    del model
    gc.collect()
    mem = {} if args.no_memory else {
        name: B.measure_memory(args.size, name, __file__) for name in names}
    ratio = {name: projected_state_ratio(args.size, name) for name in names}

    med = {k: statistics.median(v) for k, v in times.items()}
    base = B.BASELINE
    lines = [f"### APOLLO step() on CPU, LLaMA-style {args.size} ({n / 1e6:.1f}M params, fp32, "
             f"{n_proj / 1e6:.1f}M of them in projected attention/MLP weights)", "",
             f"{datetime.date.today()} | {B.machine()} | torch {torch.__version__} | "
             f"commit {B.commit()} | median of {args.rounds} round-robin rounds after "
             f"{args.warmup} warm-up steps | shared, noisy machine: ratios only", "",
             "| optimizer | step ms | vs torch fused AdamW | state bytes/param | state MiB "
             "| projected weights' state vs AdamW's | peak above params+grads+state (MiB) "
             "| of it, freed after step (MiB) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name in names:
        m = mem.get(name)
        peak = f"{m['over'] / 2**20:.1f} | {m['transient'] / 2**20:.1f}" if m else "- | -"
        lines.append(f"| {name} | {1e3 * med[name]:.1f} | {med[name] / med[base]:.2f}x "
                     f"| {sbytes[name] / n:.2f} | {sbytes[name] / 2**20:.1f} "
                     f"| {100 * ratio[name]:.2f}% | {peak} |")
    table = "\n".join(lines)
    print(table)
    if args.write:
        with (B.ROOT / "bench" / "RESULTS.md").open("a") as f:
            f.write("\n" + table + "\n")
        print("appended to bench/RESULTS.md", file=sys.stderr)


if __name__ == "__main__":
    main()
