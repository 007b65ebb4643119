"""Multi-task spec files: which images, which classes, which splits.

A spec is a TOML file with one ``[[task]]`` table per task (``[[tasks]]`` is
accepted too). Relative paths are relative to the spec file's folder.

.. code-block:: toml

    [[task]]
    name = "flowers"
    images = "data/flowers"            # ImageFolder: one subfolder per class
    split = { val = 0.2, test = 0.3, seed = 0 }   # seeded, stratified
    classes = { daisy_1 = "daisy" }    # optional: folder name -> class name

    [[task]]
    name = "pets"
    train = "pets/train"               # given splits: folders or CSV files
    val = "pets/val.csv"               # CSV rows: path,label (header optional)
    test = "pets/test"
    classes = ["cat", "dog"]           # optional: class order (and the set)

Rules:

* a split source is a folder (ImageFolder: sub-folder name = class label,
  images directly inside, sorted by name) or a ``.csv`` of ``path,label`` rows
  (paths relative to the CSV's folder; a field is stripped of surrounding
  spaces unless it is quoted: ``" a.jpg"`` names a file whose name starts with
  a space). ``images`` / ``csv`` name one source
  that ``split`` divides; ``train`` / ``val`` / ``test`` name given splits, and
  ``split`` fractions then carve missing ``val`` / ``test`` out of ``train``.
  Without ``split`` a lone ``images`` source is split ``{val = 0, test = 0.3,
  seed = 0}``, and so is a ``train`` source given without ``test``: 30 % of its
  images become the test split (give ``test`` to keep all of them for
  training).
* the class set is ``classes`` when given (a list fixes the order; a table
  renames labels and its keys must be labels), else the labels of the training
  source (folders sorted by name, CSV labels in first-seen order).
* ``group`` (a string) and ``description`` are kept as information.

Every problem raises :class:`SpecError` (a ``ValueError``) with one line that
names the culprit: a missing folder or file, a class folder without images, a
CSV row with an unknown label (``file:line``), a task named twice, a task with
only one class, an unknown key (top-level or in a task), a value of the wrong
type (``split = {val = "x"}``, ``task = 5``), a spec that is not UTF-8. A task
whose split leaves it no test image is kept (``TaskData.counts()["test"] == 0``);
the CLI reports it. Images that cannot be decoded are found when features are
cached (:mod:`hipro_fast.data.feature_cache`), which raises
:class:`BadImageError` naming the file, or skips and counts them with
``skip_bad_images=True``. High-bit-depth images (16-bit PNG/TIFF, 32-bit int or
float) are scaled to 8 bits, not clipped (:func:`read_image`).

Few-shot training sets are drawn as CoOp does: K images per class from the
training split, seeded (:func:`few_shot`).
"""
from __future__ import annotations

import csv
import hashlib
import io
import math
import os
import re
import tomllib
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
from ..errors import BadImageError, ImageReadError, InvalidInputError, SpecError

__all__ = [
    "IMG_EXTENSIONS", "SPLITS", "SpecError", "BadImageError", "FewShotWarning", "ImageRecord",
    "TaskData", "MultiTaskSpec", "load_spec", "parse_spec", "few_shot", "read_image",
]

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")
SPLITS = ("train", "val", "test")
DEFAULT_SPLIT = {"val": 0.0, "test": 0.3, "seed": 0}
_TASK_KEYS = {"name", "images", "csv", "train", "val", "test", "classes", "split", "group", "description"}


class FewShotWarning(UserWarning):
    """A class has fewer training images than the requested shots."""


@dataclass(frozen=True)
class ImageRecord:
    path: str  # absolute path
    label: int  # index into TaskData.classes


@dataclass
class TaskData:
    name: str
    classes: list[str]  # class names (after renaming), label order
    labels: list[str]  # raw labels (folder names / CSV labels), same order
    splits: dict[str, list[ImageRecord]]  # "train" / "val" / "test" (val may be empty)
    group: str | None = None
    description: str = ""
    sources: dict[str, str] = field(default_factory=dict)  # split -> where it came from

    def counts(self) -> dict[str, int]:
        return {s: len(r) for s, r in self.splits.items()}


