"""`memopt snr`: a short full-Adam probe on a built-in model and corpus that measures the SNR of
Adam's second moment (memopt_core.snr.SNRTracker) and writes SlimAdam rules."""
from __future__ import annotations

import math
import sys

import torch

from ..snr import SNRTracker

def add_snr_subcommand(subparsers) -> None:
    """Registers `memopt snr` on the CLI's argparse subparsers (dispatches to run_snr)."""
    p = subparsers.add_parser(
        "snr", help="run a short full-Adam probe, measure the SNR of Adam's second moment and "
                    "write SlimAdam rules")
    p.add_argument("--model", default="tiny", help="memopt_core.app.models preset (default tiny)")
    p.add_argument("--arch", choices=["llama", "gpt"], default="llama")
    p.add_argument("--steps", type=int, default=200, help="probe steps (default 200)")
    p.add_argument("--every", type=int, default=20, help="measure every N steps (default 20)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--cutoff", type=float, default=1.0, help="SNR a dim set must exceed (1.0)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="slimadam_rules.json", help="rules JSON to write")
    p.add_argument("--csv", default=None, help="also write every measurement to this CSV")
    p.add_argument("--plot", default=None, help="also plot SNR per tensor and dim set (PNG)")
    p.set_defaults(func=run_snr)


def _probe_setup(args):
    """(model, endless (x, y) batches) for the probe; the one place that knows the built-ins."""
    from . import corpus, models
    torch.manual_seed(args.seed)
    model = models.build(args.model, arch=args.arch)
    return model, corpus.batches(args.seq_len, args.batch_size, args.seed)


def run_snr(args) -> int:
    from ..adamw import AdamW
    from ..slim_adam import SlimAdam
    if args.steps < 1 or args.every < 1:
        raise SystemExit("memopt snr: --steps and --every must be at least 1")
    model, data = _probe_setup(args)
    opt = AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=args.weight_decay)
    tracker = SNRTracker(model, start_step=1, early_every=args.every, late_every=args.every)
    for _ in range(args.steps):
        x, y = next(data)
        opt.zero_grad(set_to_none=True)
        model(x, y)[1].backward()
        opt.step()
        tracker.update(opt)
    rules = tracker.save_json(args.out, args.cutoff)
    if args.csv:
        tracker.save_csv(args.csv)
    if args.plot:
        tracker.plot(args.plot, args.cutoff)
    means = tracker.mean_snr()
    width = max(len(n) for n in rules)
    print(f"{'tensor':<{width}}  {'best K':>8}  {'SNR':>8}  rule")
    for name, dims in rules.items():
        best = max(means.get(name, {}).items(), key=lambda kv: kv[1], default=((), math.nan))
        print(f"{name:<{width}}  {str(best[0]):>8}  {best[1]:8.3g}  {dims}")
    kept = SlimAdam(model, rules=rules).v_entries()
    total = sum(p.numel() for p in model.parameters())
    print(f"\n{len(rules)} rules -> {args.out}; with them SlimAdam keeps {kept:,} of {total:,} "
          f"second-moment entries ({100 * (1 - kept / total):.2f}% saved)", file=sys.stderr)
    return 0
