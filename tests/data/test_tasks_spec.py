"""Multi-task spec files: sources, splits, class names, few-shot draws, bad input."""
import os
import shutil
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hipro_fast.data.tasks_spec import (BadImageError, FewShotWarning, SpecError, few_shot, load_spec, parse_spec,
                                   read_image)


def _png(path: Path, seed: int = 0, size: int = 16) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray((rng.random((size, size, 3)) * 255).astype("uint8")).save(path)
    return path


def _folder(root: Path, classes: dict[str, int], seed: int = 0) -> Path:
    for c, n in classes.items():
        for i in range(n):
            _png(root / c / f"{i:02d}.png", seed=seed * 1000 + zlib.crc32(c.encode()) % 997 + i)
    return root


def _spec(tmp_path: Path, text: str):
    p = tmp_path / "tasks.toml"
    p.write_text(text)
    return load_spec(p)


def test_image_folder_with_seeded_split_is_stratified_and_deterministic(tmp_path):
    _folder(tmp_path / "d", {"cat": 10, "dog": 10, "emu": 10})
    text = '[[task]]\nname = "pets"\nimages = "d"\nsplit = {val = 0.2, test = 0.3, seed = 4}\n'
    a, b = _spec(tmp_path, text), _spec(tmp_path, text)
    t = a.tasks["pets"]
    assert t.classes == ["cat", "dog", "emu"]
    assert t.counts() == {"train": 15, "val": 6, "test": 9}
    for split in ("train", "val", "test"):
        labels = [r.label for r in t.splits[split]]
        assert sorted(set(labels)) == [0, 1, 2]  # stratified
        assert t.splits[split] == b.tasks["pets"].splits[split]  # deterministic
    paths = [set(r.path for r in t.splits[s]) for s in ("train", "val", "test")]
    assert not (paths[0] & paths[1]) and not (paths[0] & paths[2]) and not (paths[1] & paths[2])
    other = _spec(tmp_path, text.replace("seed = 4", "seed = 5")).tasks["pets"]
    assert other.splits["test"] != t.splits["test"]


def test_default_split_and_given_splits(tmp_path):
    _folder(tmp_path / "all", {"a": 10, "b": 10})
    _folder(tmp_path / "tr", {"a": 3, "b": 3})
    _folder(tmp_path / "te", {"a": 2, "b": 2})
    spec = _spec(tmp_path, '[[task]]\nname = "x"\nimages = "all"\n\n'
                           '[[task]]\nname = "y"\ntrain = "tr"\ntest = "te"\n')
    assert spec.tasks["x"].counts() == {"train": 14, "val": 0, "test": 6}  # default test 0.3
    assert spec.tasks["y"].counts() == {"train": 6, "val": 0, "test": 4}
    assert spec.class_names() == {"x": ["a", "b"], "y": ["a", "b"]}


def test_csv_sources_class_renames_and_order(tmp_path):
    for i in range(4):
        _png(tmp_path / "img" / f"{i}.png", seed=i)
    (tmp_path / "train.csv").write_text("path,label\nimg/0.png,b\nimg/1.png,a\n")
    (tmp_path / "test.csv").write_text("img/2.png,a\n\nimg/3.png,b\n")
    spec = _spec(tmp_path, '[[task]]\nname = "c"\ntrain = "train.csv"\ntest = "test.csv"\n'
                           'classes = ["a", "b"]\n\n'
                           '[[task]]\nname = "r"\ntrain = "train.csv"\ntest = "test.csv"\n'
                           'classes = {a = "apple"}\n')
    c = spec.tasks["c"]
    assert c.classes == ["a", "b"]
    assert [(Path(r.path).name, r.label) for r in c.splits["train"]] == [("0.png", 1), ("1.png", 0)]
    r = spec.tasks["r"]
    assert r.classes == ["b", "apple"]  # first-seen CSV order, renamed
    assert r.labels == ["b", "a"]


