"""CoOp's few-shot protocol: accuracy against the number of shots, over seeds
that each draw their own few-shot split.

For every (shots K, seed): draw K training images per class from each task's
training pool and a few-shot validation set of min(K, 4) images per class
(CoOp's rule) from the task's validation split when it has one, else from the
training images not drawn for training, then train every method on that draw, choose whatever is
chosen (best epoch, the tree of "hipro") on the validation set, and score the
test split, which informs no choice. The draw depends on (task, K, seed) only.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
import zlib
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from ..data.feature_cache import stack_views
from ..distributed import group as dist_group
from ..errors import DistributedError, FewShotError, InvalidInputError
from .baselines import (BEST_OF, COOP_BEST_OF, DEFAULT_PROTOCOL_SELECT, DEFAULT_SELECT_BY, METHODS,
                        SELECT_CANDIDATES, ComparisonTable, checked_seeds, choose_per_task, compare)
from .selection import Selection, clear_selection, save_selection
from .task_data import validate_task_data
from .training import Data, TrainConfig

__all__ = ["FewShotDraw", "val_shots_for", "draw_few_shot", "ProtocolResult", "run_protocol",
           "DEFAULT_SHOTS", "DEFAULT_SEEDS", "PARALLEL_MODES"]

DEFAULT_SHOTS = (1, 2, 4, 8, 16)
DEFAULT_SEEDS = (0, 1, 2)
# How a process group of several ranks shares the protocol: "draws" (each rank
# trains whole (shots, seed) draws alone, round-robin; the protocol's draws are
# independent, so this scales with the ranks) or "classes" (every rank works on
# every draw, the prompt forest sharded by class: for label spaces too large
# for one device).
PARALLEL_MODES = ("draws", "classes")


def val_shots_for(shots: int) -> int:
    """CoOp's few-shot validation size per class: min(K, 4)."""
    return min(int(shots), 4)


def _images(n: int, kind: str) -> str:
    return f"{n} {kind} image{'' if n == 1 else 's'}"


def check_shot_counts(task: str, classes: Sequence[str], train_counts: Sequence[int],
                      val_counts: Sequence[int] | None, shots: int) -> None:
    """Raise FewShotError, as draw_few_shot would, when a class has too few images
    for `shots` (+ min(shots, 4) validation shots, drawn from the training images
    when the task has no validation split, `val_counts` None): the check a
    command makes from its spec before it encodes anything."""
    val_shots = val_shots_for(shots)
    for name, n_train, n_val in zip(classes, train_counts, val_counts or [None] * len(classes)):
        need = shots if val_counts is not None else shots + val_shots
        if n_train < need:
            extra = "" if val_counts is not None else f" + {val_shots} validation shots"
            raise FewShotError(f"task {task!r}, class {name!r}: {_images(n_train, 'training')}, but {shots} shots"
                               f"{extra} need {need}; lower --shots")
        if n_val is not None and n_val < val_shots:
            raise FewShotError(f"task {task!r}, class {name!r}: {_images(n_val, 'validation')}, but {shots} shots "
                               f"need {val_shots} validation shots; lower --shots")


@dataclass
class FewShotDraw:
    """One seed's few-shot split. train / val: task -> (features [N, D], labels [N]);
    indices: task -> (train rows into the task's pool, val rows into its
    validation pool when it has one, else into the pool)."""

    shots: int
    seed: int
    train: dict[str, tuple[torch.Tensor, torch.Tensor]]
    val: dict[str, tuple[torch.Tensor, torch.Tensor]]
    indices: dict[str, tuple[torch.Tensor, torch.Tensor]]


def _draw_seed(task: str, shots: int, seed: int) -> int:
    return int(np.random.SeedSequence([zlib.crc32(task.encode("utf-8")), int(shots), int(seed)])
               .generate_state(1)[0])


