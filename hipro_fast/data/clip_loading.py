"""Frozen open_clip models for hipro_fast, loaded without any hub access
unless a hub tag is asked for explicitly."""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from ..devices import check_device
from ..engine.text_tower import unsupported_text_cfg
from ..errors import (InvalidInputError, InvalidTypeError, MissingFileError, UnsupportedTextTower,
                      WeightsMismatchError)


@dataclass
class LoadedClip:
    """A frozen open_clip model with its tokenizer and eval preprocessing."""

    model: torch.nn.Module
    tokenizer: Any
    preprocess: Any
    name: str
    pretrained: str | None


def clip_parts(clip: Any, tokenizer: Any = None) -> tuple[torch.nn.Module, Any]:
    """(open_clip model, tokenizer) from a LoadedClip, a (model, tokenizer) pair,
    or a bare open_clip model with `tokenizer=` (there is no default tokenizer:
    a wrong one would silently give wrong prompts). An explicit `tokenizer`
    overrides the one carried by `clip`."""
    if isinstance(clip, LoadedClip):
        return clip.model, tokenizer or clip.tokenizer
    if isinstance(clip, (tuple, list)):
        if len(clip) != 2:
            raise InvalidTypeError(f"clip as a sequence must be (model, tokenizer), got {len(clip)} items")
        return clip[0], tokenizer or clip[1]
    if not isinstance(clip, torch.nn.Module):
        raise InvalidTypeError(f"clip must be a LoadedClip, a (model, tokenizer) pair or an open_clip model, "
                        f"got {type(clip).__name__}")
    if tokenizer is None:
        raise InvalidInputError("pass tokenizer= when clip is a bare open_clip model (or pass a LoadedClip)")
    return clip, tokenizer


def random_clip(width: int = 64, heads: int = 4, layers: int = 2, embed_dim: int = 24, *,
                quick_gelu: bool = False, ls_init_value: float | None = None, perturb: float = 0.02,
                logit_scale: float | None = None, seed: int = 0) -> torch.nn.Module:
    """A tiny frozen random open_clip CLIP (77-token text tower, 16 px image tower)
    for tests, the planted benchmark and smoke runs; the global RNG is left as it was.

    open_clip's random init leaves LayerNorms at 1/0 and the projection at a
    trivial scale, so every parameter gets N(0, `perturb`) noise: checks then
    see generic values. `logit_scale` (e.g. 100, as in pretrained CLIP) replaces
    the init's 1/0.07 when given.
    """
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        text_cfg = CLIPTextCfg(context_length=77, vocab_size=49408, width=width, heads=heads, layers=layers,
                               ls_init_value=ls_init_value)
        vision_cfg = CLIPVisionCfg(layers=1, width=32, head_width=16, patch_size=8, image_size=16)
        model = CLIP(embed_dim=embed_dim, vision_cfg=vision_cfg, text_cfg=text_cfg, quick_gelu=quick_gelu)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * perturb)
            if logit_scale is not None:
                model.logit_scale.fill_(math.log(logit_scale))
    finally:
        torch.random.set_rng_state(state)
    return _freeze(model)


