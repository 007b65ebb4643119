"""Baselines in the HiPro code path, and compare()."""
from __future__ import annotations

import json
import statistics

import pytest
import torch
import torch.nn.functional as F

from hipro_fast.method.baselines import (COOP_BEST_OF, DEFAULT_SELECT_BY, METHODS, MODEL_METHODS, SELECT_CRITERIA,
                                         ComparisonTable, build_method, choose_per_task, compare)
from hipro_fast.method.training import TrainConfig, evaluate, fit
from tests.helpers_training import N_CTX, TASKS, TREE, few_shot_pool, tiny_clip, toy_data

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny towers run fastest on 1 thread

WIDTH, T = 64, len(TASKS)


def test_zero_shot_is_open_clip_encode_text_of_the_template():
    clip, tok = tiny_clip()
    tasks = {**TASKS, "objects": ["traffic_light", "teddy bear", "hot-dog"]}
    model = build_method("zero-shot", clip, tasks, tokenizer=tok)
    assert model.num_trainable_parameters() == 0
    with torch.no_grad():
        feats = model.text_features()
        for task, classes in tasks.items():
            prompts = [f"a photo of a {c.replace('_', ' ')}." for c in classes]
            want = F.normalize(clip.encode_text(tok(prompts)), dim=-1)
            torch.testing.assert_close(feats[task], want, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("combine", ["mean", "concat"])
def test_ctx_init_starts_every_trained_method_from_the_phrase(combine):
    clip, tok = tiny_clip()
    phrase = "a photo of a"
    embedding = clip.token_embedding.weight[torch.tensor(tok.encode(phrase))].detach()
    for method in MODEL_METHODS:
        model = build_method(method, clip, TASKS, TREE, N_CTX, combine, tokenizer=tok, ctx_init=phrase)
        # the first context of every path (concat), or every context (mean)
        starts = {n for t in TASKS for n in model.context_path(t)[:1 if combine == "concat" else None]}
        assert starts, method
        for node in starts:
            torch.testing.assert_close(model.ctx[node].detach(), embedding, rtol=0, atol=0, msg=f"{method} {node}")


def test_parameter_counts():
    clip, tok = tiny_clip()
    want = {
        "zero-shot": 0,
        "coop-per-task": T * N_CTX * WIDTH,
        "coop-shared": N_CTX * WIDTH,
        "two-level": (T + 1) * N_CTX * WIDTH,
        # root, root/0 (animals+vehicles), 3 leaves; + the learned path weights of the
        # default options: 3 for animals and vehicles (root, root/0, leaf), 2 for colors
        "hipro": 5 * N_CTX * WIDTH + 3 + 3 + 2,
    }
    for method, n in want.items():
        model = build_method(method, clip, TASKS, tree=TREE, n_ctx=N_CTX, tokenizer=tok)
        assert model.num_trainable_parameters() == n, method
    shared = build_method("coop-shared", clip, TASKS, n_ctx=N_CTX, tokenizer=tok)
    assert all(shared.context_path(t) == ["root"] for t in TASKS)
    per_task = build_method("coop-per-task", clip, TASKS, n_ctx=N_CTX, tokenizer=tok)
    assert all(per_task.context_path(t) == [f"task/{t}"] for t in TASKS)
    with pytest.raises(ValueError, match="unknown method 'coop'"):
        build_method("coop", clip, TASKS, tokenizer=tok)
    plain = build_method("hipro", clip, TASKS, tree=TREE, n_ctx=N_CTX, tokenizer=tok, path_weights="uniform")
    assert plain.num_trainable_parameters() == 5 * N_CTX * WIDTH and not plain.path_logits
    concat = build_method("hipro", clip, TASKS, tree=TREE, n_ctx=N_CTX, tokenizer=tok, combine="concat")
    assert concat.path_weights == "uniform"     # the default options only apply to combine="mean"


class _Clock:
    """Stands in for baselines' `time` module: perf_counter advances 1.5 s per call,
    so a (start, stop) pair around one training run reads exactly 1.5 s."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self):
        self.now += 1.5
        return self.now


def test_compare_table(monkeypatch):
    from hipro_fast.method import baselines

    clip, tok = tiny_clip()
    train, val, test = toy_data(seed=1), toy_data(seed=2, noise=1.0), toy_data(seed=3, noise=1.0)
    cfg = TrainConfig(epochs=2, optimizer="adamw", batch_size=4, steps_per_epoch=2, lr=0.05)
    monkeypatch.setattr(baselines, "time", _Clock())
    table = compare(clip, TASKS, train, test, val=val, seeds=(1, 2), tree=TREE, n_ctx=N_CTX,
                    train_config=cfg, tokenizer=tok)
    assert isinstance(table, ComparisonTable)
    assert list(table.results) == list(METHODS)
    params = {m: r.params for m, r in table.results.items()}
    assert params == {"zero-shot": 0, "coop-per-task": T * N_CTX * WIDTH, "coop-shared": N_CTX * WIDTH,
                      "two-level": (T + 1) * N_CTX * WIDTH, "hipro": 5 * N_CTX * WIDTH + 8,  # + path weights
                      COOP_BEST_OF: 3 * T * N_CTX * WIDTH}  # its 3 trained models
    for m, r in table.results.items():
        assert set(r.task_acc) == set(TASKS)
        assert r.mean == pytest.approx(sum(r.seed_means) / len(r.seed_means))
        assert r.mean == pytest.approx(sum(r.task_acc.values()) / T)
        assert r.std == pytest.approx(statistics.stdev(r.seed_means) if len(r.seed_means) > 1 else 0.0)
        assert 0 <= r.mean <= 1
        assert len(r.seed_means) == (1 if m == "zero-shot" else 2)
    zs = evaluate(build_method("zero-shot", clip, TASKS, tokenizer=tok), test)
    assert table["zero-shot"].task_acc == pytest.approx(zs)
    # zero-shot is not trained; every trained run is timed once around its fit (fake clock: 1.5 s)
    assert table["zero-shot"].train_seconds == 0
    assert all(r.train_seconds == 1.5 for m, r in table.results.items() if m not in ("zero-shot", COOP_BEST_OF))
    assert table[COOP_BEST_OF].train_seconds == 4.5  # the three runs it chose among
    # the table's numbers are evaluate()'s numbers for the model compare trained (same seed, same config)
    model = build_method("hipro", clip, TASKS, TREE, N_CTX, seed=2, tokenizer=tok)
    fit(model, train, val, cfg, seed=2)
    acc = evaluate(model, test)
    assert table["hipro"].seed_means[1] == pytest.approx(sum(acc.values()) / T)
    md = table.to_markdown()
    assert str(table) == md
    for m in METHODS:
        assert f"| {m} |" in md
    assert "| method | animals | vehicles | colors | mean | std | params | train s |" in md
    d = json.loads(json.dumps(table.to_dict()))
    assert set(d["methods"]) == set(METHODS) and d["tree"] == TREE


def test_compare_seed_reproducible_and_errors():
    clip, tok = tiny_clip()
    train, test = toy_data(seed=1), toy_data(seed=3)
    cfg = TrainConfig(epochs=1, optimizer="adamw", batch_size=4, steps_per_epoch=1, lr=0.05)
    a = compare(clip, TASKS, train, test, methods=["coop-shared"], seeds=(5,), train_config=cfg, tokenizer=tok,
                n_ctx=N_CTX)
    b = compare(clip, TASKS, train, test, methods=["coop-shared"], seeds=(5,), train_config=cfg, tokenizer=tok,
                n_ctx=N_CTX)
    assert a["coop-shared"].task_acc == b["coop-shared"].task_acc
    with pytest.raises(ValueError, match="unknown method 'zeroshot'"):
        compare(clip, TASKS, train, test, methods=["zeroshot"], tokenizer=tok)


def test_coop_best_of_chooses_per_task_among_coop_restarts():
    """coop-best-of-3: restart 0 is the coop-per-task run itself, restarts 1 and 2
    start from other initialisations (functions of the seed alone), and each
    task takes the restart of lowest validation loss, recomputed here from
    models trained outside compare()."""
    from hipro_fast.method.baselines import restart_seed

    clip, tok = tiny_clip()
    train, val, test = toy_data(seed=1), toy_data(seed=2, noise=1.0), toy_data(seed=3, noise=1.0)
    cfg = TrainConfig(epochs=2, optimizer="adamw", batch_size=4, steps_per_epoch=2, lr=0.05)
    table = compare(clip, TASKS, train, test, val=val, methods=["coop-per-task", COOP_BEST_OF], seeds=(4,),
                    n_ctx=N_CTX, train_config=cfg, tokenizer=tok)
    seeds = [restart_seed(4, r) for r in range(3)]
    assert seeds[0] == 4 and len(set(seeds)) == 3 and restart_seed(5, 1) != seeds[1]
    want_test, want_choice = {}, {}
    runs = []
    for r, seed in enumerate(seeds):
        model = build_method("coop-per-task", clip, TASKS, n_ctx=N_CTX, seed=seed, tokenizer=tok)
        fit(model, train, val, cfg, seed=seed)
        runs.append((evaluate(model, val, metric="loss"), evaluate(model, test)))
    assert table["coop-per-task"].task_acc == pytest.approx(runs[0][1])  # restart 0 is the plain run
    names = ["coop-per-task", "coop-per-task-restart1", "coop-per-task-restart2"]
    for t in TASKS:
        best = min(range(3), key=lambda r: (runs[r][0][t], r))
        want_choice[t], want_test[t] = names[best], runs[best][1][t]
    assert table[COOP_BEST_OF].choices == [want_choice]
    assert table[COOP_BEST_OF].task_acc == pytest.approx(want_test)
    assert len({tuple(sorted(r[0].items())) for r in runs}) == 3  # three different models
    with pytest.raises(ValueError, match=f"{COOP_BEST_OF}' chooses on the validation split: pass val="):
        compare(clip, TASKS, train, test, methods=[COOP_BEST_OF], seeds=(4,), tokenizer=tok)
    with pytest.raises(ValueError, match="a choice among coop-per-task models, not one model"):
        build_method(COOP_BEST_OF, clip, TASKS, tokenizer=tok)
    # without a validation split the default methods leave it out (and still run)
    no_val = compare(clip, TASKS, train, test, seeds=(4,), tree=TREE, n_ctx=N_CTX, train_config=cfg, tokenizer=tok)
    assert list(no_val.results) == list(MODEL_METHODS)


def test_compare_builds_hipro_tree_from_affinity(monkeypatch):
    """tree=None: task_affinity(clip, tasks, train, **kw) -> TaskTree.from_affinity(matrix, names, **tree_kw)."""
    from hipro_fast.method import baselines
    from hipro_fast.method.tree import TaskTree

    clip, tok = tiny_clip()
    seen = {}

    def task_affinity(clip_, tasks, train, **kw):
        seen["affinity"] = (list(tasks), sorted(train), kw)
        return torch.eye(len(tasks))

    def from_affinity(matrix, names, **kw):
        seen["tree"] = (tuple(matrix.shape), list(names), kw)
        return TaskTree.from_nested(TREE)

    monkeypatch.setattr(baselines, "task_affinity", task_affinity)
    monkeypatch.setattr(TaskTree, "from_affinity", staticmethod(from_affinity))
    train, test = toy_data(seed=1), toy_data(seed=3)
    cfg = TrainConfig(epochs=1, optimizer="adamw", batch_size=4, steps_per_epoch=1)
    table = compare(clip, TASKS, train, test, methods=["hipro"], seeds=(1,), n_ctx=N_CTX, train_config=cfg,
                    affinity_config={"method": "text", "levels": 2}, tokenizer=tok)
    # the tokenizer reaches the affinity too (before: "pass tokenizer=" for the bare model it was passed with)
    assert seen["affinity"] == (list(TASKS), sorted(TASKS), {"method": "text", "tokenizer": tok})
    assert seen["tree"] == ((T, T), list(TASKS), {"levels": 2})
    assert table.tree == TREE and table["hipro"].params == 5 * N_CTX * WIDTH + 8  # + path weights


def test_select_per_task_takes_each_tasks_best_candidate_on_validation():
    """select="per-task": for each task, the candidate (its tree, two-level, CoOp
    per task) with the best validation accuracy, ties in that order; its test
    accuracy is that candidate's own."""
    clip, tok = tiny_clip()
    train, val, test = toy_data(seed=1), toy_data(seed=2), toy_data(seed=3)
    cfg = TrainConfig(epochs=2, optimizer="adamw", batch_size=4, steps_per_epoch=2, lr=0.05, min_steps=0)
    table = compare(clip, TASKS, train, test, val=val, methods=["coop-per-task", "hipro"], seeds=(4,), tree=TREE,
                    n_ctx=N_CTX, train_config=cfg, tokenizer=tok, select="per-task", select_by="accuracy")
    assert set(table.results) == {"coop-per-task", "hipro"}      # two-level trained, not reported
    (choice,) = table["hipro"].choices
    candidates, val_losses = {}, {}
    for method in ("hipro", "two-level", "coop-per-task"):
        model = build_method(method, clip, TASKS, TREE, N_CTX, seed=4, tokenizer=tok)
        fit(model, train, val, cfg, seed=4)
        candidates[method] = (evaluate(model, val), evaluate(model, test))
        val_losses[method] = evaluate(model, val, metric="loss")
    for task in TASKS:
        order = ["hipro", "two-level", "coop-per-task"]
        best = max(order, key=lambda m: (candidates[m][0][task], -order.index(m)))
        assert choice[task] == best
        assert table["hipro"].task_acc[task] == pytest.approx(candidates[best][1][task])
    assert table["coop-per-task"].task_acc == pytest.approx(candidates["coop-per-task"][1])
    with pytest.raises(ValueError, match="chooses on the validation split: pass val="):
        compare(clip, TASKS, train, test, methods=["hipro"], tree=TREE, tokenizer=tok, select="per-task")
    with pytest.raises(ValueError, match="select must be one of"):
        compare(clip, TASKS, train, test, val=val, methods=["hipro"], tree=TREE, tokenizer=tok, select="best")
    # what selection chose from is recorded: every candidate's validation accuracy and loss and test accuracy
    (recorded,) = table["hipro"].candidates
    for method, (val_acc, test_acc) in candidates.items():
        assert recorded[method]["val"] == pytest.approx(val_acc)
        assert recorded[method]["test"] == pytest.approx(test_acc)
        assert recorded[method]["val_loss"] == pytest.approx(val_losses[method])  # what select_by="loss" reads
    assert choose_per_task(recorded, "accuracy") == choice


def test_choose_per_task_criteria_and_ties():
    """accuracy: ties go to the earlier candidate; accuracy-then-loss: ties go to
    the lower validation loss; loss: the lower loss whatever the accuracy."""
    scores = {"hipro": {"val": {"a": 0.5, "b": 0.9}, "val_loss": {"a": 1.2, "b": 0.9}},
              "two-level": {"val": {"a": 0.5, "b": 0.8}, "val_loss": {"a": 0.7, "b": 0.4}},
              "coop-per-task": {"val": {"a": 0.4, "b": 0.9}, "val_loss": {"a": 0.6, "b": 0.8}}}
    assert choose_per_task(scores, "accuracy") == {"a": "hipro", "b": "hipro"}
    assert choose_per_task(scores, "accuracy-then-loss") == {"a": "two-level", "b": "coop-per-task"}
    assert choose_per_task(scores, "loss") == {"a": "coop-per-task", "b": "two-level"}
    equal = {m: {"val": {"a": 0.5}, "val_loss": {"a": 1.0}} for m in scores}
    assert all(choose_per_task(equal, by) == {"a": "hipro"} for by in SELECT_CRITERIA)
    with pytest.raises(ValueError, match="select_by must be one of"):
        choose_per_task(scores, "f1")


def test_compare_select_by_loss_takes_the_lowest_validation_loss():
    """select_by="loss" (the default) in compare(): each task's candidate is the
    one whose recorded validation loss is lowest, and its test accuracy is reported."""
    assert DEFAULT_SELECT_BY == "loss"
    clip, tok = tiny_clip()
    train, val, test = toy_data(seed=1), toy_data(seed=2), toy_data(seed=3)
    cfg = TrainConfig(epochs=2, optimizer="adamw", batch_size=4, steps_per_epoch=2, lr=0.05, min_steps=0)
    table = compare(clip, TASKS, train, test, val=val, methods=["hipro"], seeds=(4,), tree=TREE,
                    n_ctx=N_CTX, train_config=cfg, tokenizer=tok, select="per-task", select_by="loss")
    (choice,), (recorded,) = table["hipro"].choices, table["hipro"].candidates
    for task in TASKS:
        losses = {m: recorded[m]["val_loss"][task] for m in recorded}
        assert recorded[choice[task]]["val_loss"][task] == min(losses.values())
        assert table["hipro"].task_acc[task] == recorded[choice[task]]["test"][task]
    with pytest.raises(ValueError, match="select_by must be one of"):
        compare(clip, TASKS, train, test, val=val, methods=["hipro"], tree=TREE, tokenizer=tok,
                select="per-task", select_by="f1")


def test_bad_compare_and_protocol_arguments_are_found_before_training(monkeypatch):
    """A bad test set was found after every model of the first method trained;
    repeated seeds (or shots) faked a spread; 2.5 shots ran 2."""
    from hipro_fast.method import baselines
    from hipro_fast.method.protocol import run_protocol
    from hipro_fast.errors import FewShotError, InvalidInputError, TaskSpecError

    clip, tok = tiny_clip()
    trained = []
    monkeypatch.setattr(baselines, "fit", lambda *a, **k: trained.append(1))
    train, test = toy_data(seed=1), toy_data(seed=3)
    bad = {**test, "colors": (test["colors"][0], test["colors"][1] + 5)}
    cfg = TrainConfig(epochs=1, optimizer="adamw", batch_size=4, steps_per_epoch=1)
    with pytest.raises(TaskSpecError, match=r"task 'colors': test label 7"):
        compare(clip, TASKS, train, bad, methods=["coop-per-task", "hipro"], tree=TREE, seeds=(1,), n_ctx=N_CTX,
                train_config=cfg, tokenizer=tok)
    assert not trained
    with pytest.raises(InvalidInputError, match=r"seed 1 is repeated in seeds \[1, 1\]"):
        compare(clip, TASKS, train, test, methods=["coop-per-task"], seeds=(1, 1), tokenizer=tok)
    with pytest.raises(TypeError, match="seeds must be a list of whole numbers, got 3"):
        compare(clip, TASKS, train, test, methods=["coop-per-task"], seeds=3, tokenizer=tok)
    pool = few_shot_pool()
    for kw, says in ((dict(seeds=(0, 0)), "seed 0 is repeated"), (dict(shots=(2.5,)), "whole numbers, got \\(2.5,\\)"),
                     (dict(shots=(1, 1)), "a shot count is repeated")):
        with pytest.raises((InvalidInputError, FewShotError), match=says):
            run_protocol(clip, TASKS, pool, test, methods=["coop-per-task"], tokenizer=tok, **{"shots": (1,), **kw})
    with pytest.raises(TaskSpecError, match=r"task 'colors': test label 7"):
        run_protocol(clip, TASKS, pool, bad, shots=(1,), seeds=(0,), methods=["coop-per-task"], tokenizer=tok)
    assert not trained
