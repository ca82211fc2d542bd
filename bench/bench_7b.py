"""A real pre-training step of Llama-2-7B (the `llama-7b` preset) on one device, measured.

    .venv/bin/python bench/bench_7b.py --optimizer apollo_mini --dtype bf16 --steps 2
    .venv/bin/python bench/bench_7b.py --optimizer apollo_mini --dtype int8 --steps 2
    .venv/bin/python bench/bench_7b.py --model llama-350m --steps 3      # a quick rehearsal

The model is built on the meta device and allocated directly in its storage format
(models.to_weight_format, then materialize: never a full fp32 copy; int8 layers draw one fp32
weight at a time and encode it); it trains on random tokens (batch 1 x 256 by
default, as the GaLore/APOLLO 7B anchors) with layer-wise stepping (LayerwiseStep: one gradient at
a time), activation checkpointing and the device's compute dtype (fp32 on a CPU without bf16
instructions: app/compute_dtype.py). Printed per step: seconds and loss; then peak memory
(CPU: the allocator's peak, memory.train_peak, and the process's peak RSS; CUDA: max_memory_allocated / reserved) beside `memopt plan`'s prediction.
"""
from __future__ import annotations

import argparse
import resource
import time

import torch

import memopt_core
from memopt_core.app.compute_dtype import resolve_compute_dtype
from memopt_core.app.memory import release_freed_memory, train_peak
from memopt_core.app.models import Llama, llama_config, materialize, to_weight_format
from memopt_core.app.plan import GB, plan
from memopt_core.app.train_config import DTYPES, WEIGHT_FORMATS, dtype_name, rounding_kwargs
from harness import commit, machine


def main() -> None:
    torch.manual_seed(0)  # the same initial weights every run
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llama-7b")
    ap.add_argument("--optimizer", default="apollo_mini", choices=list(memopt_core.OPTIMIZERS))
    ap.add_argument("--dtype", default="bf16", choices=list(WEIGHT_FORMATS),
                    help="weight format, as memopt train's (int8: attention/MLP weights)")
    ap.add_argument("--compute-dtype", default=None, choices=list(DTYPES))
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--malloc", default="release", choices=["release", "default"],
                    help="CPU: release freed memory to the OS at once (memory.release_freed_memory: "
                         "a lower peak RSS, slower steps) or glibc's default")
    ap.add_argument("--rounding", default="stochastic", choices=["stochastic", "nearest"],
                    help="of low-precision weights, as `memopt train --rounding`")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = ap.parse_args()
    device, dtype = torch.device(a.device), WEIGHT_FORMATS[a.dtype]
    released = device.type == "cpu" and a.malloc == "release" and release_freed_memory()
    compute = resolve_compute_dtype(dtype, device, a.compute_dtype)
    compute_name = dtype_name(compute)

    start = time.perf_counter()
    with torch.device("meta"):
        model = to_weight_format(Llama(llama_config(a.model)), a.dtype)
    materialize(model, device, dtype)
    model.checkpoint_activations, model.compute_dtype = True, compute
    rounding = rounding_kwargs(a.rounding, a.dtype)  # as memopt train
    opt = memopt_core.make_optimizer(a.optimizer, model, lr=a.lr, **rounding)
    layerwise = memopt_core.LayerwiseStep(opt)
    print(f"{a.model}: {sum(p.numel() for p in model.parameters()) / 1e9:.2f}B params, "
          f"{a.dtype} weights ({'stochastic' if rounding else 'nearest'} rounding), {compute_name} "
          f"compute, {a.optimizer}, layer-wise, activation "
          f"checkpointing, batch {a.batch_size} x {a.seq_len}"
          f"{', freed memory released at once' if released else ''}; built in "
          f"{time.perf_counter() - start:.0f} s", flush=True)
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, model.config.vocab_size, (a.batch_size, a.seq_len + 1),
                             generator=gen).to(device) for _ in range(a.steps)]
    peak, seconds, losses = train_peak(model, opt, batches, device)
    for step, (sec, loss) in enumerate(zip(seconds, losses), 1):
        print(f"step {step}: {sec:.1f} s, loss {loss:.3f}")
    assert layerwise.at_boundary

    predicted = plan(a.model, a.optimizer, dtype=a.dtype, layerwise=True,
                     batch_size=a.batch_size, seq_len=a.seq_len, compute_dtype=compute_name,
                     checkpoint_activations=True)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GB  # KiB on Linux
    print(f"\n{machine()}; torch {torch.__version__}; commit {commit()}")
    print("| figure | GB |\n|---|---:|")
    print(f"| memopt plan: total (weights {predicted.weights / GB:.2f}, grads "
          f"{predicted.grads / GB:.2f}, state {predicted.state / GB:.2f}, activations "
          f"{predicted.activations / GB:.2f}) | {predicted.total / GB:.2f} |")
    print(f"| optimizer state after the steps (state_bytes) | {opt.state_bytes() / GB:.2f} |")
    if device.type == "cuda":
        print(f"| max_memory_allocated | {torch.cuda.max_memory_allocated(device) / GB:.2f} |")
        print(f"| max_memory_reserved | {torch.cuda.max_memory_reserved(device) / GB:.2f} |")
    else:
        print(f"| allocator peak (held + profiler peak of a step) | {peak / GB:.2f} |")
        print(f"| process peak RSS | {rss:.2f} |")


if __name__ == "__main__":
    main()
