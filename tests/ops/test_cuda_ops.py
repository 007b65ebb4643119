"""The CUDA ops (csrc/cuda/*.cu) against the CPU ops and hipro_fast.ops.reference.

Every test is marked `gpu` and skips unless a CUDA device is visible and the
extension was built with CUDA (`hipro_fast.build_info()["cuda"]`); see
scripts/gpu_check.sh.

Oracles:
  * the CPU op of the same name on the same inputs (the exact semantics);
  * an fp64 "truth" (the CPU op or the reference on fp64 copies of the
    inputs; low-precision inputs upcast exactly).
Tolerances: fp32 ~1e-5, fp64 ~1e-10. For bf16/fp16 outputs the fused
result must err (vs the fp64 truth) at most twice as much as the
same-precision CPU op / reference does, plus a small eps (flash-attention
style), so no fixed tolerance has to guess the rounding of the output dtype.

HIPRO_CUDA_TESTS_DEVICE=cpu runs the same tests with the CPU ops in place of
the CUDA ones: a dry run of the test logic on a machine without a GPU (the
comparisons are then trivially tight); it is not a test of the kernels.
"""
from __future__ import annotations

import os
import random

import pytest
import torch

import hipro_fast
from tests.ops.knobs import attention_knobs
from hipro_fast import ops
from hipro_fast.ops import reference
from hipro_fast.engine.flex import FlexTreeAttention
from hipro_fast.engine.layout import build_forest_layout, encode_vocab_source

DEVICE = os.environ.get("HIPRO_CUDA_TESTS_DEVICE", "cuda")


def _cuda_ready() -> tuple[bool, str]:
    if DEVICE != "cuda":
        return True, ""
    if not torch.cuda.is_available():
        return False, "no CUDA device"
    info = hipro_fast.build_info()
    if not info.get("cuda"):
        return False, f"extension built without CUDA: {info}"
    return True, ""


_READY, _WHY = _cuda_ready()
# pool_eos uses at::mm: IEEE fp32 GEMMs (conftest.ieee_fp32_matmul) for the fp32 tolerances.
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not _READY, reason=_WHY),
              pytest.mark.usefixtures("ieee_fp32_matmul")]

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
LOW = [torch.bfloat16, torch.float16]
# Half an ulp at 1.0 of each low-precision dtype: the "small eps" of the
# error-ratio checks.
EPS = {torch.bfloat16: 2.0 ** -9, torch.float16: 2.0 ** -11}




def dev(t: torch.Tensor) -> torch.Tensor:
    """A fresh detached copy on the test device (a copy even on the CPU dry run)."""
    return t.detach().to(DEVICE, copy=True)


def host(t: torch.Tensor) -> torch.Tensor:
    return t.detach().cpu()


def max_err(x: torch.Tensor, truth: torch.Tensor) -> float:
    return (host(x).double() - host(truth).double()).abs().max().item() if x.numel() else 0.0


def assert_close_dtype(actual, expected, dtype, what=""):
    """CUDA vs CPU op in the same dtype: equal up to accumulation order, then
    at most a flip of the final rounding for the low-precision dtypes."""
    tol = {
        torch.float32: dict(rtol=1e-5, atol=1e-5),
        torch.float64: dict(rtol=1e-10, atol=1e-10),
        torch.bfloat16: dict(rtol=2 * 2.0 ** -8, atol=1e-5),
        torch.float16: dict(rtol=2 * 2.0 ** -11, atol=1e-5),
    }[dtype]
    torch.testing.assert_close(host(actual), host(expected), **tol, msg=lambda m: f"{what}: {m}")


# --------------------------------------------------------------- forests

