"""The process group of a multi-process run, from the environment torchrun sets.

`torchrun --nproc-per-node N -m hipro_fast.cli ...` (or any launcher that sets
RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT) starts N copies of
the command; :func:`init_from_env` joins them into one ``torch.distributed``
process group: ``nccl`` with one GPU per LOCAL_RANK for a CUDA device, ``gloo``
on CPUs. Everything here is a thin layer over ``torch.distributed``; a process
that was not launched that way is a world of one and every helper is a no-op.

Two failure modes get a clear error instead of a hang:

* a peer that never arrives: every rank checks in under ``hipro/arrived/<rank>``
  in the rendezvous store (torch's TCPStore: the elastic agent's when torchrun
  hosts one, else rank 0's) and rank 0 waits at most `timeout_s` for all of
  them, then raises :class:`PeerTimeoutError` naming the missing ranks;
* a peer lost later: the process group's own timeout ends any collective that
  waits longer than `timeout_s` (and torchrun tears the group down when a
  worker dies).
"""
from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch
import torch.distributed as dist

from ..errors import DistributedError, PeerTimeoutError, RankMismatchError
from .launch import die_with_parent

__all__ = ["DistInfo", "DEFAULT_TIMEOUT_S", "launched", "local_only", "backend_for", "init_from_env", "current",
           "rank", "world_size", "is_main", "barrier", "all_reduce_sum", "all_gather_object", "unbounded_wait_group",
           "broadcast_object", "main_first", "check_agreement", "collective_failure", "shutdown"]

