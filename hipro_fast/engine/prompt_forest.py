"""Hierarchical prompts as one packed forest.

Prompt semantics (the contract tests and users rely on):
  * a class's suffix is the open_clip tokenisation of f"{name}." with
    underscores replaced by spaces, followed by EOS;
  * `concat`: one prompt per (task, class):
        [SOS] ctx[path[0]] ... ctx[path[-1]] suffix   (an empty path gives [SOS] suffix)
  * `mean`: one prompt per (node on the path, class): [SOS] ctx[node] suffix;
    the task's class feature is normalize(mean_over_path(normalize(f_node))).
Shared prefixes are stored once: the prompts form a trie whose single-child
chains are merged into segments.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Mapping, Sequence

import torch
import torch.nn.functional as F

from .layout import ForestError, ForestLayout, check_device_arg, build_forest_layout, encode_vocab_source
from ..errors import InvalidInputError, UnsupportedTextTower

Combine = Literal["concat", "mean"]
COMBINE_MODES = ("concat", "mean")
# The method-level default (HiProModel, compare, the CLI), chosen by the
# planted-hierarchy ablation (benchmarks/results/ablation_planted.md).
DEFAULT_COMBINE: Combine = "mean"


def check_tokenizer(tokenizer) -> None:
    """Refuse a tokenizer the forest cannot use: it needs open_clip's BPE
    tokenizer (or one like it: `encode`, `sot_token_id`, `eot_token_id`), whose
    end-of-text id is above its start id, since an open_clip tower pools the
    highest token id of a prompt ('argmax' pooling) and the forest pools its
    end token."""
    missing = [a for a in ("encode", "sot_token_id", "eot_token_id") if not hasattr(tokenizer, a)]
    if missing or not callable(getattr(tokenizer, "encode", None)):
        raise UnsupportedTextTower(
            f"tokenizer {type(tokenizer).__name__} has no {', '.join(missing) or 'callable encode'}: the prompt "
            "forest needs open_clip's BPE tokenizer (SimpleTokenizer: encode, sot_token_id, eot_token_id); "
            "Hugging Face tokenizers (SigLIP, multilingual towers) are not supported")
    sot, eot = int(tokenizer.sot_token_id), int(tokenizer.eot_token_id)
    if sot >= eot:
        raise UnsupportedTextTower(
            f"tokenizer {type(tokenizer).__name__}: its start token id {sot} is not below its end token id {eot}; "
            "the text tower pools the highest token id ('argmax' pooling), which must be the end token")


def class_suffix_tokens(tokenizer, name: str) -> list[int]:
    """BPE ids of f"{name}." (underscores as spaces) followed by EOS. Every id must
    be below the EOS id: the tower pools the highest id ('argmax'), which must be
    the EOS for the forest's features to be the tower's."""
    text = name.replace("_", " ") + "."
    ids = [int(i) for i in tokenizer.encode(text)]
    eot = int(tokenizer.eot_token_id)
    high = [i for i in ids if i >= eot]
    if high:
        raise UnsupportedTextTower(
            f"class name {name!r} encodes to token id {high[0]}, not below the end token id {eot}: the text "
            "tower pools the highest token id of a prompt ('argmax' pooling), which would then not be its end "
            "(a tokenizer with special tokens above the end token?)")
    return ids + [eot]


@dataclass(frozen=True)
class _Piece:
    kind: Literal["ctx", "tokens"]
    key: object  # node id for ctx, tuple of vocab ids for tokens


class _PromptTrie:
    """Trie over prompt pieces; merges single-child chains into segments."""

    def __init__(self) -> None:
        self.parent: list[int] = []
        self.piece: list[_Piece] = []
        self.children: list[dict[_Piece, int]] = []
        self.roots: dict[_Piece, int] = {}
        self.terminal: list[bool] = []

    def add(self, pieces: Sequence[_Piece]) -> int:
        node, level = -1, self.roots
        for piece in pieces:
            nxt = level.get(piece)
            if nxt is None:
                nxt = len(self.parent)
                self.parent.append(node)
                self.piece.append(piece)
                self.children.append({})
                self.terminal.append(False)
                level[piece] = nxt
            node, level = nxt, self.children[nxt]
        self.terminal[node] = True
        return node

    def segments(self, piece_sources) -> tuple[list[int], list[list[int]], list[int]]:
        """(parents, sources, segment of each trie node) after chain merging."""
        seg_of = [-1] * len(self.parent)
        parents: list[int] = []
        sources: list[list[int]] = []
        for node in range(len(self.parent)):  # parents precede children
            p = self.parent[node]
            mergeable = p >= 0 and len(self.children[p]) == 1 and not self.terminal[p]
            if mergeable:
                seg = seg_of[p]
                sources[seg].extend(piece_sources(self.piece[node]))
            else:
                seg = len(parents)
                parents.append(-1 if p < 0 else seg_of[p])
                sources.append(list(piece_sources(self.piece[node])))
            seg_of[node] = seg
        return parents, sources, seg_of


@dataclass
class PromptForest:
    """A packed forest plus the map from (task, class) to its prompts.

    layout: the packed token/segment tables.
    eos_index: [P] packed index of each prompt's EOS token.
    task_prompts: task -> int64 [C] prompt ids (`concat`) or [len(path), C] (`mean`).
    """

    layout: ForestLayout
    eos_index: torch.Tensor
    task_prompts: dict[str, torch.Tensor]
    combine: str
    context_length: int

    @property
    def num_tokens(self) -> int:
        return self.layout.num_tokens

    @property
    def num_prompts(self) -> int:
        return int(self.eos_index.numel())

    def to(self, device) -> "PromptForest":
        """The same forest on `device` (index tensors: a dtype is refused)."""
        check_device_arg(device, "PromptForest")
        with torch.inference_mode(False):  # usable for training wherever it was moved (see build_forest_layout)
            return PromptForest(self.layout.to(device), self.eos_index.to(device),
                                {t: p.to(device) for t, p in self.task_prompts.items()},
                                self.combine, self.context_length)

    def gather(self, prompt_features: torch.Tensor,
               path_weights: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Per-task class features [C, E] from the pooled prompt features [P, E].

        `mean` combines a task's path-node features with equal weights, or with
        `path_weights[task]` ([len(path)], one weight per context node on the
        path, root first) when given: normalize(sum_k w_k f_k).
        """
        if path_weights is not None and self.combine != "mean":
            raise ForestError("path weights combine per-node features: they need combine='mean'")
        out = {}
        for task, ids in self.task_prompts.items():
            if self.combine == "concat":
                out[task] = prompt_features[ids]
            elif path_weights is None:
                out[task] = F.normalize(prompt_features[ids].mean(0), dim=-1)
            else:
                w = path_weights[task]
                if w.shape != (ids.shape[0],):
                    raise ForestError(f"task {task!r}: path weights of shape {tuple(w.shape)}, but its "
                                      f"path has {ids.shape[0]} context nodes")
                weighted = (w.to(prompt_features.dtype)[:, None, None] * prompt_features[ids]).sum(0)
                out[task] = F.normalize(weighted, dim=-1)
        return out


