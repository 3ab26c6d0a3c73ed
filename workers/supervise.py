"""Run one training as a child process group and watch it: lease, cancel, timeout.

A Celery prefork pool process is daemonic, so it cannot host
``multiprocessing``/``torch.multiprocessing``/DataLoader workers; and Celery's
own time limits and ``revoke(terminate=True)`` cannot be trusted with a
process tree (see the pitfalls reference). So the task starts the trainer
with ``subprocess.Popen(..., start_new_session=True)`` (its own session and
process group, which also keeps a terminal's Ctrl-C away from it) and this
module supervises it: it renews the run's lease in Postgres every poll, stops
the group when a cancel is requested, the lease is lost or
``resources.timeout`` passes (SIGTERM to the whole group, SIGKILL after a
grace period), and never returns while any process of the group is alive.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import os
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import Engine, select

from shared.db.models import ExperimentState, SqlExperiment
from shared.db.session import session_scope
from shared.errors import BackendUnavailable
from shared.runs import renew_lease

logger = logging.getLogger(__name__)

#: The child's exit codes (the ``workers.run_job`` contract).
EXIT_SUCCEEDED = 0
EXIT_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_STOPPED = 130
EXIT_PEER_LOST = 75  # a multi-node run lost a node: resume on a fresh gang

#: How often the child's exit is checked between polls of the database: an
#: exit is noticed within this, whatever ``poll_s`` is.
_EXIT_CHECK_S = 0.05


class _Stop(enum.Enum):
    CANCEL = "cancel"
    LEASE_LOST = "lease lost"
    TIMEOUT = "timeout"


@dataclass(frozen=True)
class Outcome:
    """How a supervised run ended.

    ``state`` is the terminal state to release the run with, or ``None`` when
    the lease was lost: another worker (or the reconciler) owns the run now and
    this worker must not write its outcome. ``exit_code`` is the child's
    (negative: killed by that signal), ``pid`` the child's pid, which is also
    its process group id.
    """

    state: ExperimentState | None
    error: str | None
    exit_code: int
    pid: int
    stopped: bool = False  # this supervisor stopped the group (cancel or timeout)

    @property
    def lease_lost(self) -> bool:
        """True when the run is no longer ours and must not be released by us."""
        return self.state is None


def _exited(pid: int) -> bool:
    """Whether ``pid`` has exited, *without* reaping it.

    An unreaped leader (a zombie) keeps its process group id reserved, so the
    group can still be signalled safely: the id cannot have been reused.
    """
    info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    return info is not None and info.si_pid == pid


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):  # the whole group is gone already
        os.killpg(pgid, sig)


def _wait_exit(pid: int, timeout_s: float) -> bool:
    """Wait up to ``timeout_s`` for ``pid`` to exit (not reaped); True if it did."""
    deadline = time.monotonic() + timeout_s
    while True:
        if _exited(pid):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(_EXIT_CHECK_S)


def _stop_group(proc: subprocess.Popen[bytes], grace_s: float) -> None:
    """SIGTERM the group, SIGKILL it after ``grace_s`` if the leader is still running.

    SIGTERM lets torchrun (or ``run_job``) checkpoint and forward the signal to
    its ranks; a process that ignores it gets SIGKILL, which it cannot.
    """
    _signal_group(proc.pid, signal.SIGTERM)
    if not _wait_exit(proc.pid, grace_s):
        logger.warning(
            "run process group %d ignored SIGTERM for %.0f s; killing", proc.pid, grace_s
        )
        _signal_group(proc.pid, signal.SIGKILL)


def _reap(proc: subprocess.Popen[bytes]) -> int:
    """Kill whatever is left of the group, then reap the leader and return its exit code.

    Called once the leader has exited (or on the way out of an error): a rank
    or a helper that outlived the leader would hold a GPU forever, so the rest
    of the group is SIGKILLed while the unreaped leader still pins the group id.
    """
    _signal_group(proc.pid, signal.SIGKILL)
    return proc.wait()


def _poll_db(
    engine: Engine, *, experiment_id: str, worker_id: str, lease_ttl_s: float
) -> tuple[bool, bool]:
    """Renew the lease and read the cancel flag in one transaction: (still ours, cancel asked)."""
    with session_scope(engine) as session:
        ours = renew_lease(
            session,
            experiment_id=experiment_id,
            worker_id=worker_id,
            ttl_s=lease_ttl_s,
            now=datetime.now(UTC),
        )
        cancel = session.scalar(
            select(SqlExperiment.cancel_requested).where(SqlExperiment.id == experiment_id)
        )
    return ours, bool(cancel)


def _rank0_code(exit_file: Path | None, code: int) -> tuple[int, str | None]:
    """Rank 0's exit code (and its reason) from ``exit_file`` when it wrote one.

    Otherwise the launcher's own ``code`` and no reason.
    """
    if exit_file is None:
        return code, None
    try:
        first, _, rest = exit_file.read_text().partition("\n")
        return int(first.strip()), (rest.strip() or None)
    except (OSError, ValueError):
        return code, None


def _describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


def supervise(
    command: Sequence[str],
    *,
    experiment_id: str,
    worker_id: str,
    engine: Engine,
    timeout_s: float,
    lease_ttl_s: float = 60.0,
    poll_s: float = 1.0,
    grace_s: float = 10.0,
    env: Mapping[str, str] | None = None,
    exit_file: Path | None = None,
) -> Outcome:
    """Run ``command`` in a new process group until it ends or must be stopped.

    The caller must hold the run's lease (:func:`shared.runs.claim_run`) and
    releases the run afterwards with the returned outcome (unless
    ``outcome.lease_lost``). Every ``poll_s`` the lease is renewed for
    ``lease_ttl_s`` and the cancel flag read. The group is stopped when a
    cancel was requested (-> ``cancelled``), the lease is lost (-> ``None``),
    or ``timeout_s`` passed since the start (-> ``failed``). A database outage
    does not stop a healthy run at once; only a lease not renewed for
    ``lease_ttl_s`` counts as lost, because someone else may take it then.

    Exit codes when the child ends on its own: 0 succeeded, 2 failed (bad
    input), 130 cancelled if a cancel was requested (the child noticed it
    first), lease lost if the lease is no longer ours, anything else failed.
    Under torchrun the launcher's own status hides rank 0's code, so when
    ``exit_file`` holds one (``run_job`` writes it there) that code is used.

    Raises:
        OSError: the command could not be started (nothing is left running).
    """
    started = time.monotonic()
    proc = subprocess.Popen(list(command), start_new_session=True, env=env)
    logger.info("run %s: started %s as process group %d", experiment_id, command[0], proc.pid)
    stop: _Stop | None = None
    cancel = False
    try:
        last_renewed = started
        next_poll = started + poll_s
        while not _exited(proc.pid):
            now = time.monotonic()
            if now - started >= timeout_s:
                stop = _Stop.TIMEOUT
            elif now >= next_poll:
                next_poll = now + poll_s
                try:
                    ours, cancel = _poll_db(
                        engine,
                        experiment_id=experiment_id,
                        worker_id=worker_id,
                        lease_ttl_s=lease_ttl_s,
                    )
                except BackendUnavailable:
                    logger.warning("run %s: lease renewal failed", experiment_id, exc_info=True)
                    ours = now - last_renewed < lease_ttl_s
                else:
                    last_renewed = now if ours else last_renewed
                if not ours:
                    stop = _Stop.LEASE_LOST
                elif cancel:
                    stop = _Stop.CANCEL
            if stop is not None:
                logger.info(
                    "run %s: stopping process group %d (%s)", experiment_id, proc.pid, stop.value
                )
                _stop_group(proc, grace_s)
                break
            time.sleep(_EXIT_CHECK_S)
    finally:
        # Also on errors (a KeyboardInterrupt, a bug): never leave the group behind.
        code = _reap(proc)
    code, reason = _rank0_code(exit_file, code)
    return _outcome(
        stop,
        code,
        proc.pid,
        timeout_s=timeout_s,
        engine=engine,
        experiment_id=experiment_id,
        worker_id=worker_id,
        lease_ttl_s=lease_ttl_s,
        reason=reason,
    )


def _outcome(
    stop: _Stop | None,
    code: int,
    pid: int,
    *,
    timeout_s: float,
    engine: Engine,
    experiment_id: str,
    worker_id: str,
    lease_ttl_s: float,
    reason: str | None = None,
) -> Outcome:
    """Map why the child ended to the run's terminal state (see :func:`supervise`).

    ``reason`` is the trainer's own account of a failure (from the exit file):
    it becomes the run's error instead of a bare exit code.
    """
    if stop is _Stop.TIMEOUT:
        return Outcome(
            ExperimentState.FAILED,
            f"timed out after {timeout_s:g} s (resources.timeout)",
            code,
            pid,
            stopped=True,
        )
    if stop is _Stop.LEASE_LOST:
        return Outcome(None, "lease lost", code, pid)
    if stop is _Stop.CANCEL:
        return Outcome(ExperimentState.CANCELLED, None, code, pid, stopped=True)
    if code == EXIT_SUCCEEDED:
        return Outcome(ExperimentState.SUCCEEDED, None, code, pid)
    if code == EXIT_BAD_INPUT:
        return Outcome(ExperimentState.FAILED, reason or "bad input (exit code 2)", code, pid)
    if code == EXIT_STOPPED:
        # The child stopped itself: it saw the cancel or lost the lease before we did.
        ours, cancel = _poll_db(
            engine, experiment_id=experiment_id, worker_id=worker_id, lease_ttl_s=lease_ttl_s
        )
        if not ours:
            return Outcome(None, "lease lost", code, pid)
        if cancel:
            return Outcome(ExperimentState.CANCELLED, None, code, pid)
        return Outcome(
            ExperimentState.FAILED, "training stopped (exit code 130) without a cancel", code, pid
        )
    return Outcome(
        ExperimentState.FAILED, reason or f"training failed ({_describe_exit(code)})", code, pid
    )