DEFAULT_TIMEOUT_S = 300.0  # collectives and the rendezvous wait this long for a peer before failing
_ARRIVED = "hipro/arrived/"


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the group. device: "cpu" or "cuda:<LOCAL_RANK>"."""

    rank: int
    world_size: int
    local_rank: int
    backend: str
    device: str
    timeout_s: float

    @property
    def is_main(self) -> bool:
        return self.rank == 0


_INFO: DistInfo | None = None


def launched() -> bool:
    """Whether this process was started by torchrun (or another env:// launcher)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def _env_int(name: str, default: int | None = None) -> int:
    value = os.environ.get(name)
    if value is None:
        if default is None:
            raise DistributedError(f"environment variable {name} is not set (launch with torchrun)")
        return default
    try:
        return int(value)
    except ValueError:
        raise DistributedError(f"environment variable {name}={value!r} is not an integer") from None


def backend_for(device: str) -> str:
    """"nccl" for a CUDA device (one-line error when there is no GPU), else "gloo"."""
    if str(device).startswith("cuda"):
        if not torch.cuda.is_available():
            raise DistributedError(f"device {device!r} asks for the nccl backend, but this machine has no CUDA "
                                   f"GPU: use --device cpu (gloo)")
        return "nccl"
    return "gloo"


def _device(device: str | None, local_rank: int) -> str:
    """The device of this rank: a CUDA request becomes cuda:<LOCAL_RANK>."""
    if device in (None, "", "auto"):
        device = "cuda" if torch.cuda.is_available() else "cpu"
    backend_for(device)  # the one-line error for CUDA without GPUs
    if str(device).startswith("cuda"):
        n = torch.cuda.device_count()
        if local_rank >= n:
            raise DistributedError(f"LOCAL_RANK {local_rank} has no GPU: this node has {n}; start at most {n} "
                                   f"processes per node (--nproc-per-node)")
        return f"cuda:{local_rank}"
    return "cpu"


def _store(rank: int, world: int, timeout: datetime.timedelta) -> dist.Store:
    """The rendezvous store: the elastic agent's when torchrun serves one at
    MASTER_ADDR:MASTER_PORT, else rank 0 hosts it. Rank 0 does not block on the
    clients here (wait_for_workers=False) so that _wait_for_peers can name the
    missing ones."""
    addr = os.environ.get("MASTER_ADDR")
    port = os.environ.get("MASTER_PORT")
    if not addr or not port:
        raise DistributedError("MASTER_ADDR / MASTER_PORT are not set (launch with torchrun)")
    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == str(True)
    try:
        store = dist.TCPStore(addr, int(port), world, is_master=(rank == 0 and not agent), timeout=timeout,
                              wait_for_workers=False, multi_tenant=True)
    except (RuntimeError, dist.DistError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DistributedError(f"rank {rank}: cannot reach the rendezvous store at {addr}:{port} within "
                               f"{timeout.total_seconds():g} s ({first})") from None
    # Each torchrun restart gets a fresh agent store; a prefix keeps manual relaunches apart too.
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return dist.PrefixStore(f"hipro/{restart}/", store)


def _wait_for_peers(store: dist.Store, rank: int, world: int, timeout_s: float) -> None:
    """Check in, then (rank 0) wait until every rank has: PeerTimeoutError naming the absent ones.
    The other ranks wait for rank 0's "all arrived" so that they fail with it, not after it."""
    store.set(f"{_ARRIVED}{rank}", "1")
    where = f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}"
    deadline = time.monotonic() + timeout_s
    if rank == 0:
        while True:
            missing = [r for r in range(world) if not store.check([f"{_ARRIVED}{r}"])]
            if not missing:
                store.set("hipro/all-arrived", "1")
                return
            if time.monotonic() > deadline:
                store.set("hipro/all-arrived", json.dumps(missing))
                raise PeerTimeoutError(missing, world, timeout_s, where)
            time.sleep(0.05)
    # Rank 0's own deadline starts when IT arrives, which may be well after this rank (slow start-up
    # on its node): wait for its verdict a timeout longer, so that it is rank 0 that names the absent.
    while not store.check(["hipro/all-arrived"]):
        if time.monotonic() > deadline + timeout_s + 10.0:
            raise DistributedError(f"rank {rank}: rank 0 did not confirm the group within "
                                   f"{2 * timeout_s + 10:g} s at {where}")
        time.sleep(0.05)
    verdict = store.get("hipro/all-arrived").decode()
    if verdict != "1":
        raise PeerTimeoutError(json.loads(verdict), world, timeout_s, where)


def init_from_env(device: str | None = "auto", timeout_s: float = DEFAULT_TIMEOUT_S) -> DistInfo | None:
    """Join the process group described by torchrun's environment; None when the
    process was not launched by torchrun (a world of one). `timeout_s` bounds the
    rendezvous and every later collective."""
    global _INFO
    if not launched():
        return None
    # A worker of `hipro --nproc` dies with torchrun, by SIGTERM's default action (the CLI leaves it in
    # workers): at once, even blocked in a collective, where a Python handler would wait for the
    # collective's timeout; every file is written atomically, so none is left half written.
    die_with_parent()
    if _INFO is not None and dist.is_initialized():
        return _INFO
    rank, world = _env_int("RANK"), _env_int("WORLD_SIZE")
    local_rank = _env_int("LOCAL_RANK", 0)
    if world < 1 or not 0 <= rank < world:
        raise DistributedError(f"RANK {rank} / WORLD_SIZE {world} is not a valid place in a group")
    if not timeout_s > 0:
        raise DistributedError(f"the process-group timeout must be > 0 s, got {timeout_s}")
    dev = _device(device, local_rank)
    if dev.startswith("cuda") and "LOCAL_RANK" not in os.environ and _env_int("LOCAL_WORLD_SIZE", 1) > 1:
        # several processes on this node would all take cuda:0 (NCCL: a duplicate-GPU error); one
        # process per node (a pod or a SLURM task per node) may leave it unset and takes cuda:0
        raise DistributedError(f"LOCAL_RANK is not set, with LOCAL_WORLD_SIZE {os.environ['LOCAL_WORLD_SIZE']} "
                               "processes on this node: on CUDA each picks its GPU by it (torchrun sets it; "
                               "set it with another launcher)")
    backend = backend_for(dev)
    if dev.startswith("cuda"):
        torch.cuda.set_device(torch.device(dev))  # NCCL and the object collectives use the current device
    timeout = datetime.timedelta(seconds=float(timeout_s))
    store = _store(rank, world, timeout)
    _wait_for_peers(store, rank, world, float(timeout_s))
    dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout)
    _INFO = DistInfo(rank, world, local_rank, backend, dev, float(timeout_s))
    return _INFO


_LOCAL_DEPTH = 0  # > 0 inside local_only()


def current() -> DistInfo | None:
    """This process's DistInfo when it is in a group of more than one (and not
    inside :func:`local_only`), else None."""
    if _LOCAL_DEPTH == 0 and _INFO is not None and dist.is_initialized() and _INFO.world_size > 1:
        return _INFO
    return None


@contextlib.contextmanager
def local_only():
    """Inside this block the process acts as a world of one: current() is None,
    so fit/evaluate neither shard nor run collectives, and this rank writes its
    own files. For work split between ranks by whole units (the protocol's
    draws), where each rank runs its units alone and the results are gathered
    after the block."""
    global _LOCAL_DEPTH
    _LOCAL_DEPTH += 1
    try:
        yield
    finally:
        _LOCAL_DEPTH -= 1


def rank() -> int:
    info = current()
    return info.rank if info else 0


def world_size() -> int:
    info = current()
    return info.world_size if info else 1


def is_main() -> bool:
    """Rank 0, or a single process: the one that writes files."""
    return rank() == 0


