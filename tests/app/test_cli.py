"""End to end through the `hipro` CLI on tiny generated image folders and a tiny
random open_clip model (registered from a config JSON with --model-config).

The older cases call `main()` in this process; the cases of issue 12 (resume,
protected run directories, inputs that used to pass silently) run the real
`hipro` command in a subprocess (`_hipro`)."""
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hipro_fast.cli import main

TINY_CONFIG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 16, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
TASKS = {"shapes": ["red", "green"], "texture": ["dots", "stripes", "plain"], "scenes": ["day", "night"]}


def _png(path: Path, seed: int, size: int = 16) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray((rng.random((size, size, 3)) * 255).astype("uint8")).save(path)


def _make_data(root: Path, per_class: int = 6) -> Path:
    lines = []
    for t, classes in TASKS.items():
        for c in classes:
            for i in range(per_class):
                _png(root / "data" / t / c / f"{i}.png", seed=zlib.crc32(f"{t}/{c}/{i}".encode()))
        lines += ["[[task]]", f'name = "{t}"', f'images = "data/{t}"', "split = {val = 0.2, test = 0.34, seed = 0}", ""]
    spec = root / "tasks.toml"
    spec.write_text("\n".join(lines))
    return spec


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    cfg = root / "hipro-cli-test.json"
    cfg.write_text(json.dumps(TINY_CONFIG))
    spec = _make_data(root)
    return {"root": root, "spec": spec, "config": cfg, "cache": root / "cache"}


def _cli_args(world, argv, run_dir=None, spec=True, cache=None) -> list[str]:
    args = list(argv)
    if spec and "--spec" not in args:
        args += ["--spec", str(world["spec"])]
    args += ["--model-config", str(world["config"]), "--no-progress"]
    if args[0] in ("train", "compare") and "--min-steps" not in args:
        args += ["--min-steps", "200"]  # the tests check plumbing: 200 steps, not the default 1,600
    if "--cache-dir" not in args and args[0] != "export":
        args += ["--cache-dir", str(cache or world["cache"])]
    if run_dir is not None:
        args += ["--run-dir", str(run_dir)]
    return args


def _run(world, *argv, run_dir=None, spec=True, cache=None):
    return main(_cli_args(world, argv, run_dir, spec, cache))


def _events(run_dir: Path, event: str) -> list[dict]:
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in recs if r["event"] == event]


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.startswith("hipro: error:")]
    assert len(lines) == 1, err
    return lines[0]


# ------------------------------------------------------------------ cache
def test_cache_reuse_stale_and_corrupt(world, tmp_path, capsys):
    cache = tmp_path / "cache"
    assert _run(world, "cache", "--shots", "2", run_dir=tmp_path / "r1", cache=cache) == 0
    first = _events(tmp_path / "r1", "cache")
    assert len(first) == 9 and {r["status"] for r in first} == {"built"}
    assert json.loads((tmp_path / "r1" / "config.json").read_text())["shots"] == 2
    assert (tmp_path / "r1" / "report.md").exists()

    assert _run(world, "cache", "--shots", "2", run_dir=tmp_path / "r2", cache=cache) == 0
    assert {r["status"] for r in _events(tmp_path / "r2", "cache")} == {"hit"}

    # change one test image of "scenes": exactly that set is rebuilt
    test_file = next(r["file"] for r in first if r["task"] == "scenes" and r["split"] == "test")
    from safetensors import safe_open

    with safe_open(test_file, "pt") as f:
        kept = f.get_tensor("kept").tolist()
    from hipro_fast.data.tasks_spec import load_spec

    victim = load_spec(world["spec"]).tasks["scenes"].splits["test"][kept[0]].path
    backup = Path(victim).read_bytes()
    try:
        _png(Path(victim), seed=12345, size=18)
        capsys.readouterr()
        assert _run(world, "cache", "--shots", "2", run_dir=tmp_path / "r3", cache=cache) == 0
        assert "stale feature cache" in capsys.readouterr().err
        status = {(r["task"], r["split"]): r["status"] for r in _events(tmp_path / "r3", "cache")}
        assert status.pop(("scenes", "test")) == "stale"
        assert set(status.values()) == {"hit"}
    finally:
        Path(victim).write_bytes(backup)

    # corrupt a cache file: detected, rebuilt, never used
    train_file = Path(next(r["file"] for r in first if r["task"] == "shapes" and r["split"] == "train"))
    data = bytearray(train_file.read_bytes())
    data[-3] ^= 0x55
    train_file.write_bytes(bytes(data))
    capsys.readouterr()
    assert _run(world, "cache", "--shots", "2", run_dir=tmp_path / "r4", cache=cache) == 0
    assert "corrupt feature cache" in capsys.readouterr().err
    status = {(r["task"], r["split"]): r["status"] for r in _events(tmp_path / "r4", "cache")}
    assert status[("shapes", "train")] == "corrupt"


def test_default_run_dir(world, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert _run(world, "cache", "--shots", "1") == 0
    runs = list((tmp_path / "runs").iterdir())
    assert len(runs) == 1 and runs[0].name.endswith("-cache")
    cfg = json.loads((runs[0] / "config.json").read_text())
    assert cfg["command"] == "cache" and cfg["shots"] == 1
    # one cache event per (task, split) of the spec: 3 tasks x train/val/test
    events = _events(runs[0], "cache")
    assert sorted((r["task"], r["split"]) for r in events) == sorted((t, s) for t in TASKS
                                                                     for s in ("train", "val", "test"))
    assert all(r["images"] == len(TASKS[r["task"]]) for r in events if r["split"] == "train")  # 1 shot per class


# ------------------------------------------------------------------ bad input
def _bad_world(tmp_path: Path, case: str) -> tuple[Path, str, str]:
    root = tmp_path / "w"
    for c in ("a", "b"):
        for i in range(3):
            _png(root / "d" / c / f"{i}.png", seed=i + (10 if c == "b" else 0))
    base = '[[task]]\nname = "t"\nimages = "d"\nsplit = {test = 0.34}\n'
    if case == "missing directory":
        return root, base.replace('"d"', '"missing_dir"'), "missing_dir"
    if case == "empty class folder":
        (root / "d" / "c").mkdir()
        return root, base, str(root / "d" / "c")
    if case == "csv unknown label":
        (root / "labels.csv").write_text("path,label\nd/a/0.png,a\nd/b/0.png,b\nd/b/1.png,zebra\n")
        return root, base.replace('images = "d"', 'csv = "labels.csv"') + 'classes = ["a", "b"]\n', \
            "labels.csv:4"
    if case == "duplicate task":
        return root, base + "\n" + base, "'t' twice"
    if case == "undecodable image":  # in the test split, which is its own folder
        for c in ("a", "b"):
            for i in range(3):
                _png(root / "t" / c / f"{i}.png", seed=i + (30 if c == "b" else 20))
        (root / "t" / "b" / "2.png").write_bytes(b"this is not a png")
        return root, base.replace("split = {test = 0.34}", 'train = "d"\ntest = "t"').replace(
            'images = "d"\n', ""), str(root / "t" / "b" / "2.png")
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["missing directory", "empty class folder", "csv unknown label", "duplicate task",
                                  "undecodable image"])
def test_bad_input_exits_nonzero_with_one_line(world, tmp_path, capsys, case):
    root, text, culprit = _bad_world(tmp_path, case)
    spec = root / "tasks.toml"
    spec.write_text(text)
    capsys.readouterr()
    rc = _run(world, "cache", "--spec", str(spec), "--shots", "1", run_dir=tmp_path / "run",
              cache=tmp_path / "cache")
    assert rc != 0
    line = _one_error_line(capsys)
    assert culprit in line, line


def test_skip_bad_images_counts_instead(world, tmp_path, capsys):
    root, text, culprit = _bad_world(tmp_path, "undecodable image")
    spec = root / "tasks.toml"
    spec.write_text(text)
    rc = _run(world, "cache", "--spec", str(spec), "--shots", "0", "--skip-bad-images", run_dir=tmp_path / "run",
              cache=tmp_path / "cache")
    assert rc == 0
    assert "skipped 1 bad images" in capsys.readouterr().out  # the test split's
    recs = _events(tmp_path / "run", "cache")
    assert {r["split"]: r["skipped"] for r in recs} == {"train": 0, "test": 1}
    assert {r["split"]: r["images"] for r in recs} == {"train": 6, "test": 5}


@pytest.mark.parametrize("argv,needle", [
    (["cache", "--spec", "/nonexistent/tasks.toml"], "spec file not found"),
    (["eval", "--checkpoint", "/nonexistent/ckpt"], "checkpoint not found"),
    (["train", "--tree", '[["shapes", "texture"], "scenes", "nope"]', "--epochs", "1"], "'nope'"),
])
def test_other_failures_are_one_line(world, tmp_path, capsys, argv, needle):
    assert _run(world, *argv, run_dir=tmp_path / "run") != 0
    assert needle in _one_error_line(capsys)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_request_without_cuda(world, tmp_path, capsys):
    assert _run(world, "cache", "--device", "cuda", run_dir=tmp_path / "run") != 0
    assert "CUDA is not available" in _one_error_line(capsys)


# ------------------------------------------------------------------ train / eval / export / compare
def test_train_eval_export(world, tmp_path, capsys):
    common = ["--shots", "2", "--epochs", "2", "--n-ctx", "2"]
    train_dir = tmp_path / "train"
    assert _run(world, "train", "--tree", '[["shapes", "texture"], "scenes"]', *common, "--optimizer", "adamw",
                "--train-batch-size", "full", run_dir=train_dir) == 0
    for name in ("config.json", "metrics.jsonl", "report.md", "tree.json", "dendrogram.png", "accuracy.png",
                 "training.png", "test_accuracy.json", "checkpoints/best.json", "checkpoints/last.json"):
        assert (train_dir / name).exists(), name
    acc = json.loads((train_dir / "test_accuracy.json").read_text())
    assert set(acc) == set(TASKS) and all(0 <= v <= 1 for v in acc.values())
    assert len(_events(train_dir, "train_epoch")) == 2
    saved = json.loads((train_dir / "checkpoints" / "last.json").read_text())["train_config"]
    assert (saved["optimizer"], saved["batch_size"]) == ("adamw", "full")  # the flags reach TrainConfig
    report = (train_dir / "report.md").read_text()
    assert "accuracy.png" in report and "dendrogram.png" in report

    eval_dir = tmp_path / "eval"
    assert _run(world, "eval", "--checkpoint", str(train_dir / "checkpoints"), "--shots", "2",
                run_dir=eval_dir) == 0
    assert json.loads((eval_dir / "test_accuracy.json").read_text()) == pytest.approx(acc)

    out = tmp_path / "clf.safetensors"
    assert _run(world, "export", "--checkpoint", str(train_dir / "checkpoints" / "best.json"), "--out", str(out),
                spec=False, run_dir=tmp_path / "export") == 0
    from hipro_fast.method.export import Classifier

    clf = Classifier.load(out)
    assert list(clf.tasks) == list(TASKS) and clf.class_names("texture") == sorted(TASKS["texture"])
    assert set(clf.clip_info) == {"name", "pretrained", "image_tower"} and len(clf.clip_info["image_tower"]) == 16

    # the checkpoint on another CLIP of the same shape (here: other random weights) is refused in one line
    capsys.readouterr()
    assert _run(world, "export", "--checkpoint", str(train_dir / "checkpoints"), "--out", str(tmp_path / "x.safetensors"),
                "--seed", "5", spec=False, run_dir=tmp_path / "export2") == 1
    assert "trained on another CLIP" in _one_error_line(capsys)

    # a checkpoint from another spec (fewer classes) is refused with one line
    other = tmp_path / "other"
    shutil.copytree(world["root"] / "data", other / "data")
    shutil.rmtree(other / "data" / "texture" / "plain")
    (other / "tasks.toml").write_text(world["spec"].read_text())
    capsys.readouterr()
    assert _run(world, "eval", "--spec", str(other / "tasks.toml"), "--checkpoint", str(train_dir / "checkpoints"),
                "--shots", "2", run_dir=tmp_path / "eval2") != 0
    assert "texture" in _one_error_line(capsys)


