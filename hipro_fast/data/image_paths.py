"""The image files a list of paths names: files as given, folders searched.

What `hipro predict` classifies: unlabelled images, so no class folders; the
same image suffixes and hidden-file rule as a spec's image folders.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

from .tasks_spec import IMG_EXTENSIONS, SpecError


def _is_image_name(p: Path) -> bool:
    return p.suffix.lower() in IMG_EXTENSIONS and not p.name.startswith(".")


def find_images(paths: Iterable[str | Path]) -> list[str]:
    """Absolute paths of the images `paths` name, in the given order: a file is
    taken as it is (its suffix must be an image's), a folder contributes every
    image below it (recursively, hidden files and folders left out, sorted);
    an image named twice (or through a link to it) is kept once, under the
    name it was first found by (absolute, links not resolved).

    Raises SpecError naming the culprit: a path that does not exist, a file
    that is not an image, a broken symbolic link among a folder's images, a
    folder without images, or no path at all.
    """
    found: dict[str, str] = {}  # real path -> the name it was first found by
    given = [Path(p) for p in paths]
    if not given:
        raise SpecError("no image paths given")
    for root in given:
        if not root.exists():
            what = "a broken symbolic link" if root.is_symlink() else "not found"
            raise SpecError(f"image path {root}: {what}")
        if root.is_file():
            if root.name.startswith("."):
                raise SpecError(f"{root} is a hidden file: name a visible image (hidden files are left out of "
                                "folders too)")
            if not _is_image_name(root):
                raise SpecError(f"{root} is not an image file (suffixes: {', '.join(IMG_EXTENSIONS)})")
            found.setdefault(os.path.realpath(root), os.path.abspath(root))
            continue
        images, seen = [], set()

        def unreadable(err: OSError) -> None:  # a folder that cannot be listed would lose its images silently
            raise SpecError(f"cannot list folder {err.filename}: {err.strerror}")

        for folder, dirs, files in os.walk(root, followlinks=True, onerror=unreadable):
            real = os.path.realpath(folder)
            if real in seen:  # a linked folder already walked (a link cycle would never end)
                dirs[:] = []
                continue
            seen.add(real)
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for name in sorted(files):
                p = Path(folder) / name
                if not _is_image_name(p):
                    continue
                if not p.exists():  # an unmounted or moved target: the image would vanish without a word
                    raise SpecError(f"{p} is a broken symbolic link (to {os.readlink(p)}); restore its target "
                                    "or remove the link")
                images.append(p)
        if not images:
            raise SpecError(f"folder {root} has no images (suffixes: {', '.join(IMG_EXTENSIONS)})")
        for p in images:
            found.setdefault(os.path.realpath(p), os.path.abspath(p))
    return list(found.values())
