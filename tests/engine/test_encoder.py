"""ForestEncoder used on its own: its inputs are checked, its forest moves
between devices only, and one built under inference_mode still trains."""
import pickle

import pytest
import torch

from hipro_fast.engine.encoder import ForestEncoder
from hipro_fast.engine.text_tower import TextTower
from hipro_fast.errors import InvalidInputError, InvalidTypeError


def _encoder(tiny_models, tokenizer, node_ctx=None, classes=("dog", "cat")):
    tower = TextTower(next(iter(tiny_models.values())))
    node_ctx = node_ctx or {"root": 3, "a": 2}
    return tower, ForestEncoder(tower, tokenizer, node_ctx, {"t": list(node_ctx)}, {"t": list(classes)})


def _ctx(tower, node_ctx, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(c, tower.config.width, generator=g) * 0.3 for n, c in node_ctx.items()}


def test_contexts_of_the_wrong_length_are_refused_naming_the_node(tiny_models, tokenizer):
    """One row too many for the root used to shift the next node's rows: the
    features of another prompt, silently."""
    tower, enc = _encoder(tiny_models, tokenizer)
    ctx = _ctx(tower, {"root": 3, "a": 2})
    enc(ctx)
    W = tower.config.width
    with pytest.raises(InvalidInputError, match=rf"node 'root': context must be \[3, {W}\] \(n_ctx x width\), "
                                                rf"got \[4, {W}\]"):
        enc({**ctx, "root": torch.randn(4, W)})
    with pytest.raises(InvalidInputError, match=r"no context given for node 'a'"):
        enc({"root": ctx["root"]})
    # a misspelt node and an integer context used to be taken without a word
    with pytest.raises(InvalidInputError, match=r"context given for unknown node 'aa' \(nodes: \['root', 'a'\]\)"):
        enc({**ctx, "aa": ctx["a"]})
    with pytest.raises(InvalidInputError, match="node 'a': context must be a floating-point tensor, got torch.int64"):
        enc({**ctx, "a": ctx["a"].long()})


def test_classes_without_a_path_and_a_class_listed_twice_are_refused(tiny_models, tokenizer):
    from hipro_fast.engine.layout import ForestError

    tower = TextTower(next(iter(tiny_models.values())))
    with pytest.raises(ForestError, match="task 'u' has classes but no path"):
        ForestEncoder(tower, tokenizer, {"root": 3}, {"t": ["root"]}, {"t": ["dog"], "u": ["cat"]})
    with pytest.raises(ForestError, match="task 't': class 'dog' is listed twice"):
        ForestEncoder(tower, tokenizer, {"root": 3}, {"t": ["root"]}, {"t": ["dog", "cat", "dog"]})


def test_a_node_without_context_tokens_is_refused_up_front(tiny_models, tokenizer):
    tower = TextTower(next(iter(tiny_models.values())))
    with pytest.raises(InvalidInputError, match="node 'b' has 0 context tokens"):
        ForestEncoder(tower, tokenizer, {"root": 3, "b": 0}, {"t": ["root", "b"]}, {"t": ["dog", "cat"]})


def test_the_forest_moves_between_devices_but_is_never_cast(tiny_models, tokenizer):
    tower, enc = _encoder(tiny_models, tokenizer)
    with pytest.raises(InvalidTypeError, match="ForestLayout.to takes a device|PromptForest.to takes a device"):
        enc.to(torch.float64)
    assert enc.forest.eos_index.dtype == torch.long and enc.forest.layout.segment_table.dtype == torch.long
    assert enc.to("cpu") is enc


def test_an_encoder_built_under_inference_mode_trains(tiny_models, tokenizer):
    """Its index tensors are normal tensors: saved for backward, they used to
    fail ("Inference tensors cannot be saved for backward")."""
    with torch.inference_mode():
        tower, enc = _encoder(tiny_models, tokenizer)
        moved = enc.forest.to("cpu")
    ctx = {n: c.requires_grad_() for n, c in _ctx(tower, {"root": 3, "a": 2}).items()}
    enc(ctx)["t"].sum().backward()
    assert ctx["root"].grad is not None and ctx["a"].grad.abs().sum() > 0
    assert not moved.eos_index.is_inference() and not moved.task_prompts["t"].is_inference()


def test_a_flex_model_pickles_after_its_first_forward(tiny_models, tokenizer):
    """FlexAttention's block masks close over a local function: a cache, dropped
    from the pickle and rebuilt on use."""
    import hipro_fast as hf

    model = hf.HiProModel((next(iter(tiny_models.values())), tokenizer), {"t": ["dog", "cat"]}, ["t"], n_ctx=2,
                          attention="flex")
    with torch.no_grad():
        before = model.text_features()["t"]
    again = pickle.loads(pickle.dumps(model))
    with torch.no_grad():
        torch.testing.assert_close(again.text_features()["t"], before, rtol=0, atol=0)