def test_train_select_per_task_saves_evaluates_and_exports_the_chosen_candidates(world, tmp_path, capsys):
    """--select per-task: the three candidates each checkpoint into their own
    folder, selection.json records the choice (the one choose_per_task makes
    from the recorded validation scores); eval and export of the checkpoints
    folder use, task by task, the chosen candidate's model; its HiPro candidate
    is the model --select none trains; a resume after an interruption between
    candidates ends where an uninterrupted run does."""
    from hipro_fast.method.baselines import SELECT_CANDIDATES, choose_per_task
    from hipro_fast.method.export import Classifier

    common = ["--tree", '[["shapes", "texture"], "scenes"]', "--shots", "2", "--epochs", "2", "--n-ctx", "2"]
    run = tmp_path / "sel"
    assert _run(world, "train", *common, "--select", "per-task", run_dir=run) == 0
    out = capsys.readouterr().out
    ck = run / "checkpoints"
    record = json.loads((ck / "selection.json").read_text())
    assert record["candidates"] == list(SELECT_CANDIDATES) and record["select_by"] == "loss"
    scores = {c: {"val": record["val"][c], "val_loss": record["val_loss"][c]} for c in SELECT_CANDIDATES}
    assert set(record["choices"]) == set(TASKS) and record["choices"] == choose_per_task(scores, "loss")
    assert record["extra"]["seed"] == 0 and record["extra"]["shots"] == 2
    assert "per-task selection (loss on val): " in out
    for c in SELECT_CANDIDATES:
        assert (ck / c / "best.json").exists() and (run / f"training-{c}.png").exists()
    assert len(_events(run, "train_hipro_epoch")) == 2 and _events(run, "selection")[0]["choices"] == \
        record["choices"]
    assert "Per-task selection (validation cross-entropy)" in (run / "report.md").read_text()
    acc = json.loads((run / "test_accuracy.json").read_text())

    # each candidate alone, and the selection through eval: task by task the chosen candidate's accuracy
    per_candidate = {}
    for c in SELECT_CANDIDATES:
        assert _run(world, "eval", "--checkpoint", str(ck / c), "--shots", "2", run_dir=tmp_path / f"ev-{c}") == 0
        per_candidate[c] = json.loads((tmp_path / f"ev-{c}" / "test_accuracy.json").read_text())
    assert acc == {t: per_candidate[c][t] for t, c in record["choices"].items()}
    assert _run(world, "eval", "--checkpoint", str(ck), "--shots", "2", run_dir=tmp_path / "ev") == 0
    assert json.loads((tmp_path / "ev" / "test_accuracy.json").read_text()) == acc

    # export: each task's weights are its candidate's (exported alone for comparison)
    assert _run(world, "export", "--checkpoint", str(ck / "selection.json"), "--out", str(tmp_path / "sel.safetensors"),
                spec=False, run_dir=tmp_path / "ex") == 0
    clf = Classifier.load(tmp_path / "sel.safetensors")
    assert clf.config["selection"]["choices"] == record["choices"]
    for c in set(record["choices"].values()):
        assert _run(world, "export", "--checkpoint", str(ck / c), "--out", str(tmp_path / f"{c}.safetensors"), spec=False,
                    run_dir=tmp_path / f"ex-{c}") == 0
        alone = Classifier.load(tmp_path / f"{c}.safetensors")
        for t in (t for t, kept in record["choices"].items() if kept == c):
            assert torch.equal(clf.weights[t], alone.weights[t])

    # the HiPro candidate is exactly what --select none trains
    assert _run(world, "train", *common, run_dir=tmp_path / "tree-alone") == 0
    assert _run(world, "eval", "--checkpoint", str(tmp_path / "tree-alone" / "checkpoints"), "--shots", "2",
                "--split", "val", run_dir=tmp_path / "ev-alone") == 0
    assert json.loads((tmp_path / "ev-alone" / "val_accuracy.json").read_text()) == record["val"]["hipro"]

    # interrupted after the first candidate: --resume trains the rest and chooses as before
    (ck / "selection.json").unlink()
    for c in SELECT_CANDIDATES[1:]:
        shutil.rmtree(ck / c)
    first_tensors = {k: v for k, v in _snapshot(ck / "hipro").items() if k.endswith(".safetensors")}
    capsys.readouterr()
    assert _run(world, "eval", "--checkpoint", str(ck), "--shots", "2", run_dir=tmp_path / "ev-unfinished") == 1
    assert "candidate folders of a `hipro train --select per-task` run that did not finish" in \
        _one_error_line(capsys)
    assert _run(world, "train", *common, "--select", "per-task", "--resume", run_dir=run) == 0
    assert {k: v for k, v in _snapshot(ck / "hipro").items() if k.endswith(".safetensors")} == first_tensors
    assert "resumed: hipro after epoch 2, two-level from epoch 1, coop-per-task from epoch 1" in \
        capsys.readouterr().out
    assert json.loads((ck / "selection.json").read_text()) == record
    assert json.loads((run / "test_accuracy.json").read_text()) == acc
    assert [len(_events(run, f"train_{c}_epoch")) for c in SELECT_CANDIDATES] == [2, 2, 2]  # none logged twice

    # candidate folders that are not the selection's are refused by name, before a run directory is made
    broken = tmp_path / "broken"
    shutil.copytree(ck, broken)
    shutil.rmtree(broken / "hipro")
    shutil.copytree(ck / "coop-per-task", broken / "hipro")
    other_seed = tmp_path / "other-seed"
    shutil.copytree(ck, other_seed)
    edited = json.loads((other_seed / "selection.json").read_text())
    (other_seed / "selection.json").write_text(json.dumps({**edited, "extra": {**edited["extra"], "seed": 7}}))
    lost = tmp_path / "lost"
    shutil.copytree(ck, lost)
    shutil.rmtree(lost / "two-level")
    for folder, says in ((broken, f"folder {broken / 'hipro'} holds candidate 'coop-per-task', not 'hipro'"),
                         (other_seed, "candidate 'hipro' (" + str(other_seed / "hipro") + ") was trained with seed "
                                      "0, the selection with 7"),
                         (lost, "candidate 'two-level' has no checkpoint folder")):
        capsys.readouterr()
        assert _run(world, "eval", "--checkpoint", str(folder), "--shots", "2", run_dir=tmp_path / "ev-bad") == 1
        assert says in _one_error_line(capsys)
        assert not (tmp_path / "ev-bad").exists()

    # without a val split in the spec, min(K, 4) training images per class the draw left are held out
    no_val = _world_spec(world, name="noval.toml", replace=("split = {val = 0.2, test = 0.34, seed = 0}",
                                                            "split = {test = 0.34, seed = 0}"))
    assert _run(world, "train", "--spec", str(no_val), *common, "--select", "per-task",
                run_dir=tmp_path / "noval") == 0
    rows = {r["task"]: r for r in json.loads((tmp_path / "noval" / "data.json").read_text())}
    assert all(rows[t]["val"] == 2 * len(TASKS[t]) and rows[t]["train"] == 2 * len(TASKS[t]) for t in TASKS)
    held = json.loads((tmp_path / "noval" / "checkpoints" / "selection.json").read_text())
    assert set(held["val"]["hipro"]) == set(TASKS)
    assert "held out" in capsys.readouterr().out
    # refused before anything is written: --shots 0 leaves nothing to hold out; 3 shots + 3 held out exceed
    # the 4 training images per class
    for shots, says in (("0", "with --shots 0 every training image is drawn: task 'shapes' has no val split"),
                        ("3", "task 'shapes', class 'green': 4 training images, but 3 shots + 3 validation shots "
                              "need 6")):
        assert _run(world, "train", "--spec", str(no_val), *common, "--shots", shots, "--select", "per-task",
                    run_dir=tmp_path / f"noval{shots}") == 1
        assert says in _one_error_line(capsys)
        assert not (tmp_path / f"noval{shots}").exists()