def test_folder_renames(tmp_path):
    _folder(tmp_path / "d", {"n01": 3, "n02": 3})
    spec = _spec(tmp_path, '[[task]]\nname = "t"\nimages = "d"\nsplit = {test = 0.34}\n'
                           'classes = {n01 = "golden retriever", n02 = "tabby cat"}\n')
    assert spec.tasks["t"].classes == ["golden retriever", "tabby cat"]


@pytest.mark.parametrize("case", ["missing_dir", "empty_class", "csv_unknown_label", "duplicate_task",
                                  "missing_csv_image", "unknown_key", "bad_toml", "no_tasks",
                                  "rename_unknown", "unknown_test_folder", "unknown_top_level_key",
                                  "task_not_tables", "split_not_a_number", "split_nan", "split_seed_float",
                                  "one_class_folder", "one_class_list"])
def test_bad_input_is_one_line_naming_the_culprit(tmp_path, case):
    _folder(tmp_path / "d", {"a": 3, "b": 3})
    base = '[[task]]\nname = "t"\nimages = "d"\n'
    if case == "missing_dir":
        text, culprit = '[[task]]\nname = "t"\nimages = "nowhere"\n', "nowhere"
    elif case == "empty_class":
        (tmp_path / "d" / "c").mkdir()
        (tmp_path / "d" / "c" / "notes.txt").write_text("x")
        text, culprit = base, str(tmp_path / "d" / "c")
    elif case == "csv_unknown_label":
        (tmp_path / "l.csv").write_text("d/a/00.png,a\nd/b/00.png,zebra\n")
        text, culprit = base.replace('images = "d"', 'csv = "l.csv"') + 'classes = ["a", "b"]\n', "l.csv:2"
    elif case == "duplicate_task":
        text, culprit = base + "\n" + base, "'t' twice"
    elif case == "missing_csv_image":
        (tmp_path / "l.csv").write_text("d/a/00.png,a\nd/a/99.png,a\n")
        text, culprit = base.replace('images = "d"', 'csv = "l.csv"'), "l.csv:2"
    elif case == "unknown_key":
        text, culprit = base + "shots = 3\n", "'shots'"
    elif case == "bad_toml":
        text, culprit = base + "name = \n", "tasks.toml"
    elif case == "no_tasks":
        text, culprit = "title = 'x'\n", "[[task]]"
    elif case == "rename_unknown":
        text, culprit = base + 'classes = {zz = "z"}\n', "'zz'"
    elif case == "unknown_top_level_key":  # before: ignored silently
        text, culprit = 'shots = 4\ntitel = "x"\n' + base, "'shots', 'titel'"
    elif case == "task_not_tables":  # before: TypeError 'int' object is not iterable
        text, culprit = "task = 5\n", "'task' must be an array of tables"
    elif case == "split_not_a_number":  # before: could not convert string to float: 'x' (no task named)
        text, culprit = base + 'split = { val = "x" }\n', "task 't': split.val must be a fraction"
    elif case == "split_nan":  # before: accepted (nan compares false with every bound)
        text, culprit = base + "split = { test = nan }\n", "split.test"
    elif case == "split_seed_float":
        text, culprit = base + "split = { test = 0.3, seed = 1.5 }\n", "split.seed must be an integer"
    elif case == "one_class_folder":  # before: trained with loss 0 and counted as 100% in the mean
        (tmp_path / "one" / "a").mkdir(parents=True)
        _png(tmp_path / "one" / "a" / "0.png")
        _png(tmp_path / "one" / "a" / "1.png", seed=1)
        text, culprit = '[[task]]\nname = "solo"\nimages = "one"\n', "task 'solo' has only one class ('a')"
    elif case == "one_class_list":
        text, culprit = base + 'classes = ["a"]\n', "only one class"
    else:
        _folder(tmp_path / "te", {"a": 1, "q": 1})
        text, culprit = '[[task]]\nname = "t"\ntrain = "d"\ntest = "te"\n', str(tmp_path / "te" / "q")
    if case == "one_class_list":  # folder "b" is then an unknown class folder: keep only "a"
        shutil.rmtree(tmp_path / "d" / "b")
    with pytest.raises(SpecError) as e:
        _spec(tmp_path, text)
    msg = str(e.value)
    assert "\n" not in msg
    assert culprit in msg, msg