def random_forest(seed: int, kind: str = "random", num_segments: int = 14, max_len: int = 5,
                  ctx_rows: int = 24, vocab: int = 64, p_ctx: float = 0.5):
    """A packed forest from random parents/lengths.

    kind: "random" (random earlier parent, a few roots), "chain" (deep path:
    long visible-key lists), "wide" (one root with many children: root keys
    are seen by long query ranges) or "single" (one segment).
    Context rows are drawn with replacement, so some rows repeat.
    """
    rng = random.Random(seed)
    parents = []
    for i in range(num_segments):
        if kind == "single" or i == 0:
            parents.append(-1)
        elif kind == "chain":
            parents.append(i - 1)
        elif kind == "wide":
            parents.append(0 if rng.random() < 0.8 else rng.randrange(1, i) if i > 1 else 0)
        else:
            parents.append(-1 if rng.random() < 0.15 else rng.randrange(i))
    if kind == "single":
        parents = [-1]
    sources = []
    for _ in parents:
        n = rng.randint(1, max_len)
        sources.append([rng.randrange(ctx_rows) if rng.random() < p_ctx
                        else encode_vocab_source(rng.randrange(vocab)) for _ in range(n)])
    return build_forest_layout(parents, sources, 100_000)


FORESTS = [
    (0, "random", 14, 5),
    (1, "chain", 30, 3),    # ~60 visible keys per query near the leaf
    (2, "wide", 60, 4),     # root keys seen by ~150 queries
    (3, "single", 1, 9),
    (4, "random", 40, 6),
]


def qkv(T, H, D, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(T, H, D, generator=g, dtype=torch.float64).to(dtype) for _ in range(3)]


# --------------------------------------------------------------- assembly

def assembly_inputs(seed, W, dtype, kind="random"):
    lay = random_forest(seed, kind)
    g = torch.Generator().manual_seed(seed)
    R = int(lay.token_ctx_row.max().item()) + 3
    L = int(lay.token_position.max().item()) + 5
    ctx = torch.randn(R, W, generator=g, dtype=torch.float64).to(dtype)
    emb = torch.randn(64, W, generator=g, dtype=torch.float64).to(dtype)
    pos = torch.randn(L, W, generator=g, dtype=torch.float64).to(dtype)
    return lay, ctx, emb, pos


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seed,W", [(0, 8), (1, 33), (4, 512)])
def test_assemble_forward_matches_cpu(dtype, seed, W):
    lay, ctx, emb, pos = assembly_inputs(seed, W, dtype)
    idx = (lay.token_ctx_row, lay.token_vocab_id, lay.token_position)
    expected = torch.ops.hipro_fast.assemble_forest(ctx, emb, pos, *idx)
    out = torch.ops.hipro_fast.assemble_forest(dev(ctx), dev(emb), dev(pos), *map(dev, idx))
    assert out.device.type == DEVICE and out.dtype == dtype and out.shape == expected.shape
    # One rounding of an fp32 (fp64) sum: bitwise identical on both devices.
    torch.testing.assert_close(host(out), expected, rtol=0, atol=0)
    ref = reference.assemble_forest(dev(ctx), dev(emb), dev(pos), *map(dev, idx))
    torch.testing.assert_close(host(out), host(ref))


