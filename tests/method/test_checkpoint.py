"""Checkpoints: atomic writes, mismatch errors, exact resume (in-process and
after SIGKILLs of real subprocesses)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import hipro_fast

from hipro_fast import TaskSpecError, TreeError
from hipro_fast.errors import InvalidInputError, MissingFileError
from hipro_fast.method import checkpoint as ckpt
from hipro_fast.files import atomic_write_bytes
from hipro_fast.method.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from hipro_fast.method.training import fit
from tests.helpers_training import data  # noqa: F401
from tests.helpers_training import REPO, TASKS, make_model, private_model

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny towers run fastest on 1 thread

HELPER = str(Path(REPO) / "tests" / "helpers_training.py")
RUN = dict(epochs=5, optimizer="adamw", batch_size=4, steps_per_epoch=3, lr=0.05, seed=11)


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _strip(history):
    return [{k: v for k, v in h.items() if k != "seconds"} for h in history]


# ------------------------------------------------------------------ atomic writes
def test_atomic_write_failure_leaves_old_file_and_no_temp(tmp_path, monkeypatch):
    target = tmp_path / "x.json"
    atomic_write_bytes(target, b"old")

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_bytes(target, b"new" * 1000)
    monkeypatch.undo()
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.json"]


def test_save_load_roundtrip_and_files(tmp_path, data):
    train, val = data
    model = make_model()
    res = fit(model, train, val, checkpoint_dir=str(tmp_path), **RUN)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["best-e%05d.safetensors" % res.best_epoch, "best.json", "last-e00004.safetensors",
                     "last.json"]
    other = make_model(seed=9)
    state = load_checkpoint(tmp_path, other)
    assert state.epoch == 4 and state.best_epoch == res.best_epoch
    assert _same(other.context_state(), res.final_state)
    assert _same(state.best_contexts, res.best_state)
    assert set(state.optimizer_state) == set(model.ctx)
    assert all(set(v) == {"step", "exp_avg", "exp_avg_sq"} for v in state.optimizer_state.values())  # AdamW
    assert _strip(state.history) == _strip(res.history)
    record = json.loads((tmp_path / "last.json").read_text())
    assert record["model"]["tree"] == [["animals", "vehicles"], "colors"]
    assert record["train_config"]["seed"] == 11
    best = load_checkpoint(tmp_path, make_model(seed=9), kind="best")
    assert best.epoch == res.best_epoch and _same(best.contexts, res.best_state)



def test_annotating_a_checkpoint_adds_provenance_and_keeps_its_tensors(tmp_path):
    model = make_model()
    save_checkpoint(tmp_path, model, None, 3, [], kind="best", extra={"train_sizes": {"a": 2}})
    tensors_before = {p.name: p.read_bytes() for p in tmp_path.glob("*.safetensors")}
    ckpt.annotate_checkpoint(tmp_path, "best", {"spec": "tasks.toml", "seed": 2, "shots": None})
    state = load_checkpoint(tmp_path, make_model(seed=9), kind="best")  # the sha256 still matches
    assert state.extra == {"train_sizes": {"a": 2}, "spec": "tasks.toml", "seed": 2, "shots": None}
    assert _same(state.contexts, model.context_state())
    assert {p.name: p.read_bytes() for p in tmp_path.glob("*.safetensors")} == tensors_before
    ckpt.annotate_checkpoint(tmp_path, "best", {"seed": 3})  # a resumed run's provenance replaces the old
    assert load_checkpoint(tmp_path, None, kind="best").extra["seed"] == 3
    with pytest.raises(InvalidInputError, match=r"\['train_sizes'\] are fit's own"):
        ckpt.annotate_checkpoint(tmp_path, "best", {"train_sizes": {"a": 5}, "seed": 4})
    with pytest.raises(InvalidInputError, match="not JSON-able"):
        ckpt.annotate_checkpoint(tmp_path, "best", {"when": object()})
    with pytest.raises(MissingFileError, match="no last checkpoint"):
        ckpt.annotate_checkpoint(tmp_path, "last", {"seed": 2})
    assert load_checkpoint(tmp_path, None, kind="best").extra == {"train_sizes": {"a": 2}, "spec": "tasks.toml",
                                                                  "seed": 3, "shots": None}  # refused: unchanged


@pytest.mark.parametrize("edit, message", [
    (lambda r: b"\xff\xfe not utf-8", "not valid JSON"),
    (lambda r: b"{", "not valid JSON"),
    (lambda r: {**r, "format": "other"}, "not a hipro_fast checkpoint"),
    (lambda r: [r], "not a hipro_fast checkpoint"),
    (lambda r: {**r, "version": 99}, "checkpoint version 99, expected 1"),
    (lambda r: {k: v for k, v in r.items() if k != "tensors"}, "'tensors' must be a JSON str, got None"),
    (lambda r: {**r, "epoch": "3"}, "'epoch' must be a JSON int, got '3'"),
    (lambda r: {**r, "model": []}, "'model' must be a JSON dict, got \\[\\]"),
    (lambda r: {**r, "tensors": "../elsewhere.safetensors"}, "'tensors' must name a file beside it"),
    (lambda r: {**r, "tensors": ".."}, "'tensors' must name a file beside it"),
], ids=["utf8", "json", "format", "list", "version", "no-tensors", "epoch-str", "model-list", "tensors-path",
        "tensors-dotdot"])
def test_a_hand_edited_record_is_refused_naming_the_file(tmp_path, edit, message):
    save_checkpoint(tmp_path, make_model(), None, 3, [], kind="best")
    path = tmp_path / "best.json"
    new = edit(json.loads(path.read_text()))
    path.write_bytes(new if isinstance(new, bytes) else json.dumps(new).encode())
    with pytest.raises(CheckpointError, match=message) as info:
        load_checkpoint(tmp_path, None, kind="best")
    assert str(path) in str(info.value)
    with pytest.raises(CheckpointError, match=message):
        ckpt.annotate_checkpoint(tmp_path, "best", {"seed": 1})

def test_mismatch_errors_name_the_item(tmp_path):
    model = make_model()
    save_checkpoint(tmp_path, model, None, 0, [])
    with pytest.raises(TaskSpecError, match="checkpoint task 'colors' is not a task of the model"):
        load_checkpoint(tmp_path, make_model(tasks={k: v for k, v in TASKS.items() if k != "colors"},
                                             tree=[["animals", "vehicles"]]))
    with pytest.raises(TaskSpecError, match="model task 'shapes' is not in the checkpoint"):
        load_checkpoint(tmp_path, make_model(tasks={**TASKS, "shapes": ["square", "circle"]},
                                             tree=[["animals", "vehicles"], "colors", "shapes"]))
    with pytest.raises(TaskSpecError, match="task 'colors': class 2 is 'blue' in the checkpoint but 'cyan'"):
        load_checkpoint(tmp_path, make_model(tasks={**TASKS, "colors": ["red", "green", "cyan"]}))
    with pytest.raises(TaskSpecError, match="task 'colors': checkpoint has 3 classes, the model 4"):
        load_checkpoint(tmp_path, make_model(tasks={**TASKS, "colors": ["red", "green", "blue", "cyan"]}))
    with pytest.raises(TreeError, match="task 'vehicles' sits at root > root/0 > task/vehicles in the checkpoint tree but at root > task/vehicles"):
        load_checkpoint(tmp_path, make_model(tree=[["animals", "colors"], "vehicles"]))
    with pytest.raises(TreeError, match="node 'root': checkpoint n_ctx 2 vs model 3"):
        load_checkpoint(tmp_path, make_model(n_ctx={"root": 3}))
    with pytest.raises(CheckpointError, match="combine"):
        load_checkpoint(tmp_path, make_model(combine="concat"))
    with pytest.raises(FileNotFoundError, match="no 'best' checkpoint"):
        load_checkpoint(tmp_path, model, kind="best")
    tensors = next(tmp_path.glob("last-e*.safetensors"))
    tensors.write_bytes(tensors.read_bytes()[:-4] + b"oops")
    with pytest.raises(CheckpointError, match="sha256"):
        load_checkpoint(tmp_path, model)


def test_contexts_never_load_onto_another_clip(tmp_path):
    """A checkpoint records a digest of its CLIP's text side: loading it on another
    CLIP of the same shape (forgotten --pretrained, another checkpoint of the
    model) is refused; the same weights in another dtype or on a copy load."""
    import copy

    from hipro_fast.engine.fingerprint import text_side_digest
    from tests import oracle
    from tests.helpers_training import tiny_clip

    clip, tok = tiny_clip()
    model = make_model()
    save_checkpoint(tmp_path, model, None, 0, [])
    assert len(model.config()["text_tower"]) == 16
    other = oracle.tiny_clip(width=64, heads=4, layers=2, quick_gelu=False, seed=1)
    on_other = hipro_fast.HiProModel(other, TASKS, [["animals", "vehicles"], "colors"], n_ctx=2, tokenizer=tok)
    with pytest.raises(CheckpointError, match="trained on another CLIP: its text weights digest"):
        load_checkpoint(tmp_path, on_other)
    twin = copy.deepcopy(clip)
    load_checkpoint(tmp_path, hipro_fast.HiProModel(twin, TASKS, [["animals", "vehicles"], "colors"], n_ctx=2,
                                                    tokenizer=tok))
    assert text_side_digest(copy.deepcopy(clip).to(torch.bfloat16)) == text_side_digest(clip)
    # fp16 rounds apart from the others: said, not refused
    half = hipro_fast.HiProModel(copy.deepcopy(clip).half(), TASKS, [["animals", "vehicles"], "colors"], n_ctx=2,
                                 tokenizer=tok)
    with pytest.warns(UserWarning, match="cannot check that the checkpoint's CLIP is this one: it was trained on "
                                         "a torch.float32 text tower, this one is torch.float16"):
        load_checkpoint(tmp_path, half)
    # the image tower is not part of it; a text weight is
    bumped = copy.deepcopy(clip)
    with torch.no_grad():
        bumped.visual.conv1.weight.add_(1.0)
    assert text_side_digest(bumped) == text_side_digest(clip)
    with torch.no_grad():
        bumped.ln_final.weight.add_(1.0)  # in place: the cached digest must not be served
    assert text_side_digest(bumped) != text_side_digest(clip)


def test_resume_rejects_different_training_options(tmp_path, data):
    train, _ = data
    fit(make_model(), train, None, checkpoint_dir=str(tmp_path), **{**RUN, "epochs": 2})
    with pytest.raises(CheckpointError, match=r"lr=0.05, this run has lr=0.1"):
        fit(make_model(), train, None, checkpoint_dir=str(tmp_path), resume=True, **{**RUN, "epochs": 2, "lr": 0.1})
    with pytest.raises(CheckpointError, match=r"optimizer='adamw', this run has optimizer='sgd'"):
        fit(make_model(), train, None, checkpoint_dir=str(tmp_path), resume=True,
            **{**RUN, "epochs": 2, "optimizer": "sgd"})
    # a checkpoint from before the optimiser option (no "optimizer" key) was SGD
    record = json.loads((tmp_path / "last.json").read_text())
    del record["train_config"]["optimizer"]
    with pytest.raises(CheckpointError, match=r"optimizer='sgd', this run has optimizer='adamw'"):
        ckpt.check_train_config(record["train_config"], {**record["train_config"], "optimizer": "adamw"})
    smaller = {**train, "colors": (train["colors"][0][:5], train["colors"][1][:5])}
    with pytest.raises(TaskSpecError, match="task 'colors' has 5 train samples"):
        fit(make_model(), smaller, None, checkpoint_dir=str(tmp_path), resume=True, **{**RUN, "epochs": 2})


class _Crash(Exception):
    pass


@pytest.mark.parametrize("options", [{"optimizer": "sgd"}, {"optimizer": "adamw", "lr": 0.01},
                                     {"optimizer": "adamw", "batch_size": "full"},
                                     {"optimizer": "lbfgs", "batch_size": "full"},
                                     {"optimizer": "adamw", "lr": 0.01, "float64": True},
                                     {"optimizer": "lbfgs", "batch_size": "full", "float64": True}],
                         ids=["sgd", "adamw", "adamw-full-batch", "lbfgs", "adamw-float64", "lbfgs-float64"])
def test_resume_after_crash_in_process_is_exact(tmp_path, data, options):
    """Also for a float64 model: its contexts and optimiser state are kept in
    float64 (they were rounded to fp32, and L-BFGS's resume crashed on them)."""
    train, val = data
    run = {**RUN, **options}
    if run.pop("float64", False):
        def make_model():  # a private copy of the tiny CLIP, since .double() converts it in place
            return private_model().double()
    else:
        from tests.helpers_training import make_model
    ref = fit(make_model(), train, val, **run)
    assert next(iter(ref.final_state.values())).dtype == next(make_model().parameters()).dtype

    def crash(info):
        if info["epoch"] == 2 and info["step"] == 1:
            raise _Crash

    with pytest.raises(_Crash):
        fit(make_model(), train, val, checkpoint_dir=str(tmp_path), callback=crash, **run)
    assert json.loads((tmp_path / "last.json").read_text())["epoch"] == 1
    model = make_model()
    res = fit(model, train, val, checkpoint_dir=str(tmp_path), resume=True, **run)
    assert _same(res.final_state, ref.final_state) and _same(res.best_state, ref.best_state)
    assert res.best_epoch == ref.best_epoch and _strip(res.history) == _strip(ref.history)
    assert _same(model.context_state(), ref.best_state)
    # resuming a finished run returns its result without training
    again = fit(make_model(), train, val, checkpoint_dir=str(tmp_path), resume=True, **run)
    assert _same(again.final_state, ref.final_state) and again.best_epoch == ref.best_epoch


def test_crash_during_commit_keeps_previous_checkpoint(tmp_path, data, monkeypatch):
    """Dying after the tensor file of epoch 2 is written but before last.json is
    replaced leaves epoch 1 loadable; the resumed run is exact and cleans up."""
    train, val = data
    ref = fit(make_model(), train, val, **RUN)
    real = ckpt.atomic_write_text

    def die_on_commit(path, text):
        if str(path).endswith("last.json") and json.loads(text)["epoch"] == 2:
            raise _Crash
        return real(path, text)

    monkeypatch.setattr(ckpt, "atomic_write_text", die_on_commit)
    with pytest.raises(_Crash):
        fit(make_model(), train, val, checkpoint_dir=str(tmp_path), **RUN)
    monkeypatch.undo()
    assert (tmp_path / "last-e00002.safetensors").exists() and (tmp_path / "last-e00001.safetensors").exists()
    assert load_checkpoint(tmp_path, make_model()).epoch == 1
    res = fit(make_model(), train, val, checkpoint_dir=str(tmp_path), resume=True, **RUN)
    assert _same(res.final_state, ref.final_state) and _same(res.best_state, ref.best_state)
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())
    assert sorted(p.name for p in tmp_path.glob("last*")) == ["last-e00004.safetensors", "last.json"]


