"""Content digests of a CLIP's weights: what identifies a tower whatever file,
path or device it came from. The feature cache keys the image tower by one;
checkpoints and exported classifiers record the text side's, so that contexts
are never loaded onto another CLIP without a word (they would give a
classifier of garbage, silently)."""
from __future__ import annotations

import hashlib
import threading
import weakref
from collections import OrderedDict
from typing import Mapping

import torch
from torch import nn

__all__ = ["tensors_digest", "text_side_digest", "text_side_dtype", "image_side_digest"]


def tensors_digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """sha256 (hex) of the tensors' names, dtypes, shapes and bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(name.encode())
        h.update(str(t.dtype).encode() + str(tuple(t.shape)).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


_DIGESTS: OrderedDict[tuple, tuple[str, list[weakref.ref]]] = OrderedDict()
_DIGESTS_KEPT = 8
_DIGESTS_LOCK = threading.Lock()  # two threads may digest models at once (eviction vs move_to_end)


def _cached_digest(kind: str, state: Mapping[str, torch.Tensor], compute, refresh: bool = False) -> str:
    """compute(state), cached per weight tensor under `kind` (the same objects,
    unmodified since by in-place torch ops: writes through `.data` or a numpy
    view go unseen by the version counter): a tower is hashed once however many
    steps of a command ask (about a second for ViT-B/16). refresh: compute it
    anew (and cache that), whatever is cached."""
    names = sorted(state)
    key = (kind,) + tuple((k, state[k].data_ptr(), state[k]._version, tuple(state[k].shape), str(state[k].dtype),
                           str(state[k].device)) for k in names)
    with _DIGESTS_LOCK:
        hit = None if refresh else _DIGESTS.get(key)
        # the same addresses may be another, freed model's: a hit must be these very tensors
        if hit is not None and all(ref() is state[k] for ref, k in zip(hit[1], names)):
            _DIGESTS.move_to_end(key)
            return hit[0]
    with torch.no_grad():  # hashed outside the lock
        digest = compute(state)
    with _DIGESTS_LOCK:
        _DIGESTS[key] = (digest, [weakref.ref(state[k]) for k in names])
        while len(_DIGESTS) > _DIGESTS_KEPT:
            _DIGESTS.popitem(last=False)
    return digest


def _text_side(clip_model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in clip_model.state_dict(keep_vars=True).items() if not k.startswith("visual.")}


def text_side_digest(clip_model: nn.Module) -> str:
    """A 16-hex digest of every weight of an open_clip model outside its image
    tower (`visual.*`): the text tower and the logit scale, what text features
    and logits come from. Rounded to bfloat16 first, so the same weights in
    fp32, bf16 or fp64 (a tower cast for training) digest alike (fp16 rounds
    differently: see text_side_dtype). Cached (_cached_digest)."""
    def compute(state: Mapping[str, torch.Tensor]) -> str:
        rounded = {k: (v.detach().to(torch.bfloat16) if v.is_floating_point() else v.detach())
                   for k, v in state.items()}
        return tensors_digest(rounded)[:16]
    return _cached_digest("text", _text_side(clip_model), compute)


def image_side_digest(clip_model: nn.Module, refresh: bool = False) -> str:
    """tensors_digest (sha256 hex) of the image tower's weights (`clip_model.visual`,
    or the module itself when it has none) in the dtype they have now: what the
    feature cache keys by and exported classifiers record. Cached
    (_cached_digest); refresh=True (the feature cache, whose key must see every
    write) hashes the weights anew."""
    visual = getattr(clip_model, "visual", clip_model)
    return _cached_digest("image", visual.state_dict(keep_vars=True), tensors_digest, refresh)


def text_side_dtype(clip_model: nn.Module) -> str:
    """"torch.float16" when any text-side weight is fp16 (open_clip's fp16
    precision leaves LayerNorms and embeddings fp32), else the dtype of the
    first floating-point one ("torch.float32"): two digests of one CLIP agree
    across fp32 / bf16 / fp64, not with fp16."""
    dtypes = [v.dtype for v in _text_side(clip_model).values() if v.is_floating_point()]
    if torch.float16 in dtypes:
        return str(torch.float16)
    return str(dtypes[0]) if dtypes else "none"