@dataclass
class MultiTaskSpec:
    path: Path | None
    tasks: dict[str, TaskData]

    def class_names(self) -> dict[str, list[str]]:
        """{task: class names}: what HiProModel / the baselines take."""
        return {n: list(t.classes) for n, t in self.tasks.items()}



# ------------------------------------------------------------------ sources
def _is_image(p: Path) -> bool:
    return p.is_file() and p.suffix.lower() in IMG_EXTENSIONS and not p.name.startswith(".")


def _read_folder(task: str, split: str, root: Path) -> tuple[list[str], list[tuple[str, str]], dict[str, str]]:
    """ImageFolder -> (labels sorted, [(resolved path, label)], {resolved path:
    its path inside the folder, "<class>/<file>", unresolved})."""
    if not root.exists():
        raise SpecError(f"task {task!r}: {split} directory not found: {root}")
    if not root.is_dir():
        raise SpecError(f"task {task!r}: {split} source is not a directory or .csv file: {root}")
    class_dirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not class_dirs:
        raise SpecError(f"task {task!r}: {split} directory has no class folders: {root}")
    items, names = [], {}
    for d in class_dirs:
        broken = sorted(p for p in d.iterdir() if p.is_symlink() and not p.exists()
                        and p.suffix.lower() in IMG_EXTENSIONS)
        if broken:  # an unmounted or moved target: the class would shrink without a word
            raise SpecError(f"task {task!r}: {broken[0]} is a broken symbolic link (to "
                            f"{os.readlink(broken[0])}); mount or restore its target, or remove the link")
        files = sorted(p for p in d.iterdir() if _is_image(p))
        if not files:
            raise SpecError(f"task {task!r}: class folder has no images: {d}")
        for p in files:
            items.append((str(p.resolve()), d.name))
            names[items[-1][0]] = os.path.relpath(p, root)
    return [d.name for d in class_dirs], items, names


def _csv_image(csv_path: Path, listed: str) -> Path:
    """A CSV row's image path: absolute as listed, else relative to the CSV's folder."""
    img = Path(listed)
    return img if img.is_absolute() else csv_path.parent / img


_FIELD_END = re.compile(r"[,\r\n]")


def _quote_tails(record: str) -> list[str | None]:
    """For each field of one raw CSV record, as csv.reader reads it (excel dialect,
    skipinitialspace): None when the field is not quoted, else the text after its
    closing quote, which the lenient reader appends to the field ('"a.jpg" ,'
    reads as 'a.jpg ')."""
    tails: list[str | None] = []
    i = 0
    while True:
        while record.startswith(" ", i):
            i += 1
        if record.startswith('"', i):
            close = record.find('"', i + 1)
            while close >= 0 and record.startswith('"', close + 1):  # "" is a quote inside the field
                close = record.find('"', close + 2)
            if close < 0:  # never closed: the reader reads the rest of the file into the field
                return tails + [""]
            end = _FIELD_END.search(record, close + 1)
            tails.append(record[close + 1:end.start() if end else len(record)])
        else:
            end = _FIELD_END.search(record, i)
            tails.append(None)
        if not end or record[end.start()] != ",":
            return tails
        i = end.end()


def _csv_rows(text: str) -> Iterable[tuple[int, list[str]]]:
    """(line number, fields) for each record of a CSV text: text in quotes exactly
    as it is (a file named " a.jpg" can be listed), text outside quotes stripped.

    csv.reader does the parsing (commas and newlines inside quotes); it does not
    say which fields were quoted, so each record's raw lines are kept to tell."""
    raw: list[str] = []

    def lines():
        for line in io.StringIO(text, newline=""):
            raw.append(line)
            yield line

    reader = csv.reader(lines(), skipinitialspace=True)
    start = 1
    for row in reader:
        tails = _quote_tails("".join(raw))
        raw.clear()
        # quoted: what the quotes hold, exactly, then what the reader appended after them, stripped
        yield start, [v.strip() if t is None else v[:len(v) - len(t)] + t.strip() for v, t in zip(row, tails)]
        start = reader.line_num + 1


