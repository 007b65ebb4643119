"""data/synth.py: planted problems refuse arguments out of range, naming them."""
from __future__ import annotations

import pytest

from hipro_fast.data.synth import make_planted_problem
from hipro_fast.errors import InvalidInputError
from tests.helpers_training import tiny_clip


@pytest.mark.parametrize("kw, culprit", [
    ({"row_corr": 1.5}, "row_corr must be in [0, 1]"),
    ({"noise": float("nan")}, "noise must be a finite number"),
    ({"test_per_class": -1}, "test_per_class must be an integer >= 1"),
    ({"val_shots": 0}, "val_shots must be an integer >= 1"),
    ({"shots": 1.5}, "shots must be an integer >= 1"),
    ({"n_groups": 2.0}, "n_groups must be an integer >= 1"),
    ({"group_ctx": -2}, "group_ctx must be an integer >= 0"),
    ({"classes_per_task": 1}, "classes_per_task must be an integer >= 2"),
])
def test_arguments_out_of_range_are_named(kw, culprit):
    with pytest.raises(InvalidInputError, match=culprit.replace("[", r"\[").replace("]", r"\]")):
        make_planted_problem(tiny_clip(), **kw)


def test_class_names_are_plain_strings():
    p = make_planted_problem(tiny_clip(), n_groups=1, tasks_per_group=1, classes_per_task=2, test_per_class=1)
    assert all(type(c) is str for names in p.tasks.values() for c in names)
