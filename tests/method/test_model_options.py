"""HiProModel's hierarchy options: learned path weights, init from the parent,
the parent prior; exact against open_clip, gradients to every learned tensor,
checkpoints and from_config."""
import math

import pytest
import torch
import torch.nn.functional as F

import hipro_fast as hf
from hipro_fast.method.checkpoint import load_checkpoint, save_checkpoint
from tests import oracle

TASKS = {"a": ["dog", "cat"], "b": ["car", "bus", "bike"], "c": ["pizza", "pasta"]}
TREE = [["a", "b"], "c"]


@pytest.fixture(scope="module")
def tiny(tiny_models):
    return tiny_models["w64_h4_l2_gelu"]


def _model(tiny, tokenizer, **kw):
    return hf.HiProModel(tiny, TASKS, TREE, n_ctx=3, combine="mean", tokenizer=tokenizer, seed=2, **kw)


def test_learned_path_weights_start_toward_the_leaf(tiny, tokenizer):
    model = _model(tiny, tokenizer, path_weights="learned", leaf_weight=0.7)
    w = model.path_weight_values()
    torch.testing.assert_close(w["a"], torch.tensor([0.15, 0.15, 0.7]))   # root, root/0, task/a
    torch.testing.assert_close(w["c"], torch.tensor([0.3, 0.7]))          # root, task/c
    assert set(model.learnable()) == set(model.ctx) | {"path/a", "path/b", "path/c"}


def test_weighted_features_equal_open_clip_per_node_features(tiny, tokenizer):
    """normalize(sum_k w_k f_k) where f_k is open_clip's own feature of
    [SOS] ctx[node_k] class. [EOS] at full length."""
    model = _model(tiny, tokenizer, path_weights="learned", leaf_weight=0.6)
    logits = {t: torch.linspace(-0.7, 0.9, p.numel()) * (1 + len(t)) for t, p in model.path_logits.items()}
    with torch.no_grad():  # generic weights, not the init's symmetric ones
        for t, p in model.path_logits.items():
            p.copy_(logits[t])
    feats = model.text_features()
    weights = {t: torch.softmax(x.double(), 0).float() for t, x in logits.items()}  # not the model's own softmax
    torch.testing.assert_close(model.path_weight_values(), weights)
    ctx = {n: p.detach() for n, p in model.ctx.items()}
    for task, classes in TASKS.items():
        path = model.context_path(task)
        per_node = torch.stack([
            oracle.task_features(tiny, tokenizer, ctx, {task: [n]}, {task: classes}, "concat")[task] for n in path])
        expected = F.normalize((weights[task].detach()[:, None, None] * per_node).sum(0), dim=-1)
        torch.testing.assert_close(feats[task], expected, atol=1e-5, rtol=0)


def test_uniform_weights_are_the_plain_mean(tiny, tokenizer):
    plain = _model(tiny, tokenizer)
    learned = _model(tiny, tokenizer, path_weights="learned", leaf_weight=0.5)
    with torch.no_grad():
        for p in learned.path_logits.values():
            p.zero_()
    a, b = plain.text_features(), learned.text_features()
    for t in TASKS:
        torch.testing.assert_close(a[t], b[t], atol=1e-6, rtol=0)


def test_gradients_reach_every_context_and_path_weight(tiny, tokenizer):
    model = _model(tiny, tokenizer, path_weights="learned", parent_prior=0.5)
    feats = model.text_features()
    loss = sum((f * torch.randn_like(f)).sum() for f in feats.values()) + model.regularization()
    loss.backward()
    for name, p in model.learnable().items():
        assert p.grad is not None and float(p.grad.abs().sum()) > 0, name


def test_parent_prior_is_the_stated_penalty(tiny, tokenizer):
    model = _model(tiny, tokenizer, parent_prior=0.25)
    ctx = model.ctx
    pairs = [("root/0", "root"), ("task/a", "root/0"), ("task/b", "root/0"), ("task/c", "root")]
    expected = 0.25 * sum(float((ctx[c] - ctx[p]).detach().pow(2).sum()) / 3 for c, p in pairs) / len(pairs)
    assert float(model.regularization().detach()) == pytest.approx(expected, rel=1e-6)
    assert _model(tiny, tokenizer).regularization() is None


