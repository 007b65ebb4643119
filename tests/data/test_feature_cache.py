"""Feature cache: encode once, reuse, detect stale and corrupt files, atomic writes, views."""
import os
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from hipro_fast.data.clip_loading import LoadedClip
from hipro_fast.data.feature_cache import CacheWarning, FeatureCache, sample_views, stack_views
from hipro_fast.data.tasks_spec import BadImageError, ImageRecord


@pytest.fixture(scope="module")
def clip():
    import open_clip
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    torch.manual_seed(0)
    model = CLIP(embed_dim=16, vision_cfg=CLIPVisionCfg(layers=1, width=32, head_width=16, patch_size=8,
                                                        image_size=16),
                 text_cfg=CLIPTextCfg(context_length=77, vocab_size=49408, width=32, heads=2, layers=1))
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return LoadedClip(model, None, open_clip.image_transform(16, is_train=False), "tiny-cache-test", None)


def _records(root: Path, n: int = 6) -> list[ImageRecord]:
    root.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        p = root / f"{i}.png"
        rng = np.random.default_rng(i)
        Image.fromarray((rng.random((20, 20, 3)) * 255).astype("uint8")).save(p)
        out.append(ImageRecord(str(p), i % 2))
    return out


def _reference(clip, records):
    with torch.no_grad():
        x = torch.stack([clip.preprocess(Image.open(r.path).convert("RGB")) for r in records])
        return F.normalize(clip.model.encode_image(x), dim=-1)


def _touch_new(path: str, seed: int) -> None:
    rng = np.random.default_rng(seed)
    Image.fromarray((rng.random((24, 24, 3)) * 255).astype("uint8")).save(path)
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))


def test_features_match_open_clip_and_are_reused(tmp_path, clip):
    recs = _records(tmp_path / "img")
    fc = FeatureCache(clip, tmp_path / "cache", progress=False, batch_size=4)
    a = fc.encode(recs, tag="t/train")
    assert a.status == "built" and a.file.exists()
    torch.testing.assert_close(a.features, _reference(clip, recs), atol=1e-5, rtol=0)
    assert a.labels.tolist() == [0, 1, 0, 1, 0, 1]
    b = FeatureCache(clip, tmp_path / "cache", progress=False).encode(recs, tag="t/train")
    assert b.status == "hit"
    torch.testing.assert_close(b.features, a.features, atol=0, rtol=0)
    assert list((tmp_path / "cache").iterdir()) == [a.file]  # no temp files left


def test_changed_image_makes_the_cache_stale(tmp_path, clip):
    recs = _records(tmp_path / "img")
    fc = FeatureCache(clip, tmp_path / "cache", progress=False)
    first = fc.encode(recs, tag="t")
    _touch_new(recs[2].path, seed=99)
    with pytest.warns(CacheWarning, match="stale") as w:
        again = fc.encode(recs, tag="t")
    # the warning says what changed (not "the model, preprocessing or images")
    assert f"1 of 6 images changed" in str(w[0].message) and recs[2].path in str(w[0].message)
    assert again.status == "stale" and again.file == first.file
    torch.testing.assert_close(again.features, _reference(clip, recs), atol=1e-5, rtol=0)
    assert not torch.allclose(again.features[2], first.features[2])
    assert fc.encode(recs, tag="t").status == "hit"
    # a different image list (one image fewer) is a set of its own: built, and the full list stays a hit
    with warnings.catch_warnings():
        warnings.simplefilter("error", CacheWarning)
        fewer = fc.encode(recs[:-1], tag="t")
        assert fewer.status == "built" and fewer.file != again.file
        assert fc.encode(recs, tag="t").status == "hit"