# ------------------------------------------------------------------ SIGKILLed subprocesses
def _spawn(out: Path, ckdir: Path, *args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": REPO, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, HELPER, "--dir", str(ckdir), "--out", str(out), "--epochs", "8",
                             *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _last_epoch(ckdir: Path) -> int | None:
    try:
        return json.loads((ckdir / "last.json").read_text())["epoch"]
    except FileNotFoundError:
        return None


def _finish(proc: subprocess.Popen, timeout: float = 240) -> int:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    if proc.returncode not in (0, -signal.SIGKILL):
        raise AssertionError(f"child failed ({proc.returncode}):\n{out.decode()}")
    return proc.returncode


def _result(path: Path):
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def test_resume_after_sigkill_matches_uninterrupted_run(tmp_path):
    """Kill a real training process twice with SIGKILL at known points (mid-epoch,
    after a checkpoint exists; the child kills itself, so no timing decides where),
    resume it in fresh processes, and compare bitwise with an uninterrupted run."""
    ref_dir, dir_ = tmp_path / "ref", tmp_path / "run"
    ref = _spawn(tmp_path / "ref.safetensors", ref_dir)
    # 1. killed after optimiser step 1 of epoch 2: the checkpoint of epoch 1 is the last one
    a = _spawn(tmp_path / "a.safetensors", dir_, "--kill-at", "2,1")
    assert _finish(a) == -signal.SIGKILL
    assert _last_epoch(dir_) == 1
    # 2. resumed, killed after step 0 of epoch 5: it trained epochs 2-4 and checkpointed each
    b = _spawn(tmp_path / "b.safetensors", dir_, "--resume", "--kill-at", "5,0")
    assert _finish(b) == -signal.SIGKILL
    assert _last_epoch(dir_) == 4
    assert not (tmp_path / "a.safetensors").exists() and not (tmp_path / "b.safetensors").exists()
    # 3. resumed to the end
    c = _spawn(tmp_path / "c.safetensors", dir_, "--resume")
    assert _finish(c) == 0
    assert _finish(ref) == 0
    got, got_meta = _result(tmp_path / "c.safetensors")
    want, want_meta = _result(tmp_path / "ref.safetensors")
    assert got.keys() == want.keys() and len(got) > 0
    for key in want:
        assert torch.equal(got[key], want[key]), key  # bitwise: final, best and held contexts
    assert got_meta == want_meta  # history (without timings) and best epoch
    assert sorted(p.name for p in dir_.iterdir()) == sorted(
        ["last.json", "last-e00007.safetensors", "best.json",
         f"best-e{int(want_meta['best_epoch']):05d}.safetensors"])


def test_optimizer_state_keys_and_pre_option_momentum_keys():
    """"opt/<key>/<node>" tensors group by node (node ids may hold "/"), and the
    "momentum/<node>" tensors of checkpoints written before the optimiser option
    come back as SGD momentum buffers."""
    a, b, c = torch.ones(2), torch.zeros(2), torch.full((2,), 3.0)
    got = ckpt._optimizer_tensors({"opt/exp_avg/task/x": a, "opt/step/task/x": b, "momentum/root": c,
                                   "ctx/root": a})
    assert set(got) == {"task/x", "root"}
    assert set(got["task/x"]) == {"exp_avg", "step"} and torch.equal(got["task/x"]["exp_avg"], a)
    assert set(got["root"]) == {"momentum_buffer"} and torch.equal(got["root"]["momentum_buffer"], c)


def test_optimizer_state_of_another_optimizer_is_refused(tmp_path, data):
    """A checkpoint whose optimiser state belongs to another optimiser (SGD momentum
    into AdamW) is a CheckpointError naming both, not a KeyError inside torch."""
    train, _ = data
    fit(make_model(), train, None, checkpoint_dir=str(tmp_path), **{**RUN, "epochs": 1, "optimizer": "sgd"})
    state = load_checkpoint(tmp_path, make_model())
    model = make_model()
    adamw = torch.optim.AdamW([p for p in model.learnable().values() if p.requires_grad])
    with pytest.raises(CheckpointError, match=r"\['momentum_buffer'\].*AdamW keeps \['exp_avg', 'exp_avg_sq', 'step'\]"):
        ckpt.restore_optimizer_state(adamw, model, state.optimizer_state)


def test_a_refused_resume_leaves_the_callers_model_untouched(tmp_path, data):
    """Every resume check runs before the checkpoint's contexts are loaded: a
    caller who catches the error and retries from scratch gets a fresh run."""
    train, val = data
    fit(make_model(), train, val, checkpoint_dir=str(tmp_path), **RUN)
    model = make_model()
    before = model.context_state()
    with pytest.raises(CheckpointError, match="lr"):
        fit(model, train, val, checkpoint_dir=str(tmp_path), resume=True, **{**RUN, "lr": 0.1})
    assert _same(model.context_state(), before)


@pytest.mark.parametrize("option", [{"parent_prior": 0.5}, {"leaf_weight": 0.5}, {"init_from_parent": True}])
def test_resume_refuses_a_checkpoint_of_a_model_built_otherwise(tmp_path, data, option):
    """Options that shape only the start or the objective still make another
    run: resuming one model's checkpoint with another is refused, naming it."""
    train, val = data
    base = {"combine": "mean", "path_weights": "learned"}
    fit(make_model(**base), train, val, checkpoint_dir=str(tmp_path), **RUN)
    (key, value), = option.items()
    with pytest.raises(CheckpointError, match=f"cannot resume: the checkpoint's model was built with {key}="):
        fit(make_model(**base, **option), train, val, checkpoint_dir=str(tmp_path), resume=True, **RUN)


def test_a_fresh_run_clears_another_runs_checkpoints(tmp_path, data):
    """resume=False starts over: the folder's best/last of an earlier run are
    removed first, so a crash before the new run's first evaluation cannot leave
    the old run's best beside the new run's last (or a resumable old last)."""
    train, val = data
    fit(make_model(seed=5), train, val, checkpoint_dir=str(tmp_path), **RUN)
    (tmp_path / "notes.txt").write_text("mine")

    def crash(info):
        if info["epoch"] == 0 and info["step"] == 1:
            raise _Crash

    with pytest.raises(_Crash):
        fit(make_model(), train, val, checkpoint_dir=str(tmp_path), callback=crash, **RUN)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_numpy_integers_are_welcome(tmp_path, data):
    """numpy integers pass validation and are stored as plain ints (before: the
    first checkpoint's JSON failed after an epoch of training)."""
    import numpy as np

    train, val = data
    res = fit(make_model(seed=np.int64(0)), train, val, checkpoint_dir=str(tmp_path),
              **{**RUN, "epochs": np.int64(2), "seed": np.int64(11), "batch_size": np.int64(4)})
    assert res.best_epoch is not None and json.loads((tmp_path / "last.json").read_text())["epoch"] == 1
    with pytest.raises(ValueError, match="epochs must be an integer, got 2.5"):
        fit(make_model(), train, val, **{**RUN, "epochs": 2.5})
    with pytest.raises(ValueError, match="lr must be a finite number"):
        fit(make_model(), train, val, **{**RUN, "lr": float("inf")})