def test_predict_classifies_images_as_eval_scores_them(world, tmp_path, capsys):
    """hipro predict on the test split's images, given as files: the share of
    predictions that match each image's class folder is eval's test accuracy;
    the checkpoint and the classifier exported from it predict alike; bad
    options are refused in one line before a run directory is made."""
    import csv

    from hipro_fast.data.tasks_spec import load_spec

    common = ["--tree", '[["shapes", "texture"], "scenes"]', "--shots", "2", "--epochs", "2", "--n-ctx", "2"]
    train_dir = tmp_path / "train"
    assert _run(world, "train", *common, run_dir=train_dir) == 0
    acc = json.loads((train_dir / "test_accuracy.json").read_text())
    clf = tmp_path / "clf.safetensors"
    assert _run(world, "export", "--checkpoint", str(train_dir / "checkpoints"), "--out", str(clf), spec=False,
                run_dir=tmp_path / "ex") == 0
    spec = load_spec(world["spec"])
    for task in ("texture", "scenes"):
        records = spec.tasks[task].splits["test"]
        truth = {r.path: spec.tasks[task].classes[r.label] for r in records}
        got = {}
        for how in ("--classifier", "--checkpoint"):
            source = str(clf) if how == "--classifier" else str(train_dir / "checkpoints")
            out = tmp_path / f"{task}{how}.csv"
            assert _run(world, "predict", how, source, "--task", task, "--top-k", "2", *truth, "--out", str(out),
                        spec=False, run_dir=tmp_path / f"pr-{task}{how}") == 0
            rows = list(csv.DictReader(out.open()))
            assert [r["path"] for r in rows] == list(truth)
            assert all(float(r["probability"]) >= float(r["probability_2"]) for r in rows)
            got[how] = rows
            hits = sum(r["class"] == truth[r["path"]] for r in rows)
            assert hits / len(rows) == pytest.approx(acc[task], abs=1e-12)
        assert got["--classifier"] == got["--checkpoint"]  # classes and probabilities
    assert _events(tmp_path / "pr-scenes--checkpoint", "predict")[0]["images"] == len(truth)
    # a folder is searched; the default output is in the run directory; an existing --out needs --overwrite
    folder = str(world["root"] / "data" / "texture")
    assert _run(world, "predict", "--classifier", str(clf), "--task", "texture", folder, spec=False,
                run_dir=tmp_path / "pr-folder") == 0
    rows = list(csv.DictReader((tmp_path / "pr-folder" / "predictions.csv").open()))
    assert len(rows) == len(TASKS["texture"]) * 6  # every image of the folder (6 per class)
    assert {Path(r["path"]).parent.name for r in rows} == set(TASKS["texture"])

    # an image linked from outside --run-dir into it: --overwrite would delete it
    inside = tmp_path / "pr-folder" / "kept.png"
    shutil.copy(world["root"] / "data" / "texture" / "dots" / "0.png", inside)
    (tmp_path / "links").mkdir()
    os.symlink(inside, tmp_path / "links" / "x.png")

    inside_cfg = tmp_path / "wide.json"
    inside_cfg.write_text(json.dumps({**TINY_CONFIG, "embed_dim": 24}))
    cases = [(["--classifier", str(clf), folder], "--task: classifier"),
             (["--classifier", str(clf), "--task", "shapes", folder, "--out", str(tmp_path / "texture--classifier.csv")],
              "exists: pass --overwrite to replace it"),
             (["--classifier", str(clf), "--task", "shapes", str(tmp_path / "links"), "--overwrite",
               "--run-dir", str(tmp_path / "pr-folder")], f"--overwrite would delete the image {inside}"),
             (["--classifier", str(clf), "--task", "shapes", str(tmp_path), "--run-dir", str(tmp_path / "inner")],
              f"--run-dir {tmp_path / 'inner'} lies inside the image folder {tmp_path}"),

             (["--classifier", str(clf), "--task", "shapes", "--top-k", "3", folder],
              "--top-k 3: task 'shapes' has 2 classes"),
             (["--checkpoint", str(train_dir / "checkpoints"), "--task", "weather", folder],
              "--task weather: not a task of checkpoint"),
             (["--classifier", str(clf), "--task", "shapes", folder, "--out", str(tmp_path / "p.txt")],
              "a predictions file is .csv"),
             (["--classifier", str(clf), "--task", "shapes", str(tmp_path / "nope")], "not found"),
             (["--classifier", str(tmp_path / "nope.safetensors"), "--task", "shapes", folder],
              "classifier file not found")]
    for i, (argv, says) in enumerate(cases):
        capsys.readouterr()
        assert _run(world, "predict", *argv, spec=False, run_dir=None if "--run-dir" in argv else tmp_path / f"bad{i}"
                    ) == 1
        assert says in _one_error_line(capsys), argv
        assert not (tmp_path / f"bad{i}").exists() and not (tmp_path / "inner").exists()
    assert inside.exists()
    # a classifier of another embedding size than --model's (here a config giving 24-dim features)
    capsys.readouterr()
    assert main(["predict", "--classifier", str(clf), "--task", "shapes", folder, "--model-config", str(inside_cfg),
                 "--run-dir", str(tmp_path / "bad-dim"), "--no-progress"]) == 1
    assert f"--classifier {clf} scores 16-dim image features, model 'wide' gives 24-dim ones (it was exported " \
           "for model 'hipro-cli-test')" in \
        _one_error_line(capsys)
    assert not (tmp_path / "bad-dim").exists()


def test_train_select_per_task_holds_out_min_k_4_images_per_class(world, tmp_path):
    """Without a val split, --select per-task holds out min(K, 4) training images
    per class (4 at 5 shots, not 5)."""
    root = tmp_path / "big"
    for t, classes in (("shapes", ["red", "green"]), ("scenes", ["day", "night"])):
        for c in classes:
            for i in range(10):
                _png(root / t / c / f"{i}.png", seed=zlib.crc32(f"big/{t}/{c}/{i}".encode()))
    spec = root / "tasks.toml"
    spec.write_text("".join(f'[[task]]\nname = "{t}"\nimages = "{t}"\nsplit = {{test = 0.1, seed = 0}}\n\n'
                            for t in ("shapes", "scenes")))
    run = tmp_path / "run"
    assert _run(world, "train", "--spec", str(spec), "--tree", "flat", "--shots", "5", "--epochs", "1", "--n-ctx",
                "2", "--select", "per-task", run_dir=run) == 0
    rows = {r["task"]: r for r in json.loads((run / "data.json").read_text())}
    assert {t: (r["train"], r["val"]) for t, r in rows.items()} == {"shapes": (10, 8), "scenes": (10, 8)}


def test_compare_select_by_reaches_the_selection(world, tmp_path, capsys):
    """--select-by: the criterion reaches the selection (the JSON and the summary
    name it; loss by default), and each task's pick is the one that criterion
    makes from the candidates' validation scores logged with the draw."""
    from hipro_fast.method.baselines import choose_per_task
    for by, expected in ((None, "loss"), ("accuracy", "accuracy")):
        run_dir = tmp_path / f"cmp-{expected}"
        flag = ["--select-by", by] if by else []
        assert _run(world, "compare", "--methods", "coop-per-task,hipro", "--tree", "flat", "--shots", "1",
                    "--seeds", "0", "--epochs", "1", "--n-ctx", "2", *flag, run_dir=run_dir) == 0
        out = capsys.readouterr().out
        assert f"(by {expected})" in out
        assert f"each draw's hipro model: hipro export --checkpoint {run_dir / 'checkpoints' / 'shots1-seed0'}" in out
        results = json.loads((run_dir / "comparison.json").read_text())
        assert results["select"] == "per-task" and results["select_by"] == expected
        (draw,) = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()
                   if json.loads(ln).get("event") == "draw"]
        (picks,), (candidates,) = draw["choices"]["hipro"], draw["candidates"]["hipro"]
        assert set(picks) == set(TASKS) and picks == choose_per_task(candidates, expected)
        # the draw's folder loads as the HiPro it measured: its selection.json names the same picks
        saved = json.loads((run_dir / "checkpoints" / "shots1-seed0" / "selection.json").read_text())
        assert saved["choices"] == {t: f"{m}-seed0" for t, m in picks.items()} and saved["select_by"] == expected
        assert _run(world, "eval", "--checkpoint", str(run_dir / "checkpoints" / "shots1-seed0"), "--shots", "1",
                    run_dir=tmp_path / f"ev-{expected}") == 0
        assert json.loads((tmp_path / f"ev-{expected}" / "test_accuracy.json").read_text()) == \
            pytest.approx(draw["results"]["hipro"], abs=1e-12)
    assert _run(world, "compare", "--select-by", "f1", run_dir=tmp_path / "bad") != 0
    assert "--select-by" in capsys.readouterr().err


def test_compare_writes_table(world, tmp_path, capsys):
    """compare runs CoOp's protocol (here 1 shot x seeds 0, 1) and writes the
    summary, the per-shot table with parameter counts, the JSON and the figure."""
    run_dir = tmp_path / "cmp"
    assert _run(world, "compare", "--methods", "zero-shot,coop-shared,hipro", "--tree", "flat", "--shots", "1",
                "--seeds", "0,1", "--epochs", "1", "--n-ctx", "2", "--select", "none", run_dir=run_dir) == 0
    out = capsys.readouterr().out
    md = (run_dir / "comparison.md").read_text()
    summary = md.split("\n\n")[0]
    assert summary.startswith("| method | 1 shot |") and summary.strip() in out
    assert "hipro − best baseline" in summary and (run_dir / "accuracy_vs_shots.png").stat().st_size > 1000
    # without selection a draw's folder is no checkpoint: the error names what it holds
    for folder, holds in ((run_dir / "checkpoints", "shots1-seed0, shots1-seed1"),
                          (run_dir / "checkpoints" / "shots1-seed0", "coop-shared-seed0, hipro-seed0")):
        capsys.readouterr()
        assert _run(world, "eval", "--checkpoint", str(folder), "--shots", "1", run_dir=tmp_path / "ev") == 1
        assert f"it holds the checkpoint folders {holds}: pass one of them" in _one_error_line(capsys)
    results = json.loads((run_dir / "comparison.json").read_text())
    assert results["shots"] == [1] and results["seeds"] == [0, 1] and results["select"] is None
    by_method = results["results"]["1"]
    assert {m for m in by_method if m != "trees"} == {"zero-shot", "coop-shared", "hipro"}
    # the per-shot table carries the JSON's numbers and the parameter counts (n_ctx 2 x width 32 per node)
    rows = {cells[0].strip(): [c.strip() for c in cells]
            for cells in (ln.strip("|").split("|") for ln in md.split("### 1 shot")[1].splitlines()
                          if ln.startswith("| "))}
    # flat tree: root + 3 leaves, + 2 learned path weights per task (the default options)
    params = {"zero-shot": 0, "coop-shared": 2 * 32, "hipro": 4 * 2 * 32 + 3 * 2}
    for method in params:
        acc = by_method[method]["task_acc"]
        assert rows[method][1:1 + len(TASKS)] == [f"{100 * acc[t]:.2f}" for t in TASKS]
        assert rows[method][-1] == f"{params[method]:,}"
        m, s = by_method[method]["mean"], by_method[method]["std"]
        assert f"{100 * m:.2f} ± {100 * s:.2f}" in rows.get(method, []) or f"{100 * m:.2f} ± {100 * s:.2f}" in summary
    # zero-shot's numbers are evaluate() of the "a photo of a {}." model on the cached test features
    from hipro_fast.app import pipeline
    from hipro_fast.data.tasks_spec import load_spec
    from hipro_fast.method.baselines import build_method
    from hipro_fast.method.training import evaluate

    clip = pipeline.load_model(model_config=world["config"], seed=0)
    feats = pipeline.cache_features(clip, load_spec(world["spec"]), shots=None, cache_dir=world["cache"],
                                    device="cpu", progress=False)
    assert evaluate(build_method("zero-shot", clip, feats.tasks), feats.test) == \
        pytest.approx(by_method["zero-shot"]["task_acc"])
    assert summary.strip() in (run_dir / "report.md").read_text()


def test_affinity_and_tree(world, tmp_path):
    aff_dir = tmp_path / "aff"
    assert _run(world, "affinity", "--shots", "2", "--affinity-steps", "3", run_dir=aff_dir) == 0
    data = json.loads((aff_dir / "affinity.json").read_text())
    assert (aff_dir / "affinity.png").exists()
    tree_dir = tmp_path / "tree"
    assert _run(world, "tree", "--affinity", str(aff_dir / "affinity.json"), run_dir=tree_dir) == 0
    tree = json.loads((tree_dir / "tree.json").read_text())["tree"]
    assert sorted(json.dumps(tree).count(f'"{t}"') for t in TASKS) == [1, 1, 1]
    matrix = np.array(data["matrix"])
    assert matrix.shape == (3, 3) and np.all(np.isfinite(matrix)) and np.allclose(matrix, matrix.T)
    from hipro_fast.method.tree import TaskTree

    assert tree == TaskTree.from_affinity(matrix, data["tasks"]).to_nested()  # the tree of that matrix
    assert (tree_dir / "dendrogram.png").exists() and data["tasks"] == list(TASKS)
    assert "affinity.png" in (aff_dir / "report.md").read_text()
    # --tree auto: affinity -> tree -> HiPro, in one command
    auto = tmp_path / "auto"
    assert _run(world, "train", "--tree", "auto", "--affinity-steps", "2", "--shots", "2", "--epochs", "1",
                "--n-ctx", "2", run_dir=auto) == 0
    assert (auto / "affinity.json").exists() and (auto / "checkpoints" / "best.json").exists()


