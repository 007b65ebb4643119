"""Stand-alone per-task classifiers: score image features with no text tower.

`export_classifier(model, path)` writes, in ONE safetensors file (atomically),

    "weight/<i>"    [C_i, E] fp32 L2-normalised class text features of task i
    "logit_scale"   [] fp32, the CLIP logit scale (exp of the stored log-scale)

with the task names, class names and model config as JSON in the metadata.
`Classifier.load(path)` computes the same logits as `HiProModel.logits`:
logit_scale * features.float() @ weight.T.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping

import torch

from ..files import atomic_write_bytes
from .model import HiProModel, TaskSpecError
from ..errors import InvalidInputError, MissingFileError

FORMAT = "hipro_fast.classifier"
VERSION = "1"


def export_classifier(model: HiProModel, path: str | Path,
                      text_features: Mapping[str, torch.Tensor] | None = None) -> Path:
    """Write the model's per-task classifier weights to `path` (a .safetensors file)."""
    from safetensors.torch import save

    if text_features is None:
        with torch.no_grad():
            text_features = model.text_features()
    tasks = list(model.tasks)
    tensors = {f"weight/{i}": text_features[t].detach().float().cpu().contiguous() for i, t in enumerate(tasks)}
    tensors["logit_scale"] = model.logit_scale.detach().float().cpu().reshape(()).contiguous()
    metadata = {
        "format": FORMAT,
        "version": VERSION,
        "tasks": json.dumps(tasks),
        "classes": json.dumps({t: list(model.tasks[t]) for t in tasks}),
        "embed_dim": str(model.embed_dim),
        "model_config": json.dumps(model.config()),
    }
    return atomic_write_bytes(path, save(tensors, metadata=metadata))


class Classifier:
    """Per-task linear heads exported from a HiProModel.

    clf.tasks: task names. clf.class_names(task): its class names.
    clf.logits(task, feats): [N, C] scaled cosine logits of L2-normalised image
    features [N, E]. clf.predict(task, feats): [N] class indices.
    """

    def __init__(self, weights: Mapping[str, torch.Tensor], logit_scale: torch.Tensor,
                 classes: Mapping[str, list[str]], config: dict | None = None):
        self.weights = dict(weights)
        self.logit_scale = logit_scale
        self._classes = {t: list(c) for t, c in classes.items()}
        self.config = config or {}
        for t, w in self.weights.items():
            if w.dim() != 2 or w.shape[0] != len(self._classes[t]):
                raise TaskSpecError(f"task {t!r}: weight {tuple(w.shape)} does not match its "
                                    f"{len(self._classes[t])} classes")

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> "Classifier":
        from safetensors import safe_open

        path = Path(path)
        if not path.exists():
            raise MissingFileError(f"classifier file not found: {path}")
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT:
                raise InvalidInputError(f"{path}: not a hipro_fast classifier (format {meta.get('format')!r})")
            tasks = json.loads(meta["tasks"])
            classes = json.loads(meta["classes"])
            weights = {t: f.get_tensor(f"weight/{i}") for i, t in enumerate(tasks)}
            scale = f.get_tensor("logit_scale")
        return cls(weights, scale, {t: classes[t] for t in tasks}, json.loads(meta.get("model_config", "{}")))

    @property
    def tasks(self) -> list[str]:
        return list(self.weights)

    @property
    def embed_dim(self) -> int:
        return int(next(iter(self.weights.values())).shape[1])

    def class_names(self, task: str) -> list[str]:
        self._check_task(task)
        return list(self._classes[task])

    def _check_task(self, task: str) -> None:
        if task not in self.weights:
            raise TaskSpecError(f"unknown task {task!r} (classifier tasks: {self.tasks})")

    def logits(self, task: str, features: torch.Tensor) -> torch.Tensor:
        self._check_task(task)
        w = self.weights[task]
        features = torch.as_tensor(features)
        if features.dim() != 2 or features.shape[1] != w.shape[1]:
            raise TaskSpecError(f"task {task!r}: image features must be [N, {w.shape[1]}] "
                                f"(the classifier's embed dim), got {tuple(features.shape)}")
        return self.logit_scale * features.to(w.device).float() @ w.t()

    def predict(self, task: str, features: torch.Tensor) -> torch.Tensor:
        return self.logits(task, features).argmax(dim=1)

    def to(self, device: str | torch.device) -> "Classifier":
        self.weights = {t: w.to(device) for t, w in self.weights.items()}
        self.logit_scale = self.logit_scale.to(device)
        return self

    def __repr__(self) -> str:
        sizes = ", ".join(f"{t}: {len(c)}" for t, c in self._classes.items())
        return f"Classifier(embed_dim={self.embed_dim}, tasks={{{sizes}}})"