def draw_few_shot(tasks: Mapping[str, Sequence[str]], pool: Data, shots: int, seed: int,
                  val_shots: int | None = None,
                  pool_views: Mapping[str, torch.Tensor] | None = None,
                  val_pool: Data | None = None) -> FewShotDraw:
    """K training and min(K, 4) validation images per class from each task's pool.

    Args:
        tasks: task -> class names.
        pool: task -> (features [N, D], labels [N]): every training image of the task.
        shots: K >= 1.
        seed: the draw's seed (each seed draws its own split).
        val_shots: validation images per class (default min(K, 4); 0 = no validation set).
        val_pool: task -> (features, labels) of a validation split to draw the
            validation shots from (tasks without one draw them from the pool).
        pool_views: task -> [N, V, D] augmented views of the pool's images: the
            training split then holds every view of each drawn image as a sample
            (the draw is made on images, so no image has views on both sides).
    Raises:
        FewShotError naming the task and class when a class has fewer than
        K + val_shots images (no silent fallback: the draw would not be K-shot).
    """
    if isinstance(shots, bool) or int(shots) != shots or shots < 1:
        raise FewShotError(f"shots must be an integer >= 1, got {shots!r}")
    shots = int(shots)
    val_shots = val_shots_for(shots) if val_shots is None else int(val_shots)
    if val_shots < 0:
        raise FewShotError(f"val_shots must be >= 0, got {val_shots}")
    dim = next(iter(pool.values()))[0].shape[1] if pool else 0
    data = validate_task_data(tasks, pool, dim, role="training pool", require_all=True)
    vdata = validate_task_data(tasks, val_pool, dim, role="validation pool", require_all=False) if val_pool else {}
    train, val, indices = {}, {}, {}
    for task, classes in tasks.items():
        x, y = data[task]
        own_val = task in vdata
        gen = np.random.default_rng(_draw_seed(task, shots, seed))
        tr, va = [], []
        for label, name in enumerate(classes):
            rows = (y == label).nonzero().flatten().cpu().numpy()
            need = shots if own_val else shots + val_shots
            if rows.size < need:
                extra = "" if own_val else f" + {val_shots} validation shots"
                raise FewShotError(
                    f"task {task!r}, class {name!r}: {_images(rows.size, 'training')}, but {shots} shots{extra} "
                    f"need {need}; lower --shots")
            picked = gen.permutation(rows)
            tr.append(np.sort(picked[:shots]))
            if own_val:
                vrows = (vdata[task][1] == label).nonzero().flatten().cpu().numpy()
                if vrows.size < val_shots:
                    raise FewShotError(f"task {task!r}, class {name!r}: {_images(vrows.size, 'validation')}, but "
                                       f"{shots} shots need {val_shots} validation shots; lower --shots")
                va.append(np.sort(gen.permutation(vrows)[:val_shots]))
            else:
                va.append(np.sort(picked[shots:need]))
        tr_idx = torch.from_numpy(np.concatenate(tr)).to(x.device)
        va_idx = torch.from_numpy(np.concatenate(va)).to(x.device)
        if pool_views is not None and task in pool_views:
            train[task] = stack_views(pool_views[task][tr_idx], y[tr_idx])
        else:
            train[task] = (pool[task][0][tr_idx], y[tr_idx])
        if val_shots:
            vx, vy = (val_pool[task][0], vdata[task][1]) if own_val else (pool[task][0], y)
            val[task] = (vx[va_idx], vy[va_idx])
        indices[task] = (tr_idx, va_idx)
    return FewShotDraw(shots, int(seed), train, val, indices)


