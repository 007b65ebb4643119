"""The tree-attention decomposition knobs, set for the duration of a test
(hipro_fast.ops.attention_knobs, under the name the tests import)."""
from hipro_fast.ops import attention_knobs

__all__ = ["attention_knobs"]
