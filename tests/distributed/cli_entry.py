"""`hipro` for the distributed CLI tests, run as torchrun's script, with two
fault injections (environment variables) that the tests need at known points:

* HIPRO_TEST_KILL_AT="RANK,EPOCH,STEP": on torchrun's first attempt
  (TORCHELASTIC_RESTART_COUNT 0) that rank SIGKILLs itself right after that
  optimiser step: a real mid-epoch kill with no timing involved;
* HIPRO_TEST_ABSENT_RANK="RANK": that rank never joins (sleeps), a peer that
  does not arrive;
* HIPRO_TEST_STALL_AT="RANK,EPOCH,STEP": that rank sleeps after that step (a
  stalled peer: the others' next collective times out).
Otherwise it is exactly `python -m hipro_fast.cli ARGS`."""
from __future__ import annotations

import os
import signal
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from hipro_fast import cli  # noqa: E402
from hipro_fast.method import training  # noqa: E402

RANK = int(os.environ.get("RANK", "0"))


def _kill_at(spec: str, stall: bool = False):
    rank, epoch, step = (int(v) for v in spec.split(","))
    inner = training.fit

    def fit(*args, callback=None, **kw):
        def cb(info):
            if callback is not None:
                callback(info)
            if RANK == rank and (info["epoch"], info["step"]) == (epoch, step) \
                    and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0":
                if stall:
                    time.sleep(120)  # long past every test's timeout, short if a clean-up fails
                os.kill(os.getpid(), signal.SIGKILL)
        return inner(*args, callback=cb, **kw)

    training.fit = fit  # the pipeline calls training.fit through the module


if __name__ == "__main__":
    if os.environ.get("HIPRO_TEST_KILL_AT"):
        _kill_at(os.environ["HIPRO_TEST_KILL_AT"])
    if os.environ.get("HIPRO_TEST_STALL_AT"):
        _kill_at(os.environ["HIPRO_TEST_STALL_AT"], stall=True)
    if os.environ.get("HIPRO_TEST_ABSENT_RANK") == str(RANK):
        time.sleep(120)  # long past every test's timeout, short if a clean-up fails
    sys.exit(cli.main(sys.argv[1:]))