@pytest.mark.parametrize("dtype", DTYPES)
def test_assemble_backward_matches_cpu(dtype):
    lay, ctx, emb, pos = assembly_inputs(5, 40, dtype)
    crow = lay.token_ctx_row.clone()
    crow[: crow.numel() // 2] = torch.randint(0, 3, (crow.numel() // 2,))  # heavily repeated rows
    g = torch.Generator().manual_seed(7)
    grad = torch.randn(crow.numel(), 40, generator=g, dtype=torch.float64).to(dtype)
    R = ctx.shape[0]
    expected = torch.ops.hipro_fast.assemble_forest_backward(grad, crow, R)
    out = torch.ops.hipro_fast.assemble_forest_backward(dev(grad), dev(crow), R)
    assert out.dtype == dtype and out.shape == (R, 40)
    # Both devices walk the same token lists in the same order with the same
    # accumulation type (context_rows.h): bitwise equal, and the same run after run.
    torch.testing.assert_close(host(out), expected, rtol=0, atol=0)
    again = torch.ops.hipro_fast.assemble_forest_backward(dev(grad), dev(crow), R)
    assert torch.equal(again, out)
    truth = torch.zeros(R, 40, dtype=torch.float64).index_add_(
        0, crow[crow >= 0], grad.double()[crow >= 0])
    if dtype in LOW:
        assert max_err(out, truth) <= 2 * max_err(expected, truth) + EPS[dtype]
    else:
        torch.testing.assert_close(host(out).double(), truth, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_assemble_autograd_matches_cpu(dtype):
    lay, ctx, emb, pos = assembly_inputs(6, 24, dtype)
    idx = (lay.token_ctx_row, lay.token_vocab_id, lay.token_position)
    g = torch.Generator().manual_seed(8)
    w = torch.randn(lay.num_tokens, 24, generator=g, dtype=torch.float64).to(dtype)
    grads = []
    for device in ("cpu", DEVICE):
        c = ctx.detach().to(device).requires_grad_()  # a leaf on each device
        out = ops.assemble_forest(c, emb.to(device), pos.to(device), *(i.to(device) for i in idx))
        (out.float() * w.to(device).float()).sum().backward()
        grads.append(host(c.grad))
    assert_close_dtype(grads[1], grads[0], dtype, "ctx.grad")


# --------------------------------------------------------------- tree attention

def attention_case(seed, kind, segments, max_len, H, D, dtype):
    lay = random_forest(seed, kind, num_segments=segments, max_len=max_len)
    q, k, v = qkv(lay.num_tokens, H, D, dtype, seed)
    g = torch.Generator().manual_seed(seed + 100)
    grad_out = torch.randn(lay.num_tokens, H, D, generator=g, dtype=torch.float64).to(dtype)
    return lay, q, k, v, grad_out, D ** -0.5


def run_attention(lay, q, k, v, grad_out, scale, device):
    """Forward and backward of the raw ops on `device`; everything returned on the CPU."""
    st, ts = lay.segment_table.to(device), lay.token_segment.to(device)
    q, k, v, go = (t.to(device) for t in (q, k, v, grad_out))
    out, lse = torch.ops.hipro_fast.tree_attention(q, k, v, st, ts, scale)
    dq, dk, dv = torch.ops.hipro_fast.tree_attention_backward(go, q, k, v, out, lse, st, ts, scale)
    return [host(t) for t in (out, lse, dq, dk, dv)]


HEAD_SHAPES = [(1, 8), (2, 40), (3, 64), (8, 64), (2, 96), (1, 130), (2, 256)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("H,D", HEAD_SHAPES)
@pytest.mark.parametrize("seed,kind,segments,max_len", FORESTS)
def test_tree_attention_matches_cpu(dtype, H, D, seed, kind, segments, max_len):
    lay, q, k, v, go, scale = attention_case(seed, kind, segments, max_len, H, D, dtype)
    got = run_attention(lay, q, k, v, go, scale, DEVICE)
    want = run_attention(lay, q, k, v, go, scale, "cpu")
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert got[0].dtype == dtype and got[1].dtype == acc and got[1].shape == (lay.num_tokens, H)
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), got, want):
        assert_close_dtype(a, b, dtype, name)
    # And the plain-PyTorch reference (dense mask + SDPA), in fp64 on the CPU.
    truth = reference.tree_attention(q.double(), k.double(), v.double(), lay.segment_table,
                                     lay.token_segment, scale)
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    torch.testing.assert_close(got[0].double(), truth, rtol=tol, atol=tol)


def attention_truth(lay, q, k, v, go, scale):
    """fp64 forward/backward on the exact upcast inputs (the CPU op in fp64)."""
    return run_attention(lay, q.double(), k.double(), v.double(), go.double(), scale, "cpu")


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("H,D", [(2, 40), (8, 64), (1, 130), (2, 256)])
@pytest.mark.parametrize("seed,kind,segments,max_len", FORESTS)
def test_tree_attention_low_precision(dtype, H, D, seed, kind, segments, max_len):
    lay, q, k, v, go, scale = attention_case(seed, kind, segments, max_len, H, D, dtype)
    got = run_attention(lay, q, k, v, go, scale, DEVICE)
    same_prec = run_attention(lay, q, k, v, go, scale, "cpu")
    truth = attention_truth(lay, q, k, v, go, scale)
    assert got[0].dtype == dtype and got[1].dtype == torch.float32
    for name, a, r, t in zip(("out", "lse", "dq", "dk", "dv"), got, same_prec, truth):
        err, ref_err = max_err(a, t), max_err(r, t)
        assert err <= 2 * ref_err + EPS[dtype], (name, err, ref_err)
    # The SDPA reference in the same precision as a second baseline for the output.
    ref = reference.tree_attention(dev(q), dev(k), dev(v), dev(lay.segment_table),
                                   dev(lay.token_segment), scale)
    err, ref_err = max_err(got[0], truth[0]), max_err(ref, truth[0])
    assert err <= 2 * ref_err + EPS[dtype], ("out vs reference", err, ref_err)
    # lse is fp32 math on exactly representable inputs.
    torch.testing.assert_close(got[1].double(), truth[1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_tree_attention_autograd_matches_reference(dtype):
    """ops.tree_attention (registered autograd) on the device vs the fp64 reference."""
    lay, q, k, v, go, scale = attention_case(9, "wide", 30, 4, 3, 48, dtype)
    leaves = [dev(t).requires_grad_() for t in (q, k, v)]
    out = ops.tree_attention(*leaves, dev(lay.segment_table), dev(lay.token_segment), scale)
    out.backward(dev(go))
    ref_leaves = [t.detach().double().clone().requires_grad_() for t in (q, k, v)]
    ref = reference.tree_attention(*ref_leaves, lay.segment_table, lay.token_segment, scale)
    ref.backward(go.double())
    same = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    same_out = ops.tree_attention(*same, lay.segment_table, lay.token_segment, scale)  # CPU op
    same_out.backward(go)
    pairs = [("out", out, same_out, ref)] + [
        (n, a.grad, s.grad, r.grad) for n, a, s, r in zip("qkv", leaves, same, ref_leaves)]
    for name, a, s, r in pairs:
        if dtype in LOW:
            assert max_err(a, r) <= 2 * max_err(s, r) + EPS[dtype], name
        else:
            tol = 1e-5 if dtype == torch.float32 else 1e-10
            torch.testing.assert_close(host(a).double(), host(r).double(), rtol=tol, atol=tol,
                                       msg=lambda m: f"{name}: {m}")


# The segment-block decomposition (csrc/attention_blocks.h) splits the pairs
# between cuBLAS GEMM blocks and the residual kernels by process-wide knobs
# shared by both backends: every segment with descendants blocked, one block
# at a time or grouped (same-depth blocks gathered into one bmm; the CUDA
# default), the default split (grouped on CUDA, not on the CPU), and the
# residual kernels only. Mode -> (min_pairs, grouping); None: the default.
BLOCK_MODES = {"all_gemm": (0, "never"), "all_gemm_grouped": (0, "always"), "default": (None, None),
               "residual_only": (10**15, None)}


@pytest.fixture(params=list(BLOCK_MODES))
def block_mode(request):
    with attention_knobs(*BLOCK_MODES[request.param]):
        yield request.param


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seed,kind,segments,max_len", [FORESTS[1], FORESTS[2], FORESTS[4]])
def test_tree_attention_block_modes(dtype, seed, kind, segments, max_len, block_mode):
    """Each split on the device vs the CPU op in the same split (the same
    decomposition: equal up to accumulation order) and vs the fp64 truth."""
    H, D = 4, 64
    lay, q, k, v, go, scale = attention_case(seed, kind, segments, max_len, H, D, dtype)
    got = run_attention(lay, q, k, v, go, scale, DEVICE)
    want = run_attention(lay, q, k, v, go, scale, "cpu")
    truth = attention_truth(lay, q, k, v, go, scale)
    for name, a, b, t in zip(("out", "lse", "dq", "dk", "dv"), got, want, truth):
        if dtype in LOW:
            assert max_err(a, t) <= 2 * max_err(b, t) + EPS[dtype], (block_mode, name)
        else:
            assert_close_dtype(a, b, dtype, f"{block_mode} {name}")


@pytest.mark.skipif(DEVICE != "cuda", reason="CUDA graphs")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tree_attention_cuda_graph_capture(dtype):
    """After one eager call (which plans the blocks from a host copy of the
    table, cached), forward + backward capture into a CUDA graph -- no
    device->host copy or sync inside -- and the replay equals the eager call."""
    lay, q, k, v, go, scale = attention_case(2, "wide", 60, 4, 4, 64, dtype)
    st, ts = dev(lay.segment_table), dev(lay.token_segment)
    q, k, v, go = (dev(t) for t in (q, k, v, go))

    def step():
        out, lse = torch.ops.hipro_fast.tree_attention(q, k, v, st, ts, scale)
        return [out, lse, *torch.ops.hipro_fast.tree_attention_backward(go, q, k, v, out, lse, st, ts, scale)]

    eager = step()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static = step()
    graph.replay()
    torch.cuda.synchronize()
    # Bitwise only when cuBLAS is deterministic across streams (a fixed workspace,
    # as scripts/gpu_check.sh sets); otherwise the GEMMs may sum in another order.
    bitwise = os.environ.get("CUBLAS_WORKSPACE_CONFIG") in (":4096:8", ":16:8")
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), static, eager):
        if bitwise:
            assert torch.equal(a, b), name
        else:
            assert_close_dtype(a, b, dtype, name)


@pytest.mark.skipif(DEVICE != "cuda", reason="CUDA graphs")
def test_captured_graph_survives_the_plan_cache_evicting_its_plan():
    """A graph replays the plan's device tensors (block flags, group indices)
    after the plan cache has evicted its entry (more live tables than it keeps),
    and after the freed memory could be handed out again: the replay still
    equals the eager call (the plan is retained for graph replay)."""
    lay, q, k, v, go, scale = attention_case(2, "wide", 60, 4, 4, 64, torch.float32)
    st, ts = dev(lay.segment_table), dev(lay.token_segment)
    q, k, v = (dev(t) for t in (q, k, v))
    eager = torch.ops.hipro_fast.tree_attention(q, k, v, st, ts, scale)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.ops.hipro_fast.tree_attention(q, k, v, st, ts, scale)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static = torch.ops.hipro_fast.tree_attention(q, k, v, st, ts, scale)
    live = [st.clone() for _ in range(300)]  # more live tables than the cache keeps (256)
    for table in live:
        torch.ops.hipro_fast.tree_attention(q, k, v, table, ts, scale)
    scribble = [torch.full((4096,), 255, dtype=torch.uint8, device="cuda") for _ in range(64)]
    graph.replay()
    torch.cuda.synchronize()
    for name, a, b in zip(("out", "lse"), static, eager):
        assert_close_dtype(a, b, torch.float32, name)
    del scribble


@pytest.mark.skipif(DEVICE != "cuda", reason="FlexAttention has no CPU backward (tests/engine/test_flex.py: CPU forward)")
@pytest.mark.parametrize("dtype", [torch.float32])  # one compile; bf16 flex is checked by the benchmark
def test_flex_backend_matches_fused_op(dtype):
    """attention="flex" (compiled FlexAttention, tree mask_mod + block mask) on the
    device: forward and backward vs the fp64 reference (fp32: 1e-5; the bf16
    branch bounds it by twice the fused op's error plus eps)."""
    lay, q, k, v, go, scale = attention_case(4, "random", 40, 6, 4, 64, dtype)
    lay_d = lay.to(DEVICE)
    flex_leaves = [dev(t).requires_grad_() for t in (q, k, v)]
    out = FlexTreeAttention()(*flex_leaves, lay_d, scale)
    out.backward(dev(go))
    fused_leaves = [dev(t).requires_grad_() for t in (q, k, v)]
    fused = ops.tree_attention(*fused_leaves, lay_d.segment_table, lay_d.token_segment, scale)
    fused.backward(dev(go))
    ref_leaves = [t.detach().double().clone().requires_grad_() for t in (q, k, v)]
    ref = reference.tree_attention(*ref_leaves, lay.segment_table, lay.token_segment, scale)
    ref.backward(go.double())
    pairs = [("out", out, fused, ref)] + [
        (n, a.grad, f.grad, r.grad) for n, a, f, r in zip("qkv", flex_leaves, fused_leaves, ref_leaves)]
    for name, a, f, r in pairs:
        if dtype in LOW:
            assert max_err(a, r) <= 2 * max_err(f, r) + EPS[dtype], name
        else:
            torch.testing.assert_close(host(a).double(), host(r), rtol=1e-5, atol=1e-5,
                                       msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("seed,kind,segments,max_len", FORESTS[:3])
def test_tree_attention_row_strided_qkv(dtype, seed, kind, segments, max_len):
    """q, k, v as slices of one packed [T, 3, H, D] tensor (what TextTower passes):
    the residual kernels read them in place; the GEMM blocks hand cuBLAS the
    strided views, for which it may pick another algorithm than for the
    contiguous call, so the results agree to accumulation order (not bitwise)."""
    H, D = 4, 64
    lay, q, k, v, go, scale = attention_case(seed, kind, segments, max_len, H, D, dtype)
    packed = dev(torch.stack([q, k, v], dim=1))          # [T, 3, H, D]
    qs, ks, vs = packed.unbind(1)
    assert not qs.is_contiguous() and qs.stride(0) == 3 * H * D
    st, ts = dev(lay.segment_table), dev(lay.token_segment)
    out, lse = torch.ops.hipro_fast.tree_attention(qs, ks, vs, st, ts, scale)
    grads = torch.ops.hipro_fast.tree_attention_backward(dev(go), qs, ks, vs, out, lse, st, ts, scale)
    want = run_attention(lay, q, k, v, go, scale, DEVICE)
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), [out, lse, *grads], want):
        assert a.is_contiguous(), name
        assert_close_dtype(a, b, dtype, name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tree_attention_is_deterministic(dtype):
    lay, q, k, v, go, scale = attention_case(2, "wide", 60, 4, 4, 64, dtype)
    first = run_attention(lay, q, k, v, go, scale, DEVICE)
    for _ in range(3):
        again = run_attention(lay, q, k, v, go, scale, DEVICE)
        for a, b in zip(first, again):
            assert torch.equal(a, b)


def test_tree_attention_empty_forest():
    q = torch.empty(0, 2, 16, device=DEVICE)
    st = torch.empty(0, 4, dtype=torch.long, device=DEVICE)
    ts = torch.empty(0, dtype=torch.long, device=DEVICE)
    out, lse = torch.ops.hipro_fast.tree_attention(q, q, q, st, ts, 0.25)
    assert out.shape == (0, 2, 16) and lse.shape == (0, 2)
    dq, dk, dv = torch.ops.hipro_fast.tree_attention_backward(q, q, q, q, out, lse, st, ts, 0.25)
    assert dq.shape == dk.shape == dv.shape == (0, 2, 16)


@pytest.mark.skipif(DEVICE != "cuda", reason="CUDA-only argument checks")
def test_tree_attention_cuda_argument_checks():
    lay, q, k, v, go, scale = attention_case(0, "random", 8, 3, 2, 16, torch.float32)
    q, k, v = dev(q), dev(k), dev(v)
    with pytest.raises(RuntimeError, match="must be on"):  # index tensors left on the CPU
        torch.ops.hipro_fast.tree_attention(q, k, v, lay.segment_table, lay.token_segment, scale)
    with pytest.raises(RuntimeError, match="same shape"):
        torch.ops.hipro_fast.tree_attention(q, k[:-1], v, dev(lay.segment_table),
                                            dev(lay.token_segment), scale)
    with pytest.raises(RuntimeError, match="contiguous within a row"):
        qt = q.transpose(1, 2)
        torch.ops.hipro_fast.tree_attention(qt, qt, qt, dev(lay.segment_table), dev(lay.token_segment), scale)
    big = torch.randn(lay.num_tokens, 1, 300, device=DEVICE)
    with pytest.raises(RuntimeError, match="head dim"):
        torch.ops.hipro_fast.tree_attention(big, big, big, dev(lay.segment_table),
                                            dev(lay.token_segment), scale)
    # A malformed table on the device raises on the host (the block planner
    # validates its host copy), naming the row with integers in the message.
    bad = lay.segment_table.clone()
    bad[1, 2] = 5
    with pytest.raises(RuntimeError, match="segment 1 has parent 5 which is not earlier"):
        torch.ops.hipro_fast.tree_attention(q, k, v, dev(bad), dev(lay.token_segment), scale)


# --------------------------------------------------------------- EOS pooling

def pool_inputs(seed, T, P, W, E, dtype, duplicate_eos=False):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(T, W, generator=g, dtype=torch.float64) * 3 + 1).to(dtype)
    eos = torch.randperm(T, generator=g)[:P]
    if duplicate_eos:
        eos[-1] = eos[0]
    weight = torch.randn(W, generator=g, dtype=torch.float64).to(dtype)
    bias = torch.randn(W, generator=g, dtype=torch.float64).to(dtype)
    proj = (torch.randn(W, E, generator=g, dtype=torch.float64) / W ** 0.5).to(dtype)
    return x, eos, weight, bias, proj


