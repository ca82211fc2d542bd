"""The CUDA half of bench/bench_step.py (`--device cuda`); imported by it, importable without a GPU.
It imports nothing of bench_step: its shared code comes from bench/harness.py, its contenders
from bench_step.main (an argument).

Method (the device METHOD: events, warm-up, medians, rotation, a measured ceiling):
  * Time: every contender shares one model on the GPU with a fixed random gradient (never zeros)
    and all contenders' states live at once; each round steps every contender once, starting
    from a rotated contender. A step is timed with CUDA events recorded around opt.step() after
    a synchronize, so it includes the host's launch gaps (what a training loop pays) but no
    queued work of the previous contender. Reported: the median over rounds after warm-up
    steps, and the ratio to torch.optim.AdamW(fused=True) from the same rounds.
  * Ceiling: a device-to-device copy (`dst.copy_(src)`, 1 GiB each way, median of 20) in the
    same run; bytes = read + written.
  * Bytes a step must move at the least, counted exactly from the dtypes: every parameter read
    and written, its gradient read, every state tensor on the device read and written (AdamW:
    28 B/param in fp32; Adam-mini and SlimAdam: 20 plus their small v). Achieved bandwidth =
    those bytes / step time, also as a fraction of the copy's. memopt's two-pass blocks read
    the gradient twice (24 B/param), which this floor does not credit.
  * Memory: in the timing process, the step's transient (max_memory_allocated during a step
    minus memory_allocated before it); in a fresh process per contender, max_memory_allocated
    during steady-state steps above params + grads + that optimizer's state bytes (temporaries
    plus persistent workspaces such as memopt's scratch), as the CPU table reports RSS.
"""
from __future__ import annotations

import datetime
import json
import statistics
import subprocess
import sys

import torch

import harness as H
from memopt_core.app.models import num_params

DEVICE_SIZES = ("50m", "200m", "llama-1b", "7b-layers")


def min_bytes(opt) -> int:
    """Bytes one step must move at the least (see the module docstring)."""
    total = 0
    for group in opt.param_groups:
        for p in group["params"]:
            if p.grad is None:
                continue
            total += 2 * p.nbytes + p.grad.nbytes
            for t in opt.state.get(p, {}).values():
                if torch.is_tensor(t) and t.device == p.device and t is not p:
                    total += 2 * t.nbytes
    return total


def copy_bandwidth(nbytes: int = 2**30, reps: int = 20) -> float:
    """Bytes per second (read + written) of dst.copy_(src) on the current device."""
    src = torch.empty(nbytes // 4, device="cuda").uniform_()
    dst = torch.empty_like(src)
    times = []
    for i in range(reps + 3):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        if i >= 3:
            times.append(start.elapsed_time(end) / 1e3)
    del src, dst
    torch.cuda.empty_cache()
    return 2 * nbytes / statistics.median(times)


def step_transient(opt) -> int:
    """Peak allocated during one step above what was allocated before it."""
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    opt.step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def memory_child(args, contenders: dict, name: str) -> None:
    """Run in a fresh process: peak above params + grads + state during steady-state steps."""
    model = H.build_model(args.size, "cuda", args.dtype, args.layers)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()  # params + grads (and the model's buffers)
    opt = contenders[name](model)
    for _ in range(2):
        opt.step()
    peak = transient = 0
    for _ in range(3):
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        opt.step()
        torch.cuda.synchronize()
        peak = max(peak, torch.cuda.max_memory_allocated())
        transient = max(transient, torch.cuda.max_memory_allocated() - before)
    sb = H.state_bytes(opt)
    print(json.dumps(dict(base=base, state=sb, over=peak - base - sb, transient=transient)))


def measure_memory(args, name: str, script: str) -> dict:
    cmd = [sys.executable, script, "--device", "cuda", "--size", args.size, "--dtype", args.dtype,
           "--memory-child", name] + (["--layers", str(args.layers)] if args.layers else [])
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(args, contenders: dict, script: str) -> None:
    """bench_step.py --device cuda with `contenders` ({name: make(model)}, the baseline among
    them); `script` is bench_step.py, run again for the memory children."""
    H.require_cuda()
    if args.memory_child:
        return memory_child(args, contenders, args.memory_child)
    names = list(contenders)
    copy_bw = copy_bandwidth()  # before the model, while the memory is free
    model = H.build_model(args.size, "cuda", args.dtype, args.layers)
    n = num_params(model)
    print(f"timing {len(names)} optimizers on {args.size} ({n / 1e6:.1f}M params, {args.dtype}) "
          f"on {H.cuda_machine()}...", file=sys.stderr)
    opts = {k: make(model) for k, make in contenders.items()}  # every state alive at once
    times = H.round_robin(opts, args.warmup, args.rounds, H.cuda_timed_step)
    moved = {k: min_bytes(o) for k, o in opts.items()}
    sbytes = {k: H.state_bytes(o) for k, o in opts.items()}
    transient = {k: step_transient(o) for k, o in opts.items()}
    del opts, model
    torch.cuda.empty_cache()
    mem = {}
    if not args.no_memory:
        for name in names:
            print(f"memory peak: {name}...", file=sys.stderr)
            mem[name] = measure_memory(args, name, script)

    med = {k: statistics.median(v) for k, v in times.items()}
    spread = {k: (max(v) - min(v)) / med[k] for k, v in times.items()}
    lines = [f"### step() on CUDA, LLaMA-style {args.size} ({n / 1e6:.1f}M params, {args.dtype})", "",
             f"{datetime.date.today()} | {H.cuda_machine()} | torch {torch.__version__} | commit "
             f"{H.commit()} | median of {args.rounds} rotated rounds after {args.warmup} warm-up "
             f"steps, CUDA events | device copy {copy_bw / 1e9:.0f} GB/s (read + write)", "",
             "| optimizer | step ms | vs torch fused AdamW | spread | bytes/param to move "
             "| GB/s | of copy | state bytes/param | step transient (MiB) "
             "| peak above params+grads+state (MiB) | same, bytes/param |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name in names:
        bw = moved[name] / med[name]
        m = mem.get(name)
        peak = f"{m['over'] / 2**20:.1f} | {m['over'] / n:.3f}" if m else "- | -"
        lines.append(f"| {name} | {1e3 * med[name]:.2f} | {med[name] / med[H.BASELINE]:.2f}x "
                     f"| {100 * spread[name]:.0f}% | {moved[name] / n:.2f} | {bw / 1e9:.0f} "
                     f"| {bw / copy_bw:.2f} | {sbytes[name] / n:.2f} "
                     f"| {transient[name] / 2**20:.1f} | {peak} |")
    table = "\n".join(lines)
    print(table)
    if args.write:
        H.append_results(table)
