#!/usr/bin/env bash
# One-shot GPU check for hipro_fast, sized to one device call (a 600 s limit,
# 15 minutes of device time per task, so it must run, be fixed and rerun once):
#   preflight (python packages; installs carried wheels from .whl/), build of
#   the extension with the CUDA ops into the source tree (FORCE_CUDA=1),
#   build_info, the bad-argument test in its own process (and at once the
#   error-path probe, each bad-argument call in its own process, when it
#   failed), the GPU tests (CUDA ops vs CPU ops / reference -- blocked,
#   residual-only and mixed splits of the segment-block decomposition; the
#   library end to end on CUDA vs CPU; the compiled FlexAttention backend),
#   `hipro bench --device cuda` on (L) and (a) with the FlexAttention row, the
#   whole training step (eager and CUDA graph), the issue-10 target list and the
#   kernel profile. Every stage's timeout is cut to what is left of BUDGET_S
#   (default 420 s), so the script ends inside the call and what it measured
#   comes back: results go to $RESULTS (default: $OUT when set, else
#   build/gpu_check): build.log, argcheck.log, gpu_tests.log,
#   bench_gpu.{log,json} (the JSON is rewritten after every problem; a run cut
#   short keeps what it measured; its markdown is rendered from it afterwards),
#   probe.log when the probe ran, and the built extension (debug info
#   stripped), so that a rerun on a fresh machine can carry it instead of
#   building again: at most 7 files, inside the device tool's 8.
#
# From the machine that keeps the checkout, through the device tool:
#   bash scripts/gpu_wheels.sh                   # here, once: open_clip & co. as wheels in .whl/
#   run(command="bash scripts/gpu_check.sh", carry=[".whl"], timeout_s=480)
# then copy $OUT's files to benchmarks/results/ and
#   python -m hipro_fast.bench.gpu --render benchmarks/results/<name>.json --readme README.md
# regenerates the README's GPU table. Give the machine back at once (give_back):
# the first call uses ~9 of the 15 minutes of device time (start included), and a
# fresh machine needs 4 left to start. A targeted rerun on a fresh machine, after
# a Python-only fix, skips the build with the extension the first call returned:
#   cp <files_at>/_C.cpython-312-x86_64-linux-gnu.so hipro_fast/
#   run(command="SKIP_BUILD=1 BUDGET_S=200 PYTEST_K=graph bash scripts/gpu_check.sh",
#       carry=[".whl", "hipro_fast/_C.cpython-312-x86_64-linux-gnu.so"], timeout_s=300)
#   (BENCH=0 skips the benchmark; BENCH_ARGS="--problems L --precisions bf16 --repeats 5
#   --warmup 2 --no-flex" narrows it)
#
# Budget (H200, estimated; session 2 measured build 42 s, GPU tests ~30 s,
# benchmark ~60 s for the old kernels): preflight + build ~1-2 min, bad-argument
# test ~15 s, GPU tests <= 150 s (one FlexAttention compile), benchmark <= 200 s
# (FlexAttention compiles; BENCH_ARGS="... --no-flex" drops them). The caps add
# up to more than the 420 s budget on purpose: the stages usually end well
# inside them, and a benchmark cut short still leaves its JSON of the problems
# it finished, which is why the headline problem runs first: (L) bf16 (the
# 50 %-of-GEMM target), then (L) fp32, (a) bf16, (a) fp32.
#
# Environment: PYTHON (default .venv/bin/python, else python3), CUDA_HOME
# (default: setup.py's search), MAX_JOBS (default nproc), TORCH_CUDA_ARCH_LIST
# (default: this GPU's), SKIP_BUILD=1 reuses the last build, BUDGET_S (whole
# script, default 420), CUDA_TESTS_TIMEOUT and BENCH_TIMEOUT (caps per stage,
# defaults 150 and 200), BENCH=0 skips the benchmark, BENCH_ARGS replace its
# default arguments ("--problems L,a --precisions bf16,fp32 --repeats 5 --warmup 2 --profile"),
# PROBE=0 skips the bad-argument test and the probe, PROBE_ALWAYS=1 runs the
# probe even when the test passed, CUDA_GDB=1 adds a cuda-gdb backtrace of the
# first crashing probe case, PYTEST_K narrows the GPU tests, DRY_RUN=1 runs
# the script's plumbing without a GPU (no build; the GPU tests skip; the
# benchmark on the CPU with the tiny tower), SUITE=1 also runs
# the rest of the suite (does not fit one call), RESULTS (output folder),
# WHEELS (default .whl: installed with pip --target when present).
set -euo pipefail

T0=$(date +%s)
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
DEADLINE=$(( T0 + ${BUDGET_S:-420} ))

