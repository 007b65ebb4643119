"""The tree-attention decomposition knobs, set for the duration of a test."""
from __future__ import annotations

import contextlib

from hipro_fast import ops


@contextlib.contextmanager
def attention_knobs(min_pairs: int | None, grouping: str | None):
    """Set the block threshold and grouping (None: leave as is); restore them after."""
    before = ops.attention_block_min_pairs(), ops.attention_block_grouping()
    if min_pairs is not None:
        ops.set_attention_block_min_pairs(min_pairs)
    if grouping is not None:
        ops.set_attention_block_grouping(grouping)
    try:
        yield
    finally:
        ops.set_attention_block_min_pairs(before[0])
        ops.set_attention_block_grouping(before[1])
