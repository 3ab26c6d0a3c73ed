"""Servers the fault tests own, so they can kill and restart them: a private Redis.

The shared Redis on 6379 belongs to everyone on the machine; a test that kills
its broker starts its own ``redis-server`` on a free loopback port, with or
without persistence (append-only file, fsync on every write), and can stop it
with SIGKILL and start it again on the same port and folder.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
import redis


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class PrivateRedis:
    """One ``redis-server`` process on 127.0.0.1:``port``, data (if kept) under ``folder``."""

    def __init__(self, folder: Path, *, persistent: bool) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail("redis-server is not installed: the broker fault tests need it")
        self.binary = binary
        self.folder = folder
        self.persistent = persistent
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        folder.mkdir(parents=True, exist_ok=True)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        persistence = (
            ["--appendonly", "yes", "--appendfsync", "always", "--save", ""]
            if self.persistent
            else ["--appendonly", "no", "--save", ""]
        )
        with (self.folder / "redis.log").open("ab") as log:
            self.proc = subprocess.Popen(
                [self.binary, "--port", str(self.port), "--bind", "127.0.0.1",
                 "--dir", str(self.folder), *persistence],
                stdout=log,
                stderr=subprocess.STDOUT,
            )  # fmt: skip
        client = redis.Redis.from_url(self.url, socket_connect_timeout=1)
        deadline = time.monotonic() + 15
        while True:
            try:
                client.ping()
                break
            except redis.exceptions.RedisError:
                assert time.monotonic() < deadline, "the private redis-server did not start"
                time.sleep(0.1)
            finally:
                client.close()

    def kill(self) -> None:
        """SIGKILL: no shutdown save, exactly like a crash."""
        if self.proc is not None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
            self.proc = None

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()
            self.proc = None


class PrivatePostgres:
    """A Postgres cluster of the test's own on 127.0.0.1:``port`` (trust auth).

    Made with ``initdb`` in ``folder`` and run as the ``postgres`` system user
    (Postgres refuses to run as root), so it can be stopped like a crash
    (``pg_ctl -m immediate``) and started again, which recovers from its WAL.
    """

    def __init__(self) -> None:
        bins = sorted(Path("/usr/lib/postgresql").glob("*/bin"))
        if not bins or shutil.which("runuser") is None:
            pytest.fail("Postgres server binaries (and runuser) are needed for this fault test")
        self.bin = bins[-1]
        # Not under pytest's tmp_path: its folders are private to root, and the
        # server runs as the postgres user.
        self.folder = Path(tempfile.mkdtemp(prefix="fitfleet-pg-"))
        self.data = self.folder / "data"
        self.port = free_port()
        shutil.chown(self.folder, "postgres", "postgres")
        self._as_postgres(
            [str(self.bin / "initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres"]
        )

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def _as_postgres(self, command: list[str]) -> None:
        subprocess.run(
            ["runuser", "-u", "postgres", "--", *command],
            check=True,
            capture_output=True,
            timeout=120,
        )

    def start(self) -> None:
        options = f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.folder}"
        self._as_postgres(
            [str(self.bin / "pg_ctl"), "-D", str(self.data), "-o", options,
             "-l", str(self.folder / "postgres.log"), "-w", "-t", "60", "start"]
        )  # fmt: skip

    def crash(self) -> None:
        """Stop at once, without a checkpoint: the next start recovers from the WAL."""
        self._as_postgres(
            [str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop"]
        )

    def stop(self) -> None:
        """Stop the server and remove its folder."""
        with contextlib.suppress(subprocess.CalledProcessError):  # not running
            self._as_postgres(
                [str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop"]
            )
        shutil.rmtree(self.folder, ignore_errors=True)
