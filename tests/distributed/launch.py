"""Launching real process groups for the distributed tests: torchrun
(`python -m torch.distributed.run`) on localhost, on a free port, with a hard
timeout so that a hang fails the test instead of the CI job."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Sequence

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env(**extra: str) -> dict[str, str]:
    e = dict(os.environ)
    e.update({"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
              "PYTHONPATH": os.pathsep.join([str(REPO), e.get("PYTHONPATH", "")]).rstrip(os.pathsep)})
    e.update(extra)
    return e


def torchrun_cmd(target: list[str], nproc: int = 2, port: int | None = None, extra: list[str] = ()) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
            "--rdzv-backend", "c10d", "--rdzv-endpoint", f"localhost:{port or free_port()}", *extra, *target]


def start(cmd: Sequence[str], env_vars: dict[str, str] | None = None, cwd=None) -> subprocess.Popen:
    """A launcher process (torchrun or the `--nproc` wrapper), in the repo root unless `cwd`."""
    return subprocess.Popen(list(cmd), cwd=cwd or REPO, env=env_vars if env_vars is not None else env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(procs: Sequence[subprocess.Popen], timeout: float) -> list[subprocess.CompletedProcess]:
    """Wait for every launcher; on a timeout stop them all and raise TimeoutExpired.

    torchrun starts its workers in their own sessions, so killing torchrun alone
    would leave them running (sleeping test ranks, or ranks blocked in gloo for
    the whole --dist-timeout) and slow every later test on a 2-core CI machine.
    SIGTERM makes torchrun stop its workers first; SIGKILL follows if it does not.
    """
    out = []
    try:
        for p in procs:
            so, se = p.communicate(timeout=timeout)
            out.append(subprocess.CompletedProcess(p.args, p.returncode, so, se))
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.communicate()
    return out


def run(cmd: Sequence[str], timeout: float, **env_extra: str) -> subprocess.CompletedProcess:
    """subprocess.run for launchers, with finish()'s clean-up on a timeout."""
    return finish([start(cmd, env(**env_extra))], timeout)[0]


def torchrun(target: list[str], nproc: int = 2, timeout: float = 180, extra: list[str] = (),
             check: bool = True, **env_extra: str) -> subprocess.CompletedProcess:
    proc = run(torchrun_cmd(target, nproc, extra=list(extra)), timeout, **env_extra)
    if check and proc.returncode != 0:
        raise AssertionError(f"torchrun exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc
