"""``hipro``: from image folders to a trained HiPro model.

    hipro cache    --spec tasks.toml          encode + cache image features
    hipro affinity --spec tasks.toml          task-affinity matrix + heatmap
    hipro tree     --spec tasks.toml          task tree from the affinity + dendrogram
    hipro train    --spec tasks.toml          train HiPro, evaluate, checkpoint
    hipro eval     --spec tasks.toml --checkpoint ckpt
    hipro compare  --spec tasks.toml          HiPro vs. baselines table
    hipro export   --checkpoint ckpt --out classifier.safetensors
    hipro predict  --classifier classifier.safetensors --task T images/   top-k classes to CSV
    hipro bench    [bench options]            text-engine benchmark (hipro_fast.bench.cpu;
                                              with --device cuda: hipro_fast.bench.gpu)
    hipro demo                                all of the above on the bundled benchmark

Every command writes a run directory (``--run-dir``, default
``runs/<timestamp>-<command>``) holding config.json (the resolved
configuration), metrics.jsonl, checkpoints/, PNG figures and report.md. An
existing non-empty run directory is refused (and left untouched) unless
``--overwrite`` (delete its contents, start over) or, for train and compare,
``--resume`` (continue from its last checkpoint; the result equals an
uninterrupted run) is given. Numeric options are checked before anything loads.
Failures exit non-zero with one line ``hipro: error: <reason>`` (``--debug``
shows the traceback).

Several processes: ``torchrun --nproc-per-node N -m hipro_fast.cli train ...``
(or ``hipro train ... --nproc N`` on one machine) runs cache, train, eval,
compare, affinity and tree in a process group (hipro_fast.distributed); only
rank 0 writes the run directory and prints.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import signal
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Sequence

from .app import pipeline, plots, report
from .bench import gpu as bench_gpu
from .bench import cpu as bench
from .data.feature_cache import default_cache_dir
from .distributed import group as dist_group
from .distributed.launch import run_under_torchrun, without_option
from .data.tasks_spec import load_spec
from .data.image_paths import find_images
from .app.predict import predict_images
from .files import atomic_write_text
from .engine.prompt_forest import COMBINE_MODES, DEFAULT_COMBINE
from .engine.text_tower import ATTENTION_BACKENDS
from .errors import CliError, ForestError, HiproError, InvalidInputError, MissingFileError
from .method import affinity as aff
from .method import baselines, export, selection
from .method.grouping import LINKAGES
from .method.training import FULL_BATCH, OPTIMIZERS, TrainConfig
from .method.baselines import DEFAULT_HIPRO_OPTIONS, DEFAULT_PROTOCOL_SELECT, DEFAULT_SELECT_BY, SELECT_CRITERIA
from .method.model import PATH_WEIGHTS, validate_tasks
from .method.protocol import PARALLEL_MODES, check_shot_counts, val_shots_for
from .usage import OneLineUsageParser, float_above
from .usage import finite_float as _float
from .usage import int_at_least as _int_at_least

__all__ = ["main", "build_parser", "DEMO_DEFAULTS"]

# Demo settings: small enough for a few minutes on 2 CPU cores with hipro-tiny-clip.
DEMO_DEFAULTS = {"shots": [1, 4, 16], "seeds": [0, 1, 2], "epochs": 50, "n_ctx": 4, "affinity_steps": 30}
DEFAULT_N_CTX = 16  # HiProModel's and compare()'s default
# The affinity step keeps its own default rather than following --n-ctx: on the bundled benchmark (seed 0,
# 16 shots, the demo's 30 steps) 16 tokens give the grouped tree the README shows, 4 tokens a flat one.
AFFINITY_N_CTX = aff.DEFAULTS[aff.DEFAULT_METHOD]["n_ctx"]
MAX_SEED = 2**32 - 1


# ------------------------------------------------------------------ option values
# Every numeric option is checked by the parser, before any model is loaded:
# a bad value is a usage error (exit 2) that names the option.
_positive_float = float_above(0)


def _comma_items(text: str, what: str) -> list[str]:
    """The entries of a comma list; an empty entry ("1,,2", "0,") is refused, not skipped."""
    items = [x.strip() for x in text.split(",")]
    if any(not x for x in items) and any(items):
        raise argparse.ArgumentTypeError(f"{text!r}: an empty entry in the comma list of {what}")
    return [x for x in items if x]


def _seed_list(text: str) -> list[int]:
    parse = _int_at_least(0, MAX_SEED)
    items = _comma_items(text, "seeds")
    if not items:
        raise argparse.ArgumentTypeError(f"expected a comma list of seeds, e.g. 0,1,2, got {text!r}")
    try:
        seeds = [parse(x) for x in items]
    except argparse.ArgumentTypeError as e:
        raise argparse.ArgumentTypeError(f"{text!r}: {e}") from None
    if len(set(seeds)) != len(seeds):  # a repeated draw would fake a spread over seeds
        raise argparse.ArgumentTypeError(f"{text!r}: a seed is repeated")
    return seeds


def _shot_list(text: str) -> list[int]:
    """--shots of compare/demo: a comma list of shot counts >= 1 (the protocol's
    grid, e.g. 1,2,4,8,16), or 0 alone (the whole training split, spec splits)."""
    items = _comma_items(text, "shot counts")
    if not items:
        raise argparse.ArgumentTypeError(f"expected a comma list of shot counts, e.g. 1,2,4, got {text!r}")
    try:
        shots = [_int_at_least(0)(x) for x in items]
    except argparse.ArgumentTypeError as e:
        raise argparse.ArgumentTypeError(f"{text!r}: {e}") from None
    if 0 in shots and shots != [0]:
        raise argparse.ArgumentTypeError(f"{text!r}: 0 (the whole training split) cannot be combined with shot counts")
    if len(set(shots)) != len(shots):
        raise argparse.ArgumentTypeError(f"{text!r}: a shot count is repeated")
    return shots


def _single_shots(shots: int | list[int]) -> int:
    """The one shot count of a command that is not on the protocol's grid."""
    return shots[0] if isinstance(shots, list) else shots


def _unit_interval(text: str) -> float:
    value = _float(text)
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1), got {text!r}")
    return value


def _nonneg_float(text: str) -> float:
    value = _float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text!r}")
    return value


def _method_list(text: str) -> str:
    names = _comma_items(text, "methods")
    bad = [m for m in names if m not in baselines.METHODS]
    if not names or bad:
        what = f"unknown method {bad[0]!r}" if bad else "no method given"
        raise argparse.ArgumentTypeError(f"{what} (methods: {', '.join(baselines.METHODS)})")
    if len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"{text!r}: a method is repeated")
    return ",".join(names)


def _tree_arg(text: str) -> str:
    """--tree: a value starting with "[" or "{" is inline JSON (checked here, never tried as a path)."""
    if text.lstrip().startswith(("[", "{")):
        try:
            json.loads(text)
        except json.JSONDecodeError as e:
            raise argparse.ArgumentTypeError(f"invalid JSON tree ({e.msg} at character {e.pos})") from None
    return text


_SEED = _int_at_least(0, MAX_SEED)
_NONNEG = _int_at_least(0)
_POSITIVE = _int_at_least(1)


def _train_batch_arg(text: str) -> int | str:
    """A positive integer or "full" (TrainConfig's full batch)."""
    if text == FULL_BATCH:
        return FULL_BATCH
    try:
        return _POSITIVE(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1 or {FULL_BATCH!r}, got {text!r}") from None


# ------------------------------------------------------------------ parser
def _common(p: argparse.ArgumentParser, spec: bool = True, data: bool = True, resumable: bool = False,
            shot_grid: bool = False) -> None:
    g = p.add_argument_group("common options")
    if spec:
        g.add_argument("--spec", help="multi-task spec (TOML); see hipro_fast.data.tasks_spec")
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: cuda when available)")
    g.add_argument("--seed", type=_SEED, default=0,
                   help=f"seed of the few-shot draw, splits and initialisation (0..{MAX_SEED})")
    if data:
        if shot_grid:
            g.add_argument("--shots", type=_shot_list, default=[16],
                           help="comma list of K (training images per class), e.g. 1,2,4,8,16: every (K, seed) "
                                "draws its own K-shot training split and a min(K, 4)-shot validation split "
                                "(from the spec's val split, else from the remaining training images: CoOp's "
                                "protocol); 0 = the whole training split and the spec's val split")
        else:
            g.add_argument("--shots", type=_NONNEG, default=16,
                           help="K training images per class (1/2/4/8/16; 0 = the whole training split)")
        g.add_argument("--skip-bad-images", action="store_true",
                       help="skip (and count) images that cannot be decoded instead of failing")
        g.add_argument("--aug-views", type=_NONNEG, default=0,
                       help="K augmented views per training image (random resized crop + flip), each "
                            "used as a training sample; 0 = plain features")
        g.add_argument("--batch-size", type=_POSITIVE, default=128, help="images per encoding batch")
        g.add_argument("--workers", type=_NONNEG, default=None, help="data-loading workers (default: 0 on CPU)")
    g.add_argument("--model", default="hipro-tiny-clip", help="open_clip model name (default: hipro-tiny-clip)")
    g.add_argument("--pretrained", default=None, help="weights file (.pt/.safetensors) or open_clip tag")
    g.add_argument("--model-config", default=None,
                   help="open_clip model config JSON to register (its file stem becomes the model name)")
    g.add_argument("--run-dir", default=None,
                   help="output folder (default: runs/<timestamp>-<command>); an existing non-empty one is "
                        "refused unless --overwrite (or, for train and compare, --resume) is given")
    again = g.add_mutually_exclusive_group()
    again.add_argument("--overwrite", action="store_true",
                       help="delete the contents of an existing --run-dir (a previous hipro run) and start over")
    if resumable:
        again.add_argument("--resume", action="store_true",
                           help="continue the run in --run-dir from its last checkpoint (same options; the result "
                                "equals an uninterrupted run); an absent or empty --run-dir starts a new run")
    g.add_argument("--cache-dir", default=None,
                   help="feature cache folder (default: $HIPRO_CACHE_DIR or ~/.cache/hipro_fast)")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    g.add_argument("--debug", action="store_true", help="show tracebacks")
    g.add_argument("--nproc", type=_POSITIVE, default=None,
                   help="run the command in N processes on this machine (wraps torchrun --standalone; gloo on "
                        "CPU, nccl with one GPU per process); several machines: call torchrun yourself")
    g.add_argument("--dist-timeout", type=_positive_float, default=dist_group.DEFAULT_TIMEOUT_S,
                   help="seconds a process waits for a peer (start-up and every collective) before the job "
                        f"fails naming it (default {dist_group.DEFAULT_TIMEOUT_S:g})")


