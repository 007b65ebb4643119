"""The fused ops against their PyTorch references and brute-force loops,
forward and backward, plus opcheck and fp64 gradcheck."""
import contextlib

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hipro_fast import ops
from hipro_fast.ops import reference
from hipro_fast.ops.extension import _C
from hipro_fast.engine.layout import build_forest_layout, encode_vocab_source
from tests.ops.knobs import attention_knobs
from tests.oracle import brute_pool, brute_tree_attention, fp_tolerance, random_forest_parents

needs_ext = pytest.mark.skipif(_C is None, reason="compiled extension missing")
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


def random_layout(seed, num_segments, max_len=6):
    rng = np.random.default_rng(seed)
    parents, lengths = random_forest_parents(rng, num_segments, max_len)
    sources, row = [], 0
    for ln in lengths:
        src = []
        for _ in range(ln):
            if rng.random() < 0.6:
                src.append(row)
                row += 1
            else:
                src.append(encode_vocab_source(int(rng.integers(0, 50))))
        sources.append(src)
    return build_forest_layout(parents, sources, 10_000), row


def qkv(T, H, D, dtype, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(T, H, D, generator=g, dtype=torch.float64).to(dtype).requires_grad_(requires_grad)
            for _ in range(3)]


# ---------------------------------------------------------------- tree attention

# The op splits the pairs between batched GEMM blocks (segments with many
# descendant queries; csrc/attention_blocks.h, the code the CUDA op runs too)
# and the per-row loops; each test runs with the default split, with every
# segment that has descendants on the GEMM path (one block at a time, and
# grouped as on CUDA: same-depth blocks gathered into one bmm), and with none.
# Mode -> (min_pairs, grouping); None keeps the default.
BLOCK_MODES = {"default": (None, None), "all_gemm": (0, "never"), "all_gemm_grouped": (0, "always"),
               "scalar_only": (10**15, None)}


@contextlib.contextmanager
def block_mode(mode):
    pairs, grouping = BLOCK_MODES[mode]
    if _C is None or (pairs is None and grouping is None):
        yield
        return
    with attention_knobs(pairs, grouping):
        yield


@pytest.fixture(params=list(BLOCK_MODES))
def attention_path(request):
    with block_mode(request.param):
        yield request.param


@needs_ext
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seed,segments,H,D", [(0, 1, 1, 4), (1, 7, 2, 8), (2, 25, 3, 16), (3, 12, 4, 33)])
def test_tree_attention_forward_matches_brute_force(dtype, seed, segments, H, D, attention_path):
    lay, _ = random_layout(seed, segments)
    q, k, v = qkv(lay.num_tokens, H, D, dtype, seed)
    scale = D ** -0.5
    out = ops.tree_attention(q, k, v, lay.segment_table, lay.token_segment, scale)
    expected = brute_tree_attention(q, k, v, lay.segment_table, lay.token_segment, scale)
    ref = reference.tree_attention(q, k, v, lay.segment_table, lay.token_segment, scale)
    assert out.dtype == dtype
    # The fused op may err at most about as much as the same-precision reference (+ eps).
    ref_err = (ref.double() - expected).abs().max().item()
    err = (out.double() - expected).abs().max().item()
    assert err <= 2 * ref_err + fp_tolerance(dtype), (err, ref_err)


@needs_ext
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seed,segments,H,D", [(4, 1, 1, 4), (5, 9, 2, 8), (6, 30, 2, 16)])
def test_tree_attention_backward_matches_reference(dtype, seed, segments, H, D, attention_path):
    lay, _ = random_layout(seed, segments)
    T = lay.num_tokens
    scale = D ** -0.5
    g = torch.Generator().manual_seed(seed + 1)
    grad_out = torch.randn(T, H, D, generator=g, dtype=torch.float64)
    q, k, v = qkv(T, H, D, dtype, seed, requires_grad=True)
    ops.tree_attention(q, k, v, lay.segment_table, lay.token_segment, scale).backward(grad_out.to(dtype))
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    reference.tree_attention(q64, k64, v64, lay.segment_table, lay.token_segment, scale).backward(grad_out)
    qr, kr, vr = (t.detach().clone().requires_grad_() for t in (q, k, v))
    reference.tree_attention(qr, kr, vr, lay.segment_table, lay.token_segment, scale).backward(grad_out.to(dtype))
    for fused, same_prec, exact in ((q, qr, q64), (k, kr, k64), (v, vr, v64)):
        err = (fused.grad.double() - exact.grad).abs().max().item()
        ref_err = (same_prec.grad.double() - exact.grad).abs().max().item()
        assert err <= 2 * ref_err + 2 * fp_tolerance(dtype), (err, ref_err)



@needs_ext
def test_tree_attention_backward_takes_out_in_another_float_dtype():
    """The raw backward op rounds `out` to q's dtype, as the CUDA backward does
    (the CPU one used to read float64 memory as float32)."""
    lay, _ = random_layout(7, 9)
    T, H, D = lay.num_tokens, 2, 8
    q, k, v = qkv(T, H, D, torch.float32, 7)
    out, lse = torch.ops.hipro_fast.tree_attention(q, k, v, lay.segment_table, lay.token_segment, D ** -0.5)
    go = torch.randn_like(out)
    same = torch.ops.hipro_fast.tree_attention_backward(go, q, k, v, out, lse, lay.segment_table,
                                                        lay.token_segment, D ** -0.5)
    wide = torch.ops.hipro_fast.tree_attention_backward(go, q, k, v, out.double(), lse, lay.segment_table,
                                                        lay.token_segment, D ** -0.5)
    for a, b in zip(same, wide):
        torch.testing.assert_close(a, b, rtol=0, atol=0)

@needs_ext
@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 100_000), segments=st.integers(1, 40), H=st.integers(1, 4),
       D=st.sampled_from([1, 3, 8, 16, 64]), max_len=st.integers(1, 12),
       mode=st.sampled_from(list(BLOCK_MODES)))
