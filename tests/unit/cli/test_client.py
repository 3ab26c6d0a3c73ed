"""The SDK: every endpoint's path and parameters, downloads, errors."""

from __future__ import annotations

import socket
from pathlib import Path

import httpx
import pytest

from cli.client import ApiError, ChecksumMismatch, Client, ServerDown
from tests.unit.cli.fake_api import FILE_BYTES, FILE_SHA, FakeApi


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _recorder() -> tuple[Client, list[httpx.Request]]:
    seen: list[httpx.Request] = []

    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"ok": True})

    http = httpx.Client(base_url="http://fake", transport=httpx.MockTransport(handle))
    return Client("http://fake", "ff_x", http=http), seen


def test_every_endpoint_goes_where_the_contract_says() -> None:
    api, seen = _recorder()
    api.runs(state="running", sort="best:error_rate", limit=5, sweep="swp_1")
    api.leaderboard("error_rate", dataset="digits")
    api.datasets()
    api.compare(["a", "b"])
    api.compare(sweep="swp_1")
    api.failures(project="vision")
    api.events("exp_1", after=7)
    api.me()
    api.create_sweep("s", {"version": 1}, {"model.arch": ["resnet18"]}, count=None)
    api.sweeps()
    api.sweep("swp_1")
    api.artifacts("exp_1")
    api.lr_find("exp_1")
    api.interpretation("exp_1")
    api.cancel("exp_1")
    got = [(r.method, r.url.path, dict(r.url.params)) for r in seen]
    assert got == [
        (
            "GET",
            "/v1/runs",
            {"state": "running", "sort": "best:error_rate", "limit": "5", "sweep": "swp_1"},
        ),
        ("GET", "/v1/leaderboard", {"metric": "error_rate", "dataset": "digits"}),
        ("GET", "/v1/datasets", {}),
        ("GET", "/v1/compare", {"ids": "a,b"}),
        ("GET", "/v1/compare", {"sweep": "swp_1"}),
        ("GET", "/v1/failures", {"project": "vision"}),
        ("GET", "/v1/experiments/exp_1/events", {"after": "7"}),
        ("GET", "/v1/me", {}),
        ("POST", "/v1/sweeps", {}),
        ("GET", "/v1/sweeps", {}),
        ("GET", "/v1/sweeps/swp_1", {}),
        ("GET", "/v1/experiments/exp_1/artifacts", {}),
        ("GET", "/v1/experiments/exp_1/lr-find", {}),
        ("GET", "/v1/experiments/exp_1/interpretation", {}),
        ("POST", "/v1/experiments/exp_1/cancel", {}),
    ]
    assert all(r.headers["authorization"] == "Bearer ff_x" for r in seen)
    with pytest.raises(ValueError, match="not both"):
        api.compare(["a", "b"], sweep="s")


def test_download_streams_atomically_and_checks_the_sha(tmp_path: Path) -> None:
    fake = FakeApi()
    api = fake.client()
    dest = tmp_path / "out" / "plots" / "losses.png"
    got = api.download_artifact("exp_a", "plots/losses.png", dest, expected_sha256=FILE_SHA)
    assert got.path == dest and got.bytes == len(FILE_BYTES) and got.sha256 == FILE_SHA
    assert dest.read_bytes() == FILE_BYTES
    with pytest.raises(ChecksumMismatch, match="does not match"):
        api.download_artifact("exp_a", "report.json", tmp_path / "r.json", expected_sha256="0" * 64)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temp file, no partial file


def test_download_follows_a_presigned_redirect_without_the_token(tmp_path: Path) -> None:
    fake = FakeApi()
    fake.redirect_to = "https://store.example/bucket/key?X-Amz-Signature=abc"
    got = fake.client().download_artifact("exp_a", "report.json", tmp_path / "report.json")
    assert got.sha256 == FILE_SHA
    to_store = [r for r in fake.requests if r.url.host == "store.example"]
    assert len(to_store) == 1
    assert "authorization" not in to_store[0].headers


def test_download_of_a_missing_run_is_an_api_error(tmp_path: Path) -> None:
    with pytest.raises(ApiError) as caught:
        FakeApi().client().download_artifact("exp_zzz", "report.json", tmp_path / "r")
    assert caught.value.status == 404
    assert caught.value.lines() == ["no experiment 'exp_zzz'"]
    assert list(tmp_path.iterdir()) == []


def test_a_closed_port_is_server_down(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{_closed_port()}"
    with Client(url, "ff_x") as api:
        with pytest.raises(ServerDown, match=f"cannot reach the fitfleet server at {url}"):
            api.runs()
        with pytest.raises(ServerDown):
            api.download_artifact("exp_a", "report.json", tmp_path / "r")
    assert list(tmp_path.iterdir()) == []
