"""End-to-end exactness: the forest pass equals open_clip's own computation of
every full-length prompt, features and context gradients, for both combine
modes, on the ViT-B-16 text tower and small random configs, with the fused
ops and with the fallback."""
import numpy as np
import open_clip
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

from hipro_fast.engine.layout import ForestError
from hipro_fast.engine.prompt_forest import build_prompt_forest, class_suffix_tokens
from hipro_fast.engine.text_tower import TextTower, UnsupportedTextTower
from hipro_fast.ops.extension import fused_available
from tests import oracle

TOL = 1e-4  # fp32 max abs error bound from the spec


def make_problem(width, node_ctx, paths, classes, seed=0):
    g = torch.Generator().manual_seed(seed)
    ctx = {n: torch.randn(c, width, generator=g) * 0.3 for n, c in node_ctx.items()}
    rows, start = {}, 0
    for n, c in node_ctx.items():
        rows[n] = (start, c)
        start += c
    return ctx, rows


def check_exact(model, tok, node_ctx, paths, classes, combine, seed=0):
    tower = TextTower(model)
    ctx, rows = make_problem(tower.config.width, node_ctx, paths, classes, seed)
    table = torch.cat([ctx[n] for n in node_ctx]).requires_grad_()
    forest = build_prompt_forest(tok, tower.config.context_length, rows, paths, classes, combine)
    feats = tower.encode_forest(forest, table)
    g = torch.Generator().manual_seed(seed + 1)
    weights = {t: torch.randn(f.shape, generator=g) for t, f in feats.items()}
    loss = sum((feats[t] * weights[t]).sum() for t in feats)
    (grad,) = torch.autograd.grad(loss, table)

    leaf_ctx = {n: c.clone().requires_grad_() for n, c in ctx.items()}
    expected = oracle.task_features(model, tok, leaf_ctx, paths, classes, combine)
    exp_loss = sum((expected[t] * weights[t]).sum() for t in expected)
    exp_grads = torch.autograd.grad(exp_loss, list(leaf_ctx.values()), allow_unused=True)
    exp_grad = torch.cat([gr if gr is not None else torch.zeros_like(c)
                          for gr, c in zip(exp_grads, leaf_ctx.values())])
    for task in paths:
        assert feats[task].shape == expected[task].shape
        err = (feats[task] - expected[task]).abs().max().item()
        assert err <= TOL, (task, err)
    gerr = (grad - exp_grad).abs().max().item()
    assert gerr <= TOL * max(1.0, exp_grad.abs().max().item()), gerr
    return forest


HIPRO_TREE = dict(
    node_ctx={"root": 16, "g0": 16, "g1": 16, "t0": 16, "t1": 16, "t2": 16, "t3": 16},
    paths={"art": ["root", "g0", "t0"], "clipart": ["root", "g0", "t1"],
           "product": ["root", "g1", "t2"], "real": ["root", "g1", "t3"]},
    classes={"art": ["Alarm_Clock", "Backpack", "Desk_Lamp"], "clipart": ["Bed", "Exit_Sign"],
             "product": ["ToothBrush", "TV", "Trash_Can", "Bike"], "real": ["Mug"]},
)


@pytest.mark.parametrize("combine", ["concat", "mean"])
def test_vit_b16_exact(vit_b16, tokenizer, backend, combine):
    # the fixture perturbed every LayerNorm and the projection (oracle.perturb_norms_and_projection)
    norms = [vit_b16.ln_final] + [ln for blk in vit_b16.transformer.resblocks for ln in (blk.ln_1, blk.ln_2)]
    assert len(norms) == 25
    for m in norms:
        assert not torch.all(m.weight == 1) and not torch.all(m.bias == 0)
    check_exact(vit_b16, tokenizer, combine=combine, **HIPRO_TREE)


@pytest.mark.parametrize("name", list(oracle.TINY_CONFIGS))
@pytest.mark.parametrize("combine", ["concat", "mean"])
def test_tiny_configs_exact(tiny_models, tokenizer, backend, name, combine):
    check_exact(tiny_models[name], tokenizer, combine=combine, **HIPRO_TREE)


def test_forest_shares_prefixes(tokenizer):
    forest = build_prompt_forest(tokenizer, 77, {"r": (0, 4), "a": (4, 2), "b": (6, 2)},
                                 {"A": ["r", "a"], "B": ["r", "b"]},
                                 {"A": ["dog", "cat"], "B": ["dog"]}, "concat")
    suffix = {n: len(class_suffix_tokens(tokenizer, n)) for n in ("dog", "cat")}
    # SOS + root once, each leaf context once, one suffix per (task, class)
    assert forest.num_tokens == 1 + 4 + 2 + 2 + 2 * suffix["dog"] + suffix["cat"]
    mean = build_prompt_forest(tokenizer, 77, {"r": (0, 4), "a": (4, 2), "b": (6, 2)},
                               {"A": ["r", "a"], "B": ["r", "b"]},
                               {"A": ["dog", "cat"], "B": ["dog"]}, "mean")
    # (r, dog) is shared by both tasks and stored once: prompts r-dog, r-cat, a-dog, a-cat, b-dog
    assert mean.num_prompts == 5


