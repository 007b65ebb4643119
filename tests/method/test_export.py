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


def test_the_classifier_is_a_module_a_larger_model_carries(tmp_path, trained):
    clf = Classifier.load(export_classifier(trained, tmp_path / "clf.safetensors"))
    x = toy_data(seed=3)["colors"][0]
    want = clf.logits("colors", x)
    torch.testing.assert_close(clf(x, "colors"), want, rtol=0, atol=0)
    pipeline = torch.nn.Sequential(torch.nn.Identity(), clf.head("colors"))
    torch.testing.assert_close(pipeline(x), want, rtol=0, atol=0)
    # a parent's dtype move reaches the weights, and the logits follow them
    parent = torch.nn.ModuleDict({"clf": clf}).to(torch.float64)
    got = parent["clf"].logits("colors", x)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want.double(), rtol=1e-6, atol=1e-6)
    # state_dict round trip into a classifier of the same tasks and classes
    fresh = Classifier.load(tmp_path / "clf.safetensors")
    with torch.no_grad():
        fresh.weight_0.zero_()
    fresh.load_state_dict(Classifier.load(tmp_path / "clf.safetensors").state_dict())
    torch.testing.assert_close(fresh.logits("colors", x), want, rtol=0, atol=0)
    with pytest.raises(ValueError, match="pass task="):
        clf(x)
    # a parent's state_dict is all tensors (safetensors), and a partial strict=False load leaves it be
    from safetensors.torch import load_file, save_file

    parent = torch.nn.ModuleDict({"backbone": torch.nn.Linear(2, 2), "clf": Classifier.load(tmp_path / "clf.safetensors")})
    save_file(parent.state_dict(), str(tmp_path / "parent.safetensors"))
    parent.load_state_dict(load_file(str(tmp_path / "parent.safetensors")))
    result = parent.load_state_dict({"backbone.weight": torch.zeros(2, 2), "backbone.bias": torch.zeros(2)},
                                    strict=False)
    assert "clf.weight_0" in result.missing_keys
    with pytest.raises(TypeError):
        clf.weights["colors"] = torch.zeros(3, 24)  # read-only by task: no silent no-op


def test_another_classifiers_state_is_refused_before_loading(tmp_path, trained):
    clf = Classifier.load(export_classifier(trained, tmp_path / "clf.safetensors"))
    w = {t: torch.nn.functional.normalize(torch.randn(len(c), 24), dim=-1) for t, c in TASKS.items()}
    renamed = Classifier({f"{t}-2": v for t, v in w.items()}, torch.tensor(50.0),
                         {f"{t}-2": c for t, c in TASKS.items()})
    before = {k: v.clone() for k, v in clf.state_dict().items() if torch.is_tensor(v)}
    with pytest.raises(ValueError, match="the state is of a classifier with tasks"):
        clf.load_state_dict(renamed.state_dict())
    assert all(torch.equal(v, clf.state_dict()[k]) for k, v in before.items())


def test_export_checks_given_text_features_and_records_the_clip(tmp_path, trained):
    with torch.no_grad():
        feats = trained.text_features()
    path = export_classifier(trained, tmp_path / "ok.safetensors", text_features=feats,
                             clip_info={"name": "tiny", "pretrained": None})
    assert Classifier.load(path).clip_info == {"name": "tiny", "pretrained": None}
    # by default the image tower's digest (the one `hipro export` and the feature cache record)
    from hipro_fast.data.feature_cache import model_fingerprint

    plain = Classifier.load(export_classifier(trained, tmp_path / "plain.safetensors")).clip_info
    assert plain == {"image_tower": model_fingerprint(trained.clip)["visual_sha256"][:16]}
    task = next(iter(TASKS))
    bad_cases = [({**feats, task: feats[task][:-1]}, rf"text_features\['{task}'\] is \("),
                 ({k: v for k, v in feats.items() if k != task}, f"lacks task '{task}'"),
                 ({**feats, task: feats[task] * 2}, "rows must be L2-normalised"),
                 ({**feats, task: feats[task].clone().fill_(float("nan"))}, "non-finite"),
                 ({**feats, "other": feats[task]}, "task 'other', which the model does not have")]
    for bad, says in bad_cases:
        with pytest.raises(TaskSpecError, match=says):
            export_classifier(trained, tmp_path / "bad.safetensors", text_features=bad)
    assert not (tmp_path / "bad.safetensors").exists()
    with pytest.raises(ValueError, match="is a directory"):
        export_classifier(trained, tmp_path)


