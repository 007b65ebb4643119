"""Baselines and HiPro in one code path, and a comparison table.

Every method is a HiProModel; what differs is the tree and which nodes hold a
context (a node with n_ctx 0 is skipped on its tasks' paths):

    zero-shot      flat tree, root = the tokens of "a photo of a" (frozen), leaves 0:
                   the prompt is exactly "a photo of a {class}."
    coop-per-task  flat tree, root 0, each leaf n_ctx        (T * n_ctx * width params)
    coop-shared    flat tree, root n_ctx, leaves 0           (n_ctx * width params)
    two-level      flat tree, root n_ctx + each leaf n_ctx   ((T + 1) * n_ctx * width)
    hipro          the given (or affinity-built) tree, every node n_ctx
    coop-best-of-3 CoOp per task trained from 3 initialisations (the coop-per-task
                   run and 2 restarts), per task the one with the best validation
                   score: the control for HiPro's per-task selection, which also
                   chooses among 3 trained models on the same validation split
"""
from __future__ import annotations

import math
import operator
import time
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch

from ..data.clip_loading import LoadedClip
from .affinity import task_affinity
from .model import HiProModel, validate_tasks
from .seeding import keyed_seed
from ..engine.prompt_forest import DEFAULT_COMBINE
from .training import Data, TrainConfig, evaluate, fit, validate_data
from .tree import ROOT, TaskTree, leaf_id
from ..errors import InvalidInputError, InvalidTypeError

SELECT_CANDIDATES = ("hipro", "two-level", "coop-per-task")  # preference order on validation ties
# CoOp per task from as many initialisations as per-task selection has candidates,
# chosen per task on the same validation score: choosing the best of 3 trained
# models is worth about a point at 1 shot by itself (best of 3 CoOp seeds +1.01
# over one on the bundled dev split, 12 seeds; benchmarks/results/ablation_hipro.md),
# so HiPro's selection is measured against this, not only against one CoOp run.
BEST_OF = len(SELECT_CANDIDATES)
COOP_BEST_OF = f"coop-best-of-{BEST_OF}"
METHODS = ("zero-shot", "coop-per-task", "coop-shared", "two-level", "hipro", COOP_BEST_OF)
NEEDS_VAL = (COOP_BEST_OF,)  # methods that choose on a validation split
MODEL_METHODS = tuple(m for m in METHODS if m != COOP_BEST_OF)  # one model each (build_method's)
# The options of method "hipro" unless the caller sets them: in combine="mean"
# each task learns how much its path's nodes weigh, starting at 3/4 on its own
# node. The only setting of the ablation (benchmarks/results/ablation_hipro.md)
# that beat CoOp per task on both the planted and the bundled benchmark.
DEFAULT_HIPRO_OPTIONS = {"path_weights": "learned", "leaf_weight": 0.75}
# The protocol's (run_protocol, `hipro compare`, `hipro demo`) default: per-task
# selection on the validation split won on both benchmarks
# (benchmarks/results/ablation_hipro.md). compare() itself keeps None, since it
# may be called without a validation split.
DEFAULT_PROTOCOL_SELECT = "per-task"
SELECT_MODES = (None, "per-task")
# What per-task selection compares on the validation split: its accuracy (ties,
# frequent with one validation image per class, go to SELECT_CANDIDATES' order),
# accuracy with ties broken by the lower cross-entropy, or cross-entropy alone.
# Cross-entropy by default since session 7: under the L-BFGS training default it
# beat accuracy on the bundled dev split (+0.78 at 1-4 shots, 7 of 9 draws; +0.39
# over 1-16 shots) and on the planted benchmark (+0.29); under AdamW the two had
# been within noise (benchmarks/results/ablation_hipro.md).
SELECT_CRITERIA = ("accuracy", "accuracy-then-loss", "loss")
DEFAULT_SELECT_BY = "loss"


