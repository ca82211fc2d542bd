"""Peak process memory of `memopt train` with and without --layerwise.

    .venv/bin/python bench/bench_layerwise.py [--model llama-130m] [--optimizer adamw] [--steps 4]

Each run is a fresh process (`python -m memopt_core train ...`); its peak resident set size
(ru_maxrss) is read when it exits. Byte-level tokens (vocab 256) and batch 1 x 64 keep
activations well below the gradients, so the difference shows the gradients layer-wise
stepping never holds. Prints a markdown table for bench/RESULTS.md.
"""
from __future__ import annotations

import argparse
import platform
import subprocess
import sys

import torch

from memopt_core.app.models import build, num_params

CHILD = ("import resource, sys; from memopt_core.app.cli import main; main(sys.argv[1:]); "
         "print('MAXRSS', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")


def peak_rss_mib(args: list[str]) -> float:
    out = subprocess.run([sys.executable, "-c", CHILD, *args], capture_output=True, text=True,
                         check=True).stdout
    return int(out.split("MAXRSS")[-1]) / 1024  # KiB on Linux


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="llama-130m")
    ap.add_argument("--optimizer", default="adamw")
    ap.add_argument("--steps", type=int, default=4)
    a = ap.parse_args()
    common = ["train", "--optimizer", a.optimizer, "--model", a.model, "--steps", str(a.steps),
              "--batch-size", "1", "--seq-len", "64", "--eval-batches", "1", "--eval-every", "0",
              "--grad-clip", "0", "--log-every", "1000"]
    n = num_params(build(a.model, device="meta", vocab_size=256))
    grads = n * 4 / 2**20
    ordinary, layerwise = peak_rss_mib(common), peak_rss_mib(common + ["--layerwise"])
    print(f"{a.model} with byte vocab: {n / 1e6:.1f}M params, fp32 gradients {grads:.0f} MiB; "
          f"{a.optimizer}; torch {torch.__version__}; {platform.processor() or platform.machine()}")
    print("| run | peak RSS MiB |\n|---|---:|")
    print(f"| memopt train | {ordinary:.0f} |\n| memopt train --layerwise | {layerwise:.0f} |")
    print(f"| difference | {ordinary - layerwise:.0f} ({(ordinary - layerwise) / grads:.2f} x "
          f"the gradients) |")


if __name__ == "__main__":
    main()
