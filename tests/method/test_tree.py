"""TaskTree construction, paths, serialisation and errors."""
import pytest

from hipro_fast.app.plots import plot_tree
from hipro_fast.method.tree import TaskTree, TreeError


def test_nested_paths_and_ids():
    tree = TaskTree.from_nested([["a", "b"], ["c", ["d", "e"]]])
    assert tree.tasks == ["a", "b", "c", "d", "e"]
    assert tree.path("a") == ["root", "root/0", "task/a"]
    assert tree.path("c") == ["root", "root/1", "task/c"]
    assert tree.path("e") == ["root", "root/1", "root/1/1", "task/e"]
    assert tree.depth() == 4
    assert tree.groups(1) == {"root/0": ["a", "b"], "root/1": ["c", "d", "e"]}
    assert tree.groups(0) == {"root": ["a", "b", "c", "d", "e"]}
    for bad in (-1, 1.5, True):  # -1 used to index the path from its end: the leaves, silently
        with pytest.raises(TreeError, match="groups: depth must be a whole number >= 0"):
            tree.groups(bad)


def test_flat_list_is_root_with_leaves():
    tree = TaskTree.from_nested(["x", "y"])
    assert tree.path("y") == ["root", "task/y"]
    assert tree == TaskTree.flat(["x", "y"])


def test_single_member_groups_collapse():
    assert TaskTree.from_nested([["a"], "b"]).path("a") == ["root", "task/a"]


def test_json_round_trip(tmp_path):
    tree = TaskTree.from_nested([["a", "b"], ["c", ["d", "e"]]])
    again = TaskTree.from_json(tree.to_json())
    assert again == tree
    p = tmp_path / "tree.json"
    p.write_text(tree.to_json())
    assert TaskTree.from_json(p) == tree


def test_render_and_plot(tmp_path):
    tree = TaskTree.from_nested([["a", "b"], "c"])
    text = tree.render()
    assert text.splitlines()[0] == "root"
    assert "├── root/0" in text and "│   ├── a" in text and "└── c" in text
    png = plot_tree(tree, tmp_path / "tree.png")
    assert png.stat().st_size > 1000


@pytest.mark.parametrize("spec,match", [
    (["a", "a"], "task 'a' appears twice"),
    ([["a", "b"], ["b"]], "task 'b' appears twice"),
    (["a", []], "empty group"),
    ([1], "task names or lists"),
    ("abc", "must be a list"),
])
def test_bad_specs(spec, match):
    with pytest.raises(TreeError, match=match):
        TaskTree.from_nested(spec)


def test_check_tasks_names_culprit():
    tree = TaskTree.from_nested(["a", "b"])
    with pytest.raises(TreeError, match="task 'c' is missing"):
        tree.check_tasks(["a", "b", "c"])
    with pytest.raises(TreeError, match="unknown task 'b'"):
        tree.check_tasks(["a"])
    with pytest.raises(TreeError, match="task 'zzz' is not in the tree"):
        tree.path("zzz")


def test_tasks_under_a_node():
    tree = TaskTree.from_nested([["a", ["b", "c"]], "d"])
    assert tree.tasks_under("root") == ["a", "b", "c", "d"]
    assert tree.tasks_under("root/0") == ["a", "b", "c"]
    assert tree.tasks_under("root/0/1") == ["b", "c"]
    assert tree.tasks_under("task/d") == ["d"]
    with pytest.raises(TreeError, match="no node 'root/7'"):
        tree.tasks_under("root/7")
