"""Classify unlabelled images with a trained model: what `hipro predict` runs.

The images go through the frozen image tower once (no feature cache: they are
new images), and a Classifier (exported, or made in memory from a checkpoint)
scores them for one task: top-k classes and their softmax probabilities over
the task's classes.
"""
from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from typing import Sequence

import torch

from ..data.feature_cache import FeatureCache
from ..data.tasks_spec import ImageRecord
from ..errors import InvalidInputError
from ..method.export import Classifier


@dataclass
class Predictions:
    """Top-k predictions of one task's classifier for a list of images.

    paths: the scored images, in order. classes / probs: per image, its top-k
    class names and their probabilities (descending). skipped: images that
    could not be decoded (with skip_bad_images), not scored.
    """

    task: str
    paths: list[str]
    classes: list[list[str]]
    probs: list[list[float]]
    skipped: list[str] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        """Top-1 class -> how many images got it (most first)."""
        out: dict[str, int] = {}
        for top in self.classes:
            out[top[0]] = out.get(top[0], 0) + 1
        return dict(sorted(out.items(), key=lambda kv: (-kv[1], kv[0])))

    def to_csv(self) -> str:
        """path,class,probability[,class_2,probability_2,...]: one row per image."""
        k = len(self.classes[0]) if self.classes else 1
        head = ["path", "class", "probability"]
        for i in range(2, k + 1):
            head += [f"class_{i}", f"probability_{i}"]
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(head)
        for path, names, probs in zip(self.paths, self.classes, self.probs):
            row = [path]
            for name, p in zip(names, probs):
                row += [name, f"{p:.6f}"]
            w.writerow(row)
        return buf.getvalue()


def predict_images(clip, classifier: Classifier, task: str, paths: Sequence[str], *, top_k: int = 1,
                   device: str = "cpu", batch_size: int = 128, num_workers: int | None = None,
                   skip_bad_images: bool = False, progress: bool = True) -> Predictions:
    """Encode `paths` with clip's image tower (L2-normalised features, as in
    training) and score them with classifier.logits(task, ·).

    top_k: how many classes per image (1 <= top_k <= the task's classes).
    Raises InvalidInputError naming the task or top_k when they do not fit the
    classifier, BadImageError naming an undecodable image (unless
    skip_bad_images), SpecError when none can be decoded.
    """
    if task not in classifier.tasks:
        raise InvalidInputError(f"task {task!r} is not one of the classifier's tasks {classifier.tasks}")
    names = classifier.class_names(task)
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= len(names):
        raise InvalidInputError(f"top_k must be a whole number from 1 to {len(names)} (the classes of task "
                                f"{task!r}), got {top_k!r}")
    records = [ImageRecord(str(p), 0) for p in paths]  # unlabelled: the label is unused
    cache = FeatureCache(clip, None, device=device, batch_size=batch_size, num_workers=num_workers,
                         skip_bad_images=skip_bad_images, progress=progress)
    enc = cache.encode(records, tag=f"predict {task}")
    with torch.no_grad():
        # scored where the classifier is (the caller's module stays where it is)
        probs = classifier.logits(task, enc.features).softmax(dim=1)
        top = probs.topk(top_k, dim=1)
    return Predictions(task, list(enc.paths), [[names[i] for i in row] for row in top.indices.tolist()],
                       top.values.tolist(), list(enc.skipped))
