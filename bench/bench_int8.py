"""What int8 weights cost in the optimizer step: every memopt optimizer on a LLaMA whose
attention and MLP weights are int8 (memopt_core.quantize_weights_, groups of 128, bf16
gradients), against the same model with bf16 weights, both with stochastic rounding, fixed
gradients, stepped round-robin in one process (harness.round_robin), median. The int8 step
decodes each span into float32, updates it and encodes it again (absmax per group, a code per
element): the ratio is that arithmetic against the bf16 pass.

    python bench/bench_int8.py [--size 50m] [--rounds 10] [--write]
"""
from __future__ import annotations

import statistics
import sys

import torch

import memopt_core
import harness


def int8_model(size: str):
    """harness.build_model's bf16 model with its linears (not the head) made int8, and its
    fixed gradients kept (an int8 layer's gradient is its carrier's)."""
    model = harness.build_model(size, dtype="bf16")
    grads = {name: p.grad for name, p in model.named_parameters()}
    memopt_core.quantize_weights_(model, group_size=128)
    for name, p in model.named_parameters():
        p.grad = grads[name]
    return model


def main() -> int:
    ap = harness.arg_parser(__doc__, rounds=10)
    args = ap.parse_args()
    models = {"bf16": harness.build_model(args.size, dtype="bf16"), "int8": int8_model(args.size)}
    hp = dict(lr=1e-4, weight_decay=0.1, stochastic_rounding=True)
    opts = {(name, fmt): memopt_core.make_optimizer(name, model, **hp)
            for name in memopt_core.OPTIMIZERS for fmt, model in models.items()}
    times = harness.round_robin(opts, args.warmup, args.rounds)
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    rows = [f"### int8 weights: optimizer step time ({args.size}, `bench/bench_int8.py`)",
            "", f"{harness.machine()}, torch {torch.__version__}, commit {harness.commit()}; "
            f"median of {args.rounds} round-robin steps after {args.warmup} warm-up; stochastic "
            "rounding on both.", "",
            "| optimizer | bf16 weights ms | int8 weights ms | int8 / bf16 |",
            "|---|---:|---:|---:|"]
    for name in memopt_core.OPTIMIZERS:
        bf16, int8 = med[(name, "bf16")], med[(name, "int8")]
        rows.append(f"| {name} | {bf16:.1f} | {int8:.1f} | {int8 / bf16:.2f}x |")
    table = "\n".join(rows)
    print(table)
    if args.write:
        harness.append_results(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
