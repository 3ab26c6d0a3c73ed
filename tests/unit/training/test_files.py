"""Image detection, sorted listing and the path checks that keep workers inside data roots."""

from __future__ import annotations

from pathlib import Path

import pytest

from shared.errors import DataError
from tests.unit.training.imagetree import make_tree
from workers.training.files import (
    is_image_file,
    list_image_files,
    path_sort_key,
    resolve_source,
    safe_join,
)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("a.png", True),
        ("a.JPG", True),
        ("dir/b.jpeg", True),
        ("x.tar.png", True),
        ("a.gif", True),
        ("a.bmp", True),
        ("a.tif", True),
        ("a.txt", False),
        ("a.csv", False),
        ("a.png.txt", False),
        ("noext", False),
        (".hidden.png", False),
        ("._mac.jpg", False),
    ],
)
def test_is_image_file(name: str, expected: bool) -> None:
    assert is_image_file(name) is expected
    assert is_image_file(Path(name)) is expected


def test_list_image_files_sorted_skips_hidden_and_test(tmp_path: Path) -> None:
    make_tree(
        tmp_path,
        [
            "b/2.png",
            "b/10.png",
            "a/x.JPG",
            "a-c.png",
            "top.png",
            "notes.txt",
            ".hidden.png",
            ".git/obj.png",
            "a/.cache/inner.png",
            "test/t.png",
            "deep/test/kept.png",
        ],
    )
    found = list_image_files(tmp_path, skip_dirs={"test"})
    rels = [p.relative_to(tmp_path).as_posix() for p in found]
    # Component order: "a/x.JPG" before "a-c.png" although "-" < "/" as characters.
    assert rels == ["a/x.JPG", "a-c.png", "b/10.png", "b/2.png", "deep/test/kept.png", "top.png"]
    assert all(p.is_absolute() for p in found)


def test_list_image_files_not_recursive(tmp_path: Path) -> None:
    make_tree(tmp_path, ["z.png", "a.png", "sub/b.png"])
    rels = [p.name for p in list_image_files(tmp_path, recurse=False)]
    assert rels == ["a.png", "z.png"]


def test_list_image_files_without_skip_includes_test(tmp_path: Path) -> None:
    make_tree(tmp_path, ["test/t.png", "train/a.png"])
    rels = [p.relative_to(tmp_path).as_posix() for p in list_image_files(tmp_path)]
    assert rels == ["test/t.png", "train/a.png"]


def test_path_sort_key_is_component_wise() -> None:
    assert sorted(["a-c.png", "a/b.png"], key=path_sort_key) == ["a/b.png", "a-c.png"]
    assert sorted(["b", "B", "a"], key=path_sort_key) == ["B", "a", "b"]


# --------------------------------------------------------------------------- resolve_source


def test_resolve_source_forms(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "mnist sample").mkdir(parents=True)
    expected = (root / "mnist sample").resolve()
    assert resolve_source("mnist sample", [root]) == expected
    assert resolve_source(str(expected), [root]) == expected
    assert resolve_source(f"file://{root.resolve()}/mnist%20sample", [root]) == expected


def test_resolve_source_second_root(tmp_path: Path) -> None:
    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir()
    (second / "ds").mkdir(parents=True)
    assert resolve_source(str(second / "ds"), [first, second]) == (second / "ds").resolve()


def test_resolve_source_refuses_dotdot_escape(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    (tmp_path / "secret").mkdir()
    with pytest.raises(DataError, match="outside the allowed data roots") as info:
        resolve_source("../secret", [root])
    assert str(root) in str(info.value)
    assert "secret" in str(info.value)


def test_resolve_source_refuses_absolute_outside(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    with pytest.raises(DataError, match="outside the allowed data roots"):
        resolve_source("/etc", [root])
    with pytest.raises(DataError, match="outside the allowed data roots"):
        resolve_source("file:///etc", [root])


def test_resolve_source_refuses_symlink_out(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    (root / "link").symlink_to(outside, target_is_directory=True)
    with pytest.raises(DataError, match="outside the allowed data roots"):
        resolve_source("link", [root])


def test_resolve_source_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"data\.source: folder .*nope does not exist"):
        resolve_source("nope", [tmp_path])


def test_resolve_source_file_is_not_a_folder(tmp_path: Path) -> None:
    (tmp_path / "f.txt").write_text("x")
    with pytest.raises(DataError, match="not a folder"):
        resolve_source("f.txt", [tmp_path])


def test_resolve_source_s3_is_synced_first(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"synced .* by the worker service"):
        resolve_source("s3://datasets/mnist", [tmp_path])


def test_resolve_source_other_scheme(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="unsupported scheme"):
        resolve_source("http://example.com/x", [tmp_path])


# --------------------------------------------------------------------------- safe_join


def test_safe_join_plain(tmp_path: Path) -> None:
    assert safe_join(tmp_path, "train/3/a.png") == tmp_path / "train" / "3" / "a.png"
    # A symlink that stays inside the root is fine.
    (tmp_path / "real").mkdir()
    (tmp_path / "alias").symlink_to(tmp_path / "real", target_is_directory=True)
    assert safe_join(tmp_path, "alias/x.png") == tmp_path / "alias" / "x.png"


@pytest.mark.parametrize(
    ("rel", "message"),
    [
        ("/etc/passwd", "is absolute"),
        ("../x.png", r"contains '\.\.'"),
        ("a/../../x.png", r"contains '\.\.'"),
        ("", "must not be empty"),
    ],
)
def test_safe_join_refuses(tmp_path: Path, rel: str, message: str) -> None:
    with pytest.raises(DataError, match=message):
        safe_join(tmp_path, rel)


def test_safe_join_refuses_symlink_out(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    outside = tmp_path / "outside.png"
    outside.write_bytes(b"x")
    (root / "evil.png").symlink_to(outside)
    with pytest.raises(DataError, match="through a symlink, outside"):
        safe_join(root, "evil.png")
