"""Timers and the GEMM-rate reference, for both runners.

`timed` measures one call: wall time on the CPU, CUDA events between two
synchronisations on a GPU; the cyclic garbage collector is paused meanwhile so
that a collection does not land inside a timed step. `gemm_rate` is the
roofline each step is compared with: torch.mm [rows, W] x [W, 4W], the shape of
the MLP's first linear layer at the forest's token count.
"""
from __future__ import annotations

import gc
import statistics
import time
from typing import Callable, Sequence

import torch

from ..errors import InvalidInputError


def _is_cuda(device) -> bool:
    return device is not None and torch.device(device).type == "cuda"


def timed(fn: Callable[[], object], device: torch.device | str | None = None) -> tuple[float, object]:
    """(seconds, fn()) of one call, with the cyclic GC paused; CUDA events on a CUDA device."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        if not _is_cuda(device):
            t0 = time.perf_counter()
            out = fn()
            return time.perf_counter() - t0, out
        # events on `device`'s current stream, whatever the current device is
        stream = torch.cuda.current_stream(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(device)
        start.record(stream)
        out = fn()
        end.record(stream)
        torch.cuda.synchronize(device)
        return start.elapsed_time(end) / 1e3, out
    finally:
        if enabled:
            gc.enable()


def median(xs: Sequence[float]) -> float | None:
    """Median, None for no samples."""
    return statistics.median(xs) if xs else None


def gemm_rate(rows: int, width: int, repeats: int = 3, *, dtype: torch.dtype = torch.float32,
              device: torch.device | str = "cpu", warmup: int = 1, calls: int = 1) -> float:
    """GFLOP/s of torch.mm [rows, W] x [W, 4W] in `dtype` on `device`: 2 * rows * W * 4W
    FLOPs per mm over the median of `repeats` timed runs of `calls` back-to-back mms
    each, after `warmup` untimed ones. On a GPU one small mm (a few microseconds)
    times mostly its launch and the events around it, so there several calls share
    one pair of events and the rate is the device's throughput at that shape."""
    if calls < 1:
        raise InvalidInputError(f"calls must be >= 1, got {calls}")
    a = torch.randn(rows, width, device=device, dtype=dtype)
    b = torch.randn(width, 4 * width, device=device, dtype=dtype)

    def run():
        for _ in range(calls):
            torch.mm(a, b)

    for _ in range(warmup):
        run()
    times = [timed(run, device)[0] for _ in range(repeats)]
    return 2.0 * rows * width * 4 * width * calls / statistics.median(times) / 1e9
