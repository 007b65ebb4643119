"""Per-task selection as a product: trained candidates, the choice, its record.

The protocol's HiPro (`compare(select="per-task")`) takes, task by task, the
candidate of SELECT_CANDIDATES (its tree, the flat two-level tree, CoOp per
task) with the best validation score. This module keeps that choice beside the
trained candidates, so that the model the protocol measures is saved,
evaluated, exported and used like one model: `hipro train --select per-task`
trains it (fit_selected), and the protocol leaves one per draw
(protocol.save_draw_selection). A selection directory holds

    selection.json     format, version, select_by, candidates (preference order),
                       choices (task -> candidate), the validation scores chosen
                       on, provenance
    <candidate>/       each candidate's ordinary checkpoint directory

selection.json is written atomically after every candidate's checkpoint, so its
presence means the selection is complete.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from ..distributed import group as dist_group
from ..engine.prompt_forest import DEFAULT_COMBINE
from ..errors import CheckpointError, InvalidInputError, TaskSpecError
from ..files import atomic_write_text
from .baselines import DEFAULT_SELECT_BY, SELECT_CANDIDATES, SELECT_CRITERIA, build_method, choose_per_task
from .model import HiProModel
from .training import Data, FitResult, TrainConfig, evaluate, fit

FORMAT = "hipro_fast.selection"
VERSION = 1
SELECTION_FILE = "selection.json"


@dataclass
class Selection:
    """What per-task selection chose, and on which validation scores.

    candidates: candidate names in preference order (a tie goes to the earlier).
    choices: task -> candidate, every task of the model.
    val / val_loss: candidate -> {task: accuracy in [0, 1] / mean cross-entropy}
        on the validation split (tasks without validation data are absent).
    """

    select_by: str
    candidates: list[str]
    choices: dict[str, str]
    val: dict[str, dict[str, float]]
    val_loss: dict[str, dict[str, float]]
    extra: dict[str, Any] = field(default_factory=dict)  # provenance (spec, seed, shots, ...)

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, "version": VERSION, "select_by": self.select_by,
                "candidates": list(self.candidates), "choices": dict(self.choices),
                "val": self.val, "val_loss": self.val_loss, "extra": dict(self.extra)}

    @classmethod
    def from_json(cls, record: Any, where: str) -> "Selection":
        """The record checked: CheckpointError naming `where` and the field otherwise."""
        if not isinstance(record, dict) or record.get("format") != FORMAT:
            raise CheckpointError(f"{where}: not a hipro_fast selection record")
        if type(record.get("version")) is not int or record.get("version") != VERSION:
            raise CheckpointError(f"{where}: selection version {record.get('version')!r}, expected {VERSION}")
        if record.get("select_by") not in SELECT_CRITERIA:
            raise CheckpointError(f"{where}: 'select_by' must be one of {SELECT_CRITERIA}, "
                                  f"got {record.get('select_by')!r}")
        cands = record.get("candidates")
        if not (isinstance(cands, list) and cands and all(isinstance(c, str) for c in cands)
                and len(set(cands)) == len(cands)) or any(not c or Path(c).name != c or c in (".", "..")
                                                          for c in cands):
            raise CheckpointError(f"{where}: 'candidates' must be distinct folder names, got {cands!r}"[:300])
        choices = record.get("choices")
        if not isinstance(choices, dict) or not choices:
            raise CheckpointError(f"{where}: 'choices' must map each task to a candidate")
        for task, cand in choices.items():
            if cand not in cands:
                raise CheckpointError(f"{where}: task {task!r} chose {cand!r}, which is not a candidate {cands}")
        scores = {}
        for key in ("val", "val_loss"):
            value = record.get(key)
            if not isinstance(value, dict) or any(not isinstance(v, dict) for v in value.values()):
                raise CheckpointError(f"{where}: {key!r} must map each candidate to per-task scores")
            for c, v in value.items():
                bad = [t for t, x in v.items() if isinstance(x, bool) or not isinstance(x, (int, float))]
                if c not in cands or bad:
                    what = f"candidate {c!r} is not in 'candidates'" if c not in cands else \
                        f"task {bad[0]!r}'s score {v[bad[0]]!r} is not a number"
                    raise CheckpointError(f"{where}: {key!r}: {what}"[:300])
            scores[key] = {c: {t: float(s) for t, s in v.items()} for c, v in value.items()}
        extra = record.get("extra", {})
        if not isinstance(extra, dict):
            raise CheckpointError(f"{where}: 'extra' must be a JSON object")
        return cls(record["select_by"], list(cands), dict(choices), scores["val"], scores["val_loss"], extra)


def choose(models: Mapping[str, HiProModel], val: Data, select_by: str, batch_size: int = 4096,
           extra: Mapping[str, Any] | None = None) -> Selection:
    """Score every candidate on `val` (accuracy and cross-entropy per task) and
    choose per task with baselines.choose_per_task, as compare(select="per-task")
    does; a task without validation data keeps the first candidate.

    models: candidate name -> trained model, in preference order, all over the same tasks.
    """
    if select_by not in SELECT_CRITERIA:
        raise InvalidInputError(f"select_by must be one of {SELECT_CRITERIA}, got {select_by!r}")
    names = list(models)
    if not names:
        raise InvalidInputError("choose: no candidate models")
    tasks = _same_tasks(models)
    if not val:
        raise InvalidInputError("per-task selection chooses on the validation split, and it is empty")
    scores = {c: {"val": evaluate(m, val, batch_size=batch_size),
                  "val_loss": evaluate(m, val, batch_size=batch_size, metric="loss")} for c, m in models.items()}
    chosen = choose_per_task(scores, select_by)
    choices = {t: chosen.get(t, names[0]) for t in tasks}
    return Selection(select_by, names, choices, {c: s["val"] for c, s in scores.items()},
                     {c: s["val_loss"] for c, s in scores.items()}, dict(extra or {}))


def fit_selected(clip, tasks: Mapping[str, Sequence[str]], train: Data, val: Data, tree, *, n_ctx: int = 16,
                 combine: str = DEFAULT_COMBINE, seed: int = 0, ctx_init: str | None = None,
                 select_by: str = DEFAULT_SELECT_BY, train_config: TrainConfig | None = None, tokenizer=None,
                 device=None, checkpoint_dir: str | Path | None = None, extra: Mapping[str, Any] | None = None,
                 after_fit: Callable[[str, HiProModel, FitResult], None] | None = None,
                 **hipro_options: Any) -> tuple["SelectedModel", dict[str, FitResult]]:
    """The protocol's HiPro as one model: fit every candidate of SELECT_CANDIDATES
    (HiPro on `tree`, the flat two-level tree, CoOp per task; built by
    baselines.build_method with `seed`, fit with `train_config` and that seed:
    the models compare(select="per-task") trains) on `train`, choose per task on
    `val` (choose), and return (SelectedModel, {candidate: FitResult}).

    hipro_options: build_method's (HiPro's options; `attention` for every candidate).
    device: where the models train (default: where the CLIP is).
    checkpoint_dir: (default: train_config.checkpoint_dir) candidate c
        checkpoints into <checkpoint_dir>/<c> (with
        train_config.resume, each continues from there: a finished one is
        loaded, not retrained), and selection.json (with `extra` as provenance)
        is written there last: it is removed first, so its presence means the
        selection is complete.
    after_fit(candidate, model, result): called after each fit (e.g. to save or log it).
    """
    if not val:
        raise InvalidInputError("per-task selection chooses on a validation split: val is empty")
    if select_by not in SELECT_CRITERIA:
        raise InvalidInputError(f"select_by must be one of {SELECT_CRITERIA}, got {select_by!r}")
    base = train_config or TrainConfig()
    if base.checkpoint_dir is not None:  # one folder per candidate below it, never the same one for all three
        if checkpoint_dir is not None and Path(checkpoint_dir) != Path(base.checkpoint_dir):
            raise InvalidInputError(f"fit_selected: checkpoint_dir {checkpoint_dir} and train_config.checkpoint_dir "
                                    f"{base.checkpoint_dir} differ: give one")
        checkpoint_dir = base.checkpoint_dir
    if checkpoint_dir is not None:
        clear_selection(checkpoint_dir)
    models: dict[str, HiProModel] = {}
    results: dict[str, FitResult] = {}
    for cand in SELECT_CANDIDATES:
        model = build_method(cand, clip, tasks, tree, n_ctx, combine, seed=seed, tokenizer=tokenizer,
                             ctx_init=ctx_init, **dict(hipro_options))
        if device is not None:
            model = model.to(device)
        overrides: dict[str, Any] = {"seed": seed}
        if checkpoint_dir is not None:
            overrides["checkpoint_dir"] = str(candidate_dir(checkpoint_dir, cand))
        results[cand] = fit(model, train, val, base, **overrides)
        if after_fit is not None:
            after_fit(cand, model, results[cand])
        models[cand] = model
    chosen = choose(models, val, select_by, batch_size=base.eval_batch_size, extra=extra)
    if checkpoint_dir is not None:  # rank 0 writes; its failure stops every rank
        dist_group.main_first(lambda: save_selection(checkpoint_dir, chosen), " writing the selection")
    return SelectedModel(models, chosen), results


def _same_tasks(models: Mapping[str, HiProModel]) -> dict[str, list[str]]:
    first, *rest = models
    tasks = models[first].tasks
    for c in rest:
        if dict(models[c].tasks) != dict(tasks):
            raise TaskSpecError(f"candidate {c!r} has other tasks or classes than candidate {first!r}")
    return dict(tasks)


class SelectedModel:
    """Per task, the candidate chosen for it: scores, evaluates and exports like
    one HiProModel (tasks, embed_dim, logit_scale, clip, text_features(),
    logits(), config()), so export_classifier and the pipeline take it as is.

    candidates: name -> HiProModel (same tasks, same CLIP); selection: the choice.
    """

    def __init__(self, candidates: Mapping[str, HiProModel], selection: Selection):
        missing = [c for c in selection.candidates if c not in candidates]
        if missing:
            raise InvalidInputError(f"selection names candidate {missing[0]!r}, which is not given")
        self.candidates = {c: candidates[c] for c in selection.candidates}
        self.selection = selection
        tasks = _same_tasks(self.candidates)
        unchosen = [t for t in tasks if t not in selection.choices]
        unknown = [t for t in selection.choices if t not in tasks]
        if unchosen or unknown:
            which = (f"task {unchosen[0]!r} has no choice" if unchosen
                     else f"it chose for task {unknown[0]!r}, which the candidates do not have")
            raise TaskSpecError(f"the selection does not fit its candidates: {which}")
        self.tasks = tasks

    @property
    def first(self) -> HiProModel:
        return next(iter(self.candidates.values()))

    @property
    def clip(self):
        return self.first.clip

    @property
    def embed_dim(self) -> int:
        return self.first.embed_dim

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.first.logit_scale  # the frozen CLIP's: equal for every candidate

    def used(self) -> dict[str, list[str]]:
        """candidate -> the tasks that take it (candidates no task takes are left out)."""
        out: dict[str, list[str]] = {}
        for task in self.tasks:
            out.setdefault(self.selection.choices[task], []).append(task)
        return {c: out[c] for c in self.candidates if c in out}

    def text_features(self) -> dict[str, torch.Tensor]:
        """{task: [n_classes, embed_dim]} L2-normalised, each from its chosen
        candidate (one forest pass per candidate in use)."""
        feats: dict[str, torch.Tensor] = {}
        for cand, tasks in self.used().items():
            theirs = self.candidates[cand].text_features()
            feats.update({t: theirs[t] for t in tasks})
        return {t: feats[t] for t in self.tasks}

    def logits(self, task: str, image_features: torch.Tensor) -> torch.Tensor:
        """[N, n_classes(task)]: the chosen candidate's logits."""
        if task not in self.tasks:
            raise TaskSpecError(f"unknown task {task!r} (model tasks: {list(self.tasks)})")
        return self.candidates[self.selection.choices[task]].logits(task, image_features)

    def evaluate(self, data: Data, batch_size: int = 4096, metric: str = "accuracy") -> dict[str, float]:
        """training.evaluate per task with the chosen candidate (same scores,
        same order of tasks as `data`)."""
        unknown = [t for t in data if t not in self.tasks]
        if unknown:  # evaluate would name it too, but against one candidate's subset
            raise TaskSpecError(f"unknown task {unknown[0]!r} in the eval data (model tasks: {list(self.tasks)})")
        scores: dict[str, float] = {}
        for cand, tasks in self.used().items():
            part = {t: data[t] for t in tasks if t in data}
            if part:
                scores.update(evaluate(self.candidates[cand], part, batch_size=batch_size, metric=metric))
        return {t: scores[t] for t in data if t in scores}

    def config(self) -> dict[str, Any]:
        """JSON-able: the selection (without its scores) and each candidate's config."""
        return {"tasks": self.tasks,
                "selection": {"select_by": self.selection.select_by, "choices": dict(self.selection.choices)},
                "candidates": {c: m.config() for c, m in self.candidates.items()}}

    def to(self, device) -> "SelectedModel":
        for m in self.candidates.values():
            m.to(device)
        return self

    def eval(self) -> "SelectedModel":
        for m in self.candidates.values():
            m.eval()
        return self