def _read_csv(task: str, split: str, path: Path,
              known: Sequence[str] | None) -> tuple[list[str], list[tuple[str, str]], dict[str, str]]:
    """CSV of path,label -> (labels in first-seen order, [(resolved path, label)],
    {resolved path: its path relative to the CSV's folder, unresolved})."""
    if not path.is_file():
        raise SpecError(f"task {task!r}: {split} CSV file not found: {path}")
    items, labels, seen, names = [], [], set(), {}
    known_set = set(known) if known is not None else None
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise SpecError(f"task {task!r}: {split} CSV file {path} is not UTF-8 text ({e.reason} at byte "
                        f"{e.start}): save it as UTF-8") from None
    for lineno, row in _csv_rows(text):
        if not row or all(not c.strip() for c in row):
            continue
        # '#' starts a comment, unless the row names an image (a file called "#1.png")
        if row[0].lstrip().startswith("#") and not (len(row) == 2 and _is_image(_csv_image(path, row[0]))):
            continue
        if lineno == 1 and [c.strip().lower() for c in row[:2]] == ["path", "label"]:
            continue
        if len(row) != 2:
            raise SpecError(f"{path}:{lineno}: expected 2 columns (path,label), got {len(row)}")
        rel, label = row
        if not rel or not label:
            raise SpecError(f"{path}:{lineno}: empty path or label")
        if known_set is not None and label not in known_set:
            raise SpecError(f"{path}:{lineno}: unknown label {label!r} (task {task!r} classes: "
                            f"{', '.join(known)})")
        img = _csv_image(path, rel)
        listed_absolute = Path(rel).is_absolute()
        if not img.is_file():
            raise SpecError(f"{path}:{lineno}: image not found: {img}")
        items.append((str(img.resolve()), label))
        # a relative row as listed; an absolute one against the CSV's real folder (not where a link to it sits)
        names[items[-1][0]] = os.path.relpath(img, path.parent.resolve() if listed_absolute else path.parent)
        if label not in seen:
            seen.add(label)
            labels.append(label)
    if not items:
        raise SpecError(f"task {task!r}: {split} CSV file has no rows: {path}")
    return labels, items, names


def _read_source(task: str, split: str, path: Path, known: Sequence[str] | None):
    if path.suffix.lower() == ".csv":
        return _read_csv(task, split, path, known)
    labels, items, names = _read_folder(task, split, path)
    if known is not None:
        known_set = set(known)
        for lab in labels:
            if lab not in known_set:
                raise SpecError(f"task {task!r}: unknown class folder {path / lab} "
                                f"(classes: {', '.join(known)})")
    return labels, items, names


# ------------------------------------------------------------------ parsing
def _stable_seed(*parts: Any) -> list[int]:
    return [zlib.crc32(str(p).encode()) for p in parts]


def _split_fracs(task: str, split: Any) -> dict[str, float]:
    if split is None:
        return dict(DEFAULT_SPLIT)
    if not isinstance(split, Mapping):
        raise SpecError(f"task {task!r}: split must be a table like {{val = 0.2, test = 0.3, seed = 0}}")
    bad = [k for k in split if k not in ("val", "test", "seed")]
    if bad:
        raise SpecError(f"task {task!r}: unknown split key {bad[0]!r} (use val, test, seed)")
    for key in ("val", "test"):
        v = split.get(key, 0.0)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise SpecError(f"task {task!r}: split.{key} must be a fraction (a number in [0, 1)), got {v!r}")
    seed = split.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise SpecError(f"task {task!r}: split.seed must be an integer, got {seed!r}")
    out = {"val": float(split.get("val", 0.0)), "test": float(split.get("test", 0.0)), "seed": seed}
    if out["val"] < 0 or out["test"] < 0 or out["val"] + out["test"] >= 1:
        raise SpecError(f"task {task!r}: split fractions must be >= 0 and sum to < 1, got "
                        f"val={out['val']} test={out['test']}")
    return out