def test_non_utf8_spec_names_the_file(tmp_path):
    """Before: a bare codec error ('utf-8' codec can't decode byte 0xe9 ...) without the file name."""
    _folder(tmp_path / "d", {"a": 2, "b": 2})
    p = tmp_path / "latin1.toml"
    p.write_bytes('[[task]]\nname = "caf\u00e9"\nimages = "d"\n'.encode("latin-1"))
    with pytest.raises(SpecError) as e:
        load_spec(p)
    assert str(p) in str(e.value) and "UTF-8" in str(e.value) and "\n" not in str(e.value)


def test_a_task_without_test_images_is_kept_with_an_empty_test_split(tmp_path):
    """One image per class: split.test rounds to 0 test images. The task stays (the CLI reports it)."""
    _folder(tmp_path / "d", {"a": 1, "b": 1})
    spec = _spec(tmp_path, '[[task]]\nname = "tiny"\nimages = "d"\nsplit = {test = 0.3}\n')
    assert spec.tasks["tiny"].counts() == {"train": 2, "val": 0, "test": 0}


def test_missing_spec_file(tmp_path):
    with pytest.raises(SpecError, match="spec file not found"):
        load_spec(tmp_path / "none.toml")
    with pytest.raises(SpecError, match=r"is a folder, not a spec file"):
        load_spec(tmp_path)
    with pytest.raises(SpecError, match=r"not a regular file"):
        load_spec("/dev/null")
    with pytest.raises(SpecError, match=r"task #1: 'name' must be a string, got int \(5\)"):
        _spec(tmp_path, '[[task]]\nname = 5\nimages = "d"\n')


def test_a_train_source_without_test_gets_the_default_test_split(tmp_path):
    """As the module docstring says: 30 % of a lone train source becomes the
    test split."""
    _folder(tmp_path / "tr", {"a": 10, "b": 10})
    spec = _spec(tmp_path, '[[task]]\nname = "x"\ntrain = "tr"\n')
    assert spec.tasks["x"].counts() == {"train": 14, "val": 0, "test": 6}


def test_few_shot_is_k_per_class_seeded_and_warns_on_small_classes(tmp_path):
    _folder(tmp_path / "d", {"a": 20, "b": 20, "c": 3})
    _folder(tmp_path / "e", {"a": 1, "b": 1, "c": 1}, seed=1)
    spec = _spec(tmp_path, '[[task]]\nname = "t"\ntrain = "d"\ntest = "e"\n')
    recs = spec.tasks["t"].splits["train"]
    assert len(recs) == 43
    with pytest.warns(FewShotWarning, match="'c' has 3 training images < 4"):
        four = few_shot(recs, 4, seed=0, task="t", classes=spec.tasks["t"].classes)
    counts = np.bincount([r.label for r in four])
    assert counts.tolist() == [4, 4, 3]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        again = few_shot(recs, 4, seed=0, task="t")
        other = few_shot(recs, 4, seed=1, task="t")
    assert again == four and other != four
    assert set(few_shot(recs, 2, seed=0, task="t")) <= set(recs)
    assert few_shot(recs, 0) == list(recs)


