"""CoOp's few-shot protocol: per-seed draws, disjoint validation, the grid."""
import pytest
import torch

from hipro_fast.errors import FewShotError
from hipro_fast.method.protocol import check_shot_counts, draw_few_shot, run_protocol, val_shots_for
from hipro_fast.method.training import TrainConfig
from tests.helpers_training import TASKS, few_shot_pool as _pool, tiny_clip, toy_data


def test_val_shots_rule():
    assert [val_shots_for(k) for k in (1, 2, 4, 8, 16)] == [1, 2, 4, 4, 4]


@pytest.mark.parametrize("shots", [1, 2, 4, 8])
def test_draw_sizes_disjoint_splits_and_per_seed_draws(shots):
    pool = _pool()
    a, b = draw_few_shot(TASKS, pool, shots, seed=0), draw_few_shot(TASKS, pool, shots, seed=1)
    again = draw_few_shot(TASKS, pool, shots, seed=0)
    differs = False
    for t, classes in TASKS.items():
        tr, va = a.indices[t]
        assert not set(tr.tolist()) & set(va.tolist())                       # val never overlaps train
        y = pool[t][1]
        assert torch.bincount(y[tr], minlength=len(classes)).tolist() == [shots] * len(classes)
        assert torch.bincount(y[va], minlength=len(classes)).tolist() == [val_shots_for(shots)] * len(classes)
        torch.testing.assert_close(a.train[t][0], pool[t][0][tr])
        assert torch.equal(again.indices[t][0], tr) and torch.equal(again.indices[t][1], va)   # reproducible
        differs |= not torch.equal(b.indices[t][0], tr)
    assert differs                                                            # each seed its own draw


def test_a_class_too_small_is_named():
    pool = _pool(per_class=5)
    x, y = pool["colors"]
    keep = ~((y == 1) & (torch.arange(y.numel()) % 5 >= 3))   # class 1 of "colors" keeps 3 images
    pool["colors"] = (x[keep], y[keep])
    name = TASKS["colors"][1]
    with pytest.raises(FewShotError, match=rf"task 'colors', class '{name}': 3 training images, but 2 shots "
                                           r"\+ 2 validation shots need 4"):
        draw_few_shot(TASKS, pool, 2, seed=0)
    assert draw_few_shot(TASKS, pool, 1, seed=0).shots == 1
    with pytest.raises(FewShotError, match="shots must be an integer >= 1"):
        draw_few_shot(TASKS, pool, 0, seed=0)
    # the CLI's check from the spec's counts, before anything is encoded, says the same
    counts = torch.bincount(pool["colors"][1], minlength=len(TASKS["colors"])).tolist()
    with pytest.raises(FewShotError) as from_counts:
        check_shot_counts("colors", TASKS["colors"], counts, None, 2)
    with pytest.raises(FewShotError) as from_draw:
        draw_few_shot(TASKS, pool, 2, seed=0)
    assert str(from_counts.value) == str(from_draw.value)
    check_shot_counts("colors", TASKS["colors"], counts, None, 1)  # 1 + 1 fits in 3
    with pytest.raises(FewShotError, match="2 validation images, but 4 shots need 4 validation shots"):
        check_shot_counts("colors", TASKS["colors"], [9] * 3, [5, 2, 5], 4)


def test_protocol_runs_the_grid_and_summarises_it():
    clip, tok = tiny_clip()
    pool, test = _pool(per_class=10), toy_data(seed=5)
    cfg = TrainConfig(epochs=2, steps_per_epoch=2, optimizer="adamw", batch_size=4, lr=0.05)
    seen = []
    res = run_protocol((clip, tok), TASKS, pool, test, shots=(1, 2), seeds=(0, 1),
                       methods=["zero-shot", "coop-per-task", "hipro"], tree=list(TASKS), n_ctx=2,
                       train_config=cfg, on_run=lambda k, s, t: seen.append((k, s)))
    assert seen == [(1, 0), (1, 1), (2, 0), (2, 1)]
    for k in (1, 2):
        means = res.seed_means("coop-per-task", k)
        assert len(means) == 2
        m, std = res.mean_std("coop-per-task", k)
        assert m == pytest.approx(sum(means) / 2) and std == pytest.approx(abs(means[0] - means[1]) / 2 ** 0.5)
        margin, best = res.margin_over_best_baseline(k)
        assert margin == pytest.approx(res.mean_std("hipro", k)[0] - res.mean_std(best, k)[0])
    md = res.summary_markdown()
    assert "hipro − best baseline" in md and "±" in md and "1 shot " in md
    one = run_protocol((clip, tok), TASKS, pool, test, shots=(1,), seeds=(3,), methods=["coop-per-task"],
                       n_ctx=2, train_config=cfg)
    assert "±" not in one.summary_markdown() and "no spread" in one.summary_markdown()
    assert one.mean_std("coop-per-task", 1)[1] is None


