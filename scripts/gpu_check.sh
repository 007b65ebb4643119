#!/usr/bin/env bash
# One-shot GPU check for hipro_fast, sized to fit in 8 minutes on an H200:
# builds the extension with the CUDA ops into the source tree (FORCE_CUDA=1),
# prints build_info, runs the bad-argument test in its own process (and the
# error-path probe when it fails, or with PROBE_ALWAYS=1), the GPU tests (CUDA ops vs CPU
# ops / reference -- blocked, residual-only and mixed splits of the segment-
# block decomposition; the library end to end on CUDA vs CPU; the compiled
# FlexAttention backend), then
# `hipro bench --device cuda` on (a) and (L) with the FlexAttention row, the
# whole training step (eager and CUDA graph), the issue-10 target list and the
# kernel profile; optionally the rest of the suite. Results go to $RESULTS
# (default: $OUT when set, else build/gpu_check): build.log, argcheck.log,
# gpu_tests.log, bench_gpu.{log,json,md} (probe.log when the probe ran).
# Budget (H200, estimated, not yet timed for this version): build ~1 min,
# bad-argument test ~15 s, GPU tests <= 3 min (one FlexAttention compile),
# benchmark <= 4.5 min (four FlexAttention compiles; BENCH_ARGS="... --no-flex"
# drops them). Then, on the machine that keeps the
# checkout: cp them to benchmarks/results/ and
#   python -m hipro_fast.bench.gpu --render benchmarks/results/<name>.json --readme README.md
# regenerates the README's GPU table. Run from anywhere on a machine with an
# NVIDIA GPU:
#
#   bash scripts/gpu_check.sh            # build for this GPU's arch only
#   TORCH_CUDA_ARCH_LIST="8.0;9.0" bash scripts/gpu_check.sh
#   SKIP_BUILD=1 bash scripts/gpu_check.sh   # reuse the last build
#
# Environment: PYTHON (default .venv/bin/python, else python3), CUDA_HOME
# (default: setup.py's search), MAX_JOBS (default nproc), CUDA_TESTS_TIMEOUT,
# BENCH_TIMEOUT and SUITE_TIMEOUT in seconds (defaults 180, 270, 1800),
# BENCH=0 skips the benchmark, BENCH_ARGS replace its default arguments
# ("--problems a,L --repeats 5 --warmup 2 --profile"), PROBE=0 skips the
# error-path probe and the bad-argument test, PYTEST_K narrows the GPU tests,
# SUITE=1 also runs the rest of the suite (off by default: it does not fit the
# 8 minutes), RESULTS (a folder for the logs and benchmark JSON).
#
# On a machine whose python lacks open_clip (e.g. a bare CUDA image), carry the
# pure-Python wheels in an ignored folder and put them on PYTHONPATH first:
#   python3 -m pip download --no-deps --only-binary=:all: -d .whl \
#       open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.4          # here
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl \
#       && PYTHONPATH=/tmp/site PYTHON=python3 SUITE=0 bash scripts/gpu_check.sh   # there
# (what session 2 ran on an H200: build 42 s, GPU tests ~30 s, benchmark ~60 s).
set -euo pipefail

T0=$(date +%s)
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

if [[ -n "${PYTHON:-}" ]]; then
  PY="$PYTHON"
elif [[ -x .venv/bin/python ]]; then
  PY=.venv/bin/python
else
  PY=python3
fi

RESULTS="${RESULTS:-${OUT:-build/gpu_check}}"
mkdir -p "$RESULTS"

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
  # The block GEMMs go through cuBLAS, whose results are bitwise reproducible
  # across streams (eager vs graph capture) only with a fixed workspace.
  export CUBLAS_WORKSPACE_CONFIG="${CUBLAS_WORKSPACE_CONFIG:-:4096:8}"
  echo "== building (TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST, MAX_JOBS=$MAX_JOBS)"
  rm -f hipro_fast/_C*.so
  start=$(date +%s)
  if ! "$PY" setup.py build_ext --inplace >"$RESULTS/build.log" 2>&1; then
    grep -n -m 20 -E "error|Error" "$RESULTS/build.log" || tail -40 "$RESULTS/build.log"
    # An older torch may default its extensions to C++17; the sources are C++20-clean
    # under torch 2.14's default. Retry once with the newer standard.
    echo "build failed; retrying with HIPRO_EXTRA_CXXFLAGS=-std=c++20"
    HIPRO_EXTRA_CXXFLAGS=-std=c++20 "$PY" setup.py build_ext --inplace >"$RESULTS/build2.log" 2>&1 \
      || { grep -n -m 30 -E "error|Error" "$RESULTS/build2.log" || tail -60 "$RESULTS/build2.log"; exit 2; }
  fi
  echo "build took $(( $(date +%s) - start ))s"
