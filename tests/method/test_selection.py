"""hipro_fast.method.selection: per-task selection kept as a model (choose,
SelectedModel, the selection record), checked against the candidates it
chooses among and against compare(select="per-task")."""
from __future__ import annotations

import json

import pytest
import torch

from hipro_fast.errors import CheckpointError
from hipro_fast.method import selection as sel
from hipro_fast.method.baselines import SELECT_CANDIDATES, build_method, choose_per_task, compare
from hipro_fast.method.export import Classifier, export_classifier
from hipro_fast.method.training import TrainConfig, evaluate, fit
from tests.helpers_training import N_CTX, TASKS, TREE, tiny_clip, toy_data

CFG = TrainConfig(epochs=2, optimizer="adamw", batch_size=4, steps_per_epoch=2, lr=0.05)


@pytest.fixture(scope="module")
def trained():
    """The three candidates trained (seed 4) on one draw, and the draw."""
    clip, tok = tiny_clip()
    train, val, test = toy_data(seed=1), toy_data(seed=2, noise=1.0), toy_data(seed=3, noise=1.0)
    models = {}
    for cand in SELECT_CANDIDATES:
        models[cand] = build_method(cand, clip, TASKS, TREE, N_CTX, seed=4, tokenizer=tok)
        fit(models[cand], train, val, CFG, seed=4)
    return models, train, val, test


def test_choose_is_compares_per_task_selection(trained):
    """choose() on the three trained candidates makes compare(select="per-task")'s
    choice, on the same validation scores, and the SelectedModel scores each
    task's test split as compare's HiPro does."""
    models, train, val, test = trained
    clip, tok = tiny_clip()
    table = compare(clip, TASKS, train, test, val=val, methods=["hipro"], seeds=(4,), tree=TREE, n_ctx=N_CTX,
                    train_config=CFG, tokenizer=tok, select="per-task")
    for by in ("loss", "accuracy"):
        chosen = sel.choose(models, val, by)
        assert chosen.candidates == list(SELECT_CANDIDATES) and chosen.select_by == by
        scores = {c: {"val": chosen.val[c], "val_loss": chosen.val_loss[c]} for c in chosen.candidates}
        assert chosen.choices == choose_per_task(scores, by)
        for c, m in models.items():
            assert chosen.val[c] == evaluate(m, val) and chosen.val_loss[c] == evaluate(m, val, metric="loss")
    chosen = sel.choose(models, val, "loss")
    assert chosen.choices == table["hipro"].choices[0]
    assert sel.SelectedModel(models, chosen).evaluate(test) == pytest.approx(table["hipro"].task_acc, abs=0)


def test_selected_model_takes_each_task_from_its_candidate(trained):
    models, _, val, test = trained
    # every candidate in use: each task forced to another one
    choices = dict(zip(TASKS, SELECT_CANDIDATES))
    chosen = sel.Selection("loss", list(SELECT_CANDIDATES), choices, {}, {})
    selected = sel.SelectedModel(models, chosen)
    assert selected.used() == {c: [t] for t, c in choices.items()}
    with torch.no_grad():
        feats = selected.text_features()
        for task, cand in choices.items():
            own = models[cand].text_features()[task]
            assert torch.equal(feats[task], own)
            x = test[task][0]
            assert torch.equal(selected.logits(task, x), models[cand].logits(task, x))
    assert list(feats) == list(TASKS)
    want = {t: evaluate(models[c], {t: test[t]})[t] for t, c in choices.items()}
    assert selected.evaluate(test) == want
    assert evaluate(selected, test) == want  # hf.evaluate takes it as it takes one HiProModel
    assert selected.evaluate({"colors": val["colors"]}, metric="loss") == \
        evaluate(models[choices["colors"]], {"colors": val["colors"]}, metric="loss")
    with pytest.raises(ValueError, match="unknown task 'weather'"):
        selected.evaluate({"weather": test["colors"]})
    with pytest.raises(ValueError, match="unknown task 'weather'"):
        selected.logits("weather", test["colors"][0])
    cfg = selected.config()
    assert cfg["selection"]["choices"] == choices and set(cfg["candidates"]) == set(SELECT_CANDIDATES)


