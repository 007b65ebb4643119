"""fit / evaluate: learning, batching, per-task losses, bad inputs, amp, seeds."""
from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F

from hipro_fast import TaskSpecError
from hipro_fast.method import training
from hipro_fast.method.training import (FitResult, NonFiniteLossError, TrainConfig, batch_indices, evaluate, fit,
                                 lr_at)
from tests.helpers_training import data  # noqa: F401
from tests.helpers_training import TASKS, make_model, private_model

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny towers run fastest on 1 thread

FAST = dict(epochs=3, optimizer="adamw", batch_size=4, steps_per_epoch=2, lr=0.05, seed=3)


def test_defaults():
    """L-BFGS on the full batch for at least 800 iterations over 50 epochs
    (issue 9's budget ablation, session 7); for SGD / AdamW, CoOp's schedule
    (lr 0.002, cosine over 50 epochs after a 1e-5 warm-up epoch); L-BFGS's lr is 1."""
    c = TrainConfig()
    assert (c.optimizer, c.batch_size, c.min_steps, c.epochs) == ("lbfgs", "full", 800, 50)
    assert lr_at(c, 0) == lr_at(c, 49) == 1.0
    assert (c.lr, c.momentum, c.weight_decay, c.epochs) == (0.002, 0.9, 5e-4, 50)
    assert (c.warmup_epochs, c.warmup_lr, c.amp, c.checkpoint_dir) == (1, 1e-5, None, None)


def test_lr_schedule_constant_warmup_then_cosine():
    c = TrainConfig(optimizer="adamw", epochs=10)
    assert lr_at(c, 0) == 1e-5
    assert lr_at(c, 1) == pytest.approx(0.002)
    assert lr_at(c, 6) == pytest.approx(0.001)
    lrs = [lr_at(c, e) for e in range(1, 10)]
    assert all(a > b > 0 for a, b in zip(lrs, lrs[1:]))
    assert lr_at(TrainConfig(optimizer="adamw", epochs=4, warmup_epochs=0), 0) == pytest.approx(0.002)


def test_loss_decreases_and_accuracy_improves(data):
    train, val = data
    model = make_model()
    before = evaluate(model, val)
    res = fit(model, train, val, epochs=8, optimizer="adamw", batch_size=8, steps_per_epoch=3, lr=0.05, seed=0)
    assert isinstance(res, FitResult) and len(res.history) == 8
    losses = [h["loss"] for h in res.history]
    assert losses[-1] < losses[0] - 0.1
    assert [h["lr"] for h in res.history] == [lr_at(res.config, e) for e in range(8)]
    assert res.best_val > sum(before.values()) / len(before) + 0.1
    after = evaluate(model, val)  # the model holds the best state
    assert sum(after.values()) / len(after) == pytest.approx(res.best_val)
    h = res.history[0]
    assert set(h) == {"epoch", "lr", "loss", "task_loss", "val_acc", "val_mean", "seconds"}
    assert set(h["task_loss"]) == set(TASKS) and set(h["val_acc"]) == set(TASKS)


def test_batch_indices_without_replacement_and_seeded():
    b = batch_indices(10, 3, 4, seed=0, epoch=0, task="a")
    assert b.shape == (3, 4)
    flat = b.flatten().tolist()
    assert sorted(flat[:10]) == list(range(10))  # one full permutation before any repeat
    assert len(set(batch_indices(20, 3, 4, 0, 0, "a").flatten().tolist())) == 12
    assert torch.equal(b, batch_indices(10, 3, 4, 0, 0, "a"))
    assert not torch.equal(b, batch_indices(10, 3, 4, 0, 1, "a"))  # reshuffled each epoch
    assert not torch.equal(b, batch_indices(10, 3, 4, 0, 0, "b"))
    assert not torch.equal(b, batch_indices(10, 3, 4, 1, 0, "a"))