def test_augmented_views_train(world, tmp_path):
    run_dir = tmp_path / "aug"
    assert _run(world, "train", "--aug-views", "2", "--tree", "flat", "--shots", "1", "--epochs", "1",
                "--n-ctx", "2", run_dir=run_dir) == 0
    cfg = json.loads((run_dir / "config.json").read_text())
    assert cfg["aug_views"] == 2
    # every augmented view is a training sample: 1 shot x 2 views per class
    record = json.loads((run_dir / "checkpoints" / "best.json").read_text())
    assert record["extra"]["train_sizes"] == {t: 2 * len(c) for t, c in TASKS.items()}
    # the CLI's provenance reaches the checkpoint fit wrote
    assert record["extra"]["shots"] == 1 and record["extra"]["spec"] == str(world["spec"])


def test_help_usage_errors_and_bench_delegation(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for cmd in ("cache", "affinity", "tree", "train", "eval", "compare", "export", "bench", "demo"):
        assert cmd in out
    assert main(["frobnicate"]) == 2
    assert "invalid choice" in _one_error_line(capsys)
    assert main(["train", "--epochs", "many"]) == 2
    assert "--epochs" in _one_error_line(capsys)
    assert main(["bench", "--help"]) == 0
    assert "hipro bench" in capsys.readouterr().out
    assert main(["bench", "--device", "cuda", "--help"]) == 0
    assert "--precisions" in capsys.readouterr().out


@pytest.mark.slow
def test_demo_end_to_end_in_two_processes(tmp_path):
    """`hipro demo --nproc 2` (what `make demo` runs on 2 cores): rank 0 exports
    the bundled benchmark, the 2 draws of the grid go one to each rank, and the
    run holds the report, the comparison and the accuracy-vs-shots figure.
    Small budgets: the command's plumbing, not its accuracy."""
    run_dir = tmp_path / "demo"
    proc = subprocess.run(_hipro_command() + [
        "demo", "--nproc", "2", "--cache-dir", str(tmp_path / "cache"), "--run-dir", str(run_dir), "--no-progress",
        "--shots", "1", "--seeds", "0,1", "--epochs", "1", "--min-steps", "2", "--affinity-steps", "2",
        "--methods", "zero-shot,coop-shared,hipro"], capture_output=True, text=True, timeout=300,
        env={**os.environ, **CHILD_ENV})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| hipro |" in proc.stdout and "2 processes, parallel over draws" in proc.stdout
    assert proc.stdout.count("demo took") == 1  # rank 0 alone speaks
    for name in ("report.md", "comparison.md", "comparison.json", "accuracy_vs_shots.png", "config.json"):
        assert (run_dir / name).exists(), name
    results = json.loads((run_dir / "comparison.json").read_text())
    assert (results["shots"], results["seeds"]) == ([1], [0, 1])
    assert (tmp_path / "cache" / "bundled-seed0" / ".complete").exists()


# ------------------------------------------------------------------ issue 12: the real `hipro` command
# Children get one thread each and run offline, so two runs of one command compute the same bits.
CHILD_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
TREE = '[["shapes", "texture"], "scenes"]'


def _hipro_command() -> list[str]:
    """The `hipro` console script installed next to this interpreter, else `python -m hipro_fast.cli`."""
    script = Path(sys.executable).with_name("hipro")
    return [str(script)] if script.exists() else [sys.executable, "-m", "hipro_fast.cli"]


def _start(world, *argv, run_dir=None, spec=True, cache=None, umask=None) -> subprocess.Popen:
    return subprocess.Popen(_hipro_command() + _cli_args(world, argv, run_dir, spec, cache),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **CHILD_ENV},
                            preexec_fn=(lambda: os.umask(umask)) if umask is not None else None)


def _finish(proc: subprocess.Popen, timeout: float = 300) -> subprocess.CompletedProcess:
    out, err = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _hipro(world, *argv, **kw) -> subprocess.CompletedProcess:
    return _finish(_start(world, *argv, **kw))


def _hipro_many(world, cases: list[dict]) -> list[subprocess.CompletedProcess]:
    """Several independent commands at once (each pays the interpreter start-up); kwargs per case."""
    procs = [_start(world, *c["argv"], **{k: v for k, v in c.items() if k != "argv"}) for c in cases]
    return [_finish(p) for p in procs]


def _error_line(proc: subprocess.CompletedProcess) -> str:
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("hipro: error:")]
    assert len(lines) == 1, proc.stderr
    return lines[0]


def _snapshot(directory: Path) -> dict[str, tuple[bytes, int, int]]:
    """Every file under `directory`: (bytes, mtime_ns, mode)."""
    out = {}
    for f in sorted(directory.rglob("*")):
        st = f.lstat()
        out[str(f.relative_to(directory))] = (f.read_bytes() if f.is_file() else b"", st.st_mtime_ns, st.st_mode)
    return out


def _checkpoint_tensors(run_dir: Path, kind: str, sub: str = "") -> tuple[dict, dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    d = run_dir / "checkpoints" / sub
    record = json.loads((d / f"{kind}.json").read_text())
    return record, load_file(str(d / record["tensors"]))


def _strip_times(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in ("time", "seconds")} for r in rows]


def _wait_for(path: Path, proc: subprocess.Popen, limit: float = 240) -> None:
    """Poll (every 2 ms) until `path` exists; fail if the process ends first."""
    deadline = time.monotonic() + limit
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"ended (rc {proc.returncode}) before {path} appeared: {proc.communicate()}")
        assert time.monotonic() < deadline, f"{path} did not appear within {limit} s"
        time.sleep(0.002)


NO_MODEL = ["--model", "no-such-model"]  # a check that ran after loading the model would report this instead

BAD_NUMBERS = [
    (["train", "--epochs", "0"], "--epochs"), (["train", "--lr", "0"], "--lr"), (["train", "--lr", "nan"], "--lr"),
    (["train", "--lr", "inf"], "--lr"), (["train", "--seed", "-1"], "--seed"),
    (["train", "--aug-views", "-2"], "--aug-views"), (["train", "--n-ctx", "0"], "--n-ctx"),
    (["train", "--shots", "-1"], "--shots"), (["train", "--train-batch-size", "0"], "--train-batch-size"),
    (["train", "--train-batch-size", "all"], "--train-batch-size"), (["train", "--optimizer", "adam"], "--optimizer"),
    (["cache", "--batch-size", "0"], "--batch-size"), (["cache", "--workers", "-1"], "--workers"),
    (["compare", "--seeds", "0,-1"], "--seeds"), (["compare", "--methods", "hipro,coop"], "--methods"),
    (["affinity", "--affinity-steps", "0"], "--affinity-steps"), (["tree", "--threshold", "nan"], "--threshold"),
    (["tree", "--levels", "-1"], "--levels"), (["train", "--tree", "[[\"shapes\", "], "--tree"),
]


ISSUE_NUMBERS = BAD_NUMBERS[:6]  # the values issue 12 names; the rest go through main() in this process


def test_bad_numbers_fail_in_the_parser_before_any_model_load(world, tmp_path, capsys):
    """Before: --epochs 0 / --lr 0 / --lr nan / --seed -1 were refused only after the model was loaded and
    the features cached, --lr inf and --aug-views -2 with messages that did not name the option."""
    missing_spec = str(tmp_path / "no-such-spec.toml")  # a spec loaded before the check would fail on this
    cases = [{"argv": argv + NO_MODEL + ["--spec", missing_spec], "run_dir": tmp_path / f"run{i}"}
             for i, (argv, _) in enumerate(ISSUE_NUMBERS)]
    for i, ((argv, option), proc) in enumerate(zip(ISSUE_NUMBERS, _hipro_many(world, cases))):
        assert proc.returncode == 2, (argv, proc.stderr)
        line = _error_line(proc)
        assert f"argument {option}" in line and f"hipro {argv[0]} --help" in line, line
        assert not (tmp_path / f"run{i}").exists()  # nothing written
    for i, (argv, option) in enumerate(BAD_NUMBERS):
        run_dir = tmp_path / f"inproc{i}"
        assert _run(world, *argv, *NO_MODEL, "--spec", missing_spec, run_dir=run_dir) == 2, argv
        line = _one_error_line(capsys)
        assert f"argument {option}" in line, line
        assert not run_dir.exists()


@pytest.mark.parametrize("argv, says", [
    (["train", "--train-batch-size", "32"], "mini-batches need --optimizer 'adamw' or 'sgd'"),
    (["compare", "--optimizer", "lbfgs", "--train-batch-size", "8"],
     "--optimizer 'lbfgs' needs --train-batch-size 'full'"),
    (["train", "--lr", "0.01"], "--lr has no effect with optimizer lbfgs"),
    (["demo", "--lr", "0.01"], "--lr has no effect with optimizer lbfgs"),
])
def test_training_options_that_conflict_fail_before_any_model_load(world, tmp_path, capsys, argv, says):
    """Each flag is valid alone, the combination is not (L-BFGS, the default, runs on the full batch and sets
    its own steps): one line naming it, before the model is loaded or a run directory written."""
    run_dir = tmp_path / "run"
    spec = argv[0] != "demo"  # the demo brings its own
    assert _run(world, *argv, *NO_MODEL, run_dir=run_dir, spec=spec) != 0
    line = _one_error_line(capsys)
    assert says in line and "no-such-model" not in line, line
    assert not run_dir.exists()
    if spec:
        assert _run(world, *argv, "--optimizer", "adamw", "--train-batch-size", "full", "--shots", "1", *NO_MODEL,
                    run_dir=tmp_path / "ok") != 0  # gets past the check (and 1 shot fits the spec) ...
        assert "no-such-model" in _one_error_line(capsys)  # ... to fail on loading the model


def _world_spec(world, extra: str = "", name: str = "spec.toml", replace: tuple[str, str] | None = None,
                prefix: str = "") -> Path:
    """A variant of the world's spec (`extra` lands in its last task, "scenes", unless it opens a table)."""
    text = world["spec"].read_text()
    if replace:
        assert replace[0] in text
        text = text.replace(*replace)
    p = world["root"] / name
    p.write_text(prefix + text + extra)
    return p


