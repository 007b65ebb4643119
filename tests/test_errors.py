"""The error contract (README: "every library error derives from
hipro_fast.errors.HiproError"): checked on the package's source, so a new
``raise ValueError(...)`` anywhere fails here, and on a few public entry
points, so the classes also keep the builtin base that ``except`` code relies on."""
from __future__ import annotations

import ast
import builtins
import inspect
from pathlib import Path

import pytest

from hipro_fast import errors
from hipro_fast.errors import HiproError

PACKAGE = Path(__file__).resolve().parents[1] / "hipro_fast"
BUILTIN_EXCEPTIONS = {name for name, obj in vars(builtins).items()
                      if isinstance(obj, type) and issubclass(obj, BaseException)}
# Raised on purpose, and not errors of the caller's making: a broken internal
# invariant, a program's exit status, and the protocol of a module __getattr__.
ALLOWED = {"AssertionError", "SystemExit"}


def _builtin_raises(path: Path, root: Path = PACKAGE.parent) -> list[str]:
    found = []

    def visit(node: ast.AST, function: str | None) -> None:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            function = node.name
        if isinstance(node, ast.Raise) and node.exc is not None:
            target = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
            name = target.id if isinstance(target, ast.Name) else None
            if (name in BUILTIN_EXCEPTIONS and name not in ALLOWED
                    and not (name == "AttributeError" and function == "__getattr__")):
                found.append(f"{path.relative_to(root)}:{node.lineno}: raise {name}")
        for child in ast.iter_child_nodes(node):
            visit(child, function)

    visit(ast.parse(path.read_text(), filename=str(path)), None)
    return found


def test_the_package_raises_no_bare_builtin_exception():
    offenders = [hit for p in sorted(PACKAGE.rglob("*.py")) for hit in _builtin_raises(p)]
    assert offenders == [], ("raise a hipro_fast.errors class (they keep the builtin base) instead of:\n"
                             + "\n".join(offenders))


def test_the_source_check_sees_a_bare_raise(tmp_path):
    bad = tmp_path / "probe.py"
    bad.write_text("def f(x):\n    if x:\n        raise ValueError('x')\n    raise KeyError(x)\n"
                   "def __getattr__(name):\n    raise AttributeError(name)\n"
                   "class C:\n    def g(self):\n        raise AttributeError('g')\n")
    assert _builtin_raises(bad, root=tmp_path) == [
        "probe.py:3: raise ValueError", "probe.py:4: raise KeyError", "probe.py:9: raise AttributeError"]


def test_every_error_class_derives_from_hipro_error():
    classes = [c for _, c in inspect.getmembers(errors, inspect.isclass) if c.__module__ == errors.__name__]
    assert len(classes) > 10
    assert [c.__name__ for c in classes if not issubclass(c, HiproError)] == []


def _train_config_bad_optimizer():
    from hipro_fast.method.training import TrainConfig
    TrainConfig(optimizer="adamax").validate()


def _train_config_unknown_option():
    from hipro_fast.method.training import _resolve_config  # what fit(..., **overrides) calls
    _resolve_config(None, {"learning_rate": 1.0})


def _checkpoint_missing(tmp_path):
    from hipro_fast.method.checkpoint import load_checkpoint
    load_checkpoint(tmp_path / "nowhere")


def _classifier_missing(tmp_path):
    from hipro_fast.method.export import Classifier
    Classifier.load(tmp_path / "missing.safetensors")


def _grouping_bad_linkage():
    import numpy as np

    from hipro_fast.method.grouping import linkage_matrix
    linkage_matrix(np.zeros((3, 3)), "nearest")


@pytest.mark.parametrize(("call", "builtin", "match"), [
    (lambda tmp: _train_config_bad_optimizer(), ValueError, "adamax"),
    (lambda tmp: _train_config_unknown_option(), TypeError, "learning_rate"),
    (_checkpoint_missing, FileNotFoundError, "checkpoint"),
    (_classifier_missing, FileNotFoundError, "missing.safetensors"),
    (lambda tmp: _grouping_bad_linkage(), ValueError, "nearest"),
], ids=["train-config-value", "train-config-option", "checkpoint-missing", "classifier-missing", "linkage"])
def test_public_entry_points_raise_hipro_errors_with_their_builtin_base(tmp_path, call, builtin, match):
    with pytest.raises(HiproError, match=match) as info:
        call(tmp_path)
    assert isinstance(info.value, builtin)
