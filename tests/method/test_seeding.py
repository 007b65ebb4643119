"""Random streams keyed by what they are for (hipro_fast.method.seeding)."""
from __future__ import annotations

import torch

from hipro_fast.method.seeding import keyed_generator, keyed_seed


def _draw(seed: int, key: str) -> torch.Tensor:
    return torch.rand(8, generator=keyed_generator(seed, key))


def test_a_stream_is_a_function_of_seed_and_key_only():
    first = _draw(3, "affinity/mnist")
    _draw(3, "affinity/animals")  # another consumer drawing in between changes nothing
    assert torch.equal(first, _draw(3, "affinity/mnist"))
    assert not torch.equal(first, _draw(3, "affinity/animals"))
    assert not torch.equal(first, _draw(4, "affinity/mnist"))
    assert torch.equal(_draw(-1, "k"), _draw(-1, "k"))  # negative seeds are accepted, and stable


def test_keyed_seed_is_a_large_non_negative_seed_of_seed_and_key():
    seeds = {keyed_seed(s, f"restart/{r}") for s in range(20) for r in (1, 2)}
    assert len(seeds) == 40  # no two (seed, key) pairs collide here
    assert all(isinstance(x, int) and 0 <= x < 2**62 for x in seeds)
    assert min(seeds) > 10**6  # no collision with the small seeds a user passes
    assert keyed_seed(7, "restart/1") == keyed_seed(7, "restart/1")
    torch.manual_seed(0)
    a = keyed_seed(7, "restart/1")
    torch.manual_seed(1)  # the global generator plays no part
    assert keyed_seed(7, "restart/1") == a