def test_bad_specs_fail_with_one_line_naming_the_culprit(world, tmp_path, capsys):
    root = world["root"]
    one = root / "one_class"
    for i in range(3):
        _png(one / "only" / f"{i}.png", seed=500 + i)
    latin = root / "latin1.toml"
    latin.write_bytes('[[task]]\nname = "caf\u00e9"\nimages = "data/shapes"\n'.encode("latin-1"))
    cases = [  # (spec, culprit in the error line); before: each was accepted or a message without the culprit
        (_world_spec(world, name="toplevel.toml", prefix='shots = 4\n'), "unknown top-level key(s) 'shots'"),
        (_world_spec(world, name="task5.toml", replace=(world["spec"].read_text(), "task = 5\n")),
         "'task' must be an array of tables"),
        (_world_spec(world, name="splitx.toml", replace=("split = {val = 0.2, test = 0.34, seed = 0}",
                                                         'split = { val = "x" }')),
         "task 'shapes': split.val must be a fraction"),
        (latin, f"{latin}: not UTF-8"),
        (_world_spec(world, name="oneclass.toml", extra=f'\n[[task]]\nname = "solo"\nimages = "{one}"\n'),
         "task 'solo' has only one class ('only')"),
    ]
    procs = _hipro_many(world, [{"argv": ["train", "--spec", str(spec), "--tree", "flat", "--shots", "1",
                                          "--epochs", "1"], "run_dir": tmp_path / f"r{i}"}
                                for i, (spec, _) in enumerate(cases)])
    for (spec, culprit), proc in zip(cases, procs):
        assert proc.returncode == 1, (spec, proc.stderr)
        assert culprit in _error_line(proc), (culprit, proc.stderr)
    # classes whose prompts tokenise identically (checked once the tokenizer is loaded, before encoding)
    same = _world_spec(world, name="sametokens.toml", extra='classes = {day = "big_dog", night = "Big dog"}\n')
    assert _run(world, "train", "--spec", str(same), "--tree", "flat", "--shots", "1", "--epochs", "1",
                run_dir=tmp_path / "same") == 1
    assert "task 'scenes': classes 'big_dog' and 'Big dog' tokenise identically" in _one_error_line(capsys)
    assert not _events(tmp_path / "same", "cache")  # refused before any image was encoded


def test_existing_run_dir_is_refused_untouched_unless_resume_or_overwrite(world, tmp_path):
    run_dir = tmp_path / "run"
    assert _run(world, "train", "--tree", "flat", "--shots", "1", "--epochs", "1", "--n-ctx", "2",
                run_dir=run_dir) == 0
    (run_dir / "notes.txt").write_text("mine")
    before = _snapshot(run_dir)
    # before: the rerun replaced the checkpoints, mixed two runs' metrics lines and kept stale files
    train, cache = _hipro_many(world, [
        {"argv": ["train", "--tree", "flat", "--shots", "1", "--epochs", "2", *NO_MODEL], "run_dir": run_dir},
        {"argv": ["cache", "--shots", "1", *NO_MODEL], "run_dir": run_dir}])
    line = _error_line(train)
    assert train.returncode == 1 and str(run_dir) in line and "--resume" in line and "--overwrite" in line, line
    line = _error_line(cache)  # `hipro cache` has no --resume: the message offers --overwrite only
    assert cache.returncode == 1 and str(run_dir) in line and "--overwrite" in line and "--resume" not in line
    assert _snapshot(run_dir) == before

    # --overwrite: the old contents are removed first; files get the umask's permissions; n_ctx is recorded
    proc = _hipro(world, "train", "--tree", "flat", "--shots", "1", "--epochs", "2", "--overwrite",
                  run_dir=run_dir, umask=0o027)
    assert proc.returncode == 0, proc.stderr
    assert not (run_dir / "notes.txt").exists()
    assert [e["mode"] for e in _events(run_dir, "start")] == ["overwrite"]
    assert len(_events(run_dir, "train_epoch")) == 2  # this run's epochs only
    assert json.loads((run_dir / "config.json").read_text())["n_ctx"] == 16  # before: null (the default, unsaid)
    record, _ = _checkpoint_tensors(run_dir, "best")
    assert set(record["model"]["n_ctx"].values()) == {16}
    modes = {str(f.relative_to(run_dir)): stat.S_IMODE(f.stat().st_mode) for f in run_dir.rglob("*")
             if f.is_file() and f.name != ".hipro.lock"}  # the lock stays from the first run (it is held)
    assert set(modes.values()) == {0o640}, modes

    # a non-empty folder that no hipro command wrote is never emptied
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.tex").write_text("years of work")
    proc = _hipro(world, "cache", "--shots", "1", "--overwrite", *NO_MODEL, run_dir=precious)
    assert proc.returncode == 1 and "no config.json written by hipro" in _error_line(proc)
    assert (precious / "thesis.tex").read_text() == "years of work"


def test_resume_checks_before_anything_is_loaded(world, tmp_path, capsys):
    run_dir, cache_run = tmp_path / "run", tmp_path / "cache-run"
    assert _run(world, "train", "--tree", "flat", "--shots", "1", "--epochs", "1", "--n-ctx", "2",
                run_dir=run_dir) == 0
    assert _run(world, "cache", "--shots", "1", run_dir=cache_run) == 0
    before = _snapshot(run_dir)
    common = ["--tree", "flat", "--shots", "1", "--n-ctx", "2", *NO_MODEL]
    capsys.readouterr()
    assert _run(world, "train", *common[:-2], "--epochs", "3", "--resume", run_dir=run_dir) == 1
    line = _one_error_line(capsys)
    assert "cannot resume" in line and "--epochs was 1 in that run, now 3" in line, line
    assert _run(world, "train", *common, "--epochs", "1", "--resume", run_dir=cache_run) == 1
    assert "it is a `hipro cache` run" in _one_error_line(capsys)
    assert _run(world, "train", *common, "--epochs", "1", "--resume") == 1
    assert "--resume needs --run-dir" in _one_error_line(capsys)
    assert _run(world, "train", *common, "--epochs", "1", "--resume", "--overwrite", run_dir=run_dir) == 2
    assert "not allowed with" in _one_error_line(capsys)
    assert _snapshot(run_dir) == before


def test_resume_compares_the_resolved_training_recipe(world, tmp_path, capsys):
    """config.json records the recipe the options resolve to: spelling out the
    default (--optimizer lbfgs) resumes a run started with it, another optimiser
    is refused naming it; a run written before the record (no train_recipe)
    compares the options as given and says what its default meant."""
    run_dir = tmp_path / "run"
    base = ["train", "--tree", "flat", "--shots", "1", "--epochs", "1", "--min-steps", "2", "--n-ctx", "2"]
    assert _run(world, *base, run_dir=run_dir) == 0
    saved = json.loads((run_dir / "config.json").read_text())
    assert saved["optimizer"] is None
    assert saved["train_recipe"] == {"optimizer": "lbfgs", "epochs": 1, "min_steps": 2,
                                     "batch_size": "full"}  # no lr: L-BFGS has none
    capsys.readouterr()
    assert _run(world, *base, "--optimizer", "lbfgs", "--resume", run_dir=run_dir) == 0
    assert "cannot resume" not in capsys.readouterr().err
    before = _snapshot(run_dir)
    assert _run(world, *base, "--optimizer", "adamw", "--resume", run_dir=run_dir) == 1
    line = _one_error_line(capsys)
    assert "--optimizer was 'lbfgs' in that run, now 'adamw' (resolved, defaults included" in line, line
    assert _snapshot(run_dir) == before
    del saved["train_recipe"]  # a run directory written before the recipe was recorded
    (run_dir / "config.json").write_text(json.dumps(saved))
    assert _run(world, *base, "--optimizer", "lbfgs", "--resume", run_dir=run_dir) == 1
    line = _one_error_line(capsys)
    assert "--optimizer was None in that run, now 'lbfgs'" in line and "predates the recorded training recipe" in line


def test_sigkill_then_resume_equals_the_uninterrupted_run(world, tmp_path):
    """Before: there was no --resume; rerunning restarted at epoch 0 over the old checkpoints."""
    argv = ["train", "--tree", TREE, "--shots", "2", "--epochs", "40", "--n-ctx", "2"]
    killed, whole = tmp_path / "killed", tmp_path / "whole"
    proc = _start(world, *argv, run_dir=killed)
    _wait_for(killed / "checkpoints" / "last.json", proc)
    proc.send_signal(signal.SIGKILL)
    _finish(proc)
    assert proc.returncode == -signal.SIGKILL
    done = json.loads((killed / "checkpoints" / "last.json").read_text())["epoch"]
    assert done < 39, "the run ended before it could be killed"
    # its checkpoint is usable, and said to be unfinished
    half = _hipro(world, "export", "--checkpoint", str(killed / "checkpoints"), "--out", str(tmp_path / "h.safetensors"),
                  spec=False, run_dir=tmp_path / "export-half")
    assert half.returncode == 0, half.stderr
    assert f"stopped after {done + 1} of its 40 epochs (interrupted?)" in half.stderr, half.stderr

    resumed = _hipro(world, *argv, "--resume", run_dir=killed)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed from the checkpoint after epoch {done + 1}" in resumed.stdout
    assert _hipro(world, *argv, run_dir=whole).returncode == 0

    for kind in ("best", "last"):
        (rec_a, a), (rec_b, b) = _checkpoint_tensors(killed, kind), _checkpoint_tensors(whole, kind)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), kind  # bit for bit
        assert (rec_a["epoch"], rec_a["best_epoch"]) == (rec_b["epoch"], rec_b["best_epoch"])
        assert _strip_times(rec_a["history"]) == _strip_times(rec_b["history"])
    assert (killed / "test_accuracy.json").read_text() == (whole / "test_accuracy.json").read_text()
    assert _strip_times(_events(killed, "train_epoch")) == _strip_times(_events(whole, "train_epoch"))
    assert len(_events(killed, "train_epoch")) == 40
    assert [e["mode"] for e in _events(killed, "start")] == ["new", "resume"]
    assert [e["checkpoint_epoch"] for e in _events(killed, "resume")] == [done]
    assert "Resumed" in (killed / "report.md").read_text()
    # a --resume of the finished run (a retry loop) leaves every epoch logged once
    again = _hipro(world, *argv, "--resume", run_dir=killed)
    assert again.returncode == 0, again.stderr
    assert _strip_times(_events(killed, "train_epoch")) == _strip_times(_events(whole, "train_epoch"))


def test_compare_sigkill_then_resume_equals_the_uninterrupted_run(world, tmp_path):
    argv = ["compare", "--methods", "coop-shared,hipro", "--tree", TREE, "--shots", "1", "--epochs", "20",
            "--min-steps", "0", "--n-ctx", "2"]
    killed, whole = tmp_path / "killed", tmp_path / "whole"
    draw = Path("checkpoints") / "shots1-seed0"
    proc = _start(world, *argv, run_dir=killed)
    _wait_for(killed / draw / "hipro-seed0" / "last.json", proc)  # coop-shared done, hipro under way
    proc.send_signal(signal.SIGKILL)
    _finish(proc)
    assert json.loads((killed / draw / "hipro-seed0" / "last.json").read_text())["epoch"] < 19
    resumed = _hipro(world, *argv, "--resume", run_dir=killed)
    assert resumed.returncode == 0, resumed.stderr
    assert _hipro(world, *argv, run_dir=whole).returncode == 0
    assert (json.loads((killed / "comparison.json").read_text())
            == json.loads((whole / "comparison.json").read_text()))
    for sub in ("shots1-seed0/coop-shared-seed0", "shots1-seed0/hipro-seed0"):
        (_, a), (_, b) = _checkpoint_tensors(killed, "last", sub), _checkpoint_tensors(whole, "last", sub)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), sub