def test_inference_checks_the_features_and_loading_names_the_file(tmp_path, trained):
    path = export_classifier(trained, tmp_path / "clf.safetensors")
    clf = Classifier.load(path)
    for bad in (torch.zeros(2, 24, dtype=torch.long), torch.zeros(2, 24, dtype=torch.bool)):
        with pytest.raises(TaskSpecError, match="must be floating point"):
            clf.logits("colors", bad)
        with pytest.raises(TaskSpecError, match="must be floating point"):
            trained.logits("colors", bad)
    x = toy_data(seed=3)["colors"][0]
    torch.testing.assert_close(trained.logits("colors", x.numpy()), trained.logits("colors", x))
    with pytest.raises(ValueError, match="is not a file"):
        Classifier.load(tmp_path)
    (tmp_path / "cut.safetensors").write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match=r"cut\.safetensors: not a readable safetensors file"):
        Classifier.load(tmp_path / "cut.safetensors")
    with pytest.raises(ValueError, match="is not a device"):
        Classifier.load(path, device=torch.float64)
    from safetensors.torch import load_file, save_file
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = dict(f.metadata())
    tensors = load_file(str(path))
    save_file(tensors, str(tmp_path / "v9.safetensors"), metadata={**meta, "version": "9"})
    with pytest.raises(ValueError, match="format version '9'"):
        Classifier.load(tmp_path / "v9.safetensors")
    save_file(tensors, str(tmp_path / "nocls.safetensors"), metadata={k: v for k, v in meta.items() if k != "classes"})
    with pytest.raises(ValueError, match="lacks 'classes'"):
        Classifier.load(tmp_path / "nocls.safetensors")
    save_file({k: v for k, v in tensors.items() if k != "weight/1"}, str(tmp_path / "now1.safetensors"), metadata=meta)
    with pytest.raises(ValueError, match="lacks tensor 'weight/1'"):
        Classifier.load(tmp_path / "now1.safetensors")


