"""The FlexAttention backend (attention="flex", engine/flex.py) on the CPU:
its mask is the tree mask, its forward equals the reference and open_clip's
own computation, and what torch's CPU FlexAttention cannot do (backward)
raises a clear error. The compiled CUDA path runs in scripts/gpu_check.sh
(tests/method/test_cuda_model.py and `hipro bench --device cuda`)."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hipro_fast.engine.flex import FlexTreeAttention, tree_key_end, tree_mask_mod
from hipro_fast.engine.prompt_forest import build_prompt_forest
from hipro_fast.engine.text_tower import TextTower
from hipro_fast.errors import FlexAttentionUnavailable, HiproError
from hipro_fast.ops import reference
from tests import oracle
from tests.engine.test_text_tower import HIPRO_TREE, make_problem
from tests.ops.test_ops import qkv, random_layout

pytestmark = pytest.mark.usefixtures("one_thread")


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10_000), segments=st.integers(1, 30), max_len=st.integers(1, 8))
def test_mask_mod_is_the_tree_mask(seed, segments, max_len):
    lay, _ = random_layout(seed, segments, max_len)
    T = lay.num_tokens
    idx = torch.arange(T)
    got = tree_mask_mod(tree_key_end(lay))(0, 0, idx[:, None], idx[None, :])
    want = torch.zeros(T, T, dtype=torch.bool)  # by walking parent links, not by the DFS interval formula
    for q, keys in enumerate(oracle.brute_visible_keys(lay.segment_table, lay.token_segment)):
        want[q, keys] = True
    assert torch.equal(got, want)
    assert torch.equal(want, reference.tree_attention_mask(lay.segment_table, lay.token_segment))


@pytest.mark.parametrize("seed,segments,max_len,H,D", [(0, 1, 5, 1, 8), (1, 40, 8, 2, 16), (2, 90, 6, 3, 8)])
def test_flex_forward_matches_reference(seed, segments, max_len, H, D):
    """T from a handful of tokens to a few hundred: not a multiple of the 128-token block."""
    lay, _ = random_layout(seed, segments, max_len)
    q, k, v = qkv(lay.num_tokens, H, D, torch.float32, seed)
    with torch.no_grad():
        out = FlexTreeAttention()(q, k, v, lay, D ** -0.5)
    ref = reference.tree_attention(q, k, v, lay.segment_table, lay.token_segment, D ** -0.5)
    assert out.shape == q.shape
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_flex_block_mask_is_reused_per_layout():
    lay, _ = random_layout(3, 10, 4)
    flex = FlexTreeAttention()
    assert flex.block_mask(lay, torch.device("cpu")) is flex.block_mask(lay, torch.device("cpu"))
    other, _ = random_layout(4, 10, 4)
    assert flex.block_mask(other, torch.device("cpu")) is not flex.block_mask(lay, torch.device("cpu"))


@pytest.mark.parametrize("name", list(oracle.TINY_CONFIGS))
def test_text_tower_flex_forward_matches_open_clip(tiny_models, tokenizer, name):
    model = tiny_models[name]
    tower = TextTower(model, attention="flex")
    ctx, rows = make_problem(tower.config.width, HIPRO_TREE["node_ctx"], HIPRO_TREE["paths"],
                             HIPRO_TREE["classes"])
    table = torch.cat([ctx[n] for n in HIPRO_TREE["node_ctx"]])
    forest = build_prompt_forest(tokenizer, tower.config.context_length, rows, HIPRO_TREE["paths"],
                                 HIPRO_TREE["classes"], "concat")
    with torch.no_grad():
        feats = tower.encode_forest(forest, table)
        fused = TextTower(model).encode_forest(forest, table)
        expected = oracle.task_features(model, tokenizer, ctx, HIPRO_TREE["paths"], HIPRO_TREE["classes"],
                                        "concat")
    for task in HIPRO_TREE["paths"]:
        assert (feats[task] - expected[task]).abs().max().item() <= 1e-5, task
        assert (feats[task] - fused[task]).abs().max().item() <= 1e-5, task


def test_flex_backward_on_cpu_raises(tiny_models, tokenizer):
    model = tiny_models["w32_h2_l1_ls"]
    tower = TextTower(model, attention="flex")
    ctx, rows = make_problem(tower.config.width, HIPRO_TREE["node_ctx"], HIPRO_TREE["paths"],
                             HIPRO_TREE["classes"])
    table = torch.cat([ctx[n] for n in HIPRO_TREE["node_ctx"]]).requires_grad_()
    forest = build_prompt_forest(tokenizer, tower.config.context_length, rows, HIPRO_TREE["paths"],
                                 HIPRO_TREE["classes"], "concat")
    with pytest.raises(FlexAttentionUnavailable, match="no backward on the CPU") as info:
        tower.encode_forest(forest, table)
    assert isinstance(info.value, HiproError) and isinstance(info.value, RuntimeError)
    # The op itself, too: any input that needs a gradient.
    lay, _ = random_layout(5, 6, 3)
    q, k, v = qkv(lay.num_tokens, 1, 4, torch.float32, 0)
    with pytest.raises(FlexAttentionUnavailable):
        FlexTreeAttention()(q, k.requires_grad_(), v, lay, 0.5)


def test_unknown_attention_backend_is_named(tiny_models):
    with pytest.raises(ValueError, match="attention must be one of .*'tree', 'flex'.*got 'flash'"):
        TextTower(tiny_models["w32_h2_l1_ls"], attention="flash")



def test_hipro_model_with_flex_attention_matches_tree_and_refuses_cpu_training():
    """HiProModel(attention="flex"): the same task features as the fused op (forward,
    CPU), evaluation works, and fit() on the CPU stops with the backend's error."""
    from hipro_fast.method.baselines import build_method
    from hipro_fast.method.training import evaluate, fit
    from tests.helpers_training import TREE, make_model, tiny_clip, toy_data

    flex, tree = make_model(attention="flex"), make_model()
    assert flex.attention == "flex" and "attention" not in flex.config()
    with torch.no_grad():
        a, b = flex.text_features(), tree.text_features()
    for task in a:
        torch.testing.assert_close(a[task], b[task], atol=1e-5, rtol=1e-5)
    test = toy_data(seed=3)
    assert evaluate(flex, test) == evaluate(tree, test)
    with pytest.raises(FlexAttentionUnavailable, match="no backward on the CPU"):
        fit(flex, toy_data(seed=1), None, epochs=1, min_steps=0)
    clip, tok = tiny_clip()
    for method in ("coop-per-task", "hipro"):  # compare()'s methods all take the backend
        model = build_method(method, clip, dict(flex.tasks), TREE, 2, tokenizer=tok, attention="flex")
        assert model.tower.attention == "flex"