def test_run_files_are_never_written_through_a_symlink(world, tmp_path):
    """Before: a planted metrics.jsonl symlink was followed and its target appended to."""
    run_dir = tmp_path / "run"
    assert _run(world, "train", "--tree", "flat", "--shots", "1", "--epochs", "1", "--n-ctx", "2",
                run_dir=run_dir) == 0
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "victim.txt").write_text("untouched\n")
    (run_dir / "metrics.jsonl").unlink()
    (run_dir / "metrics.jsonl").symlink_to(outside / "victim.txt")
    proc = _hipro(world, "train", "--tree", "flat", "--shots", "1", "--epochs", "1", "--n-ctx", "2", "--resume",
                  run_dir=run_dir)
    line = _error_line(proc)
    assert proc.returncode == 1 and "metrics.jsonl is a symbolic link" in line, line
    assert (outside / "victim.txt").read_text() == "untouched\n"

    # --overwrite removes links (to files and to folders) without following them
    (outside / "keep").mkdir()
    (outside / "keep" / "data.bin").write_bytes(b"\x00\x01")
    (run_dir / "linked_dir").symlink_to(outside / "keep", target_is_directory=True)
    proc = _hipro(world, "train", "--tree", "flat", "--shots", "1", "--epochs", "1", "--n-ctx", "2", "--overwrite",
                  run_dir=run_dir)
    assert proc.returncode == 0, proc.stderr
    assert not (run_dir / "linked_dir").exists() and not (run_dir / "metrics.jsonl").is_symlink()
    assert (outside / "victim.txt").read_text() == "untouched\n"
    assert (outside / "keep" / "data.bin").read_bytes() == b"\x00\x01"


def test_run_directory_writes_replace_or_refuse_symlinks(tmp_path):
    """The library side of the same rule (hipro_fast.app.pipeline.Run)."""
    from hipro_fast.app.pipeline import Run
    from hipro_fast.errors import RunDirError

    run = Run(tmp_path / "run", "train", {"command": "train", "seed": 0})
    target = tmp_path / "target.txt"
    target.write_text("keep\n")
    for name in ("metrics.jsonl", "figure.png", "report.json"):
        (run.dir / name).symlink_to(target)
    with pytest.raises(RunDirError, match="metrics.jsonl is a symbolic link"):
        run.log("epoch", loss=1.0)
    with pytest.raises(RunDirError, match="figure.png is a symbolic link"):
        run.path("figure.png")
    with pytest.raises(RunDirError, match="report.json is a symbolic link"):
        run.write_json("report.json", {"a": 1})
    assert target.read_text() == "keep\n"
    # the atomic writer itself replaces a link by a regular file, never writing through it
    from hipro_fast.app.pipeline import dump_json

    dump_json({"a": 1}, run.dir / "report.json")
    assert not (run.dir / "report.json").is_symlink() and target.read_text() == "keep\n"
    assert json.loads((run.dir / "report.json").read_text()) == {"a": 1}


def test_auto_tree_affinity_step_names_itself_and_takes_its_own_n_ctx(world, tmp_path):
    """A 66-token class name fits with --n-ctx 4 (1 + 4 + 66 <= 77) but not in the affinity step's
    16-token prompts. Before: --tree auto failed with a message that did not say it was the affinity step
    (nor how to change its count). Now the message names the step, its count and --affinity-n-ctx."""
    long_name = " ".join(["a"] * 64)
    spec = _world_spec(world, name="long.toml", extra=f'classes = {{day = "{long_name}"}}\n')
    common = ["train", "--spec", str(spec), "--tree", "auto", "--n-ctx", "4", "--affinity-steps", "2",
              "--shots", "1", "--epochs", "1"]
    default, four = _hipro_many(world, [{"argv": common, "run_dir": tmp_path / "a16"},
                                        {"argv": common + ["--affinity-n-ctx", "4"], "run_dir": tmp_path / "a4"}])
    line = _error_line(default)
    assert default.returncode == 1 and "task-affinity step (transfer, 16 context tokens per prompt)" in line, line
    assert "'scenes'" in line and "context length 77" in line and "--affinity-n-ctx" in line, line
    assert four.returncode == 0, four.stderr
    assert json.loads((tmp_path / "a4" / "affinity.json").read_text())["config"]["n_ctx"] == 4
    assert json.loads((tmp_path / "a4" / "config.json").read_text())["affinity_n_ctx"] == 4


def test_inline_json_tree_longer_than_a_file_name(world, tmp_path):
    """Before: `[Errno 36] File name too long` (the value was tried as a path first)."""
    tree = '[["shapes", "texture"],' + " " * 300 + '"scenes"]'
    proc = _hipro(world, "train", "--tree", tree, "--shots", "1", "--epochs", "1", "--n-ctx", "2",
                  run_dir=tmp_path / "run")
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "run" / "tree.json").read_text())["tree"] == [["shapes", "texture"], "scenes"]


def test_a_task_without_test_images_is_reported_not_dropped(world, tmp_path):
    """One image per class: the split leaves the task no test image. Before: it silently left the results."""
    tiny = world["root"] / "tiny_task"
    for c in ("p", "q"):
        _png(tiny / c / "0.png", seed=zlib.crc32(c.encode()))
    spec = _world_spec(world, name="notest.toml",
                       extra=f'\n[[task]]\nname = "tiny"\nimages = "{tiny}"\nsplit = {{test = 0.34}}\n')
    proc = _hipro(world, "train", "--spec", str(spec), "--tree", "flat", "--shots", "1", "--epochs", "1",
                  "--n-ctx", "2", run_dir=tmp_path / "run")
    assert proc.returncode == 0, proc.stderr
    warn = [ln for ln in proc.stderr.splitlines() if ln.startswith("hipro: warning:") and "no test images" in ln]
    assert len(warn) == 1 and "tiny" in warn[0], proc.stderr
    assert [(e["split"], e["tasks"]) for e in _events(tmp_path / "run", "missing_split")] == [("test", ["tiny"])]
    report_md = (tmp_path / "run" / "report.md").read_text()
    assert "## Tasks without test images" in report_md and "tiny" in report_md
    assert set(json.loads((tmp_path / "run" / "test_accuracy.json").read_text())) == set(TASKS)


def test_two_specs_with_a_same_named_task_share_one_cache_folder(world, tmp_path):
    """Before: each run evicted the other's "shapes" cache with a misleading "model, preprocessing or
    images changed" warning."""
    other = _world_spec(world, name="other_shapes.toml", replace=('images = "data/shapes"', 'images = "data/scenes"'))
    cache = tmp_path / "cache"
    assert _run(world, "cache", "--shots", "1", run_dir=tmp_path / "a1", cache=cache) == 0
    assert _run(world, "cache", "--spec", str(other), "--shots", "1", run_dir=tmp_path / "b1", cache=cache) == 0
    again = _hipro(world, "cache", "--shots", "1", run_dir=tmp_path / "a2", cache=cache)
    assert again.returncode == 0, again.stderr
    assert "stale" not in again.stderr
    assert {r["status"] for r in _events(tmp_path / "a2", "cache")} == {"hit"}


def test_flex_attention_on_the_cpu_fails_in_one_line(world, tmp_path, capsys):
    """--attention flex reaches the model; training it on the CPU (FlexAttention has no
    CPU backward in this torch) is one error line that says what to do."""
    assert _run(world, "train", "--tree", "flat", "--shots", "1", "--epochs", "1", "--n-ctx", "2",
                "--attention", "flex", "--device", "cpu", run_dir=tmp_path / "r") == 1
    line = _one_error_line(capsys)
    assert "no backward on the CPU" in line and "attention='tree'" in line, line


# ---------------------------------------------------------------- inputs checked before the run directory
def test_bad_inputs_leave_no_run_directory(world, tmp_path, capsys):
    """Input problems are found before the run directory is made (and before the
    model loads: NO_MODEL would be reported instead), each naming its option, so
    the corrected rerun is not blocked by the failed one."""
    cases = [
        (["cache", "--spec", str(tmp_path / "typo.toml")], "spec file not found"),
        (["train", "--tree", '[["shapes", "ghost"], "texture", "scenes"]'], "ghost"),
        (["train", "--tree", '{"nope": 1}'], "--tree {\"nope\": 1}: missing key 'tree'"),
        (["train", "--tree", str(tmp_path / "tree.json")], "tree file not found"),
        (["eval", "--checkpoint", str(tmp_path / "nothing")], "checkpoint not found"),
        (["cache", "--device", "gpu"], "--device gpu: expected cpu, cuda, cuda:N or auto"),
        (["cache", "--run-dir", ""], "--run-dir is empty"),
        (["compare", "--shots", "1,,2"], "an empty entry in the comma list of shot counts"),
        (["compare", "--shots", "1,40", "--tree", "flat"], "but 40 shots need 40; lower --shots"),
    ]
    for i, (argv, says) in enumerate(cases):
        run_dir = tmp_path / f"run{i}"
        argv = [*argv, *NO_MODEL] if "--run-dir" in argv else [*argv, *NO_MODEL, "--run-dir", str(run_dir)]
        assert main(_cli_args(world, argv, spec="--spec" not in argv)) != 0, argv
        line = _one_error_line(capsys)
        assert says in line and "no-such-model" not in line, (argv, line)
        assert not run_dir.exists(), argv
    (tmp_path / "notes").write_text("x")
    assert _run(world, "cache", "--cache-dir", str(tmp_path / "notes"), *NO_MODEL, run_dir=tmp_path / "r") == 1
    assert "--cache-dir" in _one_error_line(capsys) and not (tmp_path / "r").exists()
    assert _run(world, "cache", *NO_MODEL, run_dir=tmp_path / "notes" / "run") == 1
    line = _one_error_line(capsys)
    assert "--run-dir" in line and f"lies under {tmp_path / 'notes'}, which is a file" in line, line
    # a cache folder the file system will not make (/proc takes no new folder, even from root, for whom
    # os.access says yes): refused before the run directory is made (before: after it, at the first write)
    assert _run(world, "cache", "--cache-dir", "/proc/hipro-test/cache", *NO_MODEL, run_dir=tmp_path / "r") == 1
    line = _one_error_line(capsys)
    assert "--cache-dir /proc/hipro-test/cache: cannot be made, /proc takes no new folder" in line, line
    assert not (tmp_path / "r").exists()


def test_overwrite_never_deletes_the_commands_own_inputs(world, tmp_path, capsys):
    """--overwrite empties --run-dir: a checkpoint, spec or tree inside it is an
    input of the command, so the command is refused and nothing is deleted."""
    run_dir = tmp_path / "run"
    assert _run(world, "train", "--tree", "flat", "--shots", "1", "--epochs", "1", "--min-steps", "2",
                "--n-ctx", "2", run_dir=run_dir) == 0
    spec_copy = run_dir / "tasks.toml"
    spec_copy.write_text(world["spec"].read_text().replace('images = "data/', f'images = "{world["root"]}/data/'))
    before = _snapshot(run_dir)
    for argv, flag in ((["eval", "--checkpoint", str(run_dir / "checkpoints"), "--overwrite"], "--checkpoint"),
                       (["cache", "--spec", str(spec_copy), "--overwrite"], "--spec"),
                       (["train", "--tree", str(run_dir / "tree.json"), "--overwrite"], "--tree")):
        assert main(_cli_args(world, [*argv, "--run-dir", str(run_dir)], spec="--spec" not in argv)) == 1, argv
        line = _one_error_line(capsys)
        assert f"--overwrite would delete {flag}" in line and "lies inside --run-dir" in line, line
        assert _snapshot(run_dir) == before


