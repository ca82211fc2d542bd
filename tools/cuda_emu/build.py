#!/usr/bin/env python
"""Builds the host emulation of memopt's CUDA kernels and glue (tests/test_cuda_*.py, device "emu").

    python tools/cuda_emu/build.py OUT_DIR      ->  OUT_DIR/libmemopt_cuda_emu.so

Every cpp/src/cuda/*.cu is compiled as host C++ against include/ (an emulated CUDA runtime:
threads as fibers, shuffles and __syncthreads as barriers), with each `kernel<<<grid, block, 0,
stream>>>(args)` rewritten to `emu::launch(grid, block, [&] { kernel(args); })`. Every
*_glue.cpp is compiled unchanged but for its dispatch registration (at most one; a glue file
without one holds code another glue calls), which goes to the CPU key of the op namespace
`memopt_emu` (the test defines its schemas from the real ops'), and with
MEMOPT_CUDA_EMULATION (launch.h: CPU tensors, no stream). The result runs the real kernels and
glue on CPU tensors, so CI compares them with the CPU ops and the float64 references without a
GPU. Rebuilds only when a source is newer than the library. MEMOPT_CUDA_EMU_CFLAGS adds compiler
(and linker) flags: scripts/sanitize.sh builds the kernels with UBSan this way, into its own OUT_DIR.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
CUDA = ROOT / "cpp" / "src" / "cuda"
# kernel<targs><<<grid, block, 0, stream>>>(arg[, arg]);  (targs may nest one level)
LAUNCH = re.compile(r"([\w:]+(?:<(?:[^<>]|<[^<>]*>)*>)?)\s*<<<(.+?), ([\w.]+), 0, (.+?)>>>\(([^()]*)\);")
REGISTER = re.compile(r"TORCH_LIBRARY_IMPL\(memopt, CUDA, m\)")
ANY_REGISTER = re.compile(r"TORCH_LIBRARY\w*\s*\(")


def rewrite_kernels(src: str) -> str:
    out = LAUNCH.sub(lambda m: f"emu::launch(dim3({m.group(2)}), dim3({m.group(3)}), "
                               f"[&] {{ {m.group(1)}({m.group(5)}); }});", src)
    if "<<<" in out:
        raise SystemExit("tools/cuda_emu: a kernel launch is not of the form "
                         "kernel<<<grid, block, 0, stream>>>(args);")
    return out


def build(out_dir: Path) -> Path:
    import torch
    import memopt_core._C as ext
    from torch.utils.cpp_extension import include_paths
    out_dir.mkdir(parents=True, exist_ok=True)
    lib = out_dir / "libmemopt_cuda_emu.so"
    kernels = [k for k in sorted(CUDA.glob("*.cu")) if k.name != "error.cu"]
    glue = sorted(CUDA.glob("*_glue.cpp"))
    # (every public header: the kernels include kernel_params.h and rounding.h, the glue more)
    sources = kernels + glue + sorted(CUDA.glob("*.h")) + sorted(CUDA.glob("*.cuh")) + \
        sorted((HERE / "include").glob("*.h")) + \
        sorted((ROOT / "cpp/include/memopt").glob("*.h")) + [Path(__file__)]
    if lib.exists() and lib.stat().st_mtime > max(s.stat().st_mtime for s in sources):
        return lib
    torch_lib = Path(torch.__file__).parent / "lib"
    memopt_lib = Path(ext.__file__).parent / "lib"
    inc = [f"-I{p}" for p in include_paths()] + [f"-I{ROOT / 'cpp/include'}", f"-I{CUDA}"]
    extra = os.environ.get("MEMOPT_CUDA_EMU_CFLAGS", "").split()
    jobs = []
    for k in kernels:
        emu = out_dir / (k.stem + "_cu.cpp")
        emu.write_text(f'#line 1 "{k}"\n' + rewrite_kernels(k.read_text()))
        jobs.append(["g++", "-std=c++20", "-O1", "-fPIC", "-w", *extra, f"-I{HERE / 'include'}",
                     *inc, "-c", str(emu), "-o", str(emu.with_suffix(".o"))])
    for g in glue:
        emu = out_dir / (g.stem + "_emu.cpp")
        source = g.read_text()
        text, n = REGISTER.subn("TORCH_LIBRARY_IMPL(memopt_emu, CPU, m)", source)
        if n > 1 or len(ANY_REGISTER.findall(source)) != n:
            raise SystemExit(f"tools/cuda_emu: {g.name} must register at most once, as "
                             "TORCH_LIBRARY_IMPL(memopt, CUDA, m)")
        emu.write_text(f'#line 1 "{g}"\n' + text)
        jobs.append(["g++", "-std=c++17", "-O1", "-fPIC", "-w", *extra, "-DMEMOPT_CUDA_EMULATION",
                     *inc, "-c", str(emu), "-o", str(emu.with_suffix(".o"))])
    errors = out_dir / "error_emu.cpp"
    errors.write_text('#include "memopt/kernel_params.h"\nnamespace memopt::cuda {\n'
                      'const char* error_string(int code) { return code ? "emulated CUDA error" '
                      ': "no error"; }\n}\n')
    jobs.append(["g++", "-std=c++17", "-fPIC", *inc, "-c", str(errors), "-o",
                 str(errors.with_suffix(".o"))])
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(lambda c: subprocess.run(c, capture_output=True, text=True), jobs))
    failed = [f"{' '.join(c[-3:])}\n{r.stderr[-4000:]}" for c, r in zip(jobs, results) if r.returncode]
    if failed:
        raise SystemExit("tools/cuda_emu: compilation failed\n" + "\n".join(failed))
    objs = [c[-1] for c in jobs]
    subprocess.run(["g++", "-shared", "-o", str(lib), *objs, f"-L{torch_lib}", "-ltorch",
                    "-ltorch_cpu", "-lc10", f"-L{memopt_lib}", "-lmemopt",
                    f"-Wl,-rpath,{torch_lib}", f"-Wl,-rpath,{memopt_lib}", "-pthread", *extra],
                   check=True, capture_output=True)
    return lib


if __name__ == "__main__":
    print(build(Path(sys.argv[1] if len(sys.argv) > 1 else ROOT / "build" / "cuda_emu")))