# Words whose tokenisation we use to build names of a chosen token count.
_WORDS = sorted({w for name in IMAGENET_CLASSNAMES for w in name.split()})


@st.composite
def random_problem(draw):
    depth = draw(st.integers(1, 4))
    n_tasks = draw(st.integers(1, 4))
    fill_exact = draw(st.booleans())
    rng = np.random.default_rng(draw(st.integers(0, 2**31)))
    level_ctx = [draw(st.integers(1, 32)) for _ in range(depth)]
    node_ctx, paths = {}, {}
    for t in range(n_tasks):
        path = []
        for lvl in range(depth):
            # tasks share a prefix of random length
            owner = t if lvl >= draw(st.integers(0, depth)) else 0
            node = f"n{lvl}_{owner}"
            node_ctx.setdefault(node, level_ctx[lvl])
            path.append(node)
        paths[f"task{t}"] = path
    classes = {}
    for t in paths:
        n_cls = draw(st.integers(1, 50))
        names = set()
        while len(names) < n_cls:
            names.add(" ".join(rng.choice(_WORDS, size=int(rng.integers(1, 5)))))
        classes[t] = sorted(names)
    return node_ctx, paths, classes, fill_exact


def _fit_context(tok, node_ctx, paths, classes, combine, fill_exact, limit=77):
    """Shrink contexts to fit 77 tokens; optionally grow one so a prompt fills it exactly."""
    longest = {t: max(len(class_suffix_tokens(tok, n)) for n in classes[t]) for t in paths}
    for _ in range(200):
        need = {t: 1 + (sum(node_ctx[n] for n in p) if combine == "concat" else max(node_ctx[n] for n in p))
                + longest[t] for t, p in paths.items()}
        worst = max(need, key=need.get)
        if need[worst] <= limit:
            break
        big = max(paths[worst], key=lambda n: node_ctx[n])
        if node_ctx[big] == 1:
            return None
        node_ctx[big] -= 1
    if fill_exact:
        t = max(need, key=need.get)
        leaf = paths[t][-1] if combine == "concat" else max(paths[t], key=lambda n: node_ctx[n])
        users = [u for u, p in paths.items() if leaf in p]
        slack = min(limit - need[u] for u in users)
        node_ctx[leaf] += slack
    return node_ctx


# `backend` runs the fuzz with the fused ops and with the plain-PyTorch fallback;
# its environment variable holds for every example of one test call.
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                                                 HealthCheck.function_scoped_fixture])
@given(problem=random_problem(), combine=st.sampled_from(["concat", "mean"]))
def test_fuzz_random_forests_exact(tiny_models, tokenizer, backend, problem, combine):
    node_ctx, paths, classes, fill_exact = problem
    assert fused_available("cpu") == (backend == "fused")
    node_ctx = _fit_context(tokenizer, dict(node_ctx), paths, classes, combine, fill_exact)
    if node_ctx is None:
        return
    model = tiny_models["w64_h4_l2_gelu"]
    forest = check_exact(model, tokenizer, node_ctx, paths, classes, combine)
    assert forest.layout.max_path_tokens <= 77
    if fill_exact:
        assert forest.layout.max_path_tokens == 77


def test_fuzz_also_runs_on_fallback(tiny_models, tokenizer, monkeypatch):
    monkeypatch.setenv("HIPRO_FAST_REFERENCE", "1")
    node_ctx = {"r": 30, "a": 20, "b": 5}
    paths = {"x": ["r", "a"], "y": ["r", "b"]}
    classes = {"x": ["great white shark", "tench"], "y": ["goldfish", "tiger shark", "hen"]}
    node_ctx = _fit_context(tokenizer, node_ctx, paths, classes, "concat", True)
    forest = check_exact(tiny_models["w48_h3_l3_quickgelu"], tokenizer, node_ctx, paths, classes, "concat")
    assert forest.layout.max_path_tokens == 77


def test_overflow_names_task_and_counts(tokenizer):
    with pytest.raises(ForestError, match=r"task 'long', class 'dog': prompt needs 79 tokens"):
        build_prompt_forest(tokenizer, 77, {"r": (0, 40), "l": (40, 35)}, {"long": ["r", "l"]},
                            {"long": ["dog"]}, "concat")


def test_unknown_path_node_is_named(tokenizer):
    with pytest.raises(ForestError, match="path node 'ghost'"):
        build_prompt_forest(tokenizer, 77, {"r": (0, 4)}, {"t": ["r", "ghost"]}, {"t": ["a"]})


