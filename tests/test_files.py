"""hipro_fast.files: the modes new files and folders get under the umask."""
import os
import sys

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
