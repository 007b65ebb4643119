"""The class-sharded prompt forest: each rank encodes only its share of the
(task, class) prompts, and an autograd-aware all-gather gives every rank the
features of all classes.

Sharding unit: one (task, class) pair, in the model's task order and class
order. The pairs are cut into `world_size` contiguous runs balanced by their
packed suffix tokens (a class's suffix tokens, times the number of path nodes in
`mean` mode where every path node has its own prompt). A rank's forest holds
its classes' suffixes plus the context segments their tasks' paths need: the
contexts are replicated (every rank holds every context parameter; their tokens
are few). A prompt that two tasks share (the same class name under the same
node in `mean` mode) is encoded by each rank that holds one of the two.

Gradients: ``torch.distributed.nn.functional.all_gather`` sends each gathered
block's gradient back to the rank that encoded it, summed over the ranks that
used it (reduce-scatter), so the backward through a rank's forest yields that
rank's part of the context gradient; the caller sums those over the ranks
(hipro_fast.distributed.data_parallel.all_reduce_grads).
"""
from __future__ import annotations

import warnings
from typing import Mapping, Sequence

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn

from ..engine.encoder import ForestEncoder
from ..engine.prompt_forest import class_suffix_tokens
from ..engine.text_tower import TextTower
from ..errors import DistributedError

__all__ = ["balanced_split", "unit_costs", "ShardedForestEncoder"]


def balanced_split(costs: Sequence[int], parts: int) -> list[tuple[int, int]]:
    """Contiguous [start, end) ranges of `costs`, one per part, none empty, each
    ending where the running total first reaches its fair share (total * (r + 1) / parts)."""
    n = len(costs)
    if parts < 1:
        raise DistributedError(f"cannot split into {parts} parts")
    if n < parts:
        raise DistributedError(f"{parts} ranks but only {n} (task, class) prompts to share: run at most {n} "
                               f"processes (--nproc / --nproc-per-node x --nnodes)")
    total = float(sum(costs))
    ranges, start, running = [], 0, 0.0
    for r in range(parts):
        if r == parts - 1:
            end = n
        else:
            target = total * (r + 1) / parts
            end = start + 1  # at least one unit
            running += costs[start]
            # grow while the next unit brings the total closer to the target, leaving one per later part
            while end < n - (parts - 1 - r) and abs(running + costs[end] - target) <= abs(running - target):
                running += costs[end]
                end += 1
        ranges.append((start, end))
        if r < parts - 1:
            start = end
    return ranges


def unit_costs(tokenizer, task_paths: Mapping[str, Sequence[str]], task_classes: Mapping[str, Sequence[str]],
               combine: str) -> list[int]:
    """Packed tokens each (task, class) adds to a forest, in task then class order."""
    out = []
    for task, names in task_classes.items():
        prompts = max(1, len(task_paths[task])) if combine == "mean" else 1
        out.extend(prompts * len(class_suffix_tokens(tokenizer, n)) for n in names)
    return out


class ShardedForestEncoder:
    """A drop-in for ForestEncoder (same call) that encodes this rank's share of
    the classes and all-gathers the features of all of them.

    Args: as ForestEncoder, plus rank / world_size (of the default process group).
    Attributes: `ranges` / `counts` the [start, end) run and the number of
    (task, class) pairs of every rank (each holds at least one); `local` this
    rank's ForestEncoder over its pairs; `local_tasks` the tasks it touches.
    """

    def __init__(self, tower: TextTower, tokenizer, node_ctx: Mapping[str, int],
                 task_paths: Mapping[str, Sequence[str]], task_classes: Mapping[str, Sequence[str]],
                 combine: str, rank: int, world_size: int):
        self.rank, self.world_size = int(rank), int(world_size)
        self.task_sizes = {t: len(c) for t, c in task_classes.items()}
        units = [(t, i) for t, names in task_classes.items() for i in range(len(names))]
        costs = unit_costs(tokenizer, task_paths, task_classes, combine)
        self.ranges = balanced_split(costs, self.world_size)
        self.counts = [e - s for s, e in self.ranges]
        start, end = self.ranges[self.rank]
        local_classes: dict[str, list[str]] = {}
        for t, i in units[start:end]:
            local_classes.setdefault(t, []).append(task_classes[t][i])
        self.local_tasks = list(local_classes)
        self.local = ForestEncoder(tower, tokenizer, node_ctx, {t: task_paths[t] for t in self.local_tasks},
                                   local_classes, combine)
        self.node_order = self.local.node_order

    def context_table(self, ctx: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return self.local.context_table(ctx)

    def _gather(self, flat: torch.Tensor) -> torch.Tensor:
        """[n_local, E] -> [n_all, E] in (task, class) order; autograd flows back per rank."""
        most = max(self.counts)
        if flat.shape[0] < most:  # all_gather needs equal shapes: pad, then drop the padding
            flat = torch.cat([flat, flat.new_zeros(most - flat.shape[0], flat.shape[1])])
        with warnings.catch_warnings():
            # Deprecated in favour of a private module's (_functional_collectives) op; this
            # public one is the documented autograd-aware gather and still works as documented.
            warnings.simplefilter("ignore", FutureWarning)
            parts = dist_fn.all_gather(flat)
        return torch.cat([p[:n] for p, n in zip(parts, self.counts)])

    def __call__(self, ctx: Mapping[str, torch.Tensor],
                 path_weights: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """{task: [C, E]} L2-normalised class features of ALL classes (fp32)."""
        if not dist.is_initialized() or dist.get_world_size() != self.world_size:
            raise DistributedError(f"this model's text side is sharded over {self.world_size} ranks, but the "
                                   f"process group has {dist.get_world_size() if dist.is_initialized() else 1}")
        local = self.local(ctx, path_weights)
        flat = torch.cat([local[t] for t in self.local_tasks])
        full = self._gather(flat)
        out, start = {}, 0
        for t, n in self.task_sizes.items():
            out[t] = full[start:start + n]
            start += n
        return out

    def to(self, device) -> "ShardedForestEncoder":
        self.local.to(device)
        return self

    @property
    def forest(self):
        return self.local.forest

    @property
    def num_tokens(self) -> int:
        """Packed tokens of this rank's forest."""
        return self.local.num_tokens