# seconds for a stage: its cap, cut to what is left of the budget less a reserve
# for the stages after it, but at least a floor (default 10 s) so a stage that
# needs a CUDA start-up still gets one.
stage_timeout() {
  local cap=$1 reserve=${2:-0} floor=${3:-10} left
  left=$(( DEADLINE - $(date +%s) - reserve ))
  (( left < cap )) && cap=$left
  (( cap < floor )) && cap=$floor
  echo "$cap"
}

if [[ -n "${PYTHON:-}" ]]; then
  PY="$PYTHON"
elif [[ -x .venv/bin/python ]]; then
  PY=.venv/bin/python
else
  PY=python3
fi

RESULTS="${RESULTS:-${OUT:-build/gpu_check}}"
mkdir -p "$RESULTS"
# The block GEMMs go through cuBLAS, whose results are bitwise reproducible
# across streams (eager vs graph capture) only with a fixed workspace.
export CUBLAS_WORKSPACE_CONFIG="${CUBLAS_WORKSPACE_CONFIG:-:4096:8}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1

echo "== environment"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total --format=csv || true

WHEELS="${WHEELS:-.whl}"
if compgen -G "$WHEELS/*.whl" >/dev/null; then
  echo "== installing the carried wheels ($(ls "$WHEELS" | tr '\n' ' '))"
  site="${TMPDIR:-/tmp}/hipro_site"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" "$WHEELS"/*.whl
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi

echo "== preflight (python packages the tests and the benchmark import)"
if ! "$PY" - <<'EOF'
import importlib, os, sys
import torch
print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda,
      "available", torch.cuda.is_available())
if torch.cuda.is_available():
    print("device", torch.cuda.get_device_name(), "capability", torch.cuda.get_device_capability())
missing = []
for name in ("open_clip", "safetensors", "numpy", "scipy", "matplotlib", "tqdm", "pytest", "hypothesis"):
    try:
        importlib.import_module(name)
    except Exception as e:  # noqa: BLE001
        missing.append(f"{name} ({type(e).__name__}: {e})")
if missing:
    sys.exit("missing: " + "; ".join(missing) + "\ncarry them as wheels: bash scripts/gpu_wheels.sh here, "
             "then carry=['.whl'] (scripts/gpu_check.sh installs them)")
if not torch.cuda.is_available() and os.environ.get("DRY_RUN") != "1":
    sys.exit("no CUDA device visible to torch")
EOF
then
  echo "== preflight failed: nothing was built or run"
  exit 3
fi

if [[ "${DRY_RUN:-0}" == "1" ]]; then
  # The script's own plumbing on a machine without a GPU: the existing build,
  # the GPU tests (they skip), the benchmark on the CPU with the tiny tower.
  SKIP_BUILD=1
  BENCH_ARGS="${BENCH_ARGS:---device cpu --model tiny --problems a --precisions fp32 --repeats 1 --warmup 0 --n-ctx 4}"
fi

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
  build_rc=0
  timeout -k 10 "$(stage_timeout 240 200)" "$PY" setup.py build_ext --inplace >"$RESULTS/build.log" 2>&1 || build_rc=$?
  if [[ $build_rc -eq 124 || $build_rc -eq 137 ]]; then
    echo "build timed out (rc $build_rc): no retry"; tail -20 "$RESULTS/build.log"; exit 2
  fi
  if [[ $build_rc -ne 0 ]]; then
    grep -n -m 20 -E "error|Error" "$RESULTS/build.log" || tail -40 "$RESULTS/build.log"
    # An older torch may default its extensions to C++17; the sources are C++20-clean
    # under torch 2.14's default. Retry once with the newer standard.
    echo "build failed; retrying with HIPRO_EXTRA_CXXFLAGS=-std=c++20"
    mark=$(( $(wc -l <"$RESULTS/build.log") + 1 ))
    echo "== retry with HIPRO_EXTRA_CXXFLAGS=-std=c++20" >>"$RESULTS/build.log"
    HIPRO_EXTRA_CXXFLAGS=-std=c++20 timeout -k 10 "$(stage_timeout 240 150)" "$PY" setup.py build_ext --inplace \
      >>"$RESULTS/build.log" 2>&1 \
      || { grep -m 30 -E "error|Error" <(tail -n +"$mark" "$RESULTS/build.log") || tail -60 "$RESULTS/build.log"
           exit 2; }
  fi
  echo "build took $(( $(date +%s) - start ))s"
  # the extension comes back with the results: a rerun on a fresh machine can carry it (see the header)
  for so in hipro_fast/_C*.so; do
    dest="$RESULTS/$(basename "$so")"
    strip --strip-debug -o "$dest" "$so" 2>/dev/null || cp "$so" "$dest"
    if (( $(stat -c %s "$dest") > 15 * 1024 * 1024 )); then
      echo "$so is over 15 MiB even stripped: not returned"; rm -f "$dest"
    fi
  done