def test_balanced_batches_own_classes_one_forest_pass(data, monkeypatch):
    train, _ = data
    sizes = {t: int(y.shape[0]) for t, (_, y) in train.items()}
    assert len(set(sizes.values())) > 1  # uneven task sizes
    model = make_model()
    calls = {"text": 0, "loss": []}
    real_text = model.text_features

    def counting_text():
        calls["text"] += 1
        return real_text()

    def spy_loss(logits, labels):
        calls["loss"].append((tuple(logits.shape), labels.clone()))
        return F.cross_entropy(logits.float(), labels)

    monkeypatch.setattr(model, "text_features", counting_text)
    monkeypatch.setattr(training, "task_loss", spy_loss)
    res = fit(model, train, None, epochs=2, optimizer="adamw", batch_size=5, min_steps=0)
    steps = math.ceil(max(sizes.values()) / 5)
    assert res.config.steps_per_epoch == steps
    assert calls["text"] == 2 * steps  # one forest pass per step for all tasks
    assert len(calls["loss"]) == 2 * steps * len(TASKS)
    for i, (shape, labels) in enumerate(calls["loss"]):
        task = list(TASKS)[i % len(TASKS)]
        assert shape == (5, len(TASKS[task]))  # same batch per task; own classes only
        assert int(labels.max()) < len(TASKS[task])


def test_loss_is_mean_of_per_task_ce(data):
    train, _ = data
    model = make_model()
    init = make_model()
    seen = []
    fit(model, train, None, epochs=1, optimizer="adamw", batch_size=4, steps_per_epoch=1, seed=5, callback=seen.append)
    with torch.no_grad():
        feats = init.text_features()
        expected = {}
        for task, (x, y) in train.items():
            b = batch_indices(y.shape[0], 1, 4, 5, 0, task)[0]
            logits = init.logit_scale * x[b] @ feats[task].t()
            expected[task] = F.cross_entropy(logits, y[b]).item()
    got = seen[0]["task_loss"]
    for task in TASKS:
        assert got[task] == pytest.approx(expected[task], rel=1e-5)
    assert seen[0]["loss"] == pytest.approx(sum(expected.values()) / len(expected), rel=1e-5)


def test_best_epoch_selection(data, monkeypatch):
    train, val = data
    # val accuracies 0.5, 0.7, 0.7, 0.6 -> best is epoch 1 (ties -> earlier)
    script = iter([0.5, 0.7, 0.7, 0.6])
    states = []

    def fake_acc(model, data, batch_size, metric):
        assert metric == "accuracy"
        states.append(model.context_state())
        v = next(script)
        return {t: v for t in data}

    monkeypatch.setattr(training, "_task_scores", fake_acc)
    model = make_model()
    res = fit(model, train, val, epochs=4, optimizer="adamw", batch_size=4, steps_per_epoch=1, lr=0.05)
    assert res.best_epoch == 1 and res.best_val == pytest.approx(0.7)
    for n, v in res.best_state.items():
        assert torch.equal(v, states[1][n]) and torch.equal(model.ctx[n].detach(), v)
    assert not all(torch.equal(res.final_state[n], res.best_state[n]) for n in res.best_state)


def test_no_val_best_is_last_and_eval_every(data, monkeypatch):
    train, val = data
    model = make_model()
    res = fit(model, train, None, epochs=3, optimizer="adamw", batch_size=4, steps_per_epoch=1)
    assert res.best_epoch == 2 and res.best_val is None
    assert all(torch.equal(res.best_state[n], res.final_state[n]) for n in res.final_state)
    res = fit(make_model(), train, val, epochs=5, optimizer="adamw", batch_size=4, steps_per_epoch=1, eval_every=2,
              progress=True)
    assert [h["val_mean"] is not None for h in res.history] == [False, True, False, True, True]


def test_seeds_reproducible(data):
    train, val = data
    a = fit(make_model(), train, val, **FAST)
    b = fit(make_model(), train, val, **FAST)
    c = fit(make_model(), train, val, **{**FAST, "seed": 4})
    for n in a.final_state:
        assert torch.equal(a.final_state[n], b.final_state[n])
    assert [h["loss"] for h in a.history] == [h["loss"] for h in b.history]
    assert not all(torch.equal(a.final_state[n], c.final_state[n]) for n in a.final_state)


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_autocast_contexts_stay_fp32(data, amp):
    train, val = data
    model = make_model()
    before = model.context_state()
    res = fit(model, train, val, amp=amp, **FAST)
    assert all(math.isfinite(h["loss"]) for h in res.history)
    for n, p in model.ctx.items():
        assert p.dtype == torch.float32 and res.final_state[n].dtype == torch.float32
    assert not all(torch.equal(before[n], res.final_state[n]) for n in before)


