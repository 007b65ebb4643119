"""export_classifier / Classifier: no-text-tower scoring equal to the model."""
from __future__ import annotations

import pytest
import torch

from hipro_fast import TaskSpecError
from hipro_fast.method.export import Classifier, export_classifier
from hipro_fast.method.training import fit
from tests.helpers_training import TASKS, make_model, toy_data


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def trained(one_thread):
    model = make_model()
    fit(model, toy_data(seed=1), None, epochs=2, optimizer="adamw", batch_size=4, steps_per_epoch=2, lr=0.05)
    return model


def test_exported_logits_equal_model_logits(tmp_path, trained):
    path = export_classifier(trained, tmp_path / "clf.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clf.safetensors"]  # no temp left
    clf = Classifier.load(path)
    assert clf.tasks == list(TASKS) and clf.embed_dim == 24
    test = toy_data(seed=3, noise=1.0)
    with torch.no_grad():
        feats = trained.text_features()
        for task, (x, _) in test.items():
            assert clf.class_names(task) == TASKS[task]
            want = trained.logits(task, x, feats)
            got = clf.logits(task, x)
            assert got.shape == (x.shape[0], len(TASKS[task]))
            assert torch.equal(got, want)
            assert torch.equal(clf.predict(task, x), want.argmax(1))
    assert "animals: 4" in repr(clf)


def test_classifier_errors(tmp_path, trained):
    clf = Classifier.load(export_classifier(trained, tmp_path / "clf.safetensors"))
    with pytest.raises(TaskSpecError, match=r"unknown task 'shapes'.*animals"):
        clf.logits("shapes", torch.zeros(2, 24))
    with pytest.raises(TaskSpecError, match=r"unknown task 'shapes'"):
        clf.class_names("shapes")
    with pytest.raises(TaskSpecError, match=r"task 'colors'.*\[N, 24\].*\(2, 16\)"):
        clf.predict("colors", torch.zeros(2, 16))
    with pytest.raises(FileNotFoundError):
        Classifier.load(tmp_path / "missing.safetensors")
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not a hipro_fast classifier"):
        Classifier.load(tmp_path / "other.safetensors")


def test_export_overwrites_atomically(tmp_path, trained):
    path = tmp_path / "clf.safetensors"
    export_classifier(make_model(seed=5), path)
    export_classifier(trained, path)
    clf = Classifier.load(path)
    x = toy_data(seed=4)["animals"][0]
    with torch.no_grad():
        assert torch.equal(clf.logits("animals", x), trained.logits("animals", x))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clf.safetensors"]
