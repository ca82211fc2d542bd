#!/usr/bin/env bash
# The GPU check a session with a lent GPU machine runs, in one device call of under 8 minutes:
#
#   run(command="scripts/gpu_check.sh", timeout_s=540)          # device tool, repo root
#   scripts/gpu_check.sh [--dry-run]                            # by hand
#
# Stages, each time-boxed with `timeout` (one hang does not eat the others' time; all run even
# when one fails), within a total of GPU_CHECK_BUDGET_S seconds (default 470; a stage gets at
# most its own cap and what is left, so the benchmark takes the time the build and tests left):
#   setup     scripts/setup_env.sh --test --offline into the environment that holds the CUDA
#             torch (the GPU machines have no network), then memopt_core must have CUDA kernels
#   tests     every GPU test: tests/test_cuda_*.py without the host emulator (cuda_emu), and
#             any test marked `cuda` elsewhere
#   bench     bench/bench_step.py --device cuda --size 7b-layers (BENCH_ROUNDS rounds, default 10)
#   bench_7b  bench/bench_7b.py for ApolloMini with int8 and with bf16 weights
#   bench_int8  bench/bench_int8.py --device cuda: every optimizer's step, int8 against bf16
#   bench_state_bits  bench/bench_state_bits.py --device cuda: 8-bit / bf16 states against
#               torch fused AdamW and torchao
#   bench_nonfinite  bench/bench_nonfinite.py --device cuda: nonfinite="skip" against
#               "propagate", decided on the device and (forced) on the host
# Everything (machine, versions, each stage's verdict, time and output) goes to one file,
# $OUT/gpu_check.txt ($OUT: the device tool's output folder; ./gpu_check_out when unset), and
# each stage's full log beside it. Exit status: 0 when no stage failed (skipped stages are not
# failures), 1 otherwise. Without a CUDA device (or with --dry-run) every stage is skipped and
# the file still says so, which is how the script is checked on a CPU machine.
# Optional: a .whl/ folder of wheels (adam-mini, apollo-torch) carried along is installed offline.
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
dry=0
case "${1:-}" in
  "") ;;
  --dry-run) dry=1 ;;
  *) echo "usage: $0 [--dry-run]" >&2; exit 2 ;;
esac

out="${OUT:-./gpu_check_out}"
mkdir -p "$out"
report="$out/gpu_check.txt"
: >"$report"
budget="${GPU_CHECK_BUDGET_S:-470}"
rounds="${BENCH_ROUNDS:-10}"
failed=0
start=$SECONDS

say() { printf '%s\n' "$*" | tee -a "$report"; }

# nvcc is not always on PATH where CUDA is installed; the build finds CUDA through it.
if ! command -v nvcc >/dev/null && [[ -x /usr/local/cuda/bin/nvcc ]]; then
  export PATH="/usr/local/cuda/bin:$PATH"
fi

# The environment to build into: ./.venv if it has torch, else the one `python3` runs from (on
# the GPU machines .venv does not travel, and python3's environment holds the CUDA torch, which
# a new venv could not install offline).
if [[ -x .venv/bin/python ]] && .venv/bin/python -c "import torch" 2>/dev/null; then
  venv=.venv
else
  venv="$(python3 -c 'import sys; print(sys.prefix)' 2>/dev/null || echo .venv)"
fi
py="$venv/bin/python"
gpu="$("$py" -c 'import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else "")' 2>/dev/null)"

say "# memopt_core GPU check, $(date -u '+%Y-%m-%d %H:%M UTC')"
say "commit: $(git rev-parse --short HEAD 2>/dev/null || echo 'unknown (no .git)')"
say "environment: $venv (torch $("$py" -c 'import torch; print(torch.__version__, "CUDA", torch.version.cuda)' 2>/dev/null || echo 'not importable'))"
say "device: ${gpu:-none}; nvcc: $(command -v nvcc || echo none)"
skip_all=""
if [[ -z "$gpu" ]]; then
  skip_all="no CUDA device"
elif ((dry)); then
  skip_all="--dry-run"
fi