def _freeze(model: torch.nn.Module) -> torch.nn.Module:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _load_state(path: Path) -> dict[str, torch.Tensor]:
    # A file that is not a weights file fails deep in the reader (a bare KeyError
    # from unpickling, a SafetensorError): name the file and the reader instead.
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - re-raised with the file named
        reader = "safetensors" if path.suffix == ".safetensors" else "torch.load (weights_only)"
        detail = " ".join(str(e).split())[:200] or type(e).__name__
        raise WeightsMismatchError(f"weights file {path}: cannot be read by {reader} "
                                   f"({type(e).__name__}: {detail})") from None
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise WeightsMismatchError(f"{path}: not a state dict (got {type(state).__name__})")
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_clip(name: str = "hipro-tiny-clip", pretrained: str | Path | None = None,
              device: str | torch.device = "cpu") -> LoadedClip:
    """A frozen open_clip model and its tokenizer.

    Args:
        name: an open_clip model name ("ViT-B-16", ...) or "hipro-tiny-clip", the
            model bundled with hipro_fast (its weights load by default).
        pretrained: None for random weights (bundled weights for hipro-tiny-clip),
            a local .pt/.safetensors path, or an open_clip tag (which goes to a hub;
            set HF_HUB_OFFLINE=1 to forbid that).
        device: where to put the model.
    Returns:
        LoadedClip(model, tokenizer, preprocess, name, pretrained).
    """
    import open_clip

    check_device(device, "load_clip")
    if not isinstance(name, str):
        raise InvalidTypeError(f"load_clip: name must be a model name (str), got {type(name).__name__}")
    if name != "hipro-tiny-clip" and open_clip.factory.parse_model_name(name)[0] is None \
            and name not in open_clip.list_models():  # (hf-hub: / local-dir: names resolve as they load)
        raise InvalidInputError(f"load_clip: unknown model {name!r} (an open_clip model name such as "
                                "'ViT-B-16', see open_clip.list_models(), or 'hipro-tiny-clip')")
    if name == "hipro-tiny-clip":
        from .bundled.tiny_clip import WEIGHTS_PATH, build_tiny_clip  # lazy: only this model needs it

        model = build_tiny_clip()
        path = Path(pretrained) if pretrained is not None else WEIGHTS_PATH
        if not path.exists():
            raise MissingFileError(f"weights file not found: {path}")
        _load_into(model, path)
        pretrained_desc = str(path)
    elif pretrained is not None and Path(str(pretrained)).suffix in (".pt", ".pth", ".bin", ".safetensors"):
        path = Path(pretrained)
        if not path.exists():
            raise MissingFileError(f"weights file not found: {path}")
        _refuse_unsupported_text(name)
        model = open_clip.create_model(name, pretrained=None)
        _load_into(model, path)
        pretrained_desc = str(path)
    else:
        _refuse_unsupported_text(name)
        model = open_clip.create_model(name, pretrained=pretrained)
        pretrained_desc = None if pretrained is None else str(pretrained)
    model = _freeze(model.float().to(device))
    preprocess = eval_transform(model)
    tokenizer = open_clip.get_tokenizer(name) if name != "hipro-tiny-clip" else \
        open_clip.tokenizer.SimpleTokenizer(context_length=model.positional_embedding.shape[0])
    return LoadedClip(model, tokenizer, preprocess, name, pretrained_desc)


def _refuse_unsupported_text(name: str) -> None:
    """UnsupportedTextTower for a built-in open_clip model whose text tower the
    forest cannot encode, before it is built (a Hugging Face tower would need
    `transformers` and fetch its weights; SigLIP's tokenizer needs
    `transformers` too). Hub and local-dir names are checked once built."""
    import open_clip

    cfg = open_clip.get_model_config(name) if ":" not in name else None
    reason = unsupported_text_cfg((cfg or {}).get("text_cfg") or {})
    if reason:
        raise UnsupportedTextTower(f"model {name!r} has {reason}: the prompt-forest engine needs open_clip's "
                                   "causal, end-token-pooled TextTransformer (CLIP's, as in ViT-B-16)")


def eval_transform(model: torch.nn.Module):
    """The model's own evaluation preprocessing: open_clip records it per model and
    pretrained tag (`model.visual.preprocess_cfg`: size, mean/std, interpolation,
    resize mode; e.g. DFN's and CLIPA's weights were trained on squashed, not
    centre-cropped, images); a model without one gets open_clip's default
    (bicubic resize of the shortest side, centre crop) at its image size."""
    import open_clip

    cfg = getattr(model.visual, "preprocess_cfg", None)
    if cfg:
        from open_clip.transform import PreprocessCfg, image_transform_v2

        return image_transform_v2(PreprocessCfg(**cfg), is_train=False)
    image_size = model.visual.image_size
    image_size = image_size[0] if isinstance(image_size, (tuple, list)) else image_size
    return open_clip.image_transform(image_size, is_train=False, mean=getattr(model.visual, "image_mean", None),
                                     std=getattr(model.visual, "image_std", None))


def _load_into(model: torch.nn.Module, path: Path) -> None:
    state = _load_state(path)
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shape_bad = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                 for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or shape_bad:
        parts = []
        if shape_bad:
            parts.append("shape mismatch " + "; ".join(shape_bad[:3]))
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]})")
        raise WeightsMismatchError(f"{path} does not match model {type(model).__name__}: " + ", ".join(parts))
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()})