def _parallel_opt(p: argparse.ArgumentParser) -> None:
    p.add_argument("--parallel", choices=list(PARALLEL_MODES), default=PARALLEL_MODES[0],
                   help="with --nproc (or torchrun) on the --shots grid: draws (default): each process trains "
                        "whole (shots, seed) draws alone, round-robin (scales with the processes while they are "
                        "no more than the draws); classes: every draw on all processes, the prompt forest "
                        "sharded by class (for label spaces too large for one device)")


GIVEN = "given_options"  # the namespace attribute listing the options typed on the command line


class _Given(argparse.Action):
    """Stores the value and notes that the option was given: whether an option
    that does nothing in the chosen combination is worth a warning depends on
    the user having typed it, not on its default."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        given = set(getattr(namespace, GIVEN, None) or ())
        setattr(namespace, GIVEN, given | {self.dest})


def _given(args, dest: str) -> bool:
    return dest in (getattr(args, GIVEN, None) or ())


def _train_opts(p: argparse.ArgumentParser, tree: bool = True, n_ctx_default: int | None = DEFAULT_N_CTX) -> None:
    g = p.add_argument_group("training")
    if tree:
        g.add_argument("--tree", type=_tree_arg, default="auto",
                       help="auto (from the task affinity), flat, a tree.json file or a JSON nested list")
    g.add_argument("--epochs", type=_POSITIVE, default=None, help="training epochs (TrainConfig default if unset)")
    g.add_argument("--lr", type=_positive_float, default=None,
                   help="peak learning rate of sgd / adamw (TrainConfig default if unset)")
    g.add_argument("--train-batch-size", type=_train_batch_arg, default=None,
                   help="training samples per task per step, or 'full' (every sample in every step) "
                        "(TrainConfig default if unset)")
    g.add_argument("--optimizer", choices=list(OPTIMIZERS), default=None,
                   help=f"sgd (CoOp's, momentum 0.9), adamw, or lbfgs (full batch only; no --lr) "
                        f"(default {TrainConfig.optimizer})")
    g.add_argument("--min-steps", type=_NONNEG, default=None,
                   help="budget rule: at least this many optimiser steps per run, whatever the task size "
                        f"(TrainConfig default {TrainConfig.min_steps} if unset)")
    g.add_argument("--n-ctx", type=_POSITIVE, default=n_ctx_default, action=_Given,
                   help="context tokens per tree node, >= 1 (default %(default)s; the affinity step of "
                        "--tree auto has its own --affinity-n-ctx)")
    g.add_argument("--combine", choices=list(COMBINE_MODES), default=DEFAULT_COMBINE,
                   help="how a task combines its path contexts (default %(default)s, see README ablation)")
    g.add_argument("--ctx-init", default=None, help='initialise contexts from a phrase, e.g. "a photo of a"')
    g.add_argument("--attention", choices=list(ATTENTION_BACKENDS), default="tree",
                   help="text attention backend of every trained method: tree (the fused op, default) or flex "
                        "(PyTorch FlexAttention with the tree mask; compiled on CUDA; no CPU backward); the "
                        "affinity step keeps the fused op")
    h = p.add_argument_group("HiPro options (see HiProModel)")
    h.add_argument("--path-weights", choices=list(PATH_WEIGHTS), default=DEFAULT_HIPRO_OPTIONS["path_weights"],
                   action=_Given,
                   help="uniform mean of the path nodes' features, or per-task learned weights "
                        "(--combine mean; default %(default)s)")
    h.add_argument("--leaf-weight", type=_unit_interval, default=DEFAULT_HIPRO_OPTIONS["leaf_weight"], action=_Given,
                   help="initial weight of a task's own node with learned path weights (default %(default)s)")
    h.add_argument("--init-from-parent", action="store_true", help="start each node from its parent's context")
    h.add_argument("--parent-prior", type=_nonneg_float, default=0.0,
                   help="weight of the penalty pulling a node's context toward its parent's (--combine mean)")


def _affinity_opts(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("affinity / tree")
    g.add_argument("--affinity-method", default=None, choices=list(aff.METHODS),
                   help="transfer (default), lookahead or gradcos (see hipro_fast.method.affinity)")
    g.add_argument("--affinity-steps", type=_POSITIVE, default=None, help="optimiser steps of the affinity estimate")
    g.add_argument("--affinity-n-ctx", type=_POSITIVE, default=AFFINITY_N_CTX,
                   help="context tokens of each prompt the affinity step trains, >= 1 (default %(default)s, "
                        "the affinity method's own default; independent of --n-ctx)")
    cut = g.add_mutually_exclusive_group()
    cut.add_argument("--levels", type=_NONNEG, default=None, help="tree levels below the root (0 = flat)")
    cut.add_argument("--threshold", type=_float, default=None, help="affinity threshold for merging")
    g.add_argument("--linkage", default="average", choices=list(LINKAGES), help="agglomerative linkage")


def build_parser() -> argparse.ArgumentParser:
    ap = OneLineUsageParser(prog="hipro", description="Hierarchical prompt learning (HiPro) on a frozen CLIP.",
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n")[1])
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("cache", help="encode and cache image features")
    _common(p)

    p = sub.add_parser("affinity", help="task-affinity matrix and heatmap")
    _common(p)
    _affinity_opts(p)

    p = sub.add_parser("tree", help="task tree from the affinity, and dendrogram")
    _common(p)
    _affinity_opts(p)
    p.add_argument("--affinity", default=None, help="affinity.json from `hipro affinity` (else computed)")

    p = sub.add_parser("train", help="train HiPro, evaluate on the test splits, save a checkpoint")
    _common(p, resumable=True)
    _train_opts(p)
    _affinity_opts(p)
    _select_opts(p, default="none",
                 help_select="none (default): HiPro's tree alone, one model; per-task: also train the flat "
                             "two-level tree and CoOp per task and keep, task by task, the one with the best "
                             "validation score (the protocol's HiPro: 3x the training; a task without a val split holds "
                             "out min(K, 4) of its training images per class the draw left)")

    p = sub.add_parser("eval", help="evaluate a checkpoint on a split")
    _common(p)
    p.add_argument("--checkpoint", required=True,
                   help="checkpoint directory from `hipro train` (<run>/checkpoints) or its best.json")
    p.add_argument("--split", choices=["test", "val", "train"], default="test")

    p = sub.add_parser("compare", help="HiPro vs. baselines on the same features (over shots x seeds)")
    _common(p, resumable=True, shot_grid=True)
    _train_opts(p)
    _affinity_opts(p)
    p.add_argument("--methods", type=_method_list, default=None,
                   help="comma list (default: hipro_fast.method.baselines defaults)")
    p.add_argument("--seeds", type=_seed_list, default="0", help="comma list of seeds, e.g. 0,1,2")
    _select_opts(p, help_select="per-task (default): HiPro takes, task by task, the best of its tree, the flat "
                                "two-level tree and CoOp per task on the validation split; none: its tree alone")
    _parallel_opt(p)

    p = sub.add_parser("export", help="export a checkpoint as a standalone classifier")
    _common(p, spec=False, data=False)
    p.add_argument("--checkpoint", required=True,
                   help="checkpoint directory from `hipro train` (<run>/checkpoints) or its best.json")
    p.add_argument("--out", default=None,
                   help="output .safetensors path (default: <run-dir>/classifier.safetensors); an existing "
                        "file is replaced only with --overwrite")

    p = sub.add_parser("predict", help="classify images with a classifier or checkpoint (top-k classes to CSV)")
    _common(p, spec=False, data=False)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--classifier", default=None, help=".safetensors classifier from `hipro export`")
    source.add_argument("--checkpoint", default=None,
                        help="checkpoint folder from `hipro train` (<run>/checkpoints, a --select per-task one "
                             "too) or its best.json")
    p.add_argument("images", nargs="+", help="image files or folders (searched recursively)")
    p.add_argument("--task", default=None, help="the task whose classes to predict (needed when there are several)")
    p.add_argument("--top-k", type=_POSITIVE, default=1, help="classes per image, most probable first (default 1)")
    p.add_argument("--out", default=None,
                   help="CSV to write (default: <run-dir>/predictions.csv); an existing file is replaced only "
                        "with --overwrite")
    p.add_argument("--batch-size", type=_POSITIVE, default=128, help="images per encoding batch")
    p.add_argument("--workers", type=_NONNEG, default=None, help="data-loading workers (default: 0 on CPU)")
    p.add_argument("--skip-bad-images", action="store_true",
                   help="skip (and list) images that cannot be decoded instead of failing")

    p = sub.add_parser("bench", help="text-engine benchmark (options go to hipro_fast.bench.cpu)", add_help=False)
    p.add_argument("bench_args", nargs=argparse.REMAINDER)

    p = sub.add_parser("demo", help="the whole pipeline on the bundled benchmark")
    _common(p, spec=False, shot_grid=True)
    _train_opts(p, tree=False, n_ctx_default=DEMO_DEFAULTS["n_ctx"])
    _affinity_opts(p)
    p.add_argument("--data-dir", default=None,
                   help="where to export the bundled images (default: <cache-dir>/bundled-seed<seed>)")
    p.add_argument("--methods", type=_method_list, default=None, help="comma list of baseline methods")
    p.add_argument("--seeds", type=_seed_list, default=None, help="comma list of seeds (default: 0,1,2)")
    _select_opts(p, help_select="as for compare")
    _parallel_opt(p)
    p.set_defaults(shots=DEMO_DEFAULTS["shots"], epochs=DEMO_DEFAULTS["epochs"])  # epochs: in the recorded recipe
    return ap


def _select_opts(p: argparse.ArgumentParser, help_select: str, default: str = DEFAULT_PROTOCOL_SELECT) -> None:
    p.add_argument("--select", choices=["none", "per-task"], default=default, help=help_select)
    p.add_argument("--select-by", choices=list(SELECT_CRITERIA), default=DEFAULT_SELECT_BY,
                   help=f"what --select per-task compares on the validation split (default {DEFAULT_SELECT_BY}): "
                        "accuracy (ties: HiPro, then two-level), accuracy with ties broken by the lower "
                        "cross-entropy, or cross-entropy alone")


def _select_options(a: argparse.Namespace) -> dict[str, Any]:
    """compare()'s select and select_by from --select / --select-by."""
    select = getattr(a, "select", "none")
    return {"select": None if select == "none" else select,
            "select_by": getattr(a, "select_by", DEFAULT_SELECT_BY)}


