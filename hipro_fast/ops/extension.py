"""Loads the compiled extension `hipro_fast._C` and says what it holds.

Importing `_C` registers the `torch.ops.hipro_fast.*` operators. When it is
missing (not built, or built for another torch), every op falls back to its
plain-PyTorch reference with one clear warning.
"""
from __future__ import annotations

import os
import warnings
from typing import Any

import torch  # noqa: F401  (loads libc10/libtorch before the extension needs them)

try:
    from .. import _C  # noqa: F401  (registers torch.ops.hipro_fast)

    EXTENSION_ERROR: str | None = None
except ImportError as exc:  # pragma: no cover - exercised when the build is absent
    _C = None
    EXTENSION_ERROR = f"{type(exc).__name__}: {exc}"

_warned: set[str] = set()


def build_info() -> dict[str, Any]:
    """What was compiled: {"cpu": bool, "cuda": bool, "cuda_archs": str, ...}.

    `{"cpu": False, "cuda": False, "error": "..."}` when the extension is absent.
    """
    if _C is None:
        return {"cpu": False, "cuda": False, "cuda_archs": "", "error": EXTENSION_ERROR}
    return dict(_C.build_info())


def reference_forced() -> bool:
    """HIPRO_FAST_REFERENCE=1 routes every op through its PyTorch reference."""
    return os.environ.get("HIPRO_FAST_REFERENCE", "0") == "1"


def fused_available(device: "str | Any") -> bool:
    """Whether the compiled ops can run on `device` (a torch.device or its type)."""
    if reference_forced() or _C is None:
        return False
    kind = device if isinstance(device, str) else device.type
    if kind == "cpu":
        return True
    if kind == "cuda":
        return bool(_C.build_info()["cuda"])
    return False


def warn_fallback(device_type: str) -> None:
    """One warning per device type when an op falls back to the reference."""
    if reference_forced() or device_type in _warned:
        return
    _warned.add(device_type)
    if _C is None:
        why = f"the compiled extension is not importable ({EXTENSION_ERROR})"
    else:
        why = f"the compiled extension has no {device_type} kernels (build_info: {_C.build_info()})"
    warnings.warn(
        f"hipro_fast: {why}; using the plain-PyTorch reference ops (exact, slower). "
        "Rebuild with `pip install --no-build-isolation -e .` (FORCE_CUDA=1 for CUDA).",
        RuntimeWarning,
        stacklevel=3,
    )
