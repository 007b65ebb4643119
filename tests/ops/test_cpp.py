"""Builds the C++ sources against libtorch with CMake and runs the ctest suite
(layout builder, shared index math, CPU ops through the dispatcher)."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch.utils

ROOT = Path(__file__).resolve().parents[2]


def _cuda_root():
    for cand in [os.environ.get("CUDA_HOME"), "/usr/local/cuda", *sorted(map(str, Path("/usr/local").glob("cuda-*")))]:
        if cand and Path(cand, "bin", "nvcc").exists():
            return cand
    return None


@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake not installed")
def test_ctest_suite():
    build = ROOT / "build-cmake"
    env = dict(os.environ, TORCH_CUDA_ARCH_LIST=os.environ.get("TORCH_CUDA_ARCH_LIST", "8.0;9.0"))
    configure = ["cmake", "-S", str(ROOT), "-B", str(build),
                 f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}", f"-DPython_EXECUTABLE={sys.executable}"]
    cuda = _cuda_root()
    if cuda:
        # libtorch's CMake config wants the toolkit even for CPU-only targets.
        configure += [f"-DCUDA_TOOLKIT_ROOT_DIR={cuda}", f"-DCUDAToolkit_ROOT={cuda}"]
    for cmd in (configure, ["cmake", "--build", str(build), "-j2"],
                ["ctest", "--test-dir", str(build), "--output-on-failure"]):
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    assert "100% tests passed" in proc.stdout
