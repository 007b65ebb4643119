"""Validation of per-task (features, labels) data, shared by training,
evaluation and the affinity step so that every entry point has the same rules
and the same messages."""
from __future__ import annotations

import warnings
from typing import Any, Mapping, Sequence

import torch

from ..errors import TaskSpecError

__all__ = ["validate_task_data"]


def _as_tensor(task: str, role: str, what: str, value: Any) -> torch.Tensor:
    """A task's features or labels as a tensor (detached: data, not a graph), or
    a TaskSpecError naming them (strings, ragged lists)."""
    try:
        return torch.as_tensor(value).detach()
    except (TypeError, ValueError, RuntimeError) as e:
        raise TaskSpecError(f"task {task!r}: {role} {what} must be a tensor, an array or a list of numbers "
                            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"[:400]) from None


def validate_task_data(tasks: Mapping[str, Sequence[str]], data: Any, embed_dim: int, role: str = "train",
                       require_all: bool = True) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Check per-task (features, labels) against the tasks' classes.

    Args:
        tasks: task -> class names (the order of the result).
        data: task -> (features [N, embed_dim] floating point, labels [N] integers
            in 0..n_classes-1).
        embed_dim: the image-feature width the features must have.
        role: the split's name in messages ("train", "val", "eval").
        require_all: every task must have data (else tasks without data are skipped).
    Returns:
        {task: (fp32 features [N, E], int64 labels [N])} in `tasks` order.
    Raises:
        TaskSpecError naming the task, the split and the culprit; warns when
        features are not L2-normalised.
    """
    if not isinstance(data, Mapping):
        raise TaskSpecError(f"{role} data must map task name -> (features, labels), got {type(data).__name__}")
    if not data:
        raise TaskSpecError(f"{role} data has no tasks")
    for task in data:
        if task not in tasks:
            raise TaskSpecError(f"{role} data has task {task!r} that the model lacks "
                                f"(model tasks: {list(tasks)})")
    if require_all:
        for task in tasks:
            if task not in data:
                raise TaskSpecError(f"model task {task!r} is missing from the {role} data")
    out = {}
    E = int(embed_dim)
    for task in tasks:
        if task not in data:
            continue
        item = data[task]
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise TaskSpecError(f"{role} data of task {task!r} must be a (features, labels) pair")
        x, y = (_as_tensor(task, role, what, value) for what, value in (("features", item[0]), ("labels", item[1])))
        if x.dim() != 2:
            raise TaskSpecError(f"task {task!r}: {role} features must be 2-D [N, {E}], got shape {tuple(x.shape)}")
        if x.shape[0] == 0:
            raise TaskSpecError(f"task {task!r}: {role} data is empty (0 samples)")
        if x.shape[1] != E:
            raise TaskSpecError(f"task {task!r}: {role} feature dim {x.shape[1]} does not match the "
                                f"model's embed_dim {E}")
        if y.dim() != 1:
            raise TaskSpecError(f"task {task!r}: {role} labels must be 1-D, got shape {tuple(y.shape)}")
        if y.shape[0] != x.shape[0]:
            raise TaskSpecError(f"task {task!r}: {role} has {x.shape[0]} feature rows but {y.shape[0]} labels")
        if not x.is_floating_point():
            raise TaskSpecError(f"task {task!r}: {role} features must be floating point, got {x.dtype}")
        if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
            if y.dtype == torch.bool or not bool(torch.isfinite(y).all()) or not torch.equal(y, y.round()):
                raise TaskSpecError(f"task {task!r}: {role} labels must be integers, got {y.dtype}")
        y = y.long()
        n_classes = len(tasks[task])
        bad = (y < 0) | (y >= n_classes)
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise TaskSpecError(f"task {task!r}: {role} label {int(y[i])} (sample {i}) is out of range "
                                f"for its {n_classes} classes (valid 0..{n_classes - 1})")
        x = x.float()
        finite = torch.isfinite(x).all(dim=1)
        if not bool(finite.all()):
            i = int((~finite).nonzero()[0, 0])
            raise TaskSpecError(f"task {task!r}: {role} features are non-finite (first at sample {i})")
        norms = x.norm(dim=1)
        if float((norms - 1).abs().max()) > 1e-2:
            warnings.warn(f"task {task!r}: {role} features are not L2-normalised (norms "
                          f"{float(norms.min()):.3g}..{float(norms.max()):.3g}); CLIP logits expect "
                          "unit-norm image features", stacklevel=3)
        out[task] = (x, y)
    return out
