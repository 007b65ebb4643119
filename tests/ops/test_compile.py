"""The fused ops trace through torch.compile (fake + autograd registrations)."""
import pytest
import torch

import hipro_fast as hf
from hipro_fast.ops.extension import _C

pytestmark = pytest.mark.skipif(_C is None, reason="compiled extension missing")


def test_forest_pass_under_torch_compile(tiny_models, tokenizer):
    tiny = tiny_models["w64_h4_l2_gelu"]
    model = hf.HiProModel(tiny, {"a": ["dog", "cat"], "b": ["car"]}, [["a", "b"]], n_ctx=3, tokenizer=tokenizer)
    forest = model.encoder.forest
    table = model.encoder.context_table(model.ctx)

    def step(ctx_table):
        return model.tower.encode_layout(forest.layout, forest.eos_index, ctx_table)

    eager = step(table)
    (g_eager,) = torch.autograd.grad(eager.sum(), table)
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    out = compiled(table)
    (g_comp,) = torch.autograd.grad(out.sum(), table)
    torch.testing.assert_close(out, eager)
    torch.testing.assert_close(g_comp, g_eager)


def test_a_new_context_table_size_or_token_count_does_not_recompile():
    """The backward ops take the table's row count and the token count as SymInt
    (an `int` there pinned the traced sizes: one recompile per size under
    torch.compile(dynamic=True))."""
    from torch._dynamo.testing import CompileCounterWithBackend

    W = 8
    emb, pos = torch.randn(50, W), torch.randn(20, W)
    ln_w, ln_b, proj = torch.ones(W), torch.zeros(W), torch.randn(W, 4)

    def step(table, rows, vocab, positions, eos):
        x = torch.ops.hipro_fast.assemble_forest(table, emb, pos, rows, vocab, positions)
        feats = torch.ops.hipro_fast.pool_eos(x, eos, ln_w, ln_b, proj, 1e-5)[0]
        return feats.square().sum()

    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(step, backend=counter, dynamic=True)
    torch._dynamo.reset()
    for R, T in ((5, 9), (6, 11), (7, 13)):
        table = torch.randn(R, W, requires_grad=True)
        rows = torch.arange(T) % (R + 1) - 1          # -1: a vocabulary token
        vocab, positions = torch.arange(T) % 50, torch.arange(T) % 20
        eos = torch.tensor([T - 1, T // 2])
        compiled(table, rows, vocab, positions, eos).backward()
        expected = torch.autograd.grad(step(table, rows, vocab, positions, eos), table)[0]
        torch.testing.assert_close(table.grad, expected)
    assert counter.frame_count == 1