@dataclass
class ProtocolResult:
    """Test accuracy of every method at every shot count and seed.

    runs[(shots, seed)] is that draw's ComparisonTable (one seed); trees records
    the tree "hipro" used on each draw.
    """

    tasks: list[str]
    shots: list[int]
    seeds: list[int]
    methods: list[str]
    runs: dict[tuple[int, int], ComparisonTable] = field(default_factory=dict)
    select: str | None = None  # how "hipro" was chosen (see compare's select)
    select_by: str = DEFAULT_SELECT_BY  # on which validation score (see compare's select_by)

    def seed_means(self, method: str, shots: int) -> list[float]:
        """Mean task accuracy (fraction) of each seed."""
        return [self.runs[(shots, s)][method].mean for s in self.seeds if (shots, s) in self.runs]

    def mean_std(self, method: str, shots: int) -> tuple[float, float | None]:
        """(mean over seeds, std over seeds with ddof 1; None with one seed)."""
        v = self.seed_means(method, shots)
        m = sum(v) / len(v)
        if len(v) < 2:
            return m, None
        return m, math.sqrt(sum((a - m) ** 2 for a in v) / (len(v) - 1))

    def task_mean(self, method: str, shots: int) -> dict[str, float]:
        """Per-task accuracy (fraction), mean over seeds, of the tasks that were
        scored (a task without test images has none: it is left out, as from the
        mean)."""
        tables = [self.runs[(shots, s)] for s in self.seeds if (shots, s) in self.runs]
        return {t: sum(tb[method].task_acc[t] for tb in tables) / len(tables) for t in self.tasks
                if all(t in tb[method].task_acc for tb in tables)}

    def margin_over_best_baseline(self, shots: int, method: str = "hipro") -> tuple[float, str] | None:
        """(mean of `method` - mean of the best other trained method, its name): the
        "HiPro - best baseline" row. None when `method` or no baseline ran."""
        others = [m for m in self.methods if m != method]
        if method not in self.methods or not others:
            return None
        best = max(others, key=lambda m: self.mean_std(m, shots)[0])
        return self.mean_std(method, shots)[0] - self.mean_std(best, shots)[0], best

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"tasks": self.tasks, "shots": self.shots, "seeds": self.seeds,
                               "methods": self.methods, "select": self.select,
                               "select_by": self.select_by, "results": {}}
        for k in self.shots:
            out["results"][str(k)] = {
                m: {"mean": self.mean_std(m, k)[0], "std": self.mean_std(m, k)[1],
                    "seed_means": self.seed_means(m, k), "task_acc": self.task_mean(m, k)}
                for m in self.methods}
            out["results"][str(k)]["trees"] = {str(s): self.runs[(k, s)].tree for s in self.seeds
                                               if (k, s) in self.runs}
            if self.select is not None and "hipro" in self.methods:  # each task's pick on each draw
                out["results"][str(k)]["choices"] = {str(s): self.runs[(k, s)]["hipro"].choices[0]
                                                     for s in self.seeds if (k, s) in self.runs}
            if COOP_BEST_OF in self.methods:  # which initialisation each task kept on each draw
                out["results"][str(k)][f"{COOP_BEST_OF} choices"] = {
                    str(s): self.runs[(k, s)][COOP_BEST_OF].choices[0] for s in self.seeds if (k, s) in self.runs}
        return out

    def summary_markdown(self) -> str:
        """Methods x shots: mean accuracy (%) over seeds, ± std when there are
        several seeds, and the "hipro - best baseline" row."""
        several = len(self.seeds) > 1
        head = "| method | " + " | ".join(f"{k} shot{'s' if k > 1 else ''}" for k in self.shots) + " |"
        lines = [head, "|---" + "|---:" * len(self.shots) + "|"]
        for m in self.methods:
            cells = []
            for k in self.shots:
                mean, std = self.mean_std(m, k)
                cells.append(f"{100 * mean:.2f} ± {100 * std:.2f}" if several else f"{100 * mean:.2f}")
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
        margins = [self.margin_over_best_baseline(k) for k in self.shots]
        if all(x is not None for x in margins):
            lines.append("| **hipro − best baseline** | " + " | ".join(
                f"{100 * d:+.2f} (vs {b})" for d, b in margins) + " |")
        seeds = f"seeds {self.seeds}" if several else f"one seed ({self.seeds[0]}; no spread)"
        lines.append(f"\ntest accuracy in %, mean over tasks, then over {seeds}; each seed draws its own "
                     "few-shot split; best epoch and tree chosen on the few-shot validation split"
                     + ("; hipro takes, task by task, the best of its tree, the flat two-level tree and CoOp "
                        f"per task on that split (by {self.select_by})" if self.select == "per-task" else "")
                     + (f"; {COOP_BEST_OF} takes, task by task, the best of {BEST_OF} CoOp per task "
                        f"initialisations on that split (by {self.select_by})" if COOP_BEST_OF in self.methods
                        else ""))
        return "\n".join(lines)

    def shot_table_markdown(self, shots: int) -> str:
        """Per-task accuracy (%) of every method at one shot count, mean over seeds,
        and the method's trainable parameters."""
        head = ["method", *self.tasks, "mean"] + (["std"] if len(self.seeds) > 1 else []) + ["params"]
        lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
        for m in self.methods:
            acc = self.task_mean(m, shots)
            mean, std = self.mean_std(m, shots)
            cells = [m, *(f"{100 * acc[t]:.2f}" if t in acc else "–" for t in self.tasks), f"{100 * mean:.2f}"]
            if std is not None:
                cells.append(f"{100 * std:.2f}")
            first = next(self.runs[(shots, s)] for s in self.seeds if (shots, s) in self.runs)
            cells.append(f"{first[m].params:,}")
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)


