"""Random streams keyed by what they are for, not by the order they are drawn in.

A generator shared by several consumers (tasks, tree nodes) makes each one's
draws depend on how much the consumers before it drew, i.e. on the order in
which the tasks happen to be listed. `keyed_generator(seed, key)` gives every
consumer its own stream, a function of (seed, key) only.
"""
from __future__ import annotations

import hashlib

import numpy as np
import torch


def keyed_generator(seed: int, key: str) -> torch.Generator:
    """A CPU torch.Generator seeded by (seed, key); any int seed (negative ones too)."""
    # "<u4": the same words on any byte order
    entropy = np.frombuffer(hashlib.sha256(key.encode("utf-8")).digest(), dtype="<u4").tolist()
    words = np.random.SeedSequence([int(seed) % 2**64, *entropy]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(words[0]) << 32 | int(words[1]))


def keyed_seed(seed: int, key: str) -> int:
    """A non-negative 62-bit seed that is a function of (seed, key) only: a new
    seed for a repeat of a run (a restart) that collides with no small seed."""
    return int(torch.randint(0, 2**62, (), generator=keyed_generator(seed, key)))