def test_tree_attention_fuzz_fp32(seed, segments, H, D, max_len, mode):
    with block_mode(mode):
        _fuzz_case(seed, segments, H, D, max_len)


def _fuzz_case(seed, segments, H, D, max_len):
    lay, _ = random_layout(seed, segments, max_len)
    q, k, v = qkv(lay.num_tokens, H, D, torch.float32, seed, requires_grad=True)
    scale = D ** -0.5
    out = ops.tree_attention(q, k, v, lay.segment_table, lay.token_segment, scale)
    qr, kr, vr = (t.detach().clone().requires_grad_() for t in (q, k, v))
    ref = reference.tree_attention(qr, kr, vr, lay.segment_table, lay.token_segment, scale)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)
    go = torch.randn_like(out)
    out.backward(go)
    ref.backward(go)
    for a, b in ((q, qr), (k, kr), (v, vr)):
        torch.testing.assert_close(a.grad, b.grad, atol=5e-5, rtol=1e-4)


@needs_ext
@pytest.mark.parametrize("mode", ["all_gemm", "all_gemm_grouped", "scalar_only"])
def test_tree_attention_ignores_autocast(mode):
    """fp32 q/k/v inside an autocast region (a user's own attention input, or a
    tower left in fp32): the op computes exactly what it computes outside, its
    block GEMMs are not autocast to bf16, forward and backward."""
    lay, _ = random_layout(31, 20, 8)
    q, k, v = qkv(lay.num_tokens, 2, 16, torch.float32, 31, requires_grad=True)
    args = (lay.segment_table, lay.token_segment, 0.25)
    with block_mode(mode):
        out = ops.tree_attention(q, k, v, *args)
        g = torch.randn_like(out)
        grads = torch.autograd.grad(out, (q, k, v), g)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out_a = ops.tree_attention(q, k, v, *args)
            grads_a = torch.autograd.grad(out_a, (q, k, v), g)
    assert out_a.dtype == torch.float32
    torch.testing.assert_close(out_a, out, rtol=0, atol=0)
    for a, b in zip(grads_a, grads):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@needs_ext
def test_tree_attention_paths_agree_in_fp64():
    """The GEMM blocks and the scalar loops compute the same sums in another
    order: in fp64 every output agrees to rounding, with some segments on each
    path in the default split."""
    lay, _ = random_layout(21, 40, 8)
    T, H, D = lay.num_tokens, 3, 16
    q, k, v = qkv(T, H, D, torch.float64, 7)
    go = torch.randn(T, H, D, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    results = {}
    for mode, pairs, grouping in (("scalar_only", 10**15, "never"), ("split", 12, "never"),
                                  ("split_grouped", 12, "always"), ("all_gemm", 0, "never"),
                                  ("all_gemm_grouped", 0, "always")):
        before = ops.attention_block_min_pairs(), ops.attention_block_grouping()
        ops.set_attention_block_min_pairs(pairs)
        ops.set_attention_block_grouping(grouping)
        try:
            out, lse = torch.ops.hipro_fast.tree_attention(q, k, v, lay.segment_table, lay.token_segment, 0.25)
            grads = torch.ops.hipro_fast.tree_attention_backward(go, q, k, v, out, lse, lay.segment_table,
                                                                 lay.token_segment, 0.25)
        finally:
            ops.set_attention_block_min_pairs(before[0])
            ops.set_attention_block_grouping(before[1])
        results[mode] = [out, lse, *grads]
    table = lay.segment_table
    pairs = (table[:, 3] - table[:, 0] - table[:, 1]) * table[:, 1]
    assert ((pairs > 0) & (pairs < 12)).any() and (pairs >= 12).any()  # "split" really splits
    for mode in ("split", "split_grouped", "all_gemm", "all_gemm_grouped"):
        for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), results[mode], results["scalar_only"]):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=lambda m: f"{mode} {name}: {m}")


def _cache_stats():
    misses, hits = _C.attention_plan_cache_stats()
    return misses, hits


@needs_ext
def test_block_plan_is_cached_per_table_and_replanned_on_change():
    """The segment-block plan (csrc/attention_blocks.cpp) is computed once per
    segment table and reused -- on CUDA that is what keeps repeated calls free of
    a device->host copy and capturable in a CUDA graph -- and recomputed when the
    table changes (in place through torch, or behind the version counter's back),
    when the knob changes, or for another table with the same contents."""
    lay, _ = random_layout(31, 30, 6)
    T, H, D = lay.num_tokens, 2, 8
    q, k, v = qkv(T, H, D, torch.float64, 3)
    table = lay.segment_table.clone()

    def run(tab, tseg=lay.token_segment):
        out, _ = torch.ops.hipro_fast.tree_attention(q, k, v, tab, tseg, 0.3)
        return out

    with block_mode("all_gemm"):
        first = run(table)
        m0, h0 = _cache_stats()
        assert torch.equal(run(table), first)
        assert _cache_stats() == (m0, h0 + 1)            # reused
        run(table.clone())
        assert _cache_stats() == (m0 + 1, h0 + 1)        # same contents, other storage: planned
        with block_mode("scalar_only"):
            run(table)
        assert _cache_stats()[0] == m0 + 2               # other knob: planned
    # A write behind the version counter (through numpy): on a CPU table the
    # cache compares contents, so the stale plan is not used. The new table is
    # a chain of one-token segments whose last one holds the remaining tokens
    # (plain causal attention over all T tokens).
    S = table.shape[0]
    assert T > S
    tseg = torch.arange(T).clamp_max(S - 1)
    with block_mode("all_gemm"):
        run(table)
        arr = table.numpy()
        for i in range(S):
            arr[i] = [i, 1 if i < S - 1 else T - i, i - 1, T]
        m1, _ = _cache_stats()
        out = run(table, tseg)
        assert _cache_stats()[0] == m1 + 1
    causal = reference.tree_attention(q, k, v, table, tseg, 0.3)
    torch.testing.assert_close(out, causal, rtol=1e-12, atol=1e-12)