def test_init_from_parent_copies_the_parent_and_keeps_other_draws(tiny, tokenizer):
    plain = _model(tiny, tokenizer)
    copied = _model(tiny, tokenizer, init_from_parent=True)
    torch.testing.assert_close(copied.ctx["root"], plain.ctx["root"])
    for node in ("root/0", "task/a", "task/b", "task/c"):
        torch.testing.assert_close(copied.ctx[node], copied.ctx[copied.context_parent(node)])
    feats = copied.text_features()   # every path starts as one shared prompt
    torch.testing.assert_close(feats["a"], F.normalize(
        oracle.task_features(tiny, tokenizer, {"root": copied.ctx["root"].detach()}, {"a": ["root"]},
                             {"a": TASKS["a"]}, "concat")["a"], dim=-1), atol=1e-5, rtol=0)


def test_prior_lowers_the_distance_to_the_parent_in_training(tiny, tokenizer):
    train = {t: (torch.nn.functional.normalize(torch.randn(8, 24), dim=-1), torch.arange(8) % len(c))
             for t, c in TASKS.items()}
    dist = {}
    for prior in (0.0, 100.0):
        model = _model(tiny, tokenizer, parent_prior=prior)
        hf.fit(model, train, None, epochs=3, steps_per_epoch=5, lr=0.05, min_steps=0)
        dist[prior] = float((model.ctx["task/a"] - model.ctx["root/0"]).detach().norm())
    assert dist[100.0] < 0.7 * dist[0.0], dist   # measured 0.55


def test_options_survive_checkpoint_and_from_config(tiny, tokenizer, tmp_path):
    model = _model(tiny, tokenizer, path_weights="learned", leaf_weight=0.8, parent_prior=0.1)
    with torch.no_grad():
        model.path_logits["b"].add_(0.3)
    save_checkpoint(tmp_path, model, None, 0, [], kind="last")
    again = hf.HiProModel.from_config(tiny, model.config(), tokenizer=tokenizer)
    assert (again.path_weights, again.leaf_weight, again.parent_prior) == ("learned", 0.8, 0.1)
    load_checkpoint(tmp_path, again, kind="last")
    a, b = model.text_features(), again.text_features()
    for t in TASKS:
        torch.testing.assert_close(a[t], b[t])
    plain = _model(tiny, tokenizer)
    with pytest.raises(hf.CheckpointError, match="path_weights 'learned' differs from the model's 'uniform'"):
        load_checkpoint(tmp_path, plain, kind="last")


@pytest.mark.parametrize("kw, match", [
    (dict(path_weights="softmax"), "path_weights must be one of"),
    (dict(path_weights="learned", combine="concat"), "needs combine='mean'"),
    (dict(leaf_weight=1.0, path_weights="learned"), r"leaf_weight must be in \(0, 1\)"),
    (dict(parent_prior=-1.0), "parent_prior must be a finite number >= 0"),
    (dict(parent_prior=math.nan), "parent_prior must be a finite number >= 0"),
    (dict(parent_prior=math.inf), "parent_prior must be a finite number >= 0"),  # the objective was inf
    (dict(n_ctx=2.9), "node 'root': n_ctx must be a whole number, got 2.9"),  # silently 2
    (dict(n_ctx=True), "n_ctx must be a whole number, got True"),
    (dict(n_ctx={"root": "4"}), "node 'root': n_ctx must be a whole number, got '4'"),
    (dict(parent_prior=1.0, combine="concat"), "only compares like with like"),
])
def test_bad_options_are_named(tiny, tokenizer, kw, match):
    args = dict(n_ctx=3, combine="mean", tokenizer=tokenizer)
    args.update(kw)
    with pytest.raises(ValueError, match=match):
        hf.HiProModel(tiny, TASKS, TREE, **args)


