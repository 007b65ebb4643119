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
