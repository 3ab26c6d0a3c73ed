"""A worker's place in the fleet: register on start, heartbeat, deregister on a clean stop.

This runs in the Celery worker's *main* process (a thread started from the
``worker_ready`` signal), not in a pool process: the main process lives as
long as the worker, while pool processes come and go, and a pool process busy
supervising a run must not be the one proving the worker alive. The pool
process only marks the row busy/idle around a run (:func:`mark_busy`,
:func:`mark_idle`, called from :mod:`workers.tasks`).

The fleet id is ``FITFLEET_WORKER_NAME`` or ``<hostname>:<main pid>``;
:func:`fleet_worker_id` is the one place that decides it, and works in both
processes because the main pid is captured when this module is imported (in
the main process, before the pool forks; forked children inherit it).

What the worker offers: ``FITFLEET_WORKER_GPUS`` if set, else the GPUs
``nvidia-smi`` lists (no torch import in the main process: CUDA initialised
there would be inherited, broken, by forked pool processes). No nvidia-smi or
no GPU: 0 GPUs, no model, no memory.

A database outage never stops a worker: each tick that fails is logged and
the next tick tries again (registering first if it never succeeded).
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import logging
import os
import platform
import socket
import subprocess
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Engine

from shared import fleet
from shared.db.session import make_engine, session_scope
from shared.gangs import NODE_QUEUE_PREFIX
from shared.settings import Settings, get_settings

logger = logging.getLogger(__name__)

#: The worker's main process id, captured at import (in the main process, before any fork).
MAIN_PID = os.getpid()

#: Packages whose versions a worker reports (read from metadata: nothing is imported).
VERSION_PACKAGES = ("torch", "torchvision", "celery", "kombu", "sqlalchemy", "fitfleet")

NVIDIA_SMI_QUERY = [
    "nvidia-smi",
    "--query-gpu=name,memory.total,driver_version",
    "--format=csv,noheader,nounits",
]


def fleet_worker_id(settings: Settings | None = None) -> str:
    """The worker's fleet id: ``FITFLEET_WORKER_NAME``, else ``<hostname>:<main pid>``.

    Used by the main process (to register and heartbeat) and by pool processes
    (to mark the row busy), so the two always name the same row.
    """
    name = (settings or get_settings()).worker_name
    return name or f"{socket.gethostname()}:{MAIN_PID}"


@dataclass(frozen=True)
class Hardware:
    """What the worker offers per node; ``memory_bytes`` is one GPU's memory (the smallest)."""

    gpus: int
    gpu_model: str | None
    memory_bytes: int | None
    driver: str | None


Runner = Callable[[Sequence[str]], str]


def _run_nvidia_smi(command: Sequence[str]) -> str:
    return subprocess.run(
        list(command), capture_output=True, text=True, timeout=15, check=True
    ).stdout


def detect_gpus(run: Runner = _run_nvidia_smi) -> Hardware:
    """The GPUs ``nvidia-smi`` lists; no nvidia-smi, an error or no line: a CPU machine.

    Mixed models are joined with ``" / "``; memory is the smallest GPU's, since
    a run's processes each need one GPU's worth.
    """
    try:
        output = run(NVIDIA_SMI_QUERY)
    except (OSError, subprocess.SubprocessError) as exc:
        logger.info("no GPUs found (nvidia-smi: %s)", exc)
        return Hardware(0, None, None, None)
    names: list[str] = []
    memories: list[int] = []
    drivers: list[str] = []
    for line in output.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) < 2 or not parts[0]:
            continue
        names.append(parts[0])
        with contextlib.suppress(ValueError):  # "[N/A]" on some boards
            memories.append(int(float(parts[1]) * 1024 * 1024))  # MiB
        if len(parts) > 2 and parts[2]:
            drivers.append(parts[2])
    if not names:
        return Hardware(0, None, None, None)
    model = " / ".join(dict.fromkeys(names))
    return Hardware(
        len(names), model, min(memories) if memories else None, drivers[0] if drivers else None
    )


def hardware(settings: Settings, run: Runner = _run_nvidia_smi) -> Hardware:
    """Detected GPUs, with the count replaced by ``FITFLEET_WORKER_GPUS`` when set.

    On a CPU machine a declared count means that many gloo CPU ranks per node
    (no model, no memory).
    """
    found = detect_gpus(run)
    if settings.worker_gpus is None:
        return found
    if found.gpus and settings.worker_gpus > found.gpus:
        logger.warning(
            "FITFLEET_WORKER_GPUS=%d but nvidia-smi lists %d", settings.worker_gpus, found.gpus
        )
    return Hardware(settings.worker_gpus, found.gpu_model, found.memory_bytes, found.driver)


