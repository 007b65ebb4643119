"""Tree attention through PyTorch's FlexAttention: the peer a user would write.

The tree mask in DFS preorder is one comparison per pair: key token k (in
segment s) is seen by exactly the queries [k, subtree_end(s)) (see
csrc/tree_index.h), so

    mask_mod(b, h, q, k) = k <= q < key_end[k],   key_end[k] = subtree_end(seg(k))

and FlexAttention's block mask skips the [128 x 128] tiles that hold no
visible pair. `TextTower(model, attention="flex")` uses it in place of the
fused op; `hipro bench --device cuda` times it side by side.

Devices (torch 2.14):
  * CUDA: flex_attention compiled with torch.compile (its intended use; the
    first call per shape compiles), forward and backward.
  * CPU: the eager forward only, a check of the mask, not a fast path.
    FlexAttention has no CPU backward, so a call that would need one raises
    FlexAttentionUnavailable instead of failing later inside autograd.
"""
from __future__ import annotations

import warnings

import torch

from ..errors import FlexAttentionUnavailable
from .layout import ForestLayout

try:  # FlexAttention arrived in torch 2.5; older torch reports it at use.
    from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention
except ImportError:  # pragma: no cover - torch < 2.5
    BlockMask = create_block_mask = flex_attention = None

_COMPILED: dict[str, object] = {}  # "flex": the compiled flex_attention (one per process)
_MAX_CACHED_MASKS = 4


def tree_key_end(layout: ForestLayout) -> torch.Tensor:
    """[T] int64: one past the last query that sees each key token."""
    return layout.segment_table[layout.token_segment, 3]


def tree_mask_mod(key_end: torch.Tensor):
    """FlexAttention mask_mod of the tree: key k is seen by the queries [k, key_end[k])."""

    def mask_mod(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & (q_idx < key_end[kv_idx])

    return mask_mod


def _flex_fn(device: torch.device):
    if device.type != "cuda":
        return flex_attention
    if "flex" not in _COMPILED:
        _COMPILED["flex"] = torch.compile(flex_attention, dynamic=False)
    return _COMPILED["flex"]


class FlexTreeAttention:
    """Tree attention over packed [T, H, D] q, k, v with FlexAttention; keeps the
    block mask of the last few layouts (building one evaluates the mask over all
    T x T pairs)."""

    def __init__(self):
        self._masks: list[tuple[ForestLayout, torch.device, "BlockMask"]] = []

    def __getstate__(self):  # the masks close over their layout (a local function): a cache, rebuilt on use
        return {**self.__dict__, "_masks": []}

    def block_mask(self, layout: ForestLayout, device: torch.device) -> "BlockMask":
        for lay, dev, mask in self._masks:
            if lay is layout and dev == device:
                return mask
        T = layout.num_tokens
        key_end = tree_key_end(layout).to(device)
        mask = create_block_mask(tree_mask_mod(key_end), None, None, T, T, device=device)
        self._masks = (self._masks + [(layout, device, mask)])[-_MAX_CACHED_MASKS:]
        return mask

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: ForestLayout,
                 scale: float) -> torch.Tensor:
        """q, k, v: [T, H, D] (rows may be strided); returns [T, H, D] in q's dtype."""
        if flex_attention is None:
            raise FlexAttentionUnavailable(
                f"attention='flex' needs torch.nn.attention.flex_attention (torch >= 2.5); "
                f"this is torch {torch.__version__}")
        if q.device.type == "cpu" and torch.is_grad_enabled() and any(
                t.requires_grad for t in (q, k, v)):
            raise FlexAttentionUnavailable(
                f"attention='flex' has no backward on the CPU (torch {torch.__version__}'s "
                "FlexAttention implements the CPU forward only): run the forward under "
                "torch.no_grad(), use attention='tree' (--attention tree) to train on the CPU, or use a CUDA device")
        T = q.shape[0]
        if T == 0:
            return torch.empty_like(q)
        mask = self.block_mask(layout, q.device)
        # [1, H, T, D]; contiguous, as the compiled kernel's usual input (a copy of
        # q, k, v is small next to the attention itself).
        qh, kh, vh = (x.permute(1, 0, 2).unsqueeze(0).contiguous() for x in (q, k, v))
        with warnings.catch_warnings():
            if q.device.type == "cpu":
                # Eager (unfused) on the CPU is the point there: a forward check, not a fast path.
                # On CUDA the warning stays: it means the compiled kernel fell back to eager
                # (e.g. torch.compile's recompile limit, one compile per token count and grad mode).
                warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
            out = _flex_fn(q.device)(qh, kh, vh, block_mask=mask, scale=scale)
        return out.squeeze(0).permute(1, 0, 2)
