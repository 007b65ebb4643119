"""HiProModel: one learnable context per task-tree node on a frozen CLIP."""
from __future__ import annotations

import json
import math
import numbers
import operator
import warnings
from typing import Any, Iterable, Mapping, Sequence

import torch
import torch.nn as nn

from ..data.clip_loading import LoadedClip, clip_parts
from ..engine.encoder import ForestEncoder
from ..engine.prompt_forest import COMBINE_MODES, DEFAULT_COMBINE, check_tokenizer, class_suffix_tokens
from ..engine.text_tower import TextTower
from ..distributed.sharding import ShardedForestEncoder
from ..engine.fingerprint import text_side_digest, text_side_dtype
from .seeding import keyed_generator
from .tree import TaskTree, TreeError, leaf_id
from ..errors import InvalidInputError, InvalidTypeError, TaskSpecError

CTX_INIT_STD = 0.02  # CoOp's N(0, 0.02) context initialisation
PATH_WEIGHTS = ("uniform", "learned")
DEFAULT_PATH_WEIGHTS = "uniform"
DEFAULT_LEAF_WEIGHT = 0.75  # learned path weights start with 3/4 of the weight on the task's own node
PATH_PREFIX = "path/"  # state names of the learned path weights ("path/<task>"); no node id starts so


def _same_prompt_check(task: str, names: Sequence[str], tokenizer) -> None:
    """Raise TaskSpecError naming two classes of `task` whose prompt suffixes
    tokenise identically ("big_dog" / "big dog", "Dog" / "dog": the tokenizer
    lowercases and underscores become spaces): their text features would be
    identical under every context, so one of them could never be predicted."""
    first: dict[tuple[int, ...], str] = {}
    for name in names:
        ids = tuple(class_suffix_tokens(tokenizer, name))
        other = first.setdefault(ids, name)
        if other != name:
            decode = getattr(tokenizer, "decode", None)
            text = decode(list(ids[:-1])).strip() if decode is not None else str(list(ids))
            raise TaskSpecError(f"task {task!r}: classes {other!r} and {name!r} tokenise identically "
                                f"({text!r}), so their prompts and text features are identical and one "
                                f"can never be predicted; rename one of them")


def image_features_of(task: str, features: Any, embed_dim: int) -> torch.Tensor:
    """`features` (a tensor, array or nested list) as a floating-point [N, embed_dim]
    tensor, or a TaskSpecError naming the task. No finiteness check: it would
    synchronise a GPU on every call (evaluate() and fit() check their data)."""
    try:
        features = torch.as_tensor(features)
    except (TypeError, ValueError, RuntimeError) as e:
        raise TaskSpecError(f"task {task!r}: image features must be a tensor [N, {embed_dim}] ({e})") from None
    if not features.is_floating_point():
        raise TaskSpecError(f"task {task!r}: image features must be floating point, got {features.dtype}")
    if features.dim() != 2 or features.shape[1] != embed_dim:
        raise TaskSpecError(f"task {task!r}: image features must be [N, {embed_dim}], got {tuple(features.shape)}")
    return features


def validate_tasks(tasks: Mapping[str, Sequence[str]], tokenizer=None) -> dict[str, list[str]]:
    """{task: class names} checked: non-empty names, no duplicate class names and,
    with a `tokenizer`, no two classes of a task whose prompts tokenise identically."""
    if tokenizer is not None:
        check_tokenizer(tokenizer)
    if not tasks:
        raise TaskSpecError("no tasks given")
    out = {}
    for task, classes in tasks.items():
        if not isinstance(task, str) or not task:
            raise TaskSpecError(f"task names must be non-empty strings, got {task!r}")
        if isinstance(classes, (str, bytes)) or not isinstance(classes, Iterable):  # "cat" is not ['c', 'a', 't']
            raise TaskSpecError(f"task {task!r}: classes must be a list of class names, got {classes!r}"[:300])
        names = list(classes)
        if not names:
            raise TaskSpecError(f"task {task!r} has no classes")
        seen = set()
        for name in names:
            if not isinstance(name, str) or not name.strip():
                raise TaskSpecError(f"task {task!r} has an empty class name")
            if name in seen:
                raise TaskSpecError(f"task {task!r} has duplicate class name {name!r}")
            seen.add(name)
        if tokenizer is not None:
            _same_prompt_check(task, names, tokenizer)
        out[task] = names
    return out


