#!/usr/bin/env bash
# One-shot GPU check for hipro_fast: builds the extension with the CUDA ops
# into the source tree (FORCE_CUDA=1), prints build_info, runs the CUDA op
# tests, then the rest of the suite (which now also routes through the CUDA
# build). Run from anywhere on a machine with an NVIDIA GPU:
#
#   bash scripts/gpu_check.sh            # build for this GPU's arch only
#   TORCH_CUDA_ARCH_LIST="8.0;9.0" bash scripts/gpu_check.sh
#   SKIP_BUILD=1 bash scripts/gpu_check.sh   # reuse the last build
#
# Environment: PYTHON (default .venv/bin/python, else python3), CUDA_HOME
# (default: setup.py's search), MAX_JOBS (default nproc), CUDA_TESTS_TIMEOUT
# and SUITE_TIMEOUT in seconds (defaults 900 and 1800).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

if [[ -n "${PYTHON:-}" ]]; then
  PY="$PYTHON"
elif [[ -x .venv/bin/python ]]; then
  PY=.venv/bin/python
else
  PY=python3
fi

echo "== environment"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total --format=csv || true
"$PY" - <<'EOF'
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    print("device", torch.cuda.get_device_name(), "capability", torch.cuda.get_device_capability())
EOF

if [[ "${SKIP_BUILD:-0}" != "1" ]]; then
  if [[ -z "${TORCH_CUDA_ARCH_LIST:-}" ]]; then
    # Only this GPU's architecture: a much shorter build.
    TORCH_CUDA_ARCH_LIST="$("$PY" -c 'import torch; c = torch.cuda.get_device_capability(); print(f"{c[0]}.{c[1]}")')"
  fi
  export TORCH_CUDA_ARCH_LIST
  export FORCE_CUDA=1
  export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
  echo "== building (TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST, MAX_JOBS=$MAX_JOBS)"
  rm -f hipro_fast/_C*.so
  start=$(date +%s)
  "$PY" setup.py build_ext --inplace
  echo "build took $(( $(date +%s) - start ))s"
fi

echo "== build_info"
"$PY" -c 'import torch, hipro_fast; info = hipro_fast.build_info(); print(info); assert info.get("cuda"), "extension has no CUDA ops"'

echo "== tests/test_cuda_ops.py"
cuda_rc=0
timeout "${CUDA_TESTS_TIMEOUT:-900}" "$PY" -m pytest tests/test_cuda_ops.py -x -q || cuda_rc=$?

echo "== rest of the suite"
suite_rc=0
timeout "${SUITE_TIMEOUT:-1800}" "$PY" -m pytest tests -q -x --ignore=tests/test_cuda_ops.py || suite_rc=$?

echo "== CUDA op tests: rc $cuda_rc; rest of the suite: rc $suite_rc (124 = timed out)"
status=$(( cuda_rc != 0 ? cuda_rc : suite_rc ))

echo "== done (status $status)"
exit "$status"