def _image_rank(name: str, seed: int) -> bytes:
    """The place of an image in its class's seeded shuffle: a hash of the split
    seed and the image's path relative to its source (the folder, or the CSV's
    folder), as listed, before any symbolic link is resolved, alone. So a split does not depend on the task's name (two tasks that
    read the same source into the same classes, e.g. a renamed twin, split them
    alike), on the other classes' images (a class that gains images does not
    reshuffle the rest: an old checkpoint is not tested on its training
    images), nor on where the data sits (a moved or copied dataset, or one reached
    through a link to wherever it lies, splits alike)."""
    return hashlib.sha256(str(int(seed)).encode() + b"\0" + os.fsencode(name)).digest()


def _carve(task: str, items: list[tuple[str, int]], fracs: dict[str, float],
           want: Iterable[str], names: Mapping[str, str]) -> dict[str, list[tuple[str, int]]]:
    """Stratified seeded split of items into train + the wanted val/test parts
    (each class's images in _image_rank order: test first, then val); `names`:
    each item's path inside its source (see _image_rank)."""
    want = set(want)
    by_class: dict[int, list[tuple[str, int]]] = {}
    for it in items:
        by_class.setdefault(it[1], []).append(it)
    out: dict[str, list[tuple[str, int]]] = {"train": [], "val": [], "test": []}
    for lab in sorted(by_class):
        group = by_class[lab]
        order = sorted(range(len(group)), key=lambda i: (_image_rank(names[group[i][0]], fracs["seed"]), group[i][0]))
        n = len(group)
        n_test = int(math.floor(n * fracs["test"] + 0.5)) if "test" in want else 0
        n_val = int(math.floor(n * fracs["val"] + 0.5)) if "val" in want else 0
        while n_test + n_val >= n and (n_test or n_val):  # keep >= 1 training image per class
            if n_val >= n_test and n_val:
                n_val -= 1
            else:
                n_test -= 1
        picked = [group[i] for i in order]
        out["test"].extend(picked[:n_test])
        out["val"].extend(picked[n_test:n_test + n_val])
        out["train"].extend(picked[n_test + n_val:])
    for k in out:
        out[k].sort()
    return out


