"""What stochastic rounding costs: the optimizer step of every memopt optimizer on a bf16 LLaMA
(harness.build_model: fixed gradients, fp32 state where the plan says so), rounded to nearest
and stochastically, timed round-robin in one process (harness.round_robin), median; the ratio
is the number to read. The bits are drawn inside each op's single pass (a hash per element), so
the ratio is the hash's arithmetic against the pass's memory traffic.

    python bench/bench_rounding.py [--size 50m] [--rounds 10] [--write]
"""
from __future__ import annotations

import statistics
import sys

import memopt_core
import harness

OPTIMIZERS = {
    "adamw": lambda m, **kw: memopt_core.AdamW(m.parameters(), **kw),
    "adam_mini": lambda m, **kw: memopt_core.AdamMini(m, **kw),
    "slim_adam": lambda m, **kw: memopt_core.SlimAdam(m, **kw),
    "frugal": lambda m, **kw: memopt_core.Frugal(m, **kw),
    "apollo": lambda m, **kw: memopt_core.Apollo(m, **kw),
    "apollo_mini": lambda m, **kw: memopt_core.ApolloMini(m, **kw),
}


def main() -> int:
    ap = harness.arg_parser(__doc__, rounds=10)
    args = ap.parse_args()
    model = harness.build_model(args.size, dtype="bf16")
    hp = dict(lr=1e-4, weight_decay=0.1)
    contenders = {}
    for name, make in OPTIMIZERS.items():
        for sr in (False, True):
            contenders[(name, sr)] = (lambda m, make=make, sr=sr:
                                      make(m, stochastic_rounding=sr, **hp))
    times, _ = harness.time_steps(model, contenders, args.warmup, args.rounds)
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    harness.ratio_report(f"### Stochastic rounding: bf16 step time ({args.size}, "
                         "`bench/bench_rounding.py`)", args, "", ("nearest", "stochastic"),
                         [(n, med[(n, False)], med[(n, True)]) for n in OPTIMIZERS])
    return 0


if __name__ == "__main__":
    sys.exit(main())
