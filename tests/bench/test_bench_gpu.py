"""hipro_fast.bench.gpu on the CPU (`--device cpu`, tiny tower): the GPU
benchmark's harness runs end to end, the forest matches the naive CoOp-style
step it is timed against, and the FLOP/speedup bookkeeping is consistent."""
import json

import torch

from hipro_fast.bench import gpu as bench_gpu


def test_bench_gpu_harness_on_cpu(tmp_path):
    path = tmp_path / "gpu.json"
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert bench_gpu.main(["--device", "cpu", "--model", "tiny", "--problems", "a", "--precisions", "fp32",
                               "--repeats", "1", "--warmup", "0", "--n-ctx", "4", "--json", str(path)]) == 0
    finally:
        torch.set_num_threads(n)
    out = json.loads(path.read_text())
    (res,) = out["results"]
    assert res["verify_naive"]["feature_max_abs_diff"] < 1e-5
    assert res["verify_naive"]["ctx_grad_rel_diff"] < 1e-4
    assert res["verify_naive"]["prompts_compared"] == res["prompts"] > 0
    methods = res["methods"]
    assert set(methods) == {"forest", "naive", "truncated"}
    forest = methods["forest"]
    for name in ("naive", "truncated"):
        e = methods[name]
        assert e["tokens"] > forest["tokens"]
        assert abs(e["speedup"] - e["time_ms"] / forest["time_ms"]) < 1e-9
        assert abs(e["ideal_speedup"] - e["flops"] / forest["flops"]) < 1e-9
    assert res["gemm_gflops"] > 0
