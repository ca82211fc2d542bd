"""`memopt`: compare the optimizers on real text, train with one, plan a large run.

    memopt compare --quick                       # every optimizer, small model, ~2 min on 2 cores
    memopt train --optimizer apollo_mini --model llama-60m --layerwise --grad-clip 0
    torchrun --nproc_per_node 2 -m memopt_core.app.cli train --fsdp --optimizer adamw --ckpt-dir d
    memopt plan --model llama-7b --optimizer apollo_mini --layerwise --dtype bf16
    memopt snr --out rules.json                  # SlimAdam's compression rules from a probe run
"""
from __future__ import annotations

import argparse
import ast
import inspect
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

from .. import __version__
from .compare import best_of_sweep, compare, lr_points, write_outputs
from .models import LLAMA_PRESETS
from .plan import format_plans, plan
from ..registry import OPTIMIZERS
from .train import CHECKPOINT, DCP_CHECKPOINT, TrainConfig, Trainer

# compare's model and steps: --quick (the README's main command) or the fuller default.
QUICK, FULL = dict(model="tiny", steps=120), dict(model="small", steps=300)
# Settings of one compare arm that are the run's, not the optimizer's ("apollo:lr=1e-2").
RUN_SETTINGS = ("lr", "weight_decay", "betas")


class _HelpFormatter(argparse.HelpFormatter):
    """Every option's help ends with its default (argparse's own formatter skips options
    without a help text and those whose help names none)."""

    def add_argument(self, action):
        if action.help is None and action.default is not None and action.default is not False \
                and action.default is not argparse.SUPPRESS:
            action.help = "default: %(default)s"  # argparse prints no help line for None
        super().add_argument(action)

    def _get_help_string(self, action):
        text = action.help or ""
        if "%(default)" in text or "default" in text or action.default is None or \
                action.default is False or action.default is argparse.SUPPRESS:
            return text
        return f"{text} (default: %(default)s)"


def _ranged(cast, lo, hi=None, what="a number"):
    """An argparse type: `cast` of the text, within [lo, hi] (no upper bound without hi)."""
    def parse(text: str):
        try:
            value = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if value < lo or (hi is not None and value > hi):
            bound = f"in [{lo}, {hi}]" if hi is not None else f"at least {lo}"
            raise argparse.ArgumentTypeError(f"must be {bound}, got {value}")
        return value
    return parse


positive_int = _ranged(int, 1, what="an integer")
_fraction = _ranged(float, 0, 1)
_nonnegative = _ranged(float, 0)


def _add_data_args(p):
    p.add_argument("--data", help="text file, directory of text files, or nanoGPT-style uint16 "
                                  ".bin (default: the Python stdlib sources, no download)")
    p.add_argument("--tokenizer", choices=["byte", "bpe"], default="byte",
                   help="byte-level (default) or a BPE trained on the spot and cached")
    p.add_argument("--vocab-size", type=int, default=8192, help="BPE vocabulary size")


def _add_train_args(p, steps, model):
    p.add_argument("--model", choices=LLAMA_PRESETS, default=model)
    p.add_argument("--steps", type=positive_int, default=steps)
    p.add_argument("--batch-size", type=positive_int, default=16)
    p.add_argument("--seq-len", type=positive_int, default=128)
    p.add_argument("--lr", type=float, default=None,
                   help="peak lr (default: the optimizer's recommended one: " + ", ".join(
                       f"{n} {s.lr:g}" for n, s in OPTIMIZERS.items()) + ")")
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--eval-batches", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--nonfinite", choices=["skip", "propagate"], default="skip",
                   help="skip (and log) a step whose gradients hold an inf or NaN, or let it "
                        "reach the weights as torch.optim does")
    _add_data_args(p)


def _config(args, optimizer: str, **extra) -> TrainConfig:
    """The run's TrainConfig; `extra` adds fields and overrides lr / weight_decay / betas."""
    base = dict(lr=args.lr, weight_decay=args.weight_decay)
    return TrainConfig(optimizer=optimizer, model=args.model, steps=args.steps,
                       batch_size=args.batch_size, seq_len=args.seq_len,
                       eval_batches=args.eval_batches, seed=args.seed, device=args.device,
                       dtype=args.dtype, data=args.data, tokenizer=args.tokenizer,
                       vocab_size=args.vocab_size, nonfinite=args.nonfinite,
                       **{**base, **extra})


