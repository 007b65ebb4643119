"""hipro_fast.app.pipeline helpers that the CLI tests reach only through whole commands."""
from __future__ import annotations

import os
import warnings

import pytest

from hipro_fast.app import pipeline


def _fake_export(root, seed=0):
    """export_image_folders' contract (a tasks.toml and image folders), fast: one file per seed."""
    (root / "task" / "train").mkdir(parents=True)
    (root / "task" / "train" / f"from-seed-{seed}.png").write_bytes(b"x")
    (root / "tasks.toml").write_text(f"# seed {seed}\n")
    return root / "tasks.toml"


def test_export_bundled_is_reused_per_seed_and_replaced_whole(tmp_path, monkeypatch):
    """The same seed reuses the export; another seed replaces it whole (before:
    the old seed's images stayed beside the new ones, or the old export was
    returned for the new seed); a folder that is not an export is never touched."""
    monkeypatch.setattr(pipeline, "export_image_folders", _fake_export)
    root = tmp_path / "bundled"
    spec = pipeline.export_bundled(root, seed=0)
    assert spec.read_text() == "# seed 0\n"
    stamp = spec.stat().st_mtime_ns
    assert pipeline.export_bundled(root, seed=0).stat().st_mtime_ns == stamp  # reused
    pipeline.export_bundled(root, seed=1)
    assert sorted(p.name for p in (root / "task" / "train").iterdir()) == ["from-seed-1.png"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundled"]  # no temporary folders left
    mask = os.umask(0)
    os.umask(mask)
    assert (root / "tasks.toml").stat().st_mode & 0o777 == 0o666 & ~mask  # the umask's, not mkdtemp's 0700
    assert root.stat().st_mode & 0o777 == 0o777 & ~mask
    half = tmp_path / "half"  # an export an earlier version left half-written (no .complete): replaced
    (half / "task" / "train").mkdir(parents=True)
    assert pipeline.export_bundled(half, seed=2).read_text() == "# seed 2\n"
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years")
    with pytest.raises(ValueError, match="is not an export of the bundled benchmark"):
        pipeline.export_bundled(mine, seed=0)
    assert (mine / "thesis.tex").read_text() == "years"


def test_a_named_model_without_weights_says_it_is_random(monkeypatch):
    pl = pipeline
    monkeypatch.setattr(pl, "load_clip", lambda name, pretrained=None, device="cpu": (name, pretrained))
    with pytest.warns(UserWarning, match=r"model 'ViT-B-32' has random weights: no --pretrained"):
        pl.load_model("ViT-B-32")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert pl.load_model("ViT-B-32", pretrained="openai") == ("ViT-B-32", "openai")
        pl.load_model("hipro-tiny-clip")  # ships its weights
        pl.load_model("hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K")  # the hub's weights (load_clip faked)


def test_save_model_stamps_fits_best_with_the_provenance_or_refuses_another_models(tmp_path):
    """fit writes `best`; save_model adds the caller's provenance to it. A `best`
    left there by another model (another tree) is refused, not stamped."""
    import json

    from hipro_fast.errors import TreeError
    from hipro_fast.method.training import fit
    from tests.helpers_training import make_model, toy_data

    train = toy_data(seed=0)
    model = make_model()
    fit(model, train, None, checkpoint_dir=str(tmp_path), epochs=1, optimizer="adamw", batch_size=4,
        steps_per_epoch=1)
    tensors = sorted(p.name for p in tmp_path.glob("best-e*.safetensors"))
    pipeline.save_model(model, tmp_path, {"spec": "tasks.toml", "seed": 0})
    record = json.loads((tmp_path / "best.json").read_text())
    assert record["extra"]["spec"] == "tasks.toml" and "train_sizes" in record["extra"]
    assert sorted(p.name for p in tmp_path.glob("best-e*.safetensors")) == tensors
    other = make_model(tree=["animals", "vehicles", "colors"])
    with pytest.raises(TreeError):
        pipeline.save_model(other, tmp_path, {"spec": "other.toml"})
    assert json.loads((tmp_path / "best.json").read_text())["extra"]["spec"] == "tasks.toml"


def test_skipped_images_cannot_silently_remove_a_class(tmp_path):
    """--skip-bad-images skips after the spec's checks: a class whose every
    training image was undecodable left the task trained without it (one class
    left: 100% by construction). Now an error; in a test split, a warning."""
    import numpy as np
    from PIL import Image

    import open_clip

    from hipro_fast.data.clip_loading import LoadedClip, random_clip
    from hipro_fast.data.tasks_spec import SpecError, load_spec

    for split in ("train", "test"):
        for c in ("cat", "dog", "cow"):
            d = tmp_path / "t1" / split / c
            d.mkdir(parents=True)
            for i in range(2):
                Image.fromarray((np.random.default_rng(i).random((16, 16, 3)) * 255).astype("uint8")).save(d / f"{i}.png")
    (tmp_path / "tasks.toml").write_text('[[task]]\nname = "t1"\ntrain = "t1/train"\ntest = "t1/test"\n')
    clip = LoadedClip(random_clip(width=32, heads=2, layers=1, embed_dim=16), None,
                      open_clip.image_transform(16, is_train=False), "tiny", None)
    for p in (tmp_path / "t1" / "test" / "cat").iterdir():
        p.write_bytes(b"junk")
    spec = load_spec(tmp_path / "tasks.toml")
    with pytest.warns(pipeline.SkippedClassWarning, match="every test image of class 'cat' was skipped"):
        feats = pipeline.cache_features(clip, spec, shots=None, skip_bad_images=True, progress=False)
    assert set(feats.test["t1"][1].tolist()) == {1, 2}
    for p in (tmp_path / "t1" / "train" / "cat").iterdir():
        p.write_bytes(b"junk")
    with pytest.raises(SpecError, match=r"task 't1': every train image of class 'cat' was skipped as undecodable "
                                        r"\(--skip-bad-images; first .*cat/0\.png\): it would be trained without"):
        pipeline.cache_features(clip, spec, shots=None, skip_bad_images=True, progress=False)


def test_a_run_directory_is_written_by_one_process_at_a_time(tmp_path, monkeypatch):
    """A --resume started while the run still trains (or a second start) is
    refused, naming the writer, instead of interleaving the two runs' files;
    the lock goes with the command (Run.close) or the process."""
    from hipro_fast.errors import RunDirError

    real = pipeline._lock_run_dir
    monkeypatch.setattr(pipeline, "_lock_run_dir", lambda d: real(d, wait_s=0.2))
    d = tmp_path / "run"
    first = pipeline.Run(d, "train", {"command": "train", "seed": 0}, mode="new", resumable=True)
    with pytest.raises(RunDirError, match=rf"run directory {d} is in use by another hipro process "
                                          rf"\(pid {os.getpid()}\)"):
        pipeline.Run(d, "train", {"command": "train", "seed": 0}, mode="resume", resumable=True)
    first.close()
    assert pipeline.Run(d, "train", {"command": "train", "seed": 0}, mode="resume", resumable=True).resumed
    # a refused run in a folder it made leaves nothing behind, its lock neither
    with pytest.raises(RunDirError, match="refused here"):
        pipeline.Run(tmp_path / "new", "train", {"seed": 0}, before_writing=lambda: (_ for _ in ()).throw(
            RunDirError("refused here")))
    assert not (tmp_path / "new").exists()


def test_runs_started_in_the_same_second_get_their_own_directories(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    runs = [pipeline.Run(None, "train", {"seed": s}) for s in range(3)]
    assert len({r.dir for r in runs}) == 3 and all(r.dir.parent == pipeline.Path("runs") for r in runs)
    for r in runs:
        r.close()


def test_a_refused_default_run_leaves_no_runs_folder(tmp_path, monkeypatch):
    from hipro_fast.errors import RunDirError

    monkeypatch.chdir(tmp_path)

    def refuse():
        raise RunDirError("refused here")

    with pytest.raises(RunDirError, match="refused here"):
        pipeline.Run(None, "train", {"command": "train"}, before_writing=refuse)
    assert not (tmp_path / "runs").exists()


def test_resuming_a_run_removes_what_a_killed_writer_left(tmp_path):
    """A SIGKILL between a run file's temp write and its rename left the temp
    file in the run directory for good; the next open of the run removes it
    (and nothing else)."""
    import subprocess
    import sys

    from hipro_fast import files

    run = pipeline.Run(tmp_path / "r", "train", {"command": "train", "epochs": 1})
    run.close()
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # a pid no process has now
    stale = tmp_path / "r" / f".config.json.{files._pid_space()}-{gone.pid}.k3j9x_q1.tmp"
    stale.write_text("{half")
    mine = tmp_path / "r" / "notes.tmp"
    mine.write_text("kept")
    deep = tmp_path / "r" / "checkpoints" / "shots1-seed0" / "hipro-seed0"
    deep.mkdir(parents=True)
    stale_ckpt = deep / f".last-e3.safetensors.{files._pid_space()}-{gone.pid}.a8f2k1zz.tmp"
    stale_ckpt.write_bytes(b"half")
    again = pipeline.Run(tmp_path / "r", "train", {"command": "train", "epochs": 1}, mode="resume", resumable=True)
    again.close()
    assert again.resumed and not stale.exists() and mine.read_text() == "kept"
    assert not stale_ckpt.exists() and deep.is_dir()


def test_pretrained_tags_are_checked_as_open_clip_reads_them():
    """A tag is accepted in every spelling open_clip loads ("OpenAI", dashes for
    underscores) and a misspelt one is refused, all before any weights are read;
    hf-hub: models are not asked for a local config (that would fetch it)."""
    assert pipeline.check_model_args("ViT-B-32", "OpenAI", None) == "ViT-B-32"
    assert pipeline.check_model_args("ViT-B-32", "laion2b-s34b-b79k", None) == "ViT-B-32"
    with pytest.raises(ValueError, match="'opanai' is neither a weights file nor an open_clip tag"):
        pipeline.check_model_args("ViT-B-32", "opanai", None)
    with pytest.raises(FileNotFoundError, match="weights file not found"):
        pipeline.check_model_args("ViT-B-32", "weights/none", None)
    assert pipeline.configured_text_width("ViT-B-32") == 512
    assert pipeline.configured_text_width("hipro-tiny-clip") == 128
    assert pipeline.configured_text_width("hf-hub:someone/some-clip") is None


def test_train_selected_needs_a_validation_split():
    """Per-task selection chooses on val: without one it is refused before any training."""
    from types import SimpleNamespace

    feats = SimpleNamespace(tasks={"a": ["x", "y"]}, val={}, train_for_fit=lambda: pytest.fail("trained"))
    with pytest.raises(ValueError, match="chooses on the validation split: the spec has none"):
        pipeline.train_selected(None, feats, None)


def test_held_out_val_takes_images_the_draw_left_per_class_or_names_the_short_class():
    """hipro train --select per-task on a task without a val split: min(K, 4) images
    per class from the training images the K-shot draw did not take, seeded,
    disjoint from the draw; a class with too few left is refused by name."""
    from hipro_fast.data.tasks_spec import ImageRecord, SpecError, TaskData, few_shot

    train = [ImageRecord(f"/img/{c}{i}.png", label) for label, c in enumerate("ab") for i in range(7)]
    task = TaskData("letters", ["a", "b"], ["a", "b"], {"train": train, "val": [], "test": []})
    drawn = {r.path for r in few_shot(train, 3, 5, task="letters", classes=["a", "b"])}
    val = pipeline.held_out_val(task, 3, 5, 3)
    assert [sum(r.label == k for r in val) for k in (0, 1)] == [3, 3]
    assert not drawn & {r.path for r in val} and len(set(r.path for r in val)) == 6
    assert pipeline.held_out_val(task, 3, 5, 3) == val  # a function of (task, shots, seed)
    assert {r.path for r in pipeline.held_out_val(task, 3, 6, 3)} != {r.path for r in val}
    assert len(pipeline.held_out_val(task, 3, 5, 4)) == 8  # exactly what is left
    with pytest.raises(SpecError, match="task 'letters', class 'a': 4 training image\\(s\\) left after the 3-shot "
                                        "draw, but 5 are held out for validation"):
        pipeline.held_out_val(task, 3, 5, 5)
    with pytest.raises(ValueError, match="val_from_train holds out training images"):
        pipeline.cache_features(None, None, shots=0, val_from_train=4)


def test_a_train_run_from_before_select_resumes_only_as_the_tree_alone(tmp_path):
    """config.json of a `hipro train` run older than --select has no "select": it
    trained the tree alone, so a resume with --select per-task is refused by name."""
    from hipro_fast.errors import RunDirError

    saved = {"command": "train", "seed": 0}
    pipeline.check_resume_config(saved, {**saved, "select": "none", "select_by": "loss"}, tmp_path)
    with pytest.raises(RunDirError, match="--select was 'none' in that run, now 'per-task'"):
        pipeline.check_resume_config(saved, {**saved, "select": "per-task", "select_by": "loss"}, tmp_path)


def test_a_resume_compares_the_files_its_options_name_not_their_spelling(tmp_path, monkeypatch):
    """--spec ./tasks.toml, its absolute path, or ../tasks.toml from another
    folder name the run's own spec: the resume goes on. Another file is refused."""
    from hipro_fast.errors import RunDirError

    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "tasks.toml").write_text("x")
    (tmp_path / "data" / "other.toml").write_text("x")
    (tmp_path / "runs").mkdir()
    monkeypatch.chdir(tmp_path)
    saved = {"command": "train", "spec": "data/tasks.toml"}
    pipeline.record_file_paths(saved)
    assert saved["spec_abspath"] == str((tmp_path / "data" / "tasks.toml").resolve())
    for spelling in ("./data/tasks.toml", str(tmp_path / "data" / "tasks.toml"), "data/../data/tasks.toml"):
        pipeline.check_resume_config(saved, {"command": "train", "spec": spelling}, tmp_path)
    with pytest.raises(RunDirError, match="--spec was 'data/tasks.toml' in that run, now 'data/other.toml'"):
        pipeline.check_resume_config(saved, {"command": "train", "spec": "data/other.toml"}, tmp_path)
    monkeypatch.chdir(tmp_path / "runs")  # a scheduler restarting the job from another folder
    pipeline.check_resume_config(saved, {"command": "train", "spec": "../data/tasks.toml"}, tmp_path)
    # a run from before the absolute path was recorded: its spelling, resolved from here
    old = {"command": "train", "spec": "../data/tasks.toml"}
    pipeline.check_resume_config(old, {"command": "train", "spec": str(tmp_path / "data" / "tasks.toml")}, tmp_path)
    with pytest.raises(RunDirError, match="--spec was"):
        pipeline.check_resume_config(old, {"command": "train", "spec": "../data/other.toml"}, tmp_path)


def test_an_empty_checkpoint_path_is_not_the_current_folder():
    from hipro_fast.errors import InvalidInputError

    for empty in ("", "  "):
        with pytest.raises(InvalidInputError, match="--checkpoint is empty"):
            pipeline.checkpoint_location(empty)


def test_a_cut_short_config_json_is_named_as_such(tmp_path):
    from hipro_fast.errors import RunDirError

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text('{"command": "tra')
    for mode in ("resume", "overwrite"):
        with pytest.raises(RunDirError, match="its config.json is not one hipro wrote"):
            pipeline.Run(run, "train", {"command": "train"}, mode=mode, resumable=True)
    (run / "config.json").unlink()
    (run / "notes.txt").write_text("x")
    with pytest.raises(RunDirError, match="holds no config.json written by hipro"):
        pipeline.Run(run, "train", {"command": "train"}, mode="resume", resumable=True)
