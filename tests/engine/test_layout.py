"""The packed forest layout: C++ builder vs its Python twin, and its invariants."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hipro_fast.ops.extension import _C
from hipro_fast.engine.layout import (ForestError, build_forest_layout, build_forest_layout_python,
                               encode_vocab_source)
from tests.oracle import random_forest_parents

needs_ext = pytest.mark.skipif(_C is None, reason="compiled extension missing")


def _random_forest(seed, n):
    rng = np.random.default_rng(seed)
    parents, lengths = random_forest_parents(rng, n)
    sources = []
    row = 0
    for ln in lengths:
        src = []
        for _ in range(ln):
            if rng.random() < 0.5:
                src.append(row)
                row += 1
            else:
                src.append(encode_vocab_source(int(rng.integers(0, 49408))))
        sources.append(src)
    return parents, sources


@needs_ext
@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(1, 40))
def test_cpp_and_python_builders_agree(seed, n):
    parents, sources = _random_forest(seed, n)
    a = build_forest_layout(parents, sources, 10_000)
    b = build_forest_layout_python(parents, sources, 10_000)
    for field in ("segment_table", "packed_to_input", "input_to_packed", "token_segment",
                  "token_position", "token_ctx_row", "token_vocab_id"):
        torch.testing.assert_close(getattr(a, field), getattr(b, field), msg=field)
    assert a.max_path_tokens == b.max_path_tokens


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(1, 30))
def test_layout_invariants(seed, n):
    parents, sources = _random_forest(seed, n)
    lay = build_forest_layout(parents, sources, 10_000)
    table = lay.segment_table.tolist()
    tok_seg = lay.token_segment.tolist()
    for ps, (off, ln, par, end) in enumerate(table):
        s = int(lay.packed_to_input[ps])
        assert ln == len(sources[s])
        assert tok_seg[off:off + ln] == [ps] * ln
        # parent precedes child; subtree is exactly the contiguous range after it
        assert par < ps
        if par >= 0:
            assert int(lay.packed_to_input[par]) == parents[s]
            assert table[par][0] < off and end <= table[par][3]
        descendants = {d for d in range(len(table)) if _is_ancestor(table, ps, d)}
        covered = set(tok_seg[off + ln:end])
        assert covered == descendants
        # positions continue the parent's path
        start = 0 if par < 0 else int(lay.token_position[table[par][0] + table[par][1] - 1]) + 1
        assert lay.token_position[off:off + ln].tolist() == list(range(start, start + ln))
        # sources round-trip
        codes = [c if c >= 0 else encode_vocab_source(v)
                 for c, v in zip(lay.token_ctx_row[off:off + ln].tolist(),
                                 lay.token_vocab_id[off:off + ln].tolist())]
        assert codes == list(sources[s])


def _is_ancestor(table, a, d):
    p = table[d][2]
    while p >= 0:
        if p == a:
            return True
        p = table[p][2]
    return False


@pytest.mark.parametrize("builder", ["default", "python"])
@pytest.mark.parametrize("parents,sources,limit,culprit", [
    ([-1, 5], [[1], [2]], 10, "segment 1 has invalid parent 5"),
    ([1, 0], [[1], [2]], 10, "segment 0 is not reachable"),
    ([-1, 0], [[1], []], 10, "segment 1 has no tokens"),
    ([-1, 0], [[1, 2, 3], [4, 5]], 4, "segment 1 ends at path position 5 > limit 4"),
    # both builders: the kernels' depth limit, and no silent truncation of a non-integral id
    ([-1] + list(range(128)), [[0]] * 129, 10_000, "segment 128 is deeper than 128"),
    ([-1, 0.7], [[1], [2]], 10, "segment 1: its parent must be an integer, got 0.7"),
    ([-1, 0], [[1], [2.5]], 10, "segment 1, token 0: a token source must be an integer, got 2.5"),
])
def test_layout_errors_name_the_segment(builder, parents, sources, limit, culprit):
    build = build_forest_layout if builder == "default" else build_forest_layout_python
    with pytest.raises(ForestError, match=culprit):
        build(parents, sources, limit)


@pytest.mark.skipif(_C is None, reason="compiled extension missing")
def test_python_depth_limit_is_the_kernels():
    import hipro_fast
    from hipro_fast.engine.layout import MAX_DEPTH

    assert hipro_fast.build_info()["max_depth"] == MAX_DEPTH


@needs_ext
def test_a_layout_built_under_inference_mode_keeps_its_attention_plan_cached():
    """A pipeline that scores inside torch.inference_mode() builds its layouts
    there too: they are normal tensors, so the fused attention's block plan,
    cached per table by version counter, is reused instead of re-planned on
    every call (on CUDA a device-to-host copy per layer)."""
    parents, sources = _random_forest(5, 20)
    with torch.inference_mode():
        lay = build_forest_layout(parents, sources, 10_000)
        moved = lay.to("cpu")
        T, H, D = lay.num_tokens, 2, 8
        q, k, v = (torch.randn(T, H, D, dtype=torch.float64) for _ in range(3))
        torch.ops.hipro_fast.tree_attention(q, k, v, moved.segment_table, moved.token_segment, 0.3)
        misses, hits = _C.attention_plan_cache_stats()
        torch.ops.hipro_fast.tree_attention(q, k, v, moved.segment_table, moved.token_segment, 0.3)
        assert _C.attention_plan_cache_stats() == (misses, hits + 1)
    assert not lay.segment_table.is_inference() and not moved.token_segment.is_inference()
