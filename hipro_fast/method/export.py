"""Stand-alone per-task classifiers: score image features with no text tower.

`export_classifier(model, path)` writes, in ONE safetensors file (atomically),

    "weight/<i>"    [C_i, E] fp32 L2-normalised class text features of task i
    "logit_scale"   [] fp32, the CLIP logit scale (exp of the stored log-scale)

with the task names, class names, model config, a checksum of the tensors and
(when given) the CLIP it was trained on as JSON in the metadata.
`Classifier.load(path)` checks all of them (a corrupt or hand-edited file is
refused, naming it) and computes the same logits as `HiProModel.logits`:
logit_scale * features @ weight.T.

A Classifier is an nn.Module (its weights are buffers), so it embeds in a
larger model: a parent's .to() / .eval() / state_dict() reach it,
`clf(features, task)` is its forward, and `clf.head(task)` is one task's head
as a module of its own (for nn.Sequential).
"""
from __future__ import annotations

import json
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Mapping

import torch
from torch import nn

from ..engine.fingerprint import image_side_digest, tensors_digest
from ..errors import InvalidInputError, MissingFileError
from ..files import atomic_write_bytes
from .model import HiProModel, TaskSpecError, image_features_of, json_tensor, tensor_json, validate_tasks

if TYPE_CHECKING:  # selection imports training, which an export does not need at run time
    from .selection import SelectedModel

FORMAT = "hipro_fast.classifier"
VERSION = "1"
_NORM_TOL = 1e-3  # exported rows are L2-normalised text features


