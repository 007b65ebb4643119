"""The pure parts of hipro_fast.distributed, in one process: the balanced
class split, the data-parallel slices, the --nproc command line."""
from __future__ import annotations

import sys

import pytest
import torch

from hipro_fast.distributed.data_parallel import local_part, local_range
from hipro_fast.distributed.launch import strip_nproc, torchrun_argv
from hipro_fast.distributed.sharding import balanced_split, unit_costs
from hipro_fast.errors import DistributedError
from tests.helpers_training import TASKS, tiny_clip


@pytest.mark.parametrize("costs,parts", [([1] * 7, 2), ([5, 1, 1, 1, 1, 1], 2), ([3, 3, 3], 3),
                                         ([1, 9, 1, 9, 1, 9, 1, 9], 3), (list(range(1, 40)), 4)])
def test_balanced_split_covers_everything_in_order(costs, parts):
    ranges = balanced_split(costs, parts)
    assert len(ranges) == parts and ranges[0][0] == 0 and ranges[-1][1] == len(costs)
    assert all(s < e for s, e in ranges) and all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    loads = [sum(costs[s:e]) for s, e in ranges]
    assert max(loads) - sum(costs) / parts <= max(costs)  # within one unit of the fair share


def test_more_ranks_than_class_prompts_is_a_clear_error():
    with pytest.raises(DistributedError, match="4 ranks but only 3 \\(task, class\\) prompts"):
        balanced_split([1, 1, 1], 4)


def test_unit_costs_count_suffix_tokens_per_path_node():
    _, tok = tiny_clip()
    paths = {t: ["root", f"task/{t}"] for t in TASKS}
    concat = unit_costs(tok, paths, TASKS, "concat")
    mean = unit_costs(tok, paths, TASKS, "mean")
    assert len(concat) == sum(len(c) for c in TASKS.values())
    assert mean == [2 * c for c in concat] and all(c >= 3 for c in concat)  # "cat" "." EOS


def test_data_parallel_slices_partition_the_batch():
    batch = torch.arange(10)
    for world in (1, 2, 3, 4):
        parts = [local_part(batch, r, world) for r in range(world)]
        assert torch.equal(torch.cat(parts), batch)
        ranges = [local_range(10, r, world) for r in range(world)]
        assert ranges[0][0] == 0 and ranges[-1][1] == 10 and all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    assert local_part(torch.arange(1), 1, 2).numel() == 0  # fewer samples than ranks: an empty piece


def test_nproc_wraps_torchrun_once():
    argv = ["train", "--nproc", "2", "--spec", "t.toml", "--nproc=3", "--epochs", "1"]
    assert strip_nproc(argv) == ["train", "--spec", "t.toml", "--epochs", "1"]
    cmd = torchrun_argv(2, argv)
    assert cmd[:3] == [sys.executable, "-m", "hipro_fast.distributed.torchrun"] and "--standalone" in cmd
    assert cmd[cmd.index("--nproc-per-node") + 1] == "2"
    assert cmd[-5:] == ["train", "--spec", "t.toml", "--epochs", "1"]
    assert cmd[cmd.index("-m", 3) + 1] == "hipro_fast.cli" and "--nproc" not in cmd[cmd.index("-m", 3):]


def test_a_failed_collective_is_told_as_a_lost_peer(monkeypatch):
    from hipro_fast.distributed import group

    assert group.collective_failure(RuntimeError("Timed out waiting 5000ms")) is None  # not in a group
    monkeypatch.setattr(group, "current", lambda: group.DistInfo(1, 2, 1, "gloo", "cpu", 5.0))
    gloo = RuntimeError("[/x/gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 5000ms for recv operation")
    msg = group.collective_failure(gloo)
    assert msg.startswith("rank 1: a collective failed: a peer died or stalled for more than 5 s (--dist-timeout)")
    assert msg.endswith("(Timed out waiting 5000ms for recv operation)")
    assert group.collective_failure(RuntimeError("shape mismatch")) is None
    assert group.collective_failure(ValueError("gloo")) is None