POOL_SHAPES = [(20, 6, 8, 4, False), (50, 17, 48, 24, True), (90, 33, 512, 512, False),
               (40, 9, 300, 77, True)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,P,W,E,dup", POOL_SHAPES)
def test_pool_eos_matches_cpu(dtype, T, P, W, E, dup):
    x, eos, weight, bias, proj = pool_inputs(T + W, T, P, W, E, dtype, dup)
    eps = 1e-5
    want = torch.ops.hipro_fast.pool_eos(x, eos, weight, bias, proj, eps)
    got = torch.ops.hipro_fast.pool_eos(*map(dev, (x, eos, weight, bias, proj)), eps)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    for name, a, b in zip(("features", "x_hat", "rstd", "norm"), got, want):
        assert a.dtype == acc and a.shape == b.shape, name
        # fp32 math on identical (exactly upcast) inputs whatever the input dtype.
        assert_close_dtype(a, b, acc, name)
    truth = reference.pool_eos(x.double(), eos, weight.double(), bias.double(), proj.double(), eps)
    tol = 1e-5 if acc == torch.float32 else 1e-10
    torch.testing.assert_close(host(got[0]).double(), truth, rtol=tol, atol=tol)

    # Backward: the raw op, CUDA vs CPU, on the same saved tensors.
    g = torch.Generator().manual_seed(T)
    gf = torch.randn(P, E, generator=g, dtype=torch.float64).to(acc)
    want_dx = torch.ops.hipro_fast.pool_eos_backward(gf, *want, weight, proj, eos, T, dtype)
    got_dx = torch.ops.hipro_fast.pool_eos_backward(dev(gf), *got, dev(weight), dev(proj),
                                                    dev(eos), T, dtype)
    assert got_dx.dtype == dtype and got_dx.shape == (T, W)
    assert_close_dtype(got_dx, want_dx, dtype, "grad_x")
    # Rows that are no prompt's EOS get exactly zero.
    mask = torch.ones(T, dtype=torch.bool)
    mask[eos] = False
    assert (host(got_dx)[mask] == 0).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_pool_eos_autograd_matches_reference(dtype):
    T, P, W, E = 30, 11, 64, 32
    x, eos, weight, bias, proj = pool_inputs(3, T, P, W, E, dtype, duplicate_eos=True)
    g = torch.Generator().manual_seed(4)
    w = torch.randn(P, E, generator=g, dtype=torch.float64)
    xd = dev(x).requires_grad_()
    feats = ops.pool_eos(xd, dev(eos), dev(weight), dev(bias), dev(proj), 1e-5)
    (feats.double() * dev(w)).sum().backward()
    x64 = x.double().requires_grad_()
    ref = reference.pool_eos(x64, eos, weight.double(), bias.double(), proj.double(), 1e-5)
    (ref * w).sum().backward()
    if dtype in LOW:
        xs = x.clone().requires_grad_()
        same = ops.pool_eos(xs, eos, weight, bias, proj, 1e-5)  # CPU op, same precision
        (same.double() * w).sum().backward()
        assert max_err(xd.grad, x64.grad) <= 2 * max_err(xs.grad, x64.grad) + EPS[dtype]
    else:
        tol = 1e-5 if dtype == torch.float32 else 1e-10
        torch.testing.assert_close(host(xd.grad).double(), x64.grad, rtol=tol, atol=tol)


# --------------------------------------------------------------- opcheck

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck_tree_attention(dtype):
    lay, q, k, v, go, scale = attention_case(12, "random", 8, 4, 2, 40, dtype)
    st, ts = dev(lay.segment_table), dev(lay.token_segment)
    q, k, v = (dev(t).requires_grad_() for t in (q, k, v))
    torch.library.opcheck(torch.ops.hipro_fast.tree_attention.default, (q, k, v, st, ts, scale))
    with torch.no_grad():
        out, lse = torch.ops.hipro_fast.tree_attention(q, k, v, st, ts, scale)
    torch.library.opcheck(
        torch.ops.hipro_fast.tree_attention_backward.default,
        (dev(go), q.detach(), k.detach(), v.detach(), out, lse, st, ts, scale))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_opcheck_assemble(dtype):
    lay, ctx, emb, pos = assembly_inputs(3, 16, dtype)
    idx = tuple(map(dev, (lay.token_ctx_row, lay.token_vocab_id, lay.token_position)))
    torch.library.opcheck(torch.ops.hipro_fast.assemble_forest.default,
                          (dev(ctx).requires_grad_(), dev(emb), dev(pos), *idx))
    grad = torch.randn(lay.num_tokens, 16, device=DEVICE).to(dtype)
    torch.library.opcheck(torch.ops.hipro_fast.assemble_forest_backward.default,
                          (grad, idx[0], ctx.shape[0]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck_pool(dtype):
    x, eos, weight, bias, proj = pool_inputs(1, 12, 5, 40, 8, dtype)
    args = (dev(x).requires_grad_(), dev(eos), dev(weight), dev(bias), dev(proj), 1e-5)
    torch.library.opcheck(torch.ops.hipro_fast.pool_eos.default, args)
    with torch.no_grad():
        feats, x_hat, rstd, norm = torch.ops.hipro_fast.pool_eos(*args)
    gf = torch.randn_like(feats)
    torch.library.opcheck(
        torch.ops.hipro_fast.pool_eos_backward.default,
        (gf, feats, x_hat, rstd, norm, dev(weight), dev(proj), dev(eos), 12, dtype))