def test_read_image_names_the_file(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(BadImageError, match="bad.png"):
        read_image(bad)
    assert read_image(_png(tmp_path / "ok.png")).mode == "RGB"


@pytest.mark.parametrize("mode,fmt", [("I;16", "png"), ("I;16", "tiff"), ("I", "tiff"), ("F", "tiff")])
def test_high_bit_depth_images_are_scaled_not_clipped(tmp_path, mode, fmt):
    """Before: PIL's convert("RGB") clipped 16-bit values at 255: a 16-bit photo decoded as pure white.
    Every 8-bit level k stored at full depth (16-bit: 257 k, float: k / 255) decodes back to exactly k."""
    levels = (0, 1, 2, 127, 128, 254, 255)
    k = np.array(levels * 4, dtype=np.float64).reshape(4, len(levels))
    if mode == "F":
        full = (k / 255).astype(np.float32)
    else:
        full = (k * 257).astype(np.uint16 if mode == "I;16" else np.int32)
    path = tmp_path / f"deep.{fmt}"
    Image.fromarray(full).save(path)
    with Image.open(path) as im:
        assert im.mode == mode  # the premise: PIL reads it back at full depth
    rgb = read_image(path)
    assert rgb.mode == "RGB"
    got = np.asarray(rgb)
    assert (got == k.astype(np.uint8)[..., None]).all(), got[..., 0]
    # the same picture stored as an 8-bit PNG decodes to the same pixels
    eight = _png_gray(tmp_path / "eight.png", k.astype(np.uint8))
    assert np.array_equal(np.asarray(read_image(eight)), got)


def _png_gray(path: Path, a: np.ndarray) -> Path:
    Image.fromarray(a, mode="L").save(path)
    return path


@pytest.mark.parametrize("mode,values,reason", [("I", [0, 70000], "0..65535"), ("F", [0.0, 300.0], "[0, 1]"),
                                                ("F", [0.0, float("nan")], "non-finite")])
def test_high_bit_depth_values_without_an_8_bit_meaning_name_the_file(tmp_path, mode, values, reason):
    a = np.array([values], dtype=np.int32 if mode == "I" else np.float32)
    path = tmp_path / "odd.tiff"
    Image.fromarray(a).save(path)
    with pytest.raises(BadImageError) as e:
        read_image(path)
    assert "odd.tiff" in str(e.value) and reason in str(e.value)


def test_parse_spec_from_mapping(tmp_path):
    _folder(tmp_path / "d", {"a": 2, "b": 2})
    _folder(tmp_path / "e", {"a": 2, "b": 2}, seed=1)
    spec = parse_spec({"task": [{"name": "t", "train": str(tmp_path / "d"), "test": str(tmp_path / "e")}]})
    assert spec.tasks["t"].counts()["test"] == 4


def test_an_image_in_two_splits_or_twice_is_refused(tmp_path):
    """A test image that is also a training image would inflate the accuracy
    without a trace: the same file (symlinks resolved) in two splits, a CSV row
    given twice, or one image under two labels is refused, naming it."""
    _folder(tmp_path / "d", {"a": 3, "b": 3})
    with pytest.raises(SpecError, match=r"image .*d/a/00.png is in both the train and the test split"):
        _spec(tmp_path, '[[task]]\nname = "t"\ntrain = "d"\ntest = "d"\n')
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "a").mkdir()
    (tmp_path / "t" / "a" / "x.png").symlink_to(tmp_path / "d" / "a" / "01.png")
    (tmp_path / "t" / "b").mkdir()
    _png(tmp_path / "t" / "b" / "y.png", seed=99)
    with pytest.raises(SpecError, match=r"image .*d/a/01.png is in both the train and the test split"):
        _spec(tmp_path, '[[task]]\nname = "t"\ntrain = "d"\ntest = "t"\n')
    rows = [f"{tmp_path}/d/a/00.png,a", f"{tmp_path}/d/b/00.png,b", f"{tmp_path}/d/a/01.png,a",
            f"{tmp_path}/d/b/01.png,b", f"{tmp_path}/d/a/00.png,b"]
    (tmp_path / "train.csv").write_text("\n".join(rows) + "\n")
    with pytest.raises(SpecError, match=r"image .*d/a/00.png is listed twice in the train source with two labels"):
        _spec(tmp_path, '[[task]]\nname = "t"\ncsv = "train.csv"\nsplit = {test = 0.5, seed = 0}\n')