def test_same_tag_different_images_do_not_evict_each_other(tmp_path, clip):
    """Two specs with a task of the same name share one cache folder: each keeps its file."""
    a, b = _records(tmp_path / "spec_a" / "img"), _records(tmp_path / "spec_b" / "img", n=4)
    fc = FeatureCache(clip, tmp_path / "cache", progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CacheWarning)  # before the fix: "stale ... rebuilding" on every switch
        first_a, first_b = fc.encode(a, tag="pets/test"), fc.encode(b, tag="pets/test")
        assert first_a.file != first_b.file
        for _ in range(2):
            assert fc.encode(a, tag="pets/test").status == "hit"
            assert fc.encode(b, tag="pets/test").status == "hit"
    # same paths, other labels (a spec that orders its classes differently): its own file too
    relabelled = [type(r)(r.path, 1 - r.label) for r in a]
    assert fc.encode(relabelled, tag="pets/test").status == "built"
    assert fc.encode(a, tag="pets/test").status == "hit"


def test_a_clean_cache_serves_both_skip_settings(tmp_path, clip):
    """Nothing was skipped: the features are those of either setting, so
    toggling --skip-bad-images does not rebuild (or overwrite) the file."""
    recs = _records(tmp_path / "img", n=3)
    first = FeatureCache(clip, tmp_path / "cache", progress=False).encode(recs, tag="t")
    with warnings.catch_warnings():
        warnings.simplefilter("error", CacheWarning)
        skip = FeatureCache(clip, tmp_path / "cache", progress=False, skip_bad_images=True).encode(recs, tag="t")
        strict = FeatureCache(clip, tmp_path / "cache", progress=False).encode(recs, tag="t")
    assert (skip.status, strict.status) == ("hit", "hit") and skip.file == strict.file == first.file
    torch.testing.assert_close(skip.features, first.features, atol=0, rtol=0)


@pytest.mark.parametrize("damage", ["flip_byte", "truncate", "garbage"])
def test_corrupt_cache_is_detected_and_rebuilt(tmp_path, clip, damage):
    recs = _records(tmp_path / "img")
    fc = FeatureCache(clip, tmp_path / "cache", progress=False)
    good = fc.encode(recs, tag="t")
    data = bytearray(good.file.read_bytes())
    if damage == "flip_byte":
        data[-5] ^= 0xFF  # inside the feature tensor bytes: only the checksum can tell
    elif damage == "truncate":
        data = data[: len(data) // 2]
    else:
        data = bytearray(b"\x00" * 64)
    good.file.write_bytes(bytes(data))
    with pytest.warns(CacheWarning, match="corrupt"):
        again = fc.encode(recs, tag="t")
    assert again.status == "corrupt"
    torch.testing.assert_close(again.features, good.features, atol=0, rtol=0)
    assert fc.encode(recs, tag="t").status == "hit"


def test_interrupted_rebuild_keeps_the_previous_cache(tmp_path, clip, monkeypatch):
    recs = _records(tmp_path / "img")
    fc = FeatureCache(clip, tmp_path / "cache", progress=False)
    first = fc.encode(recs, tag="t")
    before = first.file.read_bytes()
    _touch_new(recs[0].path, seed=7)

    import hipro_fast.files as files

    def interrupted(tmp, path):  # the new cache is written in full but not yet in place
        assert Path(tmp).stat().st_size > 100
        raise KeyboardInterrupt

    monkeypatch.setattr(files.os, "replace", interrupted)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CacheWarning)
        with pytest.raises(KeyboardInterrupt):
            fc.encode(recs, tag="t")
    assert first.file.read_bytes() == before
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [first.file.name]


# atomic_write_bytes(argv[2]) in a process SIGKILLed between the write and the rename; hipro_fast.files
# loaded alone (it imports nothing of the package), so the process starts in a blink.
_KILLED_MID_WRITE = """
import importlib.util, os, signal, sys
spec = importlib.util.spec_from_file_location("files", sys.argv[1])
files = importlib.util.module_from_spec(spec)
spec.loader.exec_module(files)
os.replace = lambda src, dst: os.kill(os.getpid(), signal.SIGKILL)
files.atomic_write_bytes(sys.argv[2], b"half a feature cache")
"""


