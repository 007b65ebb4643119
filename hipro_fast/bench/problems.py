"""The benchmarked HiPro prompt configurations, shared by the CPU and GPU runners.

A `Problem` is a task tree with n_ctx context rows per node, each task's class
names, and the combine mode; the forest and every baseline are built from it.

  (a)  4 tasks (Office-Home domains) x 65 Office-Home classes, root -> 2 -> 4, concat
  (b)  the same tree, mean
  (c)  1 task x the first 250 ImageNet classes, a single node (plain CoOp)
  (L)  8 tasks x 250 ImageNet classes, root -> 2 -> 8, concat (GPU only: fills a GPU better)
  sweep points: classes per task on the (a) tree, and tree depth at 65 classes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from ..engine.prompt_forest import class_suffix_tokens
from ..errors import InvalidInputError

OFFICE_HOME_CLASSES = [
    "Alarm_Clock", "Backpack", "Batteries", "Bed", "Bike", "Bottle", "Bucket", "Calculator",
    "Calendar", "Candles", "Chair", "Clipboards", "Computer", "Couch", "Curtains", "Desk_Lamp",
    "Drill", "Eraser", "Exit_Sign", "Fan", "File_Cabinet", "Flipflops", "Flowers", "Folder", "Fork",
    "Glasses", "Hammer", "Helmet", "Kettle", "Keyboard", "Knives", "Lamp_Shade", "Laptop", "Marker",
    "Monitor", "Mop", "Mouse", "Mug", "Notebook", "Oven", "Pan", "Paper_Clip", "Pen", "Pencil",
    "Postit_Notes", "Printer", "Push_Pin", "Radio", "Refrigerator", "Ruler", "Scissors",
    "Screwdriver", "Shelf", "Sink", "Sneakers", "Soda", "Speaker", "Spoon", "TV", "Table",
    "Telephone", "ToothBrush", "Toys", "Trash_Can", "Webcam",
]
OFFICE_HOME_DOMAINS = ["Art", "Clipart", "Product", "Real_World"]


@dataclass
class Problem:
    """A HiPro prompt configuration (tasks, tree, classes, combine mode).

    task_paths: task -> node names from the root down; node_ctx_rows: node ->
    (first row, row count) in the [ctx_rows, W] context table.
    """

    name: str
    description: str
    task_paths: dict[str, list[str]]
    task_classes: dict[str, list[str]]
    node_ctx_rows: dict[str, tuple[int, int]]
    combine: str

    @property
    def ctx_rows(self) -> int:
        return sum(c for _, c in self.node_ctx_rows.values())


def tree_problem(name: str, description: str, n_tasks: int, widths: Sequence[int], classes: Sequence[str],
                 n_ctx: int, combine: str, task_names: Sequence[str] | None = None) -> Problem:
    """Tasks over a tree with `widths[l]` nodes at level l; task i uses node i*w//n_tasks per level."""
    task_names = list(task_names or (OFFICE_HOME_DOMAINS if n_tasks == 4 else [f"task{i}" for i in range(n_tasks)]))
    rows: dict[str, tuple[int, int]] = {}
    for level, w in enumerate(widths):
        for j in range(w):
            rows[f"L{level}N{j}"] = (len(rows) * n_ctx, n_ctx)
    paths = {task_names[i]: [f"L{l}N{i * w // n_tasks}" for l, w in enumerate(widths)] for i in range(n_tasks)}
    return Problem(name, description, paths, {t: list(classes) for t in paths}, rows, combine)


def depth_widths(depth: int, n_tasks: int = 4) -> list[int]:
    """Sweep trees: per-task leaves under a shared chain/tree, e.g. 3 -> [1, 2, 4]."""
    widths = [n_tasks]
    while len(widths) < depth:
        widths.insert(0, max(1, widths[0] // 2))
    return widths


def _imagenet_classnames() -> list[str]:
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES  # open_clip loads lazily (CLI start-up)

    return list(IMAGENET_CLASSNAMES)


def sweep_classnames(tokenizer, n: int) -> list[str]:
    """Office-Home's 65 names, then ImageNet names whose prompt tokens are new."""
    names = list(OFFICE_HOME_CLASSES)
    seen = {tuple(class_suffix_tokens(tokenizer, c)) for c in names}
    for c in _imagenet_classnames():
        if len(names) >= n:
            break
        key = tuple(class_suffix_tokens(tokenizer, c))
        if key not in seen:
            seen.add(key)
            names.append(c)
    if len(names) < n:  # a row labelled with n classes must have n classes
        raise InvalidInputError(f"the sweep has {len(names)} distinct class names (Office-Home + ImageNet), "
                                f"not {n}: choose --sweep-classes of at most {len(names)}")
    return names[:n]


def main_problems(tokenizer, n_ctx: int) -> dict[str, Problem]:
    """Configurations (a), (b), (c). `tokenizer` is unused (kept for a uniform signature)."""
    return {
        "a": tree_problem("a", "4 tasks x 65 Office-Home, root->2->4, concat", 4, [1, 2, 4],
                          OFFICE_HOME_CLASSES, n_ctx, "concat"),
        "b": tree_problem("b", "4 tasks x 65 Office-Home, root->2->4, mean", 4, [1, 2, 4],
                          OFFICE_HOME_CLASSES, n_ctx, "mean"),
        "c": tree_problem("c", "1 task x 250 ImageNet, single node (CoOp)", 1, [1],
                          _imagenet_classnames()[:250], n_ctx, "concat", ["imagenet"]),
    }


def gpu_problems(tokenizer, n_ctx: int) -> dict[str, Problem]:
    """(a), (b), (c) and (L), a larger one that fills a GPU better."""
    out = main_problems(tokenizer, n_ctx)
    out["L"] = tree_problem("L", "8 tasks x 250 ImageNet, root->2->8, concat", 8, [1, 2, 8],
                            _imagenet_classnames()[:250], n_ctx, "concat")
    return out


def sweep_points(tokenizer, classes: Sequence[int], depths: Sequence[int],
                 n_ctx: int) -> list[tuple[str, int, int, Problem]]:
    """(axis, classes per task, depth, problem) of every sweep point, classes first.

    The classes axis keeps the (a) tree (depth 3); the depth axis keeps 65
    Office-Home classes and 4 tasks with per-task leaves (`depth_widths`).
    """
    points = []
    for n in classes:
        points.append(("classes", n, 3, tree_problem(
            f"classes{n}", f"4 tasks x {n} classes, root->2->4, concat", 4, [1, 2, 4],
            sweep_classnames(tokenizer, n), n_ctx, "concat")))
    for d in depths:
        points.append(("depth", 65, d, tree_problem(
            f"depth{d}", f"4 tasks x 65 Office-Home, widths {depth_widths(d)}, concat", 4, depth_widths(d),
            OFFICE_HOME_CLASSES, n_ctx, "concat")))
    return points
