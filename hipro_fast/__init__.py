"""hipro_fast: hierarchical prompt learning (HiPro) on one frozen CLIP, with an
exact prompt-forest text engine in C++/CUDA."""
from ._ext import build_info
from .clip_loading import LoadedClip, WeightsMismatchError, load_clip
from .encoder import ForestEncoder
from .layout import ForestError
from .model import HiProModel, TaskSpecError
from .prompt_forest import build_prompt_forest
from .text_tower import TextTower, UnsupportedTextTower
from .tree import TaskTree, TreeError
from .training import FitResult, NonFiniteLossError, TrainConfig, evaluate, fit
from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .baselines import METHODS, ComparisonTable, build_method, compare
from .export import Classifier, export_classifier
from .affinity import task_affinity

__all__ = [
    "build_info", "load_clip", "LoadedClip", "WeightsMismatchError", "ForestEncoder", "ForestError",
    "HiProModel", "TaskSpecError", "build_prompt_forest", "TextTower", "UnsupportedTextTower",
    "TaskTree", "TreeError", "fit", "evaluate", "TrainConfig", "FitResult", "NonFiniteLossError",
    "save_checkpoint", "load_checkpoint", "CheckpointError", "compare", "ComparisonTable", "build_method",
    "METHODS", "Classifier", "export_classifier", "task_affinity",
]
__version__ = "0.1.0"
