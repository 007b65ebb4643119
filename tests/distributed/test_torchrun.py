"""hipro_fast.distributed.torchrun: torchrun whose failures end in the workers'
own error lines and the first failed worker's exit status."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading

import pytest
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

from hipro_fast.distributed.launch import PARENT_PID_ENV
from hipro_fast.distributed.torchrun import exit_status
from tests.distributed.launch import REPO, env


def _failed(**codes: int) -> ChildFailedError:
    """A launch whose ranks (keys "r<N>") exited with these codes, in that order of time."""
    failures = {}
    for i, (key, code) in enumerate(codes.items()):
        failure = ProcessFailure(local_rank=int(key[1:]), pid=1000 + i, exitcode=code, error_file="<N/A>")
        failure.timestamp = i  # the first failure is the earliest
        failures[int(key[1:])] = failure
    return ChildFailedError("hipro_fast.cli", failures)


def test_a_worker_error_keeps_its_status_and_adds_no_line():
    assert exit_status(_failed(r1=2, r0=1)) == (2, None)


@pytest.mark.parametrize("sig, says", [(signal.SIGKILL, "rank 1 was killed by SIGKILL (out of memory?)"),
                                       (signal.SIGSEGV, "rank 1 was killed by SIGSEGV;")])
def test_a_worker_killed_by_a_signal_is_one_line_with_the_shells_status(sig, says):
    code, line = exit_status(_failed(r1=-int(sig), r0=1))
    assert code == 128 + int(sig)
    assert line.startswith("hipro: error: ") and says in line and "\n" not in line


def test_a_failing_nproc_command_ends_in_the_workers_lines_not_a_traceback(tmp_path):
    missing = tmp_path / "missing.toml"
    proc = subprocess.run([sys.executable, "-m", "hipro_fast.cli", "train", "--nproc", "2", "--device", "cpu",
                           "--spec", str(missing), "--run-dir", str(tmp_path / "run")],
                          capture_output=True, text=True, timeout=150, cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "ChildFailedError" not in proc.stderr, proc.stderr
    assert "OMP_NUM_THREADS" not in proc.stderr + proc.stdout  # torchrun's banner
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert lines and all(ln.startswith("hipro: error: ") for ln in lines), proc.stderr
    assert any(f"spec file not found: {missing}" in ln for ln in lines), proc.stderr
    assert not (tmp_path / "run").exists()


def _sleeper(seconds: float) -> list[str]:
    return [sys.executable, "-c", f"import time; time.sleep({seconds})"]


def test_a_stopping_signal_goes_to_the_launched_process_once(capsys):
    from hipro_fast.distributed.launch import _run_forwarding_signals

    threading.Timer(1.0, lambda: os.kill(os.getpid(), signal.SIGHUP)).start()
    assert _run_forwarding_signals(_sleeper(30), dict(os.environ)) == 128 + signal.SIGHUP  # the shell's status
    assert "hipro: interrupted (SIGHUP)" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGHUP) is signal.SIG_DFL  # the handler is put back


def test_an_ignored_signal_stays_ignored():
    """`nohup hipro ... --nproc N`: a hang-up must not reach torchrun."""
    from hipro_fast.distributed.launch import _run_forwarding_signals

    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        threading.Timer(0.5, lambda: os.kill(os.getpid(), signal.SIGHUP)).start()
        assert _run_forwarding_signals(_sleeper(1.5), dict(os.environ)) == 0
    finally:
        signal.signal(signal.SIGHUP, previous)


# die_with_parent in a fresh process; then its parent-death signal (PR_GET_PDEATHSIG) and whether
# the variable is still there for its own children.
_CHILD = """
import ctypes, os
from hipro_fast.distributed.launch import PARENT_PID_ENV, die_with_parent
die_with_parent()
sig = ctypes.c_int()
ctypes.CDLL(None).prctl(2, ctypes.byref(sig))
print(sig.value, PARENT_PID_ENV in os.environ)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")
def test_a_process_whose_parent_is_already_gone_stops_at_once():
    """The parent died before the child's prctl (the kernel will send nothing):
    the child stops itself. With its parent alive it carries on, with SIGTERM as
    its parent-death signal, and does not pass the parent's pid on."""
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # reaped: no process has its pid now
    orphan, child = (subprocess.Popen([sys.executable, "-c", _CHILD], env=env(**{PARENT_PID_ENV: str(pid)}),
                                      cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                     for pid in (gone.pid, os.getpid()))
    out, err = orphan.communicate(timeout=120)
    assert orphan.returncode == -signal.SIGTERM and not out, err[-3000:]
    out, err = child.communicate(timeout=120)
    assert child.returncode == 0 and out.split() == [str(int(signal.SIGTERM)), "False"], err[-3000:]


def test_a_signal_that_torchs_metrics_wrapper_turned_into_another_error_still_ends_interrupted(monkeypatch, capsys):
    """A SIGHUP landing on torch's elastic metrics wrapper's `start = time.time()`
    surfaces as an UnboundLocalError raised while handling the SignalException
    (seen in a full test run): it still ends in `hipro: interrupted` and 128 + N;
    any other error is re-raised."""
    from torch.distributed.elastic.multiprocessing.api import SignalException

    from hipro_fast.distributed import torchrun

    def raced(argv):
        try:
            raise SignalException("Process 1 got signal: 1", sigval=signal.SIGHUP)
        except SignalException:
            raise UnboundLocalError("cannot access local variable 'start'")

    # main() sets it for its workers: setenv first, so that the test's end removes it (delenv of an absent
    # variable records nothing; left set, it made later torchrun workers take pytest for their launcher)
    monkeypatch.setenv(PARENT_PID_ENV, "0")
    monkeypatch.setattr(torchrun, "die_with_parent", lambda: None)
    monkeypatch.setattr(torchrun.torch_run, "main", raced)
    assert torchrun.main(["--nproc-per-node", "1"]) == 128 + int(signal.SIGHUP)
    assert "hipro: interrupted (SIGHUP); the workers were stopped" in capsys.readouterr().err

    def shutdown_failed(argv):  # another error while torchrun handled a signal: its own, shown
        try:
            raise SignalException("Process 1 got signal: 1", sigval=signal.SIGHUP)
        except SignalException:
            raise RuntimeError("the workers could not be stopped")

    def unrelated(argv):
        raise UnboundLocalError("not a signal")

    for fails, says in ((shutdown_failed, "could not be stopped"), (unrelated, "not a signal")):
        monkeypatch.setattr(torchrun.torch_run, "main", fails)
        with pytest.raises((RuntimeError, UnboundLocalError), match=says):
            torchrun.main(["--nproc-per-node", "1"])
