"""The embedded stack: API, dispatcher and one worker on this machine, nothing to install.

``fitfleet up`` and ``fitfleet demo`` use it.  Every part is the production
part (uvicorn + FastAPI, the outbox dispatcher, a prefork Celery worker running
the trainer as a child process group); only the backends are embedded, chosen
by the default URLs: SQLite under FITFLEET_HOME, kombu's ``filesystem://``
broker and a ``file://`` artifact folder.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from shared.settings import Settings

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A TCP port nobody listens on right now (loopback)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def stack_env(settings: Settings) -> dict[str, str]:
    """The environment every part gets, so all of them agree on the backends."""
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        "FITFLEET_HOME": str(settings.home),
        "FITFLEET_DATABASE_URL": settings.database_url,
        "FITFLEET_BROKER_URL": settings.broker_url,
        "FITFLEET_ARTIFACTS_URL": settings.artifacts_url,
        "FITFLEET_DATA_ROOTS": os.pathsep.join(str(p) for p in settings.data_roots),
        "FITFLEET_WORKER_POLL_S": "0.5",
    }


@dataclass
class Stack:
    """The running parts; :meth:`stop` ends them all, children included."""

    url: str
    logs: Path
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def check(self) -> None:
        """Raise when a part has died (its log says why)."""
        for name, proc in self.processes.items():
            if proc.poll() is not None:
                raise RuntimeError(
                    f"the {name} stopped (exit {proc.returncode}); see {self.logs / name}.log"
                )

    def stop(self) -> None:
        """SIGTERM every part's process group, then SIGKILL what is left."""
        for proc in self.processes.values():
            _signal_group(proc, signal.SIGTERM)
        deadline = time.monotonic() + 20
        for proc in self.processes.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            _signal_group(proc, signal.SIGKILL)
            proc.wait()


def _signal_group(proc: subprocess.Popen[bytes], sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)


def start_stack(settings: Settings, *, port: int | None = None, queues: str = "gpu") -> Stack:
    """Migrate the database, start API, dispatcher and worker, wait until the API answers."""
    from shared.db.upgrade import upgrade

    upgrade(settings.database_url)
    port = port or free_port()
    logs = settings.home / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    env = stack_env(settings)
    python = sys.executable
    commands = {
        "api": [
            python, "-m", "uvicorn", "--factory", "services.api.app:create_app",
            "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning",
        ],
        "dispatcher": [python, "-m", "cli", "dispatch", "--interval", "0.5"],
        "worker": [
            python, "-m", "celery", "-A", "workers.celery_entry", "worker", "-Q", queues,
            "--pool", "prefork", "--concurrency", "1", "--loglevel", "INFO",
            "--without-gossip", "--without-mingle", "--without-heartbeat",
        ],
    }  # fmt: skip
    stack = Stack(url=f"http://127.0.0.1:{port}", logs=logs)
    try:
        for name, command in commands.items():
            with (logs / f"{name}.log").open("ab") as log:
                stack.processes[name] = subprocess.Popen(
                    command,
                    cwd=REPO,
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
        deadline = time.monotonic() + 60
        while True:
            stack.check()
            try:
                urllib.request.urlopen(f"{stack.url}/healthz", timeout=1)
                return stack
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"the API did not answer on {stack.url}; see {logs}/api.log"
                    ) from None
                time.sleep(0.2)
    except BaseException:
        stack.stop()
        raise