@pytest.mark.parametrize("amp,dtype", [(None, torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_amp_runs_the_forward_under_cpu_autocast(data, amp, dtype):
    """amp= really autocasts on the CPU: inside the training forward the text
    tower's GEMMs (an MLP Linear, seen by a forward hook) run in the amp dtype,
    with autocast enabled; amp=None keeps them fp32."""
    train, _ = data
    model = make_model()
    seen = []

    def hook(module, inputs, output):
        seen.append((output.dtype, torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))

    handle = model.tower.blocks[0].mlp.c_fc.register_forward_hook(hook)
    try:
        fit(model, train, None, amp=amp, epochs=1, optimizer="adamw", batch_size=4, steps_per_epoch=2, lr=0.05)
    finally:
        handle.remove()
    assert len(seen) == 2  # one forest pass per step
    for out_dtype, enabled, cast_dtype in seen:
        assert out_dtype == dtype
        assert enabled == (amp is not None)
        if amp is not None:
            assert cast_dtype == dtype


def test_sgd_applies_weight_decay(data):
    """Weight decay reaches the optimiser (CoOp's SGD, weight_decay 5e-4 by default):
    one plain SGD step (momentum 0, no warm-up) with decay wd moves every context
    by -lr * wd * ctx more than the same step without decay (torch's SGD adds
    wd * ctx to the gradient)."""
    train, _ = data
    run = dict(optimizer="sgd", epochs=1, warmup_epochs=0, steps_per_epoch=1, batch_size=4, lr=0.05, momentum=0.0,
               seed=0)
    init = make_model().context_state()
    final = {wd: fit(make_model(), train, None, weight_decay=wd, **run).final_state for wd in (0.0, 0.5)}
    lr = lr_at(TrainConfig(**{k: run[k] for k in ("optimizer", "epochs", "warmup_epochs", "lr")}), 0)
    assert lr == pytest.approx(0.05)
    for n, c in init.items():
        moved = final[0.5][n] - final[0.0][n]
        torch.testing.assert_close(moved, -lr * 0.5 * c, rtol=1e-3, atol=1e-8)
        assert moved.abs().max() > 1e-4  # the decay term is far above rounding


def test_non_finite_loss_names_epoch_step_task(data):
    train, _ = data
    model = make_model()
    with torch.no_grad():
        model.ctx["task/colors"].fill_(float("nan"))
    with pytest.raises(NonFiniteLossError, match=r"epoch 0, step 0.*'colors'") as info:
        fit(model, train, None, epochs=2, optimizer="adamw", batch_size=4, steps_per_epoch=2)
    assert set(info.value.tasks) == {"colors"}
    assert (info.value.epoch, info.value.step) == (0, 0)


def test_non_finite_loss_from_divergence(data):
    train, _ = data
    model = make_model()
    before = model.context_state()
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss at epoch \d+, step \d+") as info:
        fit(model, train, None, epochs=3, optimizer="adamw", batch_size=4, steps_per_epoch=4, warmup_epochs=0, lr=1e30)
    # diverged in the first epoch, before any best: the model is back at its initial contexts
    # (before: it kept the NaN contexts of the failed step)
    assert info.value.epoch == 0
    after = model.context_state()
    assert all(torch.equal(after[n], before[n]) for n in before)


def test_a_non_finite_hierarchy_prior_is_named_as_such(data):
    """A parent_prior overflowing fp32: the tasks' losses are finite, the prior
    is not (before: the next step's NaN task losses were blamed)."""
    train, _ = data
    model = make_model(combine="mean", parent_prior=1e39)
    with pytest.raises(NonFiniteLossError, match=r"epoch 0, step 0: the hierarchy prior is inf \(lower parent_prior"):
        fit(model, train, None, epochs=1, optimizer="adamw", batch_size=4, steps_per_epoch=2)


def test_resume_must_choose_on_the_same_validation_set(data, tmp_path):
    """The checkpoint's best epoch was chosen on a validation set: a resume
    without it (before: every later epoch became "best", labelled with the old
    best_val) or with another one is refused; the same one resumes."""
    train, val = data
    opts = dict(FAST, checkpoint_dir=str(tmp_path))
    fit(make_model(), train, val, **opts)  # finished: a resume only re-reads it
    for other, says in ((None, "chose its best epoch on a validation set, this call passes no validation set"),
                        ({"colors": val["colors"]}, "this call passes another one")):
        with pytest.raises(TaskSpecError, match=says):
            fit(make_model(), train, other, **opts, resume=True)
    assert len(fit(make_model(), train, val, **opts, resume=True).history) == FAST["epochs"]
    fit(make_model(), train, None, **opts)  # a run without val: one with val cannot resume it
    with pytest.raises(TaskSpecError, match="on no validation set, this call passes a validation set"):
        fit(make_model(), train, val, **opts, resume=True)


def test_bad_fit_arguments_are_named_before_training(data, tmp_path):
    train, _ = data
    (tmp_path / "file").write_text("x")
    from hipro_fast.errors import InvalidInputError, InvalidTypeError
    with pytest.raises(InvalidTypeError, match="callback must be callable"):
        fit(make_model(), train, None, **FAST, callback=5)
    with pytest.raises(InvalidInputError, match=r"checkpoint_dir .*file is a file, not a folder"):
        fit(make_model(), train, None, **FAST, checkpoint_dir=str(tmp_path / "file"))
    with pytest.warns(UserWarning, match="resume=True without checkpoint_dir has nothing to resume from"):
        fit(make_model(), train, None, **{**FAST, "epochs": 1}, resume=True)
    half = private_model().half()  # before: AdamW's first step turned the loss NaN, blamed on the lr
    with pytest.raises(InvalidInputError, match=r"fit trains fp32 \(or fp64\) contexts; this model's are "
                                                r"torch.float16 \(after model.half\(\)"):
        fit(half, train, None, **FAST)


def test_fit_and_evaluate_refuse_what_they_cannot_run_and_fit_leaves_no_gradients(data):
    from hipro_fast.errors import InvalidInputError, InvalidTypeError

    train, val = data
    with pytest.raises(InvalidTypeError, match="fit: model must be a HiProModel, got Linear"):
        fit(torch.nn.Linear(2, 2), train, None, **FAST)
    with pytest.raises(InvalidTypeError, match="evaluate: model must be a HiProModel, got Linear"):
        evaluate(torch.nn.Linear(2, 2), val)
    model = make_model()
    with torch.inference_mode():
        with pytest.raises(InvalidInputError, match=r"fit: called under torch.inference_mode\(\)"):
            fit(model, train, None, **FAST)
    if not torch.cuda.is_available():
        with pytest.raises(InvalidInputError, match="TrainConfig: device 'cuda', but this machine has no usable CUDA"):
            fit(model, train, None, device="cuda", **FAST)
    with pytest.raises(InvalidInputError, match="TrainConfig: 'gpu' is not a device"):
        fit(model, train, None, device="gpu", **FAST)
    # the gradients of its last step are not left on the contexts, where a later backward() would add to them
    fit(model, train, val, **{**FAST, "epochs": 2})
    assert all(p.grad is None for p in model.learnable().values())


def test_a_loss_that_turns_non_finite_later_leaves_the_best_state_so_far(data):
    """Diverging in epoch 1 (contexts poisoned after its first step): without val
    every finished epoch is the best so far, so the model ends at epoch 0's state."""
    train, _ = data
    model = make_model()
    seen = {}

    def callback(info):
        if (info["epoch"], info["step"]) == (0, 1):  # the last step of epoch 0 (2 per epoch)
            seen["epoch0"] = model.context_state()
        if (info["epoch"], info["step"]) == (1, 0):
            with torch.no_grad():
                model.ctx["task/colors"].fill_(float("nan"))

    with pytest.raises(NonFiniteLossError, match=r"epoch 1, step 1") as info:
        fit(model, train, None, epochs=3, optimizer="adamw", batch_size=4, steps_per_epoch=2, lr=0.05,
            callback=callback)
    assert info.value.epoch == 1
    after = model.context_state()
    assert set(after) == set(seen["epoch0"]) and all(torch.equal(after[n], seen["epoch0"][n]) for n in after)


def test_a_class_without_training_samples_is_said(data):
    train, _ = data
    x, y = train["colors"]
    keep = y != 1
    with pytest.warns(UserWarning, match=rf"task 'colors': class\(es\) \['{TASKS['colors'][1]}'\] have no training "
                                         r"samples \(1 of 3\)"):
        fit(make_model(), {**train, "colors": (x[keep], y[keep])}, None, **{**FAST, "epochs": 1})


def _bad(data, task, x=None, y=None):
    out = dict(data)
    ox, oy = out[task]
    out[task] = (ox if x is None else x, oy if y is None else y)
    return out


@pytest.mark.parametrize("case", ["extra_task", "missing_task", "empty", "label_high", "label_negative",
                                  "dim", "length", "nan", "float_labels", "not_pair", "inf_labels",
                                  "string_labels", "ragged_features"])
def test_bad_inputs_name_the_culprit(data, case):
    train, _ = data
    x, y = train["colors"]
    cases = {
        "extra_task": ({**train, "shapes": (x, y)}, r"'shapes'.*model lacks"),
        "missing_task": ({t: v for t, v in train.items() if t != "vehicles"}, r"'vehicles' is missing"),
        "empty": (_bad(train, "colors", x[:0], y[:0]), r"'colors'.*empty"),
        "label_high": (_bad(train, "colors", y=torch.where(y == 1, 5, y)),
                       r"'colors'.*label 5 .*out of range.*3 classes"),
        "label_negative": (_bad(train, "animals", y=-train["animals"][1]), r"'animals'.*label -\d+"),
        "dim": (_bad(train, "vehicles", x=torch.randn(train["vehicles"][0].shape[0], 16)),
                r"'vehicles'.*dim 16.*embed_dim 24"),
        "length": (_bad(train, "colors", y=y[:-1]), r"'colors'.*\d+ feature rows but \d+ labels"),
        "nan": (_bad(train, "colors", x=torch.where(torch.arange(x.shape[0])[:, None] == 3, float("nan"), x)),
                r"'colors'.*non-finite.*sample 3"),
        "float_labels": (_bad(train, "colors", y=y.float() + 0.5), r"'colors'.*labels must be integers"),
        "not_pair": ({**train, "colors": x}, r"'colors'.*\(features, labels\) pair"),
        # before: "label -9223372036854775808", and raw ValueErrors naming no task
        "inf_labels": (_bad(train, "colors", y=torch.where(y == 1, float("inf"), y.float())),
                       r"'colors'.*labels must be integers"),
        "string_labels": (_bad(train, "colors", y=[str(int(v)) for v in y]),
                          r"task 'colors': train labels must be a tensor, an array or a list of numbers"),
        "ragged_features": (_bad(train, "colors", x=[[0.0] * 24, [0.0] * 23]),
                            r"task 'colors': train features must be a tensor"),
    }
    bad, pattern = cases[case]
    with pytest.raises(TaskSpecError, match=pattern):
        fit(make_model(), bad, None, epochs=1, optimizer="adamw", batch_size=4, steps_per_epoch=1)


def test_bad_val_and_eval_inputs(data):
    train, val = data
    x, y = val["colors"]
    with pytest.raises(TaskSpecError, match=r"val data has task 'shapes'"):
        fit(make_model(), train, {"shapes": (x, y)}, epochs=1)
    with pytest.raises(TaskSpecError, match=r"'colors'.*eval label 3 .*3 classes"):
        evaluate(make_model(), {"colors": (x, torch.full_like(y, 3))})
    with pytest.raises(TypeError, match="unknown training option 'epoch'"):
        fit(make_model(), train, epoch=3)
    with pytest.raises(ValueError, match="amp must be one of"):
        fit(make_model(), train, amp="int8")


def test_unnormalised_features_warn(data):
    train, _ = data
    bad = _bad(train, "colors", x=train["colors"][0] * 3)
    with pytest.warns(UserWarning, match="'colors'.*not L2-normalised"):
        fit(make_model(), bad, None, epochs=1, optimizer="adamw", batch_size=4, steps_per_epoch=1)


def test_evaluate_matches_manual_and_subset(data):
    _, val = data
    model = make_model()
    acc = evaluate(model, {"animals": val["animals"]}, batch_size=5)
    assert set(acc) == {"animals"}
    with torch.no_grad():
        x, y = val["animals"]
        pred = model.logits("animals", x).argmax(1)
    assert acc["animals"] == pytest.approx((pred == y).float().mean().item())


def test_evaluate_loss_is_the_mean_cross_entropy_over_batches(data):
    """metric="loss": the task's mean cross-entropy, whatever the batch split
    (the sums of 5-sample batches over the task's size)."""
    _, val = data
    model = make_model()
    loss = evaluate(model, val, batch_size=5, metric="loss")
    assert set(loss) == set(TASKS)
    with torch.no_grad():
        for task, (x, y) in val.items():
            expected = torch.nn.functional.cross_entropy(model.logits(task, x), y).item()
            assert loss[task] == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError, match="metric must be one of"):
        evaluate(model, val, metric="top5")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("amp", [None, "bf16", "fp16"])
def test_cuda_fit(data, amp):
    train, val = data
    model = private_model()
    res = fit(model, train, val, device="cuda", amp=amp, **FAST)
    assert all(p.device.type == "cuda" and p.dtype == torch.float32 for p in model.ctx.values())
    assert all(math.isfinite(h["loss"]) for h in res.history)
    assert set(evaluate(model, val)) == set(TASKS)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("amp", [None, "bf16"])
def test_cuda_fit_lbfgs_matches_the_cpu(data, amp):
    """The default optimiser on CUDA: fp32 follows the CPU run's trajectory
    (same line-search decisions, contexts within 1e-4 relative); bf16 trains."""
    train, val = data
    run = dict(optimizer="lbfgs", batch_size="full", epochs=2, steps_per_epoch=3, seed=0)
    cuda = fit(private_model(), train, val, device="cuda", amp=amp, **run)
    assert all(math.isfinite(h["loss"]) for h in cuda.history)
    if amp is None:
        cpu = fit(private_model(), train, val, **run)
        assert all(v.device.type == "cpu" for v in cpu.final_state.values())
        for n, v in cpu.final_state.items():
            torch.testing.assert_close(cuda.final_state[n].cpu(), v, rtol=1e-4, atol=1e-5)


def test_budget_rule_floors_the_number_of_steps(data):
    """Epochs alone starve small tasks; the default budget gives every task size
    at least min_steps optimiser steps, and large tasks one pass per epoch."""
    from hipro_fast.method.training import default_steps_per_epoch

    tiny = {"a": (torch.zeros(20, 2), torch.zeros(20))}
    big = {"a": (torch.zeros(20, 2), torch.zeros(20)), "b": (torch.zeros(3200, 2), torch.zeros(3200))}
    assert default_steps_per_epoch(tiny, 32, epochs=50, min_steps=0) == 1
    assert default_steps_per_epoch(tiny, 32, epochs=50, min_steps=200) == 4      # 50 x 4 = 200
    assert default_steps_per_epoch(tiny, 32, epochs=3, min_steps=200) == 67      # ceil(200 / 3)
    assert default_steps_per_epoch(big, 32, epochs=50, min_steps=200) == 100     # one pass of the largest task
    assert TrainConfig().min_steps == 800
    train, val = data
    res = fit(make_model(), train, val, epochs=2, optimizer="adamw", batch_size=4, min_steps=9, lr=0.05)
    assert res.config.steps_per_epoch == 5 and len(res.history) == 2
    with pytest.raises(ValueError, match="min_steps must be >= 0"):
        fit(make_model(), train, val, epochs=1, min_steps=-1)


def test_full_batch_uses_every_sample_in_every_step(data):
    """batch_size "full": each step's per-task loss is the CE over the task's whole
    training set, and the budget rule counts one step per pass."""
    from hipro_fast.method.training import default_steps_per_epoch

    train, _ = data
    b = batch_indices(7, 3, "full", seed=0, epoch=0, task="a")
    assert b.shape == (3, 7) and all(row.tolist() == list(range(7)) for row in b)
    assert default_steps_per_epoch(train, "full", epochs=2, min_steps=0) == 1
    assert default_steps_per_epoch(train, "full", epochs=2, min_steps=9) == 5
    init = make_model()
    seen = []
    res = fit(make_model(), train, None, optimizer="adamw", epochs=1, batch_size="full", min_steps=0, seed=5,
              callback=seen.append)
    assert res.config.steps_per_epoch == 1 and len(seen) == 1
    with torch.no_grad():
        feats = init.text_features()
        for task, (x, y) in train.items():
            expected = F.cross_entropy(init.logit_scale * x @ feats[task].t(), y).item()
            assert seen[0]["task_loss"][task] == pytest.approx(expected, rel=1e-5)


def test_adamw_step_matches_torch_adamw(data):
    """optimizer="adamw": one full-batch step equals torch's AdamW applied by hand
    to the same gradient (decoupled weight decay included)."""
    train, _ = data
    run = dict(epochs=1, warmup_epochs=0, steps_per_epoch=1, batch_size="full", lr=0.05, weight_decay=0.3, seed=0)
    got = fit(make_model(), train, None, optimizer="adamw", **run).final_state
    sgd = fit(make_model(), train, None, optimizer="sgd", **run).final_state
    model = make_model()
    params = [p for p in model.learnable().values() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=0.05, weight_decay=0.3)
    feats = model.text_features()
    loss = sum(F.cross_entropy(model.logits(t, x, feats), y) for t, (x, y) in train.items()) / len(train)
    loss.backward()
    opt.step()
    for name, p in model.learnable().items():
        torch.testing.assert_close(got[name], p.detach(), rtol=1e-5, atol=1e-6)
        assert not torch.allclose(got[name], sgd[name])  # the option reaches the optimiser
    with pytest.raises(ValueError, match="optimizer must be one of"):
        fit(make_model(), train, None, optimizer="rmsprop", **run)


def test_lbfgs_epochs_match_torch_lbfgs(data):
    """optimizer="lbfgs": two epochs of 3 iterations equal torch's LBFGS (strong
    Wolfe, lr 1) run by hand for 3 iterations twice on the full-batch objective
    (mean task cross-entropy + the parent prior), its state carried over."""
    train, _ = data
    run = dict(epochs=2, steps_per_epoch=3, batch_size="full", seed=0)
    seen = []
    res = fit(make_model(parent_prior=2.0), train, None, optimizer="lbfgs", callback=seen.append, **run)
    model = make_model(parent_prior=2.0)  # a prior large enough to steer the line search
    params = [p for p in model.learnable().values() if p.requires_grad]
    opt = torch.optim.LBFGS(params, lr=1.0, max_iter=3, max_eval=30, history_size=100, line_search_fn="strong_wolfe")
    evals = []

    def closure():
        opt.zero_grad()
        feats = model.text_features()
        loss = sum(F.cross_entropy(model.logits(t, x, feats), y) for t, (x, y) in train.items()) / len(train)
        loss = loss + model.regularization()
        loss.backward()
        evals.append(float(loss.detach()))
        return loss

    for _ in range(2):
        opt.step(closure)
    for name, p in model.learnable().items():
        torch.testing.assert_close(res.final_state[name], p.detach(), rtol=1e-5, atol=1e-6)
    assert len(seen) == len(evals) > 6  # every evaluation (line-search trials too) is reported
    assert all(h["lr"] == 1.0 for h in res.history)
    with pytest.raises(ValueError, match="optimizer 'lbfgs' needs batch_size 'full'"):
        fit(make_model(), train, None, optimizer="lbfgs", epochs=1, batch_size=4)
    with pytest.raises(ValueError, match="does not run under amp 'fp16'"):
        fit(make_model(), train, None, optimizer="lbfgs", epochs=1, batch_size="full", amp="fp16")


def test_lbfgs_line_search_compares_the_whole_objective(data, monkeypatch):
    """The value L-BFGS's line search compares is the training objective: the
    mean task cross-entropy plus the hierarchy prior (not the logged loss alone)."""
    train, _ = data
    seen = []
    make = training.make_optimizer

    def spy(config, params):
        opt = make(config, params)
        step = opt.step

        def step_and_record(closure):
            seen.append(float(closure()))  # the objective at the epoch's start (parameters unchanged)
            return step(closure)

        opt.step = step_and_record
        return opt

    monkeypatch.setattr(training, "make_optimizer", spy)
    model = make_model(parent_prior=2.0)
    with torch.no_grad():
        feats = model.text_features()
        ce = sum(F.cross_entropy(model.logits(t, x, feats), y) for t, (x, y) in train.items()) / len(train)
        expected = float(ce + model.regularization())
    assert float(model.regularization().detach()) > 0.01 * expected
    fit(model, train, None, optimizer="lbfgs", epochs=1, steps_per_epoch=1, batch_size="full")
    assert seen[0] == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("bad, pattern", [({"batch_size": 0}, r"batch_size must be an integer >= 1 or 'full', got 0"),
                                          ({"batch_size": "all"}, r"got 'all'"),
                                          ({"optimizer": "adam"},
                                           r"optimizer must be one of \('sgd', 'adamw', 'lbfgs'\)")])
def test_bad_optimizer_and_batch_options_name_the_value(data, bad, pattern):
    train, _ = data
    with pytest.raises(ValueError, match=pattern):
        fit(make_model(), train, None, epochs=1, **bad)


def test_evaluate_refuses_a_batch_size_below_one(data):
    _, val = data
    for bad in (0, -1, 2.5):
        with pytest.raises(ValueError, match=f"batch_size must be an integer >= 1, got {bad!r}"):
            evaluate(make_model(), val, batch_size=bad)


def test_a_warmup_as_long_as_the_run_is_said(data):
    """warmup_epochs >= epochs keeps every step at warmup_lr (1e-5 by default):
    almost no training. Allowed, but said."""
    train, val = data
    with pytest.warns(UserWarning, match="warmup_epochs 1 >= epochs 1: every step runs at warmup_lr"):
        fit(make_model(), train, val, **{**FAST, "epochs": 1, "warmup_epochs": 1})
    with warnings.catch_warnings():  # L-BFGS has no learning-rate schedule: nothing to say
        warnings.simplefilter("error", UserWarning)
        fit(make_model(), train, val, optimizer="lbfgs", batch_size="full", epochs=1, steps_per_epoch=2)
        fit(make_model(), train, val, **{**FAST, "epochs": 2.0})  # an integral float is an integer


def test_a_path_and_a_torch_device_are_welcome_as_options(data, tmp_path):
    """checkpoint_dir=Path(...) and device=torch.device(...) used to fail after
    the first epoch, when the checkpoint wrote its config as JSON."""
    from pathlib import Path

    train, _ = data
    res = fit(make_model(), train, None, checkpoint_dir=Path(tmp_path), device=torch.device("cpu"),
              **{**FAST, "epochs": 2})
    assert res.config.checkpoint_dir == str(tmp_path) and res.config.device == "cpu"
    assert (tmp_path / "last.json").exists()
    with pytest.raises(TypeError, match="checkpoint_dir must be a path, got int"):
        fit(make_model(), train, None, checkpoint_dir=3, **FAST)
    with pytest.raises(TypeError, match="device must be a string, torch.device or CUDA index, got float"):
        fit(make_model(), train, None, device=0.0, **FAST)
