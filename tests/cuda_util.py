"""Shared by the GPU tests (tests/test_cuda_*.py): the skip marker and a CPU-vs-CUDA comparison.
Without a CUDA device every GPU test skips; with one, a memopt build without its CUDA kernels
fails them (that would be a packaging bug, not a reason to skip)."""
from __future__ import annotations

import pytest
import torch

import memopt_core

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def assert_cuda_build():
    assert memopt_core._C.cuda_kernels, "a CUDA device is present but memopt_core was built "\
        "without its CUDA kernels (reinstall with a CUDA torch and nvcc on PATH)"


def non_contiguous(g: torch.Tensor) -> torch.Tensor:
    """The same values as a non-contiguous tensor (column-major for >= 2-D, strided for 1-D)."""
    if g.dim() >= 2:
        return g.transpose(-1, -2).contiguous().transpose(-1, -2)
    return torch.stack([g, torch.zeros_like(g)], dim=-1)[..., 0]


def steady_step_bytes(opt) -> int:
    """CUDA memory a steady-state step allocates above what it started with: two steps first
    (state and workspace exist from then on), then the peak of a third
    (torch.cuda.max_memory_allocated)."""
    opt.step()
    opt.step()
    torch.cuda.synchronize()
    start = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    opt.step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - start


def rel_err(actual: torch.Tensor, expected: torch.Tensor, origin=None) -> float:
    """||actual - expected|| / ||expected|| in float64 (of the displacement from `origin`)."""
    a, e = actual.detach().cpu().double(), expected.detach().cpu().double()
    if origin is not None:
        o = origin.detach().cpu().double()
        a, e = a - o, e - o
    return ((a - e).norm() / e.norm().clamp_min(1e-300)).item()


# Tolerance of CUDA against the CPU path, by storage dtype: both compute in float32 (float64 for
# double) but differ in FMA contraction and reduction order; low-precision storage turns an
# occasional last-bit difference into one ulp of the stored value.
TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}


# ---- the "emu" device: the CUDA kernels and glue run on the host (tools/cuda_emu) ------------
# CI has no GPU; these tests still run the real kernel code, compiled for an emulated CUDA
# runtime, against the CPU ops. Tensors stay on the CPU; the ops come from namespace memopt_emu.
_EMU = {}


def memopt_schemas(validators: bool = False) -> list:
    """The schemas of every op registered in the memopt namespace, by name: the update ops, or
    their validators (check_<op>, cpp/src/define_op.h)."""
    return sorted((s for s in torch._C._jit_get_all_schemas() if s.name.startswith("memopt::")
                   and s.name.startswith("memopt::check_") == validators), key=lambda s: s.name)


def load_emulator():
    """Builds (once; cached under build/cuda_emu) and loads the emulated CUDA ops."""
    if "lib" not in _EMU:
        import importlib.util
        import os
        from pathlib import Path
        root = Path(__file__).resolve().parent.parent
        spec = importlib.util.spec_from_file_location("cuda_emu_build",
                                                      root / "tools/cuda_emu/build.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        out = Path(os.environ.get("MEMOPT_CUDA_EMU_DIR", root / "build" / "cuda_emu"))
        lib = torch.library.Library("memopt_emu", "DEF")
        for schema in memopt_schemas():  # every op, read from the dispatcher: none hand-kept
            lib.define(str(schema).split("::", 1)[1])
        for schema in memopt_schemas(validators=True):  # each op's validator, the same on any
            name = schema.name.split("::", 1)[1]         # device: the host build's
            lib.define(str(schema).split("::", 1)[1])
            lib.impl(name, getattr(torch.ops.memopt, name), "CompositeExplicitAutograd")
        torch.ops.load_library(str(mod.build(out)))
        _EMU["lib"] = lib
    return torch.ops.memopt_emu


EMU = pytest.param("emu", marks=pytest.mark.cuda_emu)


def ops(device: str):
    """The op namespace that runs on `device` ("cpu", "cuda" or the host-emulated "emu")."""
    return load_emulator() if device == "emu" else torch.ops.memopt


def tensor_device(device: str) -> str:
    return "cpu" if device == "emu" else device