@needs_ext
def test_attention_block_knob_validates():
    with pytest.raises(ValueError, match="min_pairs must be >= 0, got -1"):
        ops.set_attention_block_min_pairs(-1)
    assert ops.attention_block_min_pairs() == 256
    with pytest.raises(ValueError, match="grouping must be one of"):
        ops.set_attention_block_grouping("sometimes")
    assert ops.attention_block_grouping() == "auto"
    with pytest.raises(RuntimeError, match="block grouping must be 0 .*got 7"):
        _C.set_attention_block_grouping(7)


@needs_ext
def test_tree_attention_gradcheck_fp64(attention_path):
    lay, _ = random_layout(11, 6, 3)
    q, k, v = qkv(lay.num_tokens, 2, 3, torch.float64, 3, requires_grad=True)
    fn = lambda a, b, c: ops.tree_attention(a, b, c, lay.segment_table, lay.token_segment, 0.7)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, k, v))


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tree_attention_opcheck(dtype):
    lay, _ = random_layout(12, 8, 4)
    q, k, v = qkv(lay.num_tokens, 2, 8, dtype, 5, requires_grad=True)
    torch.library.opcheck(torch.ops.hipro_fast.tree_attention.default,
                          (q, k, v, lay.segment_table, lay.token_segment, 0.35))


@needs_ext
def test_tree_attention_rejects_bad_tables():
    lay, _ = random_layout(13, 5, 3)
    q, k, v = qkv(lay.num_tokens, 1, 4, torch.float32)
    bad = lay.token_segment.clone()
    bad[0] = 99
    with pytest.raises(RuntimeError, match="token 0 names segment 99"):
        torch.ops.hipro_fast.tree_attention(q, k, v, lay.segment_table, bad, 1.0)
    with pytest.raises(RuntimeError, match="same shape"):
        torch.ops.hipro_fast.tree_attention(q, k[:-1], v, lay.segment_table, lay.token_segment, 1.0)


# ---------------------------------------------------------------- forest assembly