# ------------------------------------------------------------------ helpers
def _class_counts(task, split: str) -> list[int]:
    """Images per class (label order) of a spec task's `split`."""
    counts = [0] * len(task.classes)
    for r in task.splits.get(split) or []:
        counts[r.label] += 1
    return counts


class _Ctx:
    """What every command needs: the run, the model, the features."""

    def __init__(self, args, command: str):
        self.args = args
        self.pipeline = pipeline
        self.dist = dist_group.current()
        self.main = self.dist is None or self.dist.is_main
        self.progress = not getattr(args, "no_progress", False) and self.main
        self.device = self.dist.device if self.dist is not None else pipeline.resolve_device(args.device)
        cfg = {k: v for k, v in vars(args).items() if k not in ("func", "debug", GIVEN)}
        cfg["device_resolved"] = self.device
        cfg["command"] = command
        cfg["world_size"] = self.dist.world_size if self.dist is not None else 1
        cfg["backend"] = self.dist.backend if self.dist is not None else None
        resume = bool(getattr(args, "resume", False))
        if resume and not args.run_dir:
            raise CliError("--resume needs --run-dir (the run to continue)")
        mode = "resume" if resume else ("overwrite" if getattr(args, "overwrite", False) else "new")
        if self.dist is not None:
            if command not in DIST_COMMANDS:
                raise CliError(f"hipro {command} runs in one process (under torchrun: {', '.join(DIST_COMMANDS)})")
            # Ranks that run different commands would hang in different collectives: compare first.
            dist_group.check_agreement({k: v for k, v in cfg.items() if k != "device_resolved"}, "the command line")
        pipeline.record_file_paths(cfg)  # (after the ranks' agreement: nodes may mount a file at other paths)
        if hasattr(args, "optimizer"):
            cfg["train_recipe"] = pipeline.resolved_recipe(self._check_recipe())
        self._spec = None
        self._given_tree = self._given_affinity = None
        self._check_inputs_on_every_rank(command, mode)
        if self._spec is not None and command in ("train", "compare"):
            cfg["data"] = pipeline.spec_data_digest(self._spec)  # a --resume must see the same images
        if self._given_tree is not None:  # a --tree file's content, not only its name
            cfg["tree_content"] = self._given_tree.to_nested()
        self._warn_ignored_options()
        # Checked before anything is written or loaded: a refused run directory is left untouched.
        self.run = self._open_run(args.run_dir, command, cfg, mode)
        if resume and not self.run.resumed:
            self.say(f"nothing to resume in {self.run.dir} (absent or empty): starting a new run")
        self.run.log("start", command=command, mode=mode, resumed=self.run.resumed)
        self.config = cfg
        self._clip = None
        self._feats = None
        self.t0 = time.time()

    def _warn_ignored_options(self) -> None:
        """Options that are valid alone but do nothing in this combination: said,
        not silently dropped (once, by rank 0)."""
        a = self.args
        if not self.main:
            return
        combine = getattr(a, "combine", DEFAULT_COMBINE)
        if getattr(a, "parent_prior", 0.0) and combine != "mean":
            warnings.warn(f"--parent-prior {a.parent_prior:g} has no effect with --combine {combine} "
                          "(it is a --combine mean option)")
        if _given(a, "path_weights") and combine != "mean":
            warnings.warn(f"--path-weights {a.path_weights} has no effect with --combine {combine}: the path's "
                          "contexts form one prompt, so there are no per-node features to weigh "
                          "(a --combine mean option)")
        if _given(a, "leaf_weight") and (combine != "mean" or a.path_weights != "learned"):
            why = f"--combine {combine}" if combine != "mean" else f"--path-weights {a.path_weights}"
            warnings.warn(f"--leaf-weight {a.leaf_weight:g} has no effect with {why} "
                          "(it starts the learned path weights of --combine mean --path-weights learned)")
        if getattr(a, "parallel", PARALLEL_MODES[0]) != PARALLEL_MODES[0] and self.dist is None:
            warnings.warn(f"--parallel {a.parallel} has no effect in one process (pass --nproc N, or run "
                          "under torchrun)")

    def _check_inputs_on_every_rank(self, command: str, mode: str) -> None:
        """_check_inputs, and under torchrun the first rank's failure raised on every
        rank before any of them opens the run directory (each rank resolves paths
        in its own working directory and may see other files: rank 0 alone passing
        must not empty --run-dir under --overwrite while another rank stops)."""
        try:
            self._check_inputs(command, mode)
            failure = None
        except Exception as e:  # noqa: BLE001 - gathered, then re-raised below
            if self.dist is None:
                raise
            failure = e
        if self.dist is None:
            return
        failures = dist_group.all_gather_object(None if failure is None else (type(failure).__name__, str(failure)))
        for r, f in enumerate(failures):
            if f is not None:
                if failure is not None and r == self.dist.rank:
                    raise failure
                raise CliError(f"rank {r}: {f[1]}")

    def _check_inputs(self, command: str, mode: str) -> None:
        """The inputs a command names, checked before its run directory is opened,
        so a mistyped path or a bad --tree leaves nothing behind: the spec (loaded
        once, here), --tree against its tasks, --checkpoint, --affinity, --out, the
        folders --run-dir and --cache-dir would be made in; and --overwrite may not
        delete any of them."""
        a = self.args
        if a.run_dir is not None and not str(a.run_dir).strip():
            raise CliError("--run-dir is empty (it would be the current folder): name a folder")
        for flag, value in (("--run-dir", a.run_dir or "runs"), ("--cache-dir", getattr(a, "cache_dir", None))):
            if value:
                _check_folder_path(flag, Path(value))
        if command in SPEC_COMMANDS or (command == "tree" and (not a.affinity or a.spec)):
            self._spec = self.spec()  # tree --affinity reads a --spec only to check the affinity's tasks
        tasks = list(self._spec.tasks) if self._spec is not None else None
        tree = getattr(a, "tree", None)
        if tree not in (None, "auto") and tasks is not None:
            self._given_tree = self.pipeline.load_tree(tree, tasks)  # checked here, used by _resolve_tree
        if command == "train" and a.select == "per-task":
            self._check_selection_has_val()
        if command == "eval" and not any(t.splits.get(a.split) for t in self._spec.tasks.values()):
            raise CliError(f"--split {a.split}: no task of the spec {a.spec} has a {a.split} split")
        if getattr(a, "checkpoint", None):
            self.pipeline.checkpoint_location(a.checkpoint)
            # a checkpoint of other tasks, classes or tower width leaves no failed run behind
            model = self.pipeline.check_model_args(a.model, a.pretrained, a.model_config)
            if command == "eval":
                trained = self.pipeline.check_checkpoint_matches(a.checkpoint, self._spec.class_names(),
                                                                 where=f"spec {a.spec}", model=model)
                if a.split == "train" and self.main:
                    _warn_other_training_draw(a, trained)
            else:
                self.pipeline.check_checkpoint_matches(a.checkpoint, model=model)
        if command == "tree" and a.affinity:
            self._given_affinity = _load_affinity(a.affinity)  # checked here, used by cmd_tree
            names = self._given_affinity[1]
            if tasks is not None and sorted(names) != sorted(tasks):
                raise CliError(f"--affinity {a.affinity} is over tasks {', '.join(names)}; the --spec has "
                               f"{', '.join(tasks)}")
        if command == "predict":
            self._check_predict_inputs()
        if command == "export" and a.out:
            _check_export_out(Path(a.out), overwrite=bool(a.overwrite))
            ckpt_dir, _ = self.pipeline.checkpoint_location(a.checkpoint)
            out = Path(a.out).resolve()
            if ckpt_dir.resolve() in out.parents:
                raise CliError(f"--out {a.out} lies inside the checkpoint folder {ckpt_dir} it is exported from: "
                               "choose a path outside it")
        if getattr(a, "checkpoint", None) and getattr(a, "run_dir", None):
            # its report, outputs and --overwrite would land among (or delete) the checkpoint it reads
            ckpt_dir, _ = self.pipeline.checkpoint_location(a.checkpoint)
            run_dir = Path(a.run_dir).resolve()
            if run_dir == ckpt_dir.resolve() or ckpt_dir.resolve() in run_dir.parents:
                raise CliError(f"--run-dir {a.run_dir} lies inside the checkpoint folder {ckpt_dir} this command "
                               "reads: choose a run directory outside it")
        if self._spec is not None:
            self._check_draws_fit(command)
            self._check_outputs_outside_the_data()
        if mode == "overwrite" and a.run_dir:
            self._check_overwrite_spares_inputs(Path(a.run_dir))

    def _check_outputs_outside_the_data(self) -> None:
        """--run-dir and --cache-dir may not lie inside an image folder of the spec:
        their files (figures, caches) would be read back as a class of images."""
        a = self.args
        outputs = [("--run-dir", a.run_dir or "runs"),
                   ("--cache-dir", str(self.cache_dir) if hasattr(a, "cache_dir") else None)]
        for name, task in self._spec.tasks.items():
            for split, source in task.sources.items():
                if Path(source).suffix.lower() == ".csv":
                    continue  # a CSV lists its images: other files beside them are not read
                folder = Path(source).resolve()
                for flag, value in outputs:
                    if not value:
                        continue
                    out = Path(value).resolve()
                    if out == folder or folder in out.parents:
                        raise CliError(f"{flag} {value} lies inside the image folder {source} of task {name!r} "
                                       f"({split}): its files would be read as images; choose a folder outside it")

    def _check_draws_fit(self, command: str) -> None:
        """From the spec's image counts: the grid's largest K (+ its validation
        shots) fits every class, and per-task selection has a validation split."""
        if self.shot_grid:
            for name, task in self._spec.tasks.items():
                check_shot_counts(name, task.classes, _class_counts(task, "train"),
                                  _class_counts(task, "val") if task.splits.get("val") else None,
                                  max(self.shot_grid))
        elif command == "compare":
            # a task without a val split keeps the first candidate (compare's fallback); none at all cannot choose
            has_val = any(task.splits.get("val") for task in self._spec.tasks.values())
            if self.args.select == "per-task" and not has_val:
                raise CliError("--select per-task chooses on a validation split, and with --shots 0 that is the "
                               "spec's own: no task has one (add a val split to the spec, or pass --select none)")
            choosing = [m for m in (self.args.methods or "").split(",") if m in baselines.NEEDS_VAL]
            if choosing and not has_val:
                raise CliError(f"--methods {choosing[0]} chooses on a validation split, and with --shots 0 that is "
                               f"the spec's own: no task has one (add a val split to the spec, or leave "
                               f"{choosing[0]} out)")

    def _check_predict_inputs(self) -> None:
        """hipro predict: the classifier (loaded here), --task and --top-k against
        its tasks and classes, the images (listed here), --out."""
        a = self.args
        if a.classifier:
            self._classifier = export.Classifier.load(a.classifier)
            tasks = {t: self._classifier.class_names(t) for t in self._classifier.tasks}
            source = f"classifier {a.classifier}"
            model = self.pipeline.check_model_args(a.model, a.pretrained, a.model_config)
            dim = self.pipeline.configured_embed_dim(model)
            if dim is not None and dim != self._classifier.embed_dim:
                trained = self._classifier.clip_info.get("name")
                raise CliError(f"--classifier {a.classifier} scores {self._classifier.embed_dim}-dim image features, "
                               f"model {model!r} gives {dim}-dim ones"
                               + (f" (it was exported for model {trained!r})" if trained else ""))
        else:
            tasks = self.pipeline.checkpoint_tasks(a.checkpoint)
            source = f"checkpoint {a.checkpoint}"
        if a.task is None and len(tasks) > 1:
            raise CliError(f"--task: {source} has {len(tasks)} tasks ({', '.join(tasks)}): name one")
        task = a.task if a.task is not None else next(iter(tasks))
        if task not in tasks:
            raise CliError(f"--task {task}: not a task of {source} (its tasks: {', '.join(tasks)})")
        if a.top_k > len(tasks[task]):
            raise CliError(f"--top-k {a.top_k}: task {task!r} has {len(tasks[task])} classes")
        self.predict_task = task
        self.images = find_images(a.images)
        run_root = Path(a.run_dir or "runs").resolve()
        for given in a.images:
            folder = Path(given).resolve()
            if folder.is_dir() and (run_root == folder or folder in run_root.parents):
                raise CliError(f"--run-dir {a.run_dir or 'runs/<timestamp>-predict'} lies inside the image folder "
                               f"{given}: its figures (and earlier runs' there) would be classified as images; "
                               "choose a --run-dir outside it")
        if a.out:
            _check_out_file(Path(a.out), overwrite=bool(a.overwrite), suffix=".csv", what="a predictions file")

    def _check_selection_has_val(self) -> None:
        """hipro train --select per-task chooses on validation data: a task without
        a val split holds out min(K, 4) of its training images per class (the
        protocol's rule), so each class needs K + min(K, 4) of them; with
        --shots 0 (every training image drawn) the spec's val split must exist."""
        a = self.args
        no_val = [(n, t) for n, t in self._spec.tasks.items() if not t.splits.get("val")]
        if not no_val:
            return
        if not a.shots:
            raise CliError(f"--select per-task chooses on a validation split, and with --shots 0 every training "
                           f"image is drawn: task {no_val[0][0]!r} has no val split (give it one, or pass "
                           "--select none)")
        for name, task in no_val:
            check_shot_counts(name, task.classes, _class_counts(task, "train"), None, a.shots)

    def val_from_train(self) -> int:
        """Validation images per class held out of a task's training images when it
        has no val split: min(K, 4) under hipro train --select per-task, else 0."""
        a = self.args
        if getattr(a, "command", None) == "train" and getattr(a, "select", "none") == "per-task" and a.shots:
            return val_shots_for(a.shots)
        return 0

    def _check_overwrite_spares_inputs(self, run_dir: Path) -> None:
        """--overwrite empties --run-dir: refuse when an input of this command lies inside it."""
        a = self.args
        inputs = [("--spec", getattr(a, "spec", None)), ("--checkpoint", getattr(a, "checkpoint", None)),
                  ("--affinity", getattr(a, "affinity", None)), ("--model-config", getattr(a, "model_config", None)),
                  ("--pretrained", getattr(a, "pretrained", None)), ("--data-dir", getattr(a, "data_dir", None)),
                  ("--cache-dir", str(self.cache_dir) if hasattr(a, "cache_dir") else None)]
        tree = getattr(a, "tree", None)
        if tree and tree not in ("auto", "flat") and not tree.lstrip().startswith(("[", "{")):
            inputs.append(("--tree", tree))
        inputs.append(("--classifier", getattr(a, "classifier", None)))
        inputs += [("the image path", p) for p in getattr(a, "images", None) or []]
        # and every image found, through links too (a link outside --run-dir may point inside it)
        inputs += [("the image", os.path.realpath(p)) for p in getattr(self, "images", None) or []]
        if self._spec is not None:
            folders = {str(Path(r.path).parent) for task in self._spec.tasks.values()
                       for recs in task.splits.values() for r in recs}
            inputs += [("the spec's images in", f) for f in sorted(folders)]
            inputs += [(f"task {name!r}'s {split} source", src) for name, task in self._spec.tasks.items()
                       for split, src in sorted(task.sources.items()) if src]
        root = run_dir.resolve()
        for flag, value in inputs:
            if not value or (flag == "--pretrained" and not Path(value).exists()):
                continue
            path = Path(value).resolve()
            if path == root or root in path.parents:
                raise CliError(f"--overwrite would delete {flag} {value}: it lies inside --run-dir {run_dir}; "
                               f"move it out, or choose another --run-dir")

    def _check_recipe(self) -> TrainConfig:
        """The training options together (each flag alone is checked by argparse);
        returns the recipe they resolve to."""
        try:
            recipe = TrainConfig(**pipeline.train_config_overrides(TrainConfig, self.train_overrides()))
            recipe.validate()
        except ValueError as e:
            msg = str(e).replace("TrainConfig: ", "training options: ")
            for field, flag in (("batch_size", "--train-batch-size"), ("min_steps", "--min-steps"),
                                ("optimizer", "--optimizer"), ("epochs", "--epochs")):
                msg = re.sub(rf"\b{field}\b", flag, msg)
            raise CliError(msg) from None
        if getattr(self.args, "lr", None) is not None and recipe.optimizer == "lbfgs":
            raise CliError("--lr has no effect with optimizer lbfgs (the default; its line search sets every "
                           "step): pass --optimizer adamw or sgd with --lr")
        return recipe

    def _open_run(self, run_dir, command: str, cfg: dict, mode: str):
        """Rank 0 (or the only process) opens the run directory; the other ranks
        get its path and `resumed` from rank 0 and write nothing there."""
        resumable = command in ("train", "compare")
        a = self.args

        def check_model() -> None:  # after the run directory's refusals, before it is emptied or made
            if hasattr(a, "model"):
                self.pipeline.check_model_args(a.model, a.pretrained, a.model_config)

        def open_run():
            return pipeline.Run(run_dir, command, cfg, mode=mode, resumable=resumable, before_writing=check_model)

        if self.dist is None:
            return open_run()
        # nodes may differ in cwd: the other ranks get rank 0's resolved path
        run = dist_group.main_first(open_run, "", describe=_one_line,
                                    shared=lambda r: (str(r.dir.resolve()), r.resumed))
        if self.main:
            return run
        directory, resumed = run
        return pipeline.Run(directory, command, cfg, mode=mode, writer=False, resumed=resumed)

    def say(self, msg: str) -> None:
        if self.main:
            print(msg, flush=True)

    @property
    def cache_dir(self) -> Path:

        d = getattr(self.args, "cache_dir", None)
        return Path(d) if d else default_cache_dir() / "features"

    def clip(self):
        if self._clip is None:
            a = self.args
            self._clip = self.pipeline.load_model(a.model, a.pretrained, self.device, a.model_config, a.seed)
            self.config["model_resolved"] = {"name": self._clip.name, "pretrained": self._clip.pretrained}
            self.run.write_config(self.config)
            self._warn_ctx_init_length()
        return self._clip

    def _warn_ctx_init_length(self) -> None:
        """A --ctx-init phrase sets the context length of the nodes it starts
        (HiProModel's rule): a typed --n-ctx that differs is said, not dropped
        silently. Needs the tokenizer, hence after the model loads."""
        a = self.args
        phrase = getattr(a, "ctx_init", None)
        if not (self.main and phrase and _given(a, "n_ctx")):
            return
        tokens = len(self._clip.tokenizer.encode(phrase))
        if tokens == a.n_ctx:
            return
        where = ("every context node" if getattr(a, "combine", DEFAULT_COMBINE) == "mean"
                 else "the first context of each path (the other nodes keep --n-ctx)")
        warnings.warn(f"--ctx-init {phrase!r} is {tokens} token{'s' if tokens != 1 else ''}: {where} gets "
                      f"{tokens} context tokens, not --n-ctx {a.n_ctx} (a phrase sets the length of the "
                      "contexts it starts)")

    def spec(self):
        if self._spec is not None:
            return self._spec
        if not getattr(self.args, "spec", None):
            raise CliError("--spec is required (a TOML multi-task spec)")
        return load_spec(self.args.spec)

    def features(self, spec=None, splits=("train", "val", "test")):
        if self._feats is None:
            a = self.args
            spec = spec or self.spec()
            clip = self.clip()
            # Classes whose prompts tokenise alike can never be told apart: refuse them before encoding.
            validate_tasks(spec.class_names(), clip.tokenizer)
            if self.dist is not None:  # the same --spec path may name different files on different nodes
                dist_group.check_agreement(
                    {"classes": spec.class_names(),
                     "images": {t: {s: [[r.path, r.label] for r in recs] for s, recs in task.splits.items()}
                                for t, task in spec.tasks.items()}}, f"the task spec {a.spec}")
            self._feats = self.pipeline.cache_features(
                clip, spec, shots=None if self.shot_grid else (_single_shots(a.shots) or None), seed=a.seed, cache_dir=self.cache_dir, device=self.device,
                views=a.aug_views, skip_bad_images=a.skip_bad_images, progress=self.progress,
                batch_size=a.batch_size, num_workers=a.workers, splits=splits, log=self.run.log,
                val_from_train=self.val_from_train())
            f = self._feats
            counts: dict[str, int] = {}
            for s in f.status.values():
                counts[s] = counts.get(s, 0) + 1
            n_skip = sum(len(v) for v in f.skipped.values())
            self.say(f"features: {len(spec.tasks)} tasks, cache " +
                     ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) +
                     (f", skipped {n_skip} bad images" if n_skip else ""))
            self._data_section(f)
        return self._feats

    def _data_section(self, f) -> None:
        rows = f.summary_rows()
        lines = ["| task | classes | train | val | test | cache | skipped |", "|---|---|---|---|---|---|---|"]
        for r in rows:
            lines.append(f"| {r['task']} | {r['classes']} | {r['train']} | {r['val']} | {r['test']} | "
                         f"{r['cache']} | {r['skipped']} |")
        shots = f"{f.shots} shots per class" if f.shots else "all training images"
        self.run.report.add("Data", f"{shots}, seed {f.seed}.\n\n" + "\n".join(lines))
        self.run.write_json("data.json", rows)

    @property
    def shot_grid(self) -> list[int] | None:
        """The protocol's shot counts (compare/demo with --shots K[,K...] >= 1), else None."""
        shots = getattr(self.args, "shots", None)
        return list(shots) if isinstance(shots, list) and shots != [0] else None

    def hipro_options(self) -> dict[str, Any]:
        a = self.args
        opts = {"path_weights": getattr(a, "path_weights", DEFAULT_HIPRO_OPTIONS["path_weights"]),
                "leaf_weight": getattr(a, "leaf_weight", DEFAULT_HIPRO_OPTIONS["leaf_weight"]),
                "init_from_parent": bool(getattr(a, "init_from_parent", False)),
                "parent_prior": float(getattr(a, "parent_prior", 0.0) or 0.0),
                "attention": getattr(a, "attention", "tree")}
        if getattr(a, "combine", DEFAULT_COMBINE) != "mean":  # these options weigh per-node features
            opts["path_weights"], opts["parent_prior"] = "uniform", 0.0
        return opts

    def train_overrides(self) -> dict[str, Any]:
        a = self.args
        return {"epochs": getattr(a, "epochs", None), "lr": getattr(a, "lr", None),
                "optimizer": getattr(a, "optimizer", None),
                "batch_size": getattr(a, "train_batch_size", None), "min_steps": getattr(a, "min_steps", None)}

    def finish(self) -> None:
        self.run.log("done", seconds=round(time.time() - self.t0, 2))
        path = self.run.report.write()
        self.say(f"run directory: {self.run.dir}  (report: {path.name})")


