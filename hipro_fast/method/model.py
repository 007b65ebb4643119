"""HiProModel: one learnable context per task-tree node on a frozen CLIP."""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
import torch.nn as nn

from ..data.clip_loading import LoadedClip, clip_parts
from ..engine.encoder import ForestEncoder
from ..engine.prompt_forest import COMBINE_MODES, DEFAULT_COMBINE
from ..engine.text_tower import TextTower
from .tree import ROOT, TaskTree, TreeError
from ..errors import TaskSpecError

CTX_INIT_STD = 0.02  # CoOp's N(0, 0.02) context initialisation


def validate_tasks(tasks: Mapping[str, Sequence[str]]) -> dict[str, list[str]]:
    if not tasks:
        raise TaskSpecError("no tasks given")
    out = {}
    for task, classes in tasks.items():
        if not isinstance(task, str) or not task:
            raise TaskSpecError(f"task names must be non-empty strings, got {task!r}")
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
        out[task] = names
    return out


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
            `concat` mode the root does and the other nodes start random. A phrase
            fixes n_ctx of the nodes it initialises to its token count.
        seed: seed of the context initialisation.

    `model.ctx[node_id]` is the node's context parameter [n_ctx, width] (fp32).
    Only the contexts are parameters of this module; the CLIP stays frozen and
    moves with `model.to(...)`.
    """

    def __init__(self, clip: LoadedClip | nn.Module, tasks: Mapping[str, Sequence[str]],
                 tree: TaskTree | Sequence[Any], n_ctx: int | Mapping[str, int] = 16,
                 combine: str = DEFAULT_COMBINE, ctx_init: str | None = None, tokenizer=None, seed: int = 0):
        super().__init__()
        if combine not in COMBINE_MODES:
            raise ValueError(f"combine must be one of {COMBINE_MODES}, got {combine!r}")
        clip_model, tokenizer = clip_parts(clip, tokenizer)
        self.tasks = validate_tasks(tasks)
        self.tree = tree if isinstance(tree, TaskTree) else TaskTree.from_nested(tree)
        self.tree.check_tasks(list(self.tasks))
        self.combine = combine
        self.ctx_init = ctx_init
        self.tokenizer = tokenizer
        # Not registered as submodules: the state of a HiProModel is its contexts.
        object.__setattr__(self, "clip", clip_model)
        object.__setattr__(self, "tower", TextTower(clip_model))
        width = self.tower.config.width
        nodes = self.tree.dfs()
        if isinstance(n_ctx, Mapping):
            unknown = [n for n in n_ctx if n not in self.tree.nodes]
            if unknown:
                raise TreeError(f"n_ctx names unknown node {unknown[0]!r}")
            counts = {n: int(n_ctx.get(n, 16)) for n in nodes}
        else:
            counts = {n: int(n_ctx) for n in nodes}
        for node, c in counts.items():
            if c < 0:
                raise ValueError(f"node {node!r}: n_ctx must be >= 0, got {c}")
        init = self._phrase_embedding(ctx_init) if ctx_init else None
        gen = torch.Generator().manual_seed(seed)
        self._params = nn.ParameterList()
        self.ctx: dict[str, nn.Parameter] = {}
        device = self.tower.token_embedding.device
        for node in nodes:
            if counts[node] == 0:
                continue  # a node without context adds nothing to its tasks' prompts
            from_phrase = init is not None and (combine == "mean" or node == ROOT)
            if from_phrase:
                value = init.clone()
            else:
                value = torch.randn(counts[node], width, generator=gen) * CTX_INIT_STD
            p = nn.Parameter(value.float().to(device))
            self._params.append(p)
            self.ctx[node] = p
        self.encoder = ForestEncoder(
            self.tower, tokenizer, {n: p.shape[0] for n, p in self.ctx.items()},
            {t: self.context_path(t) for t in self.tasks}, self.tasks, combine).to(device)

    def context_path(self, task: str) -> list[str]:
        """Nodes on the task's root-to-leaf path that hold a context."""
        return [n for n in self.tree.path(task) if n in self.ctx]

    def _phrase_embedding(self, phrase: str) -> torch.Tensor:
        ids = torch.tensor(self.tokenizer.encode(phrase), dtype=torch.long)
        if ids.numel() == 0:
            raise ValueError(f"ctx_init {phrase!r} has no tokens")
        with torch.no_grad():
            return self.tower.token_embedding[ids.to(self.tower.token_embedding.device)].detach().cpu()

    # ------------------------------------------------------------ device moves
    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self.clip._apply(fn)
        device = self.tower.token_embedding.device
        self.encoder.to(device)
        return self

    # ------------------------------------------------------------ features
    @property
    def embed_dim(self) -> int:
        return self.tower.config.embed_dim

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.clip.logit_scale.detach().exp().float()

    def text_features(self) -> dict[str, torch.Tensor]:
        """{task: [n_classes, embed_dim]} L2-normalised, all tasks in one forest pass."""
        return self.encoder(self.ctx)

    def check_features(self, task: str, image_features: torch.Tensor) -> None:
        if task not in self.tasks:
            raise TaskSpecError(f"unknown task {task!r} (model tasks: {list(self.tasks)})")
        if image_features.dim() != 2 or image_features.shape[1] != self.embed_dim:
            raise TaskSpecError(
                f"task {task!r}: image features must be [N, {self.embed_dim}], got {tuple(image_features.shape)}")

    def logits(self, task: str, image_features: torch.Tensor,
               text_features: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        """[N, n_classes(task)] scaled cosine logits of L2-normalised image features."""
        self.check_features(task, image_features)
        feats = text_features if text_features is not None else self.text_features()
        return self.logit_scale * image_features.float() @ feats[task].t()

    # ------------------------------------------------------------ state
    def num_trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.ctx.values() if p.requires_grad)

    def context_state(self) -> dict[str, torch.Tensor]:
        """{node id: context} detached copies (what a checkpoint stores)."""
        return {n: p.detach().clone() for n, p in self.ctx.items()}

    def load_context_state(self, state: Mapping[str, torch.Tensor]) -> None:
        """Load contexts saved by context_state(); names any node or shape that differs."""
        missing = [n for n in self.ctx if n not in state]
        extra = [n for n in state if n not in self.ctx]
        if missing:
            raise TreeError(f"checkpoint lacks context for node {missing[0]!r}")
        if extra:
            raise TreeError(f"checkpoint has context for unknown node {extra[0]!r}")
        for n, p in self.ctx.items():
            if tuple(state[n].shape) != tuple(p.shape):
                raise TreeError(f"node {n!r}: checkpoint context {tuple(state[n].shape)} vs model {tuple(p.shape)}")
        with torch.no_grad():
            for n, p in self.ctx.items():
                p.copy_(state[n].to(p.device, p.dtype))

    def config(self) -> dict[str, Any]:
        """JSON-able description: tasks, classes, tree, contexts, combine."""
        return {
            "tasks": self.tasks,
            "tree": self.tree.to_nested(),
            "n_ctx": {n: int(p.shape[0]) for n, p in self.ctx.items()},
            "combine": self.combine,
            "ctx_init": self.ctx_init,
            "width": self.tower.config.width,
            "embed_dim": self.embed_dim,
        }
