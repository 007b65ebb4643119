"""What the machine is doing around a measurement (Linux /proc): peak resident
memory of a block, available memory (the baselines' autograd-graph budget),
load average, CPU model. Every reader returns None where /proc or libc is not
there, so the benchmark still runs, without those columns."""
from __future__ import annotations

import ctypes
import gc
import os
import platform
import re


def _libc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


_LIBC = _libc()


def _kb_field(path: str, key: str) -> int | None:
    try:
        with open(path) as f:
            m = re.search(rf"^{key}:\s+(\d+) kB", f.read(), re.M)
        return int(m.group(1)) if m else None
    except OSError:
        return None


class PeakRSS:
    """Peak RSS growth (bytes) of the block: VmHWM reset via clear_refs, after gc + malloc_trim.

    `peak_bytes` stays None where the high-water mark cannot be reset or read.
    """

    def __init__(self):
        self.peak_bytes: int | None = None

    def __enter__(self):
        gc.collect()
        if _LIBC is not None:
            _LIBC.malloc_trim(0)  # return freed heap pages, so the baseline RSS is the resident model
        self.base = _kb_field("/proc/self/status", "VmRSS")
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS
            self.ok = self.base is not None
        except OSError:
            self.ok = False
        return self

    def __exit__(self, *exc):
        hwm = _kb_field("/proc/self/status", "VmHWM")
        if self.ok and hwm is not None:
            self.peak_bytes = max(0, hwm - self.base) * 1024
        return False


def mem_available_bytes() -> int | None:
    kb = _kb_field("/proc/meminfo", "MemAvailable")
    return kb * 1024 if kb is not None else None


def graph_budget_bytes(max_graph_gb: float | None = None) -> float:
    """Largest autograd graph one baseline backward may build: `max_graph_gb` when
    given, else min(8 GiB, half the available memory)."""
    if max_graph_gb is not None:
        return max_graph_gb * 2**30
    avail = mem_available_bytes()
    cap = 8 * 2**30
    return float(min(cap, 0.5 * avail)) if avail else float(cap)


def loadavg() -> float | None:
    """1-minute load average."""
    try:
        return os.getloadavg()[0]
    except OSError:  # pragma: no cover
        return None


def available_cpus() -> int:
    """The CPUs this process may run on (its affinity mask where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo, else what `platform` says."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            m = re.search(r"^model name\s*:\s*(.+)$", f.read(), re.M)
            cpu = m.group(1) if m else cpu
    except OSError:
        pass
    return cpu