def _checked_text_features(model: HiProModel, text_features: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Given text features, checked against the model before anything is written:
    every task, [C_t, E], finite, L2-normalised rows (a bad export would only
    fail, or silently mis-score, in whoever loads it)."""
    extra = [t for t in text_features if t not in model.tasks]
    if extra:
        raise TaskSpecError(f"text_features has task {extra[0]!r}, which the model does not have "
                            f"(model tasks: {list(model.tasks)})")
    out = {}
    for task, classes in model.tasks.items():
        if task not in text_features:
            raise TaskSpecError(f"text_features lacks task {task!r}")
        f = text_features[task]
        if not torch.is_tensor(f) or not f.is_floating_point():
            raise TaskSpecError(f"text_features[{task!r}] must be a floating-point tensor, got "
                                f"{getattr(f, 'dtype', type(f).__name__)}")
        want = (len(classes), model.embed_dim)
        if tuple(f.shape) != want:
            raise TaskSpecError(f"text_features[{task!r}] is {tuple(f.shape)}, expected {list(want)} "
                                f"({len(classes)} classes x embed dim {model.embed_dim})")
        f = f.detach().float().cpu().contiguous()
        if not torch.isfinite(f).all():
            raise TaskSpecError(f"text_features[{task!r}] has non-finite values")
        norms = f.norm(dim=1)
        if f.shape[0] and float((norms - 1).abs().max()) > _NORM_TOL:
            raise TaskSpecError(f"text_features[{task!r}]: rows must be L2-normalised (norms from "
                                f"{float(norms.min()):.4g} to {float(norms.max()):.4g})")
        out[task] = f
    return out


def image_tower_info(clip_model: torch.nn.Module) -> dict[str, str]:
    """{"image_tower": 16-hex digest of the open_clip model's image tower weights}
    ({} for a model without one): the digest the feature cache keys by, for the
    tower in the dtype it has now (a tower cast after caching digests apart)."""
    return {"image_tower": image_side_digest(clip_model)[:16]} if getattr(clip_model, "visual", None) is not None else {}


def classifier_of(model: HiProModel | SelectedModel, clip_info: Mapping[str, Any] | None = None) -> Classifier:
    """The Classifier export_classifier would write for `model`, in memory (on the
    CPU, fp32): its text features computed once. clip_info as for export_classifier."""
    with torch.no_grad():
        feats = {t: f.detach().float().cpu().contiguous() for t, f in model.text_features().items()}
    scale = model.logit_scale.detach().float().cpu().reshape(())
    info = image_tower_info(model.clip) if clip_info is None else clip_info
    return Classifier(feats, scale, {t: list(c) for t, c in model.tasks.items()}, model.config(), info)


def export_classifier(model: HiProModel | SelectedModel, path: str | Path,
                      text_features: Mapping[str, torch.Tensor] | None = None,
                      clip_info: Mapping[str, Any] | None = None) -> Path:
    """Write the model's per-task classifier weights to `path` (a .safetensors file).

    model: a HiProModel, or a method.selection.SelectedModel (each task's weights
        then come from its chosen candidate, and the metadata's model config
        records the choice and every candidate's config).

    text_features: {task: [C_t, E]} to write instead of model.text_features()
        (checked: every task, that shape, finite, L2-normalised rows).
    clip_info: JSON-able record of the CLIP whose image features the classifier
        scores (e.g. {"name": ..., "pretrained": ..., "image_tower": digest});
        read back as Classifier.clip_info. Default: {"image_tower": a digest of
        the model's image tower weights} (what `hipro export` records beside
        the model's name and weights file), so a classifier always says which
        image features it expects.
    Every rank of a process group may call it alone (the model is whole outside fit/evaluate).
    """
    from safetensors.torch import save

    path = Path(path)
    if path.is_dir():
        raise InvalidInputError(f"{path} is a directory: pass the .safetensors file to write")
    if text_features is None:
        with torch.no_grad():
            feats = {t: f.detach().float().cpu().contiguous() for t, f in model.text_features().items()}
    else:
        feats = _checked_text_features(model, text_features)
    tasks = list(model.tasks)
    tensors = {f"weight/{i}": feats[t] for i, t in enumerate(tasks)}
    tensors["logit_scale"] = model.logit_scale.detach().float().cpu().reshape(()).contiguous()
    metadata = {
        "format": FORMAT,
        "version": VERSION,
        "tasks": json.dumps(tasks),
        "classes": json.dumps({t: list(model.tasks[t]) for t in tasks}),
        "embed_dim": str(model.embed_dim),
        "model_config": json.dumps(model.config()),
        # what Classifier.load checks the tensors against: a flipped bit or an edited weight is refused
        "checksum": tensors_digest(tensors),
    }
    if clip_info is None:
        clip_info = image_tower_info(model.clip)
    metadata["clip"] = json.dumps(dict(clip_info))
    return atomic_write_bytes(path, save(tensors, metadata=metadata))


def _scaled_cosine(logit_scale: torch.Tensor, weight: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """logit_scale * features @ weight.T in the weight's dtype and on its device."""
    return logit_scale * features.to(device=weight.device, dtype=weight.dtype) @ weight.t()


def _read_metadata(path: Path, meta: Mapping[str, str]) -> tuple[list[str], dict[str, list[str]], dict, dict]:
    """(tasks, {task: classes} in task order, model config, clip info) from a
    classifier file's metadata, each checked: InvalidInputError naming the file
    and the field otherwise (a hand-edited file must not load as something else,
    e.g. a repeated task name taking another task's weights)."""
    def field(key: str, default: str | None = None) -> Any:
        raw = meta.get(key, default)
        if raw is None:
            raise InvalidInputError(f"{path}: the classifier metadata lacks {key!r}")
        try:
            return json.loads(raw)
        except json.JSONDecodeError as e:
            raise InvalidInputError(f"{path}: the classifier metadata's {key!r} is not valid JSON ({e})") from None

    tasks, classes = field("tasks"), field("classes")
    config, clip_info = field("model_config", "{}"), field("clip", "{}")
    for key, value, typ in (("tasks", tasks, list), ("classes", classes, dict), ("model_config", config, dict),
                            ("clip", clip_info, dict)):
        if not isinstance(value, typ):
            raise InvalidInputError(f"{path}: the classifier metadata's {key!r} must be a JSON {typ.__name__}, got "
                                    f"{type(value).__name__}")
    if sorted(map(str, tasks)) != sorted(map(str, classes)) or len(set(map(str, tasks))) != len(tasks):
        raise InvalidInputError(f"{path}: the classifier metadata's tasks {tasks} and the tasks of its classes "
                                f"{list(classes)} differ, or repeat one"[:400])
    try:
        checked = validate_tasks({t: classes[t] for t in tasks})
    except (TaskSpecError, TypeError) as e:
        raise InvalidInputError(f"{path}: the classifier metadata's classes: {e}") from None
    return list(tasks), checked, config, clip_info


def _check_loaded_tensors(path: Path, weights: Mapping[str, torch.Tensor], scale: torch.Tensor,
                          embed_dim: str | None) -> None:
    """The file's weights and scale as export_classifier writes them: floating
    point, finite, a positive scale, the metadata's embed dim."""
    try:
        embed = int(embed_dim) if embed_dim is not None else None
    except ValueError:
        raise InvalidInputError(f"{path}: the classifier metadata's 'embed_dim' is {embed_dim!r}, not a whole "
                                "number") from None
    for name, t in [*((f"the weight of task {k!r}", w) for k, w in weights.items()), ("logit_scale", scale)]:
        if not t.is_floating_point() or not bool(torch.isfinite(t).all()):
            raise InvalidInputError(f"{path}: {name} must be finite floating-point numbers ({t.dtype})")
        if embed is not None and t is not scale and int(t.shape[-1]) != embed:
            raise InvalidInputError(f"{path}: {name} has embed dim {int(t.shape[-1])}, the metadata {embed}")
    if scale.numel() == 1 and not float(scale) > 0:
        raise InvalidInputError(f"{path}: logit_scale is {float(scale):g}, not a positive number")


def _finite_floats(t: torch.Tensor) -> bool:
    """Floating point and finite (a meta tensor's values are not checked: it has none)."""
    return t.is_floating_point() and (t.device.type == "meta" or bool(torch.isfinite(t).all()))


class Classifier(nn.Module):
    """Per-task linear heads exported from a HiProModel.

    clf.tasks: task names. clf.class_names(task): its class names.
    clf.logits(task, feats) / clf(feats, task): [N, C] scaled cosine logits of
    L2-normalised image features [N, E] (computed in the weights' dtype: after
    clf.to(torch.float64) in float64). clf.predict(task, feats): [N] class
    indices. clf.head(task): that task's head as a module. clf.clip_info: the
    CLIP recorded at export ({} when none was).
    """

    def __init__(self, weights: Mapping[str, torch.Tensor], logit_scale: torch.Tensor,
                 classes: Mapping[str, list[str]], config: dict | None = None,
                 clip_info: Mapping[str, Any] | None = None):
        super().__init__()
        tasks = list(weights)
        if not tasks:
            raise TaskSpecError("a classifier needs at least one task")
        missing = [t for t in tasks if t not in classes]
        if missing:
            raise TaskSpecError(f"task {missing[0]!r} has weights but no class names")
        validate_tasks({t: classes[t] for t in tasks})  # names, no empty task, no class twice
        dims = set()
        for t in tasks:
            w = weights[t]
            if not torch.is_tensor(w) or w.dim() != 2 or w.shape[0] != len(classes[t]):
                shape = tuple(w.shape) if torch.is_tensor(w) else type(w).__name__
                raise TaskSpecError(f"task {t!r}: weight {shape} does not match its {len(classes[t])} classes")
            if not _finite_floats(w):
                raise TaskSpecError(f"task {t!r}: the weights must be finite floating-point numbers ({w.dtype})")
            dims.add(int(w.shape[1]))
        if len(dims) != 1:
            raise TaskSpecError(f"the tasks' weights have different embed dims {sorted(dims)}")
        scale = torch.as_tensor(logit_scale)
        if scale.numel() != 1:
            raise TaskSpecError(f"logit_scale must be one number, got shape {tuple(scale.shape)}")
        if not _finite_floats(scale) or (scale.device.type != "meta" and not float(scale) > 0):
            raise TaskSpecError(f"logit_scale must be a positive finite floating-point number, got {scale}")
        self._tasks = tasks
        self._classes = {t: list(classes[t]) for t in tasks}
        self.config = dict(config or {})
        self.clip_info = dict(clip_info or {})
        for i, t in enumerate(tasks):
            self.register_buffer(f"weight_{i}", weights[t].detach())
        self.register_buffer("logit_scale", scale.detach().reshape(()))
        # the tasks and classes in the state_dict, as a tensor (safetensors holds it)
        self.register_buffer("layout", json_tensor({"tasks": tasks, "classes": self._classes}))
        self.register_load_state_dict_pre_hook(_check_classifier_state)

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> "Classifier":
        """The classifier written by export_classifier to `path`, on `device`."""
        from safetensors import SafetensorError, safe_open

        path = Path(path)
        if not path.exists():
            raise MissingFileError(f"classifier file not found: {path}")
        if not path.is_file():
            raise InvalidInputError(f"{path} is not a file (a classifier is one .safetensors file)")
        try:
            device = torch.device(device)
        except (RuntimeError, TypeError):
            raise InvalidInputError(f"Classifier.load: device {device!r} is not a device (e.g. 'cpu', "
                                    "'cuda:0'); move it to another dtype with .to(dtype) after loading") from None
        try:
            # read on the CPU, then moved: safetensors knows fewer devices than torch ("cpu:0", "meta")
            with safe_open(str(path), framework="pt", device="cpu") as f:
                meta = f.metadata() or {}
                if meta.get("format") != FORMAT:
                    raise InvalidInputError(f"{path}: not a hipro_fast classifier (format {meta.get('format')!r})")
                if meta.get("version") != VERSION:
                    raise InvalidInputError(f"{path}: classifier format version {meta.get('version')!r}, this "
                                            f"hipro_fast reads version {VERSION!r}")
                tasks, classes, config, clip_info = _read_metadata(path, meta)
                names = set(f.keys())
                needed = [f"weight/{i}" for i in range(len(tasks))] + ["logit_scale"]
                absent = [k for k in needed if k not in names]
                if absent:
                    raise InvalidInputError(f"{path}: the classifier lacks tensor {absent[0]!r}")
                tensors = {k: f.get_tensor(k) for k in names}
        except SafetensorError as e:
            raise InvalidInputError(f"{path}: not a readable safetensors file ({e})") from None
        if "checksum" in meta and tensors_digest(tensors) != meta["checksum"]:  # files before it have none
            raise InvalidInputError(f"{path}: the tensors do not match the checksum written with them (a corrupt "
                                    "or edited file): export it again")
        weights = {t: tensors[f"weight/{i}"] for i, t in enumerate(tasks)}
        scale = tensors["logit_scale"]
        _check_loaded_tensors(path, weights, scale, meta.get("embed_dim"))
        try:
            clf = cls(weights, scale, classes, config, clip_info)
        except TaskSpecError as e:
            raise InvalidInputError(f"{path}: {e}") from None
        try:
            return clf.to(device)
        except (RuntimeError, AssertionError) as e:  # e.g. CUDA without a driver
            raise InvalidInputError(f"Classifier.load: cannot move the classifier to {device}: "
                                    f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None

    @property
    def tasks(self) -> list[str]:
        return list(self._tasks)

    @property
    def weights(self) -> Mapping[str, torch.Tensor]:
        """{task: [C_t, E]} the class weight rows: the module's buffers, read-only
        by task (replace one in place: clf.weights[t].copy_(w))."""
        return MappingProxyType({t: getattr(self, f"weight_{i}") for i, t in enumerate(self._tasks)})

    @property
    def embed_dim(self) -> int:
        return int(self.weight_0.shape[1])

    def class_names(self, task: str) -> list[str]:
        self._check_task(task)
        return list(self._classes[task])

    def _check_task(self, task: str) -> None:
        if not isinstance(task, str):  # e.g. logits(features, task): features are not a task name
            raise InvalidInputError(f"task must be a task name (one of {self.tasks}), got a "
                                    f"{type(task).__name__}: logits(task, features), forward(features, task)")
        if task not in self._classes:
            raise TaskSpecError(f"unknown task {task!r} (classifier tasks: {self.tasks})")

    def logits(self, task: str, features: torch.Tensor) -> torch.Tensor:
        """[N, C] scaled cosine logits of `features` [N, E] (a tensor, array or list)."""
        self._check_task(task)
        w = self.weights[task]
        return _scaled_cosine(self.logit_scale, w, image_features_of(task, features, int(w.shape[1])))

    def forward(self, features: torch.Tensor, task: str | None = None) -> torch.Tensor:
        """logits(task, features); `task` may be left out when there is one."""
        if task is None:
            if len(self._tasks) != 1:
                raise InvalidInputError(f"this classifier has {len(self._tasks)} tasks: pass task= "
                                        f"(one of {self.tasks})")
            task = self._tasks[0]
        return self.logits(task, features)

    def predict(self, task: str, features: torch.Tensor) -> torch.Tensor:
        """[N] int64 class indices: the argmax of logits(task, features). The
        features' values are not checked (that would cost a device sync per
        call): a row with a NaN has NaN logits, and argmax calls it class 0."""
        return self.logits(task, features).argmax(dim=1)

    def head(self, task: str) -> "TaskHead":
        """One task's head as a module of its own (a copy: move it on its own)."""
        self._check_task(task)
        return TaskHead(task, self.weights[task].clone(), self.logit_scale.clone(), self._classes[task])

    def extra_repr(self) -> str:
        sizes = ", ".join(f"{t}: {len(c)}" for t, c in self._classes.items())
        return f"embed_dim={self.embed_dim}, tasks={{{sizes}}}"


class TaskHead(nn.Module):
    """One task's classifier: forward(features [N, E]) -> [N, C] logits. Like
    Classifier.logits it scores L2-normalised image features (a raw encoder's
    output scales each row's logits by its norm)."""

    def __init__(self, task: str, weight: torch.Tensor, logit_scale: torch.Tensor, classes: list[str]):
        super().__init__()
        self.task = task
        self.classes = list(classes)
        self.register_buffer("weight", weight)
        self.register_buffer("logit_scale", logit_scale.reshape(()))
        # its task and classes in the state_dict: another task's head of as many classes is refused
        self.register_buffer("layout", json_tensor({"task": task, "classes": self.classes}))
        self.register_load_state_dict_pre_hook(_check_head_state)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return _scaled_cosine(self.logit_scale, self.weight,
                              image_features_of(self.task, features, int(self.weight.shape[1])))

    def extra_repr(self) -> str:
        return f"task={self.task!r}, classes={len(self.classes)}, embed_dim={int(self.weight.shape[1])}"


def _check_classifier_state(clf: Classifier, state_dict, prefix, local_metadata, strict, missing_keys,
                            unexpected_keys, error_msgs) -> None:
    """load_state_dict's pre-hook: a state with this classifier's tensors must
    be of a classifier with these tasks and classes (the weights are stored by
    position); refused before anything loads. A state without them is left to
    torch's missing-key rule (strict=False loads of a parent's other parts)."""
    layout = state_dict.get(prefix + "layout")
    if layout is None:
        ours = [k for k in state_dict if k.startswith(prefix) and k[len(prefix):].split(".")[0] in clf._buffers]
        if ours:
            raise InvalidInputError(f"load_state_dict: the state has {ours[0]!r} but no {prefix + 'layout'!r} naming "
                                    "its tasks and classes (not a Classifier's state_dict)")
        return
    try:
        theirs = tensor_json(layout)
        tasks, classes = list(theirs["tasks"]), dict(theirs["classes"])
    except (ValueError, UnicodeDecodeError, KeyError, TypeError):
        raise InvalidInputError(f"load_state_dict: {prefix + 'layout'!r} is not a Classifier's") from None
    if tasks != clf.tasks:
        raise InvalidInputError(f"load_state_dict: the state is of a classifier with tasks {tasks}, this one has "
                                f"{clf.tasks}")
    for t in tasks:
        if list(classes.get(t, [])) != clf._classes[t]:
            raise InvalidInputError(f"load_state_dict: task {t!r} has other classes in the state")


def _check_head_state(head: TaskHead, state_dict, prefix, local_metadata, strict, missing_keys,
                      unexpected_keys, error_msgs) -> None:
    """load_state_dict's pre-hook: a head's state must be of the same task and
    classes (else it would score with another task's weights under this task's
    class names). A state without a layout (saved before heads had one) loads
    as before, keeping this head's."""
    key = prefix + "layout"
    if key not in state_dict:
        if prefix + "weight" in state_dict:
            state_dict[key] = head.layout
        return
    try:
        theirs = tensor_json(state_dict[key])
        task, classes = theirs["task"], list(theirs["classes"])
    except (ValueError, UnicodeDecodeError, KeyError, TypeError):
        raise InvalidInputError(f"load_state_dict: {key!r} is not a TaskHead's") from None
    if task != head.task or classes != head.classes:
        raise InvalidInputError(f"load_state_dict: the state is of task {task!r}'s head with classes {classes}, this "
                                f"head is task {head.task!r}'s with classes {head.classes}")
