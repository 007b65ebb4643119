"""Layer 1: the fused ops (``torch.ops.hipro_fast.*``).

``extension`` loads the compiled kernels, ``interface`` wraps each op with its
autograd and fake registrations, ``reference`` holds the plain-PyTorch
definitions used as test oracle and CPU/GPU fallback.
"""
from .extension import build_info, fused_available
from .interface import (assemble_forest, attention_block_grouping, attention_block_min_pairs, attention_knobs,
                        pool_eos, set_attention_block_grouping, set_attention_block_min_pairs, tree_attention)

__all__ = ["assemble_forest", "tree_attention", "pool_eos", "attention_block_min_pairs",
           "set_attention_block_min_pairs", "attention_block_grouping", "set_attention_block_grouping",
           "attention_knobs", "build_info", "fused_available"]