@pytest.mark.skipif(os.name != "posix", reason="a SIGKILLed writer")
def test_a_writer_killed_mid_write_leaves_a_temp_file_that_the_next_open_removes(tmp_path, clip, monkeypatch):
    """A SIGKILLed writer's temp file is removed when the folder is next opened,
    while another writer (this process) is writing the same cache file; its temp
    file is kept, and so is every file that is not a cache file's temp file."""
    import hipro_fast.files as files

    recs, cache = _records(tmp_path / "img"), tmp_path / "cache"
    target = FeatureCache(clip, cache, progress=False).file_for("t", records=recs)
    killed = subprocess.Popen([sys.executable, "-c", _KILLED_MID_WRITE, files.__file__, str(target)])
    assert killed.wait(timeout=60) == -signal.SIGKILL  # and reaped: no process has its pid now
    (orphan,) = cache.glob(".*.tmp")
    writer = orphan.name.split(".")[-3]  # "<pid space>-<pid>" of the dead writer
    assert writer.endswith(f"-{killed.pid}")
    others = [cache / "notes.txt", cache / f".notes.txt.{writer}.abcd1234.tmp", cache / f".{target.name}.tmp",
              cache / f".{target.name}.{writer}.abcd1234.tmp.keep"]
    for other in others:
        other.write_text("not a cache file's temp file")
    real_replace, seen = os.replace, {}

    def opened_mid_write(tmp, path):  # another process opens the folder while this one writes
        FeatureCache(clip, cache, progress=False)
        seen.update(live=Path(tmp).exists(), orphan=orphan.exists())
        real_replace(tmp, path)

    monkeypatch.setattr(files.os, "replace", opened_mid_write)
    assert FeatureCache(clip, cache, progress=False).encode(recs, tag="t").status == "built"
    assert seen == {"live": True, "orphan": False}
    assert sorted(p.name for p in cache.iterdir()) == sorted([target.name, *(p.name for p in others)])


def test_bad_image_raises_naming_the_file_or_is_skipped(tmp_path, clip):
    recs = _records(tmp_path / "img")
    Path(recs[3].path).write_bytes(b"\x89PNG broken")
    fc = FeatureCache(clip, tmp_path / "cache", progress=False)
    with pytest.raises(BadImageError) as e:
        fc.encode(recs, tag="t")
    assert recs[3].path in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").iterdir())
    skip = FeatureCache(clip, tmp_path / "cache", progress=False, skip_bad_images=True)
    out = skip.encode(recs, tag="t")
    assert out.skipped == [recs[3].path] and len(out) == 5
    assert recs[3].path not in out.paths and out.labels.tolist() == [0, 1, 0, 0, 1]
    hit = skip.encode(recs, tag="t")
    assert hit.status == "hit" and hit.skipped == [recs[3].path] and hit.paths == out.paths
    # the strict setting, on the file that skipped it, says what encoding would: the file is kept
    with pytest.raises(BadImageError, match="written with skip_bad_images") as e:
        fc.encode(recs, tag="t")
    assert recs[3].path in str(e.value) and f"delete the cache file" in str(e.value) and str(out.file) in str(e.value)
    assert out.file.exists()


def test_augmented_views_and_sampling(tmp_path, clip):
    recs = _records(tmp_path / "img", n=5)
    fc = FeatureCache(clip, tmp_path / "cache", progress=False)
    enc = fc.encode(recs, tag="t", views=3, seed=1)
    assert enc.views.shape == (5, 3, 16) and enc.features.shape == (5, 16)
    torch.testing.assert_close(enc.views.norm(dim=-1), torch.ones(5, 3))
    assert not torch.allclose(enc.views[:, 0], enc.views[:, 1])
    again = FeatureCache(clip, None, progress=False).encode(recs, tag="t", views=3, seed=1)
    torch.testing.assert_close(again.views, enc.views, atol=1e-6, rtol=0)  # seeded augmentation
    assert fc.encode(recs, tag="t", views=3, seed=1).status == "hit"
    e0, e0b = sample_views(enc.views, 0, 0), sample_views(enc.views, 0, 0)
    assert e0.shape == (5, 16) and torch.equal(e0, e0b)
    assert any(not torch.equal(sample_views(enc.views, e, 0), e0) for e in range(1, 6))  # epochs differ
    picked = [(enc.views[i] == e0[i]).all(-1).any().item() for i in range(5)]
    assert all(picked)
    f, y = stack_views(enc.views, enc.labels)
    assert f.shape == (15, 16) and y.tolist() == [0, 0, 0, 1, 1, 1, 0, 0, 0, 1, 1, 1, 0, 0, 0]