def test_a_class_list_given_as_a_string_is_refused(tiny, tokenizer):
    """{"a": "cat"} made the classes ['c', 'a', 't']."""
    with pytest.raises(ValueError, match=r"task 'a': classes must be a list of class names, got 'cat'"):
        hf.HiProModel(tiny, {**TASKS, "a": "cat"}, TREE, n_ctx=3, tokenizer=tokenizer)


def test_no_context_anywhere_gives_the_bare_class_prompts(tiny, tokenizer):
    """n_ctx 0 on every node (concat): the prompts are "[SOS] class. [EOS]",
    open_clip's own features of them (before: torch.cat of an empty list)."""
    model = hf.HiProModel(tiny, TASKS, TREE, n_ctx=0, combine="concat", tokenizer=tokenizer)
    assert len(model.ctx) == 0
    with torch.no_grad():
        feats = model.text_features()
    none = torch.zeros(0, tiny.token_embedding.weight.shape[1])
    for task, classes in TASKS.items():
        embs, eos = zip(*(oracle.embedded_prompt(tiny, tokenizer, none, name) for name in classes))
        expected = oracle.open_clip_features(tiny, torch.stack(embs), torch.tensor(eos))
        torch.testing.assert_close(feats[task], expected.detach(), atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_low_precision_tower_trains_fp32_contexts(tokenizer, dtype):
    """A CLIP loaded in bf16 / fp16: the contexts stay fp32 masters, the forest
    runs in the tower's dtype (before: a dtype mismatch in the first LayerNorm),
    the features are the fp32 tower's within that precision, gradients reach the contexts."""
    clip32 = oracle.tiny_clip(**oracle.TINY_CONFIGS["w64_h4_l2_gelu"])
    clip16 = oracle.tiny_clip(**oracle.TINY_CONFIGS["w64_h4_l2_gelu"]).to(dtype)
    m32, m16 = (hf.HiProModel(c, TASKS, TREE, n_ctx=3, combine="concat", tokenizer=tokenizer, seed=1)
                for c in (clip32, clip16))
    assert all(p.dtype == torch.float32 for p in m16.ctx.values())
    f16, f32 = m16.text_features(), m32.text_features()
    for task in TASKS:
        assert f16[task].dtype == torch.float32
        torch.testing.assert_close(f16[task], f32[task].detach(), atol=0.05, rtol=0)
    sum(f.sum() for f in f16.values()).backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 and p.grad.abs().sum() > 0
               for p in m16.ctx.values())


def test_a_phrase_starts_the_first_context_of_every_concat_path_and_keeps_the_others_length(tiny, tokenizer):
    phrase = "a photo of a"
    n_phrase = len(tokenizer.encode(phrase))
    ids = torch.tensor(tokenizer.encode(phrase))
    embedding = tiny.token_embedding.weight[ids].detach()
    # CoOp per task in concat mode: no root context, so each leaf's context starts the prompt
    per_task = hf.HiProModel(tiny, TASKS, list(TASKS), n_ctx={"root": 0, **{f"task/{t}": 3 for t in TASKS}},
                             combine="concat", ctx_init=phrase, tokenizer=tokenizer)
    for t in TASKS:
        torch.testing.assert_close(per_task.ctx[f"task/{t}"].detach(), embedding, rtol=0, atol=0)
    # a root from the phrase: below it, init_from_parent copies only a parent of the node's own length
    tree = hf.HiProModel(tiny, TASKS, TREE, n_ctx=3, combine="concat", ctx_init=phrase, tokenizer=tokenizer,
                         init_from_parent=True)
    assert tree.ctx["root"].shape[0] == n_phrase != 3
    torch.testing.assert_close(tree.ctx["root"].detach(), embedding, rtol=0, atol=0)
    assert {n: p.shape[0] for n, p in tree.ctx.items() if n != "root"} == \
        {"root/0": 3, "task/a": 3, "task/b": 3, "task/c": 3}
    torch.testing.assert_close(tree.ctx["task/a"], tree.ctx["root/0"])  # same length: copied
