"""The benchmarked text tower: an open_clip model with random weights, frozen,
text side only, and open_clip's tokenizer. Random weights suffice because the
step's cost does not depend on their values, and they need no download."""
from __future__ import annotations

import os

import torch
import torch.nn as nn


def load_model(name: str, seed: int = 0) -> nn.Module:
    """open_clip model `name` (or "tiny": a 2-layer width-64 text tower, for smoke
    tests) with random weights, eval, frozen; the vision tower dropped."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import open_clip  # after HF_HUB_OFFLINE is set, and lazily (CLI start-up)
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    torch.manual_seed(seed)
    if name == "tiny":
        model = CLIP(embed_dim=64,
                     vision_cfg=CLIPVisionCfg(layers=1, width=64, head_width=32, patch_size=16, image_size=32),
                     text_cfg=CLIPTextCfg(context_length=77, vocab_size=49408, width=64, heads=2, layers=2))
    else:
        model = open_clip.create_model(name, pretrained=None)
    model.visual = None  # text side only
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def load_tokenizer():
    """open_clip's BPE tokenizer (the one every open_clip text tower here uses)."""
    from open_clip.tokenizer import SimpleTokenizer  # lazily (CLI start-up)

    return SimpleTokenizer()
