#!/usr/bin/env python
"""FRUGAL step() time, state bytes and step-time memory peak on CPU against torch's fused AdamW.

Command (from the repo root; about 1 min for 50m on 2 idle cores):
    python bench/bench_frugal.py --size 50m [--write]

Same method as bench/bench_step.py (bench/harness.py: model, fixed gradients, round-robin
timing with the median and the ratio to torch fused AdamW from the same rounds, peak RSS in a
fresh subprocess).
Contenders: memopt_core.Frugal with block selection at rho=0.25 (the paper's pre-training
default) and rho=0 (its 7B setting), column selection at rho=0.25, memopt AdamW and torch AdamW
fused. update_gap is the default 200, so the timed steps contain no re-selection (a block
re-selection allocates the new active state and copies kept blocks once per 200 steps).
The loss comparison of the issue (FRUGAL rho=0.25 / rho=0 against AdamW) needs `memopt compare`
(issue 6) and is not part of this script.
"""
from __future__ import annotations

import datetime
import gc
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as H  # noqa: E402
import torch  # noqa: E402

import memopt_core  # noqa: E402
from memopt_core.app.models import num_params  # noqa: E402

HP = H.HP
CONTENDERS = {
    "Frugal block rho=0.25": lambda m: memopt_core.Frugal(m, **HP, density=0.25),
    "Frugal block rho=0": lambda m: memopt_core.Frugal(m, **HP, density=0.0),
    "Frugal columns rho=0.25": lambda m: memopt_core.Frugal(m, **HP, density=0.25,
                                                            selection="columns"),
    "memopt AdamW": H.ADAM_CONTENDERS["memopt AdamW"],
    H.BASELINE: H.ADAM_CONTENDERS[H.BASELINE],
}


def main() -> None:
    args = H.arg_parser(__doc__, rounds=9).parse_args()
    if args.memory_child:
        return H.memory_child(CONTENDERS, args.memory_child, args.size)
    names = list(CONTENDERS)
    model = H.build_model(args.size)
    n = num_params(model)
    times, sbytes = H.time_steps(model, CONTENDERS, args.warmup, args.rounds)
    del model
    gc.collect()
    mem = {} if args.no_memory else {
        k: H.measure_memory(args.size, k, __file__) for k in names}
    med = {k: statistics.median(v) for k, v in times.items()}
    base = med[H.BASELINE]
    lines = [f"### FRUGAL step() on CPU, LLaMA-style {args.size} ({n / 1e6:.1f}M params, fp32)", "",
             f"{datetime.date.today()} | {H.machine()} (shared with other jobs: noisy) | "
             f"torch {torch.__version__} | commit {H.commit()} | median of {args.rounds} "
             f"round-robin rounds after {args.warmup} warm-up steps | "
             "`python bench/bench_frugal.py --size " + args.size + "`", "",
             "| optimizer | step ms | vs torch fused AdamW | state bytes/param | state vs AdamW "
             "| peak above params+grads+state (MiB) |", "|---|---:|---:|---:|---:|---:|"]
    for k in names:
        peak = f"{mem[k]['over'] / 2**20:.1f}" if k in mem else "-"
        lines.append(f"| {k} | {1e3 * med[k]:.1f} | {med[k] / base:.2f}x | {sbytes[k] / n:.2f} "
                     f"| {sbytes[k] / sbytes[H.BASELINE]:.3f} | {peak} |")
    H.publish(lines, args.write)


if __name__ == "__main__":
    main()
