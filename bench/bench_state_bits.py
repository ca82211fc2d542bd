#!/usr/bin/env python
"""Low-bit optimizer states on CPU: step() time and state bytes/param of memopt's state_bits=8 /
16 (AdamW, Adam-mini) against torchao's AdamW8bit / AdamW4bit and torch's fused AdamW with fp32
states, LLaMA-style models.

Command (from the repo root; about 2 min for 50m on 2 idle cores, torchao's first steps compile):
    python bench/bench_state_bits.py --size 50m [--device cuda] [--write]

With --device cuda the same table on the GPU, each step between CUDA events.

Same method as bench/bench_step.py (bench/harness.py): one shared model with a fixed random
gradient, contenders stepped round-robin with a rotating start, median step time and its ratio
to torch fused AdamW from the same rounds. torchao's optimizers compile their per-tensor step
with torch.compile (its documented use; eager would be far slower): the warm-up steps include
the compilation. Their state is tensor subclasses; its bytes are those of the codes and scales
they hold (__tensor_flatten__), not of the logical float tensor.
"""
from __future__ import annotations

import datetime
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness as H  # noqa: E402  (model, contenders, timing, machine, commit)
import memopt_core  # noqa: E402
from memopt_core.app.models import num_params  # noqa: E402


def _memopt(cls, needs_model: bool, **kw):
    return lambda m: cls(m if needs_model else m.parameters(), **H.HP, **kw)


CONTENDERS = {
    "memopt AdamW state_bits=8": _memopt(memopt_core.AdamW, False, state_bits=8),
    "memopt AdamMini state_bits=8": _memopt(memopt_core.AdamMini, True, state_bits=8),
    "memopt AdamW state_bits=16": _memopt(memopt_core.AdamW, False, state_bits=16),
    "memopt AdamW": _memopt(memopt_core.AdamW, False),
    H.BASELINE: H.ADAM_CONTENDERS[H.BASELINE],
}
try:  # optional: torchao (the test extras install it)
    from torchao.optim import AdamW4bit, AdamW8bit
    CONTENDERS["torchao AdamW8bit"] = lambda m: AdamW8bit(m.parameters(), **H.HP)
    CONTENDERS["torchao AdamW4bit"] = lambda m: AdamW4bit(m.parameters(), **H.HP)
except ImportError:
    pass


def held_bytes(t: torch.Tensor) -> int:
    """Bytes a state tensor holds: a plain tensor's, or the inner tensors' of a subclass but
    torchao's 256-entry code table ("qmap"), one tensor shared by every state."""
    if type(t) is torch.Tensor or not hasattr(t, "__tensor_flatten__"):
        return t.numel() * t.element_size()
    names, _ = t.__tensor_flatten__()
    return sum(held_bytes(getattr(t, n)) for n in names if n != "qmap")


def main() -> None:
    ap = H.arg_parser(__doc__, rounds=7)
    ap.add_argument("--no-torchao", action="store_true",
                    help="leave torchao out (its steps compile first: minutes on a fresh machine)")
    args = H.parse_device_args(ap)
    model = H.build_model(args.size, args.device)
    n = num_params(model)
    print(f"timing up to {len(CONTENDERS)} optimizers on {args.size} ({n / 1e6:.1f}M params)...",
          file=sys.stderr)
    opts = {name: make(model) for name, make in CONTENDERS.items()
            if not (args.no_torchao and name.startswith("torchao"))}
    times = H.device_round_robin(opts, args)
    sbytes = {name: sum(held_bytes(v) for s in o.state.values() for v in s.values()
                        if torch.is_tensor(v)) for name, o in opts.items()}
    med = {k: statistics.median(v) for k, v in times.items()}
    base = H.BASELINE
    where = H.cuda_machine() + " (CUDA events)" if args.device == "cuda" else H.machine()
    lines = [f"### Low-bit optimizer states, step() on {args.device}, LLaMA-style {args.size} "
             f"({n / 1e6:.1f}M params, fp32 weights)", "",
             f"{datetime.date.today()} | {where} | torch {torch.__version__} | "
             f"commit {H.commit()} | median of {args.rounds} round-robin rounds after "
             f"{args.warmup} warm-up steps | shared, noisy machine: ratios only", "",
             "| optimizer | step ms | vs torch fused AdamW | state bytes/param |",
             "|---|---:|---:|---:|"]
    for name in opts:
        lines.append(f"| {name} | {1e3 * med[name]:.1f} | {med[name] / med[base]:.2f}x "
                     f"| {sbytes[name] / n:.3f} |")
    for fast, slow in (("memopt AdamW state_bits=8", "torchao AdamW8bit"),
                       ("memopt AdamW state_bits=8", base)):
        if slow in med:
            lines.append(f"\n{fast}: {med[slow] / med[fast]:.2f}x the speed of {slow}")
    H.publish(lines, args.write)


if __name__ == "__main__":
    main()
