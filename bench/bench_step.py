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
parameter (no forward/backward: only step() is timed).

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
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

import memopt_core
from memopt_core.app.models import Llama, llama_config, num_params

HP = dict(lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
BASELINE = "torch AdamW fused"
ROOT = Path(__file__).resolve().parent.parent


try:  # optional (comes with the test extras); imported up front so that the memory children's
    from adam_mini import Adam_mini  # baseline includes the module, not just its optimizer
except ImportError:
    Adam_mini = None


def _adam_mini_ref(model):
    c = model.config
    return Adam_mini(model.named_parameters(), **HP, dim=c.hidden_size, n_heads=c.num_attention_heads,
                     n_kv_heads=c.num_key_value_heads, verbose=False)


CONTENDERS = {
    "memopt AdamMini": lambda m: memopt_core.AdamMini(m, **HP),
    "memopt SlimAdam": lambda m: memopt_core.SlimAdam(m, **HP),  # the paper's static table
    "memopt AdamW": lambda m: memopt_core.AdamW(m.parameters(), **HP),
    "torch AdamW fused": lambda m: torch.optim.AdamW(m.parameters(), **HP, fused=True),
    "torch AdamW foreach": lambda m: torch.optim.AdamW(m.parameters(), **HP, foreach=True),
}
# On the GPU one table compares every optimizer with fused AdamW (issue 8's targets name AdamMini
# and ApolloMini); on the CPU, APOLLO and FRUGAL have their own scripts (bench_apollo.py, which
# also brings apollo-torch on the GPU, and bench_frugal.py).
CUDA_CONTENDERS = {
    "memopt Frugal rho=0.25": lambda m: memopt_core.Frugal(m, **HP, density=0.25),
}
if Adam_mini is not None:
    CONTENDERS["adam-mini 1.1.1"] = _adam_mini_ref
else:
    print("adam-mini not installed (pip install adam-mini==1.1.1): reference left out",
          file=sys.stderr)


def model_config(size: str, layers: int | None = None):
    if size == "7b-layers":  # full-size LLaMA-7B layers, fewer of them (see the header)
        return llama_config("llama-7b", num_hidden_layers=layers or 4)
    return llama_config(size, **({"num_hidden_layers": layers} if layers else {}))


def build_model(size: str, device: str = "cpu", dtype: str = "fp32", layers: int | None = None):
    torch.manual_seed(0)
    with torch.device(device):  # initialised where it lives: a 7B-scale model never on the CPU
        model = Llama(model_config(size, layers)).to(DTYPES[dtype])
    gen = torch.Generator(device).manual_seed(1)
    for p in model.parameters():  # fixed gradient, gradient-sized (1e-3 like a clipped LLM grad)
        p.grad = torch.randn(p.shape, generator=gen, device=device, dtype=p.dtype).mul_(1e-3)
    return model


def state_bytes(opt) -> int:
    return sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values()
               if torch.is_tensor(t))


def _host_timed_step(opt) -> float:
    t0 = time.perf_counter()
    opt.step()
    return time.perf_counter() - t0


def round_robin(opts: dict, warmup: int, rounds: int, timed_step=_host_timed_step) -> dict:
    """{name: step seconds per round}: warm-up steps, then rounds that step every optimizer
    once, starting from a rotated one."""
    names = list(opts)
    for _ in range(warmup):
        for opt in opts.values():
            opt.step()
    times = {n: [] for n in names}
    for r in range(rounds):
        for n in names[r % len(names):] + names[:r % len(names)]:
            times[n].append(timed_step(opts[n]))
    return times


def time_steps(model, names, warmup: int, rounds: int) -> tuple[dict, dict]:
    """({name: step seconds per round}, {name: state bytes})."""
    opts = {n: CONTENDERS[n](model) for n in names}
    times = round_robin(opts, warmup, rounds)
    return times, {n: state_bytes(o) for n, o in opts.items()}


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def memory_child(size: str, name: str) -> None:
    # A first run on a tiny model pays the one-time costs that are no optimizer's memory: lazily
    # imported modules (torch.optim pulls in parts of torch._dynamo), library code paged in on
    # first call, the thread pool.
    warm = Llama(llama_config("tiny"))
    for p in warm.parameters():
        p.grad = torch.zeros_like(p)
    opt = CONTENDERS[name](warm)
    opt.step()
    opt.step()
    del warm, opt
    model = build_model(size)
    gc.collect()
    base = _status("VmRSS")
    opt = CONTENDERS[name](model)
    for _ in range(2):
        opt.step()
    peak = transient = 0
    for _ in range(3):
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = _status("VmRSS")
        opt.step()
        hwm = _status("VmHWM")
        peak, transient = max(peak, hwm), max(transient, hwm - before)
    sb = state_bytes(opt)
    print(json.dumps(dict(base=base, state=sb, over=peak - base - sb, transient=transient)))