def choose_per_task(scores: Mapping[str, Mapping[str, Mapping[str, float]]],
                    select_by: str = DEFAULT_SELECT_BY) -> dict[str, str]:
    """task -> the chosen candidate.

    scores: candidate -> {"val": task -> accuracy, "val_loss": task -> mean
        cross-entropy} on the validation split, candidates in preference order
        (the earlier one wins a tie). A task missing from the validation split
        keeps the first candidate.
    """
    if select_by not in SELECT_CRITERIA:
        raise InvalidInputError(f"select_by must be one of {SELECT_CRITERIA}, got {select_by!r}")
    names = list(scores)
    tasks = list(dict.fromkeys(t for c in names for t in scores[c]["val"]))

    def key(task: str, i: int) -> tuple[float, ...]:
        s = scores[names[i]]
        acc, loss = s["val"].get(task, -1.0), s["val_loss"].get(task, math.inf)
        by = {"accuracy": (acc,), "accuracy-then-loss": (acc, -loss), "loss": (-loss,)}[select_by]
        return (*by, -i)

    return {t: names[max(range(len(names)), key=lambda i: key(t, i))] for t in tasks}
ZERO_SHOT_PREFIX = "a photo of a"  # the template "a photo of a {}."


def _flat_ctx(tasks: Sequence[str], root: int, leaf: int) -> dict[str, int]:
    return {ROOT: root, **{leaf_id(t): leaf for t in tasks}}


def build_method(method: str, clip: LoadedClip | torch.nn.Module, tasks: Mapping[str, Sequence[str]],
                 tree: TaskTree | Sequence[Any] | None = None, n_ctx: int = 16, combine: str = DEFAULT_COMBINE,
                 seed: int = 0, tokenizer=None, ctx_init: str | None = None,
                 **hipro_options: Any) -> HiProModel:
    """The HiProModel of one method (see the module docstring). `ctx_init`
    (HiProModel's: a phrase such as "a photo of a" that the contexts start
    from, fixing their length to its token count) applies to every trained
    method, so that a comparison starts them alike; zero-shot keeps its own
    ZERO_SHOT_PREFIX. `tree` and
    `hipro_options` (HiProModel's path_weights, leaf_weight, init_from_parent,
    parent_prior; DEFAULT_HIPRO_OPTIONS fill the unset ones in combine="mean")
    are used by "hipro" only, except `attention` (HiProModel's text attention
    backend, "tree" or "flex"), which every method uses; zero-shot's context is
    frozen (0 trainable parameters)."""
    names = list(validate_tasks(tasks))
    flat = TaskTree.flat(names)
    # the attention backend is an engine choice, the same for every method (not a hierarchy option)
    kw = dict(tokenizer=tokenizer, seed=seed, attention=hipro_options.pop("attention", "tree"))
    if method == "zero-shot":
        model = HiProModel(clip, tasks, flat, n_ctx=_flat_ctx(names, 1, 0), combine="concat",
                           ctx_init=ZERO_SHOT_PREFIX, **kw)
        for p in model.ctx.values():
            p.requires_grad_(False)
        return model
    kw["ctx_init"] = ctx_init
    if method == "coop-per-task":
        return HiProModel(clip, tasks, flat, n_ctx=_flat_ctx(names, 0, n_ctx), combine=combine, **kw)
    if method == "coop-shared":
        return HiProModel(clip, tasks, flat, n_ctx=_flat_ctx(names, n_ctx, 0), combine=combine, **kw)
    if method == "two-level":
        return HiProModel(clip, tasks, flat, n_ctx=n_ctx, combine=combine, **kw)
    if method == "hipro":
        if tree is None:
            raise InvalidInputError("method 'hipro' needs a tree")
        options = {**(DEFAULT_HIPRO_OPTIONS if combine == "mean" else {}), **hipro_options}
        return HiProModel(clip, tasks, tree, n_ctx=n_ctx, combine=combine, **kw, **options)
    if method == COOP_BEST_OF:
        raise InvalidInputError(f"{COOP_BEST_OF!r} is a choice among coop-per-task models, not one model: build "
                                "'coop-per-task' (compare() trains and chooses them)")
    raise InvalidInputError(f"unknown method {method!r} (methods: {METHODS})")


def restart_seed(seed: int, restart: int) -> int:
    """The initialisation seed of restart `restart` of a run seeded `seed`
    (restart 0 is the run itself)."""
    return int(seed) if restart == 0 else keyed_seed(seed, f"restart/{restart}")


