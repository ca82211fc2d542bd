"""`memopt compare`: every optimizer (or arm, "name:key=value,...") trained on the same model, seed,
data and schedule, each at its recommended lr unless told otherwise, with an optional lr sweep;
results.json, results.md and compare.png."""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from ..registry import OPTIMIZERS
from .cli_args import (HelpFormatter, add_train_args, check_settings, fraction, machine,
                       nonnegative, parse_settings, split_specs,
                       positive_int, train_config, train_default)
from .compare import best_of_sweep, compare, lr_points, write_outputs
from .train import TrainConfig

# compare's model and steps: --quick (the README's main command) or the fuller default.
QUICK, FULL = dict(model="tiny", steps=120), dict(model="small", steps=300)
# Settings of one compare arm that are the run's, not the optimizer's ("apollo:lr=1e-2").
RUN_SETTINGS = ("lr", "weight_decay", "betas")


def run_compare(args) -> int:
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:  # not given on the command line
            setattr(args, key, value)
    specs = split_specs(args.optimizers) if args.optimizers else list(OPTIMIZERS)
    configs, arms, seen, own_lr = [], [], {}, False
    shared = dict(betas=args.betas, warmup=args.warmup, min_lr=args.min_lr,
                  grad_clip=args.grad_clip)
    for spec in specs:
        name, _, settings = spec.partition(":")
        if name not in OPTIMIZERS:
            raise SystemExit(f"memopt compare: unknown optimizer {name!r}; "
                             f"choose from {', '.join(OPTIMIZERS)}")
        kwargs = parse_settings(settings, "compare")
        check_settings(name, kwargs, "compare")  # every arm before any runs: a typo costs no training
        arm = name + (":" + ",".join(f"{k}={v}" for k, v in kwargs.items()) if kwargs else "")
        seen[arm] = seen.get(arm, 0) + 1
        if seen[arm] > 1:  # the same arm twice: keep both rows apart
            arm = f"{arm} #{seen[arm]}"
        run = {k: kwargs.pop(k) for k in RUN_SETTINGS if k in kwargs}
        if "betas" in run:
            run["betas"] = tuple(run["betas"])
        # lr: the arm's own, else --lr for every arm, else the optimizer's recommended one.
        own_lr |= "lr" in run
        lr = OPTIMIZERS[name].peak_lr(run.pop("lr", args.lr))
        for point in lr_points(lr, args.lr_sweep, args.lr_sweep_factor):
            configs.append(train_config(args, name, optimizer_kwargs=dict(kwargs),
                                        **{**shared, **run, "lr": point}))
            arms.append(arm)
    ran_at = machine()  # before the runs: the commit they ran at
    points = compare(configs)
    results = best_of_sweep(points, arms)
    for r, arm in zip(points, arms):
        r["arm"] = arm
    setup = compare_setup(args, configs, points, own_lr)
    out = Path(args.out or f"runs/compare-{time.strftime('%Y%m%d-%H%M%S')}")
    table = write_outputs(results, out, ran_at, setup, points)
    print("\n" + table)
    print(f"\nwritten: {out}/results.json, {out}/results.md"
          + (f", {out}/compare.png" if (out / "compare.png").exists() else
             " (no PNG: pip install matplotlib for the plot)"))
    return 0


def compare_setup(args, configs: list[TrainConfig], points: list[dict], own_lr: bool) -> dict:
    """What every run of a compare shared, and how the lrs were chosen (results.json "setup"
    and the plot's title)."""
    first = configs[0] if configs else train_config(args, "adamw")
    if args.lr is not None:
        choice = f"lr {args.lr:g} for every optimizer"
    else:
        choice = "each optimizer at its recommended lr"
    if own_lr:
        choice += " (runs with their own lr= at theirs)"
    if args.lr_sweep > 1:
        choice = (f"best validation loss of {args.lr_sweep} lrs (x{args.lr_sweep_factor:g} "
                  f"apart) around {choice.replace('each optimizer at ', '')}")
    choice += f"; betas {tuple(first.betas)}, weight decay {first.weight_decay:g}, warmup " \
              f"{first.warmup:g}, min lr {first.min_lr:g}x, grad clip {first.grad_clip:g}, " \
              f"seed {first.seed}"
    return dict(model=first.model, params=points[0]["params"] if points else None,
                dtype=first.dtype, steps=first.steps, batch_size=first.batch_size,
                seq_len=first.seq_len, tokens=first.steps * first.batch_size * first.seq_len,
                data=points[0].get("data") if points else None, tokenizer=first.tokenizer,
                seed=first.seed, betas=list(first.betas), weight_decay=first.weight_decay,
                warmup=first.warmup, min_lr=first.min_lr, grad_clip=first.grad_clip,
                lr=args.lr, lr_sweep=args.lr_sweep, lr_sweep_factor=args.lr_sweep_factor,
                recommended_lr={n: s.lr for n, s in OPTIMIZERS.items()}, lr_choice=choice)


def _betas(text: str) -> tuple:
    """argparse type: "0.9,0.95" -> (0.9, 0.95), each in [0, 1)."""
    try:
        betas = tuple(float(x) for x in text.strip("()[] ").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not two numbers like 0.9,0.95") from None
    if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
        raise argparse.ArgumentTypeError(f"betas must be two numbers in [0, 1), got {text!r}")
    return betas


def add_compare_subcommand(sub) -> None:
    c = sub.add_parser("compare", help="train one model with each optimizer, same seed and data, "
                                       "and compare memory, speed and loss", formatter_class=HelpFormatter)
    c.add_argument("--optimizers", help=f"comma-separated (default all: {','.join(OPTIMIZERS)}); "
                                        "settings after a colon, runs separated by spaces: "
                                        "\"adamw frugal:density=0.25 apollo:lr=1e-2,rank=64\" "
                                        "(lr, weight_decay and betas set that run's own)")
    add_train_args(c, steps=None, model=None)
    next(a for a in c._actions if a.dest == "lr").help = (
        "one peak lr for every run instead of each optimizer's recommended one (a run's own "
        "lr= still wins; --lr-sweep centres on it); default: each optimizer's recommended lr ("
        + ", ".join(f"{n} {s.lr:g}" for n, s in OPTIMIZERS.items()) + ")")
    c.add_argument("--lr-sweep", type=positive_int, default=1, metavar="K",
                   help="run each optimizer at K lrs around its own, geometric (K=3: lr/f, lr, "
                        "lr*f; K=4 adds lr*f^2; K=5: lr/f^2 ... lr*f^2) and report the one with "
                        "the best validation loss; every point goes to results.json")
    c.add_argument("--lr-sweep-factor", type=float, default=2.0, metavar="F",
                   help="ratio f between neighbouring lrs of a sweep")
    c.add_argument("--betas", type=_betas, default=train_default("betas"), metavar="B1,B2",
                   help="Adam betas of every run (a run's own betas= wins)")
    c.add_argument("--warmup", type=fraction, default=train_default("warmup"),
                   help="fraction of the steps with linear lr warmup")
    c.add_argument("--min-lr", type=fraction, default=train_default("min_lr"),
                   help="cosine decay ends at this fraction of the peak lr")
    c.add_argument("--grad-clip", type=nonnegative, default=train_default("grad_clip"),
                   help="global-norm gradient clipping (0: off)")
    c.add_argument("--quick", action="store_true",
                   help="tiny model (head_dim 32), 120 steps: about 2 minutes on 2 CPU cores "
                        "(default: small model, 300 steps)")
    c.add_argument("--out", help="output directory (default runs/compare-<time>)")
    c.set_defaults(func=run_compare)
