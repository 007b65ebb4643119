"""hipro_fast.data.image_paths.find_images: the images `hipro predict` classifies."""
from __future__ import annotations

import os

import pytest

from hipro_fast.data.image_paths import find_images
from hipro_fast.data.tasks_spec import SpecError


def _touch(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")
    return path


def test_files_as_given_folders_searched_in_order_once(tmp_path):
    a = _touch(tmp_path / "one.png")
    _touch(tmp_path / "pics" / "b" / "2.JPG")
    _touch(tmp_path / "pics" / "b" / "1.png")
    _touch(tmp_path / "pics" / "a.webp")
    _touch(tmp_path / "pics" / "notes.txt")
    _touch(tmp_path / "pics" / ".hidden.png")
    _touch(tmp_path / "pics" / ".cache" / "x.png")
    os.symlink(a, tmp_path / "link.png")
    got = find_images([tmp_path / "pics", a, tmp_path / "pics" / "a.webp", tmp_path / "link.png"])
    rel = [os.path.relpath(p, tmp_path) for p in got]
    # a.webp named twice and one.png through a link: each kept once, by the name first found
    assert rel == ["pics/a.webp", "pics/b/1.png", "pics/b/2.JPG", "one.png"]
    assert all(os.path.isabs(p) for p in got)
    assert find_images([tmp_path / "link.png"]) == [str(tmp_path / "link.png")]  # a link keeps its own name


def test_a_linked_folder_cycle_ends(tmp_path):
    _touch(tmp_path / "pics" / "1.png")
    os.symlink(tmp_path / "pics", tmp_path / "pics" / "again")
    assert [os.path.basename(p) for p in find_images([tmp_path / "pics"])] == ["1.png"]


def test_a_folder_that_cannot_be_listed_is_named(tmp_path, monkeypatch):
    """os.walk skips a folder it cannot list unless told: that would lose its images without a word."""
    import hipro_fast.data.image_paths as image_paths

    _touch(tmp_path / "pics" / "1.png")
    real_walk = os.walk

    def walk(top, **kw):
        kw["onerror"](PermissionError(13, "Permission denied", str(tmp_path / "pics" / "locked")))
        yield from real_walk(top, **kw)

    monkeypatch.setattr(image_paths.os, "walk", walk)
    with pytest.raises(SpecError, match="cannot list folder .*locked: Permission denied"):
        find_images([tmp_path / "pics"])


@pytest.mark.parametrize("case", ["missing", "not-image", "hidden", "empty", "broken-link", "dangling-arg", "none"])
def test_bad_paths_are_named(tmp_path, case):
    if case == "missing":
        args, says = [tmp_path / "nope"], f"image path {tmp_path / 'nope'}: not found"
    elif case == "not-image":
        args, says = [_touch(tmp_path / "a.txt")], f"{tmp_path / 'a.txt'} is not an image file"
    elif case == "hidden":
        args, says = [_touch(tmp_path / ".a.png")], f"{tmp_path / '.a.png'} is a hidden file"
    elif case == "empty":
        _touch(tmp_path / "d" / "a.txt")
        args, says = [tmp_path / "d"], f"folder {tmp_path / 'd'} has no images"
    elif case == "broken-link":
        (tmp_path / "d").mkdir()
        os.symlink(tmp_path / "gone.png", tmp_path / "d" / "x.png")
        args, says = [tmp_path / "d"], f"{tmp_path / 'd' / 'x.png'} is a broken symbolic link"
    elif case == "dangling-arg":
        os.symlink(tmp_path / "gone.png", tmp_path / "x.png")
        args, says = [tmp_path / "x.png"], "a broken symbolic link"
    else:
        args, says = [], "no image paths given"
    with pytest.raises(SpecError, match=says.replace("(", r"\(").replace(")", r"\)")):
        find_images(args)
