"""Step time of `memopt train` / `memopt compare` runs with bf16 weights, computed in bf16 or in
fp32 (memopt_core.app.compute_dtype), against fp32 weights, as ratios in one run.

    .venv/bin/python bench/bench_compute_dtype.py [--model tiny] [--optimizer adamw] [--rounds 5]

Each arm is a Trainer of compare's settings (batch 16 x 128 byte tokens; --model tiny is
`memopt compare --quick`'s model, small its default); its optimizer steps (forward, backward,
update) are timed round-robin after one warm-up step each, and the median per arm is reported.
Prints a markdown table for bench/RESULTS.md.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from memopt_core.app.corpus import load
from memopt_core.app.train import TrainConfig, Trainer
from harness import commit, machine

ARMS = {"fp32 weights": dict(dtype="fp32"),
        "bf16 weights, bf16 compute": dict(dtype="bf16", compute_dtype="bf16"),
        "bf16 weights, default compute": dict(dtype="bf16")}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--optimizer", default="adamw")
    ap.add_argument("--rounds", type=int, default=5)
    a = ap.parse_args()
    corpus = load(None, "byte", 0)
    trainers = {name: Trainer(TrainConfig(optimizer=a.optimizer, model=a.model,
                                          steps=a.rounds + 1, **kw), corpus=corpus)
                for name, kw in ARMS.items()}
    times = {name: [] for name in trainers}
    for t in trainers.values():
        t.run_step()  # warm-up
    for _ in range(a.rounds):
        for name, t in trainers.items():
            start = time.perf_counter()
            t.run_step()
            times[name].append(time.perf_counter() - start)
    base = statistics.median(times["fp32 weights"])
    print(f"{a.model}, {a.optimizer}, batch 16 x 128; {machine()}; torch {torch.__version__}; "
          f"commit {commit()}; median of {a.rounds} round-robin steps")
    print("| run | precision | ms/step | vs fp32 |\n|---|---|---:|---:|")
    for name, t in trainers.items():
        ms = statistics.median(times[name]) * 1e3
        print(f"| {name} | {t.precision} | {ms:.0f} | {ms / 1e3 / base:.2f}x |")


if __name__ == "__main__":
    main()
