"""Toy multi-task problems on a tiny random text tower, for the training,
checkpoint, baseline and export tests; also a script (`python
tests/helpers_training.py ...`) that trains in a subprocess for the
kill-and-resume tests."""
from __future__ import annotations

import copy
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

import hipro_fast  # noqa: E402
from tests import oracle  # noqa: E402

TASKS = {
    "animals": ["cat", "dog", "bird", "fish"],
    "vehicles": ["car", "bus", "train", "plane"],
    "colors": ["red", "green", "blue"],
}
TREE = [["animals", "vehicles"], "colors"]
N_CTX = 2

_CLIP = None
_TOK = None


def tiny_clip():
    """The shared tiny random CLIP (width 64, 2 layers, embed_dim 24) and tokenizer."""
    global _CLIP, _TOK
    if _CLIP is None:
        _CLIP = oracle.tiny_clip(width=64, heads=4, layers=2, quick_gelu=False)
        _TOK = oracle.tokenizer()
    return _CLIP, _TOK


def make_model(tree=TREE, n_ctx=N_CTX, seed=0, tasks=TASKS, **kw):
    clip, tok = tiny_clip()
    return hipro_fast.HiProModel(clip, tasks, tree, n_ctx=n_ctx, tokenizer=tok, seed=seed, **kw)


def private_model(tree=TREE, n_ctx=N_CTX, seed=0, tasks=TASKS, **kw):
    """make_model() on a private copy of the tiny CLIP: `fit(..., device="cuda")`
    moves a model's CLIP in place, which must not move the shared one under
    the tests that follow (nor the CPU side of a CUDA-vs-CPU comparison)."""
    clip, tok = tiny_clip()
    return hipro_fast.HiProModel(copy.deepcopy(clip), tasks, tree, n_ctx=n_ctx, tokenizer=tok, seed=seed, **kw)


def few_shot_pool(per_class=12, seed=0):
    """task -> (features, labels): `per_class` random unit features per class
    (a pool for the protocol's few-shot draws)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for t, classes in TASKS.items():
        y = torch.arange(len(classes)).repeat_interleave(per_class)
        x = torch.nn.functional.normalize(torch.randn(y.numel(), 24, generator=g), dim=-1)
        out[t] = (x, y)
    return out


def toy_data(sizes=None, noise=0.5, seed=0, teacher_seed=123, tasks=TASKS):
    """task -> (features, labels): noisy copies of a hidden teacher's class text
    features (so the problem is learnable by contexts). `noise` is in units of
    the task's RMS class spread; sizes: task -> number of samples."""
    teacher = make_model(tree=list(tasks), n_ctx=4, seed=teacher_seed, tasks=tasks)
    with torch.no_grad():
        feats = teacher.text_features()
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i, (task, classes) in enumerate(tasks.items()):
        n = (sizes or {}).get(task, 12 + 4 * i)
        f = feats[task]
        spread = (f - f.mean(0)).pow(2).sum(1).mean().sqrt()
        y = torch.arange(n) % len(classes)
        y = y[torch.randperm(n, generator=g)]
        e = torch.randn(n, f.shape[1], generator=g) / f.shape[1] ** 0.5
        x = F.normalize(f[y] + noise * spread * e, dim=-1)
        out[task] = (x, y)
    return out


# Fixture shared by the training, checkpoint and baseline tests (imported there).
@pytest.fixture(scope="module")
def data():
    return toy_data(seed=1), toy_data(seed=2, noise=1.0)


# ------------------------------------------------------------------ subprocess script
def _script(argv: list[str]) -> None:
    """--dir D --out O [--resume] [--kill-at E,S] [--epochs N]

    Trains the toy problem (seeded) with a checkpoint per epoch and writes the
    final/best contexts and the history to O. --kill-at: right after optimiser
    step S of epoch E the process SIGKILLs itself: a real kill at a known point
    (mid-epoch, after the checkpoint of epoch E-1), with no timing involved.
    """
    import argparse
    import json
    import signal

    torch.set_num_threads(1)
    p = argparse.ArgumentParser()
    p.add_argument("--dir")
    p.add_argument("--out")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--kill-at")
    p.add_argument("--epochs", type=int, default=6)
    a = p.parse_args(argv)

    from hipro_fast.method.training import fit

    target = tuple(int(v) for v in a.kill_at.split(",")) if a.kill_at else None

    def callback(info):
        if target == (info["epoch"], info["step"]):
            os.kill(os.getpid(), signal.SIGKILL)

    model = make_model()
    train = toy_data(seed=1)
    val = toy_data(seed=2, noise=1.0)
    res = fit(model, train, val, epochs=a.epochs, optimizer="adamw", batch_size=4, steps_per_epoch=3, lr=0.05, seed=7,
              checkpoint_dir=a.dir, resume=a.resume, callback=callback)
    from safetensors.torch import save_file

    tensors = {f"final/{k}": v for k, v in res.final_state.items()}
    tensors.update({f"best/{k}": v for k, v in res.best_state.items()})
    tensors.update({f"model/{k}": v.detach() for k, v in model.ctx.items()})
    hist = [{k: v for k, v in h.items() if k != "seconds"} for h in res.history]
    save_file(tensors, a.out, metadata={"history": json.dumps(hist), "best_epoch": str(res.best_epoch)})


if __name__ == "__main__":
    _script(sys.argv[1:])