def _affinity(ctx: _Ctx):
    a = ctx.args
    ctx.say("task affinity ...")
    try:
        return ctx.pipeline.compute_affinity(ctx.clip(), ctx.features(), a.affinity_method,
                                             progress=ctx.progress, steps=a.affinity_steps, n_ctx=a.affinity_n_ctx)
    except ForestError as e:  # its prompts have their own context count: say which option sets it
        raise ForestError(f"{e} (the affinity step's context tokens are set by --affinity-n-ctx)") from None


def _affinity_and_tree(ctx: _Ctx, write_tree: bool = True):
    """Compute affinity + tree, with figures and report sections."""
    a = ctx.args
    matrix, names = _affinity(ctx)
    _save_affinity(ctx, matrix, names)
    tree = ctx.pipeline.build_tree(matrix, names, a.levels, a.threshold, a.linkage)
    if write_tree:
        _save_tree(ctx, tree, matrix, names)
    return matrix, names, tree


def _save_affinity(ctx: _Ctx, matrix, names) -> None:
    a = ctx.args
    aff.save_affinity_json(matrix, names, ctx.run.path("affinity.json"),
                           method=a.affinity_method or aff.DEFAULT_METHOD,
                           config={"steps": a.affinity_steps, "shots": a.shots, "seed": a.seed,
                                   "n_ctx": a.affinity_n_ctx})

    png = plots.plot_affinity_heatmap(matrix, names, ctx.run.path("affinity.png"))
    ctx.run.report.add_figure("Task affinity", png, "Higher = the tasks help each other more "
                                                    "(symmetrised; the diagonal is ignored by the tree builder).")
    ctx.run.log("affinity", tasks=list(names), matrix=matrix.tolist())


