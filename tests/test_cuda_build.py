"""The CUDA sources compile on a CPU-only machine: every kernel with nvcc alone, every glue file
against the installed (CPU) torch's headers, and every memopt::cuda symbol the glue calls is
defined by a kernel or glue object. This is what CI can check of issue 8 without a GPU; the kernels'
results are checked by tests/test_cuda_*.py on a CUDA machine."""
from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUDA_DIR = os.path.join(ROOT, "cpp", "src", "cuda")
KERNELS = sorted(glob.glob(os.path.join(CUDA_DIR, "*.cu")))
GLUE = sorted(glob.glob(os.path.join(CUDA_DIR, "*_glue.cpp")))
NVCC = shutil.which("nvcc") or next(iter(glob.glob("/usr/local/cuda*/bin/nvcc")), None)
CXX = shutil.which("c++") or shutil.which("g++")

pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc not installed")


def _compile_all(tmp_path):
    from torch.utils.cpp_extension import include_paths
    inc = ["-I" + os.path.join(ROOT, "cpp", "include")]
    jobs = [[NVCC, "-std=c++17", "-arch=sm_90", "-Werror=all-warnings", *inc, "-c", src,
             "-o", str(tmp_path / (os.path.basename(src) + ".o"))] for src in KERNELS]
    jobs += [[CXX, "-std=c++17", "-O0", "-Wall", "-Werror", "-Wno-c++20-extensions", *inc,
              *("-I" + p for p in include_paths()), "-c", src,
              "-o", str(tmp_path / (os.path.basename(src) + ".o"))] for src in GLUE]
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(lambda cmd: subprocess.run(cmd, capture_output=True, text=True),
                                jobs))
    failures = [f"{' '.join(j[-3:])}\n{r.stderr[-3000:]}" for j, r in zip(jobs, results)
                if r.returncode != 0]
    assert not failures, "\n\n".join(failures)


def _symbols(obj, undefined):
    out = subprocess.run(["nm", "-C", "--undefined-only" if undefined else "--defined-only", obj],
                         capture_output=True, text=True, check=True).stdout
    names = (re.match(r"^\s*(?:[0-9a-f]+\s+)?\w\s+(.*)$", line) for line in out.splitlines())
    return {m.group(1) for m in names if m and m.group(1).startswith("memopt::cuda::")}


@pytest.fixture(scope="module")
def objects(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cuda_objs")
    _compile_all(tmp)
    return tmp


def test_every_optimizer_op_has_a_cuda_kernel():
    # One kernel file per registered op (the design's one-name-per-layer rule).
    names = {os.path.basename(p)[:-3] for p in KERNELS}
    assert {"adamw", "adam_mini", "apollo", "frugal"} <= names, names
    assert {os.path.basename(p)[: -len("_glue.cpp")] for p in GLUE} >= {"adamw", "adam_mini",
                                                                         "apollo", "frugal"}


def test_kernels_and_glue_compile_and_link(objects):
    # the glue files link together with the kernels (one library): a glue may call another's
    # functions (frugal_shard_glue.cpp finishes with frugal_glue.cpp's frugal_run)
    defined = set().union(*(_symbols(str(objects / (os.path.basename(k) + ".o")), False)
                            for k in KERNELS + GLUE))
    for g in GLUE:
        missing = _symbols(str(objects / (os.path.basename(g) + ".o")), True) - defined
        assert not missing, f"{os.path.basename(g)} calls undefined {sorted(missing)}"