def versions(driver: str | None = None) -> dict[str, str | None]:
    """Python and package versions (None: not installed), plus the NVIDIA driver if any."""
    result: dict[str, str | None] = {"python": platform.python_version()}
    for package in VERSION_PACKAGES:
        try:
            result[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            result[package] = None
    result["nvidia_driver"] = driver
    return result


class Heartbeat:
    """Registers the worker, then refreshes its row every ``interval_s`` in a daemon thread."""

    def __init__(
        self,
        engine: Engine,
        *,
        worker_id: str,
        queues: Sequence[str],
        interval_s: float,
        hw: Hardware,
        versions: dict[str, Any],
    ) -> None:
        self.engine = engine
        self.worker_id = worker_id
        self.queues = list(queues)
        self.interval_s = interval_s
        self.hw = hw
        self.versions = versions
        self.registered = False
        self.failures = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def tick(self) -> bool:
        """One beat (registering first if needed); False if the database refused it."""
        now = datetime.now(UTC)
        try:
            with session_scope(self.engine) as session:
                if not self.registered or not fleet.heartbeat(
                    session, worker_id=self.worker_id, now=now
                ):
                    fleet.register_worker(
                        session,
                        worker_id=self.worker_id,
                        hostname=socket.gethostname(),
                        queues=self.queues,
                        gpus=self.hw.gpus,
                        gpu_model=self.hw.gpu_model,
                        memory_bytes=self.hw.memory_bytes,
                        versions=self.versions,
                        now=now,
                    )
                    logger.info(
                        "fleet: registered %s (queues %s, %d GPUs)",
                        self.worker_id,
                        ",".join(self.queues),
                        self.hw.gpus,
                    )
            self.registered = True
        except Exception:  # the database or the network: never kill the worker over it
            self.failures += 1
            logger.warning("fleet: heartbeat of %s failed; retrying", self.worker_id, exc_info=True)
            return False
        return True

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.tick()
            self._stop.wait(self.interval_s)

    def start(self) -> None:
        """Start beating (the first beat registers) in a daemon thread."""
        self._thread = threading.Thread(target=self._loop, name="fitfleet-heartbeat", daemon=True)
        self._thread.start()

    def stop(self, *, deregister: bool = True) -> None:
        """Stop the thread and, on a clean stop, mark the row stopped (``lost``); never raises."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=max(5.0, 2 * self.interval_s))
        if not deregister or not self.registered:
            return
        try:
            with session_scope(self.engine) as session:
                fleet.deregister(session, worker_id=self.worker_id, now=datetime.now(UTC))
        except Exception:
            logger.warning("fleet: could not deregister %s", self.worker_id, exc_info=True)


# --- Celery wiring (main process) ---------------------------------------------

_current: Heartbeat | None = None


def _consumer_queues(sender: Any) -> list[str]:
    """The queue names the worker consumes (``-Q``), from the consumer the signal sends.

    Its own node queue (:func:`shared.gangs.node_queue`) is left out: only the
    dispatcher's gang messages go there, and runs cannot name it.
    """
    app = getattr(sender, "app", None)
    try:
        names = sorted(app.amqp.queues.consume_from) if app is not None else []
    except AttributeError:
        return []
    return [name for name in names if not name.startswith(NODE_QUEUE_PREFIX)]


def _after_fork_in_child(engine: Engine) -> None:
    # A forked pool process must never use the parent's pooled connections.
    engine.dispose(close=False)


def on_worker_ready(sender: Any = None, **_kwargs: Any) -> None:
    """``worker_ready``: register this worker and start heartbeating (main process)."""
    global _current
    if _current is not None:
        return
    settings = get_settings()
    engine = make_engine(settings.database_url)
    os.register_at_fork(after_in_child=lambda: _after_fork_in_child(engine))
    hw = hardware(settings)
    _current = Heartbeat(
        engine,
        worker_id=fleet_worker_id(settings),
        queues=_consumer_queues(sender),
        interval_s=settings.worker_heartbeat_s,
        hw=hw,
        versions=versions(hw.driver),
    )
    _current.start()


def on_worker_shutdown(**_kwargs: Any) -> None:
    """``worker_shutdown``: stop heartbeating and mark the row stopped (main process)."""
    global _current
    current, _current = _current, None
    if current is not None:
        current.stop()
        current.engine.dispose()


def connect_signals() -> None:
    """Hook the fleet into Celery's worker signals (idempotent; see :mod:`workers.celery_entry`)."""
    from celery.signals import worker_ready, worker_shutdown

    worker_ready.connect(on_worker_ready, weak=False, dispatch_uid="fitfleet.fleet.ready")
    worker_shutdown.connect(on_worker_shutdown, weak=False, dispatch_uid="fitfleet.fleet.shutdown")


# --- pool process: busy/idle around a run --------------------------------------


def mark_busy(engine: Engine, experiment_id: str, settings: Settings | None = None) -> None:
    """Show this worker busy with ``experiment_id``; a failure is logged, never raised."""
    worker = fleet_worker_id(settings)
    try:
        with session_scope(engine) as session:
            fleet.mark_busy(
                session, worker_id=worker, experiment_id=experiment_id, now=datetime.now(UTC)
            )
    except Exception:  # the fleet view must never cost a run
        logger.warning("fleet: could not mark %s busy (%s)", worker, experiment_id, exc_info=True)


def mark_idle(engine: Engine, experiment_id: str, settings: Settings | None = None) -> None:
    """Show this worker idle again after ``experiment_id``; a failure is logged, never raised."""
    worker = fleet_worker_id(settings)
    try:
        with session_scope(engine) as session:
            fleet.mark_idle(
                session, worker_id=worker, experiment_id=experiment_id, now=datetime.now(UTC)
            )
    except Exception:
        logger.warning("fleet: could not mark %s idle (%s)", worker, experiment_id, exc_info=True)