def build_prompt_forest(
    tokenizer,
    context_length: int,
    node_ctx_rows: Mapping[str, tuple[int, int]],
    task_paths: Mapping[str, Sequence[str]],
    task_classes: Mapping[str, Sequence[str]],
    combine: Combine = "concat",
) -> PromptForest:
    """Build the forest of every task's prompts.

    Args:
        tokenizer: an open_clip SimpleTokenizer (encode, sot_token_id, eot_token_id).
        context_length: the text tower's context (77 for CLIP).
        node_ctx_rows: node id -> (first row, n_ctx) in the packed context table.
        task_paths: task -> node ids from root to the task's leaf.
        task_classes: task -> class names.
        combine: "concat" or "mean" (see module docstring).
    """
    if combine not in COMBINE_MODES:
        raise InvalidInputError(f"combine must be one of {COMBINE_MODES}, got {combine!r}")
    check_tokenizer(tokenizer)
    for node, (_, count) in node_ctx_rows.items():
        if int(count) < 1:
            raise InvalidInputError(f"node {node!r} has {count} context tokens: a node needs at least one "
                                    f"(leave a node without context out, and off the paths, as HiProModel "
                                    f"does with n_ctx 0)")
    with torch.inference_mode(False):  # normal tensors, usable for training (see build_forest_layout)
        return _build_prompt_forest(tokenizer, context_length, node_ctx_rows, task_paths, task_classes, combine)