fi

echo "== build_info"
"$PY" -c 'import torch, hipro_fast; info = hipro_fast.build_info(); print(info); assert info.get("cuda"), "extension has no CUDA ops"'

set +e
echo "== bad-argument test (own process: a crash cannot hide the other results)"
ARGCHECK=tests/ops/test_cuda_ops.py::test_tree_attention_cuda_argument_checks
argcheck_rc=0
probe_rc=0
if [[ "${PROBE:-1}" == "1" ]]; then
  timeout 120 "$PY" -m pytest "$ARGCHECK" -q -p no:cacheprovider --tb=short 2>&1 | tee "$RESULTS/argcheck.log"
  argcheck_rc=${PIPESTATUS[0]}
  # The error-path probe (each bad-argument call in its own process, ~1 min)
  # only when that failed, to name the op and check that crashed.
  if [[ $argcheck_rc -ne 0 || "${PROBE_ALWAYS:-0}" == "1" ]]; then
    echo "== error-path probe"
    timeout 300 "$PY" scripts/gpu_error_probe.py 2>&1 | tee "$RESULTS/probe.log"
    probe_rc=${PIPESTATUS[0]}
    if [[ $probe_rc -ne 0 ]] && command -v cuda-gdb >/dev/null; then
      first=$(grep -m1 CRASHED "$RESULTS/probe.log" | cut -d: -f1)
      echo "== native backtrace of '$first' (cuda-gdb)"
      timeout 120 cuda-gdb -batch -ex run -ex bt --args "$PY" scripts/gpu_error_probe.py "$first" 2>&1 \
        | grep -E "^#|signal|SIG" | head -40
    fi
  fi
fi

echo "== GPU tests (tests/ops/test_cuda_ops.py, tests/method/test_cuda_model.py, the CUDA fits of test_training.py)"
timeout "${CUDA_TESTS_TIMEOUT:-180}" "$PY" -m pytest tests/ops/test_cuda_ops.py tests/method/test_cuda_model.py \
  "tests/method/test_training.py::test_cuda_fit" "tests/method/test_training.py::test_cuda_fit_lbfgs_matches_the_cpu" -q \
  -p no:cacheprovider --tb=short --durations=8 -k "not argument_checks ${PYTEST_K:+and $PYTEST_K}" 2>&1 | tee "$RESULTS/gpu_tests.log"
cuda_rc=${PIPESTATUS[0]}
[[ $cuda_rc -eq 0 ]] && cuda_rc=$argcheck_rc
[[ $cuda_rc -eq 0 ]] && cuda_rc=$probe_rc
set -e

bench_rc=0
if [[ "${BENCH:-1}" == "1" ]]; then
  echo "== GPU text-step benchmark (python -m hipro_fast.bench.gpu = hipro bench --device cuda)"
  set +e
  timeout "${BENCH_TIMEOUT:-270}" "$PY" -m hipro_fast.bench.gpu ${BENCH_ARGS:---problems a,L --repeats 5 --warmup 2 --profile} \
    --json "$RESULTS/bench_gpu.json" --markdown "$RESULTS/bench_gpu.md" 2>&1 | tee "$RESULTS/bench_gpu.log"
  bench_rc=${PIPESTATUS[0]}
  set -e
fi

suite_rc=0
if [[ "${SUITE:-0}" == "1" ]]; then
  echo "== rest of the suite"
  timeout "${SUITE_TIMEOUT:-1800}" "$PY" -m pytest tests -q -x --ignore=tests/ops/test_cuda_ops.py \
    --ignore=tests/method/test_cuda_model.py || suite_rc=$?
fi

echo "== GPU tests: rc $cuda_rc; benchmark: rc $bench_rc; rest of the suite: rc $suite_rc (124 = timed out)"
status=$(( cuda_rc != 0 ? cuda_rc : (bench_rc != 0 ? bench_rc : suite_rc) ))

echo "== done (status $status) in $(( $(date +%s) - T0 )) s"
exit "$status"
