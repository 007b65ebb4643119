"""The CPU tree attention is deterministic across thread counts (README: the
backward computes dK/dV key-centrically with no atomics and merges partial
softmax statistics in a fixed order): 1 and 2 intra-op threads give bitwise
identical outputs and gradients, on the default GEMM/scalar split and with
every segment on the GEMM path."""
import pytest
import torch

from hipro_fast import ops
from hipro_fast.ops.extension import _C
from tests.ops.test_ops import block_mode, qkv, random_layout

pytestmark = pytest.mark.skipif(_C is None, reason="compiled extension missing")


def _run(lay, q, k, v, go, threads):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        assert torch.get_num_threads() == threads
        qs, ks, vs = (t.detach().clone().requires_grad_() for t in (q, k, v))
        out = ops.tree_attention(qs, ks, vs, lay.segment_table, lay.token_segment, 0.125)
        out.backward(go)
        return [out.detach(), qs.grad, ks.grad, vs.grad]
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("mode", ["default", "all_gemm", "all_gemm_grouped"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tree_attention_bitwise_identical_on_1_and_2_threads(mode, dtype):
    # 60 segments of up to 16 tokens (~500 tokens): enough work per op for 2 threads to split it
    lay, _ = random_layout(31, 60, 16)
    q, k, v = qkv(lay.num_tokens, 4, 64, dtype, seed=2)
    go = torch.randn(q.shape, generator=torch.Generator().manual_seed(3)).to(dtype)
    with block_mode(mode):
        one = _run(lay, q, k, v, go, 1)
        two = _run(lay, q, k, v, go, 2)
    for name, a, b in zip(("out", "dq", "dk", "dv"), one, two):
        assert torch.equal(a, b), f"{name} differs between 1 and 2 threads"
    assert one[2].abs().sum() > 0  # gradients were computed (the check is not on zeros)
