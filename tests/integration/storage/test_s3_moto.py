"""The S3 store against a real S3 API (moto's standalone server on loopback)."""

from __future__ import annotations

import hashlib
import os
import re
import socket
import time
import urllib.request
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

from shared.errors import BackendUnavailable, StorageError
from shared.storage import StoreUnreachable, open_store, sync_prefix_to_cache
from shared.storage.s3 import MIB, S3Store
from tests.integration.moto_server import S3Endpoint

pytestmark = pytest.mark.integration


def make_store(endpoint: S3Endpoint, bucket: str, prefix: str = "", **kwargs: object) -> S3Store:
    return S3Store(
        bucket,
        prefix,
        endpoint_url=endpoint.url,
        region=endpoint.region,
        access_key_id=endpoint.access_key_id,
        secret_access_key=endpoint.secret_access_key,
        **kwargs,  # type: ignore[arg-type]
    )


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_bucket_exists_and_roundtrips(
    s3_endpoint: S3Endpoint, s3_bucket: str, tmp_path: Path
) -> None:
    client = s3_endpoint.client()
    assert s3_bucket in [b["Name"] for b in client.list_buckets()["Buckets"]]

    store = make_store(s3_endpoint, s3_bucket, "artifacts")
    stored = store.put_bytes(
        "runs/r1/report.json", b'{"ok": true}', content_type="application/json"
    )
    assert stored.uri == f"s3://{s3_bucket}/artifacts/runs/r1/report.json"
    assert stored.sha256 == hashlib.sha256(b'{"ok": true}').hexdigest()
    assert stored.bytes == 12

    head = client.head_object(Bucket=s3_bucket, Key="artifacts/runs/r1/report.json")
    assert head["ContentType"] == "application/json"
    assert store.get_bytes("runs/r1/report.json") == b'{"ok": true}'
    assert store.exists("runs/r1/report.json")
    assert not store.exists("runs/r1/missing.json")

    dest = tmp_path / "out" / "report.json"
    store.download("runs/r1/report.json", dest)
    assert dest.read_bytes() == b'{"ok": true}'
    assert [p.name for p in dest.parent.iterdir()] == ["report.json"]

    with pytest.raises(StorageError, match=rf"s3://{s3_bucket}/artifacts/runs/r1/nope.json"):
        store.get_bytes("runs/r1/nope.json")
    with pytest.raises(StorageError, match="no such object"):
        store.download("runs/r1/nope.json", tmp_path / "nope.json")
    assert not (tmp_path / "nope.json").exists()


def test_list_and_delete_prefix_by_whole_folder(s3_endpoint: S3Endpoint, s3_bucket: str) -> None:
    store = make_store(s3_endpoint, s3_bucket, "art")
    for key in ("runs/r1/a.png", "runs/r1/ckpt/s1.pt", "runs/r10/a.png", "other.txt"):
        store.put_bytes(key, key.encode())
    # An object outside the store's prefix is invisible to it.
    s3_endpoint.client().put_object(Bucket=s3_bucket, Key="elsewhere/x", Body=b"x")

    listed = store.list("runs/r1")
    assert [(o.key, o.bytes) for o in listed] == [("runs/r1/a.png", 13), ("runs/r1/ckpt/s1.pt", 18)]
    assert all(re.fullmatch(r"[0-9a-f]{32}", o.etag) for o in listed)
    assert len(store.list("")) == 4

    assert store.delete_prefix("runs/r1") == 2
    assert [o.key for o in store.list("")] == ["other.txt", "runs/r10/a.png"]
    assert store.delete_prefix("runs/r1") == 0


def test_list_skips_folder_markers_and_refuses_unaddressable_keys(
    s3_endpoint: S3Endpoint, s3_bucket: str
) -> None:
    client = s3_endpoint.client()
    client.put_object(Bucket=s3_bucket, Key="ds/", Body=b"")  # a console's "folder"
    client.put_object(Bucket=s3_bucket, Key="ds/a.png", Body=b"a")
    store = make_store(s3_endpoint, s3_bucket)
    assert [o.key for o in store.list("ds")] == ["ds/a.png"]

    client.put_object(Bucket=s3_bucket, Key="ds/b//c.png", Body=b"c")
    with pytest.raises(StorageError, match=r"'ds/b//c.png'"):
        store.list("ds")


def test_multipart_upload_keeps_the_sha256(
    s3_endpoint: S3Endpoint, s3_bucket: str, tmp_path: Path
) -> None:
    src = tmp_path / "big.pt"
    src.write_bytes(os.urandom(12 * MIB))
    store = make_store(
        s3_endpoint, s3_bucket, multipart_threshold=5 * MIB, multipart_chunksize=5 * MIB
    )
    stored = store.put_file("runs/r1/checkpoints/stage-1.pt", src)
    assert stored.bytes == 12 * MIB
    assert stored.sha256 == sha256_of(src)

    head = s3_endpoint.client().head_object(Bucket=s3_bucket, Key="runs/r1/checkpoints/stage-1.pt")
    assert re.fullmatch(r'"[0-9a-f]{32}-3"', head["ETag"]), head["ETag"]  # 5 + 5 + 2 MiB
    assert head["ContentLength"] == 12 * MIB

    back = tmp_path / "back.pt"
    store.download("runs/r1/checkpoints/stage-1.pt", back)
    assert sha256_of(back) == stored.sha256


def test_small_files_go_up_in_one_request(
    s3_endpoint: S3Endpoint, s3_bucket: str, tmp_path: Path
) -> None:
    src = tmp_path / "small.png"
    src.write_bytes(os.urandom(1024))
    store = make_store(s3_endpoint, s3_bucket)  # default threshold: 64 MiB
    stored = store.put_file("small.png", src, content_type="image/png")
    head = s3_endpoint.client().head_object(Bucket=s3_bucket, Key="small.png")
    assert head["ETag"].strip('"') == hashlib.md5(src.read_bytes()).hexdigest()
    assert head["ContentType"] == "image/png"
    assert stored.sha256 == sha256_of(src)


def test_presigned_url_is_fetchable_and_short_lived(
    s3_endpoint: S3Endpoint, s3_bucket: str
) -> None:
    store = make_store(s3_endpoint, s3_bucket, "art")
    store.put_bytes("runs/r1/plots/losses.png", b"\x89PNG fake")

    url = store.url_for("runs/r1/plots/losses.png")
    assert url is not None
    parts = urlsplit(url)
    assert parts.hostname == "127.0.0.1"
    expires = int(parse_qs(parts.query)["X-Amz-Expires"][0])
    assert 0 < expires <= 300
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url, timeout=10) as response:
        assert response.read() == b"\x89PNG fake"

    short = store.url_for("runs/r1/plots/losses.png", expires_s=30)
    assert short is not None
    assert parse_qs(urlsplit(short).query)["X-Amz-Expires"] == ["30"]


def test_missing_bucket_names_the_bucket(s3_endpoint: S3Endpoint) -> None:
    store = make_store(s3_endpoint, "no-such-bucket-here")
    for call in (
        lambda: store.put_bytes("a.txt", b"x"),
        lambda: store.get_bytes("a.txt"),
        lambda: store.list(""),
    ):
        with pytest.raises(
            StorageError, match="bucket 'no-such-bucket-here' does not exist"
        ) as info:
            call()
        assert info.value.__cause__ is not None  # chained from the botocore error


def test_wrong_credentials_give_clear_errors(s3_endpoint_with_auth: S3Endpoint) -> None:
    endpoint = s3_endpoint_with_auth
    bucket = endpoint.create_bucket()
    good = make_store(endpoint, bucket)
    good.put_bytes("a.txt", b"x")  # the right credentials work

    unknown_key = S3Store(
        bucket,
        endpoint_url=endpoint.url,
        access_key_id="AKIANOTAREALKEY00000",
        secret_access_key="whatever",
        max_attempts=1,
    )
    with pytest.raises(StorageError, match="access key id is not known") as info:
        unknown_key.get_bytes("a.txt")
    assert f"s3://{bucket}/a.txt" in str(info.value)

    wrong_secret = S3Store(
        bucket,
        endpoint_url=endpoint.url,
        access_key_id=endpoint.access_key_id,
        secret_access_key="not-the-secret",
        max_attempts=1,
    )
    with pytest.raises(StorageError, match="secret access key does not match"):
        wrong_secret.put_bytes("b.txt", b"y")
    # HEAD responses carry no error body: S3 can only say 403.
    with pytest.raises(StorageError, match=r"forbidden \(HTTP 403\)"):
        wrong_secret.exists("a.txt")


def test_open_store_uses_the_default_credential_chain(s3_env: S3Endpoint, s3_bucket: str) -> None:
    store = open_store(f"s3://{s3_bucket}/art", s3_endpoint_url=s3_env.url, s3_region=s3_env.region)
    store.put_bytes("k.txt", b"via env")
    assert store.get_bytes("k.txt") == b"via env"
    obj = s3_env.client().get_object(Bucket=s3_bucket, Key="art/k.txt")
    assert obj["Body"].read() == b"via env"


def test_sync_downloads_once_and_reuses_the_cache(
    s3_endpoint: S3Endpoint, s3_bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = s3_endpoint.client()
    for name in ("train/cat/1.png", "train/cat/2.png", "train/dog/1.png", "valid/dog/2.png"):
        client.put_object(Bucket=s3_bucket, Key=f"datasets/pets/{name}", Body=name.encode())
    client.put_object(Bucket=s3_bucket, Key="datasets/other/x.png", Body=b"x")

    # How the worker resolves `data.source: s3://bucket/datasets/pets`.
    store = make_store(s3_endpoint, s3_bucket, "datasets/pets")
    downloads: list[str] = []
    real = S3Store._download_into

    def counting(self: S3Store, key: str, fh: object) -> None:
        downloads.append(key)
        real(self, key, fh)  # type: ignore[arg-type]

    monkeypatch.setattr(S3Store, "_download_into", counting)

    cache = tmp_path / "cache"
    folder = sync_prefix_to_cache(store, "", cache)
    assert sorted(downloads) == [
        "train/cat/1.png",
        "train/cat/2.png",
        "train/dog/1.png",
        "valid/dog/2.png",
    ]
    assert (folder / "train" / "cat" / "2.png").read_bytes() == b"train/cat/2.png"
    assert not (folder / "x.png").exists()

    downloads.clear()
    assert sync_prefix_to_cache(store, "", cache) == folder
    assert downloads == []
    # The same data reached through a bucket-level store and a prefix: same cache.
    assert (
        sync_prefix_to_cache(make_store(s3_endpoint, s3_bucket), "datasets/pets", cache) == folder
    )
    assert downloads == []

    client.put_object(Bucket=s3_bucket, Key="datasets/pets/train/cat/1.png", Body=b"changed")
    changed = sync_prefix_to_cache(store, "", cache)
    assert changed != folder
    assert (changed / "train" / "cat" / "1.png").read_bytes() == b"changed"
    assert len(downloads) == 4


def _closed_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port  # closed on exit: nothing listens there


def test_endpoint_down_fails_fast_and_is_retryable() -> None:
    store = S3Store(
        "bucket",
        endpoint_url=f"http://127.0.0.1:{_closed_port()}",
        access_key_id="testing",
        secret_access_key="testing",
        max_attempts=2,
        connect_timeout=0.5,
        read_timeout=0.5,
    )
    started = time.monotonic()
    with pytest.raises(
        StoreUnreachable, match=r"s3://bucket/a\.txt.*did not answer after 2"
    ) as info:
        store.put_bytes("a.txt", b"x")
    assert time.monotonic() - started < 10
    assert isinstance(info.value, StorageError)
    assert isinstance(info.value, BackendUnavailable)  # so the task layer retries it
    with pytest.raises(StoreUnreachable):
        store.exists("a.txt")