def _restart_name(restart: int) -> str:
    return "coop-per-task" if restart == 0 else f"coop-per-task-restart{restart}"


def checked_seeds(seeds: Any, where: str) -> list[int]:
    """`seeds` as plain ints (numpy integers welcome: JSON, manual_seed), at least
    one, none repeated (a repeated seed fakes a spread: its std is over copies)."""
    try:
        out = [operator.index(s) for s in seeds]
    except TypeError:
        raise InvalidTypeError(f"{where}: seeds must be a list of whole numbers, got {seeds!r}"[:300]) from None
    if not out:
        raise InvalidInputError(f"{where} needs at least one seed")
    repeated = sorted({s for s in out if out.count(s) > 1})
    if repeated:
        raise InvalidInputError(f"{where}: seed {repeated[0]} is repeated in seeds {out} (a repeated seed fakes a "
                                "spread over seeds)")
    return out


def affinity_tree(clip, tasks: Mapping[str, Sequence[str]], train: Data,
                  affinity_config: Mapping[str, Any] | None = None, tokenizer=None) -> TaskTree:
    """A tree from task affinity (hipro_fast.method.affinity.task_affinity + TaskTree.from_affinity).

    affinity_config: keyword arguments; "levels", "threshold" and "linkage" go to
    TaskTree.from_affinity, the rest to task_affinity (or give them explicitly
    as {"affinity": {...}, "tree": {...}}).
    tokenizer: for a bare open_clip model (unless affinity_config names one).
    """
    cfg = dict(affinity_config or {})
    if "affinity" in cfg or "tree" in cfg:
        aff_kw, tree_kw = dict(cfg.get("affinity") or {}), dict(cfg.get("tree") or {})
    else:
        tree_keys = ("levels", "threshold", "linkage")
        tree_kw = {k: v for k, v in cfg.items() if k in tree_keys}
        aff_kw = {k: v for k, v in cfg.items() if k not in tree_keys}
    if tokenizer is not None:
        aff_kw.setdefault("tokenizer", tokenizer)
    result = task_affinity(clip, tasks, train, **aff_kw)
    if isinstance(result, TaskTree):
        return result
    if hasattr(result, "matrix"):  # a result object that carries its own row names
        matrix, names = result.matrix, list(getattr(result, "names", None) or tasks)
    else:  # an array in the order of `tasks` (a torch tensor's .names are its dims' names, not rows')
        matrix, names = result, list(tasks)
    return TaskTree.from_affinity(matrix, names, **tree_kw)


@dataclass
class MethodResult:
    method: str
    task_acc: dict[str, float]          # mean over seeds, fraction in [0, 1]
    mean: float                          # mean over seeds of the mean task accuracy
    std: float                           # std over seeds of the mean task accuracy (ddof=1)
    params: int                          # trainable parameters
    train_seconds: float                 # mean over seeds
    seed_means: list[float] = field(default_factory=list)
    best_epochs: list[int] = field(default_factory=list)
    choices: list[dict[str, str]] = field(default_factory=list)  # per seed, task -> candidate (select)
    # per seed, candidate -> {"val", "val_loss", "test": task -> score}: what selection chose from
    candidates: list[dict[str, dict[str, dict[str, float]]]] = field(default_factory=list)


@dataclass
class ComparisonTable:
    """Per-method test accuracy (mean over seeds) of a compare() run."""

    tasks: list[str]
    seeds: list[int]
    results: dict[str, MethodResult]
    tree: list[Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "tasks": list(self.tasks), "seeds": list(self.seeds), "tree": self.tree,
            "methods": {m: {"task_acc": r.task_acc, "mean": r.mean, "std": r.std, "params": r.params,
                            "train_seconds": r.train_seconds, "seed_means": r.seed_means,
                            "best_epochs": r.best_epochs, "choices": r.choices,
                            **({"candidates": r.candidates} if r.candidates else {})}
                        for m, r in self.results.items()},
        }

    def to_markdown(self) -> str:
        head = ["method", *self.tasks, "mean", "std", "params", "train s"]
        lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
        for m, r in self.results.items():
            cells = [m, *(f"{100 * r.task_acc[t]:.2f}" if t in r.task_acc else "–" for t in self.tasks),
                     f"{100 * r.mean:.2f}",
                     f"{100 * r.std:.2f}", f"{r.params:,}", f"{r.train_seconds:.1f}"]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append(f"\naccuracy in % on the test split, mean over seeds {list(self.seeds)}; "
                     "std = std over seeds of the mean accuracy")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.to_markdown()

    def __getitem__(self, method: str) -> MethodResult:
        return self.results[method]