@pytest.mark.parametrize("pool", ["last", "first"])
def test_non_eos_pooling_rejected(pool):
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    model = CLIP(embed_dim=16, vision_cfg=CLIPVisionCfg(layers=1, width=32, head_width=16, patch_size=8, image_size=16),
                 text_cfg=CLIPTextCfg(width=32, heads=2, layers=1, pool_type=pool))
    with pytest.raises(UnsupportedTextTower, match="pooling"):
        TextTower(model)


def test_non_causal_rejected():
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    model = CLIP(embed_dim=16, vision_cfg=CLIPVisionCfg(layers=1, width=32, head_width=16, patch_size=8, image_size=16),
                 text_cfg=CLIPTextCfg(width=32, heads=2, layers=1, no_causal_mask=True))
    with pytest.raises(UnsupportedTextTower, match="causal"):
        TextTower(model)


def test_siglip_config_rejected():
    cfg = open_clip.get_model_config("ViT-B-16-SigLIP")
    if cfg is None:
        pytest.skip("no SigLIP config in this open_clip")
    text_cfg = dict(cfg["text_cfg"], width=64, heads=2, layers=1)
    if "hf_model_name" in text_cfg:
        pytest.skip("SigLIP config uses a HF text tower")
    vision_cfg = dict(layers=1, width=32, head_width=16, patch_size=8, image_size=16)
    model = open_clip.model.CustomTextCLIP(embed_dim=cfg["embed_dim"], vision_cfg=vision_cfg,
                                           text_cfg=text_cfg)
    with pytest.raises(UnsupportedTextTower, match="pooling|Hugging Face|not causal|CLS"):
        TextTower(model)


def _small_clip(**text_kw):
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    vision_cfg = CLIPVisionCfg(layers=1, width=32, head_width=16, patch_size=8, image_size=16)
    return CLIP(embed_dim=16, vision_cfg=vision_cfg, text_cfg=CLIPTextCfg(width=32, heads=2, layers=2, **text_kw))


def _unsupported(case):
    """A tower the forest engine cannot encode exactly, and the words its error must say."""
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg, CustomTextCLIP

    if case == "coca_cls_token":
        vision_cfg = CLIPVisionCfg(layers=1, width=32, head_width=16, patch_size=8, image_size=16)
        return CustomTextCLIP(embed_dim=16, vision_cfg=vision_cfg,
                              text_cfg=CLIPTextCfg(width=32, heads=2, layers=1, embed_cls=True)), "CLS token"
    if case in ("custom_block", "qk_norm"):
        kw = {"block_type": "custom"} if case == "custom_block" else {"qk_norm": True}
        return _small_clip(**kw), "block 0 is CustomResidualAttentionBlock"
    if case == "projection_bias":
        return _small_clip(proj_bias=True), "projection with a bias"
    model = _small_clip()
    blk = model.transformer.resblocks[1]
    if case == "attention_bias_kv":
        blk.attn.bias_k = torch.nn.Parameter(torch.zeros(1, 1, 32))
        return model, "block 1: unsupported MultiheadAttention options"
    if case == "attention_add_zero_attn":
        blk.attn.add_zero_attn = True
        return model, "block 1: unsupported MultiheadAttention options"
    if case == "attention_kdim":
        blk.attn = torch.nn.MultiheadAttention(32, 2, kdim=16, vdim=16, batch_first=True)
        return model, "block 1: unsupported MultiheadAttention options"
    if case == "ln_final_not_affine":
        model.ln_final = torch.nn.LayerNorm(32, elementwise_affine=False)
        return model, "ln_final must be an affine LayerNorm"
    if case == "no_text_transformer":  # e.g. a Hugging Face text tower
        return torch.nn.Module(), "has no open_clip TextTransformer"
    if case == "attn_mask_wrong_size":
        model.attn_mask = model.attn_mask[:-1, :-1]
        return model, "not causal"
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["coca_cls_token", "custom_block", "qk_norm", "projection_bias",
                                  "attention_bias_kv", "attention_add_zero_attn", "attention_kdim",
                                  "ln_final_not_affine", "no_text_transformer", "attn_mask_wrong_size"])
def test_unsupported_towers_are_rejected_naming_the_part(case):
    """Every check of TextTower's constructor (README: "checks: causal,
    EOS(argmax)-pooled, standard blocks") refuses its tower with a message that
    names the part; the same CLIP without the change is accepted."""
    model, words = _unsupported(case)
    with pytest.raises(UnsupportedTextTower, match=words):
        TextTower(model)
    TextTower(_small_clip())


