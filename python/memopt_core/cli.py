"""`memopt` command line: `memopt demo` trains one small model with AdamW and with AdamMini.

Both runs start from the same initial weights and see the same batches (same seed), so the table
shows what the optimizer alone changes: state memory, optimizer step time and loss.
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
import time

import torch

from . import corpus
from .models import GPT, Llama, LlamaConfig, build, num_params
from .registry import make_optimizer

# Same hyper-parameters for every optimizer: Adam-mini is meant as a drop-in for AdamW at AdamW's
# settings. betas/wd are the usual LLM pre-training ones; lr suits these small models.
DEFAULT_HPARAMS = dict(lr=2e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
WARMUP_FRACTION = 0.1
TRAIN_LOSS_WINDOW = 10  # steps averaged for "final train loss": one batch is too noisy


def state_bytes(opt: torch.optim.Optimizer) -> int:
    """opt.state_bytes() where the optimizer has it, else the bytes of every tensor in opt.state
    (how a torch.optim baseline is counted)."""
    if hasattr(opt, "state_bytes"):
        return int(opt.state_bytes())
    return sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values()
               if torch.is_tensor(t))


@torch.no_grad()
def evaluate(model, seq_len: int, batch_size: int, max_batches: int) -> float:
    """Mean cross-entropy (nats/byte) over the fixed val windows."""
    was_training = model.training
    model.eval()
    losses = [model(x, y)[1].item() for x, y in corpus.val_batches(seq_len, batch_size, max_batches)]
    model.train(was_training)
    return statistics.fmean(losses)


class _Run:
    """One model + optimizer being trained; step() does one iteration and records its times."""

    def __init__(self, opt_name, model_cfg, steps, seed, batch_size, seq_len, log_every, hparams):
        torch.manual_seed(seed)  # same seed -> same initial weights for every optimizer
        self.model = Llama(model_cfg) if isinstance(model_cfg, LlamaConfig) else GPT(model_cfg)
        self.name, self.log_every, self.seq_len, self.batch_size = opt_name, log_every, seq_len, batch_size
        self.opt = make_optimizer(opt_name, self.model, **{**DEFAULT_HPARAMS, **hparams})
        warmup = max(1, int(steps * WARMUP_FRACTION))
        # Linear warmup then cosine decay to 10%: a short run still ends at a low learning rate.
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda s: min(
            (s + 1) / warmup, 0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, s / steps)))))
        self.data = corpus.batches(seq_len, batch_size, seed)  # same seed -> same batches
        self.losses, self.step_s, self.iter_s = [], [], []

    def step(self):
        t0 = time.perf_counter()
        x, y = next(self.data)
        _, loss = self.model(x, y)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        t1 = time.perf_counter()
        self.opt.step()
        t2 = time.perf_counter()
        self.sched.step()
        self.losses.append(loss.item())
        if len(self.losses) > 1:  # the first step allocates the state; time the steady state
            self.step_s.append(t2 - t1)
            self.iter_s.append(t2 - t0)
        if self.log_every and len(self.losses) % self.log_every == 0:
            print(f"  [{self.name}] step {len(self.losses):5d}  loss {self.losses[-1]:.4f}",
                  file=sys.stderr)

    def result(self, eval_batches: int) -> dict:
        n, sb = num_params(self.model), state_bytes(self.opt)
        return dict(optimizer=self.name, params=n, state_bytes=sb, bytes_per_param=sb / n,
                    step_ms=1e3 * statistics.fmean(self.step_s or [math.nan]),
                    iter_ms=1e3 * statistics.fmean(self.iter_s or [math.nan]),
                    train_loss=statistics.fmean(self.losses[-TRAIN_LOSS_WINDOW:]),
                    val_loss=evaluate(self.model, self.seq_len, self.batch_size, eval_batches))


def train(opt_names: list[str], model_cfg, steps: int, seed: int, *, batch_size: int = 16,
          seq_len: int = 128, eval_batches: int = 8, log_every: int = 0, **hparams) -> list[dict]:
    """Train one fresh model of `model_cfg` (LlamaConfig or GPTConfig) per registry optimizer,
    all from the same seed, in lockstep: step i of every run, then step i+1, the starting run
    rotated, so a busy machine slows all runs alike and their times stay comparable.
    Returns one flat dict per optimizer: sizes, mean times and losses."""
    runs = [_Run(name, model_cfg, steps, seed, batch_size, seq_len, log_every, hparams)
            for name in opt_names]
    for i in range(steps):
        for run in runs[i % len(runs):] + runs[:i % len(runs)]:
            run.step()
    return [run.result(eval_batches) for run in runs]


def train_one(opt_name: str, model_cfg, steps: int, seed: int, **kw) -> dict:
    """train() for a single optimizer."""
    return train([opt_name], model_cfg, steps, seed, **kw)[0]


def format_table(results: list[dict], baseline: str = "adamw") -> str:
    """Markdown table of train_one results; state ratio is against the `baseline` row."""
    base = next((r["state_bytes"] for r in results if r["optimizer"] == baseline), None)
    rows = ["| optimizer | state bytes | bytes/param | state vs AdamW | step ms | iter ms "
            "| train loss | val loss |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        ratio = f"{r['state_bytes'] / base:.3f}" if base else "n/a"
        rows.append(f"| {r['optimizer']} | {r['state_bytes']:,} | {r['bytes_per_param']:.2f} | "
                    f"{ratio} | {r['step_ms']:.2f} | {r['iter_ms']:.1f} | {r['train_loss']:.4f} "
                    f"| {r['val_loss']:.4f} |")
    return "\n".join(rows)


def run_comparison(opt_names: list[str], model: str, arch: str, steps: int, seed: int,
                   log_every: int = 0, **kw) -> list[dict]:
    probe = build(model, arch)
    cfg = probe.config
    print(f"model: {arch} {model} ({num_params(probe) / 1e6:.2f}M params), "
          f"corpus: {corpus.load().source} (bytes), steps: {steps}, seed: {seed}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)
    print(f"training with {', '.join(opt_names)} in lockstep ...", flush=True)
    return train(opt_names, cfg, steps, seed, log_every=log_every, **kw)


def _demo(args) -> int:
    results = run_comparison(["adamw", "adam_mini"], args.model, "llama", args.steps, args.seed,
                             log_every=args.log_every, batch_size=args.batch_size,
                             seq_len=args.seq_len)
    print()
    print(format_table(results))
    print("\nstep ms: mean optimizer.step() time after the first step; iter ms: whole iteration "
          f"(data, forward, backward, step); train loss: mean of the last {TRAIN_LOSS_WINDOW} "
          "steps; val loss: held-out bytes, nats/byte.")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="memopt", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="train a small LLaMA-style model with AdamW and AdamMini "
                                       "on built-in text and compare them")
    demo.add_argument("--steps", type=int, default=150,
                      help="training steps per optimizer (default 150: about a minute on 2 CPU "
                           "cores for --model tiny)")
    demo.add_argument("--model", choices=["tiny", "small"], default="tiny")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--batch-size", type=int, default=16)
    demo.add_argument("--seq-len", type=int, default=128)
    demo.add_argument("--log-every", type=int, default=0, help="print the loss every N steps")
    demo.set_defaults(func=_demo)
    args = parser.parse_args(argv)
    if args.command == "demo" and args.steps < 2:
        parser.error("--steps must be at least 2")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
