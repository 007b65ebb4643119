"""Scaling out with torch.distributed: the process group from torchrun's
environment (group), the class-sharded prompt forest (sharding), data-parallel
batches and gradient sums (data_parallel), and the `--nproc` launcher (launch).
See the README's "Scaling out"."""
from .group import DistInfo, current, init_from_env, is_main, rank, shutdown, world_size
from .sharding import ShardedForestEncoder, balanced_split

__all__ = ["DistInfo", "current", "init_from_env", "is_main", "rank", "shutdown", "world_size",
           "ShardedForestEncoder", "balanced_split"]
