"""hipro_fast.app.predict: unlabelled images scored by a Classifier, checked
against the classifier applied to the image tower's own features."""
from __future__ import annotations

import csv
import io
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from hipro_fast.app import pipeline
from hipro_fast.app.predict import predict_images
from hipro_fast.data.feature_cache import FeatureCache
from hipro_fast.data.tasks_spec import BadImageError, ImageRecord
from hipro_fast.method.export import Classifier

CLASSES = {"digits": ["zero", "one", "two", "three"], "colours": ["red", "blue"]}


@pytest.fixture(scope="module")
def clip():
    return pipeline.load_model("hipro-tiny-clip")


@pytest.fixture(scope="module")
def classifier(clip):
    g = torch.Generator().manual_seed(0)
    dim = int(clip.model.text_projection.shape[1])
    weights = {t: torch.nn.functional.normalize(torch.randn(len(c), dim, generator=g), dim=1)
               for t, c in CLASSES.items()}
    return Classifier(weights, torch.tensor(30.0), CLASSES)


def _images(folder, n=6):
    paths = []
    for i in range(n):
        rng = np.random.default_rng(zlib.crc32(f"predict/{i}".encode()))
        p = folder / f"{i}.png"
        Image.fromarray((rng.random((24, 24, 3)) * 255).astype("uint8")).save(p)
        paths.append(str(p))
    return paths


def test_predictions_are_the_classifiers_on_the_image_towers_features(clip, classifier, tmp_path):
    paths = _images(tmp_path)
    feats = FeatureCache(clip, None, progress=False).encode([ImageRecord(p, 0) for p in paths]).features
    logits = classifier.logits("digits", feats)
    preds = predict_images(clip, classifier, "digits", paths, top_k=3, progress=False, batch_size=4)
    assert preds.paths == paths and not preds.skipped
    want = logits.softmax(dim=1).sort(dim=1, descending=True)
    for i in range(len(paths)):
        assert preds.classes[i] == [CLASSES["digits"][j] for j in want.indices[i, :3].tolist()]
        torch.testing.assert_close(torch.tensor(preds.probs[i]), want.values[i, :3], rtol=1e-6, atol=1e-7)
    rows = list(csv.reader(io.StringIO(preds.to_csv())))
    assert rows[0] == ["path", "class", "probability", "class_2", "probability_2", "class_3", "probability_3"]
    assert [r[0] for r in rows[1:]] == paths and [r[1] for r in rows[1:]] == [c[0] for c in preds.classes]
    assert sum(preds.counts().values()) == len(paths)
    assert predict_images(clip, classifier, "colours", paths, progress=False).classes == \
        [[CLASSES["colours"][j]] for j in classifier.logits("colours", feats).argmax(1).tolist()]


def test_bad_images_and_options_are_named(clip, classifier, tmp_path):
    paths = _images(tmp_path, n=2)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(BadImageError, match="bad.png"):
        predict_images(clip, classifier, "digits", [*paths, str(bad)], progress=False)
    preds = predict_images(clip, classifier, "digits", [*paths, str(bad)], progress=False, skip_bad_images=True)
    assert preds.paths == paths and preds.skipped == [str(bad)]
    with pytest.raises(ValueError, match="task 'letters' is not one of the classifier's tasks"):
        predict_images(clip, classifier, "letters", paths, progress=False)
    for k in (0, 3, True):
        with pytest.raises(ValueError, match="top_k must be a whole number from 1 to 2"):
            predict_images(clip, classifier, "colours", paths, top_k=k, progress=False)