def test_a_split_depends_on_the_images_and_the_seed_only(tmp_path):
    """Two tasks over the same images (a relabelled twin) carve them alike, and a
    class that gains images leaves the other classes' split as it was."""
    _folder(tmp_path / "d", {"a": 10, "b": 10})
    twin = ('[[task]]\nname = "{}"\nimages = "d"\nsplit = {{test = 0.3, seed = 4}}\n{}')
    spec = _spec(tmp_path, twin.format("one", "") + twin.format("two", 'classes = {a = "b-ish", b = "a-ish"}\n'))
    tests = [sorted(r.path for r in spec.tasks[t].splits["test"]) for t in ("one", "two")]
    assert tests[0] == tests[1] and len(tests[0]) == 6
    before = [r.path for r in spec.tasks["one"].splits["test"] if "/b/" in r.path]
    _folder(tmp_path / "d", {"a": 14}, seed=3)  # class a gains four images (and rewrites its first ten)
    spec = _spec(tmp_path, twin.format("one", ""))
    assert [r.path for r in spec.tasks["one"].splits["test"] if "/b/" in r.path] == before
    # the data moved elsewhere (another folder, another user's home): the same split
    moved = tmp_path / "elsewhere" / "deeper"
    shutil.copytree(tmp_path / "d", moved / "d")
    (moved / "tasks.toml").write_text(twin.format("one", ""))
    again = load_spec(moved / "tasks.toml")
    rel = lambda task, root: sorted(str(Path(r.path).relative_to(root)) for r in task.splits["test"])  # noqa: E731
    assert rel(again.tasks["one"], moved) == rel(spec.tasks["one"], tmp_path)



def test_a_split_does_not_depend_on_where_a_link_to_the_data_points(tmp_path):
    """The same images reached through a symbolic link (a `data -> /mnt/...` link)
    split as they do in place, wherever the link points: the rank hashes the
    path as listed, not the resolved one (else `hipro eval` on another machine
    could test a checkpoint on its training images)."""
    def lists(folder):  # a CSV of relative rows, and one of absolute rows (into `folder`)
        (folder / "list.csv").write_text("".join(f"{c}/{i:02d}.png,{c}\n" for c in "ab" for i in range(10)))
        (folder / "abs.csv").write_text("".join(f"{folder / c / f'{i:02d}.png'},{c}\n" for c in "ab"
                                                for i in range(10)))

    for where in ("real1/ds", "real2/much/deeper/ds"):
        _folder(tmp_path / where, {"a": 10, "b": 10})
        lists(tmp_path / where)
    task = ('[[task]]\nname = "f"\nimages = "data"\nsplit = {test = 0.5, seed = 0}\n'
            '[[task]]\nname = "c"\ncsv = "data/list.csv"\nsplit = {test = 0.5, seed = 0}\n'
            '[[task]]\nname = "abs"\ncsv = "data/abs.csv"\nsplit = {test = 0.5, seed = 0}\n')
    tests = []
    for i, where in enumerate(("real1/ds", "real2/much/deeper/ds", None)):
        spec_dir = tmp_path / f"spec{i}"
        spec_dir.mkdir()
        if where is None:  # the data in place, no link
            shutil.copytree(tmp_path / "real1" / "ds", spec_dir / "data")
            lists(spec_dir / "data")
        else:
            (spec_dir / "data").symlink_to(tmp_path / where, target_is_directory=True)
        (spec_dir / "tasks.toml").write_text(task)
        spec = load_spec(spec_dir / "tasks.toml")
        tests.append({t: sorted("/".join(Path(r.path).parts[-2:]) for r in spec.tasks[t].splits["test"])
                      for t in ("f", "c", "abs")})
        assert len(tests[-1]["f"]) == 10 and tests[-1]["f"] == tests[-1]["c"] == tests[-1]["abs"]
    assert tests[0] == tests[1] == tests[2]

def test_a_file_name_that_is_not_utf8_is_carved_like_any_other(tmp_path):
    _folder(tmp_path / "d", {"a": 3, "b": 3})
    odd = os.fsdecode(b"\xff-odd.png")
    shutil.copy(tmp_path / "d" / "a" / "00.png", tmp_path / "d" / "a" / odd)
    spec = _spec(tmp_path, '[[task]]\nname = "t"\nimages = "d"\nsplit = {test = 0.3, seed = 0}\n')
    assert sum(len(v) for v in spec.tasks["t"].splits.values()) == 7


