"""The CUDA toolkit root for building hipro_fast, found one way for every
caller: setup.py (the extension), tests/ops/test_cpp.py (CMake's libtorch
config) and by hand (`python scripts/find_cuda_home.py` prints it, or nothing).

Standard library only: setup.py loads it before torch is imported.
"""
from __future__ import annotations

import glob
import os
import shutil
from pathlib import Path


def find_cuda_home() -> str | None:
    """The real CUDA toolkit root (the one holding lib64/libcudart), or None.

    On some machines the `nvcc` on the PATH is a wrapper script outside the
    toolkit, so torch's guess (nvcc's grandparent) misses libcudart at link
    time. Prefer an explicit (non-empty) CUDA_HOME, then toolkit roots that
    really hold nvcc and the runtime library.
    """
    if os.environ.get("CUDA_HOME"):
        return os.environ["CUDA_HOME"]
    candidates = ["/usr/local/cuda", *sorted(glob.glob("/usr/local/cuda-*"), reverse=True)]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(str(Path(os.path.realpath(nvcc)).parent.parent))
    for root in candidates:
        root_path = Path(root)
        if (root_path / "bin" / "nvcc").exists() and any(
            (root_path / lib).glob("libcudart.so*") for lib in ("lib64", "lib")
        ):
            return str(root_path.resolve())
    return None


if __name__ == "__main__":
    print(find_cuda_home() or "")