def assembly_inputs(seed, segments, W, dtype):
    lay, rows = random_layout(seed, segments)
    g = torch.Generator().manual_seed(seed)
    ctx = torch.randn(max(rows, 1), W, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    emb = torch.randn(50, W, generator=g, dtype=torch.float64).to(dtype)
    pos = torch.randn(int(lay.token_position.max()) + 1, W, generator=g, dtype=torch.float64).to(dtype)
    return lay, ctx, emb, pos


@needs_ext
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seed,segments,W", [(0, 1, 5), (1, 10, 16), (2, 40, 33)])
def test_assemble_forward_backward(dtype, seed, segments, W):
    lay, ctx, emb, pos = assembly_inputs(seed, segments, W, dtype)
    args = (lay.token_ctx_row, lay.token_vocab_id, lay.token_position)
    out = ops.assemble_forest(ctx, emb, pos, *args)
    ctx_r = ctx.detach().clone().requires_grad_()
    ref = reference.assemble_forest(ctx_r, emb, pos, *args)
    torch.testing.assert_close(out, ref, atol=0, rtol=0)
    # brute force, row by row
    for t in range(lay.num_tokens):
        r, vid, p = (int(a[t]) for a in args)
        row = (ctx[r] if r >= 0 else emb[vid]) + pos[p]
        torch.testing.assert_close(out[t], row, atol=0, rtol=0)
    g = torch.randn_like(out)
    out.backward(g)
    ref.backward(g)
    # every context row is read by one token here, so the backward is a pure scatter: exact in every dtype
    torch.testing.assert_close(ctx.grad, ctx_r.grad, atol=0, rtol=0)


@needs_ext
@settings(max_examples=40, deadline=None)
@given(T=st.integers(1, 60), R=st.integers(1, 9), V=st.integers(1, 7), P=st.integers(1, 12),
       W=st.integers(1, 40), dtype=st.sampled_from([torch.float64, torch.float32]), seed=st.integers(0, 2**31 - 1))
def test_assemble_fuzz_rows_read_by_many_tokens(T, R, V, P, W, dtype, seed):
    """Any mix of context and vocabulary tokens, context rows drawn with
    replacement (one row read by many tokens, as a shared context is in the
    forest), so the backward must accumulate: forward equals the row-by-row
    definition exactly, and the context gradient equals index_add_ in fp64."""
    g = torch.Generator().manual_seed(seed)
    reads_ctx = torch.rand(T, generator=g) < 0.7
    ctx_row = torch.where(reads_ctx, torch.randint(0, R, (T,), generator=g), torch.full((T,), -1))
    vocab_id = torch.where(reads_ctx, torch.full((T,), -1), torch.randint(0, V, (T,), generator=g))
    position = torch.randint(0, P, (T,), generator=g)
    ctx = torch.randn(R, W, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    emb = torch.randn(V, W, generator=g, dtype=torch.float64).to(dtype)
    pos = torch.randn(P, W, generator=g, dtype=torch.float64).to(dtype)
    out = ops.assemble_forest(ctx, emb, pos, ctx_row, vocab_id, position)
    expected = torch.stack([(ctx[r] if r >= 0 else emb[v]) + pos[p]
                            for r, v, p in zip(ctx_row.tolist(), vocab_id.tolist(), position.tolist())])
    torch.testing.assert_close(out, expected.detach(), atol=0, rtol=0)
    grad_out = torch.randn(T, W, generator=g, dtype=torch.float64).to(dtype)
    out.backward(grad_out)
    truth = torch.zeros(R, W, dtype=torch.float64).index_add_(0, ctx_row[reads_ctx], grad_out[reads_ctx].double())
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(ctx.grad.double(), truth, atol=tol, rtol=tol)
    # The documented summation order, which the CUDA op shares (context_rows.h):
    # each row's tokens in ascending token order, from zero, in the dtype's
    # accumulation type. Pinned bit for bit so both devices can be held to it.
    in_order = torch.zeros(R, W, dtype=dtype)
    for t, r in enumerate(ctx_row.tolist()):
        if r >= 0:
            in_order[r] += grad_out[t]
    assert torch.equal(ctx.grad, in_order)


@needs_ext
def test_assemble_grads_to_frozen_tables_when_asked():
    lay, ctx, emb, pos = assembly_inputs(3, 12, 8, torch.float64)
    emb.requires_grad_()
    pos.requires_grad_()
    args = (lay.token_ctx_row, lay.token_vocab_id, lay.token_position)
    assert torch.autograd.gradcheck(lambda c, e, p: ops.assemble_forest(c, e, p, *args), (ctx, emb, pos))


@needs_ext
def test_assemble_opcheck_and_errors():
    lay, ctx, emb, pos = assembly_inputs(4, 8, 8, torch.float32)
    args = (ctx, emb, pos, lay.token_ctx_row, lay.token_vocab_id, lay.token_position)
    torch.library.opcheck(torch.ops.hipro_fast.assemble_forest.default, args)
    bad = lay.token_position.clone()
    bad[-1] = 10_000
    with pytest.raises(RuntimeError, match="position 10000"):
        torch.ops.hipro_fast.assemble_forest(ctx, emb, pos, lay.token_ctx_row, lay.token_vocab_id, bad)


# ---------------------------------------------------------------- EOS pooling

def pool_inputs(seed, T, P, W, E, dtype):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(T, W, generator=g, dtype=torch.float64) * 3 + 1).to(dtype).requires_grad_()
    eos = torch.randperm(T, generator=g)[:P]
    weight = torch.randn(W, generator=g, dtype=torch.float64).to(dtype)
    bias = torch.randn(W, generator=g, dtype=torch.float64).to(dtype)
    proj = torch.randn(W, E, generator=g, dtype=torch.float64).to(dtype)
    return x, eos, weight, bias, proj


@needs_ext
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,P,W,E", [(1, 1, 4, 3), (20, 7, 16, 8), (50, 50, 33, 12)])
def test_pool_forward_backward(dtype, T, P, W, E):
    x, eos, weight, bias, proj = pool_inputs(T + P, T, P, W, E, dtype)
    out = ops.pool_eos(x, eos, weight, bias, proj, 1e-5)
    torch.testing.assert_close(out.double(), brute_pool(x.detach(), eos, weight, bias, proj, 1e-5),
                               atol=1e-5, rtol=1e-5)
    xr = x.detach().clone().requires_grad_()
    ref = reference.pool_eos(xr, eos, weight, bias, proj, 1e-5)
    g = torch.randn_like(out)
    out.backward(g)
    ref.backward(g)
    assert x.grad.dtype == dtype
    # both compute in fp32 and round once: low precision may differ by one rounding (eps relative)
    tol = 1e-5 if dtype in (torch.float32, torch.float64) else torch.finfo(dtype).eps
    torch.testing.assert_close(x.grad, xr.grad, atol=1e-6 if tol < 1e-4 else 1e-5, rtol=tol)


@needs_ext
@settings(max_examples=40, deadline=None)
@given(T=st.integers(1, 30), P=st.integers(1, 40), W=st.integers(4, 40), E=st.integers(2, 16),
       dtype=st.sampled_from([torch.float64, torch.float32]), seed=st.integers(0, 2**31 - 1))
def test_pool_fuzz_repeated_eos_rows(T, P, W, E, dtype, seed):
    """EOS indices drawn with replacement (P may exceed T: prompts that share
    their EOS row), so the x gradient accumulates several pooled rows: forward
    and backward against the fp64 brute force (autograd through it). W >= 4 and
    E >= 2: with 2 features LayerNorm's output is +-1 whatever x, and with one
    output the normalised feature is a sign, so their x gradients are ~0 and
    fp32 has no relative accuracy to test there."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(T, W, generator=g, dtype=torch.float64) * 3 + 1).to(dtype).requires_grad_()
    eos = torch.randint(0, T, (P,), generator=g)
    weight, bias = (torch.randn(W, generator=g, dtype=torch.float64).to(dtype) for _ in range(2))
    proj = torch.randn(W, E, generator=g, dtype=torch.float64).to(dtype)
    out = ops.pool_eos(x, eos, weight, bias, proj, 1e-5)
    x64 = x.detach().double().requires_grad_()
    ref = brute_pool(x64, eos, weight.double(), bias.double(), proj.double(), 1e-5)
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(out.double(), ref.detach(), atol=tol, rtol=tol)
    grad_out = torch.randn(P, E, generator=g, dtype=torch.float64)
    out.backward(grad_out.to(out.dtype))
    ref.backward(grad_out)
    scale = x64.grad.abs().max().item() + 1e-30
    torch.testing.assert_close(x.grad.double() / scale, x64.grad / scale, atol=tol * 10, rtol=0)


@needs_ext
@pytest.mark.parametrize("amp_dtype", [torch.bfloat16, torch.float16])
def test_pool_ignores_autocast(amp_dtype):
    """Inside an autocast region the op still computes (and returns) fp32: its
    internal GEMM must not be autocast (on CUDA that raised a dtype error)."""
    x, eos, weight, bias, proj = pool_inputs(3, 20, 7, 16, 8, torch.float32)
    out = ops.pool_eos(x, eos, weight, bias, proj, 1e-5)
    g = torch.randn_like(out)
    out.backward(g)
    xa = x.detach().clone().requires_grad_()
    with torch.autocast("cpu", dtype=amp_dtype):
        out_a = ops.pool_eos(xa, eos, weight, bias, proj, 1e-5)
        out_a.backward(g)
    assert out_a.dtype == torch.float32
    torch.testing.assert_close(out_a, out, rtol=0, atol=0)
    torch.testing.assert_close(xa.grad, x.grad, rtol=0, atol=0)


@needs_ext
def test_pool_gradcheck_all_inputs_fp64():
    x, eos, weight, bias, proj = pool_inputs(0, 9, 4, 6, 5, torch.float64)
    for t in (weight, bias, proj):
        t.requires_grad_()
    fn = lambda a, w, b, p: ops.pool_eos(a, eos, w, b, p, 1e-5)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, weight, bias, proj))


@needs_ext
def test_pool_opcheck():
    x, eos, weight, bias, proj = pool_inputs(1, 12, 5, 8, 4, torch.float32)
    torch.library.opcheck(torch.ops.hipro_fast.pool_eos.default, (x, eos, weight, bias, proj, 1e-5))


def test_reference_fallback_warns_once(monkeypatch):
    """Without the extension, ops fall back to the reference with one warning."""
    import hipro_fast.ops.extension as ext
    import hipro_fast.ops.interface as interface

    monkeypatch.setattr(ext, "_C", None)
    monkeypatch.setattr(ext, "EXTENSION_ERROR", "ImportError: simulated")
    monkeypatch.setattr(ext, "_warned", set())
    monkeypatch.setattr(interface, "fused_available", ext.fused_available)
    monkeypatch.setattr(interface, "warn_fallback", ext.warn_fallback)
    x, eos, weight, bias, proj = pool_inputs(2, 6, 3, 4, 4, torch.float32)
    with pytest.warns(RuntimeWarning, match="simulated"):
        a = ops.pool_eos(x, eos, weight, bias, proj, 1e-5)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        b = ops.pool_eos(x, eos, weight, bias, proj, 1e-5)
    # the fallback's result against the independent fp64 loop (not against itself)
    expected = brute_pool(x.detach(), eos, weight, bias, proj, 1e-5)
    for got in (a, b):
        torch.testing.assert_close(got.double(), expected, atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------- validation of the index arguments
# The CPU ops validate the forest with tree_index.h's predicates (csrc/checks.cpp),
# before any index is read: each corruption below must raise, naming the culprit,
# in the forward and the backward. Without the check the kernels would run on it.

def _fixed_forest():
    # Packed: root(3 tokens) = segment 0, its child a(2) = 1, a's child c(1) = 2, b(4) = 3.
    lay = build_forest_layout([-1, 0, 0, 1], [[0, 1, 2], [3, 4], [5, 6, 7, 8], [9]], 100)
    assert lay.segment_table.tolist() == [[0, 3, -1, 10], [3, 2, 0, 6], [5, 1, 1, 6], [6, 4, 0, 10]]
    return lay


MALFORMED_FORESTS = {
    # name: (segment_table edits {(row, col): value}, token_segment edits {token: segment}, message)
    "parent_later_in_preorder": ({(1, 2): 3}, {}, "segment 1 has parent 3 which is not earlier in DFS preorder"),
    "parent_is_itself": ({(2, 2): 2}, {}, "segment 2 has parent 2 which is not earlier in DFS preorder"),
    "subtree_end_past_the_tokens": ({(0, 3): 11}, {}, "segment 0 subtree ends past token 10"),
    "tokens_past_the_end": ({(3, 1): 5}, {}, r"segment 3 \(offset 6, length 5\) does not lie inside the 10 tokens"),
    "negative_offset": ({(1, 0): -1}, {}, r"segment 1 \(offset -1, length 2\) does not lie inside"),
    "token_before_its_segment": ({}, {4: 3}, "token 4 lies outside its segment 3"),
    "token_after_its_segment": ({}, {9: 2}, "token 9 lies outside its segment 2"),
    "token_names_no_segment": ({}, {0: 99}, r"token 0 names segment 99 outside \[0, 4\)"),
    # in range, but not a preorder table: the GEMM blocks and the parent walk would disagree
    "subtree_before_own_tokens": ({(3, 3): 8}, {}, r"segment 3 subtree_end 8 is before the end of its own tokens"),
    "child_outside_parent_subtree": ({(2, 3): 7}, {}, r"segment 2 \(subtree_end 7\) is not nested in its parent 1"),
    "child_before_parent_tokens": ({(3, 2): 1}, {}, r"segment 3 \(subtree_end 10\) is not nested"),
    "subtree_left_open": ({(1, 3): 10, (2, 3): 10}, {},
                          r"segment 3 \(offset 6, parent 0\) does not follow segment 2 in packed DFS preorder"),
    "gap_between_segments": ({(3, 0): 7, (3, 1): 3}, {},
                             r"segment 3 \(offset 7, parent 0\) does not follow segment 2"),
    # offset + length wrapped around past int64's end passed the range check
    "length_overflows_int64": ({(3, 1): 2**63 - 1}, {},
                               r"segment 3 \(offset 6, length 9223372036854775807\) does not lie inside"),
    "negative_subtree_end": ({(3, 1): 2**63 - 1, (3, 3): -40}, {}, r"segment 3 \(offset 6, length 9223"),
}


@needs_ext
@pytest.mark.parametrize("name", list(MALFORMED_FORESTS))
def test_tree_attention_rejects_malformed_forest(name):
    table_edits, token_edits, message = MALFORMED_FORESTS[name]
    lay = _fixed_forest()
    q = torch.randn(lay.num_tokens, 2, 4, generator=torch.Generator().manual_seed(0))
    out, lse = torch.ops.hipro_fast.tree_attention(q, q, q, lay.segment_table, lay.token_segment, 0.5)
    table, token_segment = lay.segment_table.clone(), lay.token_segment.clone()
    for (row, col), value in table_edits.items():
        table[row, col] = value
    for token, segment in token_edits.items():
        token_segment[token] = segment
    with pytest.raises(RuntimeError, match=message):
        torch.ops.hipro_fast.tree_attention(q, q, q, table, token_segment, 0.5)
    with pytest.raises(RuntimeError, match=message):
        torch.ops.hipro_fast.tree_attention_backward(q, q, q, q, out, lse, table, token_segment, 0.5)


@needs_ext
def test_tree_attention_rejects_strided_token_segment():
    lay = _fixed_forest()
    q = torch.randn(lay.num_tokens, 1, 4)
    strided = torch.stack([lay.token_segment, lay.token_segment], 1)[:, 0]
    with pytest.raises(RuntimeError, match="token_segment must be contiguous"):
        torch.ops.hipro_fast.tree_attention(q, q, q, lay.segment_table, strided, 0.5)


@needs_ext
@pytest.mark.parametrize("mode", ["default", "all_gemm", "scalar_only"])
def test_a_forest_deeper_than_the_kernels_hold_is_refused_up_front(mode):
    """A chain of 129 one-token segments is refused, naming the segment, whichever
    path its segments would take (the depth limit used to trip inside the per-row
    kernel only, for the ancestors not already blocked); 128 levels work."""
    def chain(n):
        table = torch.tensor([[s, 1, s - 1, n] for s in range(n)])
        return table, torch.arange(n)

    with attention_knobs(*BLOCK_MODES[mode]):
        table, tseg = chain(128)
        q = torch.randn(128, 1, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        torch.testing.assert_close(ops.tree_attention(q, q, q, table, tseg, 0.5),
                                   reference.tree_attention(q, q, q, table, tseg, 0.5))
        table, tseg = chain(129)
        q = torch.randn(129, 1, 4, dtype=torch.float64)
        with pytest.raises(RuntimeError, match="segment 128 lies more than 128 segments deep"):
            ops.tree_attention(q, q, q, table, tseg, 0.5)


@needs_ext
def test_pool_backward_checks_its_arguments_on_cpu():
    """pool_eos_backward runs the same argument checks on the CPU as on CUDA."""
    x, eos, weight, bias, proj = pool_inputs(5, 12, 4, 8, 6, torch.float32)
    features, x_hat, rstd, norm = torch.ops.hipro_fast.pool_eos(x.detach(), eos, weight, bias, proj, 1e-5)
    g = torch.randn_like(features)
    good = dict(grad_features=g, features=features, x_hat=x_hat, rstd=rstd, proj_norm=norm, ln_weight=weight,
                projection=proj, eos_index=eos, num_tokens=12, x_dtype=torch.float32)

    def call(**change):
        return torch.ops.hipro_fast.pool_eos_backward(*{**good, **change}.values())

    assert call().shape == (12, 8)
    for change, message in [
        (dict(eos_index=eos[:-1]), "eos_index must have 4 entries, got 3"),
        (dict(x_hat=x_hat[0]), r"x_hat must be \[P, W\], got \[8\]"),
        (dict(x_hat=x_hat.half()), "x_hat must be float32 or float64, got Half"),
        (dict(rstd=rstd[:-1]), r"rstd must be \[4\], got \[3\]"),
        (dict(grad_features=g[:, :-1]), r"grad_features must be \[4, 6\], got \[4, 5\]"),
        (dict(projection=proj[:-1]), r"projection must be \[8, E\], got \[7, 6\]"),
        (dict(ln_weight=weight[:-1]), r"ln_weight must be \[8\], got \[7\]"),
        (dict(num_tokens=-1), "num_tokens must be >= 0, got -1"),
        (dict(eos_index=torch.tensor([0, 1, 2, 99])), r"eos_index\[3\] = 99 outside \[0, 12\)"),
        (dict(num_tokens=0), r"eos_index\[0\] = \d+ outside \[0, 0\)"),
        (dict(x_dtype=torch.int64), "x_dtype .* must be a floating type, got Long"),
    ]:
        with pytest.raises(RuntimeError, match=message):
            call(**change)


@needs_ext
def test_cpu_ops_read_strided_index_vectors():
    """Index vectors may be strided views: the CPU ops read them through a dense copy
    (as the CUDA ops do), not as if they were contiguous."""
    def strided(a):
        view = torch.stack([a, torch.full_like(a, -7)], 1)[:, 0]
        assert not view.is_contiguous()
        return view

    lay, ctx, emb, pos = assembly_inputs(5, 10, 8, torch.float32)
    args = (lay.token_ctx_row, lay.token_vocab_id, lay.token_position)
    expected = torch.ops.hipro_fast.assemble_forest(ctx, emb, pos, *args)
    got = torch.ops.hipro_fast.assemble_forest(ctx, emb, pos, *map(strided, args))
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    g = torch.randn_like(expected)
    torch.testing.assert_close(torch.ops.hipro_fast.assemble_forest_backward(g, strided(args[0]), ctx.shape[0]),
                               torch.ops.hipro_fast.assemble_forest_backward(g, args[0], ctx.shape[0]), rtol=0, atol=0)
    x, eos, weight, bias, proj = pool_inputs(6, 20, 5, 8, 4, torch.float32)
    torch.testing.assert_close(ops.pool_eos(x, strided(eos), weight, bias, proj, 1e-5),
                               ops.pool_eos(x, eos, weight, bias, proj, 1e-5), rtol=0, atol=0)


@needs_ext
def test_cpu_ops_name_a_non_floating_dtype():
    lay, ctx, emb, pos = assembly_inputs(7, 4, 8, torch.float32)
    with pytest.raises(RuntimeError, match="ctx_table must be float32, float64, float16 or bfloat16, got Long"):
        torch.ops.hipro_fast.assemble_forest(ctx.long(), emb.long(), pos.long(), lay.token_ctx_row,
                                             lay.token_vocab_id, lay.token_position)
    q = torch.zeros(lay.num_tokens, 1, 4, dtype=torch.int32)
    with pytest.raises(RuntimeError, match="q must be float32, float64, float16 or bfloat16, got Int"):
        torch.ops.hipro_fast.tree_attention(q, q, q, lay.segment_table, lay.token_segment, 0.5)


@needs_ext
def test_a_meta_argument_among_real_ones_is_refused():
    """With any meta argument the dispatcher runs the fake kernel, which returned
    uninitialised memory on the other arguments' device; it now names the culprit."""
    lay = _fixed_forest()
    q = torch.randn(lay.num_tokens, 1, 4)
    with pytest.raises(RuntimeError, match="hipro_fast.tree_attention: segment_table is on meta, q on cpu"):
        ops.tree_attention(q, q, q, lay.segment_table.to("meta"), lay.token_segment, 0.5)
    x, eos, weight, bias, proj = pool_inputs(5, 12, 4, 8, 6, torch.float32)
    with pytest.raises(RuntimeError, match="hipro_fast.pool_eos: eos_index is on meta, x on cpu"):
        ops.pool_eos(x, eos.to("meta"), weight, bias, proj, 1e-5)
    alay, ctx, emb, pos = assembly_inputs(7, 4, 8, torch.float32)
    with pytest.raises(RuntimeError, match="hipro_fast.assemble_forest: token_position is on meta"):
        ops.assemble_forest(ctx, emb, pos, alay.token_ctx_row, alay.token_vocab_id, alay.token_position.to("meta"))
    # all-meta calls of the op (shape inference) still work
    out, lse = torch.ops.hipro_fast.tree_attention(*(q.to("meta"),) * 3, lay.segment_table.to("meta"),
                                                   lay.token_segment.to("meta"), 0.5)
    assert out.device.type == "meta" and out.shape == q.shape and lse.shape == q.shape[:2]


@needs_ext
def test_a_head_dim_of_zero_is_named():
    lay = _fixed_forest()
    x = torch.zeros(lay.num_tokens, 2, 0)
    with pytest.raises(RuntimeError, match=r"q must have a head dim D >= 1, got \[10, 2, 0\]"):
        ops.tree_attention(x, x, x, lay.segment_table, lay.token_segment, 1.0)


@needs_ext
@pytest.mark.parametrize("mode", ["all_gemm", "all_gemm_grouped", "scalar_only"])
def test_fp16_backward_keeps_a_large_score_gradient_finite(mode):
    """dS = P (dP - delta) scale can pass fp16's 65504 where dQ = dS K does not: the
    GEMM blocks rounded dS to fp16 first (inf, then inf x 0 = NaN); every path
    now agrees with the fp32-math reference."""
    table, tseg = torch.tensor([[0, 2, -1, 3], [2, 1, 0, 3]]), torch.tensor([0, 0, 1])
    D = 64
    q = torch.zeros(3, 1, D, dtype=torch.half)           # uniform attention
    k = torch.zeros(3, 1, D, dtype=torch.half)
    k[0] = 1e-3
    v = torch.zeros(3, 1, D, dtype=torch.half)
    v[0], v[1] = 1, -1
    grad = torch.full((3, 1, D), 30000.0, dtype=torch.half)  # a finite fp16 upstream gradient
    qr = q.clone().requires_grad_()
    (expected,) = torch.autograd.grad(reference.tree_attention(qr, k, v, table, tseg, 1.0), qr, grad)
    assert expected.isfinite().all()
    with attention_knobs(*BLOCK_MODES[mode]):
        qq = q.clone().requires_grad_()
        (got,) = torch.autograd.grad(ops.tree_attention(qq, k, v, table, tseg, 1.0), qq, grad)
    torch.testing.assert_close(got, expected, rtol=1e-3, atol=0)


# ---------------------------------------------------------------- autograd modes the ops do not support
@needs_ext
@pytest.mark.parametrize("amp_dtype", [torch.bfloat16, torch.float16])
def test_pool_parameter_gradients_ignore_autocast(amp_dtype):
    """The frozen LayerNorm / projection gradients (computed in Python from the
    saved statistics) stay in the op's precision when backward runs in autocast."""
    x, eos, weight, bias, proj = pool_inputs(5, 20, 7, 16, 8, torch.float32)
    params = [t.requires_grad_() for t in (weight, bias, proj)]
    g = torch.randn(7, 8, generator=torch.Generator().manual_seed(5))
    plain = torch.autograd.grad(ops.pool_eos(x, eos, *params, 1e-5), [x, *params], g)
    with torch.autocast("cpu", dtype=amp_dtype):
        amp = torch.autograd.grad(ops.pool_eos(x, eos, *params, 1e-5), [x, *params], g)
    for a, b in zip(amp, plain):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_references_ignore_autocast():
    """The fallback computes what the kernels compute inside autocast too (fp32 in,
    fp32 math), so HIPRO_FAST_REFERENCE=1 stays the same op."""
    lay, _ = random_layout(8, 12, 5)
    q, k, v = qkv(lay.num_tokens, 2, 8, torch.float32, 8)
    x, eos, weight, bias, proj = pool_inputs(6, 20, 7, 16, 8, torch.float32)
    att = reference.tree_attention(q, k, v, lay.segment_table, lay.token_segment, 0.3)
    pool = reference.pool_eos(x, eos, weight, bias, proj, 1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        att_a = reference.tree_attention(q, k, v, lay.segment_table, lay.token_segment, 0.3)
        pool_a = reference.pool_eos(x, eos, weight, bias, proj, 1e-5)
    assert att_a.dtype == pool_a.dtype == torch.float32
    torch.testing.assert_close(att_a, att, rtol=0, atol=0)
    torch.testing.assert_close(pool_a, pool, rtol=0, atol=0)


def _op_calls():
    """(name, f(inputs) -> output, inputs requiring grad) for each op, fp64."""
    lay, rows = random_layout(9, 8, 4)
    q, k, v = qkv(lay.num_tokens, 2, 4, torch.float64, 9, requires_grad=True)
    x, eos, weight, bias, proj = pool_inputs(9, 12, 5, 6, 4, torch.float64)
    ctx = torch.randn(max(rows, 1), 6, dtype=torch.float64, requires_grad=True)
    emb = torch.randn(50, 6, dtype=torch.float64)
    pos = torch.randn(int(lay.token_position.max()) + 1, 6, dtype=torch.float64)
    return [
        ("tree_attention", lambda a: ops.tree_attention(a, k, v, lay.segment_table, lay.token_segment, 0.5), q),
        ("pool_eos", lambda a: ops.pool_eos(a, eos, weight, bias, proj, 1e-5), x),
        ("assemble_forest", lambda a: ops.assemble_forest(a, emb, pos, lay.token_ctx_row, lay.token_vocab_id,
                                                          lay.token_position), ctx),
    ]


@needs_ext
@pytest.mark.parametrize("which", [0, 1, 2], ids=["tree_attention", "pool_eos", "assemble_forest"])
def test_double_backward_raises_instead_of_returning_zeros(which):
    """The *_backward ops have no derivative of their own: a graph of the
    gradient (create_graph=True) is refused when it is built, where second-order
    gradients would otherwise come out zero; first order is unaffected."""
    name, f, a = _op_calls()[which]
    with pytest.raises(NotImplementedError, match=f"hipro_fast.{name}: double backward"):
        torch.autograd.grad(f(a).square().sum(), a, create_graph=True)
    (g,) = torch.autograd.grad(f(a).square().sum(), a)
    assert g.abs().sum() > 0


@needs_ext
@pytest.mark.parametrize("which", [0, 1, 2], ids=["tree_attention", "pool_eos", "assemble_forest"])
def test_forward_mode_ad_raises_instead_of_dropping_the_tangent(which):
    import torch.autograd.forward_ad as fwAD

    name, f, a = _op_calls()[which]
    a = a.detach()
    with pytest.raises(NotImplementedError, match=f"hipro_fast.{name}: forward-mode AD"):
        torch.func.jvp(f, (a,), (torch.ones_like(a),))
    with fwAD.dual_level(), pytest.raises(NotImplementedError, match=f"hipro_fast.{name}: forward-mode AD"):
        f(fwAD.make_dual(a, torch.ones_like(a)))


@needs_ext
@pytest.mark.parametrize("which", [0, 1, 2], ids=["tree_attention", "pool_eos", "assemble_forest"])
def test_func_gradient_transforms_are_refused_by_name(which):
    """torch.func.grad cannot transform register_autograd's formulas: it is refused
    naming the op; torch.vmap works."""
    name, f, a = _op_calls()[which]
    a = a.detach()
    with pytest.raises(NotImplementedError, match=f"hipro_fast.{name}: torch.func.grad"):
        torch.func.grad(lambda t: f(t).square().sum())(a)


@needs_ext
def test_the_raw_ops_statistics_outputs_are_not_differentiable():
    """lse of tree_attention and x_hat / rstd / proj_norm of pool_eos feed the
    backward only: marked non-differentiable, so a loss on them cannot get a
    silently dropped gradient."""
    lay, _ = random_layout(10, 6, 4)
    q, k, v = qkv(lay.num_tokens, 2, 4, torch.float32, 10, requires_grad=True)
    out, lse = torch.ops.hipro_fast.tree_attention(q, k, v, lay.segment_table, lay.token_segment, 0.5)
    assert out.requires_grad and not lse.requires_grad
    x, eos, weight, bias, proj = pool_inputs(10, 12, 5, 6, 4, torch.float32)
    features, *stats = torch.ops.hipro_fast.pool_eos(x, eos, weight, bias, proj, 1e-5)
    assert features.requires_grad and not any(t.requires_grad for t in stats)


@needs_ext
@pytest.mark.parametrize("shape", [(1, 8), (2, 1)], ids=["one-head", "head-dim-1"])
def test_size_one_dimensions_with_odd_strides_are_accepted(shape):
    """torch calls a tensor with a size-1 dimension contiguous whatever that
    dimension's stride; the op takes it (copying to standard strides) like the reference."""
    H, D = shape
    lay, _ = random_layout(11, 6, 4)
    T = lay.num_tokens
    base = torch.randn(T * H * D * 13, generator=torch.Generator().manual_seed(11))
    strides = (H * D, 13 * T * H * D // max(H, 1), 1) if H == 1 else (H * D, D, 7 * T * H * D)
    q = torch.as_strided(base, (T, H, D), strides)
    assert q.is_contiguous() and q.stride() != torch.empty(T, H, D).stride()
    out = ops.tree_attention(q, q, q, lay.segment_table, lay.token_segment, 0.3)
    torch.testing.assert_close(out, reference.tree_attention(q, q, q, lay.segment_table, lay.token_segment, 0.3),
                               atol=2e-6, rtol=1e-5)


def test_references_handle_empty_forests_and_vocabulary_only_forests():
    empty = torch.zeros(0, 2, 4)
    table = torch.tensor([[0, 0, -1, 0]])
    assert reference.tree_attention(empty, empty, empty, table, torch.zeros(0, dtype=torch.long), 0.5).shape == (0, 2, 4)
    # ... and stays in the graph, as the op does (before: a detached tensor, so backward raised)
    q, k, v = (torch.zeros(0, 2, 4, requires_grad=True) for _ in range(3))
    out = reference.tree_attention(q, k, v, table, torch.zeros(0, dtype=torch.long), 0.5)
    out.sum().backward()
    assert [t.grad.shape for t in (q, k, v)] == [(0, 2, 4)] * 3
    emb, pos = torch.randn(5, 3), torch.randn(4, 3)
    ids = torch.tensor([1, 4, 0])
    out = reference.assemble_forest(torch.zeros(0, 3), emb, pos, torch.full((3,), -1), ids, torch.tensor([0, 1, 2]))
    torch.testing.assert_close(out, emb[ids] + pos[:3], rtol=0, atol=0)


@needs_ext
def test_a_segment_inside_a_siblings_tokens_is_refused():
    """In range and nested, but segment 2 sits inside segment 1's tokens without
    being its descendant: the GEMM blocks counted key 2 twice (0.15 off the
    brute force) while the per-row walk did not. Refused, naming the segment."""
    table = torch.tensor([[0, 1, -1, 5], [1, 2, 0, 5], [2, 1, 0, 5], [3, 2, 1, 5]])
    token_segment = torch.tensor([0, 1, 1, 3, 3])
    q = torch.randn(5, 1, 4, generator=torch.Generator().manual_seed(2))
    for mode in ("all_gemm", "scalar_only"):
        with block_mode(mode), pytest.raises(RuntimeError, match="segment 2 .* does not follow segment 1"):
            torch.ops.hipro_fast.tree_attention(q, q, q, table, token_segment, 0.5)
