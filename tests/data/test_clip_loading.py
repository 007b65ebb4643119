"""One way to turn what callers pass as `clip` into (model, tokenizer)."""
import pytest

import hipro_fast as hf
from hipro_fast.data.clip_loading import LoadedClip, clip_parts, random_clip
from tests.oracle import tokenizer


def test_clip_parts_accepts_every_documented_form():
    model, tok = random_clip(width=32, heads=2, layers=1), tokenizer()
    loaded = LoadedClip(model, tok, None, "tiny", None)
    other = tokenizer()
    assert clip_parts(loaded) == (model, tok)
    assert clip_parts(loaded, other)[1] is other          # an explicit tokenizer wins
    assert clip_parts((model, tok)) == (model, tok)
    assert clip_parts(model, tok) == (model, tok)


def test_clip_parts_never_guesses_a_tokenizer():
    model = random_clip(width=32, heads=2, layers=1)
    with pytest.raises(ValueError, match="pass tokenizer="):
        clip_parts(model)
    with pytest.raises(TypeError, match=r"\(model, tokenizer\), got 3 items"):
        clip_parts((model, tokenizer(), None))
    with pytest.raises(TypeError, match="got str"):
        clip_parts("ViT-B-16")


def test_model_and_affinity_take_the_same_forms():
    """HiProModel accepts the (model, tokenizer) pair that task_affinity accepts."""
    model, tok = random_clip(width=32, heads=2, layers=1), tokenizer()
    tasks = {"a": ["cat", "dog"], "b": ["car", "bus"]}
    from_pair = hf.HiProModel((model, tok), tasks, ["a", "b"], n_ctx=2)
    from_kw = hf.HiProModel(model, tasks, ["a", "b"], n_ctx=2, tokenizer=tok)
    for t in tasks:
        assert from_pair.text_features()[t].allclose(from_kw.text_features()[t])


def test_random_clip_is_deterministic_and_leaves_the_global_rng_alone():
    import torch

    before = torch.random.get_rng_state()
    a, b = random_clip(seed=3), random_clip(seed=3)
    assert torch.equal(torch.random.get_rng_state(), before)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not any(p.requires_grad for p in a.parameters())


def test_the_eval_transform_follows_the_models_own_preprocessing():
    """A model whose weights were trained on squashed images (open_clip's
    preprocess_cfg, e.g. DFN's or CLIPA's tags) is fed squashed images, with its
    interpolation; a default model keeps the shortest-side resize + centre crop."""
    import open_clip
    from torchvision import transforms as T

    from hipro_fast.data.clip_loading import eval_transform

    model = open_clip.create_model("ViT-B-32", pretrained=None)
    default = eval_transform(model).transforms
    assert isinstance(default[1], T.CenterCrop) and default[0].size == 224
    assert default[0].interpolation == T.InterpolationMode.BICUBIC
    model.visual.preprocess_cfg = {**model.visual.preprocess_cfg, "resize_mode": "squash",
                                   "interpolation": "bilinear", "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}
    squash = eval_transform(model).transforms
    assert squash[0].size == (224, 224) and squash[0].interpolation == T.InterpolationMode.BILINEAR
    assert not any(isinstance(t, T.CenterCrop) for t in squash)
    assert squash[-1].mean == (0.5, 0.5, 0.5)


def test_loading_the_bundled_clip_does_not_claim_its_weights_are_random(caplog):
    """open_clip logs "No pretrained weights loaded ... initialized randomly" while
    building it; the shipped weights are loaded right after, so that line was false."""
    import logging

    import torch
    from safetensors.torch import load_file

    from hipro_fast.data.bundled.tiny_clip import WEIGHTS_PATH

    with caplog.at_level(logging.WARNING):
        clip = hf.load_clip("hipro-tiny-clip")
    assert not [r for r in caplog.records if "initialized randomly" in r.getMessage()]
    shipped = load_file(str(WEIGHTS_PATH))["positional_embedding"]
    assert torch.equal(clip.model.positional_embedding, shipped.float())


def test_load_clip_names_an_unknown_model_or_device_before_building_anything():
    from hipro_fast.errors import InvalidInputError

    with pytest.raises(InvalidInputError, match=r"load_clip: unknown model 'NoSuchModel' \(an open_clip model name"):
        hf.load_clip("NoSuchModel")
    with pytest.raises(InvalidInputError, match="load_clip: 'gpu' is not a device"):
        hf.load_clip(device="gpu")
    with pytest.raises(TypeError, match="load_clip: name must be a model name"):
        hf.load_clip(None)