def measure_memory(size: str, name: str, script: str = __file__) -> dict:
    """memory_child(size, name) in a fresh `script` process (which must pass --memory-child on
    to memory_child, as arg_parser's scripts do)."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run([sys.executable, script, "--size", size, "--memory-child", name],
                         env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def machine() -> str:
    model = "unknown CPU"
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except FileNotFoundError:
        pass
    return f"{model}, {len(os.sched_getaffinity(0))} cores, {torch.get_num_threads()} torch threads"


def commit() -> str:
    def git(*a):
        return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    sha = git("rev-parse", "--short", "HEAD") or "unknown"
    return sha + ("-dirty" if git("status", "--porcelain", "--untracked-files=no") else "")


def arg_parser(doc: str, rounds: int, sizes=("50m", "200m")) -> argparse.ArgumentParser:
    """The options every step benchmark script shares."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--size", choices=list(sizes), default="50m")
    ap.add_argument("--rounds", type=int, default=rounds)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--no-memory", action="store_true", help="skip the per-process memory peaks")
    ap.add_argument("--write", action="store_true", help="append the table to bench/RESULTS.md")
    ap.add_argument("--memory-child", help=argparse.SUPPRESS)
    return ap


def append_results(table: str) -> None:
    results = ROOT / "bench" / "RESULTS.md"
    new = not results.exists()
    with results.open("a") as f:
        if new:
            f.write("# Benchmark results\n\nAppended by the scripts in bench/; each table says "
                    "how it was made (see the script's header for the method).\n")
        f.write("\n" + table + "\n")
    print(f"appended to {results}", file=sys.stderr)


def parse_args(argv=None) -> argparse.Namespace:
    from bench_step_cuda import DEVICE_SIZES
    ap = arg_parser(__doc__, rounds=9, sizes=DEVICE_SIZES)
    ap.add_argument("--only", nargs="+", help="a subset of contenders, by name")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--dtype", choices=list(DTYPES), default="fp32", help="parameters, grads "
                    "and state (--device cuda only)")
    ap.add_argument("--layers", type=int, help="decoder layers (--device cuda only; 7b-layers: 4)")
    args = ap.parse_args(argv)
    if args.device == "cpu" and (args.size not in ("50m", "200m") or args.dtype != "fp32"
                                 or args.layers):
        ap.error("--size llama-1b / 7b-layers, --dtype and --layers need --device cuda")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.device == "cuda":
        import bench_apollo  # memopt's and apollo-torch's APOLLO contenders
        import bench_step_cuda
        CONTENDERS.update({**bench_apollo.CONTENDERS, **CUDA_CONTENDERS})
        unknown = set(args.only or ()) - set(CONTENDERS)
        if unknown:
            sys.exit(f"--only: unknown contenders {sorted(unknown)}; choose from {list(CONTENDERS)}")
        return bench_step_cuda.main(sys.modules[__name__], args, __file__)
    if args.memory_child:
        return memory_child(args.size, args.memory_child)

    unknown = set(args.only or ()) - set(CONTENDERS)
    if unknown:
        sys.exit(f"--only: unknown contenders {sorted(unknown)}; choose from {list(CONTENDERS)}")
    names = args.only or list(CONTENDERS)
    if BASELINE not in names:
        names.append(BASELINE)  # the ratios need it
    model = build_model(args.size)
    n = num_params(model)
    print(f"timing {len(names)} optimizers on {args.size} ({n / 1e6:.1f}M params)...", file=sys.stderr)
    times, sbytes = time_steps(model, names, args.warmup, args.rounds)
    del model
    gc.collect()
    mem = {}
    if not args.no_memory:
        for name in names:
            print(f"memory peak: {name}...", file=sys.stderr)
            mem[name] = measure_memory(args.size, name)

    med = {k: statistics.median(v) for k, v in times.items()}
    lines = [f"### step() on CPU, LLaMA-style {args.size} ({n / 1e6:.1f}M params, fp32)", "",
             f"{datetime.date.today()} | {machine()} | torch {torch.__version__} | "
             f"commit {commit()} | median of {args.rounds} round-robin rounds after "
             f"{args.warmup} warm-up steps", "",
             "| optimizer | step ms | vs torch fused AdamW | state bytes/param "
             "| peak above params+grads+state (MiB) | same, bytes/param | of it, freed after step (MiB) |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name in names:
        m = mem.get(name)
        peak = (f"{m['over'] / 2**20:.1f} | {m['over'] / n:.2f} | {m['transient'] / 2**20:.1f}"
                if m else "- | - | -")
        lines.append(f"| {name} | {1e3 * med[name]:.1f} | {med[name] / med[BASELINE]:.2f}x "
                     f"| {sbytes[name] / n:.2f} | {peak} |")
    table = "\n".join(lines)
    print(table)
    if args.write:
        append_results(table)


if __name__ == "__main__":
    main()