# ------------------------------------------------------------------ files
def has_selection(directory: str | Path) -> bool:
    return (Path(directory) / SELECTION_FILE).is_file()


def candidate_dir(directory: str | Path, candidate: str) -> Path:
    return Path(directory) / candidate


def save_selection(directory: str | Path, selection: Selection) -> Path:
    """Write `directory`/selection.json atomically (after the candidates' checkpoints:
    its presence marks the selection complete). Returns its path."""
    text = json.dumps(selection.to_json(), indent=1, sort_keys=False, allow_nan=False)
    return atomic_write_text(Path(directory) / SELECTION_FILE, text + "\n")


def clear_selection(directory: str | Path, what: str = "") -> None:
    """Remove `directory`/selection.json (rank 0; its failure stops every rank)
    before its candidates (re)train: written again once they are done, its
    presence keeps meaning a complete selection."""
    dist_group.main_first(lambda: (Path(directory) / SELECTION_FILE).unlink(missing_ok=True),
                          f" clearing the selection{what}")


def load_selection(directory: str | Path) -> Selection:
    """The selection record of a selection directory, checked (CheckpointError
    naming the file otherwise)."""
    path = Path(directory) / SELECTION_FILE
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{Path(directory)}: no {SELECTION_FILE} (not a selection, or an unfinished one)") \
            from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    return Selection.from_json(record, str(path))


__all__ = ["FORMAT", "VERSION", "SELECTION_FILE", "SELECT_CANDIDATES", "Selection", "SelectedModel", "choose",
           "fit_selected", "clear_selection",
           "has_selection", "candidate_dir", "save_selection", "load_selection"]
