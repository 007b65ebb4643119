"""The frozen open_clip text tower, run over a packed prompt forest.

The position-wise parts (LayerNorms, MLPs, layer scales, the qkv and output
projections) are open_clip's own modules applied to the packed tokens; only
attention is replaced by tree attention, and the embedding and EOS pooling by
their fused ops. This is exact because CLIP's text transformer is causal and
pools the EOS token: a token's state depends only on the tokens before it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import ops
from .flex import FlexTreeAttention
from .layout import ForestLayout
from ..errors import InvalidInputError, UnsupportedTextTower

ATTENTION_BACKENDS = ("tree", "flex")


@dataclass(frozen=True)
class TextTowerConfig:
    width: int
    heads: int
    layers: int
    context_length: int
    embed_dim: int
    vocab_size: int


def unsupported_text_cfg(text_cfg: Mapping[str, Any]) -> str | None:
    """Why the tower an open_clip text config describes ("text_cfg" of
    model_configs/<name>.json) cannot be encoded as a forest, or None. Lets
    load_clip refuse a model before building it (and before fetching a Hugging
    Face text tower's weights); TextTower checks the built module as well."""
    if text_cfg.get("hf_model_name"):
        return f"a Hugging Face text tower ({text_cfg['hf_model_name']})"
    if text_cfg.get("no_causal_mask"):
        return "a non-causal text tower (no_causal_mask)"
    pool = text_cfg.get("pool_type", "argmax")
    if pool != "argmax":
        return f"text pooling {pool!r} (the forest pools the end token: 'argmax')"
    if text_cfg.get("embed_cls"):
        return "a CLS token appended to the text (CoCa-style)"
    if text_cfg.get("proj_bias"):
        return "a text projection with a bias"
    return None


def _text_modules(model: nn.Module) -> nn.Module:
    """The module holding token_embedding/transformer/ln_final (CLIP or CustomTextCLIP.text)."""
    if hasattr(model, "transformer") and hasattr(model, "token_embedding"):
        return model
    text = getattr(model, "text", None)
    if text is not None and hasattr(text, "transformer") and hasattr(text, "token_embedding"):
        return text
    raise UnsupportedTextTower(
        f"{type(model).__name__} has no open_clip TextTransformer (token_embedding + transformer); "
        "Hugging Face text towers are not supported by the prompt-forest engine")


class TextTower(nn.Module):
    """Frozen CLIP text tower that encodes a packed forest in one pass.

    Args:
        model: an open_clip CLIP / CustomTextCLIP whose text tower is causal and
            EOS(argmax)-pooled. Its text parameters are used as they are (not copied).
        attention: "tree" (default): the fused tree-attention op (hipro_fast.ops);
            "flex": PyTorch FlexAttention with the tree mask (engine/flex.py; compiled
            on CUDA; on the CPU forward only), the baseline the benchmark compares with.
    """

    def __init__(self, model: nn.Module, attention: str = "tree"):
        super().__init__()
        if attention not in ATTENTION_BACKENDS:
            raise InvalidInputError(f"attention must be one of {ATTENTION_BACKENDS}, got {attention!r}")
        self.attention = attention
        self._flex = FlexTreeAttention() if attention == "flex" else None
        text = _text_modules(model)
        pool = getattr(text, "text_pool_type", getattr(text, "pool_type", None))
        if pool != "argmax":
            raise UnsupportedTextTower(
                f"text pooling is {pool!r}; the forest engine needs 'argmax' (EOS) pooling "
                "(SigLIP, CLIPA and similar towers are not supported)")
        if getattr(text, "cls_emb", None) is not None:
            raise UnsupportedTextTower("the text tower appends a CLS token (CoCa-style); not supported")
        mask = getattr(text, "attn_mask", None)
        n_ctx = text.positional_embedding.shape[0]
        causal = torch.full((n_ctx, n_ctx), float("-inf")).triu_(1)
        if mask is None or mask.shape != causal.shape or not torch.equal(mask.float().cpu(), causal):
            raise UnsupportedTextTower("the text tower is not causal (no standard causal attn_mask)")
        blocks = list(text.transformer.resblocks)
        for i, blk in enumerate(blocks):
            attn = getattr(blk, "attn", None)
            if not isinstance(attn, nn.MultiheadAttention) or hasattr(blk, "ln_1_kv"):
                raise UnsupportedTextTower(
                    f"block {i} is {type(blk).__name__}; only open_clip ResidualAttentionBlock "
                    "with nn.MultiheadAttention self-attention is supported")
            if not attn._qkv_same_embed_dim or attn.bias_k is not None or attn.add_zero_attn:
                raise UnsupportedTextTower(f"block {i}: unsupported MultiheadAttention options")
        proj = text.text_projection
        if isinstance(proj, nn.Linear):
            if proj.bias is not None:
                raise UnsupportedTextTower("text projection with a bias is not supported")
            self._proj_is_linear = True
        else:
            self._proj_is_linear = False
        ln = text.ln_final
        if not isinstance(ln, nn.LayerNorm) or ln.weight is None:
            raise UnsupportedTextTower("ln_final must be an affine LayerNorm")
        self.text = text
        self.blocks = blocks
        width = text.token_embedding.weight.shape[1]
        self.config = TextTowerConfig(
            width=width,
            heads=blocks[0].attn.num_heads if blocks else 1,
            layers=len(blocks),
            context_length=n_ctx,
            embed_dim=self.projection.shape[1],
            vocab_size=text.token_embedding.weight.shape[0],
        )

    @property
    def projection(self) -> torch.Tensor:
        """[W, E] text projection (identity when the tower has none)."""
        proj = self.text.text_projection
        if proj is None:
            return torch.eye(self.text.ln_final.weight.shape[0], device=self.text.ln_final.weight.device)
        return proj.weight.t() if self._proj_is_linear else proj

    @property
    def token_embedding(self) -> torch.Tensor:
        return self.text.token_embedding.weight

    def _attention(self, blk: nn.Module, h: torch.Tensor, layout: ForestLayout) -> torch.Tensor:
        attn: nn.MultiheadAttention = blk.attn
        T, W = h.shape
        H = attn.num_heads
        qkv = F.linear(h, attn.in_proj_weight, attn.in_proj_bias).view(T, 3, H, W // H)
        q, k, v = qkv.unbind(1)
        if self._flex is not None:
            o = self._flex(q, k, v, layout, (W // H) ** -0.5)
        else:
            o = ops.tree_attention(q, k, v, layout.segment_table, layout.token_segment, (W // H) ** -0.5)
        return attn.out_proj(o.reshape(T, W))

    def encode_layout(self, layout: ForestLayout, eos_index: torch.Tensor,
                      ctx_table: torch.Tensor) -> torch.Tensor:
        """Encode a packed forest.

        Args:
            layout: packed forest tables, on the tower's device.
            eos_index: [P] packed EOS index per prompt.
            ctx_table: [R, W] context rows (usually fp32 learnable parameters).
        Returns:
            [P, E] fp32 L2-normalised text features.
        """
        text = self.text
        # fp32 contexts on a bf16 / fp16 tower: the tower's blocks take their own dtype
        # (the cast is differentiable, the contexts stay fp32 masters).
        ctx_table = ctx_table.to(text.token_embedding.weight.dtype)
        x = ops.assemble_forest(ctx_table, text.token_embedding.weight, text.positional_embedding,
                                layout.token_ctx_row, layout.token_vocab_id, layout.token_position)
        for blk in self.blocks:
            x = x + blk.ls_1(self._attention(blk, blk.ln_1(x), layout))
            x = x + blk.ls_2(blk.mlp(blk.ln_2(x)))
        ln = text.ln_final
        bias = ln.bias if ln.bias is not None else torch.zeros_like(ln.weight)  # LayerNorm(bias=False)
        return ops.pool_eos(x, eos_index, ln.weight, bias, self.projection, ln.eps)

    def encode_forest(self, forest, ctx_table: torch.Tensor,
                      path_weights: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Per-task class features {task: [C, E]} for a PromptForest (path_weights:
        see PromptForest.gather)."""
        features = self.encode_layout(forest.layout, forest.eos_index, ctx_table)
        return forest.gather(features, path_weights)

    def encode_embedded(self, embedded: torch.Tensor, eos_position: torch.Tensor) -> torch.Tensor:
        """open_clip's own computation on embedded full-length prompts (the oracle).

        Args:
            embedded: [N, L, W] token embeddings (without positions), L = context length.
            eos_position: [N] index of each prompt's EOS token.
        Returns:
            [N, E] fp32 L2-normalised features.
        """
        text = self.text
        x = embedded + text.positional_embedding
        x = text.transformer(x, attn_mask=text.attn_mask)
        x = text.ln_final(x)
        pooled = x[torch.arange(x.shape[0], device=x.device), eos_position]
        return F.normalize((pooled @ self.projection).float(), dim=-1)
