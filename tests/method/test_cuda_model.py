"""The library end to end on a CUDA device: HiProModel's forest pass, its
gradients, autocast, fit() with bf16 / fp16 (GradScaler) and the exported
Classifier, each against the same computation on the CPU (which the CPU test
suite checks against open_clip's own full-length encoder).

Marked `gpu`; skips unless a CUDA device is visible and the extension was built
with CUDA. scripts/gpu_check.sh runs it.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import hipro_fast as hf
from tests import helpers_training as ht
from tests import oracle


def _ready() -> tuple[bool, str]:
    if not torch.cuda.is_available():
        return False, "no CUDA device"
    if not hf.build_info().get("cuda"):
        return False, f"extension built without CUDA: {hf.build_info()}"
    return True, ""


_READY, _WHY = _ready()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not _READY, reason=_WHY),
              pytest.mark.usefixtures("ieee_fp32_matmul")]

TASKS = {"a": ["dog", "cat"], "b": ["car", "bus", "bike"], "c": ["pizza", "golden retriever"]}
TREE = [["a", "b"], "c"]


def _cpu_and_cuda(clip_factory, combine, seed=3):
    tok = oracle.tokenizer()
    n_ctx = {"root": 3, "root/0": 2, "task/a": 4, "task/b": 1, "task/c": 2}
    cpu = hf.HiProModel(clip_factory(), TASKS, TREE, n_ctx=n_ctx, combine=combine, tokenizer=tok, seed=seed)
    gpu = hf.HiProModel(clip_factory(), TASKS, TREE, n_ctx=n_ctx, combine=combine, tokenizer=tok,
                        seed=seed).to("cuda")
    gpu.load_context_state(cpu.context_state())
    return cpu, gpu


def _own_tiny_model(seed=0):
    """A toy-problem model on its own tiny CLIP (ht.make_model shares one CLIP,
    which .to("cuda") would move under the other tests)."""
    clip = oracle.tiny_clip(width=64, heads=4, layers=2, quick_gelu=False)
    return hf.HiProModel(clip, ht.TASKS, ht.TREE, n_ctx=ht.N_CTX, tokenizer=oracle.tokenizer(), seed=seed)


def _loss(model, images):
    return sum((model.logits(t, images[t].to(model.tower.token_embedding.device)) ** 2).mean() * (i + 1)
               for i, t in enumerate(TASKS))


@pytest.mark.parametrize("combine", ["concat", "mean"])
@pytest.mark.parametrize("clip_name", ["tiny", "ViT-B-16"])
def test_features_and_context_grads_match_cpu(combine, clip_name):
    def factory():
        torch.manual_seed(0)
        if clip_name == "tiny":
            return oracle.tiny_clip(width=64, heads=4, layers=2, quick_gelu=False)
        return oracle.frozen_model("ViT-B-16")

    cpu, gpu = _cpu_and_cuda(factory, combine)
    assert gpu.tower.token_embedding.device.type == "cuda"
    embed = cpu.text_features()["a"].shape[1]
    g = torch.Generator().manual_seed(0)
    images = {t: F.normalize(torch.randn(5, embed, generator=g), dim=-1) for t in TASKS}

    feats_cpu, feats_gpu = cpu.text_features(), gpu.text_features()
    for t in TASKS:
        torch.testing.assert_close(feats_gpu[t].cpu(), feats_cpu[t].detach(), atol=2e-5, rtol=0)

    _loss(cpu, images).backward()
    _loss(gpu, images).backward()
    for node, p in cpu.ctx.items():
        ref = p.grad
        got = gpu.ctx[node].grad.cpu()
        scale = ref.abs().max().clamp_min(1e-12)
        assert (got - ref).abs().max() / scale < 1e-4, node


@pytest.mark.parametrize("amp_dtype", [torch.bfloat16, torch.float16])
def test_autocast_features_err_like_the_reference(amp_dtype, monkeypatch):
    """Under autocast the fused forest pass may err (vs fp32) at most twice as
    much as the PyTorch reference ops under the same autocast, plus an eps."""
    def factory():
        torch.manual_seed(0)
        return oracle.frozen_model("ViT-B-16")

    _, gpu = _cpu_and_cuda(factory, "concat")
    truth = {t: f.double() for t, f in gpu.text_features().items()}

    def under_autocast():
        with torch.autocast("cuda", dtype=amp_dtype):
            return {t: f.double() for t, f in gpu.text_features().items()}

    fused = under_autocast()
    monkeypatch.setenv("HIPRO_FAST_REFERENCE", "1")
    ref = under_autocast()
    eps = {torch.bfloat16: 2.0 ** -9, torch.float16: 2.0 ** -11}[amp_dtype]
    for t in TASKS:
        err_fused = (fused[t] - truth[t]).abs().max().item()
        err_ref = (ref[t] - truth[t]).abs().max().item()
        assert err_fused <= 2 * err_ref + eps, (t, err_fused, err_ref)


@pytest.mark.parametrize("amp", [None, "bf16", "fp16"])
def test_fit_on_cuda_learns_and_matches_cpu_without_amp(amp):
    train, val = ht.toy_data(seed=1), ht.toy_data(seed=2, noise=1.0)
    # 100 steps (not the default budget's 800): long enough to learn, short enough
    # that the fp32 CUDA and CPU trajectories stay within 1e-4 and the test fits gpu_check.sh
    cfg = dict(epochs=4, warmup_epochs=1, optimizer="adamw", batch_size=8, lr=0.05, seed=0, steps_per_epoch=25)
    model = _own_tiny_model().to("cuda")
    before = hf.evaluate(model, val)
    result = hf.fit(model, train, val, amp=amp, **cfg)
    losses = [h["loss"] for h in result.history]
    assert all(torch.isfinite(torch.tensor(losses))), losses
    assert losses[-1] < losses[0], losses
    assert all(v.device.type == "cuda" for v in result.final_state.values())  # trained where the model lives
    after = hf.evaluate(model, val)
    assert sum(after.values()) >= sum(before.values()) - 1e-9, (before, after)
    if amp is None:
        cpu_model = _own_tiny_model()
        cpu_result = hf.fit(cpu_model, train, val, **cfg)
        for node, v in cpu_result.final_state.items():
            torch.testing.assert_close(result.final_state[node].cpu(), v.cpu(), atol=1e-4, rtol=1e-4)


class _Crash(Exception):
    pass


def test_fp16_resume_restores_the_grad_scaler(tmp_path):
    """fp16 autocast trains with a GradScaler whose state (loss scale, growth
    tracker) the checkpoint keeps: a run that crashes in epoch 2 and resumes
    continues from the saved scaler and ends where the uninterrupted run ends
    (scaler state equal; contexts within the rounding of the CUDA assembly
    backward's atomic adds)."""
    train, val = ht.toy_data(seed=1), ht.toy_data(seed=2, noise=1.0)
    run = dict(epochs=4, optimizer="adamw", batch_size=8, steps_per_epoch=5, lr=0.05, seed=0, amp="fp16")
    ref = hf.fit(_own_tiny_model().to("cuda"), train, val, checkpoint_dir=str(tmp_path / "ref"), **run)

    def crash(info):
        if info["epoch"] == 2 and info["step"] == 1:
            raise _Crash

    with pytest.raises(_Crash):
        hf.fit(_own_tiny_model().to("cuda"), train, val, checkpoint_dir=str(tmp_path / "run"), callback=crash, **run)
    saved = hf.load_checkpoint(tmp_path / "run")
    assert saved.epoch == 1 and saved.extra["scaler"]["scale"] > 0
    res = hf.fit(_own_tiny_model().to("cuda"), train, val, checkpoint_dir=str(tmp_path / "run"), resume=True, **run)
    assert hf.load_checkpoint(tmp_path / "run").extra["scaler"] == hf.load_checkpoint(tmp_path / "ref").extra["scaler"]
    assert res.best_epoch == ref.best_epoch
    for node, v in ref.final_state.items():
        torch.testing.assert_close(res.final_state[node], v, atol=1e-5, rtol=1e-5)


def test_exported_classifier_scores_on_cuda(tmp_path):
    model = _own_tiny_model().to("cuda")
    path = tmp_path / "clf.safetensors"
    hf.export_classifier(model, path)
    clf = hf.Classifier.load(path, device="cuda")
    x = F.normalize(torch.randn(7, 24, device="cuda"), dim=-1)
    for task in ht.TASKS:
        with torch.no_grad():
            expected = model.logits(task, x)
        got = clf.logits(task, x)
        assert got.device.type == "cuda"
        torch.testing.assert_close(got, expected)