def _compare(args) -> int:
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:  # not given on the command line
            setattr(args, key, value)
    specs = args.optimizers.split() if args.optimizers else list(OPTIMIZERS)
    specs = [x for spec in specs for x in (spec.split(",") if ":" not in spec else [spec])]
    configs, arms, seen, own_lr = [], [], {}, False
    shared = dict(betas=args.betas, warmup=args.warmup, min_lr=args.min_lr,
                  grad_clip=args.grad_clip)
    for spec in specs:
        name, _, settings = spec.partition(":")
        if name not in OPTIMIZERS:
            raise SystemExit(f"memopt compare: unknown optimizer {name!r}; "
                             f"choose from {', '.join(OPTIMIZERS)}")
        kwargs = _parse_settings(settings)
        _check_settings(name, kwargs)  # every arm before any runs: a typo costs no training
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
            configs.append(_config(args, name, optimizer_kwargs=dict(kwargs),
                                   **{**shared, **run, "lr": point}))
            arms.append(arm)
    machine = _machine()  # before the runs: the commit they ran at
    points = compare(configs)
    results = best_of_sweep(points, arms)
    for r, arm in zip(points, arms):
        r["arm"] = arm
    setup = _compare_setup(args, configs, points, own_lr)
    out = Path(args.out or f"runs/compare-{time.strftime('%Y%m%d-%H%M%S')}")
    table = write_outputs(results, out, machine, setup, points)
    print("\n" + table)
    print(f"\nwritten: {out}/results.json, {out}/results.md"
          + (f", {out}/compare.png" if (out / "compare.png").exists() else
             " (no PNG: pip install matplotlib for the plot)"))
    return 0


def _compare_setup(args, configs: list[TrainConfig], points: list[dict], own_lr: bool) -> dict:
    """What every run of a compare shared, and how the lrs were chosen (results.json "setup"
    and the plot's title)."""
    first = configs[0] if configs else _config(args, "adamw")
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


def _train_default(name: str):
    """TrainConfig's default for a field: the one source of compare's knob defaults."""
    return TrainConfig.__dataclass_fields__[name].default