def test_a_layernorm_without_bias_is_encoded_exactly(tokenizer, backend):
    """LayerNorm(bias=False) in ln_final (open_clip's norm_kwargs={"bias": False})
    is a LayerNorm with a zero bias (it was accepted, then failed in pool_eos)."""
    model = _small_clip()
    ln = model.ln_final
    model.ln_final = torch.nn.LayerNorm(32, bias=False)
    with torch.no_grad():
        model.ln_final.weight.copy_(ln.weight + 0.3 * torch.randn(32))
    model.eval()
    check_exact(model, tokenizer, combine="concat", **HIPRO_TREE)


class _HFLikeTokenizer:
    """open_clip's HFTokenizer's interface: only __call__ (SigLIP, multilingual towers)."""

    def __call__(self, texts):
        raise AssertionError("not called")


class _IdsAboveEnd:
    """A BPE tokenizer whose extra special token sits above the end token (id 49408)."""

    def __init__(self, tok, sot=None):
        self.tok, self.sot_token_id, self.eot_token_id = tok, tok.sot_token_id if sot is None else sot, \
            tok.eot_token_id

    def encode(self, text):
        return [49408 if w == "<obj>" else i for w in text.split() for i in ([None] if w == "<obj>" else
                                                                               self.tok.encode(w))]


def test_a_tokenizer_the_forest_cannot_pool_is_refused(tokenizer):
    """The forest pools each prompt's end token, the tower its highest token id
    ('argmax'): a class whose tokens go above the end id (an extra special token)
    gave silently other features; a start id above the end id too; a tokenizer
    without BPE ids (Hugging Face's) failed with a bare AttributeError."""
    import hipro_fast as hf

    model = _small_clip()
    tasks = {"t": ["<obj> dog", "cat"]}
    with pytest.raises(UnsupportedTextTower, match=r"class name '<obj> dog' encodes to token id 49408, not below "
                                                   r"the end token id 49407"):
        hf.HiProModel((model, _IdsAboveEnd(tokenizer)), tasks, ["t"], n_ctx=2)
    with pytest.raises(UnsupportedTextTower, match="its start token id 49407 is not below its end token id 49407"):
        hf.HiProModel((model, _IdsAboveEnd(tokenizer, sot=49407)), {"t": ["dog", "cat"]}, ["t"], n_ctx=2)
    with pytest.raises(UnsupportedTextTower, match="tokenizer _HFLikeTokenizer has no encode, sot_token_id, "
                                                   "eot_token_id"):
        hf.HiProModel((model, _HFLikeTokenizer()), {"t": ["dog", "cat"]}, ["t"], n_ctx=2)
    with pytest.raises(UnsupportedTextTower, match="tokenizer _HFLikeTokenizer has no encode"):
        build_prompt_forest(_HFLikeTokenizer(), 77, {"r": (0, 2)}, {"t": ["r"]}, {"t": ["dog"]})
    assert class_suffix_tokens(_IdsAboveEnd(tokenizer), "dog") == class_suffix_tokens(tokenizer, "dog")


@pytest.mark.parametrize("name, words", [("ViT-B-16-SigLIP", "a non-causal text tower"),
                                         ("coca_ViT-B-32", "a CLS token appended"),
                                         ("roberta-ViT-B-32", "a Hugging Face text tower"),
                                         ("MobileCLIP-S1", "a non-causal text tower")])
def test_load_clip_refuses_an_unsupported_tower_before_building_it(name, words, monkeypatch):
    """Named from its open_clip config, before the model (or a Hugging Face
    tower's weights, or SigLIP's tokenizer, which need `transformers`) is built."""
    from hipro_fast.data.clip_loading import load_clip

    if open_clip.get_model_config(name) is None:
        pytest.skip(f"no {name} config in this open_clip")

    def no_build(*args, **kwargs):
        raise AssertionError("built")

    monkeypatch.setattr(open_clip, "create_model", no_build)
    with pytest.raises(UnsupportedTextTower, match=f"model '{name}' has {words}"):
        load_clip(name)


def test_the_config_check_agrees_with_the_module_check():
    """unsupported_text_cfg (load_clip's early refusal) accepts what TextTower
    accepts and names what it refuses."""
    from hipro_fast.engine.text_tower import unsupported_text_cfg

    assert unsupported_text_cfg(open_clip.get_model_config("ViT-B-16")["text_cfg"]) is None
    assert unsupported_text_cfg({}) is None
    assert unsupported_text_cfg({"pool_type": "eos"}) == "text pooling 'eos' (the forest pools the end token: 'argmax')"
    assert unsupported_text_cfg({"proj_bias": True}) == "a text projection with a bias"
    for kw in ({"pool_type": "last"}, {"proj_bias": True}, {"no_causal_mask": True}):
        assert unsupported_text_cfg(kw) is not None
        with pytest.raises(UnsupportedTextTower):
            TextTower(_small_clip(**kw))
