"""Task affinity estimators: batched look-ahead / gradient cosine against naive
per-task loops, transfer semantics, output files, input errors."""
import json
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hipro_fast.app.plots import plot_affinity
from hipro_fast.errors import TaskSpecError
from hipro_fast.method.affinity import (DEFAULTS, load_affinity_json, save_affinity_json,
                                        task_affinity, zscore_columns)
from hipro_fast.data.clip_loading import LoadedClip
from hipro_fast.engine.encoder import ForestEncoder
from hipro_fast.engine.text_tower import TextTower
from tests import oracle

TASKS = {"pets": ["cat", "dog", "hamster"], "cars": ["car", "bus", "truck"], "food": ["pizza", "apple"]}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny():
    model = oracle.tiny_clip(width=64, heads=4, layers=2, quick_gelu=False)
    return model, oracle.tokenizer()


def toy_data(tasks, n_per_class=2, seed=0, dim=24):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for t, classes in tasks.items():
        y = torch.arange(len(classes)).repeat_interleave(n_per_class)
        x = F.normalize(torch.randn(y.numel(), dim, generator=g), dim=-1)
        out[t] = (x, y)
    return out


@pytest.mark.parametrize("method", ["transfer", "lookahead", "gradcos"])
def test_shape_symmetry_and_clip_forms(tiny, method):
    model, tok = tiny
    data = toy_data(TASKS)
    kw = dict(steps=3, n_ctx=2, every=1) if method != "transfer" else dict(steps=3, n_ctx=2)
    a = task_affinity((model, tok), TASKS, data, method=method, **kw)
    assert a.shape == (3, 3) and a.dtype == np.float64
    assert np.all(np.isfinite(a)) and np.allclose(a, a.T)
    b = task_affinity(LoadedClip(model, tok, None, "tiny", None), TASKS, data, method=method, **kw)
    c = task_affinity(model, TASKS, data, method=method, tokenizer=tok, **kw)
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
    np.testing.assert_allclose(a, c, rtol=0, atol=1e-6)
    assert all(not p.requires_grad for p in model.parameters())


def _naive_per_task(model, tok, tasks, data, ctx, lr):
    """Per-task loss, gradient and look-ahead losses, one task at a time (no batching)."""
    tower = TextTower(model)
    scale = float(model.logit_scale.exp())
    names = list(tasks)

    def loss_of(task, c):
        enc = ForestEncoder(tower, tok, {"root": c.shape[0]}, {task: ["root"]}, {task: tasks[task]})
        x, y = data[task]
        return F.cross_entropy(scale * x @ enc({"root": c})[task].t(), y)

    before, grads = {}, {}
    for t in names:
        c = ctx.clone().requires_grad_(True)
        loss = loss_of(t, c)
        (g,) = torch.autograd.grad(loss, c)
        before[t], grads[t] = float(loss.detach()), g
    z = np.zeros((len(names), len(names)))
    cos = np.zeros_like(z)
    with torch.no_grad():
        for i, ti in enumerate(names):
            for j, tj in enumerate(names):
                z[i, j] = 1 - float(loss_of(tj, ctx - lr * grads[ti])) / before[tj]
                cos[i, j] = float(F.cosine_similarity(grads[ti].flatten(), grads[tj].flatten(), dim=0))
    return z, cos


def test_batched_lookahead_and_gradcos_match_naive_loops(tiny):
    model, tok = tiny
    data = toy_data(TASKS, seed=1)
    n_ctx, seed, lr = 3, 5, 0.05
    # One step, measured at step 0: the shared context is still its initialisation.
    gen = torch.Generator().manual_seed(seed)
    init = torch.randn(n_ctx, 64, generator=gen) * 0.02
    z, cos = _naive_per_task(model, tok, TASKS, data, init, lr)
    look = task_affinity((model, tok), TASKS, data, method="lookahead", steps=1, every=1, n_ctx=n_ctx,
                         seed=seed, lookahead_lr=lr)
    np.testing.assert_allclose(look, (z + z.T) / 2, rtol=1e-4, atol=1e-6)
    gc = task_affinity((model, tok), TASKS, data, method="gradcos", steps=1, every=1, n_ctx=n_ctx, seed=seed)
    np.testing.assert_allclose(gc, cos, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.diag(gc), 1.0, atol=1e-5)


