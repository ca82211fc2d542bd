#!/usr/bin/env bash
# Create (or update) a virtual environment with torch and memopt_core built against that torch.
#
#   scripts/setup_env.sh [--test] [--venv DIR]
#
#   --test      also install the test extras (pytest, adam-mini, transformers, ...)
#
# Always installs the `app` extra (numpy, tqdm, matplotlib) for the `memopt` command.
#   --venv DIR  environment directory (default .venv in the repo root)
#   --offline   no network (the GPU machines): pip never looks at an index (PIP_NO_INDEX), takes
#               wheels from .whl/ where that folder exists, and installs only what is satisfied
#               already; test extras it cannot find are reported, not fatal (their tests skip)
#
# Idempotent: an existing environment is reused, a torch already in it is kept (so a CUDA torch on
# a GPU machine stays, and the CUDA kernels get built), and the extension is rebuilt
# incrementally from a build directory inside the environment.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
venv=.venv
extras="[app]"
offline=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --test) extras="[app,test]" ;;
    --venv) venv="${2:?--venv needs a directory}"; shift ;;
    --offline) offline=1 ;;
    *) echo "usage: $0 [--test] [--venv DIR] [--offline]" >&2; exit 2 ;;
  esac
  shift
done

py="$venv/bin/python"
pip=("$py" -m pip install --disable-pip-version-check)
if (( offline )); then
  # Without this pip retries the unreachable index for minutes before failing.
  export PIP_NO_INDEX=1
  if [[ -d .whl ]]; then export PIP_FIND_LINKS="$PWD/.whl"; fi
fi
if [[ ! -x "$py" ]]; then
  python3 -m venv "$venv"
  # the venv's bundled pip can predate --config-settings; offline it is what we have
  (( offline )) || "${pip[@]}" --upgrade pip
fi

# Pinned: an unpinned `torch` resolves to the CUDA build and pulls several GB of CUDA wheels.
if ! "$py" -c "import torch" 2>/dev/null; then
  if (( offline )); then
    echo "$0: no torch in $venv and no network to install it; pass --venv with an" \
         "environment that has torch (on the GPU machines: the one python3 runs from)" >&2
    exit 1
  fi
  "${pip[@]}" torch==2.13.0
fi

# No build isolation (the extension must link the torch it will run with), so the build backend
# and its tools are installed here by hand; pip's isolated build would fetch a different torch.
"${pip[@]}" "scikit-build-core>=0.10" "nanobind>=2.4"
# CMake >= 3.24 (and ninja) from PyPI only where the system has none recent enough.
if ! cmake --version 2>/dev/null | "$py" -c "import re, sys
v = re.search(r'(\d+)\.(\d+)', sys.stdin.read())
sys.exit(not v or tuple(map(int, v.groups())) < (3, 24))"; then
  "${pip[@]}" "cmake>=3.24" ninja
fi

# The build directory lives in the environment: CMake caches the torch it found, so two
# environments sharing one build directory would link one of them against the other's torch.
install=("${pip[@]}" --no-build-isolation --config-settings=build-dir="$venv/build/{wheel_tag}")
if (( offline )) && ! "${install[@]}" ".$extras"; then
  # An extra that is not on this machine (adam-mini, apollo-torch: the reference packages) must
  # not stop the build: install memopt_core alone and say what is missing.
  echo "$0: offline: some requirements of .$extras are not available; installing memopt_core" \
       "without them (tests that need them skip)" >&2
  "${install[@]}" --no-deps .
  "$py" -m pip check || true
else
  (( offline )) || "${install[@]}" ".$extras"
fi

echo "ready: $venv (torch $("$py" -c 'import torch; print(torch.__version__)'))"
