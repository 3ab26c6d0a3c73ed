"""Label strategies, split forms, class lists and data errors on tiny image trees."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from shared.errors import DataError
from shared.spec import Data
from tests.unit.training.imagetree import make_tree, three_vs_seven
from workers.training.items import ItemSplit, LabeledItem, build_items, random_split_indices


def spec(**data: Any) -> Data:
    """A validated ``data`` section (aliases such as ``from`` allowed)."""
    return Data.model_validate({"source": "ds", **data})


def rels(items: list[LabeledItem]) -> list[str]:
    return [item.rel for item in items]


def skipped_reasons(split: ItemSplit) -> dict[str, str]:
    return {s.path: s.reason for s in split.skipped}


def write_csv(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


# --------------------------------------------------------------------------- folder


def test_folder_labels_default_folder_split(tmp_path: Path) -> None:
    three_vs_seven(tmp_path, per_class=2)
    make_tree(tmp_path, ["extra/3/x.png", "test/u.png", "labels.csv", ".hidden/3/h.png"])
    split = build_items(spec(), tmp_path)
    assert split.classes == ["3", "7"]
    assert split.multi_label is False
    assert rels(split.train) == [
        "train/3/00.png",
        "train/3/01.png",
        "train/7/00.png",
        "train/7/01.png",
    ]
    assert rels(split.valid) == [
        "valid/3/00.png",
        "valid/3/01.png",
        "valid/7/00.png",
        "valid/7/01.png",
    ]
    assert [i.label for i in split.train] == ["3", "3", "7", "7"]
    assert split.train[0].path == (tmp_path / "train/3/00.png").resolve()
    assert all(i.path.is_absolute() for i in split.train + split.valid)
    assert split.unsplit == 1  # extra/3/x.png: neither train nor valid, dropped like fastai
    assert split.test == []  # no data.test: the test folder is only kept out of the items
    assert split.skipped == []


def test_folder_labels_with_test_folder(tmp_path: Path) -> None:
    three_vs_seven(tmp_path, per_class=1)
    make_tree(tmp_path, ["unlabeled/b.png", "unlabeled/a.png", "unlabeled/sub/c.png"])
    split = build_items(spec(test="unlabeled"), tmp_path)
    assert [p.relative_to(tmp_path).as_posix() for p in split.test] == [
        "unlabeled/a.png",
        "unlabeled/b.png",
        "unlabeled/sub/c.png",
    ]
    assert not any(i.rel.startswith("unlabeled/") for i in split.train + split.valid)


def test_missing_test_folder(tmp_path: Path) -> None:
    three_vs_seven(tmp_path, per_class=1)
    with pytest.raises(DataError, match=r"data\.test: folder .*nothere does not exist"):
        build_items(spec(test="nothere"), tmp_path)


def test_folder_labels_random_split_skips_top_level(tmp_path: Path) -> None:
    make_tree(tmp_path, [f"{c}/{i}.png" for c in ("cat", "dog") for i in range(5)] + ["loose.png"])
    split = build_items(spec(split={"valid_pct": 0.5, "seed": 3}), tmp_path)
    assert split.classes == ["cat", "dog"]
    assert len(split.train) == 5
    assert len(split.valid) == 5
    assert skipped_reasons(split) == {
        "loose.png": "directly in the source folder, so it has no class folder"
    }
    for item in split.train + split.valid:
        assert item.label == item.rel.split("/")[0]


def test_folder_labels_skip_symlink_out_of_source(tmp_path: Path) -> None:
    source = tmp_path / "ds"
    three_vs_seven(source, per_class=1)
    make_tree(tmp_path, ["outside/secret.png"])
    (source / "train" / "3" / "link.png").symlink_to(tmp_path / "outside" / "secret.png")
    (source / "train" / "7" / "inner.png").symlink_to(source / "valid" / "7" / "00.png")
    split = build_items(spec(), source)
    assert "train/3/link.png" not in rels(split.train)
    assert "train/7/inner.png" in rels(split.train)  # a link that stays inside is fine
    assert skipped_reasons(split) == {"train/3/link.png": "symlink pointing outside the source"}


def test_folder_split_custom_names_nested(tmp_path: Path) -> None:
    make_tree(
        tmp_path, ["data/tr/a/1.png", "data/tr/b/1.png", "data/va/a/2.png", "data/va/b/2.png"]
    )
    split = build_items(
        spec(split={"by": "folder", "train": "data/tr", "valid": "data/va"}), tmp_path
    )
    assert rels(split.train) == ["data/tr/a/1.png", "data/tr/b/1.png"]
    assert rels(split.valid) == ["data/va/a/2.png", "data/va/b/2.png"]


# --------------------------------------------------------------------------- csv


def test_csv_labels_by_index(tmp_path: Path) -> None:
    three_vs_seven(tmp_path, per_class=2)
    rows = [f"{s}/{d}/0{i}.png,{d}" for s in ("train", "valid") for d in (3, 7) for i in range(2)]
    write_csv(tmp_path / "labels.csv", "name,label\n" + "\n".join(rows) + "\n")
    split = build_items(spec(labels={"from": "csv"}, split={"by": "folder"}), tmp_path)
    assert split.classes == ["3", "7"]
    assert all(isinstance(i.label, str) for i in split.train)  # ints in the file become str
    assert rels(split.train) == [r.split(",")[0] for r in rows[:4]]


def test_csv_named_columns_folder_suffix_delimiter(tmp_path: Path) -> None:
    make_tree(tmp_path, [f"imgs/{n}.jpg" for n in ("a", "b", "c", "d")])
    write_csv(
        tmp_path / "meta" / "tags.csv",
        "id;kind;fname\n1;cat;a\n2;dog;b\n3;cat;c\n4;dog;d\n",
    )
    labels = {
        "from": "csv",
        "file": "meta/tags.csv",
        "fn_col": "fname",
        "label_col": "kind",
        "folder": "imgs",
        "suffix": ".jpg",
        "delimiter": ";",
    }
    split = build_items(spec(labels=labels, split={"valid_pct": 0.0}), tmp_path)
    assert [(i.rel, i.label) for i in split.train] == [
        ("imgs/a.jpg", "cat"),
        ("imgs/b.jpg", "dog"),
        ("imgs/c.jpg", "cat"),
        ("imgs/d.jpg", "dog"),
    ]
    assert split.valid == []


def test_csv_skips_missing_non_image_duplicates_and_escapes(tmp_path: Path) -> None:
    make_tree(tmp_path, ["a.png", "b.png", "notes.txt"])
    write_csv(
        tmp_path / "labels.csv",
        "name,label\na.png,x\nmissing.png,x\nnotes.txt,y\na.png,z\nb.png,y\n../up.png,x\n",
    )
    split = build_items(spec(labels={"from": "csv"}, split={"valid_pct": 0.0}), tmp_path)
    assert [(i.rel, i.label) for i in split.train] == [("a.png", "x"), ("b.png", "y")]
    reasons = skipped_reasons(split)
    assert reasons["missing.png"] == "file does not exist"
    assert reasons["notes.txt"] == "not an image file (by its suffix)"
    assert "contains '..'" in reasons["../up.png"]
    duplicates = [s for s in split.skipped if s.reason == "duplicate"]
    assert [s.path for s in duplicates] == ["a.png"]  # the first row wins (label x, not z)


def test_csv_multi_label(tmp_path: Path) -> None:
    make_tree(tmp_path, [f"{i}.png" for i in range(6)])
    write_csv(
        tmp_path / "labels.csv",
        "image_name,tags\n"
        "0.png,clear primary\n"
        "1.png,haze  water primary\n"
        "2.png,clear\n"
        "3.png,agriculture clear\n"
        "4.png,\n"
        "5.png,primary clear clear\n",
    )
    labels = {"from": "csv", "label_delim": " "}
    split = build_items(spec(labels=labels, split={"valid_pct": 0.0}), tmp_path)
    assert split.multi_label is True
    assert split.classes == ["agriculture", "clear", "haze", "primary", "water"]
    by_rel = {i.rel: i.label for i in split.train}
    assert by_rel["0.png"] == ("clear", "primary")
    assert by_rel["1.png"] == ("haze", "water", "primary")  # empty parts dropped
    assert by_rel["4.png"] == ()  # no tag at all is a valid multi-label target
    assert by_rel["5.png"] == ("primary", "clear")  # repeats removed, order kept


def test_csv_multi_label_valid_item_with_unknown_label_dropped(tmp_path: Path) -> None:
    make_tree(tmp_path, ["train/a.png", "train/b.png", "valid/c.png", "valid/d.png"])
    write_csv(
        tmp_path / "labels.csv",
        "name,tags\ntrain/a.png,x y\ntrain/b.png,y\nvalid/c.png,x\nvalid/d.png,x new\n",
    )
    labels = {"from": "csv", "label_delim": " "}
    split = build_items(spec(labels=labels, split={"by": "folder"}), tmp_path)
    assert split.classes == ["x", "y"]
    assert rels(split.valid) == ["valid/c.png"]
    assert "'new'" in skipped_reasons(split)["valid/d.png"]


def test_csv_file_missing(tmp_path: Path) -> None:
    make_tree(tmp_path, ["a.png"])
    with pytest.raises(
        DataError, match=r"data\.labels\.file: label file .*labels\.csv does not exist"
    ):
        build_items(spec(labels={"from": "csv"}), tmp_path)


def test_csv_columns_missing(tmp_path: Path) -> None:
    make_tree(tmp_path, ["a.png"])
    write_csv(tmp_path / "labels.csv", "name,label\na.png,x\n")
    labels = {"from": "csv", "fn_col": "file", "label_col": 5}
    with pytest.raises(DataError) as info:
        build_items(spec(labels=labels), tmp_path)
    message = str(info.value)
    assert "data.labels.fn_col='file'" in message
    assert "data.labels.label_col=5" in message
    assert "available columns: name, label" in message


def test_csv_nothing_usable(tmp_path: Path) -> None:
    make_tree(tmp_path, ["a.png"])
    write_csv(tmp_path / "labels.csv", "name,label\nx.png,1\ny.png,2\n")
    with pytest.raises(
        DataError, match=r"data\.labels: no usable labelled image .*2 file\(s\) skipped"
    ):
        build_items(spec(labels={"from": "csv"}), tmp_path)


# --------------------------------------------------------------------------- column split


def test_column_split(tmp_path: Path) -> None:
    names = [f"{i}.png" for i in range(8)]
    make_tree(tmp_path, names)
    flags = ["false", "TRUE", "0", "1", "no", "yes", "False", "True"]
    labels_ = ["a", "a", "b", "b", "a", "b", "b", "a"]
    body = "".join(f"{n},{lab},{f}\n" for n, lab, f in zip(names, labels_, flags, strict=True))
    write_csv(tmp_path / "labels.csv", "name,label,is_valid\n" + body)
    split = build_items(spec(labels={"from": "csv"}, split={"by": "column"}), tmp_path)
    assert rels(split.train) == ["0.png", "2.png", "4.png", "6.png"]
    assert rels(split.valid) == ["1.png", "3.png", "5.png", "7.png"]


def test_column_split_bad_value_and_missing_column(tmp_path: Path) -> None:
    make_tree(tmp_path, ["0.png", "1.png"])
    write_csv(tmp_path / "labels.csv", "name,label,is_valid\n0.png,a,false\n1.png,a,maybe\n")
    with pytest.raises(DataError, match=r"data\.split\.column: value 'maybe' .* is not a boolean"):
        build_items(spec(labels={"from": "csv"}, split={"by": "column"}), tmp_path)
    split_spec = spec(labels={"from": "csv"}, split={"by": "column", "column": "valid"})
    with pytest.raises(DataError, match=r"data\.split\.column='valid'.*available columns"):
        build_items(split_spec, tmp_path)


def test_column_split_everything_valid_is_empty_train(tmp_path: Path) -> None:
    make_tree(tmp_path, ["0.png", "1.png"])
    write_csv(tmp_path / "labels.csv", "name,label,is_valid\n0.png,a,1\n1.png,a,1\n")
    with pytest.raises(DataError, match=r"data\.split: the training set is empty"):
        build_items(spec(labels={"from": "csv"}, split={"by": "column"}), tmp_path)


# --------------------------------------------------------------------------- table


def test_table_inline_rows(tmp_path: Path) -> None:
    make_tree(tmp_path, ["x/1.png", "x/2.png", "x/3.png"])
    rows = [
        {"file": "1.png", "label": ["a", "b"]},
        {"file": "2.png", "label": ["b"]},
        {"file": "1.png", "label": ["c"]},
        {"file": "3.png", "label": []},
    ]
    labels = {"from": "table", "rows": rows, "folder": "x"}
    split = build_items(spec(labels=labels, split={"valid_pct": 0.0}), tmp_path)
    assert split.multi_label is True
    assert [(i.rel, i.label) for i in split.train] == [
        ("x/1.png", ("a", "b")),
        ("x/2.png", ("b",)),
        ("x/3.png", ()),
    ]
    assert skipped_reasons(split) == {"x/1.png": "duplicate"}


def test_table_inline_rows_refuse_column_split(tmp_path: Path) -> None:
    make_tree(tmp_path, ["1.png"])
    labels = {"from": "table", "rows": [{"file": "1.png", "label": "a"}]}
    with pytest.raises(DataError, match="inline table rows only have 'file' and 'label'"):
        build_items(spec(labels=labels, split={"by": "column"}), tmp_path)


def test_table_csv_file_with_column_split(tmp_path: Path) -> None:
    make_tree(tmp_path, ["1.png", "2.png", "3.png", "4.png"])
    write_csv(
        tmp_path / "table.csv",
        "label,path,is_valid\ncat,1.png,0\ndog,2.png,0\ncat,3.png,1\ndog,4.png,1\n",
    )
    labels = {"from": "table", "file": "table.csv", "fn_col": "path", "label_col": 0}
    split = build_items(spec(labels=labels, split={"by": "column"}), tmp_path)
    assert [(i.rel, i.label) for i in split.train] == [("1.png", "cat"), ("2.png", "dog")]
    assert [(i.rel, i.label) for i in split.valid] == [("3.png", "cat"), ("4.png", "dog")]


def test_table_file_of_unknown_kind(tmp_path: Path) -> None:
    make_tree(tmp_path, ["1.png"])
    write_csv(tmp_path / "table.json", "[]")
    with pytest.raises(DataError, match=r"table\.json must be a \.csv or \.parquet file"):
        build_items(spec(labels={"from": "table", "file": "table.json"}), tmp_path)


def test_table_parquet_without_engine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_tree(tmp_path, ["1.png"])
    (tmp_path / "table.parquet").write_bytes(b"PAR1")
    # None in sys.modules makes `import pyarrow` fail, whatever is installed.
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "fastparquet", None)
    with pytest.raises(DataError, match="needs the 'pyarrow' package"):
        build_items(spec(labels={"from": "table", "file": "table.parquet"}), tmp_path)


# --------------------------------------------------------------------------- regex


def test_regex_labels(tmp_path: Path) -> None:
    names = [f"{breed}_{i}.jpg" for breed in ("great_pyrenees", "Abyssinian") for i in (1, 2, 3)]
    make_tree(tmp_path, [f"images/{n}" for n in names] + ["images/readme.png", "test/x_1.jpg"])
    labels = {"from": "regex", "pattern": r"/([^/]+)_\d+.jpg$"}
    split = build_items(spec(labels=labels, split={"valid_pct": 0.34, "seed": 0}), tmp_path)
    assert split.classes == ["Abyssinian", "great_pyrenees"]
    assert [(i.rel, i.label) for i in split.valid] == [
        ("images/great_pyrenees_3.jpg", "great_pyrenees"),
        ("images/Abyssinian_3.jpg", "Abyssinian"),
    ]
    assert len(split.train) == 4
    assert {i.rel.split("/")[1].rsplit("_", 1)[0] for i in split.train} == set(split.classes)
    assert all(i.rel.split("/")[1].startswith(i.label) for i in split.train)
    assert skipped_reasons(split) == {"images/readme.png": "does not match data.labels.pattern"}


def test_regex_matching_nothing(tmp_path: Path) -> None:
    make_tree(tmp_path, ["train/3/a.png", "train/3/b.png", "train/7/c.png", "train/7/d.png"])
    labels = {"from": "regex", "pattern": r"(\d+)\.jpg$"}
    with pytest.raises(DataError) as info:
        build_items(spec(labels=labels), tmp_path)
    message = str(info.value)
    assert message.startswith("data.labels.pattern: '(\\\\d+)\\\\.jpg$' matches none of the 4")
    assert "'train/3/a.png', 'train/3/b.png', 'train/7/c.png'" in message
    assert "train/7/d.png" not in message  # at most 3 examples


# --------------------------------------------------------------------------- function


def test_function_labels_three_vs_seven(tmp_path: Path) -> None:
    three_vs_seven(tmp_path, per_class=2)
    labels = {
        "from": "function",
        "name": "path_contains",
        "args": {"mapping": {"/3/": "3"}, "default": "7"},
    }
    split = build_items(spec(labels=labels, split={"by": "folder"}), tmp_path)
    assert split.classes == ["3", "7"]
    assert [(i.rel, i.label) for i in split.train] == [
        ("train/3/00.png", "3"),
        ("train/3/01.png", "3"),
        ("train/7/00.png", "7"),
        ("train/7/01.png", "7"),
    ]


def test_function_unknown_and_failing(tmp_path: Path) -> None:
    make_tree(tmp_path, ["a/x_1.png", "b/plain.png"])
    with pytest.raises(DataError, match=r"data\.labels\.name: unknown label function 'nope'"):
        build_items(spec(labels={"from": "function", "name": "nope"}), tmp_path)
    with pytest.raises(DataError) as info:
        build_items(spec(labels={"from": "function", "name": "name_prefix"}), tmp_path)
    message = str(info.value)
    assert "label function 'name_prefix' failed on 'b/plain.png'" in message
    assert "ValueError" in message


def test_function_bad_args_keep_their_field(tmp_path: Path) -> None:
    make_tree(tmp_path, ["a/x_1.png"])
    labels = {"from": "function", "name": "name_prefix", "args": {"sep": 3}}
    with pytest.raises(DataError, match=r"^data\.labels\.args\.sep"):
        build_items(spec(labels=labels), tmp_path)


# --------------------------------------------------------------------------- lists


def test_lists_labels(tmp_path: Path) -> None:
    make_tree(tmp_path, ["p/1.png", "p/2.png", "p/3.png"])
    labels = {
        "from": "lists",
        "files": ["p/2.png", "p/1.png", "p/gone.png", "p//2.png", "p/3.png"],
        "labels": ["b", "a", "a", "c", "a"],
    }
    split = build_items(spec(labels=labels, split={"valid_pct": 0.0}), tmp_path)
    # Named files keep the given order (fastai's order for from_lists).
    assert [(i.rel, i.label) for i in split.train] == [
        ("p/2.png", "b"),
        ("p/1.png", "a"),
        ("p/3.png", "a"),
    ]
    assert skipped_reasons(split) == {"p/gone.png": "file does not exist", "p/2.png": "duplicate"}


def test_lists_mixed_single_and_multi(tmp_path: Path) -> None:
    make_tree(tmp_path, ["1.png", "2.png"])
    labels = {"from": "lists", "files": ["1.png", "2.png"], "labels": ["a", ["a", "b"]]}
    with pytest.raises(DataError, match=r"'2\.png' has a list of labels"):
        build_items(spec(labels=labels), tmp_path)


# --------------------------------------------------------------------------- oracles


@pytest.mark.parametrize(
    ("n", "valid_pct", "n_valid"), [(100, 0.2, 20), (101, 0.2, 20), (50, 0.0, 0)]
)
def test_oracle1_split_sizes(n: int, valid_pct: float, n_valid: int) -> None:
    train, valid = random_split_indices(n, valid_pct, 42)
    assert len(valid) == n_valid
    assert len(train) == n - n_valid
    assert sorted(train + valid) == list(range(n))


@pytest.mark.parametrize("seed", [0, 1, 42, 2024])
def test_oracle2_split_order_matches_fastai(seed: int) -> None:
    state = np.random.get_state()
    try:
        np.random.seed(seed)
        perm = np.random.permutation(100)
        after_perm = np.random.random()  # what the global RNG gives next
        np.random.seed(seed)
        np.random.permutation(100)
        train, valid = random_split_indices(100, 0.2, seed)
        assert np.random.random() == after_perm  # the global generator was not touched
    finally:
        np.random.set_state(state)
    assert valid == perm[:20].tolist()  # permutation order, not sorted
    assert valid != sorted(valid)
    assert train == sorted(perm[20:].tolist())


def test_oracle1_and_2_through_build_items(tmp_path: Path) -> None:
    rels_ = [
        f"{c}/{i:03d}.png" for i in range(101) for c in ("a", "b") if (i % 2 == 0) == (c == "a")
    ]
    make_tree(tmp_path, rels_)
    split = build_items(spec(split={"valid_pct": 0.2, "seed": 7}), tmp_path)
    ordered = sorted(rels_)  # items are sorted by path before the permutation
    state = np.random.get_state()
    try:
        np.random.seed(7)
        perm = np.random.permutation(101)
    finally:
        np.random.set_state(state)
    assert len(split.valid) == 20
    assert len(split.train) == 81
    assert rels(split.valid) == [ordered[i] for i in perm[:20]]
    assert rels(split.train) == [ordered[i] for i in sorted(perm[20:])]


def test_valid_pct_zero_gives_empty_valid(tmp_path: Path) -> None:
    make_tree(tmp_path, ["a/1.png", "b/1.png", "a/2.png"])
    split = build_items(spec(split={"valid_pct": 0.0}), tmp_path)
    assert split.valid == []
    assert len(split.train) == 3


def test_oracle3_classes_sorted_case_sensitive_and_unknown_valid_dropped(tmp_path: Path) -> None:
    files = [f"train/{n}.png" for n in ("1", "2", "3")] + [
        f"valid/{n}.png" for n in ("4", "5", "6", "7")
    ]
    make_tree(tmp_path, files)
    labels = {"from": "lists", "files": files, "labels": ["b", "A", "a", "a", "Z", "b", "A"]}
    split = build_items(spec(labels=labels, split={"by": "folder"}), tmp_path)
    assert split.classes == ["A", "a", "b"]
    assert rels(split.valid) == ["valid/4.png", "valid/6.png", "valid/7.png"]
    assert skipped_reasons(split) == {
        "valid/5.png": "validation label 'Z' does not occur in the training set"
    }


# --------------------------------------------------------------------------- data errors


def test_no_images(tmp_path: Path) -> None:
    make_tree(tmp_path, ["notes.txt", "test/only.png", ".hidden/x.png"])
    with pytest.raises(DataError, match=r"^data\.source: no image files found under"):
        build_items(spec(), tmp_path)


def test_class_without_validation_image(tmp_path: Path) -> None:
    make_tree(
        tmp_path, ["train/cat/1.png", "train/dog/1.png", "train/emu/1.png", "valid/cat/2.png"]
    )
    with pytest.raises(DataError) as info:
        build_items(spec(), tmp_path)
    message = str(info.value)
    assert message.startswith("data.split: class(es) 'dog', 'emu' have no image in the validation")


def test_valid_emptied_by_unknown_labels_still_needs_coverage(tmp_path: Path) -> None:
    make_tree(tmp_path, ["train/cat/1.png", "valid/dog/2.png"])
    with pytest.raises(DataError, match=r"class\(es\) 'cat' have no image in the validation"):
        build_items(spec(), tmp_path)


def test_empty_train_folder(tmp_path: Path) -> None:
    make_tree(tmp_path, ["valid/cat/1.png", "other/cat/2.png"])
    with pytest.raises(DataError) as info:
        build_items(spec(), tmp_path)
    message = str(info.value)
    assert "data.split: the training set is empty" in message
    assert "train folder 'train'" in message
    assert "other, valid" in message


def test_same_train_and_valid_folder(tmp_path: Path) -> None:
    make_tree(tmp_path, ["train/a/1.png"])
    with pytest.raises(DataError, match="train and valid folders must differ"):
        build_items(spec(split={"by": "folder", "train": "train", "valid": "train"}), tmp_path)


def test_seed_out_of_range(tmp_path: Path) -> None:
    make_tree(tmp_path, ["a/1.png", "b/1.png"])
    with pytest.raises(DataError, match=r"data\.split\.seed"):
        build_items(spec(split={"valid_pct": 0.2, "seed": -1}), tmp_path)


def test_deterministic(tmp_path: Path) -> None:
    make_tree(tmp_path, [f"{c}/{i}.png" for c in "abc" for i in range(10)])
    data = spec(split={"valid_pct": 0.3, "seed": 5})
    first, second = build_items(data, tmp_path), build_items(data, tmp_path)
    assert first == second
    other = build_items(spec(split={"valid_pct": 0.3, "seed": 6}), tmp_path)
    assert rels(other.valid) != rels(first.valid)


def test_a_catastrophic_label_regex_is_stopped_by_its_time_limit() -> None:
    import time

    from shared.errors import DataError
    from workers.training.items import search_all

    assert search_all(r"/(\w+)_\d+", ["x/cat_1.png", "dog.png"], time_limit_s=10) == [
        "cat",
        None,
    ]
    began = time.monotonic()
    with pytest.raises(DataError) as caught:
        # Overlapping alternatives: exponential backtracking on a long run of "a".
        search_all(r"(a|a)*b", ["a" * 40 + ".png"], time_limit_s=1.0)
    assert time.monotonic() - began < 10
    assert "data.labels.pattern" in str(caught.value)
    assert "took over 1 s" in str(caught.value)
