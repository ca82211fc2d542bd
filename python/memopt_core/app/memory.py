"""Measuring tensor memory: bytes held by a model, its gradients and optimizer state, and the
peak of one training iteration, on CPU (torch.profiler's allocator events) or CUDA (the caching
allocator's peak counter)."""
from __future__ import annotations

import contextlib
import ctypes
import os
import sys
import time
from typing import Callable

import torch

from ..int8_weights import int8_layer
from ..reporting import tensor_bytes

MiB = 2 ** 20


def release_freed_memory() -> bool:
    """Make glibc hand freed CPU memory back to the OS at once: every allocation over 64 KiB gets
    its own mapping (unmapped on free) and the heap is trimmed whenever it can be. By default
    glibc keeps freed heap blocks for reuse, and a 7B step's mix of tensor sizes leaves GBs of
    them resident (Llama-2-7B, bf16, ApolloMini: peak RSS 18.99 GB with the default, 16.83 GB
    with this, the allocator's own peak 15.50 GB in both; each step about 15% slower, page
    faults). False where the C library is not glibc (nothing changed)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's mallopt parameter numbers
    return bool(libc.mallopt(m_mmap_threshold, 65536)) and bool(libc.mallopt(m_trim_threshold, 0))


@contextlib.contextmanager
def _quiet_stderr():
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def distinct_bytes(tensors) -> int:
    """Bytes of distinct tensors (a tied weight counts once; a DTensor by this rank's shard)."""
    seen, total = set(), 0
    for t in tensors:
        if t is not None and id(t) not in seen:
            seen.add(id(t))
            total += tensor_bytes(t)
    return total


def weight_bytes(params) -> int:
    """Bytes the weights occupy: distinct_bytes, with the carrier of an int8 layer (which holds
    no memory; its gradient is full-size) counted as the layer's codes and scales."""
    stored = []
    for p in params:
        q = None if p is None else int8_layer(p)
        stored += [p] if q is None else [q.weight_codes, q.weight_scales]
    return distinct_bytes(stored)  # (a tensor met twice counts once)


def optimizer_state_bytes(opt: torch.optim.Optimizer) -> int:
    """opt.state_bytes() where the optimizer has it, else the bytes of every tensor in opt.state
    (how a torch.optim baseline is counted)."""
    if hasattr(opt, "state_bytes"):
        return int(opt.state_bytes())
    return distinct_bytes(t for s in opt.state.values() for t in s.values() if torch.is_tensor(t))


def peak_during(fn: Callable[[], None], device: torch.device) -> int:
    """Peak bytes allocated by `fn` above what was allocated when it started: on CUDA from the
    allocator's peak counter; on CPU from the running sum of torch.profiler's allocation events
    (allocations made before the call are not seen, frees of them are ignored)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - start
    from torch.profiler import ProfilerActivity, profile
    with _quiet_stderr():  # kineto prints start/stop lines on fd 2
        prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
        prof.start()
    try:
        fn()
    finally:
        with _quiet_stderr():
            prof.stop()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return peak


def train_peak(model, opt, batches, device: torch.device) -> tuple[int, list, list]:
    """(peak bytes, seconds per step, losses) of training `model` on `batches` (token tensors
    of length seq + 1) with `opt` stepped inside backward (LayerwiseStep) or not at all: the
    peak is what each step allocates (peak_during) on top of the weights and optimizer state
    held before it, so state created in the first step counts there."""
    held = weight_bytes(list(model.parameters())) + optimizer_state_bytes(opt)
    peak, seconds, losses = 0, [], []
    for x in batches:
        def step():
            loss = model(x[:, :-1], x[:, 1:])[1]
            loss.backward()
            losses.append(loss.item())
        start = time.perf_counter()
        peak = max(peak, held + peak_during(step, device))
        seconds.append(time.perf_counter() - start)
        held = weight_bytes(list(model.parameters())) + optimizer_state_bytes(opt)
    return peak, seconds, losses
