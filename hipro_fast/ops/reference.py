"""Plain-PyTorch reference implementations of the fused ops.

They are the test oracle for the compiled kernels and the fallback when the
extension is not built. Autograd differentiates them directly. Shapes follow
`hipro_fast.ops`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import InvalidInputError

# Query rows per chunk in the dense-mask attention reference: bounds its
# memory at H * chunk * T scores.
_QUERY_CHUNK = 512


def assemble_forest(
    ctx_table: torch.Tensor,
    token_embedding: torch.Tensor,
    positional_embedding: torch.Tensor,
    token_ctx_row: torch.Tensor,
    token_vocab_id: torch.Tensor,
    token_position: torch.Tensor,
) -> torch.Tensor:
    """[T, W]: context row or frozen token embedding, plus the positional row."""
    reads_ctx = (token_ctx_row >= 0).unsqueeze(1)
    if ctx_table.shape[0] == 0:  # a forest of vocabulary tokens only (no context rows to index)
        if bool(reads_ctx.any()):
            raise InvalidInputError("assemble_forest: a token reads a context row, but ctx_table has none")
        from_ctx = ctx_table.new_zeros((token_ctx_row.shape[0], ctx_table.shape[1]))
    else:
        from_ctx = ctx_table[token_ctx_row.clamp_min(0)]
    from_vocab = token_embedding[token_vocab_id.clamp_min(0)]
    return torch.where(reads_ctx, from_ctx, from_vocab) + positional_embedding[token_position]


def tree_attention_mask(segment_table: torch.Tensor, token_segment: torch.Tensor,
                        queries: slice | None = None) -> torch.Tensor:
    """Boolean [Tq, T] mask, True where query q sees key k.

    With the DFS-preorder layout, q sees k exactly when k <= q < subtree_end(seg(k)).
    """
    T = token_segment.numel()
    idx = torch.arange(T, device=token_segment.device)
    q_idx = idx if queries is None else idx[queries]
    key_subtree_end = segment_table[token_segment, 3]
    return (idx.unsqueeze(0) <= q_idx.unsqueeze(1)) & (q_idx.unsqueeze(1) < key_subtree_end.unsqueeze(0))


def tree_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    segment_table: torch.Tensor,
    token_segment: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """[T, H, D] attention of each query over its visible keys (dense mask, chunked).
    Computes in the inputs' precision promoted to fp32, as the kernels do, also
    inside an autocast region (which would otherwise run the attention in bf16)."""
    T = q.shape[0]
    if T == 0:  # still a node of q's, k's and v's graph: their gradients are empty tensors, not None
        return q.clone() + 0 * (k.sum() + v.sum())
    qh, kh, vh = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))  # [1, H, T, D]
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    outs = []
    with torch.autocast(q.device.type, enabled=False):
        for start in range(0, T, _QUERY_CHUNK):
            rows = slice(start, min(T, start + _QUERY_CHUNK))
            mask = tree_attention_mask(segment_table, token_segment, rows)
            out = F.scaled_dot_product_attention(
                qh[:, :, rows].to(acc), kh.to(acc), vh.to(acc), attn_mask=mask, scale=scale)
            outs.append(out.to(q.dtype))
    return torch.cat(outs, dim=2).squeeze(0).transpose(0, 1)


def pool_eos(
    x: torch.Tensor,
    eos_index: torch.Tensor,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    projection: torch.Tensor,
    eps: float,
) -> torch.Tensor:
    """[P, E] L2-normalised projections of the LayerNormed EOS rows (fp32, fp64 for
    fp64), also inside an autocast region, as the kernels."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    with torch.autocast(x.device.type, enabled=False):
        rows = F.layer_norm(x[eos_index].to(acc), (x.shape[1],), ln_weight.to(acc), ln_bias.to(acc), eps)
        return F.normalize(rows @ projection.to(acc), dim=-1)
