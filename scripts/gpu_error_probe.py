"""Calls each CUDA op with one bad argument, each case in its own subprocess,
and reports whether it raised the expected RuntimeError or crashed the process.
A crash of a bad-argument call is a bug (the host checks must raise first); the
probe isolates which op and which check. Run on a GPU machine:

    python scripts/gpu_error_probe.py            # all cases
    python scripts/gpu_error_probe.py CASE       # one case, in this process
"""
from __future__ import annotations

import os
import subprocess
import sys

CASE_TIMEOUT_S = 20  # one case: a torch import, a CUDA start and one call; the stage has ~60-90 s for all 7

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _tensors():
    import torch

    from hipro_fast.engine.layout import build_forest_layout, encode_vocab_source

    lay = build_forest_layout([-1, 0, 0], [[0, 1], [encode_vocab_source(3)], [2, 3]], 100)
    T = lay.num_tokens
    q = torch.randn(T, 2, 16, device="cuda")
    return torch, lay, q


def case_attention_cpu_index():
    torch, lay, q = _tensors()
    torch.ops.hipro_fast.tree_attention(q, q, q, lay.segment_table, lay.token_segment, 0.25)


def case_attention_shape():
    torch, lay, q = _tensors()
    torch.ops.hipro_fast.tree_attention(q, q[:-1], q, lay.segment_table.cuda(), lay.token_segment.cuda(), 0.25)


def case_attention_bad_table():
    # A malformed table on the device: the block planner checks its host copy
    # and raises with integers in the message (the formatting that once crashed).
    torch, lay, q = _tensors()
    table = lay.segment_table.clone()
    table[1, 2] = 2  # parent not earlier in preorder
    torch.ops.hipro_fast.tree_attention(q, q, q, table.cuda(), lay.token_segment.cuda(), 0.25)


def case_attention_ok():
    torch, lay, q = _tensors()
    out, _ = torch.ops.hipro_fast.tree_attention(q, q, q, lay.segment_table.cuda(), lay.token_segment.cuda(), 0.25)
    torch.cuda.synchronize()
    raise RuntimeError(f"(no error expected) ok, out {tuple(out.shape)}")


def case_assemble_cpu_index():
    torch, lay, q = _tensors()
    ctx = torch.randn(4, 8, device="cuda")
    emb = torch.randn(10, 8, device="cuda")
    pos = torch.randn(8, 8, device="cuda")
    torch.ops.hipro_fast.assemble_forest(ctx, emb, pos, lay.token_ctx_row, lay.token_vocab_id.cuda(),
                                         lay.token_position.cuda())


def case_pool_cpu_index():
    import torch

    x = torch.randn(5, 8, device="cuda")
    w = torch.ones(8, device="cuda")
    torch.ops.hipro_fast.pool_eos(x, torch.tensor([1, 4]), w, w, torch.randn(8, 4, device="cuda"), 1e-5)


def case_torch_check_from_python():
    import torch

    torch.zeros(2, device="cuda") + torch.zeros(3, device="cuda")


CASES = {n[5:]: f for n, f in globals().items() if n.startswith("case_")}


def run_one(name: str) -> None:
    import torch  # noqa: F401

    import hipro_fast  # noqa: F401  (registers the ops)

    try:
        CASES[name]()
    except RuntimeError as exc:
        print(f"{name}: RuntimeError: {str(exc).splitlines()[0][:160]}")
        return
    print(f"{name}: no error raised")


def main() -> int:
    if len(sys.argv) > 1:
        run_one(sys.argv[1])
        return 0
    crashed = 0
    for name in CASES:
        try:
            p = subprocess.run([sys.executable, __file__, name], capture_output=True, text=True,
                               timeout=CASE_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            crashed += 1
            print(f"{name}: HUNG (no answer in {CASE_TIMEOUT_S} s)", flush=True)
            continue
        line = (p.stdout.strip().splitlines() or [""])[-1]
        if p.returncode != 0:
            crashed += 1
            tail = " | ".join(p.stderr.strip().splitlines()[-3:])
            print(f"{name}: CRASHED rc={p.returncode} {line} {tail[:300]}", flush=True)
        else:
            print(line, flush=True)
    return 1 if crashed else 0


if __name__ == "__main__":
    raise SystemExit(main())
