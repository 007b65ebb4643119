"""ForestEncoder: named contexts + task paths + class names -> per-task class
text features, all prompts in one forest pass through the frozen text tower."""
from __future__ import annotations

from typing import Mapping, Sequence

import torch

from ..errors import InvalidInputError
from .prompt_forest import PromptForest, build_prompt_forest
from .text_tower import TextTower


class ForestEncoder:
    """Encodes every task's class prompts in one packed pass.

    Args:
        tower: the frozen TextTower.
        tokenizer: open_clip SimpleTokenizer.
        node_ctx: node id -> number of context tokens (the order fixes the
            packed context table's row order).
        task_paths: task -> node ids in prompt order (root first for a tree path).
        task_classes: task -> class names.
        combine: "concat" or "mean" (see hipro_fast.engine.prompt_forest).
    """

    def __init__(self, tower: TextTower, tokenizer, node_ctx: Mapping[str, int],
                 task_paths: Mapping[str, Sequence[str]], task_classes: Mapping[str, Sequence[str]],
                 combine: str = "concat"):
        self.tower = tower
        self.node_order = list(node_ctx)
        self.node_rows: dict[str, tuple[int, int]] = {}
        start = 0
        for node, count in node_ctx.items():
            self.node_rows[node] = (start, int(count))
            start += int(count)
        self.forest: PromptForest = build_prompt_forest(
            tokenizer, tower.config.context_length, self.node_rows, task_paths, task_classes, combine)

    def context_table(self, ctx: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """[R, W] rows of every node's context, in node order (R = 0 when no node
        has a context: the prompts are then "[SOS] class. [EOS]" alone)."""
        weight = self.tower.text.token_embedding.weight
        if not self.node_order:
            return weight.new_zeros((0, weight.shape[1]))
        unknown = [n for n in ctx if n not in self.node_rows]
        if unknown:  # a misspelt node would otherwise be ignored and its intended context never used
            raise InvalidInputError(f"context given for unknown node {unknown[0]!r} (nodes: {self.node_order})")
        for node in self.node_order:  # a wrong length would shift every later node's rows, silently
            want = (self.node_rows[node][1], weight.shape[1])
            if node not in ctx:
                raise InvalidInputError(f"no context given for node {node!r} (nodes: {self.node_order})")
            if not torch.is_tensor(ctx[node]) or not ctx[node].is_floating_point():
                got = ctx[node].dtype if torch.is_tensor(ctx[node]) else type(ctx[node]).__name__
                raise InvalidInputError(f"node {node!r}: context must be a floating-point tensor, got {got}")
            if tuple(ctx[node].shape) != want:
                raise InvalidInputError(f"node {node!r}: context must be {list(want)} (n_ctx x width), "
                                        f"got {list(ctx[node].shape)}")
        return torch.cat([ctx[n] for n in self.node_order])

    def __call__(self, ctx: Mapping[str, torch.Tensor],
                 path_weights: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """{task: [C, E]} L2-normalised class features (fp32). path_weights: task ->
        [len(path)] weights of its path nodes' features ("mean" only; default equal)."""
        return self.tower.encode_forest(self.forest, self.context_table(ctx), path_weights)

    def to(self, device) -> "ForestEncoder":
        """Moves the forest's index tensors to `device` (not the tower: move the
        CLIP model itself; a dtype is refused)."""
        self.forest = self.forest.to(device)
        return self

    @property
    def num_tokens(self) -> int:
        return self.forest.num_tokens
