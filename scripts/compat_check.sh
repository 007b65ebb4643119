#!/usr/bin/env bash
# The test suite under the GPU image's torch (2.11; the image's python3 is 3.12,
# this runs the local python3), on the CPU, before device time is spent: a clean
# clone of HEAD in $DIR (default /tmp/hipro-compat), its own venv with
# TORCH_SPEC, the extension built with the CUDA sources (FORCE_CUDA=1 when a
# toolkit is found: the .cu files compile against that torch's headers too),
# then `pytest tests`. Session 8 found a torch-2.11-only failure this way
# (a tensor's dim `.names` read as task names). Downloads ~3 GB the first time.
#
#   bash scripts/compat_check.sh                       # torch 2.11.0 / torchvision 0.26.0
#   TORCH_SPEC="torch==2.12.1 torchvision==0.27.1" DIR=/tmp/c212 bash scripts/compat_check.sh
#   PYTEST_ARGS="tests/method -x" bash scripts/compat_check.sh
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DIR="${DIR:-/tmp/hipro-compat}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.11.0 torchvision==0.26.0}"
if [[ -d "$DIR/.git" ]]; then
  git -C "$DIR" fetch -q "$ROOT" HEAD && git -C "$DIR" checkout -q --force FETCH_HEAD
else
  git clone -q "$ROOT" "$DIR"
fi
cd "$DIR"
cuda=$(python3 scripts/find_cuda_home.py 2>/dev/null || true)
if [[ -n "$cuda" ]]; then export FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"; fi
make build TORCH_SPEC="$TORCH_SPEC"
# The venv keeps the torch it was made with: a DIR reused with another TORCH_SPEC would test the old one.
want=$(sed -n 's/.*torch==\([^ ]*\).*/\1/p' <<<"$TORCH_SPEC")
have=$(.venv/bin/python -c 'import torch; print(torch.__version__.split("+")[0])')
if [[ -n "$want" && "$have" != "$want" ]]; then
  echo "$DIR/.venv has torch $have, TORCH_SPEC asks $want: use another DIR" >&2
  exit 2
fi
OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 .venv/bin/python -m pytest -q -p no:cacheprovider ${PYTEST_ARGS:-tests}
