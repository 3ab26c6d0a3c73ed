"""The label-function registry and its built-ins."""

from __future__ import annotations

from typing import Any

import pytest

from shared.errors import DataError
from workers.training import label_functions
from workers.training.label_functions import get_label_function, register, registered_names


def test_builtins_are_registered() -> None:
    names = registered_names()
    assert {"parent_folder", "grandparent_folder", "name_prefix", "path_contains"} <= set(names)
    assert names == sorted(names)


def test_unknown_name_lists_registered() -> None:
    with pytest.raises(DataError, match="unknown label function 'nope'") as info:
        get_label_function("nope")
    assert "parent_folder" in str(info.value)
    assert "path_contains" in str(info.value)


def test_register_and_refuse_duplicate(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(label_functions, "_REGISTRY", dict(label_functions._REGISTRY))

    @register("upper_stem")
    def upper_stem(rel: str, args: dict[str, Any]) -> str:
        return rel.rsplit("/", 1)[-1].split(".")[0].upper()

    assert get_label_function("upper_stem")("a/b/cat.png", {}) == "CAT"
    assert "upper_stem" in registered_names()

    def other(rel: str, args: dict[str, Any]) -> str:
        return rel

    with pytest.raises(ValueError, match="already registered"):
        register("upper_stem")(other)


def test_parent_and_grandparent() -> None:
    parent = get_label_function("parent_folder")
    grand = get_label_function("grandparent_folder")
    assert parent("train/3/a.png", {}) == "3"
    assert grand("cats/train/a.png", {}) == "cats"
    with pytest.raises(ValueError, match="not inside a folder"):
        parent("a.png", {})
    with pytest.raises(ValueError, match="not two folders deep"):
        grand("train/a.png", {})


@pytest.mark.parametrize(
    ("rel", "args", "expected"),
    [
        ("images/great_pyrenees_173.jpg", {}, "great_pyrenees"),
        ("Abyssinian_1.jpg", {}, "Abyssinian"),
        ("x/american_pit_bull_terrier_12.png", {}, "american_pit_bull_terrier"),
        ("cat-dog-3.png", {"sep": "-"}, "cat-dog"),
        ("a_b.c_7.png", {}, "a_b.c"),  # only the last suffix is removed before splitting
    ],
)
def test_name_prefix(rel: str, args: dict[str, Any], expected: str) -> None:
    assert get_label_function("name_prefix")(rel, args) == expected


def test_name_prefix_errors() -> None:
    func = get_label_function("name_prefix")
    with pytest.raises(ValueError, match="does not contain '_'"):
        func("plain.png", {})
    with pytest.raises(ValueError, match="nothing comes before"):
        func("_12.png", {})
    with pytest.raises(DataError, match=r"data\.labels\.args\.sep"):
        func("a_1.png", {"sep": ""})
    with pytest.raises(DataError, match="does not take seperator"):
        func("a_1.png", {"seperator": "-"})


def test_path_contains_three_vs_seven() -> None:
    """The notes' ``lambda x: '3' if '/3/' in str(x) else '7'``, as data."""
    func = get_label_function("path_contains")
    args = {"mapping": {"/3/": "3"}, "default": "7"}
    assert func("train/3/a.png", args) == "3"
    assert func("train/7/a.png", args) == "7"
    # The leading "/" lets a top-level class folder match like a nested one.
    assert func("3/a.png", args) == "3"
    # "/3/" must be a whole folder: 33 is not 3.
    assert func("train/33/a.png", args) == "7"


def test_path_contains_order_and_missing_default() -> None:
    func = get_label_function("path_contains")
    args = {"mapping": {"cat": "cat", "dog": "dog"}}
    assert func("dogs/catalog.png", args) == "cat"  # mapping order decides
    assert func("dogs/x.png", args) == "dog"
    with pytest.raises(ValueError, match="no default is set"):
        func("birds/x.png", args)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ({}, "mapping: must be a non-empty"),
        ({"mapping": {}}, "mapping: must be a non-empty"),
        ({"mapping": {"": "x"}}, "substrings must be non-empty"),
        ({"mapping": {"a": "x"}, "default": 3}, "default: must be a string"),
        ({"mapping": {"a": "x"}, "defualt": "y"}, "does not take defualt"),
    ],
)
def test_path_contains_bad_args(args: dict[str, Any], message: str) -> None:
    with pytest.raises(DataError, match=message):
        get_label_function("path_contains")("a/b.png", args)
