"""Builds hipro_fast._C: the C++ CPU ops always, the CUDA ops when a GPU is
visible or FORCE_CUDA=1 (archs from TORCH_CUDA_ARCH_LIST, default "8.0;9.0").

Package metadata lives in pyproject.toml; this file only declares the
extension. Build with `pip install --no-build-isolation -e .` so the build
uses the torch already installed (build isolation would fetch another one).
"""
from __future__ import annotations

import glob
import os
import shutil
from pathlib import Path


def _find_cuda_home() -> str | None:
    """The real CUDA toolkit root (the one holding lib64/libcudart).

    On some machines the `nvcc` on the PATH is a wrapper script outside the
    toolkit, so torch's guess (nvcc's grandparent) misses libcudart at link
    time. Prefer an explicit CUDA_HOME, then toolkit roots that really hold
    the runtime library.
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


_cuda_home = _find_cuda_home()
if _cuda_home:
    # torch.utils.cpp_extension reads CUDA_HOME when it is imported.
    os.environ["CUDA_HOME"] = _cuda_home
os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")

import torch  # noqa: E402
from setuptools import setup  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402

ROOT = Path(__file__).parent
CPU_SOURCES = ["csrc/python_module.cpp", "csrc/op_schemas.cpp", "csrc/forest_layout.cpp", "csrc/checks.cpp", *sorted(
    str(p.relative_to(ROOT)) for p in (ROOT / "csrc" / "cpu").glob("*.cpp"))]
CUDA_SOURCES = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc" / "cuda").glob("*.cu"))


def _want_cuda() -> bool:
    if os.environ.get("FORCE_CUDA", "0") == "1":
        if not _cuda_home:
            raise RuntimeError("FORCE_CUDA=1 but no CUDA toolkit root was found; set CUDA_HOME")
        return True
    return torch.cuda.is_available() and _cuda_home is not None


def _extension():
    # HIPRO_EXTRA_CXXFLAGS: extra flags for the host and device compilers
    # (e.g. "-std=c++20" with a torch whose extensions default to C++17).
    extra = os.environ.get("HIPRO_EXTRA_CXXFLAGS", "").split()
    cxx_flags = ["-O3", *extra]
    if _want_cuda():
        archs = os.environ["TORCH_CUDA_ARCH_LIST"]
        return CUDAExtension(
            "hipro_fast._C",
            CPU_SOURCES + CUDA_SOURCES,
            define_macros=[("HIPRO_WITH_CUDA", None), ("HIPRO_CUDA_ARCHS", f'"{archs}"')],
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", *extra]},
        )
    return CppExtension("hipro_fast._C", CPU_SOURCES, extra_compile_args={"cxx": cxx_flags})


# HIPRO_SKIP_EXT=1 installs the package (metadata, console script) without
# compiling; the Makefile then builds the extension in place, incrementally.
setup(
    ext_modules=[] if os.environ.get("HIPRO_SKIP_EXT") == "1" else [_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
