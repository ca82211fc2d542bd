"""`memopt`: compare the optimizers on real text, train with one, plan a large run.

    memopt compare --quick                       # every optimizer, small model, ~2 min on 2 cores
    memopt train --optimizer apollo_mini --model llama-60m --layerwise --grad-clip 0
    torchrun --nproc_per_node 2 -m memopt_core.app.cli train --fsdp --optimizer adamw --ckpt-dir d
    memopt plan --model llama-7b --optimizer apollo_mini --layerwise --dtype bf16
    memopt snr --out rules.json                  # SlimAdam's compression rules from a probe run
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from ..registry import OPTIMIZERS
from .cli_args import (HelpFormatter, add_train_args, check_settings, parse_settings,
                       positive_int, split_specs, train_config)
from .models import LLAMA_PRESETS
from .plan import GB, format_plans, plan
from .train import CHECKPOINT, DCP_CHECKPOINT, Trainer


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
    name, _, text = args.optimizer.partition(":")
    if name not in OPTIMIZERS:
        raise SystemExit(f"memopt train: unknown optimizer {name!r}; choose from "
                         f"{', '.join(OPTIMIZERS)}")
    settings = parse_settings(text, "train")
    check_settings(name, settings, "train")
    run = {k: settings.pop(k) for k in ("lr", "weight_decay", "betas") if k in settings}
    cfg = train_config(args, name, grad_accum=args.grad_accum, layerwise=args.layerwise,
                       grad_clip=args.grad_clip, eval_every=args.eval_every, fsdp=args.fsdp,
                       optimizer_kwargs=settings, **run)
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
              f"params, {trainer.precision}{', layer-wise' if cfg.layerwise else ''}"
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
                batch_size=args.batch_size, seq_len=args.seq_len, compute_dtype=args.compute_dtype,
                checkpoint_activations=args.checkpoint_activations)
    specs = split_specs(args.optimizer) if args.optimizer else list(OPTIMIZERS)
    unknown = [s for s in specs if s.partition(":")[0] not in OPTIMIZERS]
    if unknown:
        raise SystemExit(f"memopt plan: unknown optimizer {', '.join(map(repr, unknown))}; "
                         f"choose from {', '.join(OPTIMIZERS)}")
    specs = [s for s in dict.fromkeys(specs) if s != "adamw"]  # adamw is the first row already
    settings = {s: parse_settings(s.partition(":")[2], "plan") for s in specs}
    for s in specs:
        check_settings(s.partition(":")[0], settings[s], "plan")
    if args.layerwise:
        cannot = [s for s in specs if not OPTIMIZERS[s.partition(":")[0]].cls.steps_single_params]
        if cannot:
            print(f"left out: {', '.join(cannot)} (cannot be stepped layer-wise)\n")
        specs = [s for s in specs if s not in cannot]
    run = dict(batch_size=args.batch_size, seq_len=args.seq_len, compute_dtype=args.compute_dtype,
               checkpoint_activations=args.checkpoint_activations)
    plans = [plan(args.model, s.partition(":")[0], dtype=args.dtype, layerwise=args.layerwise,
                  label=s, **run, **settings[s]) for s in specs]
    print(format_plans(plans, base))
    print(f"\nGB = 1e9 bytes. Optimizer state is each optimizer's own planned_state_bytes() on the "
          f"meta device; activations: estimate for batch {args.batch_size} x {args.seq_len} "
          f"tokens, fused attention, {'' if args.checkpoint_activations else 'no '}activation "
          "checkpointing (see memopt_core.app.plan.activation_bytes)." +
          (f" {args.dtype} weights are updated with stochastic rounding, which keeps no state (its"
           " bits are a hash of seed, parameter, step and element)." if args.dtype != "fp32"
           else "") +
          (" int8 weights: 1 byte per attention/MLP weight plus a float32 scale per 128, their "
           "gradients bf16." if args.dtype == "int8" else ""))
    best = min(plans + [base], key=lambda p: p.total)
    flags = [f"--dtype {args.dtype}"] * (args.dtype != "fp32") + \
        ["--layerwise --grad-clip 0"] * best.layerwise + \
        ["--checkpoint-activations"] * args.checkpoint_activations + \
        [f"--compute-dtype {args.compute_dtype}"] * (args.compute_dtype is not None)
    spec = f'"{best.optimizer}"' if ":" in best.optimizer else best.optimizer
    print(f"\nSmallest run here: {best.optimizer}, {best.total / GB:.2f} GB, on one device:\n"
          f"  memopt train --model {args.model} --optimizer {spec} "
          f"--batch-size {args.batch_size} --seq-len {args.seq_len} {' '.join(flags)}".rstrip())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="memopt", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    fmt = dict(formatter_class=HelpFormatter)

    from .compare_cli import add_compare_subcommand
    add_compare_subcommand(sub)  # `memopt compare`
    t = sub.add_parser("train", help="train a model with one optimizer", **fmt)
    t.add_argument("--optimizer", required=True,
                   help=f"one of {', '.join(OPTIMIZERS)}, settings after a colon: "
                        "\"adam_mini:state_bits=8\"")
    add_train_args(t, steps=1000, model="tiny")
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
    p.add_argument("--optimizer", help="comma-separated (default: every optimizer); settings "
                   "after a colon, entries separated by spaces: \"adam_mini:state_bits=8 "
                   "apollo_mini:state_bits=8,embeddings=adam_mini\"")
    p.add_argument("--layerwise", action="store_true")
    p.add_argument("--dtype", choices=["fp32", "bf16", "int8"], default="fp32",
                   help="weight storage, as memopt train's (int8: codes and group scales)")
    p.add_argument("--batch-size", type=positive_int, default=1)
    p.add_argument("--seq-len", type=positive_int, default=2048)
    p.add_argument("--compute-dtype", choices=["fp32", "bf16"], default=None,
                   help="dtype of the activations (default: --dtype)")
    p.add_argument("--checkpoint-activations", action="store_true")
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
