#!/usr/bin/env python
"""Optimizer step() time, state bytes and step-time memory peak on CPU or CUDA, LLaMA-style models.

Command (from the repo root; about 40 s for 50m and 2 min for 200m on 2 idle cores):
    python bench/bench_step.py --size 50m [--write]
    python bench/bench_step.py --size 200m [--write]
On a CUDA GPU (method in bench/bench_step_cuda.py: CUDA events, bandwidth against a measured
device copy, max_memory_allocated peaks; about 1 min for 50m, 5 min for 7b-layers on an H100):
    python bench/bench_step.py --device cuda --size 50m --rounds 50 --warmup 5 [--write]
    python bench/bench_step.py --device cuda --size 7b-layers --rounds 30 --warmup 3 [--write]
"7b-layers" is Llama-2-7B's shape (hidden 4096, MLP 11008, 32 heads, vocabulary 32000) with
--layers full-size decoder layers (default 4: 1.07B params) plus the embedding and output
matrices. In fp32 every contender's state lives at once: about 47 GB with adam-mini 1.1.1
installed, so it fits an 80 GB GPU; --dtype bf16 halves it (--layers 8 then fits too).

Contenders: memopt_core.AdamMini, memopt_core.SlimAdam, memopt_core.AdamW, torch.optim.AdamW(fused=True),
torch.optim.AdamW(foreach=True), adam_mini.Adam_mini 1.1.1 (PyPI reference; given dim, n_heads,
n_kv_heads). All get the same hyper-parameters and the same fixed random gradient on every
parameter (no forward/backward: only step() is timed). With --device cuda the table adds memopt's
and apollo-torch 1.0.3's APOLLO / APOLLO-Mini (bench_apollo.py's settings) and memopt Frugal
rho=0.25. The code shared with the other step benchmarks (models, contenders, state bytes,
timing, RSS peaks) is bench/harness.py.

Time: all contenders share one model and are stepped round-robin, one step each per round, with
the starting contender rotated every round, so drifts in machine load hit all alike; we report the
median over rounds, and the ratio to torch fused AdamW measured in the same rounds.

State bytes: the bytes of every tensor in opt.state (views of a flat pool counted once each).

Peak memory during step(): each contender runs in a fresh subprocess (nothing else's memory or
allocator history in it). It first steps a tiny model once with the same optimizer class, so that
lazy imports, library code paged in on first use and the thread pool are not charged to the
optimizer. Then it builds the model and gradients, reads VmRSS (`base`: params + grads +
libraries), creates the optimizer, runs 2 warm-up steps (state allocated, workspaces grown), and
3 times resets the kernel's RSS high-water mark (writing "5" to /proc/self/clear_refs sets VmHWM
to the current RSS), runs one step and reads VmHWM. "peak above" is max(VmHWM) - base - state
bytes: everything resident at the step's peak beyond params, grads and state (temporaries plus
persistent workspaces); "freed after step" is its transient part, max(VmHWM - VmRSS before the
step). ru_maxrss cannot be reset, so it would hide a step's transient under the start-up peak.
RSS sees only pages the allocator really gets from the kernel, so the child runs with
MALLOC_MMAP_THRESHOLD_=65536: glibc then serves every block >= 64 KiB with a fresh mmap and
unmaps it on free, instead of recycling freed heap memory (which would hide a temporary); torch's
CPU allocator keeps no cache of its own. Blocks under 64 KiB are not tracked; that bounds the
error. Sanity check of the method: torch's foreach AdamW builds one parameter-sized temporary
list (sqrt of v), so it must show about 4 bytes/param in fp32.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import statistics
import sys

import torch

import bench_step_cuda
import harness as H
import memopt_core
from memopt_core.app.models import num_params

CONTENDERS = dict(H.ADAM_CONTENDERS)
if H.Adam_mini is None:
    print("adam-mini not installed (pip install adam-mini==1.1.1): reference left out",
          file=sys.stderr)


def contenders(device: str) -> dict:
    """{name: make(model)} of the table on `device`. On the GPU one table compares every
    optimizer with fused AdamW (issue 8's targets name AdamMini and ApolloMini); on the CPU,
    APOLLO and FRUGAL have their own scripts (bench_apollo.py, bench_frugal.py)."""
    if device == "cpu":
        return dict(CONTENDERS)
    return {**CONTENDERS, **H.MEMOPT_APOLLO, **H.apollo_torch_contenders(),
            "memopt Frugal rho=0.25": lambda m: memopt_core.Frugal(m, **H.HP, density=0.25)}


def select(contenders: dict, only) -> dict:
    """The contenders --only names (all without it), the baseline always among them."""
    unknown = set(only or ()) - set(contenders)
    if unknown:
        sys.exit(f"--only: unknown contenders {sorted(unknown)}; choose from {list(contenders)}")
    names = list(only or contenders)
    if H.BASELINE not in names:
        names.append(H.BASELINE)  # the ratios need it
    return {n: contenders[n] for n in names}


def parse_args(argv=None) -> argparse.Namespace:
    ap = H.arg_parser(__doc__, rounds=9, sizes=bench_step_cuda.DEVICE_SIZES)
    ap.add_argument("--only", nargs="+", help="a subset of contenders, by name")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--dtype", choices=list(H.DTYPES), default="fp32", help="parameters, grads "
                    "and state (--device cuda only)")
    ap.add_argument("--layers", type=int, help="decoder layers (--device cuda only; 7b-layers: 4)")
    args = ap.parse_args(argv)
    if args.device == "cpu" and (args.size not in ("50m", "200m") or args.dtype != "fp32"
                                 or args.layers):
        ap.error("--size llama-1b / 7b-layers, --dtype and --layers need --device cuda")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    every = contenders(args.device)
    chosen = select(every, args.only)
    if args.device == "cuda":
        return bench_step_cuda.main(args, chosen, __file__)
    if args.memory_child:
        return H.memory_child(every, args.memory_child, args.size)

    names = list(chosen)
    model = H.build_model(args.size)
    n = num_params(model)
    print(f"timing {len(names)} optimizers on {args.size} ({n / 1e6:.1f}M params)...", file=sys.stderr)
    times, sbytes = H.time_steps(model, chosen, args.warmup, args.rounds)
    del model
    gc.collect()
    mem = {}
    if not args.no_memory:
        for name in names:
            print(f"memory peak: {name}...", file=sys.stderr)
            mem[name] = H.measure_memory(args.size, name, __file__)

    med = {k: statistics.median(v) for k, v in times.items()}
    lines = [f"### step() on CPU, LLaMA-style {args.size} ({n / 1e6:.1f}M params, fp32)", "",
             f"{datetime.date.today()} | {H.machine()} | torch {torch.__version__} | "
             f"commit {H.commit()} | median of {args.rounds} round-robin rounds after "
             f"{args.warmup} warm-up steps", "",
             "| optimizer | step ms | vs torch fused AdamW | state bytes/param "
             "| peak above params+grads+state (MiB) | same, bytes/param | of it, freed after step (MiB) |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name in names:
        m = mem.get(name)
        peak = (f"{m['over'] / 2**20:.1f} | {m['over'] / n:.2f} | {m['transient'] / 2**20:.1f}"
                if m else "- | - | -")
        lines.append(f"| {name} | {1e3 * med[name]:.1f} | {med[name] / med[H.BASELINE]:.2f}x "
                     f"| {sbytes[name] / n:.2f} | {peak} |")
    H.publish(lines, args.write)


if __name__ == "__main__":
    main()
