"""Atomic file writes, used by every writer of the package (checkpoints,
feature caches, exports, affinity files, run reports): readers see the old
file or the whole new one, never a torn one.

Below every layer; imports nothing of the package.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

__all__ = ["atomic_write_bytes", "atomic_write_text", "fsync_dir", "new_file_mode", "new_dir_mode"]


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


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write `data` to `path` so that readers see the old file or the whole new one.

    The bytes go to a temp file in the same directory, which is fsynced and then
    os.replace'd over `path` (a symlink at `path` is replaced, never followed);
    the file gets the umask's permissions; on any error the temp file is removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=str(path.parent))
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
