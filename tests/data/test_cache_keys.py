"""What the feature-cache key is made of: each test changes ONE ingredient the
README names (image mtime with the size kept, the preprocessing, the weights' content)
and checks that the old features are not served."""
import os
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from hipro_fast.data.clip_loading import LoadedClip, random_clip
from hipro_fast.data.feature_cache import CacheWarning, FeatureCache
from hipro_fast.data.tasks_spec import ImageRecord


@pytest.fixture(scope="module")
def clip():
    model = random_clip(width=32, heads=2, layers=1, embed_dim=16, seed=0)
    return LoadedClip(model, None, open_clip.image_transform(16, is_train=False), "tiny-cache-keys", None)


def _bmp(path: Path, seed: int) -> None:
    """A 20x20 RGB BMP: uncompressed, so every such file has the same size."""
    rng = np.random.default_rng(seed)
    Image.fromarray((rng.random((20, 20, 3)) * 255).astype("uint8")).save(path, format="BMP")


def _records(root: Path, n: int = 4) -> list[ImageRecord]:
    root.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        _bmp(root / f"{i}.bmp", seed=i)
        out.append(ImageRecord(str(root / f"{i}.bmp"), i % 2))
    return out


def _reference(clip, records):
    with torch.no_grad():
        x = torch.stack([clip.preprocess(Image.open(r.path).convert("RGB")) for r in records])
        return F.normalize(clip.model.encode_image(x), dim=-1)


def test_same_size_edit_with_a_new_mtime_is_stale(tmp_path, clip):
    """An image rewritten in place with the same byte size: only its mtime tells."""
    recs = _records(tmp_path / "img")
    fc = FeatureCache(clip, tmp_path / "cache", progress=False)
    first = fc.encode(recs, tag="t")
    victim = recs[1].path
    before = os.stat(victim)
    _bmp(Path(victim), seed=99)
    # the new mtime is set explicitly: filesystem timestamp granularity must not decide the test
    os.utime(victim, ns=(before.st_atime_ns, before.st_mtime_ns + 10**9))
    after = os.stat(victim)
    assert after.st_size == before.st_size and after.st_mtime_ns != before.st_mtime_ns
    with pytest.warns(CacheWarning, match="stale"):
        again = fc.encode(recs, tag="t")
    assert again.status == "stale"
    torch.testing.assert_close(again.features, _reference(clip, recs), atol=1e-5, rtol=0)
    assert not torch.allclose(again.features[1], first.features[1], atol=1e-3)


def test_other_preprocessing_is_not_served_the_old_features(tmp_path, clip):
    """Same model, same images, another eval transform (other normalisation)."""
    recs = _records(tmp_path / "img")
    first = FeatureCache(clip, tmp_path / "cache", progress=False).encode(recs, tag="t")
    other = LoadedClip(clip.model, None, open_clip.image_transform(16, is_train=False, mean=(0.5, 0.5, 0.5),
                                                                   std=(0.25, 0.25, 0.25)), clip.name, None)
    enc = FeatureCache(other, tmp_path / "cache", progress=False).encode(recs, tag="t")
    assert enc.status in ("built", "stale")
    torch.testing.assert_close(enc.features, _reference(other, recs), atol=1e-5, rtol=0)
    assert not torch.allclose(enc.features, first.features, atol=1e-3)
    # and both stay cached side by side
    assert FeatureCache(clip, tmp_path / "cache", progress=False).encode(recs, tag="t").status == "hit"
    assert FeatureCache(other, tmp_path / "cache", progress=False).encode(recs, tag="t").status == "hit"


def test_the_weights_are_identified_by_their_content(tmp_path, clip):
    """The image tower is identified by a hash of its loaded weights, not by the
    weights file's path, size and mtime: new weights under the same name and
    file (e.g. copied in with their old mtime) are not served the old features,
    and the same weights are, whatever the file's mtime."""
    weights = tmp_path / "weights.bin"
    weights.write_bytes(b"\x01" * 64)
    recs = _records(tmp_path / "img")

    def cache(model):  # a fresh FeatureCache: the fingerprint is read once per instance
        return FeatureCache(LoadedClip(model, None, clip.preprocess, clip.name, str(weights)), tmp_path / "cache",
                            progress=False)

    assert cache(clip.model).encode(recs, tag="t").status == "built"
    os.utime(weights, ns=(0, 10**9))
    assert cache(clip.model).encode(recs, tag="t").status == "hit"
    other = random_clip(width=32, heads=2, layers=1, embed_dim=16, seed=1)  # same name, path, size, mtime
    out = cache(other).encode(recs, tag="t")
    assert out.status != "hit"
    torch.testing.assert_close(out.features, _reference(LoadedClip(other, None, clip.preprocess, clip.name, None),
                                                        recs), atol=1e-6, rtol=0)