def test_augmented_views_do_not_depend_on_where_the_images_are(tmp_path, clip):
    """Views are seeded by the image's pixels: a moved or renamed dataset trains
    on the same views (before: seeded by the absolute path, so it did not);
    other images get other views; a views cache of the path seeding is not reused."""
    import shutil

    recs = _records(tmp_path / "img", n=4)
    moved = tmp_path / "elsewhere" / "renamed"
    shutil.copytree(tmp_path / "img", moved)
    order = [3, 1, 2, 0]  # renamed and listed in another order
    for i in order:
        (moved / f"{i}.png").rename(moved / f"x{i}.png")
    moved_recs = [ImageRecord(str(moved / f"x{i}.png"), recs[i].label) for i in order]
    fc = FeatureCache(clip, None, progress=False)
    here = fc.encode(recs, tag="t", views=2, seed=3)
    there = fc.encode(moved_recs, tag="t", views=2, seed=3)
    assert torch.equal(there.views, here.views[order])
    assert not torch.allclose(here.views[0], here.views[1])  # other pixels, other views
    assert not torch.allclose(fc.encode(recs, tag="t", views=2, seed=4).views, here.views)  # the seed counts
    cached = FeatureCache(clip, tmp_path / "cache", progress=False)
    assert cached.identity("t", 2, 3)["views_seeded_by"] == "pixels"
    assert "views_seeded_by" not in cached.identity("t", 0, 3)  # plain features keep their cache files


def test_cache_key_depends_on_weights(tmp_path, clip):
    recs = _records(tmp_path / "img", n=2)
    fc = FeatureCache(clip, tmp_path / "cache", progress=False)
    fc.encode(recs, tag="t")
    other = LoadedClip(clip.model, None, clip.preprocess, clip.name, None)
    import copy

    other.model = copy.deepcopy(clip.model)
    with torch.no_grad():
        other.model.visual.conv1.weight.add_(0.1)
    assert FeatureCache(other, tmp_path / "cache", progress=False).encode(recs, tag="t").status == "built"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_features_live_on_the_gpu(tmp_path, clip):
    import copy

    gpu = LoadedClip(copy.deepcopy(clip.model).cuda(), None, clip.preprocess, clip.name, None)
    recs = _records(tmp_path / "img", n=3)
    enc = FeatureCache(gpu, tmp_path / "cache", progress=False).encode(recs, tag="t")
    assert enc.features.is_cuda and enc.labels.is_cuda
    torch.testing.assert_close(enc.features.cpu(), _reference(clip, recs), atol=1e-4, rtol=0)
    assert FeatureCache(gpu, tmp_path / "cache", progress=False).encode(recs, tag="t").features.is_cuda


