"""The shared harness of the step benchmarks in bench/ (bench_step.py with its CUDA half
bench_step_cuda.py, bench_apollo.py, bench_frugal.py, bench_distributed.py); no benchmark of its
own. The method is described in bench/bench_step.py's header.

Here: the hyper-parameters, the LLaMA-style models with fixed gradients, contender factories
(ADAM_CONTENDERS, MEMOPT_APOLLO, apollo_torch_contenders()), state bytes (apollo-torch's
projection matrices included), round-robin timing, step-time RSS peaks in a fresh process, the
machine and commit lines, the common options and bench/RESULTS.md.

A contender is a name and a factory `make(model) -> optimizer`. Every function that builds
optimizers takes its contenders as an argument: each script assembles its own dict from the
factories here and passes it on. Nothing in this module is meant to be reassigned by a script.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

import memopt_core
from memopt_core.reporting import tensor_bytes
from memopt_core.app.models import Llama, llama_config

HP = dict(lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
BASELINE = "torch AdamW fused"
ROOT = Path(__file__).resolve().parent.parent

try:  # optional (comes with the test extras); imported up front so that the memory children's
    from adam_mini import Adam_mini  # baseline includes the module, not just its optimizer
except ImportError:
    Adam_mini = None


def adam_mini_ref(model):
    """adam_mini.Adam_mini 1.1.1 given the model's dim, n_heads and n_kv_heads."""
    c = model.config
    return Adam_mini(model.named_parameters(), **HP, dim=c.hidden_size, n_heads=c.num_attention_heads,
                     n_kv_heads=c.num_key_value_heads, verbose=False)


# The Adam family: bench_step.py's table, and the AdamW references of the other scripts.
ADAM_CONTENDERS = {
    "memopt AdamMini": lambda m: memopt_core.AdamMini(m, **HP),
    "memopt SlimAdam": lambda m: memopt_core.SlimAdam(m, **HP),  # the paper's static table
    "memopt AdamW": lambda m: memopt_core.AdamW(m.parameters(), **HP),
    BASELINE: lambda m: torch.optim.AdamW(m.parameters(), **HP, fused=True),
    "torch AdamW foreach": lambda m: torch.optim.AdamW(m.parameters(), **HP, foreach=True),
}
if Adam_mini is not None:
    ADAM_CONTENDERS["adam-mini 1.1.1"] = adam_mini_ref

# APOLLO with the paper's settings (see bench_apollo.py's header): rank d/4 = 128 for the 50m
# model's d = 512, channel scaling; Mini: rank 1, tensor scaling, scale 128.
APOLLO_RANK = 128
APOLLO = dict(rank=APOLLO_RANK, proj="random", proj_type="std", scale_type="channel",
              update_proj_gap=200, scale=1.0)
APOLLO_MINI = dict(rank=1, proj="random", proj_type="std", scale_type="tensor",
                   update_proj_gap=200, scale=128.0)


def _memopt(cls, settings):
    return lambda model: cls(model, **HP, **settings)


MEMOPT_APOLLO = {
    f"memopt Apollo r={APOLLO_RANK}": _memopt(memopt_core.Apollo, APOLLO),
    f"memopt Apollo r={APOLLO_RANK}, no P stored": _memopt(memopt_core.Apollo,
                                                           dict(APOLLO, store_projection=False)),
    "memopt ApolloMini": _memopt(memopt_core.ApolloMini, APOLLO_MINI),
}


def projected(model) -> list:
    """The weights both APOLLO implementations project (apollo-torch's main_pretrain rule: the
    nn.Linear weights whose module name contains "attn" or "mlp"; memopt's role-based choice
    picks the same tensors on these models)."""
    return [m.weight for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and ("attn" in n or "mlp" in n)]


def _apollo_torch(apollo_torch, settings):
    def make(model):
        lowrank = projected(model)
        ids = {id(p) for p in lowrank}
        rest = [p for p in model.parameters() if id(p) not in ids]
        return apollo_torch.APOLLOAdamW([{"params": rest}, {"params": lowrank, **settings}], **HP)
    return make


def apollo_torch_contenders() -> dict:
    """PyPI apollo-torch 1.0.3's APOLLO and APOLLO-Mini with the groups its main_pretrain.py
    builds (projected weights as above, its AdamW on the rest); {} with a note on stderr where
    it is not installed. Imports apollo_torch (seconds: it pulls in transformers), so only the
    scripts that run it call this."""
    try:
        import apollo_torch
    except ImportError:
        print("apollo-torch not installed (pip install apollo-torch==1.0.3): reference left out",
              file=sys.stderr)
        return {}
    return {f"apollo-torch 1.0.3 r={APOLLO_RANK}": _apollo_torch(apollo_torch, APOLLO),
            "apollo-torch 1.0.3 Mini": _apollo_torch(apollo_torch, APOLLO_MINI)}


def model_config(size: str, layers: int | None = None):
    if size == "7b-layers":  # full-size LLaMA-7B layers, fewer of them (bench_step.py's header)
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