def _build_prompt_forest(tokenizer, context_length: int, node_ctx_rows: Mapping[str, tuple[int, int]],
                         task_paths: Mapping[str, Sequence[str]], task_classes: Mapping[str, Sequence[str]],
                         combine: Combine) -> PromptForest:
    sot = int(tokenizer.sot_token_id)
    trie = _PromptTrie()
    prompt_terminal: list[int] = []
    terminal_prompt: dict[int, int] = {}
    task_prompts: dict[str, torch.Tensor] = {}

    def prompt_id(pieces: list[_Piece]) -> int:
        node = trie.add(pieces)
        if node not in terminal_prompt:
            terminal_prompt[node] = len(prompt_terminal)
            prompt_terminal.append(node)
        return terminal_prompt[node]

    pathless = [t for t in task_classes if t not in task_paths]
    if pathless:  # its classes would be left out of the forest without a word
        raise ForestError(f"task {pathless[0]!r} has classes but no path")
    for task, path in task_paths.items():
        if task not in task_classes:
            raise ForestError(f"task {task!r} has a path but no classes")
        names = list(task_classes[task])
        if not names:
            raise ForestError(f"task {task!r} has no classes")
        twice = [n for i, n in enumerate(names) if n in names[:i]]
        if twice:  # two columns of one prompt: the classifier could never tell them apart
            raise ForestError(f"task {task!r}: class {twice[0]!r} is listed twice")
        if not path and combine == "mean":
            raise ForestError(f"task {task!r} has no context node on its path ('mean' needs one)")
        for node in path:
            if node not in node_ctx_rows:
                raise ForestError(f"task {task!r}: path node {node!r} has no context")
        suffixes = [tuple(class_suffix_tokens(tokenizer, n)) for n in names]
        ctx_counts = [node_ctx_rows[n][1] for n in path] or [0]
        for name, suffix in zip(names, suffixes):
            needed = 1 + (sum(ctx_counts) if combine == "concat" else max(ctx_counts)) + len(suffix)
            if needed > context_length:
                detail = " + ".join(f"{n} {c}" for n, c in zip(path, ctx_counts))
                raise ForestError(
                    f"task {task!r}, class {name!r}: prompt needs {needed} tokens "
                    f"(1 SOS + contexts [{detail}] {'summed' if combine == 'concat' else 'max'} + "
                    f"{len(suffix)} class tokens incl. EOS) > context length {context_length}")
        head = [_Piece("tokens", (sot,))]
        if combine == "concat":
            ctx_pieces = head + [_Piece("ctx", n) for n in path]
            ids = [prompt_id(ctx_pieces + [_Piece("tokens", s)]) for s in suffixes]
        else:
            ids = [[prompt_id(head + [_Piece("ctx", n), _Piece("tokens", s)]) for s in suffixes]
                   for n in path]
        task_prompts[task] = torch.tensor(ids, dtype=torch.long)

    def piece_sources(piece: _Piece) -> list[int]:
        if piece.kind == "ctx":
            start, count = node_ctx_rows[piece.key]
            return list(range(start, start + count))
        return [encode_vocab_source(t) for t in piece.key]

    parents, sources, seg_of = trie.segments(piece_sources)
    layout = build_forest_layout(parents, sources, context_length)
    table = layout.segment_table
    packed = layout.input_to_packed[torch.tensor([seg_of[n] for n in prompt_terminal], dtype=torch.long)]
    eos_index = table[packed, 0] + table[packed, 1] - 1
    return PromptForest(layout, eos_index, task_prompts, combine, context_length)