def _save_tree(ctx: _Ctx, tree, matrix=None, names=None) -> None:

    ctx.run.write_text("tree.json", tree.to_json())
    a = ctx.args
    by_rule = getattr(a, "levels", None) is None and getattr(a, "threshold", None) is None  # else cut as asked
    png = plots.plot_dendrogram(tree, ctx.run.path("dendrogram.png"), matrix=matrix, names=names,
                                linkage=getattr(a, "linkage", "average"), auto_cut=by_rule)
    ctx.run.report.add_figure("Task tree", png, "```\n" + tree.render() + "\n```")
    ctx.run.log("tree", tree=tree.to_nested())
    ctx.say("task tree:\n" + tree.render())


def _resolve_tree(ctx: _Ctx, spec: str):
    feats = ctx.features()
    if spec == "auto":
        if len(feats.tasks) < 3:
            tree = ctx.pipeline.load_tree("flat", list(feats.tasks))
            _save_tree(ctx, tree)
            return tree
        return _affinity_and_tree(ctx)[2]
    tree = ctx._given_tree or ctx.pipeline.load_tree(spec, list(feats.tasks))
    _save_tree(ctx, tree)
    return tree


def _log_fit(ctx: _Ctx, result, tag: str = "train", skip: int = 0) -> list[dict]:
    """Record a FitResult's history as metrics lines (but the first `skip` epochs,
    already logged); returns the history."""
    hist = getattr(result, "history", None) or []
    rows = []
    for i, h in enumerate(hist):
        rec = dict(h) if isinstance(h, dict) else {"value": h}
        rec.setdefault("epoch", i + 1)
        rows.append(rec)
        if i >= skip:
            ctx.run.log(f"{tag}_epoch", **rec)
    return rows


def _accuracy_section(ctx: _Ctx, results: dict[str, dict[str, float]], heading: str, fname: str) -> None:

    png = plots.plot_accuracy_bars(results, ctx.run.path(fname))
    ctx.run.report.add_figure(heading, png)
    ctx.run.report.add(heading + " (table, %)", report.accuracy_table(results))


def _fmt_acc(acc: dict[str, float]) -> str:
    mean = sum(acc.values()) / len(acc) if acc else float("nan")
    return "  ".join(f"{t} {v * 100:.1f}" for t, v in acc.items()) + f"  | mean {mean * 100:.1f}"


def _ckpt_path(ctx: _Ctx) -> Path:
    return ctx.run.dir / "checkpoints"


def _report_missing(ctx: _Ctx, feats, split: str) -> list[str]:
    """Warn about, log and report the tasks that have no `split` images (they get no
    accuracy and are not in its mean) instead of letting them drop out silently."""
    missing = feats.missing(split)
    if missing:
        text = (f"{len(missing)} task(s) have no {split} images and get no {split} accuracy (not in the mean): "
                + ", ".join(missing))
        warnings.warn(text + f" (give them a {split} source, or more images per class for the split)")
        ctx.run.log("missing_split", split=split, tasks=missing)
        ctx.run.report.add(f"Tasks without {split} images", text + ".")
    return missing


# ------------------------------------------------------------------ commands
def cmd_cache(ctx: _Ctx) -> int:
    feats = ctx.features()
    for r in feats.summary_rows():
        ctx.say(f"  {r['task']}: {r['classes']} classes, train {r['train']}, val {r['val']}, test {r['test']} "
                f"[{r['cache']}]" + (f", skipped {r['skipped']}" if r["skipped"] else ""))
    ctx.finish()
    return 0


def cmd_affinity(ctx: _Ctx) -> int:
    matrix, names = _affinity(ctx)
    _save_affinity(ctx, matrix, names)
    ctx.say(f"affinity written to {ctx.run.dir / 'affinity.json'}")
    ctx.finish()
    return 0


def cmd_tree(ctx: _Ctx) -> int:
    a = ctx.args
    if a.affinity:
        matrix, names = ctx._given_affinity
        tree = ctx.pipeline.build_tree(matrix, names, a.levels, a.threshold, a.linkage)
        _save_tree(ctx, tree, matrix, names)
    else:
        _affinity_and_tree(ctx)
    ctx.finish()
    return 0