# stage NAME CAP_SECONDS COMMAND...: runs COMMAND under `timeout` (at most CAP and what is left
# of the budget), logs to $out/NAME.log, appends the verdict and the log's tail to the report.
stage() {
  local name=$1 cap=$2 tail_lines=${TAIL_LINES:-40}
  shift 2
  local left=$((budget - (SECONDS - start)))
  local limit=$((cap < left ? cap : left))
  say ""
  if [[ -n "${skip_all:-}" ]]; then
    say "## $name: SKIP ($skip_all) -- would run: $*"
    return 0
  fi
  if ((left < 10)); then
    say "## $name: FAIL (no time left of the ${budget}s budget)"
    failed=1
    return 0
  fi
  local t0=$SECONDS rc
  # timeout signals its whole process group, so pytest's or the benchmark's children die too;
  # the stage functions run in a child bash (exported below), which timeout can start.
  timeout --kill-after=10 "$limit" bash -c '"$@"' stage "$@" >"$out/$name.log" 2>&1
  rc=$?
  local verdict=PASS
  if ((rc == 124 || rc == 137)); then
    verdict="FAIL (timed out after ${limit}s)"
  elif ((rc != 0)); then
    verdict="FAIL (exit $rc)"
  fi
  [[ $verdict == PASS ]] || failed=1
  say "## $name: $verdict in $((SECONDS - t0))s -- $*"
  say '```'
  tail -n "$tail_lines" "$out/$name.log" | tee -a "$report"
  say '```'
}

# The stage functions run in the child bash that `stage` starts (shellcheck cannot see that).
# shellcheck disable=SC2317
# pytest's exit status 5 means "no test collected": not a failure for the marker sweep below.
gpu_tests() {
  local rc=0 r
  "$py" -m pytest -q -p no:cacheprovider -m "not cuda_emu" tests/test_cuda_*.py || rc=$?
  "$py" -m pytest -q -p no:cacheprovider -m "cuda and not cuda_emu" tests \
    --ignore-glob='tests/test_cuda_*.py' || { r=$?; ((r == 5)) || rc=$r; }
  return "$rc"
}

# shellcheck disable=SC2317
setup() {
  scripts/setup_env.sh --test --offline --venv "$venv" &&
    "$py" -c "import memopt_core; assert memopt_core._C.cuda_kernels, 'built without CUDA kernels'; print('memopt_core CUDA kernels: yes')"
}

# One run per weight storage bench_7b.py's --dtype offers.
# shellcheck disable=SC2317
bench_7b() {
  local rc=0 dtype
  for dtype in int8 bf16; do
    if ! "$py" bench/bench_7b.py --help | grep -q "$dtype"; then
      echo "== ApolloMini, $dtype weights: bench_7b.py does not offer them yet (skipped)"
      continue
    fi
    echo "== ApolloMini, $dtype weights"
    "$py" bench/bench_7b.py --optimizer apollo_mini --dtype "$dtype" --steps 3 || rc=$?
  done
  return "$rc"
}

export py venv
export -f setup gpu_tests bench_7b

stage setup 180 setup
stage tests 120 gpu_tests
TAIL_LINES=80 stage bench 300 "$py" bench/bench_step.py --device cuda --size 7b-layers \
  --rounds "$rounds" --warmup 2
if [[ -f bench/bench_7b.py ]]; then
  TAIL_LINES=80 stage bench_7b 120 bench_7b
else
  say ""
  say "## bench_7b: SKIP (bench/bench_7b.py does not exist yet)"
fi

TAIL_LINES=20 stage bench_int8 60 "$py" bench/bench_int8.py --device cuda --size 50m --rounds 5
TAIL_LINES=20 stage bench_state_bits 90 "$py" bench/bench_state_bits.py --device cuda --size 50m \
  --rounds 5 --no-torchao
TAIL_LINES=20 stage bench_nonfinite 60 "$py" bench/bench_nonfinite.py --device cuda --size 50m \
  --rounds 5

say ""
say "total: $((SECONDS - start))s of ${budget}s; result: $( ((failed)) && echo FAIL || echo PASS)"
exit "$failed"