def _parse_task(entry: Mapping[str, Any], base: Path, index: int) -> TaskData:
    if not isinstance(entry, Mapping):
        raise SpecError(f"task #{index + 1}: each [[task]] must be a table")
    name = entry.get("name")
    if name is not None and not isinstance(name, str):
        raise SpecError(f"task #{index + 1}: 'name' must be a string, got {type(name).__name__} ({name!r})"[:300])
    if not isinstance(name, str) or not name.strip():
        raise SpecError(f"task #{index + 1}: missing or empty 'name'")
    unknown = sorted(k for k in entry if k not in _TASK_KEYS)
    if unknown:
        raise SpecError(f"task {name!r}: unknown key {unknown[0]!r} (known: {', '.join(sorted(_TASK_KEYS))})")

    def path_of(key: str) -> Path | None:
        v = entry.get(key)
        if v is None:
            return None
        if not isinstance(v, str) or not v:
            raise SpecError(f"task {name!r}: {key!r} must be a path string")
        p = Path(v).expanduser()
        return p if p.is_absolute() else (base / p)

    single = [k for k in ("images", "csv") if k in entry]
    if len(single) > 1:
        raise SpecError(f"task {name!r}: give either 'images' or 'csv', not both")
    sources = {s: path_of(s) for s in SPLITS if s in entry}
    if single and "train" in sources:
        raise SpecError(f"task {name!r}: give either {single[0]!r} or 'train', not both")
    if single:
        sources["train"] = path_of(single[0])
        if single[0] == "csv" and sources["train"].suffix.lower() != ".csv":
            raise SpecError(f"task {name!r}: 'csv' must name a .csv file, got {sources['train']}")
    if "train" not in sources:
        raise SpecError(f"task {name!r}: needs 'images', 'csv' or 'train'")

    classes = entry.get("classes")
    renames: dict[str, str] = {}
    known: list[str] | None = None
    if classes is not None:
        if isinstance(classes, Mapping):
            renames = {str(k): v for k, v in classes.items()}
            for k, v in renames.items():
                if not isinstance(v, str) or not v.strip():
                    raise SpecError(f"task {name!r}: class name for {k!r} must be a non-empty string")
        elif isinstance(classes, list):
            if not classes or not all(isinstance(c, str) and c.strip() for c in classes):
                raise SpecError(f"task {name!r}: 'classes' must be a non-empty list of names")
            dup = [c for i, c in enumerate(classes) if c in classes[:i]]
            if dup:
                raise SpecError(f"task {name!r}: class {dup[0]!r} is listed twice in 'classes'")
            known = list(classes)
        else:
            raise SpecError(f"task {name!r}: 'classes' must be a list or a table {{label = \"name\"}}")

    train_labels, train_items, train_names = _read_source(name, "train", sources["train"], known)
    labels = known if known is not None else train_labels
    if len(labels) < 2:  # one class: loss 0, accuracy 100% by construction, a silent inflation of the mean
        raise SpecError(f"task {name!r} has only one class ({labels[0]!r}): a classifier needs at least 2 "
                        f"classes (add a class or remove the task)")
    for k in renames:
        if k not in labels:
            raise SpecError(f"task {name!r}: 'classes' renames unknown label {k!r} (labels: {', '.join(labels)})")
    index_of = {lab: i for i, lab in enumerate(labels)}
    items: dict[str, list[tuple[str, int]]] = {"train": [(p, index_of[lab]) for p, lab in train_items]}
    for split in ("val", "test"):
        if split in sources:
            _, its, _ = _read_source(name, split, sources[split], labels)
            items[split] = [(p, index_of[lab]) for p, lab in its]
    for split, its in items.items():  # before carving: a repeated row could land in two carved splits
        _check_listed_once(name, split, its, sources.get(split) or sources["train"])
    missing = [s for s in ("val", "test") if s not in items]
    if "split" in entry or (missing and "test" in missing):
        fracs = _split_fracs(name, entry.get("split"))
        if "test" in missing and fracs["test"] == 0 and "split" in entry:
            raise SpecError(f"task {name!r}: no test split: give 'test' or split.test > 0")
        carved = _carve(name, items["train"], fracs, missing, train_names)
        items["train"] = carved["train"]
        for s in missing:
            items[s] = carved[s]
    items.setdefault("val", [])
    _check_no_image_twice(name, items, sources)
    present = {lab for _, lab in items["train"]}
    absent = [labels[i] for i in range(len(labels)) if i not in present]
    if absent:
        raise SpecError(f"task {name!r}: class {absent[0]!r} has no training images")
    class_names = [renames.get(lab, lab) for lab in labels]
    dup = [c for i, c in enumerate(class_names) if c in class_names[:i]]
    if dup:
        raise SpecError(f"task {name!r}: two labels get the class name {dup[0]!r}")
    group = entry.get("group")
    return TaskData(
        name=name, classes=class_names, labels=list(labels),
        splits={s: [ImageRecord(p, lab) for p, lab in items[s]] for s in SPLITS},
        group=str(group) if group is not None else None, description=str(entry.get("description", "")),
        sources={s: str(p) for s, p in sources.items()})


