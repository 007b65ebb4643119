import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from tests import oracle  # noqa: E402


@pytest.fixture(params=["fused", "reference"])
def backend(request, monkeypatch):
    """Runs a test against the compiled ops and against the PyTorch fallback."""
    if request.param == "reference":
        monkeypatch.setenv("HIPRO_FAST_REFERENCE", "1")
    else:
        import hipro_fast

        if not hipro_fast.build_info()["cpu"]:
            pytest.fail(f"compiled extension missing: {hipro_fast.build_info()}")
        monkeypatch.delenv("HIPRO_FAST_REFERENCE", raising=False)
    return request.param


@pytest.fixture(scope="module")
def one_thread():
    """Tiny towers' ops are too small for intra-op threads: on a shared 2-core
    machine 1 thread is several times faster. Restored after the module; a
    module opts in with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def ieee_fp32_matmul():
    """fp32 GEMMs in IEEE fp32 (no TF32 on GPUs), for the fp32 tolerances."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision(before)


@pytest.fixture(scope="session")
def tokenizer():
    return oracle.tokenizer()


@pytest.fixture(scope="session")
def vit_b16():
    torch.manual_seed(0)
    # generic LayerNorms and projection: at init (1 / 0) LayerNorm-backward terms vanish
    return oracle.perturb_norms_and_projection(oracle.frozen_model("ViT-B-16"))


@pytest.fixture(scope="session")
def tiny_models():
    return {name: oracle.tiny_clip(**cfg) for name, cfg in oracle.TINY_CONFIGS.items()}