def test_a_failure_after_the_run_started_says_what_to_do_with_its_directory(world, tmp_path, capsys):
    junk = tmp_path / "junk.pt"
    junk.write_text("not a weights file")
    run_dir = tmp_path / "run"
    assert _run(world, "cache", "--model", "hipro-tiny-clip", "--pretrained", str(junk), run_dir=run_dir) == 1
    line = _one_error_line(capsys)
    assert f"weights file {junk}: cannot be read by torch.load" in line, line
    assert (f"the run directory {run_dir} keeps this failed run: fix the cause and rerun with --run-dir {run_dir} "
            "--overwrite") in line, line


def test_eval_and_export_checkpoint_and_out_errors(world, tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert _run(world, "train", "--tree", "flat", "--shots", "1", "--epochs", "1", "--min-steps", "2",
                "--n-ctx", "2", run_dir=run_dir) == 0
    capsys.readouterr()
    assert _run(world, "eval", "--checkpoint", str(run_dir), *NO_MODEL, run_dir=tmp_path / "e") == 1
    assert f"its checkpoint is {run_dir / 'checkpoints'}" in _one_error_line(capsys)
    mine = tmp_path / "mine.safetensors"
    mine.write_bytes(b"precious")
    ckpt_dir = str(run_dir / "checkpoints")
    for out, says in ((mine, "exists: pass --overwrite"), (tmp_path, "is a folder"),
                      (tmp_path / "clf.toml", "a classifier file is .safetensors")):
        assert _run(world, "export", "--checkpoint", ckpt_dir, "--out", str(out), spec=False,
                    run_dir=tmp_path / "x") == 1, out
        assert says in _one_error_line(capsys)
    assert mine.read_bytes() == b"precious" and not (tmp_path / "x").exists()
    assert _run(world, "export", "--checkpoint", ckpt_dir, "--out", str(mine), "--overwrite", spec=False,
                run_dir=tmp_path / "x") == 0
    assert mine.read_bytes() != b"precious"


def test_eval_of_a_checkpoint_of_other_classes_is_refused_before_the_run_directory(world, tmp_path, capsys):
    """A spec whose tasks or classes differ from the checkpoint's is refused from
    the checkpoint's record (before: after the model loaded, leaving a failed run)."""
    train_dir = tmp_path / "train"
    assert _run(world, "train", "--tree", "flat", "--shots", "1", "--epochs", "1", "--min-steps", "2",
                "--n-ctx", "2", run_dir=train_dir) == 0
    def csv_of(task, classes):
        rows = [f"{p},{c}" for c in classes for p in sorted((world["root"] / "data" / task / c).glob("*.png"))]
        path = tmp_path / f"{task}-{len(classes)}.csv"
        path.write_text("\n".join(rows) + "\n")
        return path

    for task, csv, says in (("texture", csv_of("texture", ["dots", "stripes"]),
                             "task 'texture': spec {} has classes ['dots', 'stripes'], the checkpoint "
                             f"{sorted(TASKS['texture'])}"),  # a folder spec's classes are sorted
                            ("renamed", csv_of("shapes", TASKS["shapes"]),
                             "task 'renamed' of spec {} is not in the checkpoint (checkpoint tasks: "
                             f"{', '.join(TASKS)})")):
        spec = tmp_path / f"{task}.toml"
        spec.write_text(f'[[task]]\nname = "{task}"\ntrain = "{csv}"\nsplit = {{test = 0.5, seed = 0}}\n')
        capsys.readouterr()
        assert _run(world, "eval", "--checkpoint", str(train_dir / "checkpoints"), "--spec", str(spec), spec=False,
                    run_dir=tmp_path / "e") == 1
        line = _one_error_line(capsys)
        assert says.format(spec) in line, line
        assert not (tmp_path / "e").exists()
    # a model of another text width, from its config alone (before: after the model loaded)
    wide = tmp_path / "hipro-cli-wide.json"
    wide.write_text(json.dumps({**TINY_CONFIG, "text_cfg": {**TINY_CONFIG["text_cfg"], "width": 64}}))
    for argv in (["eval", "--checkpoint", str(train_dir / "checkpoints")],
                 ["export", "--checkpoint", str(train_dir / "checkpoints"), "--out", str(tmp_path / "c.safetensors")]):
        args = _cli_args(world, argv, tmp_path / "w", spec=argv[0] == "eval")
        args[args.index(str(world["config"]))] = str(wide)
        capsys.readouterr()
        assert main(args) == 1, argv
        line = _one_error_line(capsys)
        assert "was trained on a text tower of width 32, model 'hipro-cli-wide' has width 64" in line, line
        assert not (tmp_path / "w").exists() and not (tmp_path / "c.safetensors").exists()


def test_train_records_its_draw_and_image_tower_and_eval_and_export_say_when_theirs_differ(world, tmp_path, capsys):
    """The contexts were fit to one image tower's features: `hipro train`
    records its digest, and eval / export warn when their model's differs (the
    text tower is checked with the contexts; the image tower was not at all)."""
    import json

    from safetensors import safe_open

    from hipro_fast.method import checkpoint as ckpt

    train_dir = tmp_path / "train"
    assert _run(world, "train", "--tree", "flat", "--shots", "1", "--epochs", "1", "--min-steps", "2",
                "--n-ctx", "2", run_dir=train_dir) == 0
    ckpt_dir = train_dir / "checkpoints"
    recorded = json.loads((ckpt_dir / "best.json").read_text())["extra"]["image_tower"]
    capsys.readouterr()
    assert _run(world, "export", "--checkpoint", str(ckpt_dir), "--out", str(tmp_path / "a.safetensors"),
                spec=False, run_dir=tmp_path / "x1") == 0
    assert "image tower" not in capsys.readouterr().err
    with safe_open(str(tmp_path / "a.safetensors"), "pt") as f:
        assert json.loads(f.metadata()["clip"])["image_tower"] == recorded
    # eval --split train scores the --shots / --seed draw: another than the checkpoint's is said
    for shots, says in ((1, False), (2, True)):  # (--seed would also change this test's randomly made CLIP)
        assert _run(world, "eval", "--checkpoint", str(ckpt_dir), "--split", "train", "--shots", str(shots),
                    run_dir=tmp_path / f"t{shots}") == 0
        err = capsys.readouterr().err
        assert ("--split train scores the 2-shot draw of seed 0; the checkpoint was trained on the 1-shot draw of "
                "seed 0 (pass --shots 1 --seed 0 to score that)" in err) == says, err
    ckpt.annotate_checkpoint(ckpt_dir, "best", {"image_tower": "0" * 16})  # as if trained on another tower
    for argv in (["export", "--checkpoint", str(ckpt_dir), "--out", str(tmp_path / "b.safetensors")],
                 ["eval", "--checkpoint", str(ckpt_dir)]):
        assert _run(world, *argv, spec=argv[0] == "eval", run_dir=tmp_path / f"x-{argv[0]}") == 0
        err = capsys.readouterr().err
        assert (f"was trained on image features of tower {'0' * 16}; model" in err
                and f"has image tower {recorded}" in err), err


def test_repeated_seeds_or_methods_are_refused(world, tmp_path, capsys):
    for flag, value in (("--seeds", "0,0"), ("--methods", "hipro,hipro")):
        assert _run(world, "compare", flag, value, run_dir=tmp_path / "r") == 2
        assert "is repeated" in _one_error_line(capsys)
    assert not (tmp_path / "r").exists()


def test_tree_from_an_affinity_of_other_tasks_is_refused(world, tmp_path, capsys):
    aff = tmp_path / "affinity.json"
    aff.write_text(json.dumps({"tasks": ["shapes", "texture", "tools"], "matrix": np.eye(3).tolist()}))
    assert _run(world, "tree", "--affinity", str(aff), run_dir=tmp_path / "t") == 1
    line = _one_error_line(capsys)
    assert "tools" in line and "--spec has" in line and not (tmp_path / "t").exists()
    # a file that repeats a task or whose matrix does not fit its names: named, nothing written
    for record, words in (({"tasks": ["shapes", "shapes"], "matrix": np.eye(2).tolist()},
                           "task name 'shapes' appears twice"),
                          ({"tasks": ["shapes", "texture", "scenes"], "matrix": np.eye(2).tolist()},
                           "the affinity matrix is 2 x 2, but the file names 3 tasks")):
        aff.write_text(json.dumps(record))
        assert _run(world, "tree", "--affinity", str(aff), run_dir=tmp_path / "t") == 1
        line = _one_error_line(capsys)
        assert str(aff) in line and words in line and not (tmp_path / "t").exists(), line


def test_overwrite_spares_a_csv_split_and_export_spares_its_checkpoint(world, tmp_path, capsys):
    """Two more inputs --overwrite / --out could destroy: a spec's CSV split
    source inside the run directory, and the checkpoint files an export reads."""
    run_dir = tmp_path / "run"
    assert _run(world, "cache", "--shots", "1", run_dir=run_dir) == 0
    rows = [f"{p},{c}" for c in TASKS["shapes"] for p in sorted((world["root"] / "data" / "shapes" / c).glob("*.png"))]
    (run_dir / "train.csv").write_text("\n".join(rows) + "\n")
    spec = tmp_path / "csv.toml"
    spec.write_text(f'[[task]]\nname = "shapes"\ntrain = "{run_dir / "train.csv"}"\n'
                    'split = {test = 0.5, seed = 0}\n')
    before = _snapshot(run_dir)
    assert _run(world, "cache", "--spec", str(spec), "--shots", "1", "--overwrite", run_dir=run_dir) == 1
    line = _one_error_line(capsys)
    assert "--overwrite would delete task 'shapes'" in line and "train.csv" in line, line
    assert _snapshot(run_dir) == before

    train_dir = tmp_path / "train"
    assert _run(world, "train", "--tree", "flat", "--shots", "1", "--epochs", "1", "--min-steps", "2",
                "--n-ctx", "2", run_dir=train_dir) == 0
    ckpt_dir = train_dir / "checkpoints"
    target = next(ckpt_dir.glob("best-*.safetensors"))
    before = target.read_bytes()
    capsys.readouterr()
    assert _run(world, "export", "--checkpoint", str(ckpt_dir), "--out", str(target), "--overwrite", spec=False,
                run_dir=tmp_path / "x") == 1
    assert "lies inside the checkpoint folder" in _one_error_line(capsys)
    assert target.read_bytes() == before
    for command in ("export", "eval"):  # its run directory (report, classifier.safetensors) inside it too
        for sub in (ckpt_dir / "sub", ckpt_dir):
            argv = ["--checkpoint", str(ckpt_dir), "--overwrite"] + (["--split", "test"] if command == "eval" else [])
            assert _run(world, command, *argv, spec=command == "eval", run_dir=sub) == 1
            assert "--run-dir" in (line := _one_error_line(capsys)) and "lies inside the checkpoint folder" in line
            assert not (ckpt_dir / "sub").exists() and target.read_bytes() == before

    # --overwrite meant for --out, with --run-dir naming another command's run: that run is kept
    # (before: export emptied the cache run to write its own log there)
    kept = _snapshot(run_dir)
    assert _run(world, "export", "--checkpoint", str(ckpt_dir), "--out", str(tmp_path / "new.safetensors"),
                "--overwrite", spec=False, run_dir=run_dir) == 1
    line = _one_error_line(capsys)
    assert f"refusing to delete the contents of {run_dir}: it holds a `hipro cache` run" in line, line
    assert "replaces only a `hipro export` run" in line, line
    assert _snapshot(run_dir) == kept and not (tmp_path / "new.safetensors").exists()


def test_model_options_are_checked_before_an_overwrite(world, tmp_path, capsys):
    """A typo in --model / --pretrained / --model-config must not cost a finished
    run: they are checked before --overwrite empties the directory."""
    run_dir = tmp_path / "run"
    assert _run(world, "cache", "--shots", "1", run_dir=run_dir) == 0
    before = _snapshot(run_dir)
    notcfg = tmp_path / "notcfg.json"
    notcfg.write_text('{"hello": 1}')
    for argv, says in ((["--model", "ViT-Nope-99"], "unknown model 'ViT-Nope-99'"),
                       (["--model", "hipro-tiny-clip", "--pretrained", str(tmp_path / "nope.pt")],
                        "weights file not found"),
                       # a misspelt tag failed inside open_clip, after the run directory was made
                       (["--model", "ViT-B-16", "--pretrained", "opanai"],
                        "--pretrained 'opanai' is neither a weights file nor an open_clip tag of model 'ViT-B-16' "
                        "(its tags: openai, "),
                       (["--pretrained", "openai"], "(it has no open_clip tags)"),
                       (["--model-config", str(notcfg)], "not an open_clip model config")):
        args = _cli_args(world, ["cache", "--shots", "1", "--overwrite", *argv], run_dir)
        if "--model-config" in argv:  # the last --model-config wins in argparse; drop the world's
            i = args.index(str(world["config"])) - 1
            del args[i:i + 2]
        assert main(args) == 1, argv
        assert says in _one_error_line(capsys)
        assert _snapshot(run_dir) == before, argv


def test_compare_without_a_shot_grid_selects_where_a_val_split_exists(world, tmp_path, capsys):
    """--shots 0 and per-task selection: a task without a val split keeps HiPro's
    tree (compare's fallback), so a spec where only some tasks have one runs; a
    spec where none has one is refused up front."""
    text = world["spec"].read_text()
    first = "split = {val = 0.2, test = 0.34, seed = 0}"
    mixed = tmp_path / "mixed.toml"
    mixed.write_text(text.replace(first, "split = {test = 0.34, seed = 0}", 1).replace('"data/', f'"{world["root"]}/data/'))
    none = tmp_path / "none.toml"
    none.write_text(text.replace(first, "split = {test = 0.34, seed = 0}").replace('"data/', f'"{world["root"]}/data/'))
    base = ["compare", "--shots", "0", "--methods", "coop-per-task,hipro", "--tree", "flat", "--epochs", "1",
            "--min-steps", "2", "--n-ctx", "2"]
    assert _run(world, *base, "--spec", str(mixed), run_dir=tmp_path / "m") == 0
    capsys.readouterr()
    assert _run(world, *base, "--spec", str(none), run_dir=tmp_path / "n") == 1
    assert "no task has one" in _one_error_line(capsys) and not (tmp_path / "n").exists()
    # the best-of-3 control chooses on the validation split too, named or not
    control = [*base[:4], "coop-best-of-3", *base[5:], "--select", "none"]
    assert _run(world, *control, "--spec", str(none), run_dir=tmp_path / "c") == 1
    line = _one_error_line(capsys)
    assert "--methods coop-best-of-3 chooses on a validation split" in line and not (tmp_path / "c").exists()
    assert _run(world, "eval", "--spec", str(none), "--split", "val", "--checkpoint", str(tmp_path),
                run_dir=tmp_path / "e") == 1
    assert "--split val: no task of the spec" in _one_error_line(capsys) and not (tmp_path / "e").exists()
    (tmp_path / "dangling").symlink_to(tmp_path / "gone")
    assert _run(world, "cache", "--shots", "1", run_dir=tmp_path / "dangling") == 1
    assert "is a broken symbolic link" in _one_error_line(capsys)


def test_options_that_do_nothing_in_their_combination_are_said(world, tmp_path, capsys):
    argv = ["compare", "--shots", "1", "--seeds", "0", "--methods", "coop-per-task", "--tree", "flat",
            "--epochs", "1", "--min-steps", "2", "--n-ctx", "2", "--combine", "concat", "--parent-prior", "0.5",
            "--parallel", "classes"]
    assert _run(world, *argv, run_dir=tmp_path / "run") == 0
    err = capsys.readouterr().err
    assert "hipro: warning: --parent-prior 0.5 has no effect with --combine concat" in err, err
    assert "hipro: warning: --parallel classes has no effect in one process" in err, err
    # the HiPro options' defaults are not warned about; the same values typed are
    assert "--path-weights" not in err and "--leaf-weight" not in err, err
    assert _run(world, *argv, "--path-weights", "learned", "--leaf-weight", "0.75", run_dir=tmp_path / "typed") == 0
    err = capsys.readouterr().err
    assert "hipro: warning: --path-weights learned has no effect with --combine concat" in err, err
    assert "hipro: warning: --leaf-weight 0.75 has no effect with --combine concat" in err, err
    assert _run(world, *argv[:-6], "--path-weights", "uniform", "--leaf-weight", "0.5", run_dir=tmp_path / "u") == 0
    err = capsys.readouterr().err
    assert "hipro: warning: --leaf-weight 0.5 has no effect with --path-weights uniform" in err, err
    assert "--path-weights uniform has no effect" not in err, err


def test_ctx_init_reaches_every_trained_method_and_a_typed_n_ctx_it_overrides_is_said(world, tmp_path, capsys,
                                                                                     monkeypatch):
    from hipro_fast.method import baselines
    seen = []
    build = baselines.build_method

    def spy(method, *args, **kw):
        seen.append((method, kw.get("ctx_init")))
        return build(method, *args, **kw)

    monkeypatch.setattr(baselines, "build_method", spy)
    base = ["compare", "--seeds", "0", "--methods", "coop-per-task,coop-shared,hipro", "--tree", "flat",
            "--epochs", "1", "--min-steps", "1", "--ctx-init", "a photo of a"]
    for shots in ("0", "1"):  # the plain comparison and the protocol
        seen.clear()
        assert _run(world, *base, "--shots", shots, "--n-ctx", "2", run_dir=tmp_path / f"s{shots}") == 0
        assert {m for m, _ in seen} >= {"coop-per-task", "coop-shared", "hipro"}, seen
        assert all(phrase == "a photo of a" for _, phrase in seen), seen
        err = capsys.readouterr().err
        assert ("hipro: warning: --ctx-init 'a photo of a' is 4 tokens: every context node gets 4 context "
                "tokens, not --n-ctx 2") in err, err
    assert _run(world, *base, "--shots", "0", "--n-ctx", "4", run_dir=tmp_path / "same") == 0
    assert _run(world, *base, "--shots", "0", run_dir=tmp_path / "untyped") == 0
    assert "--ctx-init" not in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--run-dir", "--cache-dir"])
def test_outputs_inside_an_image_folder_of_the_spec_are_refused(world, tmp_path, flag, capsys):
    """A run or cache folder inside a task's image folder became a class of
    images ("myrun") on the next run, its figures training images."""
    inside = world["root"] / "data" / "shapes" / "red" / "myrun"
    argv = ["cache", "--shots", "1"]
    if flag == "--cache-dir":
        argv += ["--cache-dir", str(inside)]
        run_dir = tmp_path / "run"
    else:
        run_dir = inside
    assert _run(world, *argv, run_dir=run_dir) == 1
    err = capsys.readouterr().err
    assert f"{flag} {inside} lies inside the image folder" in err and "of task 'shapes' (train)" in err
    assert not inside.exists() and not (tmp_path / "run").exists()


def test_resume_refuses_changed_images(world, tmp_path, capsys):
    """A --resume on edited images trained the rest of the run on another
    dataset (the feature cache only said "stale ... rebuilding")."""
    data = tmp_path / "copy"
    shutil.copytree(world["root"] / "data", data / "data", copy_function=shutil.copy2)
    spec = data / "tasks.toml"
    spec.write_text(world["spec"].read_text())
    run_dir = tmp_path / "run"
    common = ["--spec", str(spec), "--tree", "flat", "--shots", "1", "--epochs", "1", "--n-ctx", "2"]
    assert _run(world, "train", *common, spec=False, run_dir=run_dir) == 0
    assert _run(world, "train", *common, "--resume", spec=False, run_dir=run_dir) == 0  # the same images
    _png(data / "data" / "shapes" / "red" / "0.png", seed=999, size=20)  # an image edited
    capsys.readouterr()
    assert _run(world, "train", *common, "--resume", spec=False, run_dir=run_dir) == 1
    assert "the spec's images differ from that run's" in _one_error_line(capsys)


def test_resume_refuses_a_tree_file_that_now_holds_another_tree(world, tmp_path, capsys):
    """The --tree option records the file's name; its content changed under the
    same name was refused only at the checkpoint, after the run's tree.json and
    figures had been rewritten."""
    tree = tmp_path / "tree.json"
    tree.write_text(json.dumps([["shapes", "texture"], "scenes"]))
    run_dir = tmp_path / "run"
    common = ["--tree", str(tree), "--shots", "1", "--epochs", "1", "--n-ctx", "2"]
    assert _run(world, "train", *common, run_dir=run_dir) == 0
    before = _snapshot(run_dir)
    tree.write_text(json.dumps([["shapes", "scenes"], "texture"]))
    capsys.readouterr()
    assert _run(world, "train", *common, "--resume", run_dir=run_dir) == 1
    assert "the --tree file now holds another tree" in _one_error_line(capsys)
    assert _snapshot(run_dir) == before


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_stopped_run_says_where_it_is_and_how_to_go_on(world, tmp_path, sig):
    """SIGTERM (a scheduler's stop) killed the command silently; Ctrl-C said only
    "interrupted". Both now end with one line naming the signal, the run
    directory and --resume, with status 128 + the signal, and log the event."""
    run_dir = tmp_path / "run"
    argv = ["train", "--tree", TREE, "--shots", "2", "--epochs", "400", "--n-ctx", "2", "--optimizer", "adamw"]
    proc = _start(world, *argv, run_dir=run_dir)
    _wait_for(run_dir / "checkpoints" / "last.json", proc)
    proc.send_signal(sig)
    done = _finish(proc)
    assert done.returncode == 128 + sig, done.stderr
    assert "Traceback" not in done.stderr
    name = signal.Signals(sig).name
    assert done.stderr.strip().splitlines()[-1] == (f"hipro: interrupted ({name}); rerun with --resume "
                                                    f"--run-dir {run_dir} to continue it")
    assert [e["signal"] for e in _events(run_dir, "interrupted")] == [name]
