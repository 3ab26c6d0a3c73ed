"""moto's standalone S3 server in a subprocess, for the integration fixtures.

moto's server speaks the same HTTP API, signing and multipart rules a real
endpoint has, unlike in-process mocks that patch botocore. A server that cannot
start *fails* the test (``pytest.fail``), never skips it.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

MOTO_START_TIMEOUT_S = 20.0


@dataclass(frozen=True)
class S3Endpoint:
    """A running S3-compatible endpoint and credentials it accepts."""

    url: str
    region: str = "us-east-1"
    access_key_id: str = "testing"
    secret_access_key: str = "testing"
    log: Path | None = field(default=None, compare=False)

    def client(self) -> Any:
        """A plain boto3 client for test setup and assertions (create_bucket, head_object)."""
        import boto3
        from botocore.config import Config

        return boto3.session.Session().client(
            "s3",
            endpoint_url=self.url,
            region_name=self.region,
            aws_access_key_id=self.access_key_id,
            aws_secret_access_key=self.secret_access_key,
            config=Config(s3={"addressing_style": "path"}, retries={"total_max_attempts": 2}),
        )

    def create_bucket(self, prefix: str = "test") -> str:
        """A new, uniquely named bucket: tests never see each other's objects."""
        name = f"{prefix}-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return name


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _answers(url: str) -> bool:
    # No proxies: a developer's HTTP(S)_PROXY must not intercept loopback.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(f"{url}/moto-api/", timeout=1):
            return True
    except urllib.error.HTTPError:
        return True  # any HTTP status means the server is up
    except OSError:
        return False


def stop_server(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


def _tail(log: Path) -> str:
    try:
        return log.read_text(errors="replace")[-2000:]
    except OSError:
        return "(no log)"


def start_moto_server(
    log: Path, *, extra_env: dict[str, str] | None = None
) -> tuple[subprocess.Popen[bytes], str]:
    """Start ``moto.server`` on a free loopback port; ``pytest.fail`` if it never answers.

    A free port found by binding port 0 can be taken by someone else before moto
    binds it, so an early exit is retried on a new port (three tries).
    """
    env = {**os.environ, **(extra_env or {})}
    deadline = time.monotonic() + MOTO_START_TIMEOUT_S
    outcome = f"did not answer within {MOTO_START_TIMEOUT_S:.0f} s"
    for _ in range(3):
        port = _free_port()
        url = f"http://127.0.0.1:{port}"
        with log.open("ab") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
            )
        while proc.poll() is None and time.monotonic() < deadline:
            if _answers(url):
                return proc, url
            time.sleep(0.1)
        if proc.poll() is not None:
            outcome = f"exited with code {proc.returncode} (three tries)"
        stop_server(proc)
        if time.monotonic() >= deadline:
            break
    pytest.fail(
        f"the moto S3 server on 127.0.0.1 {outcome}; is moto[server] installed? "
        f"Log {log}:\n{_tail(log)}",
        pytrace=False,
    )
