"""`python -m hipro_fast.distributed.torchrun ARGS`: torchrun (torch.distributed.run,
same arguments, same behaviour) whose failure ends the way a one-process `hipro`
command ends: each worker has printed its own `hipro: error: ...` line, so the
launcher adds no traceback or failure table below them, only one line when a
worker died without a word (a signal, e.g. the out-of-memory killer), and exits
with the first failed worker's status. Stopped by SIGINT or SIGTERM, torchrun
stops its workers, and this ends in `hipro: interrupted` (status 128 + N).
Started by `hipro ... --nproc N`, it gets SIGTERM when that process dies (even
SIGKILLed), and its workers get SIGTERM when it dies (launch.die_with_parent).
"""
from __future__ import annotations

import logging
import os
import signal
import sys
import time
from typing import Sequence

from torch.distributed import run as torch_run
from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

from .launch import PARENT_PID_ENV, die_with_parent

# The launcher's own "failed (exitcode: N) local_rank: ..." record says what
# main() below says, or less.
_LAUNCHER_LOGGER = "torch.distributed.elastic.multiprocessing.api"


def exit_status(error: ChildFailedError) -> tuple[int, str | None]:
    """(exit status, one line or None) of a failed launch: the first failed
    worker's status; a line only for a worker killed by a signal (128 + N, the
    shell's convention), which could not print its own."""
    rank, failure = error.get_first_failure()
    code = int(failure.exitcode)
    if code >= 0:
        return code, None
    try:
        name = signal.Signals(-code).name
    except ValueError:
        name = f"signal {-code}"
    hint = " (out of memory?)" if -code == signal.SIGKILL else ""
    return 128 - code, f"hipro: error: rank {rank} was killed by {name}{hint}; the other workers were stopped"


def signal_in(error: BaseException) -> SignalException | None:
    """`error` if it is a SignalException, or the one it replaced in torch's known
    race: the elastic metrics wrapper turns a signal that lands on its
    `start = time.time()` into an UnboundLocalError (its `finally` reads the
    unset `start`) raised while handling it. Any other error is not a signal."""
    if isinstance(error, SignalException):
        return error
    if (isinstance(error, UnboundLocalError) and error.__cause__ is None
            and isinstance(error.__context__, SignalException)):
        return error.__context__
    return None


def _launcher_died(launcher: int | None, sigval: int) -> bool:
    """Whether the launcher that started this process is gone (so its SIGTERM was
    the kernel's parent-death signal). That signal fires when the launcher's
    thread that started this process exits, which can come a moment before the
    launcher's last thread does and this process is re-parented: a SIGTERM
    waits up to a second for that."""
    if launcher is None:
        return False
    deadline = time.monotonic() + (1.0 if sigval == signal.SIGTERM else 0.0)
    while os.getppid() == launcher and time.monotonic() < deadline:
        time.sleep(0.01)
    return os.getppid() != launcher


def main(argv: Sequence[str] | None = None) -> int:
    launcher = die_with_parent()
    os.environ[PARENT_PID_ENV] = str(os.getpid())  # for the workers (group.init_from_env)
    logging.getLogger(_LAUNCHER_LOGGER).setLevel(logging.CRITICAL)
    try:
        torch_run.main(list(sys.argv[1:] if argv is None else argv))
    except ChildFailedError as e:
        code, line = exit_status(e)
        if line:
            print(line, file=sys.stderr)
        return code
    except Exception as error:  # noqa: BLE001 - only a signal's is handled, the rest re-raised
        e = signal_in(error)
        if e is None:
            raise
        # torchrun stops the workers before it raises a SignalException; when torch's own bug replaced
        # it (see signal_in), the workers' parent-death signal stops them as this process exits
        if _launcher_died(launcher, e.sigval):  # its SIGTERM came from the kernel
            print(f"hipro: the launcher (pid {launcher}) died; the workers were stopped", file=sys.stderr)
            return 128 + int(e.sigval)
        print(f"hipro: interrupted ({signal.Signals(e.sigval).name}); the workers were stopped", file=sys.stderr)
        return 128 + int(e.sigval)
    return 0


if __name__ == "__main__":
    status = main()
    if status > 128:
        # Stopped by a signal: leave without the interpreter's teardown, in which a thread
        # torch's elastic agent still runs can abort the process ("terminate called without
        # an active exception", SIGABRT) in place of this status (seen once under SIGHUP).
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    sys.exit(status)
