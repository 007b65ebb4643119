"""`hipro <command> ... --nproc N`: the same command under torchrun on this machine.

The wrapper only builds torchrun's command line (`python -m
hipro_fast.distributed.torchrun --standalone --nproc-per-node N -m hipro_fast.cli
...`: torchrun itself, ending a failure in the workers' own error lines rather
than the launcher's traceback) and runs it; launch, rendezvous and restarts are
torchrun's. For several
machines, or for elastic restarts, call torchrun yourself (README, "Scaling
out").

The processes die with the one that started them (:func:`die_with_parent`):
torchrun with this wrapper, the workers with torchrun, even when it is
SIGKILLed.
"""
from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import threading
from typing import Sequence

import torch

from ..errors import DistributedError

__all__ = ["without_option", "strip_nproc", "torchrun_argv", "run_under_torchrun", "PARENT_PID_ENV",
           "die_with_parent"]

# Set by a process of the `--nproc` tree (this wrapper, torchrun) to its own pid
# for the children it starts; read by die_with_parent.
PARENT_PID_ENV = "HIPRO_PARENT_PID"
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def without_option(argv: Sequence[str], option: str) -> list[str]:
    """argv without `option VALUE` / `option=VALUE`."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == option:
            skip = True
        elif not arg.startswith(option + "="):
            out.append(arg)
    return out


def strip_nproc(argv: Sequence[str]) -> list[str]:
    """argv without `--nproc N` / `--nproc=N` (the workers must not wrap again)."""
    return without_option(argv, "--nproc")


def torchrun_argv(nproc: int, argv: Sequence[str], module: str = "hipro_fast.cli") -> list[str]:
    """The torchrun command that runs `python -m module argv` in `nproc` local processes."""
    return [sys.executable, "-m", "hipro_fast.distributed.torchrun", "--standalone", "--nproc-per-node", str(int(nproc)),
            "-m", module, *strip_nproc(argv)]


def run_under_torchrun(nproc: int, argv: Sequence[str], device: str = "auto") -> int:
    """Run the CLI command `argv` in `nproc` processes; torchrun's exit status.
    Checks first what would otherwise fail in every worker: GPUs for a CUDA device."""
    if str(device).startswith("cuda"):
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise DistributedError(f"--device {device} asks for the nccl backend, but this machine has no CUDA "
                                   f"GPU: use --device cpu (gloo)")
        if nproc > n:
            raise DistributedError(f"--nproc {nproc} with --device {device}: this machine has {n} GPU(s), one per "
                                   f"process")
    env = dict(os.environ)
    env[PARENT_PID_ENV] = str(os.getpid())  # torchrun dies with this process (torchrun.main)
    if nproc > 1:  # torchrun's default for several processes, set here so that it prints no banner about it
        env.setdefault("OMP_NUM_THREADS", "1")
    return _run_forwarding_signals(torchrun_argv(nproc, argv), env)


# What stops torchrun (its own handlers stop the workers first); a terminal that
# hangs up or a Ctrl-\ must stop them as Ctrl-C does.
_FORWARDED = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT")
                   if hasattr(signal, name))


def _run_forwarding_signals(cmd: list[str], env: dict[str, str]) -> int:
    """Run cmd in a session of its own and return its exit status; a stopping
    signal to this process meanwhile goes to it, once (received before it
    started: sent when it starts), and the wait goes on. torchrun, stopped that
    way, stops its workers (each in a session of its own) before it exits:
    killing torchrun instead (subprocess.call on KeyboardInterrupt) left them
    training into the run directory. Its own session keeps a terminal's Ctrl-C
    from reaching it twice (through here and from the terminal)."""
    if threading.current_thread() is not threading.main_thread():  # handlers can only be set there
        code = subprocess.Popen(cmd, env=env, start_new_session=True).wait()
        return 128 - code if code < 0 else code
    started: list[subprocess.Popen] = []
    pending: list[int] = []

    def forward(signum, _frame):
        if started:
            started[0].send_signal(signum)
        else:
            pending.append(signum)

    # an ignored signal stays ignored (`nohup hipro ... --nproc N` must survive a hang-up)
    previous = {s: signal.signal(s, forward) for s in _FORWARDED if signal.getsignal(s) is not signal.SIG_IGN}
    try:
        started.append(subprocess.Popen(cmd, env=env, start_new_session=True))
        for signum in pending:
            started[0].send_signal(signum)
        code = started[0].wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if code < 0:  # killed before its own handlers were up, or by SIGKILL: the shell's status, and a word
        name = signal.Signals(-code).name if -code in signal.valid_signals() else f"signal {-code}"
        print(f"hipro: interrupted ({name}): torchrun was killed; its workers, if any had started, stop with it",
              file=sys.stderr)
        return 128 - code
    return code


# Why the kernel's parent-death signal: a SIGKILLed process runs no handler, so
# nothing of its own can stop the children it leaves (each in a session of its
# own: no terminal signal reaches them either). The tree has two links, each
# set up by the child: torchrun dies with this wrapper (its SIGTERM handler then
# stops the workers, as after a Ctrl-C), and each worker dies with torchrun
# (itself SIGKILLed, by the out-of-memory killer say). The signal follows the
# *thread* that forked the child: this wrapper forks torchrun from the thread
# that then waits for it, and torch elastic's agent forks the workers from
# torchrun's main thread (where its signal handlers must run), so neither
# thread ends before its children. The pid check after prctl catches a parent
# that died before it, which would never send the signal.
def _set_parent_death_signal(signum: int) -> bool:
    """prctl(PR_SET_PDEATHSIG, signum) on Linux; False where it is not available."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_PDEATHSIG, ctypes.c_ulong(int(signum)), ctypes.c_ulong(0), ctypes.c_ulong(0),
                          ctypes.c_ulong(0)) == 0
    except (OSError, AttributeError):
        return False


def die_with_parent() -> int | None:
    """SIGTERM this process when the process that started it dies, if that
    process named itself in $HIPRO_PARENT_PID; SIGTERM now if it already has.
    The variable is consumed (this process's own children have another parent).
    Returns that parent's pid, or None: no variable, or not Linux."""
    value = os.environ.pop(PARENT_PID_ENV, None)
    try:
        parent = int(value) if value is not None else None
    except ValueError:
        return None
    if parent is None or not _set_parent_death_signal(signal.SIGTERM):
        return None
    if os.getppid() != parent:  # it died before prctl: what the kernel would have sent
        os.kill(os.getpid(), signal.SIGTERM)
    return parent