def _betas(text: str) -> tuple:
    """argparse type: "0.9,0.95" -> (0.9, 0.95), each in [0, 1)."""
    try:
        betas = tuple(float(x) for x in text.strip("()[] ").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not two numbers like 0.9,0.95") from None
    if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
        raise argparse.ArgumentTypeError(f"betas must be two numbers in [0, 1), got {text!r}")
    return betas


def _parse_settings(text: str) -> dict:
    """"density=0,update_gap=100" -> {"density": 0, "update_gap": 100} (Python literals; a
    comma inside brackets, as in betas=(0.9,0.99), belongs to its value)."""
    items, depth, start = [], 0, 0
    for i, ch in enumerate(text + ","):
        depth += (ch in "([{") - (ch in ")]}")
        if ch == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    out = {}
    for item in filter(None, items):
        key, eq, value = item.partition("=")
        if not eq:
            raise SystemExit(f"memopt compare: setting {item!r} is not key=value")
        try:
            out[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            out[key.strip()] = value.strip()  # a bare word: a string option
    return out


def _check_settings(name: str, kwargs: dict) -> None:
    """Raises SystemExit naming the valid keys when a setting is not one `name` takes."""
    signature = inspect.signature(OPTIMIZERS[name].cls.__init__)
    valid = sorted(k for k, p in signature.parameters.items()
                   if k not in ("self", "params", "named_params_or_model", "source")
                   and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))
    unknown = sorted(set(kwargs) - set(valid))
    if unknown:
        raise SystemExit(f"memopt compare: {name} has no setting {', '.join(map(repr, unknown))}; "
                         f"valid: {', '.join(valid)}")


def _init_distributed(args) -> bool:
    """--fsdp: join the process group torchrun describes (gloo on CPU, nccl on CUDA, one GPU per
    local rank). Returns whether this call created it (and must destroy it)."""
    import os

    import torch.distributed as dist
    if dist.is_initialized():  # an embedding program (or a test) made it
        return False
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise SystemExit("memopt train --fsdp: no process group to join; launch with torchrun, "
                         "e.g. torchrun --nproc_per_node 2 -m memopt_core.app.cli train --fsdp ...")
    cuda = args.device.startswith("cuda")
    if cuda:
        args.device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        torch.cuda.set_device(args.device)
    dist.init_process_group("nccl" if cuda else "gloo")
    return True


def _train(args) -> int:
    if args.layerwise and args.grad_clip:
        raise SystemExit("memopt train: --layerwise cannot clip by global gradient norm (the "
                         "gradients never exist together); pass --grad-clip 0")
    owns_group = _init_distributed(args) if args.fsdp else False
    try:
        return _run_training(args)
    finally:
        if owns_group:
            torch.distributed.destroy_process_group()


def _run_training(args) -> int:
    cfg = _config(args, args.optimizer, grad_accum=args.grad_accum, layerwise=args.layerwise,
                  grad_clip=args.grad_clip, eval_every=args.eval_every, fsdp=args.fsdp)
    trainer = Trainer(cfg)
    main_rank = trainer.rank == 0  # only rank 0 prints and writes the log
    name = DCP_CHECKPOINT if cfg.fsdp else CHECKPOINT
    ckpt = Path(args.ckpt_dir) / name if args.ckpt_dir else None
    if args.resume:
        if ckpt is None or not ckpt.exists():
            raise SystemExit(f"memopt train: --resume needs an existing {ckpt or '--ckpt-dir'}")
        trainer.load(ckpt)
        if main_rank:
            print(f"resumed from {ckpt} at step {trainer.step}", file=sys.stderr)
    if main_rank:
        print(f"{cfg.optimizer} on {cfg.model} ({sum(p.numel() for p in trainer.model.parameters()) / 1e6:.1f}M "
              f"params, {cfg.dtype}{', layer-wise' if cfg.layerwise else ''}"
              f"{f', FSDP2 on {trainer.world} ranks' if cfg.fsdp else ''}), "
              f"{trainer.corpus.source}", file=sys.stderr)
    log = None
    if args.ckpt_dir:
        Path(args.ckpt_dir).mkdir(parents=True, exist_ok=True)
    if args.ckpt_dir and main_rank:
        log_path = Path(args.ckpt_dir) / "log.jsonl"
        # On resume keep the log up to the checkpoint: later lines are being re-run.
        kept = [line for line in (log_path.read_text().splitlines() if args.resume and
                                  log_path.exists() else [])
                if json.loads(line)["step"] <= trainer.step]
        log = open(log_path, "w")
        log.writelines(line + "\n" for line in kept)
    while trainer.step < cfg.steps:
        loss = trainer.run_step()
        record = dict(step=trainer.step, loss=loss, lr=trainer.sched.get_last_lr()[0],
                      ms=trainer.history["iter_ms"][-1])
        if trainer.history["skipped"][-1:] == [trainer.step]:
            record["skipped"] = True
            if main_rank:
                print(f"step {trainer.step}: a gradient is not finite; the update was skipped "
                      f"({len(trainer.history['skipped'])} so far)", file=sys.stderr)
        if trainer.history["val"] and trainer.history["val"][-1][0] == trainer.step:
            record["val"] = trainer.history["val"][-1][1]
        if main_rank and (trainer.step % args.log_every == 0 or "val" in record
                          or trainer.step == cfg.steps):
            print(" ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                           for k, v in record.items()), flush=True)
        if log:
            log.write(json.dumps(record) + "\n")
            log.flush()
        if ckpt and (trainer.step % args.ckpt_every == 0 or trainer.step == cfg.steps):
            trainer.save(ckpt)
    val = trainer.evaluate()  # every rank: under FSDP2 the forward is collective
    if log:
        log.close()
    if main_rank:
        print(f"final val loss {val:.4f}; optimizer state "
              f"{trainer.summary()['state_bytes'] / 2**20:.1f} MiB"
              f"{' on this rank' if cfg.fsdp else ''}", flush=True)
    return 0


def _plan(args) -> int:
    base = plan(args.model, "adamw", dtype=args.dtype, layerwise=False,
                batch_size=args.batch_size, seq_len=args.seq_len)
    names = args.optimizer.split(",") if args.optimizer else list(OPTIMIZERS)
    unknown = [n for n in names if n not in OPTIMIZERS]
    if unknown:
        raise SystemExit(f"memopt plan: unknown optimizer {', '.join(map(repr, unknown))}; "
                         f"choose from {', '.join(OPTIMIZERS)}")
    names = [n for n in dict.fromkeys(names) if n != "adamw"]  # adamw is the first row already
    if args.layerwise:
        cannot = [n for n in names
                  if n in OPTIMIZERS and not OPTIMIZERS[n].cls.steps_single_params]
        if cannot:
            print(f"left out: {', '.join(cannot)} (cannot be stepped layer-wise)\n")
        names = [n for n in names if n not in cannot]
    plans = [plan(args.model, n, dtype=args.dtype, layerwise=args.layerwise,
                  batch_size=args.batch_size, seq_len=args.seq_len) for n in names]
    print(format_plans(plans, base))
    print(f"\nGB = 1e9 bytes. Optimizer state is each optimizer's own planned_state_bytes() on the "
          f"meta device; activations: estimate for batch {args.batch_size} x {args.seq_len} "
          "tokens, fused attention, no checkpointing (see memopt_core.app.plan.activation_bytes).")
    return 0


def _machine() -> dict:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, cwd=Path(__file__).parent).stdout.strip()
    except OSError:
        commit = ""
    return dict(memopt_core=__version__, commit=commit or None, torch=torch.__version__,
                python=platform.python_version(), machine=platform.processor() or platform.machine(),
                threads=torch.get_num_threads(),
                gpu=torch.cuda.get_device_name() if torch.cuda.is_available() else None)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="memopt", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    fmt = dict(formatter_class=_HelpFormatter)

    c = sub.add_parser("compare", help="train one model with each optimizer, same seed and data, "
                                       "and compare memory, speed and loss", **fmt)
    c.add_argument("--optimizers", help=f"comma-separated (default all: {','.join(OPTIMIZERS)}); "
                                        "settings after a colon, runs separated by spaces: "
                                        "\"adamw frugal:density=0.25 apollo:lr=1e-2,rank=64\" "
                                        "(lr, weight_decay and betas set that run's own)")
    _add_train_args(c, steps=None, model=None)
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
    c.add_argument("--betas", type=_betas, default=_train_default("betas"), metavar="B1,B2",
                   help="Adam betas of every run (a run's own betas= wins)")
    c.add_argument("--warmup", type=_fraction, default=_train_default("warmup"),
                   help="fraction of the steps with linear lr warmup")
    c.add_argument("--min-lr", type=_fraction, default=_train_default("min_lr"),
                   help="cosine decay ends at this fraction of the peak lr")
    c.add_argument("--grad-clip", type=_nonnegative, default=_train_default("grad_clip"),
                   help="global-norm gradient clipping (0: off)")
    c.add_argument("--quick", action="store_true",
                   help="tiny model (head_dim 32), 120 steps: about 2 minutes on 2 CPU cores "
                        "(default: small model, 300 steps)")
    c.add_argument("--out", help="output directory (default runs/compare-<time>)")
    c.set_defaults(func=_compare)

    t = sub.add_parser("train", help="train a model with one optimizer", **fmt)
    t.add_argument("--optimizer", choices=list(OPTIMIZERS), required=True)
    _add_train_args(t, steps=1000, model="tiny")
    t.add_argument("--grad-accum", type=positive_int, default=1)
    t.add_argument("--grad-clip", type=float, default=1.0,
                   help="global-norm clipping (0: off; required with --layerwise)")
    t.add_argument("--layerwise", action="store_true",
                   help="step each parameter inside backward and free its gradient at once")
    t.add_argument("--eval-every", type=int, default=100)
    t.add_argument("--log-every", type=int, default=10)
    t.add_argument("--ckpt-dir", help="checkpoint directory (atomic last.pt, log.jsonl)")
    t.add_argument("--ckpt-every", type=int, default=100)
    t.add_argument("--resume", action="store_true", help="continue from --ckpt-dir/last.pt "
                   "(last.dcp with --fsdp)")
    t.add_argument("--fsdp", action="store_true",
                   help="shard with FSDP2 (per block and root) under torchrun; checkpoints are "
                        "DCP directories; the optimizer must support FSDP2")
    t.set_defaults(func=_train)

    p = sub.add_parser("plan", help="memory plan of a training run (meta device, no memory)",
                       **fmt)
    p.add_argument("--model", choices=LLAMA_PRESETS, default="llama-7b")
    p.add_argument("--optimizer", help="comma-separated (default: every optimizer)")
    p.add_argument("--layerwise", action="store_true")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--batch-size", type=positive_int, default=1)
    p.add_argument("--seq-len", type=positive_int, default=2048)
    p.set_defaults(func=_plan)

    from .snr_cli import add_snr_subcommand
    add_snr_subcommand(sub)  # `memopt snr`: the SNR probe that derives SlimAdam's rules
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError) as e:  # bad settings: a message, not a traceback
        raise SystemExit(f"memopt {args.command}: {e}") from None


if __name__ == "__main__":
    sys.exit(main())
