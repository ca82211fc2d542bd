#!/usr/bin/env python
"""APOLLO / APOLLO-Mini step() time, state bytes and step-time memory peak on CPU against PyPI
apollo-torch 1.0.3 and torch's fused AdamW, LLaMA-style models.

Command (from the repo root; about 1 min for 50m on 2 idle cores):
    python bench/bench_apollo.py --size 50m [--write]

Same method as bench/bench_step.py (bench/harness.py): one shared model with a fixed
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness as H  # noqa: E402  (model, contenders, timing, RSS peaks, machine, commit)
from memopt_core.app.models import num_params  # noqa: E402

# memopt's APOLLO, the baseline, then apollo-torch's (where installed)
CONTENDERS = {**H.MEMOPT_APOLLO, H.BASELINE: H.ADAM_CONTENDERS[H.BASELINE],
              **H.apollo_torch_contenders()}


def projected_state_ratio(size: str, name: str) -> float:
    """State of the projected weights against AdamW's 8 bytes/param on them, after one step."""
    model = H.build_model(size)
    opt = CONTENDERS[name](model)
    opt.step()
    weights = H.projected(model)
    return H.state_bytes(opt, weights) / (8 * sum(p.numel() for p in weights))


def main() -> None:
    args = H.arg_parser(__doc__, rounds=7).parse_args()
    if args.memory_child:
        return H.memory_child(CONTENDERS, args.memory_child, args.size)

    names = list(CONTENDERS)
    model = H.build_model(args.size)
    n = num_params(model)
    n_proj = sum(p.numel() for p in H.projected(model))
    print(f"timing {len(names)} optimizers on {args.size} ({n / 1e6:.1f}M params)...", file=sys.stderr)
    times, sbytes = H.time_steps(model, CONTENDERS, args.warmup, args.rounds)
    del model
    gc.collect()
    mem = {} if args.no_memory else {
        name: H.measure_memory(args.size, name, __file__) for name in names}
    ratio = {name: projected_state_ratio(args.size, name) for name in names}

    med = {k: statistics.median(v) for k, v in times.items()}
    base = H.BASELINE
    lines = [f"### APOLLO step() on CPU, LLaMA-style {args.size} ({n / 1e6:.1f}M params, fp32, "
             f"{n_proj / 1e6:.1f}M of them in projected attention/MLP weights)", "",
             f"{datetime.date.today()} | {H.machine()} | torch {torch.__version__} | "
             f"commit {H.commit()} | median of {args.rounds} round-robin rounds after "
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
    H.publish(lines, args.write)


if __name__ == "__main__":
    main()
