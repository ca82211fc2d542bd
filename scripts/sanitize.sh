#!/usr/bin/env bash
# Builds the C++ core (libmemopt and memopt_core._C) with AddressSanitizer and UndefinedBehavior-
# Sanitizer and runs the op, optimizer and fuzz tests on that build; then (no test arguments) the
# CUDA kernels on the host emulator built with UBSan (tools/cuda_emu, MEMOPT_CUDA_EMU_CFLAGS).
#
#   scripts/sanitize.sh [--venv DIR] [PYTEST ARGS...]     (e.g. -x, -k apollo, or test files)
#
# Needs an environment made by `scripts/setup_env.sh --test` (default .venv): its python, torch
# and nanobind build and run the instrumented copy, which stays out of it. CMake builds in
# build/sanitize (-DMEMOPT_SANITIZE=ON, incremental) and installs memopt_core, Python files
# included, into build/sanitize/site, which goes first on PYTHONPATH; .venv's own install is
# untouched. Python and torch are not instrumented, so the sanitizer runtimes are LD_PRELOADed.
# Any report fails the run: ASan stops at the first error, UBSan too (-fno-sanitize-recover).
#
# Measured on 2 cores shared with other jobs: 42 min end to end from a clean build directory
# at load average about 10 (the instrumented build 36 min, the tests 6.5 min: 802 passed); a
# rerun with nothing to rebuild 1 min 46 s on a quieter machine; 2026-12-07: the build 18 min from
# nothing, the default tests 336 s (653 passed); stop 29 (Intel host, idle): the build about
# 11 min, the default tests 227 s (681 passed) without test_found_inf's emulated cases, which
# add about 5 min under ASan, the emulator under UBSan 442 s (330 passed); stop 30 (rebuilding
# what changed, sharing the cores with a test run): the default tests 645 s (751 passed), the
# emulator 544 s (342 passed), 1958 s in all; stop 31 (rebuilding what changed, idle machine):
# the default tests 449 s (766 passed), the emulator 360 s (346 passed), 1143 s in all; stop 32
# (likewise): the default tests 433 s (766 passed), the emulator 372 s (361 passed), about
# 1110 s in all. Too slow for .ci/run (the build): run it after changing C++ code.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

venv=.venv
if [[ "${1:-}" == "--venv" ]]; then venv="${2:?--venv needs a directory}"; shift 2; fi
[[ -x "$venv/bin/python" ]] || { echo "$0: no $venv/bin/python; run scripts/setup_env.sh --test" >&2; exit 1; }
py="$(cd "$venv" && pwd)/bin/python"  # absolute, and not resolved: the venv's own interpreter

build=build/sanitize
site="$build/site"
mkdir -p "$build"
cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DMEMOPT_SANITIZE=ON \
      -DMEMOPT_ENABLE_CUDA=OFF -DPython_EXECUTABLE="$py" >"$build/configure.log" 2>&1 ||
  { cat "$build/configure.log" >&2; exit 1; }
cmake --build "$build" -j "$(nproc)"
rm -rf "$site" && mkdir -p "$site"
cp -r python/memopt_core "$site/"
cmake --install "$build" --prefix "$site/memopt_core" >/dev/null

# Everything the C++ core runs: the ops (CPU and Meta kernels, validation), every optimizer
# through its Python front end, the shard ops, torch.compile, the LibTorch optimizer classes and
# the fuzzer. Left out: the multi-process (distributed) and end-to-end training tests, which run
# the same kernels for minutes, and the CUDA tests, whose host emulator switches fiber stacks
# (ASan cannot follow that) and is not built by CMake: they run afterwards under UBSan only.
tests=()
for t in ops adamw adam_mini adam_mini_shard slim_adam slim_adam_layout apollo apollo_shard \
         frugal frugal_shard_ops optimizer_contract compile cpp_optimizers cpp_apollo cpp_frugal \
         roles fuzz fuzz_apollo fuzz_frugal fuzz_regressions layouts nonfinite frugal_plan \
         int8_weights found_inf nonfinite_device; do
  tests+=("tests/test_$t.py")
done
# No arguments, or only options: the default files, then the CUDA kernels on the host emulator
# under UBSan alone (ASan cannot follow its fiber stacks), against the environment's own build.
emu=0
if [[ $# -eq 0 || "$1" == -* ]]; then set -- "${tests[@]}" "$@"; emu=1; fi

runtimes="$(gcc -print-file-name=libasan.so):$(gcc -print-file-name=libubsan.so)"
export LD_PRELOAD="$runtimes${LD_PRELOAD:+:$LD_PRELOAD}"
export ASAN_OPTIONS=detect_leaks=0:halt_on_error=1  # CPython keeps objects alive at exit
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
# The overlay must win over the environment's memopt_core (else the run tests the wrong build).
"$py" -c "import memopt_core; assert '$site/' in memopt_core.__file__, memopt_core.__file__"
"$py" -m pytest -q -p no:cacheprovider "$@"
((emu)) || exit 0
LD_PRELOAD="$(gcc -print-file-name=libubsan.so)" PYTHONPATH= \
  MEMOPT_CUDA_EMU_DIR="$PWD/$build/cuda_emu" \
  MEMOPT_CUDA_EMU_CFLAGS="-fsanitize=undefined,bounds-strict -fno-sanitize-recover=all -g" \
  "$py" -m pytest -q -p no:cacheprovider -m cuda_emu tests/test_cuda_*.py tests/test_found_inf.py