def test_a_hand_edited_or_corrupt_classifier_file_is_refused_naming_the_file(tmp_path, trained):
    """Every field of the file is checked at load: a repeated task name took
    another task's weights, bad JSON types raised builtin errors without the
    file, and flipped weight bits or a NaN scale loaded silently."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from hipro_fast.engine.fingerprint import tensors_digest
    from hipro_fast.errors import HiproError

    path = export_classifier(trained, tmp_path / "clf.safetensors")
    with safe_open(str(path), "pt") as f:
        meta = dict(f.metadata())
    tensors = load_file(str(path))
    tasks = list(TASKS)

    def edited(name, tensors=tensors, checksum=True, **fields):
        t = dict(tensors)
        m = {**meta, **fields}
        if checksum:  # an edit that also rewrote the checksum: the field checks must catch it
            m["checksum"] = tensors_digest(t)
        save_file(t, str(tmp_path / name), metadata=m)
        return tmp_path / name

    import json
    cases = [
        (edited("dup.safetensors", tasks=json.dumps([tasks[0], *tasks[:-1]])), "differ, or repeat one"),
        (edited("dim.safetensors", embed_dim="abc"), "'embed_dim' is 'abc', not a whole number"),
        (edited("clip.safetensors", clip="[1, 2]"), "'clip' must be a JSON dict, got list"),
        (edited("cfg.safetensors", model_config='"x"'), "'model_config' must be a JSON dict, got str"),
        (edited("cls.safetensors", classes=json.dumps({t: ["a", "a"] for t in tasks})), "classes"),
        (edited("nan.safetensors", tensors={**tensors, "logit_scale": torch.tensor(float("nan"))}),
         "logit_scale must be finite"),
        (edited("neg.safetensors", tensors={**tensors, "logit_scale": torch.tensor(-1.0)}),
         "logit_scale is -1, not a positive number"),
        (edited("int.safetensors", tensors={**tensors, "weight/0": tensors["weight/0"].long()}),
         f"the weight of task '{tasks[0]}' must be finite floating-point"),
    ]
    flipped = dict(tensors)
    flipped["weight/1"] = flipped["weight/1"].clone()
    flipped["weight/1"][0, 0] += 0.5
    cases.append((edited("flip.safetensors", tensors=flipped, checksum=False), "do not match the checksum"))
    for bad, says in cases:
        with pytest.raises(HiproError) as err:
            Classifier.load(bad)
        assert str(bad) in str(err.value) and says in str(err.value), (bad.name, str(err.value))
    # a file from before the checksum (none in its metadata) still loads
    save_file(tensors, str(tmp_path / "old.safetensors"), metadata={k: v for k, v in meta.items() if k != "checksum"})
    assert torch.equal(Classifier.load(tmp_path / "old.safetensors").weights[tasks[0]], tensors["weight/0"])


def test_load_takes_any_torch_device_and_swapped_arguments_are_named(tmp_path, trained):
    path = export_classifier(trained, tmp_path / "clf.safetensors")
    want = Classifier.load(path).weights["colors"]
    for device in ("cpu:0", torch.device("cpu", 0)):  # before: "device cpu:0 is invalid", blamed on the file
        assert torch.equal(Classifier.load(path, device=device).weights["colors"], want)
    assert Classifier.load(path, device="meta").weights["colors"].is_meta
    clf = Classifier.load(path)
    x = toy_data(seed=3)["colors"][0]
    with pytest.raises(ValueError, match=r"task must be a task name .*got a Tensor"):
        clf.logits(x, "colors")


def test_a_heads_state_is_refused_by_a_head_of_another_task():
    """Two tasks of as many classes: one head's state loaded into the other's
    head scored with the wrong weights under its own class names."""
    clip_free = make_model(tasks={"a": ["x", "y"], "b": ["u", "v"]}, tree=["a", "b"])
    with torch.no_grad():
        feats = clip_free.text_features()
    clf = Classifier(feats, clip_free.logit_scale.detach(), {"a": ["x", "y"], "b": ["u", "v"]})
    a, b = clf.head("a"), clf.head("b")
    with pytest.raises(ValueError, match=r"state is of task 'b'.*this head is task 'a'"):
        a.load_state_dict(b.state_dict())
    assert torch.equal(a.weight, feats["a"])  # untouched
    a.load_state_dict(clf.head("a").state_dict())  # its own task's: loads
    old = {k: v for k, v in b.state_dict().items() if k != "layout"}  # saved before heads had a layout
    b.load_state_dict(old)
    assert torch.equal(b.weight, feats["b"])


def test_a_classifier_built_by_hand_is_checked_as_a_loaded_one_is():
    """The constructor refuses what Classifier.load refuses in a file: no classes,
    a class twice, non-finite or integer weights, a scale that is not positive."""
    w = torch.randn(2, 8)
    ok = Classifier({"a": w}, torch.tensor(10.0), {"a": ["x", "y"]})
    assert ok.class_names("a") == ["x", "y"]
    Classifier({"a": w.to("meta")}, torch.tensor(10.0).to("meta"), {"a": ["x", "y"]})  # no values to check
    for weights, scale, classes, message in (
            ({"a": torch.zeros(0, 8)}, 10.0, {"a": []}, "task 'a' has no classes"),
            ({"a": w}, 10.0, {"a": ["x", "x"]}, "task 'a' has duplicate class name 'x'"),
            ({"a": w * float("nan")}, 10.0, {"a": ["x", "y"]}, r"task 'a': the weights must be finite floating"),
            ({"a": w.long()}, 10.0, {"a": ["x", "y"]}, r"finite floating-point numbers \(torch.int64\)"),
            ({"a": w}, -1.0, {"a": ["x", "y"]}, "logit_scale must be a positive finite floating-point number"),
            ({"a": w}, float("inf"), {"a": ["x", "y"]}, "logit_scale must be a positive finite"),
    ):
        with pytest.raises(TaskSpecError, match=message):
            Classifier(weights, torch.tensor(scale), classes)
