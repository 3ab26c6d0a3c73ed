"""What the fault tests share: a dispatcher thread, waiting, killing a process tree, rows."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, func, select

from shared.celery import broker_depths, make_celery
from shared.db.models import ExperimentState, SqlEvent, SqlExperiment
from shared.db.session import session_scope
from shared.dispatch import celery_publisher
from shared.settings import Settings
from workers.cli import dispatch_pass


def wait_for(check: Callable[[], Any], *, timeout: float, what: str, every: float = 0.2) -> Any:
    """Poll ``check`` until it returns something truthy; fail naming ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out after {timeout:g} s waiting for {what}"
        time.sleep(every)


def descendants(pid: int) -> list[int]:
    """Every live process below ``pid``, across sessions (torchrun and run_job start their own)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if fields[0] == "Z":  # a zombie is gone already, only unreaped
            continue
        children.setdefault(int(fields[1]), []).append(int(entry.name))
    found: list[int] = []
    stack = [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


def kill_tree(pid: int) -> None:
    """A machine dies: the process and everything it started, SIGKILLed at once."""
    for target in [pid, *descendants(pid)]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(target, signal.SIGKILL)


class Dispatcher:
    """``fitfleet dispatch`` in a thread: relay, lease reconciler, lost-message check."""

    def __init__(
        self,
        engine: Engine,
        settings: Settings,
        *,
        interval_s: float = 0.3,
        redispatch_after_s: float | None = None,
        lost_after_s: float = 60.0,
    ) -> None:
        self.engine = engine
        self.settings = settings
        self.interval_s = interval_s
        self.redispatch_after_s = redispatch_after_s
        self.lost_after_s = lost_after_s
        self.app = make_celery(settings)
        self.publish = celery_publisher(self.app)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def _depths(self, queues: Sequence[str]) -> Mapping[str, int | None]:
        return broker_depths(self.settings, queues)[0]

    def _loop(self) -> None:
        while not self.stop.is_set():
            # A pass that fails (the broker is down) is retried, like the real loop's.
            with contextlib.suppress(Exception):
                dispatch_pass(
                    self.engine,
                    self.publish,
                    lost_after_s=self.lost_after_s,
                    depths=self._depths,
                    redispatch_after_s=self.redispatch_after_s,
                )
            self.stop.wait(self.interval_s)

    def __enter__(self) -> Dispatcher:
        self.thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        self.thread.join(30)
        self.app.close()


def run_row(engine: Engine, run_id: str) -> SqlExperiment:
    """The run's row, detached (readable after the session closes)."""
    with session_scope(engine) as session:
        row = session.get(SqlExperiment, run_id)
        assert row is not None
        session.expunge(row)
        return row


def state(engine: Engine, run_id: str) -> ExperimentState:
    return run_row(engine, run_id).state


def count_events(engine: Engine, run_id: str, kind: str) -> int:
    with session_scope(engine) as session:
        return int(
            session.scalar(
                select(func.count())
                .select_from(SqlEvent)
                .where(SqlEvent.experiment_id == run_id, SqlEvent.kind == kind)
            )
            or 0
        )