def _check_listed_once(task: str, split: str, items: list[tuple[str, int]], source: Path) -> None:
    """A path a source lists twice (a repeated CSV row, or one image under two
    labels) is an error in the source: refused, naming it."""
    first: dict[str, int] = {}
    for path, label in items:
        if path in first:
            labels = " with two labels" if first[path] != label else ""
            raise SpecError(f"task {task!r}: image {path} is listed twice in the {split} source{labels} ({source})")
        first[path] = label


def _check_no_image_twice(task: str, items: Mapping[str, list[tuple[str, int]]],
                          sources: Mapping[str, Path]) -> None:
    """An image file (symlinks resolved) in two splits of a task is refused,
    naming it: a test image that is also a training image inflates the accuracy
    without a trace. (Two paths of one split that resolve to one file, e.g. on
    deduplicating storage, are left alone: no split leaks into another.)"""
    seen: dict[str, str] = {}
    for split in SPLITS:
        for path, _ in items.get(split, []):
            real = os.path.realpath(path)
            where = seen.setdefault(real, split)
            if where != split:
                hint = " (omit 'val' to draw the validation images from the training split)" \
                    if {where, split} == {"val", "test"} else ""
                raise SpecError(f"task {task!r}: image {path} is in both the {where} and the {split} split "
                                f"(sources {sources.get(where) or sources.get('train')}, "
                                f"{sources.get(split) or sources.get('train')}); an image may be in one split{hint}")


def parse_spec(data: Mapping[str, Any], base: str | Path = ".", path: Path | None = None) -> MultiTaskSpec:
    """A spec from an already-parsed TOML mapping (paths relative to `base`)."""
    where = f"spec {path}" if path else "spec"
    entries = data.get("task", data.get("tasks"))
    unknown = [k for k in data if k not in ("task", "tasks")]
    if "task" in data and "tasks" in data:
        raise SpecError(f"{where} has both [[task]] and [[tasks]] tables; use one")
    if entries is None:
        extra = f" (unknown top-level key(s): {', '.join(map(repr, unknown))})" if unknown else ""
        raise SpecError(f"{where} has no [[task]] tables{extra}")
    if unknown:  # a misspelt or misplaced key would otherwise be ignored silently
        raise SpecError(f"{where}: unknown top-level key(s) {', '.join(map(repr, unknown))} "
                        f"(a spec holds only [[task]] tables; task options go inside them)")
    if isinstance(entries, Mapping):
        raise SpecError("write each task as a [[task]] table (array of tables)")
    if not isinstance(entries, list):
        raise SpecError(f"{where}: 'task' must be an array of tables ([[task]] ...), "
                        f"got {type(entries).__name__} {entries!r}")
    tasks: dict[str, TaskData] = {}
    for i, entry in enumerate(entries):
        name = entry.get("name") if isinstance(entry, Mapping) else None
        if isinstance(name, str) and name in tasks:
            raise SpecError(f"spec names task {name!r} twice")
        t = _parse_task(entry, Path(base), i)
        tasks[t.name] = t
    if not tasks:
        raise SpecError("spec defines no tasks")
    return MultiTaskSpec(path, tasks)


