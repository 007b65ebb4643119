"""Launching real process groups for the distributed tests: torchrun
(`python -m torch.distributed.run`) on localhost, on a free port, with a hard
timeout so that a hang fails the test instead of the CI job."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

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


def torchrun(target: list[str], nproc: int = 2, timeout: float = 180, extra: list[str] = (),
             check: bool = True, **env_extra: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(torchrun_cmd(target, nproc, extra=list(extra)), cwd=REPO, env=env(**env_extra),
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"torchrun exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc
