"""The store contract on the local and memory backends, plus key rules, registry and sync."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from shared.errors import ConfigError, StorageError
from shared.storage import (
    ArtifactStore,
    LocalStore,
    MemoryStore,
    open_store,
    sync_prefix_to_cache,
    validate_key,
)
from shared.storage.local import TEMP_PREFIX
from shared.storage.sync import COMPLETE_NAME, MANIFEST_NAME


@pytest.fixture(params=["local", "memory"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ArtifactStore]:
    if request.param == "local":
        yield LocalStore(tmp_path / "artifacts")
    else:
        yield MemoryStore()


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --- keys -------------------------------------------------------------------------

BAD_KEYS = [
    "",
    "../x",
    "a/../../x",
    "/abs",
    "a//b",
    "a/",
    "./a",
    "a/./b",
    "..",
    "a\\b",
    "a\x00b",
    "a\nb",
    "a\x7fb",
    "x" * 1025,
]


@pytest.mark.parametrize("key", BAD_KEYS)
def test_validate_key_refuses_unsafe_keys(key: str) -> None:
    with pytest.raises(StorageError, match="invalid key"):
        validate_key(key)


@pytest.mark.parametrize(
    "key", ["report.json", "runs/r1/checkpoints/stage-1-epoch3.pt", "a/b c/ünïcode.png", ".hidden"]
)
def test_validate_key_accepts_relative_posix_paths(key: str) -> None:
    assert validate_key(key) == key


@pytest.mark.parametrize("key", ["../x", "/abs", "a//b"])
def test_every_method_validates_the_key(store: ArtifactStore, key: str, tmp_path: Path) -> None:
    src = tmp_path / "src.bin"
    src.write_bytes(b"x")
    calls: list[Callable[[], object]] = [
        lambda: store.put_file(key, src),
        lambda: store.put_bytes(key, b"x"),
        lambda: store.get_bytes(key),
        lambda: store.download(key, tmp_path / "out"),
        lambda: store.exists(key),
        lambda: store.url_for(key),
        lambda: store.uri(key),
        lambda: store.list(key),
        lambda: store.delete_prefix(key),
    ]
    for call in calls:
        with pytest.raises(StorageError, match=r"invalid (key|prefix)") as info:
            call()
        assert repr(key) in str(info.value)
    assert not (tmp_path / "out").exists()
    assert not (tmp_path / "x").exists()


def test_the_base_class_is_abstract() -> None:
    with pytest.raises(TypeError, match="abstract"):
        ArtifactStore()  # type: ignore[abstract]

    class Half(ArtifactStore):  # one hook, eight missing
        def _put_bytes(self, key, data, *, content_type):  # pragma: no cover
            raise NotImplementedError

    with pytest.raises(TypeError, match="abstract"):
        Half()  # type: ignore[abstract]


def test_importing_and_opening_s3_does_not_load_boto3() -> None:
    code = (
        "import sys; from shared.storage import open_store; "
        "s = open_store('s3://bucket/p'); s.uri('k'); "
        "assert 'boto3' not in sys.modules and 'botocore' not in sys.modules, 'boto3 loaded'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[3])


# --- roundtrips -------------------------------------------------------------------


def test_put_bytes_get_bytes_roundtrip(store: ArtifactStore) -> None:
    data = b"report" * 1000
    stored = store.put_bytes("runs/r1/report.json", data, content_type="application/json")
    assert stored.key == "runs/r1/report.json"
    assert stored.bytes == len(data)
    assert stored.sha256 == _sha(data)
    assert stored.uri == store.uri("runs/r1/report.json")
    assert store.get_bytes("runs/r1/report.json") == data
    assert store.exists("runs/r1/report.json")
    assert not store.exists("runs/r1/other.json")


def test_put_file_streams_and_hashes(store: ArtifactStore, tmp_path: Path) -> None:
    data = os.urandom(3 * 1024 * 1024 + 17)  # several read chunks, not a multiple of one
    src = tmp_path / "model.pt"
    src.write_bytes(data)
    stored = store.put_file("runs/r1/checkpoints/stage-1.pt", src)
    assert (stored.bytes, stored.sha256) == (len(data), _sha(data))
    dest = tmp_path / "back" / "deep" / "stage-1.pt"
    store.download("runs/r1/checkpoints/stage-1.pt", dest)
    assert dest.read_bytes() == data


def test_put_replaces_an_existing_object(store: ArtifactStore) -> None:
    store.put_bytes("a.txt", b"one")
    store.put_bytes("a.txt", b"two")
    assert store.get_bytes("a.txt") == b"two"
    assert [o.key for o in store.list("")] == ["a.txt"]


def test_put_file_refuses_a_missing_source(store: ArtifactStore, tmp_path: Path) -> None:
    with pytest.raises(StorageError, match="not a file"):
        store.put_file("a.bin", tmp_path / "missing.bin")


def test_missing_objects_raise_storage_error(store: ArtifactStore, tmp_path: Path) -> None:
    with pytest.raises(StorageError, match="no object"):
        store.get_bytes("nope.bin")
    with pytest.raises(StorageError, match="no object"):
        store.download("nope.bin", tmp_path / "nope.bin")
    assert list(tmp_path.iterdir()) == []  # no temp file left behind either


def test_a_failed_download_keeps_the_previous_file(store: ArtifactStore, tmp_path: Path) -> None:
    dest = tmp_path / "stage-1.pt"
    dest.write_bytes(b"previous")
    with pytest.raises(StorageError):
        store.download("missing.pt", dest)
    assert dest.read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir()] == ["stage-1.pt"]


def test_download_is_atomic_temp_then_rename(
    store: ArtifactStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store.put_bytes("k.bin", b"new bytes")
    dest = tmp_path / "k.bin"
    dest.write_bytes(b"old")
    seen: list[tuple[str, str, bytes]] = []
    real_replace = os.replace

    def spy(src: str, dst: str) -> None:
        # At the moment of the rename the destination still holds the old bytes
        # and the new ones are complete in a sibling temp file.
        seen.append(
            (Path(src).parent.name, Path(dst).read_bytes().decode(), Path(src).read_bytes())
        )
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", spy)
    store.download("k.bin", dest)
    assert seen[-1] == (tmp_path.name, "old", b"new bytes")
    assert dest.read_bytes() == b"new bytes"


# --- listing and deleting ---------------------------------------------------------


def _fill(store: ArtifactStore) -> None:
    store.put_bytes("runs/r1/report.json", b"{}")
    store.put_bytes("runs/r1/plots/losses.png", b"png1")
    store.put_bytes("runs/r1/checkpoints/stage-1.pt", b"ckpt")
    store.put_bytes("runs/r10/report.json", b"{ }")
    store.put_bytes("datasets/x.png", b"x")


def test_list_is_sorted_and_by_whole_folder(store: ArtifactStore) -> None:
    _fill(store)
    listed = store.list("runs/r1")
    assert [(o.key, o.bytes) for o in listed] == [
        ("runs/r1/checkpoints/stage-1.pt", 4),
        ("runs/r1/plots/losses.png", 4),
        ("runs/r1/report.json", 2),
    ]
    assert [o.key for o in store.list("runs/r1/")] == [o.key for o in listed]
    assert len(store.list("")) == 5
    assert store.list("nothing/here") == []
    assert all(o.etag for o in listed)


def test_delete_prefix_removes_one_run_only(store: ArtifactStore) -> None:
    _fill(store)
    assert store.delete_prefix("runs/r1") == 3
    assert [o.key for o in store.list("")] == ["datasets/x.png", "runs/r10/report.json"]
    assert store.delete_prefix("runs/r1") == 0


def test_delete_prefix_refuses_the_whole_store(store: ArtifactStore) -> None:
    store.put_bytes("a", b"1")
    for prefix in ("", "/"):
        with pytest.raises(StorageError, match="whole store"):
            store.delete_prefix(prefix)
    assert store.exists("a")


def test_url_for_is_none_and_checks_expiry(store: ArtifactStore) -> None:
    store.put_bytes("a.png", b"1")
    assert store.url_for("a.png") is None
    with pytest.raises(ValueError, match="expires_s"):
        store.url_for("a.png", expires_s=0)


# --- local specifics --------------------------------------------------------------


def test_local_files_land_under_the_root_with_file_uris(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "art")
    stored = store.put_bytes("runs/r1/report.json", b"{}")
    assert (tmp_path / "art" / "runs" / "r1" / "report.json").read_bytes() == b"{}"
    assert stored.uri == (tmp_path / "art" / "runs" / "r1" / "report.json").as_uri()
    assert not [p for p in (tmp_path / "art" / "runs" / "r1").iterdir() if p.name != "report.json"]


def test_local_root_must_be_absolute() -> None:
    with pytest.raises(ConfigError, match="absolute"):
        LocalStore(Path("relative/art"))


def test_local_symlink_cannot_escape_the_root(tmp_path: Path) -> None:
    root = tmp_path / "art"
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_bytes(b"secret")
    root.mkdir()
    (root / "runs").symlink_to(outside, target_is_directory=True)
    (root / "leak.txt").symlink_to(outside / "secret.txt")
    store = LocalStore(root)

    with pytest.raises(StorageError, match="outside the artifact root"):
        store.get_bytes("runs/secret.txt")
    with pytest.raises(StorageError, match="outside the artifact root"):
        store.get_bytes("leak.txt")
    with pytest.raises(StorageError, match="outside the artifact root"):
        store.put_bytes("runs/new.txt", b"x")
    with pytest.raises(StorageError, match="outside the artifact root"):
        store.exists("runs/secret.txt")
    with pytest.raises(StorageError, match="outside the artifact root"):
        store.delete_prefix("runs")
    with pytest.raises(StorageError, match="outside the artifact root"):
        store.list("runs")
    # Whole-store listing neither follows the linked folder nor reports the linked file.
    assert store.list("") == []
    assert sorted(p.name for p in outside.iterdir()) == ["secret.txt"]
    assert (outside / "secret.txt").read_bytes() == b"secret"


def test_local_symlink_inside_the_root_is_fine(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "art")
    store.put_bytes("real/a.txt", b"a")
    (tmp_path / "art" / "alias").symlink_to(tmp_path / "art" / "real", target_is_directory=True)
    assert store.get_bytes("alias/a.txt") == b"a"


def test_local_listing_skips_leftover_temp_files(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "art")
    store.put_bytes("runs/r1/a.txt", b"a")
    (tmp_path / "art" / "runs" / "r1" / f"{TEMP_PREFIX}crashed").write_bytes(b"half")
    assert [o.key for o in store.list("runs")] == ["runs/r1/a.txt"]
    assert store.delete_prefix("runs/r1") == 2  # garbage collection takes the leftover too


def test_local_write_failure_leaves_no_temp_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = LocalStore(tmp_path / "art")
    store.put_bytes("a.txt", b"old")

    def boom(src: str, dst: str) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(StorageError, match="disk full"):
        store.put_bytes("a.txt", b"new")
    monkeypatch.undo()
    assert store.get_bytes("a.txt") == b"old"
    assert [p.name for p in (tmp_path / "art").iterdir()] == ["a.txt"]


# --- registry ---------------------------------------------------------------------


def test_open_store_by_scheme(tmp_path: Path) -> None:
    local = open_store((tmp_path / "a b").as_uri())
    assert isinstance(local, LocalStore)
    assert local.root == tmp_path / "a b"
    assert isinstance(open_store("memory://"), MemoryStore)

    from shared.storage.s3 import S3Store

    s3 = open_store(
        "s3://bucket/some/prefix", s3_endpoint_url="http://127.0.0.1:9", s3_region="eu-west-1"
    )
    assert isinstance(s3, S3Store)
    assert s3.uri("runs/r1/report.json") == "s3://bucket/some/prefix/runs/r1/report.json"
    assert (s3.endpoint_url, s3.region) == ("http://127.0.0.1:9", "eu-west-1")
    assert open_store("s3://bucket").uri("k") == "s3://bucket/k"


@pytest.mark.parametrize(
    ("url", "match"),
    [
        ("gs://bucket/x", "file://, memory://, s3://"),
        ("/just/a/path", "file://, memory://, s3://"),
        ("file://relative/path", "absolute"),
        ("s3:///no-bucket", "bucket"),
        ("s3://bucket/a//b", "invalid S3 prefix"),
        ("memory://named", "memory://"),
        ("file:///x?y=1", "query"),
    ],
)
def test_open_store_refuses_bad_urls(url: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        open_store(url)


def test_settings_default_to_a_file_store_in_home(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from shared.settings import Settings

    home = tmp_path / "fitfleet home"  # a space: the URL is percent-encoded, the path is not
    monkeypatch.setenv("FITFLEET_HOME", str(home))
    monkeypatch.delenv("FITFLEET_ARTIFACTS_URL", raising=False)
    settings = Settings()
    assert settings.artifacts_url == (home / "artifacts").as_uri()
    assert (settings.s3_endpoint_url, settings.s3_region) == (None, "us-east-1")
    store = open_store(settings.artifacts_url)
    assert isinstance(store, LocalStore)
    assert store.root == home / "artifacts"

    monkeypatch.setenv("FITFLEET_ARTIFACTS_URL", "s3://bucket/prefix")
    monkeypatch.setenv("FITFLEET_S3_ENDPOINT_URL", "http://127.0.0.1:9000")
    assert Settings().artifacts_url == "s3://bucket/prefix"
    assert Settings().s3_endpoint_url == "http://127.0.0.1:9000"


# --- sync -------------------------------------------------------------------------


class CountingStore(MemoryStore):
    def __init__(self) -> None:
        super().__init__()
        self.downloads: list[str] = []

    def download(self, key: str, dest: Path) -> None:
        self.downloads.append(key)
        super().download(key, dest)


def test_sync_downloads_once_then_reuses_the_cache(tmp_path: Path) -> None:
    store = CountingStore()
    store.put_bytes("datasets/pets/train/cat/1.png", b"cat1")
    store.put_bytes("datasets/pets/train/dog/1.png", b"dog1")
    store.put_bytes("datasets/other/x.png", b"x")

    first = sync_prefix_to_cache(store, "datasets/pets", tmp_path / "cache")
    assert (first / "train" / "cat" / "1.png").read_bytes() == b"cat1"
    assert (first / COMPLETE_NAME).is_file() and (first / MANIFEST_NAME).is_file()
    assert not (first / "x.png").exists()
    assert sorted(store.downloads) == [
        "datasets/pets/train/cat/1.png",
        "datasets/pets/train/dog/1.png",
    ]
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [first.name]  # no temp left

    store.downloads.clear()
    assert sync_prefix_to_cache(store, "datasets/pets/", tmp_path / "cache") == first
    assert store.downloads == []

    # Changed content -> a new folder; the old one stays intact for runs using it.
    store.put_bytes("datasets/pets/train/dog/2.png", b"dog2")
    second = sync_prefix_to_cache(store, "datasets/pets", tmp_path / "cache")
    assert second != first
    assert (second / "train" / "dog" / "2.png").exists()
    assert not (first / "train" / "dog" / "2.png").exists()


def test_sync_rebuilds_a_folder_without_its_marker(tmp_path: Path) -> None:
    store = CountingStore()
    store.put_bytes("ds/a.png", b"a")
    folder = sync_prefix_to_cache(store, "ds", tmp_path)
    (folder / COMPLETE_NAME).unlink()
    (folder / "a.png").write_bytes(b"corrupt")
    store.downloads.clear()
    assert sync_prefix_to_cache(store, "ds", tmp_path) == folder
    assert store.downloads == ["ds/a.png"]
    assert (folder / "a.png").read_bytes() == b"a"


def test_sync_failure_leaves_no_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = MemoryStore()
    store.put_bytes("ds/a.png", b"a")
    store.put_bytes("ds/b.png", b"b")

    def fail(key: str, dest: Path) -> None:
        raise StorageError(f"boom {key}")

    monkeypatch.setattr(store, "download", fail)
    with pytest.raises(StorageError, match="boom"):
        sync_prefix_to_cache(store, "ds", tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []


def test_sync_refuses_empty_and_impossible_layouts(tmp_path: Path) -> None:
    store = MemoryStore()
    with pytest.raises(StorageError, match="no objects"):
        sync_prefix_to_cache(store, "ds", tmp_path)
    store.put_bytes("ds/a", b"file")
    store.put_bytes("ds/a/b.png", b"under a file")
    with pytest.raises(StorageError, match="cannot both be files"):
        sync_prefix_to_cache(store, "ds", tmp_path)


def test_sync_from_a_local_store(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "src")
    store.put_bytes("pets/cat/1.png", b"c")
    folder = sync_prefix_to_cache(store, "pets", tmp_path / "cache")
    assert (folder / "cat" / "1.png").read_bytes() == b"c"
