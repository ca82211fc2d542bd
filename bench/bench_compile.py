#!/usr/bin/env python
"""Eager vs torch.compile'd optimizer step() on CPU, 50M-parameter LLaMA-style model.

Command (from the repo root):
    python bench/bench_compile.py [--size 50m] [--optimizers adamw,adam_mini] [--rounds 20]

For each optimizer: one model, fixed random gradients, state created up front
(init_state(pooled=False): per-tensor, so the compiled graph updates it in place), a
tensor lr; `step` eager and `torch.compile(step, fullgraph=True)` (inductor) are timed
alternately, round-robin, so machine drift hits both alike; medians and the compiled/eager ratio
are printed as a markdown table. Also reports how many frames were compiled (1 = no graph break,
no recompilation) after all rounds.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import subprocess
import time

import torch
from torch._dynamo.testing import CompileCounterWithBackend

import memopt_core
from memopt_core.app.models import build, num_params


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="50m")
    ap.add_argument("--optimizers", default=",".join(
        n for n, s in memopt_core.OPTIMIZERS.items() if s.cls.compilable))
    ap.add_argument("--rounds", type=int, default=20)
    a = ap.parse_args()
    torch.manual_seed(0)
    model = build(a.size)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    print(f"{a.size}: {num_params(model) / 1e6:.1f}M params; torch {torch.__version__}; "
          f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads; "
          f"commit {commit}")
    print("| optimizer | eager ms | compiled ms | compiled / eager | frames compiled |")
    print("|---|---:|---:|---:|---:|")
    for name in a.optimizers.split(","):
        torch._dynamo.reset()
        opt = memopt_core.make_optimizer(name, model, lr=torch.tensor(1e-4))
        opt.init_state(pooled=False)  # pooled views make the compiled graph copy the pool
        counter = CompileCounterWithBackend("inductor")
        compiled = torch.compile(opt.step, backend=counter, fullgraph=True)
        for _ in range(3):  # compile and warm up both
            compiled()
            opt.step()
        eager_t, comp_t = [], []
        for r in range(a.rounds):
            pair = [(eager_t, opt.step), (comp_t, compiled)]
            for times, fn in (pair if r % 2 else pair[::-1]):
                times.append(timed(fn))
        e, c = statistics.median(eager_t) * 1e3, statistics.median(comp_t) * 1e3
        print(f"| {name} | {e:.1f} | {c:.1f} | {c / e:.2f}x | {counter.frame_count} |", flush=True)


if __name__ == "__main__":
    main()
