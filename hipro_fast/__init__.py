"""hipro_fast: hierarchical prompt learning on one frozen CLIP, with an exact
prompt-forest text engine in C++/CUDA."""
from ._ext import build_info

__all__ = ["build_info"]
__version__ = "0.1.0"
