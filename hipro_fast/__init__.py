"""hipro_fast: hierarchical prompt learning (HiPro) on one frozen CLIP, with an
exact prompt-forest text engine in C++/CUDA."""
from .ops.extension import build_info
from .data.clip_loading import LoadedClip, WeightsMismatchError, load_clip
from .engine.encoder import ForestEncoder
from .engine.layout import ForestError
from .method.model import HiProModel, TaskSpecError
from .engine.prompt_forest import build_prompt_forest
from .engine.text_tower import TextTower, UnsupportedTextTower
from .method.tree import TaskTree, TreeError
from .method.training import FitResult, NonFiniteLossError, TrainConfig, evaluate, fit
from .method.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .method.baselines import METHODS, ComparisonTable, build_method, compare
from .method.export import Classifier, export_classifier
from .method.selection import SelectedModel, fit_selected
from .method.affinity import task_affinity

__all__ = [
    "build_info", "load_clip", "LoadedClip", "WeightsMismatchError", "ForestEncoder", "ForestError",
    "HiProModel", "TaskSpecError", "build_prompt_forest", "TextTower", "UnsupportedTextTower",
    "TaskTree", "TreeError", "fit", "evaluate", "TrainConfig", "FitResult", "NonFiniteLossError",
    "save_checkpoint", "load_checkpoint", "CheckpointError", "compare", "ComparisonTable", "build_method",
    "METHODS", "Classifier", "export_classifier", "task_affinity", "SelectedModel", "fit_selected",
]
__version__ = "0.1.0"