def load_spec(path: str | Path) -> MultiTaskSpec:
    """Read and validate a TOML multi-task spec (see the module docstring)."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise SpecError(f"spec {path}: is a folder, not a spec file (a .toml file with one [[task]] table per task)")
    if not path.is_file():
        raise SpecError(f"spec file not found: {path}" if not path.exists() else
                        f"spec {path}: not a regular file (a .toml file with one [[task]] table per task)")
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise SpecError(f"{path}: invalid TOML: {e}") from None
    except UnicodeDecodeError as e:  # tomllib's message names neither the file nor TOML
        raise SpecError(f"{path}: not UTF-8 text (byte {e.object[e.start:e.start + 1]!r} at offset "
                        f"{e.start}); TOML files are UTF-8") from None
    return parse_spec(data, path.resolve().parent, path)


# ------------------------------------------------------------------ few-shot
def few_shot(records: Sequence[ImageRecord], shots: int | None, seed: int = 0,
             task: str = "", classes: Sequence[str] | None = None) -> list[ImageRecord]:
    """K images per class, seeded (CoOp's few-shot sampling).

    `shots` None or 0 keeps every record. A class with fewer than K images keeps
    all of them and a FewShotWarning names it. The draw depends on (task, seed)
    only, so it is reproducible and independent across tasks.
    """
    if not shots:
        return list(records)
    if shots < 0:
        raise SpecError(f"shots must be >= 0, got {shots}")
    rng = np.random.default_rng(_stable_seed("shots", task, seed))
    by_class: dict[int, list[ImageRecord]] = {}
    for r in records:
        by_class.setdefault(r.label, []).append(r)
    out: list[ImageRecord] = []
    labels = range(len(classes)) if classes is not None else sorted(by_class)
    for lab in labels:
        group = by_class.get(lab, [])
        if len(group) < shots:
            cname = classes[lab] if classes is not None else lab
            warnings.warn(f"task {task!r}: class {cname!r} has {len(group)} training images < {shots} shots; "
                          f"using all {len(group)}", FewShotWarning, stacklevel=2)
            out.extend(group)
        else:
            idx = sorted(rng.choice(len(group), size=shots, replace=False).tolist())
            out.extend(group[i] for i in idx)
    return out


# ------------------------------------------------------------------ images
def _to_8bit(im):
    """A high-bit-depth single-channel PIL image as 8-bit "L", scaled, not clipped.

    PIL's own convert("RGB") clips these modes at 255, so a 16-bit image turns
    (almost) pure white. Modes: "I;16*" (unsigned 16-bit; a 16-bit PNG) and
    "I" (32-bit int, which PIL uses for 16-bit TIFF/PNG data) map 0..65535 to
    0..255 (v / 257, rounded: exact for v = 257 k); "F" (32-bit float) maps
    [0, 1] to 0..255, and values in [0, 255] are taken as 8-bit levels. Values
    outside those ranges have no defined 8-bit scaling and raise ValueError.
    Returns None for any other mode (PIL converts those correctly).
    """
    from PIL import Image

    mode = im.mode
    if not (mode.startswith("I;16") or mode in ("I", "F")):
        return None
    a = np.asarray(im).astype(np.float64)
    if a.size and not np.isfinite(a).all():
        raise InvalidInputError(f"mode {mode} image has non-finite pixel values")
    lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
    if mode == "F":
        if lo >= 0 and hi <= 1:
            a = a * 255.0
        elif not (lo >= 0 and hi <= 255):
            raise InvalidInputError(f"mode F pixel values span [{lo:g}, {hi:g}]: expected [0, 1] or [0, 255]")
    else:
        if lo < 0 or hi > 65535:
            raise InvalidInputError(f"mode {mode} pixel values span [{lo:g}, {hi:g}]: expected 16-bit 0..65535")
        a = a / 257.0
    return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), mode="L")


def read_image(path: str | Path):
    """Decode an image to RGB (PIL), raising BadImageError naming the file.

    High-bit-depth single-channel images (16-bit PNG/TIFF, 32-bit int or float
    TIFF) are scaled to 8 bits first (see _to_8bit), not clipped.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            gray = _to_8bit(im)
            return (gray if gray is not None else im).convert("RGB")
    except OSError as e:
        if e.errno is not None:  # the system's (permission, I/O, too many open files), not the image's
            raise ImageReadError(e.errno, f"cannot read image {path}: {e.strerror or e}") from None
        raise BadImageError(path, str(e).splitlines()[0] if str(e) else type(e).__name__) from None
    except (UnidentifiedImageError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        # DecompressionBombError (a header claiming a huge image) is no OSError: named too, so
        # skip_bad_images skips it like any other undecodable file
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise BadImageError(path, reason) from None