def _load_affinity(path: str) -> tuple[Any, list[str]]:
    """(matrix, task names) of an affinity.json from `hipro affinity`, errors naming the file."""
    p = Path(path)
    if not p.is_file():
        raise MissingFileError(f"affinity file not found: {p}")
    try:
        matrix, names, _ = aff.load_affinity_json(p)
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise InvalidInputError(f"{p}: not an affinity.json from `hipro affinity` ({type(e).__name__}: {e})") from None
    names = list(names)
    twice = [n for i, n in enumerate(names) if n in names[:i]]
    if twice:
        raise InvalidInputError(f"{p}: task name {twice[0]!r} appears twice")
    shape = tuple(matrix.shape)  # an ndarray (load_affinity_json)
    if shape != (len(names), len(names)):
        raise InvalidInputError(f"{p}: the affinity matrix is {' x '.join(map(str, shape))}, but the file names "
                                f"{len(names)} tasks")
    return matrix, names


def _check_folder_path(flag: str, path: Path, what: str = "folder") -> None:
    """A folder the command will create or use (or the folder of a file it will
    write): refuse when it, or a folder above it, exists as something other than
    a folder, or is a broken link, or when it must be made in a folder that takes
    no new folders (the OS error would not say which option, and would come
    after the run directory is made)."""
    try:
        for p in (path, *path.parents):
            if p.is_symlink() and not p.exists():
                raise CliError(f"{flag} {path}: {p} is a broken symbolic link")
            if p.exists():
                if not p.is_dir():
                    where = "is a file" if p == path else f"lies under {p}, which is a file"
                    raise CliError(f"{flag} {path}: {where}, not a {what}")
                if p != path:
                    _probe_new_folder(flag, path, p)
                return
    except OSError as e:  # e.g. a name too long for the file system
        raise CliError(f"{flag} {path}: {e.strerror or e}") from None


def _probe_new_folder(flag: str, path: Path, parent: Path) -> None:
    """Make and remove a folder in `parent`, the nearest existing folder above
    `path`: os.access says yes to root on a read-only mount, a real mkdir does not.
    An existing folder is not probed: a read-only feature cache serves its hits."""
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".hipro-probe-", dir=parent))
    except OSError as e:
        raise CliError(f"{flag} {path}: cannot be made, {parent} takes no new folder ({e.strerror or e})") from None


def _warn_other_training_draw(a: argparse.Namespace, trained: dict) -> None:
    """`eval --split train` scores the --shots / --seed draw: say so when the
    checkpoint recorded (hipro train) that it was trained on another one."""
    theirs = {"shots": trained.get("shots"), "seed": trained.get("seed")}
    if any(v is None for v in theirs.values()) or theirs == {"shots": a.shots, "seed": a.seed}:
        return
    if theirs["shots"] == 0 and a.shots == 0:  # the whole split: no draw, whatever the seed
        return
    def draw(shots, seed):
        return "the whole training split" if not shots else f"the {shots}-shot draw of seed {seed}"
    warnings.warn(f"--split train scores {draw(a.shots, a.seed)}; the checkpoint was trained on "
                  f"{draw(theirs['shots'], theirs['seed'])} (pass --shots {theirs['shots']} --seed {theirs['seed']} "
                  "to score that)")


def _check_export_out(out: Path, overwrite: bool) -> None:
    _check_out_file(out, overwrite, ".safetensors", "a classifier file")


def _check_out_file(out: Path, overwrite: bool, suffix: str, what: str) -> None:
    if out.is_dir():
        raise CliError(f"--out {out}: is a folder, not a file")
    if out.suffix != suffix:
        raise CliError(f"--out {out}: {what} is {suffix} (name it <something>{suffix})")
    if out.exists() and not overwrite:
        raise CliError(f"--out {out} exists: pass --overwrite to replace it, or choose another path")
    for p in out.parents:  # the folder it goes into: an existing file above it is named with --out's value
        if p.exists() and not p.is_dir():
            raise CliError(f"--out {out}: {p} is a file, not a folder")


def _train_and_eval(ctx: _Ctx, tree):
    a = ctx.args
    feats = ctx.features()
    ctx.say(f"training HiPro on {len(feats.tasks)} tasks ...")
    if ctx.run.resumed:
        if a.select == "per-task":  # each candidate resumes from its own checkpoint folder
            done = {c: ctx.pipeline.last_checkpoint_epoch(selection.candidate_dir(_ckpt_path(ctx), c))
                    for c in baselines.SELECT_CANDIDATES}
            note = "resumed: " + ", ".join(f"{c} from epoch 1" if d is None else f"{c} after epoch {d + 1}"
                                           for c, d in done.items())
        else:
            done = ctx.pipeline.last_checkpoint_epoch(_ckpt_path(ctx))
            note = (f"resumed from the checkpoint after epoch {done + 1}" if done is not None
                    else "resumed before the first checkpoint: training from epoch 1")
        ctx.say(note)
        ctx.run.log("resume", checkpoint_epoch=done)
        ctx.run.report.add("Resumed", note + " (the result equals an uninterrupted run).")
    provenance = {"spec": str(a.spec), "model": ctx.clip().name, "seed": a.seed, "shots": a.shots,
                  **export.image_tower_info(ctx.clip().model)}  # eval / export say if theirs differs
    common = dict(n_ctx=a.n_ctx, combine=a.combine, ctx_init=a.ctx_init, seed=a.seed, device=ctx.device,
                  train_overrides=ctx.train_overrides(), checkpoint_dir=_ckpt_path(ctx), progress=ctx.progress,
                  resume=ctx.run.resumed, hipro_options=ctx.hipro_options())
    if a.select == "per-task":
        held = [t for t in feats.tasks if not ctx.spec().tasks[t].splits.get("val")]
        if held:
            ctx.say(f"validation: {ctx.val_from_train()} training images per class held out (not drawn) for "
                    f"the {len(held)} task(s) without a val split")
            ctx.run.report.add("Validation", f"{ctx.val_from_train()} images per class of the training images "
                               f"the draw left, for {', '.join(held)} (no val split in the spec).")

        def on_candidate(cand, _model, result):
            ctx.say(f"candidate {cand} trained")
            # a candidate that finished before an interruption was logged then: its epochs are not logged twice
            _training_curves(ctx, result, tag=f"train_{cand}", title=f"Training: {cand}",
                             fname=f"training-{cand}.png", skip=ctx.run.logged(f"train_{cand}_epoch"))

        model, _ = ctx.pipeline.train_selected(ctx.clip(), feats, tree, select_by=a.select_by,
                                               provenance=provenance, on_candidate=on_candidate, **common)
        _selection_section(ctx, model.selection)
    else:
        model, result = ctx.pipeline.train_hipro(ctx.clip(), feats, tree, **common)
        # a --resume of a run whose training had finished: its epochs were logged then
        _training_curves(ctx, result, skip=ctx.run.logged("train_epoch"))
        ctx.pipeline.save_model(model, _ckpt_path(ctx), provenance, result)
    ckpt = _ckpt_path(ctx)
    ctx.run.log("checkpoint", path=str(ckpt))
    _report_missing(ctx, feats, "test")
    acc = ctx.pipeline.evaluate_model(model, feats.test)
    ctx.run.log("eval", split="test", accuracy=acc, mean=sum(acc.values()) / len(acc))
    ctx.run.write_json("test_accuracy.json", acc)
    ctx.say("test accuracy (%): " + _fmt_acc(acc))
    ctx.say(f"checkpoint: {ckpt}")
    return model, acc


def _training_curves(ctx: _Ctx, result, tag: str = "train", title: str = "Training",
                     fname: str = "training.png", skip: int = 0) -> None:
    hist = _log_fit(ctx, result, tag, skip)
    png = plots.plot_curves(hist, ctx.run.path(fname), keys=("loss", "val_mean"))
    if png:
        ctx.run.report.add_figure(title, png)


def _selection_section(ctx: _Ctx, chosen) -> None:
    """Which candidate each task kept, and the validation scores it was chosen on."""
    ctx.run.log("selection", select_by=chosen.select_by, choices=chosen.choices)
    ctx.say("per-task selection (" + chosen.select_by + " on val): "
            + ", ".join(f"{t} -> {c}" for t, c in chosen.choices.items()))
    score = chosen.val_loss if chosen.select_by == "loss" else chosen.val
    unit = "cross-entropy" if chosen.select_by == "loss" else "accuracy, %"
    head = ["task", "kept", *chosen.candidates]
    rows = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * len(chosen.candidates)) + "|"]
    for task, kept in chosen.choices.items():
        cells = [(f"{score[c][task]:.4f}" if chosen.select_by == "loss" else f"{100 * score[c][task]:.2f}")
                 if task in score[c] else "–" for c in chosen.candidates]
        rows.append("| " + " | ".join([task, kept, *cells]) + " |")
    ctx.run.report.add(f"Per-task selection (validation {unit})", "\n".join(rows))


def cmd_train(ctx: _Ctx) -> int:
    tree = _resolve_tree(ctx, ctx.args.tree)
    model, acc = _train_and_eval(ctx, tree)
    _accuracy_section(ctx, {"HiPro": acc}, "Test accuracy", "accuracy.png")
    ctx.finish()
    return 0


def cmd_eval(ctx: _Ctx) -> int:
    a = ctx.args
    # the checkpoint against the model and the spec first: a mismatch is found before any image is encoded
    model = ctx.pipeline.load_model_checkpoint(a.checkpoint, ctx.clip(), ctx.device)
    ctx.pipeline.check_model_matches(model, ctx.spec().class_names(), where=f"spec {a.spec}")
    feats = ctx.features(splits=(a.split,))
    data = {"test": feats.test, "val": feats.val, "train": feats.train}[a.split]
    if not data:
        raise CliError(f"no {a.split} split in the spec")
    _report_missing(ctx, feats, a.split)
    acc = ctx.pipeline.evaluate_model(model, data)
    ctx.run.log("eval", split=a.split, accuracy=acc, mean=sum(acc.values()) / len(acc), checkpoint=a.checkpoint)
    ctx.run.write_json(f"{a.split}_accuracy.json", acc)
    _accuracy_section(ctx, {Path(a.checkpoint).stem: acc}, f"{a.split} accuracy", "accuracy.png")
    ctx.say(f"{a.split} accuracy (%): " + _fmt_acc(acc))
    ctx.finish()
    return 0