def run_protocol(clip, tasks: Mapping[str, Sequence[str]], pool: Data, test: Data, *,
                 shots: Sequence[int] = DEFAULT_SHOTS, seeds: Sequence[int] = DEFAULT_SEEDS,
                 methods: Sequence[str] = METHODS, tree: Any = None, n_ctx: int = 16,
                 combine: str | None = None, train_config: TrainConfig | None = None,
                 affinity_config: Mapping[str, Any] | None = None, tokenizer=None,
                 on_run: Callable[[int, int, ComparisonTable], None] | None = None,
                 pool_views: Mapping[str, torch.Tensor] | None = None, val_pool: Data | None = None,
                 parallel: str = "draws", **method_options: Any) -> ProtocolResult:
    """Every method on every (shots, seed), each seed with its own few-shot draw.

    Args:
        pool: task -> (features, labels) of every training image (the draws come from it).
        test: task -> (features, labels), scored only.
        shots / seeds: the grid; tree: the tree of "hipro" (None = from task
            affinity on each draw's training split); combine, n_ctx,
            method_options: as hipro_fast.compare; `select` defaults to
            DEFAULT_PROTOCOL_SELECT ("per-task": every draw has a validation
            split; pass select=None for HiPro's tree alone).
        on_run: called after each (shots, seed) with its table (progress, logs).
        pool_views / val_pool: see draw_few_shot.
        train_config.checkpoint_dir: each draw checkpoints under
            <dir>/shots<K>-seed<S>/<method>-seed<S> (resume continues each there);
            with per-task selection, <dir>/shots<K>-seed<S>/selection.json then
            records HiPro's choice among those folders, so that the folder
            loads (hipro eval / export) as the HiPro the draw measured.
        parallel: under a process group of several ranks (torchrun), one of
            PARALLEL_MODES. "draws": rank r trains draws r, r + W, ... alone
            (in rounds of W draws; each draw's result equals a one-process
            run's, and each rank writes its own draws' checkpoints, so on
            several machines the checkpoint directory must be shared for a
            resume); every rank returns the whole result and sees every
            on_run call, in the one-process order. "classes": every draw on
            all ranks, the forest sharded by class. Ignored in one process.
    """
    if parallel not in PARALLEL_MODES:
        raise InvalidInputError(f"parallel must be one of {PARALLEL_MODES}, got {parallel!r}")
    method_options.setdefault("select", DEFAULT_PROTOCOL_SELECT)
    seeds = checked_seeds(seeds, "run_protocol")
    if isinstance(shots, (int, str)) or not all(isinstance(k, numbers.Integral) and not isinstance(k, bool)
                                                for k in shots):  # 2.5 ran 2 shots
        raise FewShotError(f"run_protocol: shots must be a list of whole numbers, got {shots!r}"[:300])
    shots = [int(k) for k in shots]
    if not shots:
        raise FewShotError("the protocol needs at least one shot count and one seed")
    if len(set(shots)) != len(shots):
        raise FewShotError(f"run_protocol: a shot count is repeated in shots {shots}")
    # Validate every draw before training anything: a class too small for the
    # largest K fails now, not after an hour of training the smaller ones.
    draws = {(k, s): draw_few_shot(tasks, pool, k, s, pool_views=pool_views, val_pool=val_pool)
             for k in shots for s in seeds}
    dim = next(iter(pool.values()))[0].shape[1]
    validate_task_data(tasks, test, dim, role="test", require_all=False)  # found now, not after the training
    result = ProtocolResult(list(tasks), shots, seeds, list(methods), select=method_options["select"],
                            select_by=method_options.get("select_by", DEFAULT_SELECT_BY))
    kw = dict(methods=methods, tree=tree, n_ctx=n_ctx, train_config=train_config,
              affinity_config=affinity_config, tokenizer=tokenizer, **method_options)
    if combine is not None:
        kw["combine"] = combine

    main_rank = dist_group.is_main()  # read here: inside local_only every rank is rank 0

    def run_draw(key: tuple[int, int]) -> ComparisonTable:
        k, s = key
        d = draws[key]
        config = train_config
        if config is not None and config.checkpoint_dir is not None:
            config = dataclasses.replace(config, checkpoint_dir=f"{config.checkpoint_dir}/shots{k}-seed{s}")
        if config is not None and config.progress and not main_rank:
            config = dataclasses.replace(config, progress=False)  # one rank draws the bars
        saving = config is not None and config.checkpoint_dir is not None
        if saving:  # rewritten once the draw is done: present only beside the candidates it chose among
            clear_selection(config.checkpoint_dir, f" of the draw of {k} shots, seed {s}")
        table = compare(clip, tasks, d.train, test, val=d.val or None, seeds=(s,), **{**kw, "train_config": config})
        if saving:  # rank 0 writes (each rank its own draws under "draws"); its failure stops every rank
            dist_group.main_first(lambda: save_draw_selection(config.checkpoint_dir, table, list(tasks), k, s,
                                                              kw.get("select_by", DEFAULT_SELECT_BY)),
                                  f" writing the selection of the draw of {k} shots, seed {s}")
        return table

    order = [(k, s) for k in shots for s in seeds]
    group = dist_group.current()
    width = group.world_size if group is not None and parallel == "draws" else 1
    # A rank waits for the slowest draw of its round: longer than --dist-timeout allows a peer to stall.
    waiting = dist_group.unbounded_wait_group() if width > 1 else None
    for i in range(0, len(order), width):
        keys = order[i:i + width]
        tables = [run_draw(keys[0])] if width == 1 else _run_round_by_rank(keys, run_draw, group, waiting)
        for key, table in zip(keys, tables):
            result.runs[key] = table
            if on_run is not None:
                on_run(key[0], key[1], table)
    return result


