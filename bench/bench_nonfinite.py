"""What nonfinite="skip" costs in the optimizer step: every memopt optimizer on a LLaMA with
fixed (finite) gradients, with nonfinite="propagate" and "skip", stepped round-robin in one
process (harness.round_robin), median. "skip" adds torch's fused non-finite check (one read of
every gradient) and the decision: on a GPU a flag the ops read on the device (no host
synchronisation; nonfinite.py), except at APOLLO's and FRUGAL's schedule steps (about one per
200 steps, none in a short run past the first); in the rows "(host decision)" that force it,
the flag read on the host once per step.

    python bench/bench_nonfinite.py [--size 50m] [--rounds 10] [--device cuda] [--write]
"""
from __future__ import annotations

import dataclasses
import statistics
import sys

import harness
import memopt_core


def host_decided(spec, model, **kw):
    """The optimizer of `spec` (a registry OptimizerSpec) with its skip decided on the host even
    on a GPU: a subclass that does not declare `_device_skip`."""
    cls = type(spec.cls.__name__ + "HostDecision", (spec.cls,), {"_device_skip": False})
    return dataclasses.replace(spec, cls=cls).make(model, **kw)


def main() -> int:
    args = harness.parse_device_args(harness.arg_parser(__doc__, rounds=10))
    model = harness.build_model(args.size, args.device)
    hp = dict(lr=1e-4, weight_decay=0.1)
    opts, rows = {}, []
    for name, spec in memopt_core.OPTIMIZERS.items():
        for policy in ("propagate", "skip"):
            opts[(name, policy)] = memopt_core.make_optimizer(name, model, nonfinite=policy, **hp)
        rows.append((name, (name, "propagate"), (name, "skip")))
        if args.device == "cuda" and getattr(spec.cls, "_device_skip", False):
            opts[(name, "host")] = host_decided(spec, model, nonfinite="skip", **hp)
            rows.append((f"{name} (host decision)", (name, "propagate"), (name, "host")))
    times = harness.device_round_robin(opts, args)
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    harness.ratio_report(f"### nonfinite=\"skip\": optimizer step time ({args.size}, "
                         f"{args.device}, `bench/bench_nonfinite.py`)", args,
                         harness.device_note(args),
                         ("propagate", "skip"), [(n, med[a], med[b]) for n, a, b in rows])
    return 0


if __name__ == "__main__":
    sys.exit(main())
