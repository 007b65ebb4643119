"""Atomic file writes, used by every writer of the package (checkpoints,
feature caches, exports, affinity files, run reports): readers see the old
file or the whole new one, never a torn one.

A writer killed outright (SIGKILL, power loss) leaves its temp file; each temp
file's name says which process wrote it, so that
:func:`remove_orphaned_temp_files` can tell such a leftover from a file being
written now.

Below every layer; imports nothing of the package.
"""
from __future__ import annotations

import functools
import hashlib
import os
import re
import socket
import stat
import tempfile
import time
from pathlib import Path

__all__ = ["atomic_write_bytes", "atomic_write_text", "fsync_dir", "new_file_mode", "new_dir_mode",
           "remove_orphaned_temp_files", "ORPHAN_AGE_S"]

ORPHAN_AGE_S = 24 * 3600.0  # a temp file untouched this long has no live writer, whoever wrote it


def _umask() -> int:
    """The process's umask, read without changing it where the OS allows (Linux's
    /proc): os.umask can only read it by setting it, which for that moment
    gives files another thread creates the wrong mode."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0)
    os.umask(mask)
    return mask


def new_file_mode() -> int:
    """The permission bits a plain open() would give a new file under the
    current umask (mkstemp's temp files are 0600 whatever the umask)."""
    return 0o666 & ~_umask()


def new_dir_mode() -> int:
    """The permission bits mkdir() would give a new folder under the current
    umask (mkdtemp's folders are 0700 whatever the umask)."""
    return 0o777 & ~_umask()


def fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(str(directory), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@functools.lru_cache(maxsize=None)
def _pid_space() -> str:
    """8 hex digits naming where this process's pid means this process: the
    host, its boot and the pid namespace (Linux's /proc). A folder may be shared
    with other machines or containers, where the same pid is another process."""
    parts = [socket.gethostname()]
    for read in (lambda: Path("/proc/sys/kernel/random/boot_id").read_text().strip(),
                 lambda: os.readlink("/proc/self/ns/pid")):
        try:
            parts.append(read())
        except OSError:
            pass
    return hashlib.sha256("\0".join(parts).encode("utf-8", "surrogateescape")).hexdigest()[:8]


def _writer() -> str:
    """`<pid space>-<pid>`: the writer part of this process's temp file names."""
    return f"{_pid_space()}-{os.getpid()}"


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write `data` to `path` so that readers see the old file or the whole new one.

    The bytes go to a temp file in the same directory,
    `.<name>.<pid space>-<pid>.<random>.tmp`, which is fsynced and then
    os.replace'd over `path` (a symlink at `path` is replaced, never followed);
    the file gets the umask's permissions; on any error the temp file is removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{_writer()}.", suffix=".tmp", dir=str(path.parent))
    try:
        os.fchmod(fd, new_file_mode())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def _alive(pid: int) -> bool:
    """Whether process `pid` of this pid space exists (another user's, or a
    zombie, counts). Not asked outside POSIX: Windows' os.kill(pid, 0) sends a
    Ctrl-C."""
    if os.name != "posix" or pid <= 0:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OSError, OverflowError):  # EPERM: alive, someone else's
        return True
    return True


def remove_orphaned_temp_files(directory: str | Path, suffix: str, max_age_s: float = ORPHAN_AGE_S) -> list[Path]:
    """Remove atomic_write_bytes's temp files in `directory` for files named
    `*<suffix>` whose writer was killed before its os.replace: those of a pid of
    this pid space that no process has now, and any not modified for
    `max_age_s` (another machine's, or one named before the pid was part of the
    name: no writer stalls mid-write for that long). A file a live writer is
    writing is kept. With suffix "" (any file name) only names with the writer
    part count as ours. Nothing else is touched. Best effort (a read-only or
    vanished folder removes nothing); returns the removed paths."""
    # with a suffix the name is ours whoever wrote it; without one only the writer part says so
    writer = r"(?P<space>[0-9a-f]{8})-(?P<pid>[0-9]+)\."
    pattern = re.compile(rf"\..*?{re.escape(suffix)}\.{f'(?:{writer})?' if suffix else writer}[^.]+\.tmp", re.DOTALL)
    removed = []
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return removed
    now = time.time()
    for entry in entries:
        match = pattern.fullmatch(entry.name)
        if match is None:
            continue
        try:
            st = entry.stat(follow_symlinks=False)
            if not stat.S_ISREG(st.st_mode):
                continue
            dead = match["pid"] is not None and match["space"] == _pid_space() and not _alive(int(match["pid"]))
            if dead or now - st.st_mtime > max_age_s:
                os.unlink(entry.path)
                removed.append(Path(entry.path))
        except OSError:
            continue
    return removed