def test_protocol_selects_per_task_by_default_and_select_none_keeps_the_tree():
    """run_protocol's default (DEFAULT_PROTOCOL_SELECT, chosen by the ablation)
    gives "hipro" each task's best candidate on the draw's validation split;
    select=None scores HiPro's own tree. The choices are recorded per task."""
    clip, tok = tiny_clip()
    pool, test = _pool(per_class=10), toy_data(seed=5)
    cfg = TrainConfig(epochs=2, steps_per_epoch=2, optimizer="adamw", batch_size=4, lr=0.05)
    kw = dict(shots=(2,), seeds=(0,), methods=["coop-per-task", "two-level", "hipro"], tree=list(TASKS), n_ctx=2,
              train_config=cfg)
    chosen = run_protocol((clip, tok), TASKS, pool, test, **kw)
    plain = run_protocol((clip, tok), TASKS, pool, test, select=None, **kw)
    assert chosen.select == "per-task" and plain.select is None
    assert "task by task" in chosen.summary_markdown() and "task by task" not in plain.summary_markdown()
    table, own = chosen.runs[(2, 0)], plain.runs[(2, 0)]
    picks = table["hipro"].choices[0]
    assert set(picks) == set(TASKS)
    for task, method in picks.items():
        source = own["hipro"] if method == "hipro" else own[method]
        assert table["hipro"].task_acc[task] == pytest.approx(source.task_acc[task])
    # comparison.json (ProtocolResult.to_dict) names each task's choice per draw
    assert chosen.to_dict()["results"]["2"]["choices"] == {"0": picks}
    assert "choices" not in plain.to_dict()["results"]["2"]


def test_each_draws_selection_is_on_disk_only_beside_the_candidates_it_chose_among(tmp_path):
    """With checkpoints, a draw's folder holds selection.json naming its candidate
    folders and the picks compare made; a later run in the same folder without
    selection removes it (it would pair the old choice with retrained models)."""
    from hipro_fast.method.selection import SELECTION_FILE, load_selection

    clip, tok = tiny_clip()
    pool, test = _pool(per_class=10), toy_data(seed=5)
    cfg = TrainConfig(epochs=2, steps_per_epoch=2, optimizer="adamw", batch_size=4, lr=0.05, min_steps=0,
                      checkpoint_dir=str(tmp_path))
    kw = dict(shots=(2,), seeds=(0,), methods=["hipro"], tree=list(TASKS), n_ctx=2, train_config=cfg)
    chosen = run_protocol((clip, tok), TASKS, pool, test, **kw)
    saved = load_selection(tmp_path / "shots2-seed0")
    assert saved.candidates == ["hipro-seed0", "two-level-seed0", "coop-per-task-seed0"]
    assert saved.choices == {t: f"{m}-seed0" for t, m in chosen.runs[(2, 0)]["hipro"].choices[0].items()}
    assert all((tmp_path / "shots2-seed0" / c).is_dir() for c in saved.candidates)
    run_protocol((clip, tok), TASKS, pool, test, select=None, **kw)
    assert not (tmp_path / "shots2-seed0" / SELECTION_FILE).exists()


def test_protocol_reports_the_best_of_3_control_as_a_baseline():
    """coop-best-of-3 is a baseline of the "hipro − best baseline" row, its
    per-task picks are in comparison.json, and the summary says what it is."""
    from hipro_fast.method.baselines import COOP_BEST_OF

    clip, tok = tiny_clip()
    pool, test = _pool(per_class=10), toy_data(seed=5)
    cfg = TrainConfig(epochs=2, steps_per_epoch=2, optimizer="adamw", batch_size=4, lr=0.05)
    res = run_protocol((clip, tok), TASKS, pool, test, shots=(2,), seeds=(0,),
                       methods=["coop-per-task", "hipro", COOP_BEST_OF], tree=list(TASKS), n_ctx=2, train_config=cfg)
    picks = res.runs[(2, 0)][COOP_BEST_OF].choices[0]
    assert set(picks) == set(TASKS) and set(picks.values()) <= {
        "coop-per-task", "coop-per-task-restart1", "coop-per-task-restart2"}
    assert res.to_dict()["results"]["2"][f"{COOP_BEST_OF} choices"] == {"0": picks}
    margin, best = res.margin_over_best_baseline(2)
    means = {m: res.mean_std(m, 2)[0] for m in ("coop-per-task", COOP_BEST_OF)}
    assert best == max(means, key=means.get) and margin == pytest.approx(res.mean_std("hipro", 2)[0] - means[best])
    assert f"{COOP_BEST_OF} takes, task by task, the best of 3" in res.summary_markdown()


def test_a_task_without_test_images_is_left_out_of_every_table():
    """A spec's split can leave a task no test image: the CLI warns that it is
    not in the mean, and then the per-task tables raised a KeyError, losing the
    whole grid's results."""
    clip, tok = tiny_clip()
    pool, test = _pool(per_class=10), toy_data(seed=5)
    missing = next(iter(TASKS))
    test = {t: d for t, d in test.items() if t != missing}
    cfg = TrainConfig(epochs=2, steps_per_epoch=1, optimizer="adamw", batch_size=4, lr=0.05)
    res = run_protocol((clip, tok), TASKS, pool, test, shots=(1,), seeds=(0,),
                       methods=["zero-shot", "coop-per-task"], n_ctx=2, train_config=cfg)
    acc = res.task_mean("coop-per-task", 1)
    assert set(acc) == set(TASKS) - {missing}
    assert res.seed_means("coop-per-task", 1) == [pytest.approx(sum(acc.values()) / len(acc))]
    row = next(line for line in res.shot_table_markdown(1).splitlines() if line.startswith("| coop-per-task"))
    assert row.split(" | ")[1 + list(TASKS).index(missing)] == "–"
    assert res.to_dict()["results"]["1"]["coop-per-task"]["task_acc"] == acc
    assert "coop-per-task" in res.summary_markdown()
    assert "–" in res.runs[(1, 0)].to_markdown() or missing not in res.runs[(1, 0)].tasks
