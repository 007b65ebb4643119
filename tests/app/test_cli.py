"""End to end through the `hipro` CLI on tiny generated image folders and a tiny
random open_clip model (registered from a config JSON with --model-config)."""
import json
import os
import shutil
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


def _run(world, *argv, run_dir=None, spec=True, cache=None):
    args = list(argv)
    if spec and "--spec" not in args:
        args += ["--spec", str(world["spec"])]
    args += ["--model-config", str(world["config"]), "--no-progress"]
    if "--cache-dir" not in args and args[0] != "export":
        args += ["--cache-dir", str(cache or world["cache"])]
    if run_dir is not None:
        args += ["--run-dir", str(run_dir)]
    return main(args)


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
    assert (runs[0] / "config.json").exists() and (runs[0] / "metrics.jsonl").exists()


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
    if case == "undecodable image":
        (root / "d" / "b" / "2.png").write_bytes(b"this is not a png")
        return root, base.replace("split = {test = 0.34}", 'train = "d"\ntest = "d"').replace(
            'images = "d"\n', ""), str(root / "d" / "b" / "2.png")
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
    assert "skipped 2 bad images" in capsys.readouterr().out  # once in train, once in test
    recs = _events(tmp_path / "run", "cache")
    assert {r["split"]: r["skipped"] for r in recs} == {"train": 1, "test": 1}
    assert {r["split"]: r["images"] for r in recs} == {"train": 5, "test": 5}


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
    assert _run(world, "train", "--tree", '[["shapes", "texture"], "scenes"]', *common, run_dir=train_dir) == 0
    for name in ("config.json", "metrics.jsonl", "report.md", "tree.json", "dendrogram.png", "accuracy.png",
                 "training.png", "test_accuracy.json", "checkpoints/best.json", "checkpoints/last.json"):
        assert (train_dir / name).exists(), name
    acc = json.loads((train_dir / "test_accuracy.json").read_text())
    assert set(acc) == set(TASKS) and all(0 <= v <= 1 for v in acc.values())
    assert len(_events(train_dir, "train_epoch")) == 2
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

    # a checkpoint from another spec (fewer classes) is refused with one line
    other = tmp_path / "other"
    shutil.copytree(world["root"] / "data", other / "data")
    shutil.rmtree(other / "data" / "texture" / "plain")
    (other / "tasks.toml").write_text(world["spec"].read_text())
    capsys.readouterr()
    assert _run(world, "eval", "--spec", str(other / "tasks.toml"), "--checkpoint", str(train_dir / "checkpoints"),
                "--shots", "2", run_dir=tmp_path / "eval2") != 0
    assert "texture" in _one_error_line(capsys)


def test_compare_writes_table(world, tmp_path, capsys):
    run_dir = tmp_path / "cmp"
    assert _run(world, "compare", "--methods", "zero-shot,coop-shared,hipro", "--tree", "flat", "--shots", "2",
                "--epochs", "1", "--n-ctx", "2", run_dir=run_dir) == 0
    out = capsys.readouterr().out
    assert "| coop-shared |" in out
    assert (run_dir / "comparison.md").read_text().startswith("| method |")
    assert set(json.loads((run_dir / "comparison.json").read_text())) == {"zero-shot", "coop-shared", "hipro"}
    assert "Comparison" in (run_dir / "report.md").read_text()


def test_affinity_and_tree(world, tmp_path):
    pytest.importorskip("hipro_fast.method.affinity")
    pytest.importorskip("hipro_fast.method.grouping")
    aff_dir = tmp_path / "aff"
    assert _run(world, "affinity", "--shots", "2", "--affinity-steps", "3", run_dir=aff_dir) == 0
    data = json.loads((aff_dir / "affinity.json").read_text())
    assert (aff_dir / "affinity.png").exists()
    tree_dir = tmp_path / "tree"
    assert _run(world, "tree", "--affinity", str(aff_dir / "affinity.json"), run_dir=tree_dir) == 0
    tree = json.loads((tree_dir / "tree.json").read_text())["tree"]
    assert sorted(json.dumps(tree).count(f'"{t}"') for t in TASKS) == [1, 1, 1]
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
    assert (run_dir / "checkpoints" / "best.json").exists()
    cfg = json.loads((run_dir / "config.json").read_text())
    assert cfg["aug_views"] == 2


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
@pytest.mark.skipif(os.environ.get("HIPRO_TEST_DEMO") != "1",
                    reason="set HIPRO_TEST_DEMO=1: exports the bundled benchmark (needs requirements-bundled.txt)")
def test_demo_end_to_end(tmp_path, capsys):
    run_dir = tmp_path / "demo"
    rc = main(["demo", "--cache-dir", str(tmp_path / "cache"), "--run-dir", str(run_dir), "--no-progress",
               "--shots", "2", "--epochs", "1", "--affinity-steps", "2", "--methods", "zero-shot,coop-shared,hipro"])
    assert rc == 0
    assert "| hipro |" in capsys.readouterr().out
    for name in ("report.md", "affinity.png", "dendrogram.png", "accuracy.png", "comparison.md", "tree.json"):
        assert (run_dir / name).exists(), name
