"""The task tree: internal nodes hold contexts shared by their task group,
leaves hold one task's own context.

Node ids are stable strings: "root", then "root/<i>/<j>..." for internal nodes
by position under their parent, and "task/<name>" for the leaf of task <name>.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence
from ..errors import TreeError
from .grouping import nested_from_affinity

ROOT = "root"


def leaf_id(task: str) -> str:
    return f"task/{task}"


@dataclass
class TreeNode:
    id: str
    parent: str | None
    children: list[str] = field(default_factory=list)
    task: str | None = None  # set for leaves


class TaskTree:
    """A rooted tree over tasks; build with from_nested / from_json / from_affinity."""

    def __init__(self, nodes: dict[str, TreeNode]):
        self.nodes = nodes
        self._validate()

    # ------------------------------------------------------------ construction
    @classmethod
    def from_nested(cls, spec: Sequence[Any]) -> "TaskTree":
        """From nested lists of task names: [["a", "b"], ["c", ["d", "e"]]].

        A bare list of names is a flat root. A group with a single member
        collapses into that member.
        """
        if isinstance(spec, str) or not isinstance(spec, (list, tuple)):
            raise TreeError(f"a task tree spec must be a list, got {spec!r}")
        nodes: dict[str, TreeNode] = {ROOT: TreeNode(ROOT, None)}

        def add(parent: str, items: Sequence[Any]) -> None:
            if len(items) == 0:
                raise TreeError(f"empty group under {parent!r}")
            for i, item in enumerate(items):
                while isinstance(item, (list, tuple)) and len(item) == 1:
                    item = item[0]
                if isinstance(item, str):
                    node_id = leaf_id(item)
                    if node_id in nodes:
                        raise TreeError(f"task {item!r} appears twice in the tree")
                    nodes[node_id] = TreeNode(node_id, parent, task=item)
                elif isinstance(item, (list, tuple)):
                    node_id = f"{parent}/{i}"
                    nodes[node_id] = TreeNode(node_id, parent)
                    add(node_id, item)
                else:
                    raise TreeError(f"tree entries must be task names or lists, got {item!r}")
                nodes[parent].children.append(node_id)

        add(ROOT, list(spec))
        return cls(nodes)

    @classmethod
    def flat(cls, tasks: Sequence[str]) -> "TaskTree":
        """Root with one leaf per task (the two-level tree)."""
        return cls.from_nested(list(tasks))

    @classmethod
    def from_json(cls, text_or_path: str | Path) -> "TaskTree":
        """From to_json() output (a string, or a path to a .json file)."""
        text = str(text_or_path)
        if not text.lstrip().startswith(("{", "[")):
            text = Path(text_or_path).read_text()
        data = json.loads(text)
        spec = data["tree"] if isinstance(data, dict) else data
        return cls.from_nested(spec)

    @classmethod
    def from_affinity(cls, matrix, names: Sequence[str], levels: int | None = None,
                      threshold: float | None = None, linkage: str = "average") -> "TaskTree":
        """Agglomerative clustering of an affinity matrix (see hipro_fast.method.grouping)."""
        return tree_from_affinity(matrix, names, levels=levels, threshold=threshold, linkage=linkage)

    # ------------------------------------------------------------ queries
    def _validate(self) -> None:
        if ROOT not in self.nodes:
            raise TreeError("tree has no root")
        for node in self.nodes.values():
            if node.task is None and not node.children:
                raise TreeError(f"internal node {node.id!r} has no children")

    @property
    def tasks(self) -> list[str]:
        """Task names in depth-first order."""
        return [self.nodes[n].task for n in self.dfs() if self.nodes[n].task is not None]

    def dfs(self) -> list[str]:
        out, stack = [], [ROOT]
        while stack:
            n = stack.pop()
            out.append(n)
            stack.extend(reversed(self.nodes[n].children))
        return out

    def path(self, task: str) -> list[str]:
        """Node ids from the root to the task's leaf."""
        node = leaf_id(task)
        if node not in self.nodes:
            raise TreeError(f"task {task!r} is not in the tree (tree tasks: {self.tasks})")
        out = []
        while node is not None:
            out.append(node)
            node = self.nodes[node].parent
        return out[::-1]

    def groups(self, depth: int = 1) -> dict[str, list[str]]:
        """Tasks under each node at `depth` below the root (a task shallower than that is its own group)."""
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 0:
            raise TreeError(f"groups: depth must be a whole number >= 0 (0: the root, one group), got {depth!r}")
        out: dict[str, list[str]] = {}
        for task in self.tasks:
            p = self.path(task)
            out.setdefault(p[min(depth, len(p) - 1)], []).append(task)
        return out

    def tasks_under(self, node: str) -> list[str]:
        """Task names of the leaves below `node` (itself, for a leaf), depth-first."""
        if node not in self.nodes:
            raise TreeError(f"the tree has no node {node!r}")
        out, stack = [], [node]
        while stack:
            n = self.nodes[stack.pop()]
            if n.task is not None:
                out.append(n.task)
            stack.extend(reversed(n.children))
        return out

    def depth(self) -> int:
        return max(len(self.path(t)) for t in self.tasks)

    def check_tasks(self, tasks: Sequence[str]) -> None:
        """Raise TreeError naming the culprit unless the tree holds exactly `tasks`."""
        mine = self.tasks
        missing = [t for t in tasks if t not in mine]
        unknown = [t for t in mine if t not in tasks]
        if missing:
            raise TreeError(f"task {missing[0]!r} is missing from the tree")
        if unknown:
            raise TreeError(f"the tree names unknown task {unknown[0]!r}")

    # ------------------------------------------------------------ output
    def to_nested(self, node: str = ROOT) -> list[Any]:
        out = []
        for child in self.nodes[node].children:
            c = self.nodes[child]
            out.append(c.task if c.task is not None else self.to_nested(child))
        return out

    def to_json(self) -> str:
        return json.dumps({"tree": self.to_nested()}, indent=2)

    def render(self) -> str:
        """Text drawing of the tree."""
        lines = [ROOT]

        def walk(node: str, prefix: str) -> None:
            kids = self.nodes[node].children
            for i, child in enumerate(kids):
                last = i == len(kids) - 1
                c = self.nodes[child]
                label = c.task if c.task is not None else child
                lines.append(f"{prefix}{'└── ' if last else '├── '}{label}")
                walk(child, prefix + ("    " if last else "│   "))

        walk(ROOT, "")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"TaskTree({self.to_nested()!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, TaskTree) and self.to_nested() == other.to_nested()


def tree_from_affinity(matrix, names: Sequence[str], levels: int | None = None,
                       threshold: float | None = None, **rules: Any) -> TaskTree:
    """A TaskTree from a [T, T] task-affinity matrix: the tree of
    :func:`hipro_fast.method.grouping.nested_from_affinity` (same arguments)."""
    return TaskTree.from_nested(nested_from_affinity(matrix, names, levels=levels, threshold=threshold, **rules))
