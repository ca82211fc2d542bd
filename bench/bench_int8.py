"""What int8 weights cost in the optimizer step: every memopt optimizer on a LLaMA whose
attention and MLP weights are int8 (memopt_core.quantize_weights_, groups of 128, bf16
gradients), against the same model with bf16 weights, both with stochastic rounding, fixed
gradients, stepped round-robin in one process (harness.round_robin), median. The int8 step
decodes each span into float32, updates it and encodes it again (absmax per group, a code per
element): the ratio is that arithmetic against the bf16 pass.

    python bench/bench_int8.py [--size 50m] [--rounds 10] [--device cuda] [--write]

On CUDA (CUDA events: harness.cuda_timed_step) the int8 kernels run each chunk's update twice
(cpp/src/cuda/weights.cuh): the ratio is that second pass and the encoding against bf16.
"""
from __future__ import annotations

import statistics
import sys

import harness
import memopt_core


def int8_model(size: str, device: str):
    """harness.build_model's bf16 model with its linears (not the head) made int8, and its
    fixed gradients kept (an int8 layer's gradient is its carrier's)."""
    model = harness.build_model(size, device, dtype="bf16")
    grads = {name: p.grad for name, p in model.named_parameters()}
    memopt_core.quantize_weights_(model, group_size=128)
    for name, p in model.named_parameters():
        p.grad = grads[name]
    return model


def main() -> int:
    args = harness.parse_device_args(harness.arg_parser(__doc__, rounds=10))
    models = {"bf16": harness.build_model(args.size, args.device, dtype="bf16"),
              "int8": int8_model(args.size, args.device)}
    hp = dict(lr=1e-4, weight_decay=0.1, stochastic_rounding=True)
    opts = {(name, fmt): memopt_core.make_optimizer(name, model, **hp)
            for name in memopt_core.OPTIMIZERS for fmt, model in models.items()}
    times = harness.device_round_robin(opts, args)
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    where = harness.device_note(args)
    harness.ratio_report(f"### int8 weights: optimizer step time ({args.size}, {args.device}, "
                         "`bench/bench_int8.py`)", args, f" Stochastic rounding on both.{where}",
                         ("bf16", "int8"),
                         [(n, med[(n, "bf16")], med[(n, "int8")]) for n in memopt_core.OPTIMIZERS])
    return 0


if __name__ == "__main__":
    sys.exit(main())
