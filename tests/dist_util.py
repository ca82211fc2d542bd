"""Multi-process tests on CPU: `run_workers(fn, world_size, *args)` starts `world_size` processes
joined by a gloo process group on a free loopback port, runs `fn(rank, world_size, *args)` in
each, and returns every rank's result (whatever `fn` returns, through torch.save). A failure on
any rank fails the test with that rank's traceback. `fn` must be importable (module level).

The workers run one thread each (2 cores are shared by all ranks) and import tests/ helpers
(conftest's make_llama, make_grads, ...) like the parent does."""
from __future__ import annotations

import os
import socket
import sys
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

_TESTS = os.path.dirname(os.path.abspath(__file__))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world_size, port, out_dir, backend, fn, args):
    sys.path.insert(0, _TESTS)
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, rank=rank, world_size=world_size)
    try:
        result = fn(rank, world_size, *args)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))


def run_workers(fn, world_size: int, *args, backend: str = "gloo") -> list:
    """[result of rank 0, result of rank 1, ...]. With backend="nccl" rank r uses cuda:r."""
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_worker, args=(world_size, free_port(), out_dir, backend, fn, args),
                 nprocs=world_size, join=True)
        return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False)
                for r in range(world_size)]


def full(t):
    """A DTensor's full value (a collective: every rank must call it), or t itself."""
    from torch.distributed.tensor import DTensor
    return (t.full_tensor() if isinstance(t, DTensor) else t).cpu()