def default_methods(has_val: bool) -> list[str]:
    """compare()'s methods when none are named: all of METHODS, less those that
    choose on a validation split when there is none."""
    return [m for m in METHODS if has_val or m not in NEEDS_VAL]


def compare(clip: LoadedClip | torch.nn.Module, tasks: Mapping[str, Sequence[str]], train: Data, test: Data,
            val: Data | None = None, methods: Sequence[str] | None = None, seeds: Sequence[int] = (1, 2, 3),
            tree: TaskTree | Sequence[Any] | None = None, n_ctx: int = 16, combine: str = DEFAULT_COMBINE,
            train_config: TrainConfig | None = None, affinity_config: Mapping[str, Any] | None = None,
            tokenizer=None, select: str | None = None, select_by: str = DEFAULT_SELECT_BY,
            ctx_init: str | None = None, **hipro_options: Any) -> ComparisonTable:
    """Train and test every method on the same data, over several seeds.

    Each (method, seed) gets a fresh HiProModel (context init seeded by the seed)
    trained with `train_config` (its seed replaced by the seed; no checkpoints
    unless train_config.checkpoint_dir is set, then one sub-directory per run) and
    tested on `test`. zero-shot is not trained and is evaluated once.
    methods: None = default_methods(val is not None); COOP_BEST_OF needs `val`.
    tree: the tree of "hipro"; None builds one from task affinity.
    hipro_options: HiProModel options of "hipro" (see build_method); `attention`
        among them applies to every method.
    select: None, or "per-task": "hipro" takes for each task the model among
        SELECT_CANDIDATES (its own tree, the flat two-level tree, CoOp per task)
        with the best validation score on that task (see choose_per_task); the
        candidates missing from `methods` are trained too. Needs `val`.
    select_by: the validation score of select and of COOP_BEST_OF's choice, one
        of SELECT_CRITERIA.
    ctx_init: None (random contexts), or a phrase every trained method's
        contexts start from (see build_method); COOP_BEST_OF's restarts then
        start alike and differ only by the training's sampling order (not at
        all under full-batch training).
    """
    methods = default_methods(val is not None) if methods is None else list(methods)
    for m in methods:
        if m not in METHODS:
            raise InvalidInputError(f"unknown method {m!r} (methods: {METHODS})")
    seeds = checked_seeds(seeds, "compare")
    names = list(validate_tasks(tasks))
    base = train_config or TrainConfig()
    hipro_tree = None
    if "hipro" in methods:
        hipro_tree = tree if tree is not None else affinity_tree(clip, tasks, train, affinity_config, tokenizer)
        hipro_tree = hipro_tree if isinstance(hipro_tree, TaskTree) else TaskTree.from_nested(hipro_tree)
    if select not in SELECT_MODES:
        raise InvalidInputError(f"select must be one of {SELECT_MODES}, got {select!r}")
    if select == "per-task" and val is None:
        raise InvalidInputError("select='per-task' chooses on the validation split: pass val=")
    if select_by not in SELECT_CRITERIA:
        raise InvalidInputError(f"select_by must be one of {SELECT_CRITERIA}, got {select_by!r}")
    for m in methods:
        if m in NEEDS_VAL and val is None:
            raise InvalidInputError(f"method {m!r} chooses on the validation split: pass val= (or leave {m!r} out)")
    # Every (method, seed) is trained once; "hipro" with select="per-task" then
    # takes, task by task, the candidate with the best validation score, so
    # the hierarchy is used only where the validation data says it helps.
    # COOP_BEST_OF trains no model of its own: it chooses among coop-per-task and its restarts.
    needed = [m for m in methods if m in MODEL_METHODS]
    needed += [m for m in (SELECT_CANDIDATES if select and "hipro" in methods else ()) if m not in needed]
    restarts = [_restart_name(r) for r in range(BEST_OF)] if COOP_BEST_OF in methods else []
    needed += [r for r in restarts if r not in needed]
    runs: dict[tuple[str, int], dict[str, Any]] = {}
    for name in needed:
        method = "coop-per-task" if name in restarts else name
        run_seeds = list(seeds)[:1] if method == "zero-shot" else list(seeds)
        for seed in run_seeds:
            init_seed = restart_seed(seed, restarts.index(name)) if name in restarts else seed
            model = build_method(method, clip, tasks, hipro_tree, n_ctx, combine, seed=init_seed,
                                 tokenizer=tokenizer, ctx_init=ctx_init, **hipro_options)
            if not runs:  # the test (and val) data against the first model, before anything is trained
                validate_data(model, test, role="test", require_all=False)
                if val is not None:
                    validate_data(model, val, role="val", require_all=False)
            run: dict[str, Any] = {"params": model.num_trainable_parameters(), "seconds": 0.0, "best_epoch": None}
            t0 = time.perf_counter()
            if method != "zero-shot":
                overrides: dict[str, Any] = {"seed": init_seed}
                if base.checkpoint_dir is not None:
                    overrides["checkpoint_dir"] = f"{base.checkpoint_dir}/{name}-seed{seed}"
                result = fit(model, train, val, base, **overrides)
                run["best_epoch"] = result.best_epoch
                run["seconds"] = time.perf_counter() - t0
            run["test"] = evaluate(model, test, batch_size=base.eval_batch_size)
            if select or name in restarts:
                run["val"] = evaluate(model, val, batch_size=base.eval_batch_size)
                run["val_loss"] = evaluate(model, val, batch_size=base.eval_batch_size, metric="loss")
            runs[(name, seed)] = run
    results: dict[str, MethodResult] = {}
    for method in methods:
        run_seeds = list(seeds)[:1] if method == "zero-shot" else list(seeds)
        accs, seconds, best_epochs, params, choices, candidates = [], [], [], 0, [], []
        for seed in run_seeds:
            chooses_among = SELECT_CANDIDATES if method == "hipro" and select == "per-task" else \
                restarts if method == COOP_BEST_OF else None
            run = runs[(chooses_among[0] if chooses_among else method, seed)]
            if chooses_among:
                cands = {m: {k: runs[(m, seed)][k] for k in ("val", "val_loss", "test")} for m in chooses_among}
                chosen = choose_per_task(cands, select_by)
                chosen = {t: chosen.get(t, chooses_among[0]) for t in run["test"]}
                accs.append({t: cands[m]["test"][t] for t, m in chosen.items()})
                choices.append(chosen)
                candidates.append(cands)
                params = sum(runs[(m, seed)]["params"] for m in chooses_among)
                seconds.append(sum(runs[(m, seed)]["seconds"] for m in chooses_among))
            else:
                accs.append(run["test"])
                params = run["params"]
                seconds.append(run["seconds"])
            if run["best_epoch"] is not None:
                best_epochs.append(run["best_epoch"])
        test_tasks = [t for t in names if t in accs[0]]
        task_acc = {t: sum(a[t] for a in accs) / len(accs) for t in test_tasks}
        seed_means = [sum(a[t] for t in test_tasks) / len(test_tasks) for a in accs]
        mean = sum(seed_means) / len(seed_means)
        std = math.sqrt(sum((s - mean) ** 2 for s in seed_means) / (len(seed_means) - 1)) \
            if len(seed_means) > 1 else 0.0
        results[method] = MethodResult(method, task_acc, mean, std, params,
                                       sum(seconds) / len(seconds), seed_means, best_epochs, choices, candidates)
    table_tasks = [t for t in names if t in test]
    return ComparisonTable(table_tasks, list(seeds), results,
                           hipro_tree.to_nested() if hipro_tree is not None else None)
