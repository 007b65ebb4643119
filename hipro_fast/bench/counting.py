"""What one text step computes, counted from the prompt lists (nothing run):
tokens, attention keys, pooled rows and model FLOPs per method. Both runners
report these; `CONVENTIONS` is the text that goes into the results with them."""
from __future__ import annotations

import torch.nn as nn

from ..engine.prompt_forest import PromptForest
from .naive import PromptSpec

CONVENTIONS = """\
tokens   sequence tokens pushed through the transformer per step.
  FLOPs    model FLOPs, multiply-add = 2. Per token per layer, forward =
           2 * (linear weights of the block) [24 W^2 at mlp_ratio 4: qkv 6, out 2,
           MLP 16] + 4 W * (keys the attention computes for that query); the
           dense masked attention of the baselines computes all seq_len keys,
           the forest exactly the visible keys (from the segment table).
           Backward with frozen weights computes input gradients only: the
           linear layers' dX GEMMs = 1x their forward FLOPs, attention
           dP, dS->dQ, dK, dV = 8 W per key (2x forward). So fwd+bwd =
           48 W^2 per token-layer + 12 W per visible key, plus 4 W E per pooled
           EOS row (projection fwd + dX). Recomputation inside kernels, norms,
           activations and softmax are not counted.
  peak MB  peak resident-set growth during one step over the resident model
           (Linux VmHWM reset through /proc/self/clear_refs after gc and
           malloc_trim, read after the step), i.e. what the step allocates at
           its peak; measured in-process.
  GEMM     fp32 torch.mm [T_forest, W] x [W, 4W] timed interleaved with the forest."""


def linear_flops_per_token(tower) -> int:
    """Forward FLOPs of one block's linear layers per token (2 * weights)."""
    blk = tower.blocks[0]
    n = blk.attn.in_proj_weight.numel()
    for m in blk.modules():
        if isinstance(m, nn.Linear):
            n += m.weight.numel()
    return 2 * n


def forest_visible_keys(layout) -> int:
    """Sum over packed tokens of the keys each one sees (ancestor segments + own causal prefix)."""
    table = layout.segment_table.tolist()
    anc = [0] * len(table)
    total = 0
    for s, (off, length, parent, _) in enumerate(table):
        if parent >= 0:
            anc[s] = anc[parent] + table[parent][1]
        total += length * anc[s] + length * (length + 1) // 2
    return total


def step_flops(tower, tokens: int, key_tokens: int, pooled: int) -> dict[str, float]:
    """Model FLOPs of one forward + dX-only backward (see `CONVENTIONS`)."""
    cfg = tower.config
    lin = linear_flops_per_token(tower)
    W, E = cfg.width, cfg.embed_dim
    fwd = cfg.layers * (tokens * lin + 4 * W * key_tokens) + pooled * 2 * W * E
    bwd = cfg.layers * (tokens * lin + 8 * W * key_tokens) + pooled * 2 * W * E
    return {"forward": float(fwd), "backward": float(bwd), "total": float(fwd + bwd)}


def step_counts(tower, spec: PromptSpec, forest: PromptForest) -> dict[str, dict]:
    """Per method (naive, padded, truncated, forest): tokens, seq_len, key_tokens,
    pooled rows and `flops` of one step; the forest also its segment count."""
    L = tower.config.context_length
    naive_rows = sum(len(ids) for _, _, ids in spec.sets)
    P = spec.num_prompts
    lc = max(spec.prompt_length(p) for p in range(P))
    out = {"naive": {"tokens": naive_rows * L, "seq_len": L, "pooled": naive_rows},
           "padded": {"tokens": P * L, "seq_len": L, "pooled": P},
           "truncated": {"tokens": P * lc, "seq_len": lc, "pooled": P}}
    for v in out.values():
        v["key_tokens"] = v["tokens"] * v["seq_len"]
    fl = forest.layout
    out["forest"] = {"tokens": fl.num_tokens, "seq_len": None, "key_tokens": forest_visible_keys(fl),
                     "pooled": forest.num_prompts, "segments": fl.num_segments}
    for v in out.values():
        v["flops"] = step_flops(tower, v["tokens"], v["key_tokens"], v["pooled"])
    return out
