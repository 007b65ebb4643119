"""Builds hipro_fast._C: the C++ CPU ops always, the CUDA ops when a GPU is
visible or FORCE_CUDA=1 (archs from TORCH_CUDA_ARCH_LIST, default "8.0;9.0").

Package metadata lives in pyproject.toml; this file only declares the
extension. Build with `pip install --no-build-isolation -e .` so the build
uses the torch already installed (build isolation would fetch another one).
"""
from __future__ import annotations

import os
import runpy
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).parent
# One CUDA-root search for setup.py, the C++ tests and the shell (stdlib only).
_find_cuda_home = runpy.run_path(str(ROOT / "scripts" / "find_cuda_home.py"))["find_cuda_home"]


def _source_groups() -> dict[str, list[str]]:
    """csrc/sources.txt ("<group> <path>" lines, also read by CMakeLists.txt)."""
    groups: dict[str, list[str]] = defaultdict(list)
    for line in (ROOT / "csrc" / "sources.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            group, path = line.split()
            groups[group].append(path)
    return groups


_cuda_home = _find_cuda_home()
if _cuda_home:
    # torch.utils.cpp_extension reads CUDA_HOME when it is imported.
    os.environ["CUDA_HOME"] = _cuda_home
os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")

import torch  # noqa: E402
from setuptools import setup  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402

_SOURCES = _source_groups()
CPU_SOURCES = _SOURCES["python"] + _SOURCES["layout"] + _SOURCES["ops"]
CUDA_SOURCES = _SOURCES["cuda"]


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
