"""hipro_fast.files: the modes new files and folders get under the umask, and
which leftover temp files are removed."""
import os
import sys
import time

import pytest

from hipro_fast import files


@pytest.mark.parametrize("mask", [0o022, 0o027, 0o077])
def test_new_modes_follow_the_umask_and_leave_it_alone(mask):
    old = os.umask(mask)
    try:
        assert files.new_file_mode() == 0o666 & ~mask
        assert files.new_dir_mode() == 0o777 & ~mask
        assert os.umask(mask) == mask  # still what it was set to
    finally:
        os.umask(old)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status on Linux")
def test_the_umask_is_read_without_setting_it_on_linux(monkeypatch):
    """os.umask can only read the mask by setting it (another thread's file would
    get mode 0666 meanwhile); on Linux it is read from /proc instead."""
    old = os.umask(0o027)
    try:
        def no_umask(mask):
            raise AssertionError("os.umask called")

        monkeypatch.setattr(os, "umask", no_umask)
        assert files.new_file_mode() == 0o640
        monkeypatch.undo()
    finally:
        os.umask(old)


def test_an_orphaned_temp_file_is_one_of_a_gone_writer_or_untouched_for_a_day(tmp_path):
    """A temp file of another pid space (machine, container, boot) or without a
    pid (named by an older version) is removed only when untouched for
    ORPHAN_AGE_S: its pid cannot be asked; one of this space, when its pid is gone."""
    here = files._pid_space()
    elsewhere = "0" * 8 if here != "0" * 8 else "1" * 8
    me = os.getpid()
    day_old = time.time() - files.ORPHAN_AGE_S - 60
    cases = {  # name: (mtime, removed)
        f".a.safetensors.{here}-{me}.r1.tmp": (None, False),  # a live writer, this process
        f".b.safetensors.{here}-{me}.r2.tmp": (day_old, True),  # untouched for a day: a reused pid
        f".c.safetensors.{elsewhere}-{me}.r3.tmp": (None, False),  # another machine's: maybe being written
        f".d.safetensors.{elsewhere}-{me}.r4.tmp": (day_old, True),
        ".e.safetensors.r5.tmp": (None, False),  # no pid: being written, for all we know
        ".f.safetensors.r6.tmp": (day_old, True),
        f".g.json.{here}-{me}.r7.tmp": (day_old, False),  # not a file of the suffix
        "h.safetensors": (day_old, False),
    }
    for name, (mtime, _) in cases.items():
        (tmp_path / name).write_text("x")
        if mtime is not None:
            os.utime(tmp_path / name, (mtime, mtime))
    (tmp_path / f".i.safetensors.{here}-{me}.r8.tmp").mkdir()  # not a file: never removed
    os.utime(tmp_path / f".i.safetensors.{here}-{me}.r8.tmp", (day_old, day_old))
    removed = files.remove_orphaned_temp_files(tmp_path, ".safetensors")
    assert sorted(p.name for p in removed) == sorted(n for n, (_, gone) in cases.items() if gone)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [n for n, (_, gone) in cases.items() if not gone] + [f".i.safetensors.{here}-{me}.r8.tmp"])
    assert files.remove_orphaned_temp_files(tmp_path / "missing", ".safetensors") == []


def test_any_suffix_removes_only_named_writers_files(tmp_path):
    """With suffix "" (a run directory: files of every kind) a temp file counts as
    ours only with its writer part: a user's hidden `.my.draft.tmp` stays, however old
    (before: deleted after a day); a dead writer of this pid space is removed at once."""
    import subprocess
    import sys

    here = files._pid_space()
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    day_old = time.time() - files.ORPHAN_AGE_S - 60
    cases = {
        ".my.draft.tmp": (day_old, False),
        ".report.md.old_version.tmp": (day_old, False),
        f".config.json.{here}-{gone.pid}.k3j9x_q1.tmp": (None, True),  # its writer is gone
        f".config.json.{here}-{os.getpid()}.k3j9x_q2.tmp": (None, False),  # this process: alive
    }
    for name, (mtime, _) in cases.items():
        (tmp_path / name).write_text("x")
        if mtime is not None:
            os.utime(tmp_path / name, (mtime, mtime))
    removed = files.remove_orphaned_temp_files(tmp_path, "")
    assert sorted(p.name for p in removed) == sorted(n for n, (_, out) in cases.items() if out)