def save_draw_selection(directory: str, table: ComparisonTable, tasks: Sequence[str], shots: int, seed: int,
                        select_by: str) -> None:
    """Write <directory>/selection.json: HiPro's per-task choice on this draw
    among its candidates' checkpoint folders (<candidate>-seed<S>), from the
    validation scores compare chose on (every task of `tasks`: one without
    validation data keeps the first candidate, as in compare). Nothing without
    per-task selection."""
    result = table.results.get("hipro")
    if result is None or not result.candidates:
        return
    scores = result.candidates[0]
    folder = {m: f"{m}-seed{seed}" for m in SELECT_CANDIDATES}
    picks = choose_per_task({m: scores[m] for m in SELECT_CANDIDATES}, select_by)
    choices = {t: folder[picks.get(t, SELECT_CANDIDATES[0])] for t in tasks}
    save_selection(directory, Selection(select_by, [folder[m] for m in SELECT_CANDIDATES], choices,
                                        {folder[m]: dict(scores[m]["val"]) for m in SELECT_CANDIDATES},
                                        {folder[m]: dict(scores[m]["val_loss"]) for m in SELECT_CANDIDATES},
                                        {"shots": int(shots), "seed": int(seed), "source": "protocol"}))


def _run_round_by_rank(keys: Sequence[tuple[int, int]], run_draw: Callable[[tuple[int, int]], ComparisonTable],
                       group: dist_group.DistInfo, waiting: Any) -> list[ComparisonTable]:
    """Rank r trains draw keys[r] alone (a world of one: no sharding, no
    collectives, its own checkpoints); every rank gets every draw's table.
    A draw that fails on one rank fails the round on every rank, naming it."""
    outcome: tuple[str, Any] = ("idle", None)
    if group.rank < len(keys):
        try:
            with dist_group.local_only():
                outcome = ("ok", run_draw(keys[group.rank]))
        except Exception as e:  # noqa: BLE001 - told to the other ranks, then raised here
            dist_group.all_gather_object(("error", f"{type(e).__name__}: {e}"), group=waiting)
            raise
    gathered = dist_group.all_gather_object(outcome, group=waiting)
    for r, (status, value) in enumerate(gathered):
        if status == "error":
            k, s = keys[r]
            raise DistributedError(f"rank {r} failed on the draw of {k} shots, seed {s}: {value}")
    return [value for status, value in gathered[:len(keys)]]