def node_generator(seed: int, tree: TaskTree, node: str) -> torch.Generator:
    """The random stream of a node's initial context: a function of the seed and of
    what the node stands for (a leaf: its task; a group or the root: the set of
    tasks below it), not of its position. So the same tasks listed or grouped in
    another order start from the same contexts, and a task's leaf starts alike in
    every method (CoOp per task, two-level, HiPro). A group holding the same
    tasks as its parent (the root's one child, in a user's tree) adds its depth:
    it would otherwise start, and with `mean` stay, a copy of its parent. One
    generator drawn node by node made every init depend on the order of the
    nodes (before session 12)."""
    kind = "leaf" if tree.nodes[node].task is not None else "group"
    tasks = sorted(tree.tasks_under(node))
    key: list = ["context", kind, tasks]
    parent = tree.nodes[node].parent
    if kind == "group" and parent is not None and len(tree.tasks_under(parent)) == len(tasks):
        depth, up = 0, parent
        while up is not None:
            depth, up = depth + 1, tree.nodes[up].parent
        key.append(depth)
    return keyed_generator(seed, json.dumps(key))


def _context_count(node: str, value: Any) -> int:
    """A node's n_ctx: a whole number (2.9, True or "4" would be silently truncated or converted)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise InvalidInputError(f"node {node!r}: n_ctx must be a whole number, got {value!r}")
    return int(value)


class HiProModel(nn.Module):
    """Hierarchical prompts over a frozen CLIP.

    Args:
        clip: a LoadedClip (from hipro_fast.load_clip), a (model, tokenizer)
            pair, or an open_clip model (then pass `tokenizer`).
        tasks: task name -> class names.
        tree: a TaskTree, or a nested list of task names (see TaskTree.from_nested).
        n_ctx: context tokens per node (an int, or node id -> int; unnamed nodes
            get 16). A node with 0 holds no context and is skipped on paths, which
            expresses the baselines in the same code path: CoOp per task (root 0),
            CoOp shared (leaves 0), zero-shot (root = "a photo of a", leaves 0).
        combine: "mean" (default: normalised mean of each path node's own prompt
            features; the planted-hierarchy ablation's choice) or "concat" (the
            path's contexts concatenated into one prompt).
        ctx_init: None for N(0, 0.02) contexts, or a phrase such as "a photo of a":
            in `mean` mode every node starts from the phrase's token embeddings, in
            `concat` mode the first context of every path does (the root's, or
            the top context nodes' when the root has none) and the other nodes
            start random. A phrase fixes n_ctx of the nodes it initialises to
            its token count.
        seed: seed of the context initialisation.
        path_weights: "uniform" (the mean above) or "learned" (`mean` only): each
            task learns softmax weights over its path nodes' features, starting
            with `leaf_weight` on its own node and the rest shared equally by
            its ancestors, so a task can lean on its own prompt when sharing
            does not help it.
        init_from_parent: a node starts from its parent's initial context (same
            n_ctx) instead of its own random draw.
        parent_prior: weight of the hierarchical prior added to the training
            loss (see regularization()): a node's context is pulled toward its
            parent's, so a task departs from its group only as far as its own
            data asks (`mean` only).
        attention: the text tower's attention backend (engine.text_tower):
            "tree" (default; the fused op) or "flex" (PyTorch FlexAttention with
            the tree mask; compiled on CUDA; on the CPU forward only, so training
            there raises FlexAttentionUnavailable). Same features either way; not
            part of config() (a checkpoint loads under either backend).

    `model.ctx[node_id]` is the node's context parameter [n_ctx, width] (fp32).
    Only the contexts are parameters of this module; the CLIP stays frozen and
    moves with `model.to(...)`.
    """

    def __init__(self, clip: LoadedClip | nn.Module, tasks: Mapping[str, Sequence[str]],
                 tree: TaskTree | Sequence[Any], n_ctx: int | Mapping[str, int] = 16,
                 combine: str = DEFAULT_COMBINE, ctx_init: str | None = None, tokenizer=None, seed: int = 0,
                 path_weights: str = DEFAULT_PATH_WEIGHTS, leaf_weight: float = DEFAULT_LEAF_WEIGHT,
                 init_from_parent: bool = False,
                 parent_prior: float = 0.0, attention: str = "tree"):
        super().__init__()
        if combine not in COMBINE_MODES:
            raise InvalidInputError(f"combine must be one of {COMBINE_MODES}, got {combine!r}")
        if path_weights not in PATH_WEIGHTS:
            raise InvalidInputError(f"path_weights must be one of {PATH_WEIGHTS}, got {path_weights!r}")
        if path_weights == "learned" and combine != "mean":
            raise InvalidInputError("path_weights='learned' weighs the path nodes' features: it needs combine='mean'")
        if not 0.0 < float(leaf_weight) < 1.0:
            raise InvalidInputError(f"leaf_weight must be in (0, 1), got {leaf_weight!r}")
        if not 0.0 <= float(parent_prior) < math.inf:  # inf made the objective inf, blamed on the tasks
            raise InvalidInputError(f"parent_prior must be a finite number >= 0, got {parent_prior!r}")
        clip_model, tokenizer = clip_parts(clip, tokenizer)
        # the tower first, and the tokenizer (validate_tasks): an unsupported one is named before any task
        tower = TextTower(clip_model, attention=attention)
        self.tasks = validate_tasks(tasks, tokenizer)
        self.tree = tree if isinstance(tree, TaskTree) else TaskTree.from_nested(tree)
        self.tree.check_tasks(list(self.tasks))
        self.combine = combine
        self.ctx_init = ctx_init
        self.path_weights, self.leaf_weight = path_weights, float(leaf_weight)
        self.init_from_parent, self.parent_prior = bool(init_from_parent), float(parent_prior)
        self.tokenizer = tokenizer
        # Not registered as submodules: the state of a HiProModel is its contexts.
        object.__setattr__(self, "clip", clip_model)
        object.__setattr__(self, "tower", tower)
        self.attention = attention
        width = self.tower.config.width
        nodes = self.tree.dfs()
        if isinstance(n_ctx, Mapping):
            unknown = [n for n in n_ctx if n not in self.tree.nodes]
            if unknown:
                raise TreeError(f"n_ctx names unknown node {unknown[0]!r}")
            counts = {n: _context_count(n, n_ctx.get(n, 16)) for n in nodes}
        else:
            counts = {n: _context_count(n, n_ctx) for n in nodes}
        for node, c in counts.items():
            if c < 0:
                raise InvalidInputError(f"node {node!r}: n_ctx must be >= 0, got {c}")
        init = self._phrase_embedding(ctx_init) if ctx_init else None
        seed = operator.index(seed)  # a numpy integer too
        # Registered by name (state_dict keys "contexts.<node>", "path_weight_logits.path/<task>");
        # `ctx` and `path_logits` look them up by node and task at every access, so what the
        # forward reads is whatever the module holds then (torch.func.functional_call's
        # swapped tensors, a parametrization, load_state_dict(assign=True)'s new ones).
        self.contexts = nn.ParameterDict()
        self.path_weight_logits = nn.ParameterDict()
        self._context_nodes: list[str] = []  # the nodes holding a context, in DFS order
        self._path_weight_tasks: list[str] = []  # the tasks with learned path weights
        device = self.tower.token_embedding.device
        for node in nodes:
            if counts[node] == 0:
                continue  # a node without context adds nothing to its tasks' prompts
            parent = self.context_parent(node)
            # concat: the phrase starts each prompt, i.e. the first context on
            # every path (the root's, or each top node's when the root has none,
            # as CoOp per task's leaves)
            from_phrase = init is not None and (combine == "mean" or parent is None)
            if from_phrase:
                value = init.clone()
            else:
                value = torch.randn(counts[node], width, generator=node_generator(seed, self.tree, node)) \
                    * CTX_INIT_STD
                # compared with the parent's actual length: a phrase may have set it
                parent_ctx = self.contexts[_state_key(parent)] if parent is not None else None
                if init_from_parent and parent_ctx is not None and parent_ctx.shape[0] == counts[node]:
                    value = parent_ctx.detach().cpu().clone()
            self.contexts[_state_key(node)] = nn.Parameter(value.float().to(device))
            self._context_nodes.append(node)
        if parent_prior and combine == "concat":
            raise InvalidInputError("parent_prior pulls a node's context toward its parent's, which only "
                             "compares like with like in combine='mean' (each node's own prompt)")
        # Learned path weights: per-task logits over its path's context nodes,
        # initialised so that the leaf's feature weighs `leaf_weight` and the
        # ancestors share the rest equally (a leaf-less path starts uniform).
        if path_weights == "learned":
            for task in self.tasks:
                path = self.context_path(task)
                logits = torch.zeros(len(path))
                if len(path) > 1 and path[-1] == leaf_id(task):
                    logits[-1] = math.log(leaf_weight * (len(path) - 1) / (1 - leaf_weight))
                self.path_weight_logits[_state_key(PATH_PREFIX + task)] = nn.Parameter(logits.to(device))
                self._path_weight_tasks.append(task)
        self.encoder = ForestEncoder(
            self.tower, tokenizer, {n: p.shape[0] for n, p in self.ctx.items()},
            {t: self.context_path(t) for t in self.tasks}, self.tasks, combine).to(device)
        self._whole_forest = self.encoder  # shard_text() may swap `encoder` for a ShardedForestEncoder
        object.__setattr__(self, "_sharded_forest", None)
        # The tree and the prompt combination in the state_dict, as a tensor (safetensors holds
        # it): internal node ids are positional ("root/0"), so another tree can have this one's
        # keys and shapes, and a concat and a mean model have the same keys and shapes.
        self.register_buffer("layout", json_tensor({"tree": self.tree.to_nested(), "combine": combine}).to(device))
        self.register_load_state_dict_pre_hook(_check_state_dict)

    def shard_text(self, rank: int, world_size: int) -> None:
        """Encode only this rank's share of the (task, class) prompts from now on;
        text_features() all-gathers the rest (hipro_fast.distributed.sharding),
        so every rank must call it together. fit() and evaluate() shard for
        their own duration when a process group of more than one rank is up,
        and go back to the whole forest (world_size 1) when they return: after
        them the model is a one-process object again (logits, export on rank 0
        alone). The sharded encoder is kept for the next call."""
        if world_size <= 1:
            self.encoder = self._whole_forest
            return
        cached = getattr(self, "_sharded_forest", None)  # absent from a model pickled before it existed
        if cached is None or (cached.rank, cached.world_size) != (rank, world_size):
            cached = ShardedForestEncoder(
                self.tower, self.tokenizer, {n: p.shape[0] for n, p in self.ctx.items()},
                {t: self.context_path(t) for t in self.tasks}, self.tasks, self.combine, rank, world_size
            ).to(self.tower.token_embedding.device)
            object.__setattr__(self, "_sharded_forest", cached)  # a cache, not a submodule
        self.encoder = cached

    @classmethod
    def from_config(cls, clip: Any, config: Mapping[str, Any], tokenizer=None) -> "HiProModel":
        """The model that config() describes (contexts freshly initialised; load
        them with load_context_state). Older configs lack the newer options,
        which then take their defaults."""
        tree = TaskTree.from_nested(config["tree"])
        counts = {n: int(config.get("n_ctx", {}).get(n, 0)) for n in tree.nodes}
        options = {k: config[k] for k in ("path_weights", "leaf_weight", "init_from_parent", "parent_prior")
                   if k in config}
        model = cls(clip, config["tasks"], tree, n_ctx=counts, combine=config.get("combine", "concat"),
                    tokenizer=tokenizer, **options)
        # recorded, not applied: the phrase only chose the initial contexts, which a checkpoint replaces
        model.ctx_init = config.get("ctx_init")
        return model

    def context_parent(self, node: str) -> str | None:
        """The nearest ancestor of `node` that holds a context (None at the top)."""
        parent = self.tree.nodes[node].parent
        while parent is not None and parent not in self._context_nodes:
            parent = self.tree.nodes[parent].parent
        return parent

    def context_path(self, task: str) -> list[str]:
        """Nodes on the task's root-to-leaf path that hold a context."""
        return [n for n in self.tree.path(task) if n in self._context_nodes]

    def __setstate__(self, state: dict[str, Any]) -> None:
        # A model pickled before the contexts were looked up by name held them in
        # plain dicts; their keys are the nodes and tasks (the tensors are the
        # registered ones, restored with the ParameterDicts).
        old_ctx, old_paths = state.pop("ctx", None), state.pop("path_logits", None)
        super().__setstate__(state)
        if "_context_nodes" not in state:
            self._context_nodes = list(old_ctx or {})
            self._path_weight_tasks = list(old_paths or {})

    @property
    def ctx(self) -> dict[str, torch.Tensor]:
        """{node: [n_ctx(node), width]} the context of every node that holds one,
        as registered in `contexts` now (looked up at each access)."""
        return {n: self.contexts[_state_key(n)] for n in self._context_nodes}

    @property
    def path_logits(self) -> dict[str, torch.Tensor]:
        """{task: [len(context path)]} the learned path-weight logits ({} unless
        path_weights="learned"), as registered in `path_weight_logits` now."""
        return {t: self.path_weight_logits[_state_key(PATH_PREFIX + t)] for t in self._path_weight_tasks}

    def _phrase_embedding(self, phrase: str) -> torch.Tensor:
        ids = torch.tensor(self.tokenizer.encode(phrase), dtype=torch.long)
        if ids.numel() == 0:
            raise InvalidInputError(f"ctx_init {phrase!r} has no tokens")
        with torch.no_grad():
            return self.tower.token_embedding[ids.to(self.tower.token_embedding.device)].detach().cpu()

    # ------------------------------------------------------------ device moves
    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self.clip._apply(fn)
        device = self.tower.token_embedding.device
        self.encoder.to(device)
        for forest in (self._whole_forest, getattr(self, "_sharded_forest", None)):
            if forest is not None and forest is not self.encoder:
                forest.to(device)
        return self

    # ------------------------------------------------------------ features
    @property
    def embed_dim(self) -> int:
        return self.tower.config.embed_dim

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.clip.logit_scale.detach().exp().float()

    def path_weight_values(self) -> dict[str, torch.Tensor] | None:
        """{task: [len(context path)] softmax weights of its path nodes' features},
        or None for equal weights."""
        if not self.path_logits:
            return None
        return {t: torch.softmax(p, dim=0) for t, p in self.path_logits.items()}

    def text_features(self) -> dict[str, torch.Tensor]:
        """{task: [n_classes, embed_dim]} L2-normalised, all tasks in one forest pass."""
        return self.encoder(self.ctx, self.path_weight_values())

    def regularization(self) -> torch.Tensor | None:
        """The hierarchical prior added to the training loss: parent_prior times
        the mean over context nodes with a context-holding parent of
        ||ctx[node] - ctx[parent]||^2 / n_ctx; None when off."""
        if not self.parent_prior:
            return None
        terms = []
        for node, p in self.ctx.items():
            parent = self.context_parent(node)
            if parent is not None and self.ctx[parent].shape == p.shape and p.requires_grad:
                terms.append((p - self.ctx[parent]).pow(2).sum() / p.shape[0])
        if not terms:
            return None
        return self.parent_prior * torch.stack(terms).mean()

    def check_features(self, task: str, image_features: torch.Tensor) -> torch.Tensor:
        """`image_features` as a tensor, checked: a task of the model, floating
        point, [N, embed_dim]."""
        if not isinstance(task, str):
            raise InvalidTypeError(f"task must be a task name (str), got {type(task).__name__} "
                                   "(arguments swapped? logits(task, image_features))")
        if task not in self.tasks:
            raise TaskSpecError(f"unknown task {task!r} (model tasks: {list(self.tasks)})")
        return image_features_of(task, image_features, self.embed_dim)

    def logits(self, task: str, image_features: torch.Tensor,
               text_features: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        """[N, n_classes(task)] scaled cosine logits of L2-normalised image features [N, E]."""
        image_features = self.check_features(task, image_features)
        feats = text_features if text_features is not None else self.text_features()
        text = feats.get(task) if isinstance(feats, Mapping) else None
        want = (len(self.tasks[task]), self.embed_dim)
        if not torch.is_tensor(text) or tuple(text.shape) != want:
            got = "no entry" if text is None else (f"shape {tuple(text.shape)}" if torch.is_tensor(text)
                                                   else type(text).__name__)
            raise InvalidInputError(f"logits: text_features[{task!r}] should be a {list(want)} tensor "
                                    f"(the task's classes x embed_dim, as text_features() returns), got {got}")
        # fp32 at least (a bf16/fp16 tower's features are fp32 already); a float64 model stays float64
        return self.logit_scale.to(text.dtype) * image_features.to(text.dtype) @ text.t()

    # ------------------------------------------------------------ state
    def learnable(self) -> dict[str, nn.Parameter]:
        """Every learned tensor by name: the contexts (node ids) and, with learned
        path weights, the per-task path logits ("path/<task>")."""
        return {**self.ctx, **{PATH_PREFIX + t: p for t, p in self.path_logits.items()}}

    def num_trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.learnable().values() if p.requires_grad)

    def context_state(self) -> dict[str, torch.Tensor]:
        """{name: tensor} detached copies of learnable() (what a checkpoint stores)."""
        return {n: p.detach().clone() for n, p in self.learnable().items()}

    def load_context_state(self, state: Mapping[str, torch.Tensor]) -> None:
        """Load a context_state(); names any node or shape that differs."""
        mine = self.learnable()
        missing = [n for n in mine if n not in state]
        extra = [n for n in state if n not in mine]
        if missing:
            raise TreeError(f"checkpoint lacks context for node {missing[0]!r}")
        if extra:
            raise TreeError(f"checkpoint has context for unknown node {extra[0]!r}")
        for n, p in mine.items():
            if tuple(state[n].shape) != tuple(p.shape):
                raise TreeError(f"node {n!r}: checkpoint context {tuple(state[n].shape)} vs model {tuple(p.shape)}")
        with torch.no_grad():
            for n, p in mine.items():
                p.copy_(state[n].to(p.device, p.dtype))

    def state_keys(self) -> dict[str, str]:
        """{state_dict key (without a parent's prefix): learnable() name} in
        parameters() order."""
        return {**{f"contexts.{_state_key(n)}": n for n in self.ctx},
                **{f"path_weight_logits.{_state_key(PATH_PREFIX + t)}": PATH_PREFIX + t for t in self.path_logits}}

    def config(self) -> dict[str, Any]:
        """JSON-able description: tasks, classes, tree, contexts, combine."""
        return {
            "tasks": self.tasks,
            "tree": self.tree.to_nested(),
            "n_ctx": {n: int(p.shape[0]) for n, p in self.ctx.items()},
            "combine": self.combine,
            "ctx_init": self.ctx_init,
            "path_weights": self.path_weights,
            "leaf_weight": self.leaf_weight,
            "init_from_parent": self.init_from_parent,
            "parent_prior": self.parent_prior,
            "width": self.tower.config.width,
            "embed_dim": self.embed_dim,
            # the CLIP the contexts belong to (checked when a checkpoint loads)
            "text_tower": text_side_digest(self.clip),
            "text_tower_dtype": text_side_dtype(self.clip),
        }


_PROBE = nn.ParameterDict()


def _state_key(name: str) -> str:
    """A node id or "path/<task>" as a parameter name, escaped one-to-one: no "."
    (a module path separator), no leading "_" and no name of a ParameterDict
    attribute ("update", "training": a hand-built tree may use any id)."""
    key = name.replace("%", "%25").replace(".", "%2E")
    if key.startswith("_") or hasattr(_PROBE, key):
        key = f"%{ord(key[0]):02X}{key[1:]}"
    return key


def json_tensor(value: Any) -> torch.Tensor:
    """`value` as compact JSON bytes in a uint8 tensor: a state_dict entry that
    describes the tensors beside it (safetensors holds only tensors)."""
    return torch.tensor(list(json.dumps(value, separators=(",", ":")).encode()), dtype=torch.uint8)


def tensor_json(t: torch.Tensor) -> Any:
    """The value json_tensor stored (ValueError / UnicodeDecodeError when it is not one)."""
    return json.loads(bytes(t.detach().cpu().tolist()).decode())


def _check_state_dict(model: HiProModel, state_dict, prefix, local_metadata, strict, missing_keys,
                      unexpected_keys, error_msgs) -> None:
    """load_state_dict's pre-hook: the state must be of a model with this tree,
    and its learned tensors this model's, name by name and shape by shape;
    refused naming the first difference before anything loads (torch would load
    the matching ones first). States of earlier versions: positional keys
    `_params.<i>` with their names (`_extra_state`) are mapped by name; without
    names they load by position, with a warning."""
    mine = {prefix + k: n for k, n in model.state_keys().items()}
    if any(k.startswith(prefix + "_params.") for k in state_dict):
        _rename_positional(model, state_dict, prefix, mine)
    layout = state_dict.get(prefix + "layout")
    if torch.is_tensor(layout):
        try:
            theirs = tensor_json(layout)
        except (ValueError, UnicodeDecodeError):
            raise InvalidInputError(f"load_state_dict: {prefix}layout is not a HiProModel's tree") from None
        # (states before the combination was recorded carry the tree alone)
        tree, combine = (theirs.get("tree"), theirs.get("combine")) if isinstance(theirs, dict) else (theirs, None)
        if tree != model.tree.to_nested():
            raise InvalidInputError(f"load_state_dict: the state is of a model with another tree: {tree!r}, "
                                    f"this model's is {model.tree.to_nested()!r}")
        if combine is not None and combine != model.combine:
            raise InvalidInputError(f"load_state_dict: the state is of a model with combine={combine!r}, "
                                    f"this model's is {model.combine!r} (the same contexts give other prompts)")
        if combine is None:
            state_dict[prefix + "layout"] = model.layout  # the older record, checked: this model's in its place
    # (torch passes strict=True to every hook whatever the caller's: a state with none of this
    # model's keys is left to torch's own missing-key rule, one with some of them is another model's)
    ours = (prefix + "contexts.", prefix + "path_weight_logits.")
    foreign = [k for k in state_dict if k.startswith(ours) and k not in mine]
    if foreign:
        raise InvalidInputError(f"load_state_dict: the state is of another model: it has {foreign[0]!r}, "
                                "which this model does not (another tree or other tasks)")
    absent = [k for k in mine if k not in state_dict]
    if absent and len(absent) < len(mine):
        raise InvalidInputError(f"load_state_dict: the state is of another model: it has no {absent[0]!r} "
                                f"(this model's {mine[absent[0]]!r}; another tree, other tasks or n_ctx 0)")
    params = dict(model.named_parameters())
    for key, name in mine.items():
        if key in state_dict and torch.is_tensor(state_dict[key]):
            want = tuple(params[key[len(prefix):]].shape)
            if tuple(state_dict[key].shape) != want:
                raise InvalidInputError(f"load_state_dict: {name!r} is {tuple(state_dict[key].shape)} in the state, "
                                        f"{want} in this model (other n_ctx or another tree)")


def _rename_positional(model: HiProModel, state_dict, prefix: str, mine: Mapping[str, str]) -> None:
    """Earlier versions' `_params.<i>` keys renamed to this model's, in place."""
    extra = state_dict.pop(prefix + "_extra_state", None)
    named = extra.get("learnable") if isinstance(extra, Mapping) else None
    key_of = {n: k for k, n in mine.items()}
    if named is not None:
        for i, entry in enumerate(named):
            name = str(entry[0])
            if name not in key_of:
                raise InvalidInputError(f"load_state_dict: the state is of another model: it has {name!r}, "
                                        "which this model does not (another tree or other tasks)")
            if f"{prefix}_params.{i}" in state_dict:
                state_dict[key_of[name]] = state_dict.pop(f"{prefix}_params.{i}")
    else:
        warnings.warn("load_state_dict: a state of hipro_fast before named keys (_params.<i>): loaded by position, "
                      "its node names cannot be checked", stacklevel=4)
        for i, key in enumerate(mine):
            if f"{prefix}_params.{i}" in state_dict:
                state_dict[key] = state_dict.pop(f"{prefix}_params.{i}")
    state_dict.setdefault(prefix + "layout", model.layout)  # they carried no tree
