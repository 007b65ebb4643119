#!/usr/bin/env bash
# Downloads, on a machine with pip access, the packages that the GPU machine's
# image lacks (open_clip_torch and ftfy, pure Python, and wcwidth, an abi3
# x86-64 wheel; the image has torch, torchvision, timm, huggingface_hub,
# regex, safetensors, scipy, pytest, hypothesis, ...: .library/device/KINDS.md)
# as wheels for its Python (3.12, x86-64) into .whl/ (ignored
# by git). scripts/gpu_check.sh installs whatever .whl/ holds with
# `pip install --target`; carry the folder with the device call (carry=[".whl"]).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY="${PYTHON:-$( [[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3 )}"
mkdir -p .whl
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "${WHEEL_PYTHON:-3.12}" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.4
ls -l .whl