def barrier() -> None:
    if current() is not None:
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum `tensor` over the ranks in place (returned); a no-op in one process."""
    if current() is not None:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank `src`'s (picklable) `obj` on every rank."""
    if current() is None:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def main_first(fn: Callable[[], Any], what: str, describe: Callable[[BaseException], str] = str,
               shared: Callable[[Any], Any] = lambda value: value) -> Any:
    """Run fn() on rank 0 alone (in one process: just fn()), then tell every
    rank how it went: rank 0 returns fn's value (re-raising its own error),
    the others return shared(value) broadcast from rank 0, or raise
    DistributedError("rank 0 stopped{what}: <describe(error)>") instead of
    waiting at a later collective until the timeout. The broadcast also orders
    every rank after rank 0's work (a write, say). The others wait for it at
    most --dist-timeout: raise it for work longer than that (a large feature
    cache written to a slow network filesystem). Not over an unbounded gloo
    group as the protocol's gathers: that would add a gloo mesh, and its
    interface troubles, to every NCCL run."""
    if current() is None:
        return fn()
    if is_main():
        try:
            value = fn()
            told = (shared(value), None)
        except BaseException as e:  # told to the other ranks (even ^C), then raised here
            try:
                said = describe(e)
            except Exception:  # noqa: BLE001 - a failing describe must not leave the others waiting
                said = f"{type(e).__name__}: {e}"
            broadcast_object((None, said))
            raise
        broadcast_object(told)
        return value
    value, error = broadcast_object(None)
    if error is not None:
        raise DistributedError(f"rank 0 stopped{what}: {error}")
    return value


def all_gather_object(obj: Any, group: Any = None) -> list[Any]:
    """Every rank's (picklable) `obj`, in rank order; [obj] in one process.
    group: a torch.distributed group (default: the whole world)."""
    if current() is None:
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj, group=group)
    return out


UNBOUNDED_WAIT = datetime.timedelta(days=30)
_UNBOUNDED: tuple[DistInfo, Any] | None = None  # (the group it belongs to, the gloo group)


def unbounded_wait_group() -> Any:
    """A gloo group of the whole world whose collectives wait without the
    --dist-timeout bound (30 days): for gathers after units of work that may
    legitimately take longer than a peer may stall between training steps
    (a whole few-shot draw). A dead peer still ends the job: torchrun tears
    the group down. Made once per process group (each made a full TCP mesh
    that was never freed) when every rank first calls this together."""
    global _UNBOUNDED
    info = current()
    if _UNBOUNDED is None or _UNBOUNDED[0] is not info:
        _UNBOUNDED = (info, dist.new_group(backend="gloo", timeout=UNBOUNDED_WAIT))
    return _UNBOUNDED[1]


def _digest(value: Any) -> str:
    text = json.dumps(value, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16] if len(text) > 200 else text


def check_agreement(values: Mapping[str, Any], what: str) -> None:
    """Raise RankMismatchError on every rank when any rank's `values` differ from
    rank 0's, naming the rank and the first differing key (values are compared
    by their JSON text; long ones by a digest)."""
    if current() is None:
        return
    mine = {k: _digest(v) for k, v in values.items()}
    everyone: list[Any] = [None] * world_size()
    dist.all_gather_object(everyone, mine)
    ref = everyone[0]
    for r, theirs in enumerate(everyone[1:], start=1):
        for key in sorted(set(ref) | set(theirs)):
            if ref.get(key) != theirs.get(key):
                a, b = ref.get(key), theirs.get(key)
                shown = f": rank 0 has {a}, rank {r} has {b}" if max(len(str(a)), len(str(b))) <= 200 else ""
                raise RankMismatchError(f"ranks disagree on {what}: {key!r} differs between rank 0 and rank {r}"
                                        f"{shown} (every rank must run the same command on the same inputs)")


_COLLECTIVE_FAILURES = ("gloo", "nccl", "timed out waiting", "connection reset by peer", "connection closed by peer")


def collective_failure(e: BaseException) -> str | None:
    """A one-line account of `e` when it is a failed collective of this group (a
    peer that died, or stalled longer than the timeout), else None."""
    info = current()
    if info is None or not isinstance(e, RuntimeError) or isinstance(e, DistributedError):
        return None
    text = " ".join(str(e).split())
    if not any(k in text.lower() for k in _COLLECTIVE_FAILURES):
        return None
    first = text.split("] ", 1)[-1] if text.startswith("[") else text  # drop torch's source location
    return (f"rank {info.rank}: a collective failed: a peer died or stalled for more than {info.timeout_s:g} s "
            f"(--dist-timeout); see the other ranks' output ({first})")


def shutdown() -> None:
    """Leave the process group (idempotent)."""
    global _INFO, _UNBOUNDED
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _INFO = _UNBOUNDED = None