fi

echo "== build_info"
"$PY" -c 'import os, hipro_fast; info = hipro_fast.build_info(); print(info)
assert info.get("cuda") or os.environ.get("DRY_RUN") == "1", "extension has no CUDA ops"'

set +e
ARGCHECK=tests/ops/test_cuda_ops.py::test_tree_attention_cuda_argument_checks
argcheck_rc=0
if [[ "${PROBE:-1}" == "1" ]]; then
  echo "== bad-argument test (own process: a crash cannot hide the other results)"
  timeout -k 10 "$(stage_timeout 60 200 30)" "$PY" -m pytest "$ARGCHECK" -q -p no:cacheprovider --tb=short 2>&1 \
    | tee "$RESULTS/argcheck.log"
  argcheck_rc=${PIPESTATUS[0]}
fi

probe_rc=0
# The error-path probe (each bad-argument call in its own process) names the op
# and check that crashed: at once when the test failed, while time is left.
if [[ "${PROBE:-1}" == "1" && ( $argcheck_rc -ne 0 || "${PROBE_ALWAYS:-0}" == "1" ) ]]; then
  echo "== error-path probe"
  timeout -k 10 "$(stage_timeout 90 200 60)" "$PY" scripts/gpu_error_probe.py 2>&1 | tee "$RESULTS/probe.log"
  probe_rc=${PIPESTATUS[0]}
  if [[ $probe_rc -ne 0 && "${CUDA_GDB:-0}" == "1" ]] && command -v cuda-gdb >/dev/null; then
    first=$(grep -m1 -E "CRASHED|HUNG" "$RESULTS/probe.log" | cut -d: -f1)
    echo "== native backtrace of '$first' (cuda-gdb)"
    timeout -k 10 "$(stage_timeout 90 200)" cuda-gdb -batch -ex run -ex bt --args "$PY" scripts/gpu_error_probe.py \
      "$first" 2>&1 | grep -E "^#|signal|SIG" | head -40
  fi
fi

echo "== GPU tests (tests/ops/test_cuda_ops.py, tests/method/test_cuda_model.py, the CUDA fits of test_training.py)"
timeout -k 10 "$(stage_timeout "${CUDA_TESTS_TIMEOUT:-150}" 120)" "$PY" -m pytest tests/ops/test_cuda_ops.py \
  tests/method/test_cuda_model.py "tests/method/test_training.py::test_cuda_fit" \
  "tests/method/test_training.py::test_cuda_fit_lbfgs_matches_the_cpu" -q \
  -p no:cacheprovider --tb=short --durations=8 -k "not argument_checks ${PYTEST_K:+and ($PYTEST_K)}" 2>&1 \
  | tee "$RESULTS/gpu_tests.log"
cuda_rc=${PIPESTATUS[0]}

bench_rc=0
if [[ "${BENCH:-1}" == "1" ]]; then
  echo "== GPU text-step benchmark (python -m hipro_fast.bench.gpu = hipro bench --device cuda)"
  timeout -k 10 "$(stage_timeout "${BENCH_TIMEOUT:-200}" 5)" "$PY" -m hipro_fast.bench.gpu \
    ${BENCH_ARGS:---problems L,a --precisions bf16,fp32 --repeats 5 --warmup 2 --profile} \
    --json "$RESULTS/bench_gpu.json" 2>&1 | tee "$RESULTS/bench_gpu.log"
  bench_rc=${PIPESTATUS[0]}
fi

suite_rc=0
if [[ "${SUITE:-0}" == "1" ]]; then
  echo "== rest of the suite"
  timeout "${SUITE_TIMEOUT:-1800}" "$PY" -m pytest tests -q -x --ignore=tests/ops/test_cuda_ops.py \
    --ignore=tests/method/test_cuda_model.py || suite_rc=$?
fi
set -e

echo "== bad-argument test: rc $argcheck_rc; probe: rc $probe_rc; GPU tests: rc $cuda_rc;" \
     "benchmark: rc $bench_rc; rest of the suite: rc $suite_rc (124 or 137 = timed out)"
status=0
for rc in $cuda_rc $argcheck_rc $probe_rc $bench_rc $suite_rc; do
  if [[ $status -eq 0 && $rc -ne 0 ]]; then status=$rc; fi
done
echo "== done (status $status) in $(( $(date +%s) - T0 )) s"
exit "$status"