def state_bytes(opt, params=None) -> int:
    """Bytes of every tensor in opt.state (views of a flat pool counted once each; a DTensor by
    this rank's shard), of the parameters in `params` only where given. apollo-torch keeps its
    projection matrix in a GradientProjector object in the state (`ortho_matrix`): counted too."""
    wanted = None if params is None else {id(p) for p in params}
    total = 0
    for p, s in opt.state.items():
        if wanted is not None and id(p) not in wanted:
            continue
        for v in s.values():
            v = getattr(v, "ortho_matrix", v)
            total += tensor_bytes(v) if torch.is_tensor(v) else 0
    return total


def _host_timed_step(opt) -> float:
    t0 = time.perf_counter()
    opt.step()
    return time.perf_counter() - t0


def require_cuda() -> None:
    """Exits with what is missing unless torch sees a CUDA device (the --device cuda scripts)."""
    if not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device is available "
                 f"(torch {torch.__version__}, torch.cuda.is_available() is False); "
                 "run it on a machine with an NVIDIA GPU and a CUDA build of torch and memopt_core")


def parse_device_args(ap: argparse.ArgumentParser) -> argparse.Namespace:
    """ap's arguments plus --device cpu|cuda (the ratio scripts); --device cuda exits unless
    torch sees a GPU."""
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    args = ap.parse_args()
    if args.device == "cuda":
        require_cuda()
    return args


def device_round_robin(opts: dict, args) -> dict:
    """round_robin over args.warmup / args.rounds, timed with CUDA events on --device cuda."""
    return round_robin(opts, args.warmup, args.rounds,
                       cuda_timed_step if args.device == "cuda" else _host_timed_step)


def device_note(args) -> str:
    """What a ratio table says of its GPU (nothing on the CPU: machine() is in its header)."""
    return f" On {cuda_machine()} (CUDA events)." if args.device == "cuda" else ""


def cuda_timed_step(opt) -> float:
    """round_robin's timed_step on a GPU: the step between two CUDA events."""
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    opt.step()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3


def cuda_machine() -> str:
    p = torch.cuda.get_device_properties(0)
    return (f"{p.name}, {p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs, "
            f"CUDA {torch.version.cuda}")


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


def time_steps(model, contenders: dict, warmup: int, rounds: int) -> tuple[dict, dict]:
    """Every contender ({name: make(model)}) built on `model` and stepped round-robin:
    ({name: step seconds per round}, {name: state bytes})."""
    opts = {n: make(model) for n, make in contenders.items()}
    times = round_robin(opts, warmup, rounds)
    return times, {n: state_bytes(o) for n, o in opts.items()}


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def memory_child(contenders: dict, name: str, size: str) -> None:
    """Run in a fresh process (see measure_memory): prints the step-time RSS peak of
    contenders[name] on `size` as JSON (bench_step.py's header has the method)."""
    make = contenders[name]
    # A first run on a tiny model pays the one-time costs that are no optimizer's memory: lazily
    # imported modules (torch.optim pulls in parts of torch._dynamo), library code paged in on
    # first call, the thread pool.
    warm = Llama(llama_config("tiny"))
    for p in warm.parameters():
        p.grad = torch.zeros_like(p)
    opt = make(warm)
    opt.step()
    opt.step()
    del warm, opt
    model = build_model(size)
    gc.collect()
    base = _status("VmRSS")
    opt = make(model)
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


def measure_memory(size: str, name: str, script: str) -> dict:
    """memory_child(its contenders, name, size) in a fresh `script` process (which must pass
    --memory-child on to memory_child with the same contenders, as arg_parser's scripts do)."""
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


def ratio_report(title: str, args, note: str, columns: tuple, rows: list) -> str:
    """A RESULTS.md section comparing two variants of each contender timed round-robin: the
    title, the machine / torch / commit / method line (+ `note`), and per (name, a ms, b ms) of
    `rows` the two medians and b / a; `columns` names a and b. Printed, and appended to
    RESULTS.md with --write."""
    a, b = columns
    lines = [title, "", f"{machine()}, torch {torch.__version__}, commit {commit()}; median of "
             f"{args.rounds} round-robin steps after {args.warmup} warm-up.{note}", "",
             f"| optimizer | {a} ms | {b} ms | {b} / {a} |", "|---|---:|---:|---:|"]
    lines += [f"| {name} | {x:.1f} | {y:.1f} | {y / x:.2f}x |" for name, x, y in rows]
    return publish(lines, args.write)


def publish(lines: list, write: bool) -> str:
    """A benchmark's table (its lines): printed, and appended to bench/RESULTS.md if `write`."""
    table = "\n".join(lines)
    print(table)
    if write:
        append_results(table)
    return table


def append_results(table: str) -> None:
    results = ROOT / "bench" / "RESULTS.md"
    new = not results.exists()
    with results.open("a") as f:
        if new:
            f.write("# Benchmark results\n\nAppended by the scripts in bench/; each table says "
                    "how it was made (see the script's header for the method).\n")
        f.write("\n" + table + "\n")
    print(f"appended to {results}", file=sys.stderr)