def test_an_edit_that_restores_size_and_mtime_is_still_seen(tmp_path, clip):
    """cp -p / rsync -t / os.utime can put the old size and mtime back on new
    content; the ctime they cannot, and it is in the key."""
    import time

    recs = _records(tmp_path / "img")
    fc = FeatureCache(clip, tmp_path / "cache", progress=False, batch_size=4)
    fc.encode(recs, tag="t/train")
    st = os.stat(recs[0].path)
    img = np.asarray(Image.open(recs[0].path))
    time.sleep(0.01)
    Image.fromarray(255 - img).save(recs[0].path)  # new content, same size here
    os.utime(recs[0].path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(recs[0].path).st_size == st.st_size and os.stat(recs[0].path).st_mtime_ns == st.st_mtime_ns
    with pytest.warns(CacheWarning, match="stale"):
        again = fc.encode(recs, tag="t/train")
    assert again.status == "stale"
    torch.testing.assert_close(again.features, _reference(clip, recs), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("meta", [{"skipped": "[{"}, {"n_images": "x"}, {"skipped": "5"}])
def test_damaged_metadata_is_corrupt_and_rebuilt(tmp_path, clip, meta):
    """The metadata is outside the tensors' checksum: damaged, it crashed every run."""
    from safetensors.torch import load_file, save_file
    from safetensors import safe_open

    recs = _records(tmp_path / "img")
    fc = FeatureCache(clip, tmp_path / "cache", progress=False, batch_size=4)
    built = fc.encode(recs, tag="t/train")
    with safe_open(str(built.file), framework="pt") as f:
        old = f.metadata()
    save_file(load_file(str(built.file)), str(built.file), metadata={**old, **meta})
    with pytest.warns(CacheWarning, match="corrupt feature cache .*unreadable metadata"):
        again = fc.encode(recs, tag="t/train")
    assert again.status == "corrupt" and torch.equal(again.features, built.features)


def test_cache_write_failures_name_the_file_and_long_tags_fit_a_file_name(tmp_path, clip, monkeypatch):
    import errno

    from hipro_fast.data import feature_cache
    from hipro_fast.errors import CacheWriteError

    recs = _records(tmp_path / "img")
    fc = FeatureCache(clip, tmp_path / "cache", progress=False, batch_size=4)
    tag = "漢" * 70 + "/train"  # 3 bytes a character: cut by characters, the name passed 255 bytes
    assert len(fc.file_for(tag, records=recs).name.encode()) <= 255
    assert fc.encode(recs, tag=tag).status == "built"

    def full(path, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(feature_cache, "atomic_write_bytes", full)
    with pytest.raises(CacheWriteError, match=r"cannot write the feature cache .*other\S*\.safetensors: No space left"):
        fc.encode(recs, tag="other/train")


def test_a_read_error_is_not_a_bad_image_and_is_never_skipped(tmp_path, clip, monkeypatch):
    """A permission or I/O error says nothing about the image: skipping it would
    be cached and outlive the fix (chmod changes neither size nor mtime)."""
    import errno

    from PIL import Image as PILImage

    from hipro_fast.errors import ImageReadError

    recs = _records(tmp_path / "img")
    real_open = PILImage.open

    def denied(path, *args, **kwargs):
        if str(path) == recs[1].path:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(PILImage, "open", denied)
    fc = FeatureCache(clip, tmp_path / "cache", progress=False, batch_size=4, skip_bad_images=True)
    with pytest.raises(ImageReadError, match=f"cannot read image {recs[1].path}: Permission denied"):
        fc.encode(recs, tag="t/train")
    assert not list((tmp_path / "cache").glob("*.safetensors"))


def test_views_of_an_image_whose_name_is_not_utf8(tmp_path, clip):
    recs = _records(tmp_path / "img", n=2)
    odd = os.path.join(str(tmp_path / "img"), os.fsdecode(b"caf\xe9.png"))
    os.rename(recs[0].path, odd)
    recs[0] = ImageRecord(odd, recs[0].label)
    fc = FeatureCache(clip, None, progress=False)
    assert fc.encode(recs, tag="t/train", views=2, seed=0).views.shape[:2] == (2, 2)


def test_a_bfloat16_image_tower_encodes(tmp_path, clip):
    import copy

    recs = _records(tmp_path / "img", n=2)
    low = LoadedClip(copy.deepcopy(clip.model).to(torch.bfloat16), None, clip.preprocess, "tiny-bf16", None)
    out = FeatureCache(low, None, progress=False).encode(recs, tag="t/train")
    torch.testing.assert_close(out.features, _reference(clip, recs), atol=0.05, rtol=0.05)