def test_a_selected_model_exports_each_tasks_chosen_features(trained, tmp_path):
    """export_classifier takes a SelectedModel as it is: each task's weights are
    its candidate's text features, and the Classifier's logits equal the model's."""
    models, _, val, test = trained
    chosen = sel.choose(models, val, "loss")
    chosen.choices["animals"] = "two-level"  # at least two candidates in the file, whatever the toy chose
    chosen.choices["colors"] = "coop-per-task"
    selected = sel.SelectedModel(models, chosen)
    clf = Classifier.load(export_classifier(selected, tmp_path / "clf.safetensors", clip_info={}))
    assert clf.config["selection"]["choices"] == chosen.choices
    with torch.no_grad():
        for task, cand in chosen.choices.items():
            x = test[task][0]
            torch.testing.assert_close(clf(x, task), selected.logits(task, x), rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(clf(x, task), models[cand].logits(task, x), rtol=1e-6, atol=1e-6)


def test_choose_keeps_the_first_candidate_for_tasks_without_val_and_refuses_bad_input(trained):
    models, _, val, _ = trained
    partial = {t: v for t, v in val.items() if t != "colors"}
    chosen = sel.choose(models, partial, "loss")
    assert chosen.choices["colors"] == SELECT_CANDIDATES[0] and "colors" not in chosen.val["hipro"]
    with pytest.raises(ValueError, match="select_by must be one of"):
        sel.choose(models, val, "f1")
    with pytest.raises(ValueError, match="validation split, and it is empty"):
        sel.choose(models, {}, "loss")
    clip, tok = tiny_clip()
    other = build_method("coop-per-task", clip, {"animals": TASKS["animals"]}, n_ctx=N_CTX, tokenizer=tok)
    with pytest.raises(ValueError, match="candidate 'odd' has other tasks or classes than candidate 'hipro'"):
        sel.choose({"hipro": models["hipro"], "odd": other}, val, "loss")
    chosen = sel.choose(models, val, "loss")
    with pytest.raises(ValueError, match="selection names candidate 'coop-per-task', which is not given"):
        sel.SelectedModel({c: models[c] for c in ("hipro", "two-level")}, chosen)
    del chosen.choices["animals"]
    with pytest.raises(ValueError, match="task 'animals' has no choice"):
        sel.SelectedModel(models, chosen)


def test_the_selection_record_round_trips_and_a_bad_one_is_refused_by_name(trained, tmp_path):
    models, _, val, _ = trained
    chosen = sel.choose(models, val, "accuracy-then-loss", extra={"seed": 4, "shots": 2})
    path = sel.save_selection(tmp_path, chosen)
    assert path == tmp_path / sel.SELECTION_FILE and sel.has_selection(tmp_path)
    again = sel.load_selection(tmp_path)
    assert again == chosen
    assert sorted(p.name for p in tmp_path.iterdir()) == [sel.SELECTION_FILE]  # no temp file left
    good = json.loads(path.read_text())
    bad_records = [
        ({**good, "format": "other"}, "not a hipro_fast selection record"),
        ({**good, "version": 9}, "selection version 9, expected 1"),
        ({**good, "select_by": "f1"}, "'select_by' must be one of"),
        ({**good, "candidates": ["hipro", "../up"]}, "'candidates' must be distinct folder names"),
        ({**good, "candidates": ["hipro", "hipro"]}, "'candidates' must be distinct folder names"),
        ({**good, "choices": {"animals": "coop"}}, "task 'animals' chose 'coop', which is not a candidate"),
        ({**good, "choices": {}}, "'choices' must map each task to a candidate"),
        ({**good, "val_loss": [1.0]}, "'val_loss' must map each candidate to per-task scores"),
        ({**good, "extra": 3}, "'extra' must be a JSON object"),
        ({**good, "version": True}, "selection version True, expected 1"),
        ({**good, "candidates": ["", "hipro"]}, "'candidates' must be distinct folder names"),
        ({**good, "val": {**good["val"], "hipro": {"animals": "x"}}},
         "'val': task 'animals'\\'s score 'x' is not a number"),
        ({**good, "val_loss": {**good["val_loss"], "coop": {}}}, "'val_loss': candidate 'coop' is not in"),
    ]
    for record, says in bad_records:
        path.write_text(json.dumps(record))
        with pytest.raises(CheckpointError, match=says):
            sel.load_selection(tmp_path)
    path.write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        sel.load_selection(tmp_path)
    path.unlink()
    with pytest.raises(CheckpointError, match="no selection.json"):
        sel.load_selection(tmp_path)


def test_fit_selected_trains_compares_candidates_and_keeps_the_choice_on_disk(trained, tmp_path):
    """fit_selected = the three candidates as compare builds and fits them (same
    contexts, bit for bit) + choose; with checkpoint_dir the candidates and
    selection.json are on disk, and a resume loads the finished candidates."""
    import hipro_fast as hf
    from hipro_fast.app import pipeline

    models, train, val, test = trained
    clip, tok = tiny_clip()
    seen = []
    selected, results = hf.fit_selected(clip, TASKS, train, val, TREE, n_ctx=N_CTX, seed=4, train_config=CFG,
                                        tokenizer=tok, checkpoint_dir=tmp_path, extra={"seed": 4},
                                        after_fit=lambda c, m, r: seen.append(c))
    assert seen == list(SELECT_CANDIDATES) and list(results) == list(SELECT_CANDIDATES)
    for cand, model in models.items():
        mine = selected.candidates[cand].context_state()
        assert all(torch.equal(v, model.context_state()[k]) for k, v in mine.items()), cand
    assert selected.selection == sel.choose(models, val, "loss", extra={"seed": 4})
    assert sel.load_selection(tmp_path) == selected.selection
    from hipro_fast.data.clip_loading import LoadedClip

    again = pipeline.load_model_checkpoint(tmp_path, LoadedClip(clip, tok, None, "tiny", None))
    assert isinstance(again, sel.SelectedModel) and again.evaluate(test) == selected.evaluate(test)
    # resumed: every candidate finished, so each is loaded (no checkpoint rewritten) and chooses alike
    stamps = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*.safetensors")}
    resumed, res2 = hf.fit_selected(clip, TASKS, train, val, TREE, n_ctx=N_CTX, seed=4, tokenizer=tok,
                                    train_config=TrainConfig(**{**CFG.__dict__, "resume": True}),
                                    checkpoint_dir=tmp_path, extra={"seed": 4})
    assert resumed.selection == selected.selection
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*.safetensors")} == stamps and stamps
    assert [len(r.history) for r in res2.values()] == [len(r.history) for r in results.values()]
    with pytest.raises(ValueError, match="chooses on a validation split: val is empty"):
        hf.fit_selected(clip, TASKS, train, {}, TREE, tokenizer=tok)
    # train_config.checkpoint_dir (as compare takes it) is the selection's folder: one sub-folder per candidate
    via_config = tmp_path / "via-config"
    hf.fit_selected(clip, TASKS, train, val, TREE, n_ctx=N_CTX, seed=4, tokenizer=tok,
                    train_config=TrainConfig(**{**CFG.__dict__, "checkpoint_dir": str(via_config)}))
    assert sel.load_selection(via_config).choices == selected.selection.choices
    assert sorted(p.name for p in via_config.iterdir()) == sorted([*SELECT_CANDIDATES, sel.SELECTION_FILE])
    with pytest.raises(ValueError, match="checkpoint_dir .* and train_config.checkpoint_dir .* differ"):
        hf.fit_selected(clip, TASKS, train, val, TREE, tokenizer=tok, checkpoint_dir=tmp_path / "a",
                        train_config=TrainConfig(**{**CFG.__dict__, "checkpoint_dir": str(via_config)}))