def _seeds(s: Sequence[int] | None, default: Sequence[int]) -> list[int]:
    """--seeds (already parsed and checked by _seed_list), else `default`."""
    return list(s) if s else list(default)


def _affinity_config(a) -> dict[str, Any]:
    """What compare() needs to build "hipro"'s tree from each draw's affinity."""
    cfg = {"method": a.affinity_method, "steps": a.affinity_steps, "n_ctx": a.affinity_n_ctx,
           "levels": a.levels, "threshold": a.threshold, "linkage": a.linkage}
    return {k: v for k, v in cfg.items() if v is not None}


def _note_resume_and_missing(ctx: _Ctx, feats, how: str) -> None:
    """Say (console, metrics, report) how a resumed comparison continues, and
    report tasks without test images."""
    if ctx.run.resumed:
        note = f"resumed: {how}"
        ctx.say(note)
        ctx.run.log("resume")
        ctx.run.report.add("Resumed", note + ".")
    _report_missing(ctx, feats, "test")


def _protocol(ctx: _Ctx, tree, seeds: Sequence[int]):
    """CoOp's protocol over --shots x --seeds: each seed its own few-shot draw;
    writes comparison.{md,json}, the accuracy-vs-shots figure and the report."""
    a = ctx.args
    feats = ctx.features()
    shots = ctx.shot_grid
    methods = [m.strip() for m in a.methods.split(",")] if a.methods else None
    ctx.say(f"protocol: {', '.join(methods) if methods else 'all methods'} at shots {shots} x seeds {list(seeds)} "
            f"(each seed draws its own split; validation: min(K, 4) per class from the val split, else from the "
            f"remaining training images)" + (f"; {ctx.dist.world_size} processes, parallel over {a.parallel}"
                                             if ctx.dist is not None else ""))
    _note_resume_and_missing(ctx, feats, "every (shots, seed, method) continues from its checkpoint in "
                                         "checkpoints/shots<K>-seed<S>/<method>-seed<S> (finished ones are only "
                                         "re-evaluated)")
    t0 = time.time()

    def on_run(k, seed, table):
        means = ", ".join(f"{m} {100 * r.mean:.1f}" for m, r in table.results.items())
        ctx.say(f"  {k} shot{'s' if k > 1 else ''}, seed {seed}: {means}  [{time.time() - t0:.0f} s]")
        ctx.run.log("draw", shots=k, seed=seed, tree=table.tree, results=ctx.pipeline.table_results(table),
                    choices={m: r.choices for m, r in table.results.items() if r.choices},
                    candidates={m: r.candidates for m, r in table.results.items() if r.candidates})

    result = ctx.pipeline.run_shots_protocol(
        ctx.clip(), feats, shots=shots, seeds=seeds, methods=methods, tree=tree, n_ctx=a.n_ctx, combine=a.combine,
        train_overrides=ctx.train_overrides(), affinity_config=_affinity_config(a) if tree is None else None,
        progress=False, checkpoint_dir=_ckpt_path(ctx), resume=ctx.run.resumed, ctx_init=a.ctx_init,
        hipro_options={**ctx.hipro_options(), **_select_options(a)}, on_run=on_run, parallel=a.parallel)
    summary = result.summary_markdown()
    per_shot = "\n\n".join(f"### {k} shot{'s' if k > 1 else ''}\n\n" + result.shot_table_markdown(k)
                            for k in result.shots)
    ctx.run.write_text("comparison.md", summary + "\n\n" + per_shot + "\n")
    ctx.run.write_json("comparison.json", result.to_dict())
    png = plots.plot_accuracy_vs_shots(result, ctx.run.path("accuracy_vs_shots.png"))
    spread = "bars" if len(result.shots) == 1 else "band"  # one shot count: error bars (plots.py)
    ctx.run.report.add_figure("Accuracy vs shots", png, f"Mean test accuracy over tasks; {spread}: ±1 std over seeds.")
    ctx.run.report.add("Comparison (mean over tasks)", summary)
    ctx.run.report.add("Per-task accuracy at each shot count (%, mean over seeds)", per_shot)
    trees = "\n".join(f"- {k} shots, seed {s}: `{json.dumps(table.tree)}`" for (k, s), table in result.runs.items()
                      if table.tree is not None)
    if trees:
        ctx.run.report.add("HiPro's tree on each draw", trees)
    ctx.run.log("compare", table=summary, results=result.to_dict())
    ctx.say(summary)
    ctx.say(f"accuracy-vs-shots figure: {png}")
    if result.select == "per-task" and "hipro" in result.methods:
        k, s = max(result.shots), result.seeds[0]
        ctx.say(f"each draw's hipro model: hipro export --checkpoint {_ckpt_path(ctx) / f'shots{k}-seed{s}'} "
                f"--out hipro.safetensors (or eval / predict it; every shots<K>-seed<S> folder likewise)")
    return result


def _compare(ctx: _Ctx, tree, seeds: Sequence[int]):
    if ctx.shot_grid:
        return _protocol(ctx, tree, seeds)
    a = ctx.args
    feats = ctx.features()
    methods = [m.strip() for m in a.methods.split(",")] if a.methods else None
    ctx.say(f"comparing {', '.join(methods) if methods else 'all methods'} over seeds {list(seeds)} ...")
    _note_resume_and_missing(ctx, feats, "every (method, seed) continues from its checkpoint in "
                                         "checkpoints/<method>-seed<seed> (finished ones are only re-evaluated; "
                                         "their train seconds count the resumed part only)")
    table = ctx.pipeline.run_compare(ctx.clip(), feats, methods=methods, seeds=seeds, tree=tree, n_ctx=a.n_ctx,
                                     combine=a.combine, train_overrides=ctx.train_overrides(),
                                     progress=ctx.progress, checkpoint_dir=_ckpt_path(ctx),
                                     resume=ctx.run.resumed, ctx_init=a.ctx_init,
                                     hipro_options={**ctx.hipro_options(), **_select_options(a)})
    md = table.to_markdown()
    ctx.run.write_text("comparison.md", md + "\n")
    results = ctx.pipeline.table_results(table)
    if results:
        ctx.run.write_json("comparison.json", results)

        png = plots.plot_accuracy_bars(results, ctx.run.path("accuracy.png"))
        ctx.run.report.add_figure("Per-task test accuracy", png)
    ctx.run.report.add("Comparison", md)
    ctx.run.log("compare", table=md, results=results)
    ctx.say(md)
    return table


def cmd_compare(ctx: _Ctx) -> int:
    # On the protocol's grid "auto" builds the tree from each draw's own affinity.
    tree = None if ctx.shot_grid and ctx.args.tree == "auto" else _resolve_tree(ctx, ctx.args.tree)
    _compare(ctx, tree, _seeds(ctx.args.seeds, [ctx.args.seed]))
    ctx.finish()
    return 0


def cmd_export(ctx: _Ctx) -> int:
    a = ctx.args
    clip = ctx.clip()
    model = ctx.pipeline.load_model_checkpoint(a.checkpoint, clip, ctx.device)
    out = Path(a.out) if a.out else ctx.run.path("classifier.safetensors")
    # whoever loads the classifier can check that their image features come from this image tower
    clip_info = {"name": clip.name, "pretrained": clip.pretrained, **export.image_tower_info(clip.model)}
    res = export.export_classifier(model, out, clip_info=clip_info)
    out = Path(res) if isinstance(res, (str, Path)) else out
    ctx.run.log("export", path=str(out), checkpoint=a.checkpoint)
    ctx.say(f"classifier written to {out}")
    ctx.finish()
    return 0


def cmd_predict(ctx: _Ctx) -> int:
    a = ctx.args
    clip = ctx.clip()
    clip_info = {"name": clip.name, "pretrained": clip.pretrained, **export.image_tower_info(clip.model)}
    if a.classifier:
        clf = ctx._classifier
        ctx.pipeline.warn_if_classifier_from_other_image_tower(a.classifier, clf, clip)
    else:  # the classifier export would write, in memory (a checkpoint's own tower warning comes with it)
        clf = export.classifier_of(ctx.pipeline.load_model_checkpoint(a.checkpoint, clip, ctx.device), clip_info)
    task = ctx.predict_task
    ctx.say(f"classifying {len(ctx.images)} images for task {task!r} ...")
    preds = predict_images(clip, clf, task, ctx.images, top_k=a.top_k, device=ctx.device, batch_size=a.batch_size,
                           num_workers=a.workers, skip_bad_images=a.skip_bad_images, progress=ctx.progress)
    out = Path(a.out) if a.out else ctx.run.path("predictions.csv")
    atomic_write_text(out, preds.to_csv())
    counts = preds.counts()
    ctx.run.log("predict", task=task, images=len(preds.paths), skipped=preds.skipped, out=str(out), counts=counts)
    ctx.run.report.add(f"Predictions for task {task}", f"{len(preds.paths)} images, written to `{out}`.\n\n"
                       + "| top-1 class | images |\n|---|---:|\n"
                       + "\n".join(f"| {c} | {n} |" for c, n in counts.items()))
    if preds.skipped:
        warnings.warn(f"{len(preds.skipped)} image(s) could not be decoded and were not classified (first: "
                      f"{preds.skipped[0]}); they are listed in metrics.jsonl")
    ctx.say(f"{len(preds.paths)} images classified: {out}")
    ctx.finish()
    return 0