def test_csv_comments_utf8_and_a_file_named_like_a_comment(tmp_path):
    """'#' starts a comment unless the row names an image ("#1.png" was dropped
    silently); a CSV that is not UTF-8 is named (a bare UnicodeDecodeError before)."""
    _folder(tmp_path / "d", {"a": 3, "b": 3})
    shutil.copy(tmp_path / "d" / "a" / "00.png", tmp_path / "d" / "#1.png")
    rows = "# path,label\n#1.png,a\n# a/00.png,a  (commented out)\n" + "".join(
        f"{c}/{i:02d}.png,{c}\n" for c in "ab" for i in range(3))
    (tmp_path / "d" / "list.csv").write_text(rows)
    spec = _spec(tmp_path, '[[task]]\nname = "t"\ncsv = "d/list.csv"\nsplit = {test = 0.3, seed = 0}\n')
    paths = [Path(r.path).name for s in spec.tasks["t"].splits.values() for r in s]
    assert sorted(paths) == sorted(["#1.png", "00.png", "01.png", "02.png", "00.png", "01.png", "02.png"])
    (tmp_path / "d" / "list.csv").write_bytes("a/00.png,caf\xe9\n".encode("latin-1"))
    with pytest.raises(SpecError, match=r"train CSV file .*list\.csv is not UTF-8 text"):
        _spec(tmp_path, '[[task]]\nname = "t"\ncsv = "d/list.csv"\n')


def test_a_quoted_csv_path_keeps_its_spaces(tmp_path):
    """Quotes keep a field exactly: '" odd.png "' names the file with those spaces
    (it was stripped to 'odd.png', another image, taken without a word)."""
    _folder(tmp_path / "d", {"a": 3, "b": 3})
    for name in (" odd.png ", "odd.png"):
        shutil.copy(tmp_path / "d" / "a" / "00.png", tmp_path / "d" / name)
    rows = '" odd.png ",a\n' + "".join(f"{c}/{i:02d}.png,{c}\n" for c in "ab" for i in range(1, 3))
    (tmp_path / "d" / "list.csv").write_text(rows)
    spec = _spec(tmp_path, '[[task]]\nname = "t"\ncsv = "d/list.csv"\nsplit = {test = 0.5, seed = 0}\n')
    names = sorted(Path(r.path).name for s in spec.tasks["t"].splits.values() for r in s)
    assert names == sorted([" odd.png ", "01.png", "02.png", "01.png", "02.png"])


def test_unquoted_csv_fields_are_stripped_and_quoted_commas_kept(tmp_path):
    """Spaces around an unquoted field, or outside the quotes of a quoted one, are
    not part of it; a comma inside quotes is."""
    _folder(tmp_path / "d", {"a": 3, "b": 3})
    shutil.copy(tmp_path / "d" / "b" / "02.png", tmp_path / "d" / "b" / "x,y.png")
    rows = ("  a/00.png  ,  a  \n" ' "a/01.png" , "a"\n' "a/02.png,a\n"
            "b/00.png,b\n" "b/01.png,b\n" '"b/x,y.png",b\n')
    (tmp_path / "d" / "list.csv").write_text(rows)
    spec = _spec(tmp_path, '[[task]]\nname = "t"\ncsv = "d/list.csv"\nsplit = {test = 0.5, seed = 0}\n')
    t = spec.tasks["t"]
    assert t.labels == ["a", "b"]
    listed = {(Path(r.path).relative_to((tmp_path / "d").resolve()).as_posix(), t.labels[r.label])
              for s in t.splits.values() for r in s}
    assert listed == {("a/00.png", "a"), ("a/01.png", "a"), ("a/02.png", "a"),
                      ("b/00.png", "b"), ("b/01.png", "b"), ("b/x,y.png", "b")}


def test_a_broken_symbolic_link_in_a_class_folder_is_named(tmp_path):
    """A link whose target is gone (an unmounted share) was left out silently."""
    _folder(tmp_path / "d", {"a": 3, "b": 3})
    (tmp_path / "d" / "a" / "gone.png").symlink_to(tmp_path / "nowhere" / "x.png")
    with pytest.raises(SpecError, match=r"gone\.png is a broken symbolic link \(to .*nowhere/x\.png\)"):
        _spec(tmp_path, '[[task]]\nname = "t"\nimages = "d"\nsplit = {test = 0.3, seed = 0}\n')