def test_transfer_matches_its_definition_task_by_task(tiny):
    """The transfer estimator rebuilt from its definition, one task at a time:
    each task's prompt trained alone from the shared init (Adam, cosine lr, full
    batch), s[i, j] = -log L_j(prompt i), every column standardised over the
    OTHER tasks' prompts (mean 0, std 1 over i != j), then (Z + Z^T) / 2; and
    normalize="own": s[i, j] - s[j, j]. Four tasks, so a column's standardised
    off-diagonal entries are not just +-1."""
    model, tok = tiny
    tasks = {**TASKS, "tools": ["hammer", "saw", "drill"]}
    data = toy_data(tasks, seed=3)
    n_ctx, steps, lr, seed = 2, 4, 0.05, 1
    tower = TextTower(model)
    scale = float(model.logit_scale.exp())
    names = list(tasks)

    def features(task, prompt):
        enc = ForestEncoder(tower, tok, {"p": n_ctx}, {task: ["p"]}, {task: tasks[task]})
        return enc({"p": prompt})[task]

    init = torch.randn(n_ctx, 64, generator=torch.Generator().manual_seed(seed)) * 0.02
    prompts = {}
    for t in names:
        c = init.clone().requires_grad_(True)
        opt = torch.optim.Adam([c], lr=lr)
        x, y = data[t]
        for step in range(steps):
            opt.param_groups[0]["lr"] = 0.5 * lr * (1 + math.cos(math.pi * step / steps))
            loss = F.cross_entropy(scale * x @ features(t, c).t(), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        prompts[t] = c.detach()
    s = np.zeros((4, 4))
    with torch.no_grad():
        for i, ti in enumerate(names):
            for j, tj in enumerate(names):
                x, y = data[tj]
                s[i, j] = -math.log(float(F.cross_entropy(scale * x @ features(tj, prompts[ti]).t(), y)))
    z = np.empty_like(s)
    for j in range(4):
        others = np.delete(s[:, j], j)
        z[:, j] = (s[:, j] - others.mean()) / others.std()
    kw = dict(method="transfer", n_ctx=n_ctx, steps=steps, lr=lr, seed=seed)
    got = task_affinity((model, tok), tasks, data, **kw)
    # rtol too: a z-score divides fp32 loss differences by the other prompts'
    # small spread, so large entries (the diagonal) carry ~1e-5 relative noise
    # from the attention's summation order.
    np.testing.assert_allclose(got, (z + z.T) / 2, rtol=1e-4, atol=1e-3)
    own = s - np.diag(s)[None, :]
    np.testing.assert_allclose(task_affinity((model, tok), tasks, data, normalize="own", **kw), (own + own.T) / 2,
                               rtol=0, atol=1e-4)
    assert np.abs(z - s).max() > 0.5  # the standardisation changes the matrix: the check can tell


def test_transfer_ranks_a_duplicated_task_first(tiny):
    """Two copies of one task (same classes, same data) are each other's best source."""
    model, tok = tiny
    tasks = {"a": ["cat", "dog", "fox"], "a_copy": ["cat", "dog", "fox"], "b": ["car", "bus", "van"],
             "c": ["red", "green", "blue"]}
    data = toy_data({k: v for k, v in tasks.items() if k != "a_copy"}, n_per_class=3, seed=2)
    data["a_copy"] = data["a"]
    a = task_affinity((model, tok), tasks, data, method="transfer", steps=15, n_ctx=4)
    masked = a - 1e9 * np.eye(4)
    assert masked[:, 0].argmax() == 1 and masked[:, 1].argmax() == 0  # each is the other's best source
    own = task_affinity((model, tok), tasks, data, method="transfer", steps=15, n_ctx=4, normalize="own")
    np.testing.assert_allclose(np.diag(own), 0.0, atol=1e-12)  # "own": log-loss relative to the own prompt
    assert own[0, 1] == pytest.approx(0.0, abs=1e-5)  # identical prompts (same init, same data)
    assert (own - 1e9 * np.eye(4)).argmax() in (1, 4)


def test_zscore_columns():
    s = np.array([[9.0, 1.0, 2.0], [1.0, 9.0, 4.0], [3.0, 5.0, 9.0]])
    z = zscore_columns(s)
    for j in range(3):
        col = np.delete(z[:, j], j)
        assert col.mean() == pytest.approx(0.0) and col.std() == pytest.approx(1.0)
    assert np.all(zscore_columns(np.ones((3, 3))) == 0.0)


def test_single_task_and_progress(tiny):
    model, tok = tiny
    one = {"pets": TASKS["pets"]}
    assert task_affinity((model, tok), one, toy_data(one)).tolist() == [[1.0]]
    steps = []
    task_affinity((model, tok), TASKS, toy_data(TASKS), method="gradcos", steps=2, n_ctx=1,
                  progress=steps.append)
    assert steps == [0, 1]


def test_input_errors(tiny):
    model, tok = tiny
    data = toy_data(TASKS)
    clip = (model, tok)
    with pytest.raises(ValueError, match="unknown affinity method"):
        task_affinity(clip, TASKS, data, method="tag")
    with pytest.raises(TypeError, match="no option 'every'"):
        task_affinity(clip, TASKS, data, method="transfer", every=3)
    with pytest.raises(TaskSpecError, match="task 'food' is missing from the train data"):
        task_affinity(clip, TASKS, {k: v for k, v in data.items() if k != "food"})
    with pytest.raises(TaskSpecError, match="train data has task 'extra'"):
        task_affinity(clip, TASKS, {**data, "extra": data["food"]})
    bad = dict(data, cars=(torch.randn(6, 10), data["cars"][1]))
    with pytest.raises(TaskSpecError, match=r"'cars': train feature dim 10 does not match the model's embed_dim 24"):
        task_affinity(clip, TASKS, bad)
    bad = dict(data, food=(data["food"][0], torch.tensor([0, 1, 2, 0])))
    with pytest.raises(TaskSpecError, match=r"'food': train label 2 \(sample 2\) is out of range for its 2 classes"):
        task_affinity(clip, TASKS, bad)
    with pytest.raises(ValueError, match="score"):
        task_affinity(clip, TASKS, data, steps=1, n_ctx=1, score="f1")
    with pytest.raises(ValueError, match="normalize"):
        task_affinity(clip, TASKS, data, method="gradcos", steps=1, n_ctx=1, normalize="own")
    with pytest.raises(ValueError, match=">= 1"):
        task_affinity(clip, TASKS, data, steps=0)
    assert set(DEFAULTS) == {"transfer", "lookahead", "gradcos"}


def test_save_load_and_plot(tmp_path):
    m = np.array([[1.0, 0.5, -0.2], [0.5, 1.0, 0.1], [-0.2, 0.1, 1.0]])
    names = ["x", "y", "z"]
    p = save_affinity_json(m, names, tmp_path / "out" / "affinity.json", method="transfer", config={"steps": 3})
    data = json.loads(p.read_text())
    assert data["tasks"] == names and data["method"] == "transfer" and data["config"] == {"steps": 3}
    m2, names2, _ = load_affinity_json(p)
    np.testing.assert_array_equal(m, m2)
    assert names2 == names
    save_affinity_json(m, names, p)  # overwrite; positional (matrix, names, path) as the CLI calls it
    assert sorted(os.listdir(p.parent)) == ["affinity.json"]  # no temp files left behind
    with pytest.raises(ValueError, match="does not match"):
        save_affinity_json(m, ["x", "y"], tmp_path / "bad.json")
    assert not (tmp_path / "bad.json").exists()
    png = plot_affinity(m, names, tmp_path / "aff.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("method", ["transfer", "lookahead"])
def test_task_order_permutes_the_affinity(tiny, method):
    """Listing the tasks in another order permutes the matrix and changes nothing
    else, also when every task is sampled in mini-batches: each task draws its
    batches from its own (seed, task) stream."""
    model, tok = tiny
    data = toy_data(TASKS, n_per_class=4)
    kw = dict(steps=4, n_ctx=2, batch_size=5, seed=3) | (dict(every=1) if method == "lookahead" else {})
    assert all(y.numel() > kw["batch_size"] for _, y in data.values())  # every task is mini-batched
    a = task_affinity((model, tok), TASKS, data, method=method, **kw)
    order = ["food", "pets", "cars"]
    b = task_affinity((model, tok), {t: TASKS[t] for t in order}, {t: data[t] for t in order}, method=method, **kw)
    idx = [list(TASKS).index(t) for t in order]
    np.testing.assert_allclose(b, a[np.ix_(idx, idx)], rtol=0, atol=1e-5)
    # The seed still matters: another seed draws other batches.
    c = task_affinity((model, tok), TASKS, data, method=method, **{**kw, "seed": 4})
    assert not np.allclose(a, c, rtol=0, atol=1e-5)