def _export_bundled_once(ctx: _Ctx, data_dir: Path, seed: int) -> Path:
    """The bundled images in data_dir. Under torchrun rank 0 writes them first
    (its failure stops every rank, naming it); then the first process of each
    other machine writes its own copy if it finds none there (no shared
    filesystem), and the rest only find them complete."""
    if ctx.dist is None:
        return ctx.pipeline.export_bundled(data_dir, seed=seed)
    spec_path = dist_group.main_first(lambda: ctx.pipeline.export_bundled(data_dir, seed=seed),
                                      " exporting the bundled benchmark", describe=_one_line)
    if not ctx.main and ctx.dist.local_rank == 0:
        spec_path = ctx.pipeline.export_bundled(data_dir, seed=seed)
    dist_group.barrier()
    if not ctx.main and ctx.dist.local_rank != 0:
        spec_path = ctx.pipeline.export_bundled(data_dir, seed=seed)
    return spec_path


def cmd_demo(ctx: _Ctx) -> int:
    a = ctx.args
    # The shipped hipro-tiny-clip was pretrained on the images seed 0's split leaves out of
    # its test sets: another split seed would test it on its own pretraining images.
    shipped = pipeline.check_model_args(a.model, a.pretrained, a.model_config) == "hipro-tiny-clip" \
        and a.pretrained is None
    split_seed = 0 if shipped else a.seed
    if split_seed != a.seed:
        ctx.say(f"--seed {a.seed}: the bundled train/test split stays seed 0's (hipro-tiny-clip was pretrained "
                "on the other images); the seed sets the initialisation")
    data_dir = Path(a.data_dir) if a.data_dir else (
        Path(a.cache_dir) if a.cache_dir else default_cache_dir()) / f"bundled-seed{split_seed}"
    ctx.say(f"exporting the bundled benchmark to {data_dir} ...")
    with warnings.catch_warnings():  # its seed warning is about hipro-tiny-clip, which keeps seed 0 here
        warnings.filterwarnings("ignore", message="bundled split seed")
        spec_path = _export_bundled_once(ctx, data_dir, split_seed)
    a.spec = str(spec_path)
    a.epochs = a.epochs if a.epochs is not None else DEMO_DEFAULTS["epochs"]
    if a.affinity_steps is None:
        a.affinity_steps = DEMO_DEFAULTS["affinity_steps"]
    seeds = _seeds(a.seeds, DEMO_DEFAULTS["seeds"])
    ctx.config.update({"spec": a.spec, "epochs": a.epochs, "n_ctx": a.n_ctx, "seeds": seeds,
                       "affinity_steps": a.affinity_steps, "data_dir": str(data_dir)})
    ctx.run.write_config(ctx.config)
    shots = ctx.shot_grid or [_single_shots(a.shots)]
    recipe = TrainConfig(**pipeline.train_config_overrides(TrainConfig, ctx.train_overrides()))
    ctx.say(f"demo settings: shots {shots}, seeds {seeds}, {recipe.describe()}, "
            f"n_ctx {a.n_ctx}, affinity steps {a.affinity_steps}, model {a.model}, device {ctx.device}")
    ctx.run.report.title = "hipro demo (bundled benchmark)"
    ctx.run.report.add("Settings", f"CoOp's protocol: shots {shots}, seeds {seeds} (each seed draws its own "
                                   f"few-shot split), each run trained with {recipe.describe()}, "
                                   f"{a.n_ctx} context tokens per node, "
                                   f"{a.affinity_steps} affinity steps per draw, combine `{a.combine}`, path "
                                   f"weights `{ctx.hipro_options()['path_weights']}`, model `{a.model}`, "
                                   f"device `{ctx.device}`.")
    ctx.features()
    if ctx.shot_grid:
        _compare(ctx, None, seeds)   # "hipro"'s tree comes from each draw's affinity
    else:
        _, _, tree = _affinity_and_tree(ctx)
        _compare(ctx, tree, seeds)
    ctx.say(f"demo took {time.time() - ctx.t0:.0f} s")
    ctx.finish()
    return 0


# Commands that run in a process group under torchrun (export writes outside the run directory).
DIST_COMMANDS = ("cache", "train", "eval", "compare", "affinity", "tree", "demo")
# The commands that read --spec (tree only without --affinity): checked before the run directory opens.
SPEC_COMMANDS = ("cache", "affinity", "train", "eval", "compare")
COMMANDS = {"cache": cmd_cache, "affinity": cmd_affinity, "tree": cmd_tree, "train": cmd_train, "eval": cmd_eval,
            "compare": cmd_compare, "export": cmd_export, "predict": cmd_predict, "demo": cmd_demo}


# ------------------------------------------------------------------ entry point
def _one_line(e: BaseException) -> str:
    msg = str(e).strip()
    if isinstance(e, KeyError) and msg.startswith("'"):
        msg = f"missing key {msg}"
    if isinstance(e, FileNotFoundError) and e.filename and str(e.filename) not in msg:
        msg = f"{msg}: {e.filename}"
    msg = " ".join(msg.split()) or type(e).__name__
    known = (HiproError, ValueError, OSError, NotImplementedError, KeyError)
    if not isinstance(e, known):
        msg = f"{type(e).__name__}: {msg} (rerun with --debug for the traceback)"
    return msg


def _show_warning(message, category, filename, lineno, file=None, line=None):
    text = " ".join(str(message).split())
    print(f"hipro: warning: {text}", file=sys.stderr, flush=True)


def _bench_device(argv: list[str]) -> str:
    """The value of `--device X` / `--device=X` in the bench arguments ("cpu" when absent)."""
    for i, arg in enumerate(argv):
        if arg == "--device" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--device="):
            return arg.split("=", 1)[1]
    return "cpu"


def _bench(argv: list[str]) -> int:
    debug = "--debug" in argv
    argv = [x for x in argv if x != "--debug"]
    try:
        device = _bench_device(argv)
        if device != "cpu" and not re.fullmatch(r"cuda(:\d+)?", device):
            raise CliError(f"--device {device}: hipro bench runs on cpu or cuda[:N]")
        if device.startswith("cuda"):  # `hipro bench --device cuda ...`
            return int(bench_gpu.main(argv) or 0)
        return int(bench.main(without_option(argv, "--device")) or 0)  # the CPU benchmark has no --device
    except SystemExit as e:  # its argparse: --help or a usage error
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except KeyboardInterrupt:
        print("hipro: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001
        if debug:
            raise
        print(f"hipro: error: {_one_line(e)}", file=sys.stderr)
        return 1


class _Terminated(KeyboardInterrupt):
    """SIGTERM delivered as an interrupt (args: the signal number). A
    KeyboardInterrupt, not an Exception: no `except Exception` may swallow a stop."""


def _term_as_interrupt():
    """SIGTERM (a scheduler's or `kill`'s stop) ends the command as Ctrl-C does:
    one line naming the run and how to go on, instead of dying silently. Not in
    a launched worker (torchrun stops its workers with SIGTERM, and reports
    them itself) nor off the main thread. Returns the handler it replaced, or None."""
    if dist_group.launched() or threading.current_thread() is not threading.main_thread():
        return None

    def interrupt(signum, frame):
        raise _Terminated(signum)

    try:
        return signal.signal(signal.SIGTERM, interrupt)
    except (ValueError, OSError):
        return None


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "bench":  # the benchmark has its own parser
        return _bench(argv[1:])
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse already printed a one-line usage error
        return int(e.code or 0)
    debug = bool(getattr(args, "debug", False))
    old_show = warnings.showwarning
    old_term = _term_as_interrupt()
    ctx = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("default")
            warnings.showwarning = _show_warning
            for mod in ("torch", "open_clip", "timm", "torchvision"):
                warnings.filterwarnings("ignore", module=mod)
            if getattr(args, "nproc", None) and not dist_group.launched():
                # `--nproc N`: this process only starts torchrun, whose workers run the command.
                if args.command not in DIST_COMMANDS:
                    raise CliError(f"--nproc: hipro {args.command} runs in one process (multi-process commands: "
                                   f"{', '.join(DIST_COMMANDS)})")
                return run_under_torchrun(args.nproc, argv, args.device)
            if getattr(args, "nproc", None) and os.environ.get("RANK") == "0":
                warnings.warn(f"--nproc {args.nproc} has no effect: this process was started by a launcher "
                              f"(RANK and WORLD_SIZE are set) and joins its group of "
                              f"{os.environ.get('WORLD_SIZE')} process(es)")
            dist_group.init_from_env(args.device, args.dist_timeout)
            ctx = _Ctx(args, args.command)
            return int(COMMANDS[args.command](ctx) or 0)
    except KeyboardInterrupt as e:
        if debug:
            raise
        signum = e.args[0] if e.args and isinstance(e.args[0], int) else signal.SIGINT
        name = signal.Signals(signum).name
        where = ""
        if ctx is not None and ctx.main and getattr(ctx, "run", None) is not None:
            try:
                ctx.run.log("interrupted", signal=name)
            except OSError:
                pass
            how = (f"rerun with --resume --run-dir {ctx.run.dir} to continue it" if args.command in ("train", "compare")
                   else f"its run directory is {ctx.run.dir}")
            where = f"; {how}"
        print(f"hipro: interrupted ({name}){where}", file=sys.stderr)
        return 128 + int(signum)
    except Exception as e:  # noqa: BLE001 - the CLI turns every failure into one line
        if ctx is not None:
            try:
                ctx.run.log("error", type=type(e).__name__, message=str(e))
            except OSError:
                pass
        if debug:
            raise
        rank = dist_group.rank()
        msg = dist_group.collective_failure(e) or _one_line(e)
        if ctx is not None and ctx.main and getattr(ctx, "run", None) is not None:
            again = f"fix the cause and rerun with --run-dir {ctx.run.dir} --overwrite"
            if args.command in ("train", "compare"):
                again += " (or with --resume and the same options, if the failure was transient)"
            msg += f" [the run directory {ctx.run.dir} keeps this failed run: {again}]"
        print(f"hipro: error: {'' if rank == 0 else f'[rank {rank}] '}{msg}", file=sys.stderr)
        return 1
    finally:
        warnings.showwarning = old_show
        if old_term is not None:
            signal.signal(signal.SIGTERM, old_term)
        if ctx is not None and getattr(ctx, "run", None) is not None:
            ctx.run.close()  # its directory's lock: main() may be called again in this process
        dist_group.shutdown()


if __name__ == "__main__":
    sys.exit(main())
