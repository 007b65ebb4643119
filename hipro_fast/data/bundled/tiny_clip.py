"""``hipro-tiny-clip``: the tiny pretrained open_clip CLIP that hipro_fast ships.

The architecture is an ordinary open_clip model config
(``hipro_fast/assets/hipro-tiny-clip.json``: ViT 64x64 / patch 8 / width 128 /
4 layers; text transformer width 128 / 4 heads / 3 layers, causal mask, argmax
(EOT) pooling, no projection bias, CLIP BPE vocabulary 49408, context 77). The
weights (``hipro-tiny-clip.safetensors``, stored fp16) come from
``scripts/pretrain_tiny_clip.py``. Loading never contacts a hub.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from ...errors import InvalidInputError, MissingFileError

ASSETS_DIR = Path(__file__).resolve().parents[2] / "assets"
TINY_CLIP_NAME = "hipro-tiny-clip"
CONFIG_PATH = ASSETS_DIR / f"{TINY_CLIP_NAME}.json"
WEIGHTS_PATH = ASSETS_DIR / f"{TINY_CLIP_NAME}.safetensors"

__all__ = ["TINY_CLIP_NAME", "CONFIG_PATH", "WEIGHTS_PATH", "tiny_clip_config", "build_tiny_clip", "load_tiny_clip"]


def tiny_clip_config(path: Path | str | None = None) -> dict:
    """The open_clip model config dict (``embed_dim``, ``vision_cfg``, ``text_cfg``)."""
    with open(path or CONFIG_PATH) as f:
        return json.load(f)


def _register_config(config_path: Path) -> None:
    """Make open_clip know ``hipro-tiny-clip`` (as stored in ``config_path``)."""
    import open_clip

    if config_path.stem != TINY_CLIP_NAME:
        raise InvalidInputError(f"config file must be named {TINY_CLIP_NAME}.json, got {config_path.name}")
    if open_clip.get_model_config(TINY_CLIP_NAME) != tiny_clip_config(config_path):
        open_clip.add_model_config(config_path)  # registry is keyed by the file stem


class _NoRandomWeightsWarning(logging.Filter):
    """Drops open_clip's "No pretrained weights loaded ... initialized randomly"
    for this model: its callers load the shipped weights right after."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(f"No pretrained weights loaded for model '{TINY_CLIP_NAME}'")


def build_tiny_clip(config_path: Path | str | None = None, device="cpu"):
    """Randomly initialised ``hipro-tiny-clip`` built by ``open_clip.create_model``
    (open_clip's warning that it is random is dropped: load_clip and
    load_tiny_clip load the shipped weights into it next)."""
    import open_clip

    _register_config(Path(config_path or CONFIG_PATH))
    quiet = _NoRandomWeightsWarning()
    logging.getLogger().addFilter(quiet)
    try:
        return open_clip.create_model(TINY_CLIP_NAME, pretrained=None, device=device)
    finally:
        logging.getLogger().removeFilter(quiet)


def image_preprocess(image_size: int):
    """open_clip eval transform: resize (bicubic) + center crop to ``image_size``, CLIP mean/std."""
    import open_clip

    return open_clip.image_transform(image_size, is_train=False)


def load_tiny_clip(device="cpu", weights: Path | str | None = None):
    """Return ``(model, preprocess, tokenizer)`` for the bundled tiny CLIP.

    ``model`` is an ``open_clip.model.CLIP`` in eval mode with frozen fp32
    parameters; ``preprocess`` maps a PIL image to a normalised
    ``[3, 64, 64]`` tensor (small images are resized up to the model's
    image_size); ``tokenizer`` is the standard CLIP BPE ``SimpleTokenizer``
    with context length 77.
    """
    import torch
    from open_clip.tokenizer import SimpleTokenizer
    from safetensors.torch import load_file

    weights = Path(weights or WEIGHTS_PATH)
    if not weights.is_file():
        raise MissingFileError(
            f"tiny CLIP weights not found at {weights}; run scripts/pretrain_tiny_clip.py to create them"
        )
    cfg = tiny_clip_config()
    model = build_tiny_clip(device="cpu")
    state = {k: v.to(torch.float32) for k, v in load_file(str(weights)).items()}
    model.load_state_dict(state, strict=True)
    model = model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    preprocess = image_preprocess(cfg["vision_cfg"]["image_size"])
    tokenizer = SimpleTokenizer(context_length=cfg["text_cfg"].get("context_length", 77))
    return model, preprocess, tokenizer
