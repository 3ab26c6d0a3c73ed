"""Workers die, runs are cancelled, time out or keep losing their workers: each ends right.

Real processes and servers: Celery workers (subprocesses of their own), a
fresh Postgres database, the shared Redis (a queue of this test's own), a
file artifact store, the FastAPI app for cancels, and a dispatcher thread
(relay + lease reconciler). Worker deaths are SIGKILLs of the worker and
everything it started.

Stated tolerance for the resumed run: it resumes from the checkpoint of its
last finished epoch and replays the same batches with the same random state,
so its final validation loss and error rate must equal an uninterrupted run's
within float noise: 1e-3 relative on the loss, and the same error rate to
within one validation image.
"""

from __future__ import annotations

import os
import sys
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from services.api.app import create_app
from services.api.tokens import create_token
from shared.db.models import ExperimentState, SqlEpochMetric, SqlExperiment, SqlProject
from shared.db.session import make_engine, session_scope
from shared.runs import train_message
from shared.settings import Settings
from shared.spec import ExperimentSpec
from shared.spec_io import dump_spec
from shared.storage.registry import open_store
from tests.faults.harness import (
    Dispatcher,
    count_events,
    descendants,
    kill_tree,
    run_row,
    state,
    wait_for,
)
from tests.integration.celery_worker import celery_worker, redis_or_fail, unique_queue

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REDIS_URL = os.environ.get("FITFLEET_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
LEASE_TTL_S = 5.0


class Fleet:
    """The shared parts of one test: database, broker, store, dispatcher settings."""

    def __init__(self, database_url: str, tmp_path: Path, digits_root: Path) -> None:
        self.redis = redis_or_fail(REDIS_URL)
        self.queue = unique_queue("faults")
        self.tmp = tmp_path
        self.digits = digits_root
        self.artifacts = (tmp_path / "artifacts").as_uri()
        self.database_url = database_url
        self.engine = make_engine(database_url)
        self.settings = Settings(
            home=tmp_path / "api",
            database_url=database_url,
            broker_url=self.redis,
            artifacts_url=self.artifacts,
            data_roots=[digits_root],
            publish_on_submit=False,
        )

    def env(self, name: str, **extra: str) -> dict[str, str]:
        return {
            "FITFLEET_HOME": str(self.tmp / name),
            "FITFLEET_BROKER_URL": self.redis,
            "FITFLEET_DATABASE_URL": self.database_url,
            "FITFLEET_ARTIFACTS_URL": self.artifacts,
            "FITFLEET_DATA_ROOTS": str(self.digits),
            "FITFLEET_WORKER_NAME": f"{self.queue}-{name}",
            "FITFLEET_WORKER_POLL_S": "0.5",
            "FITFLEET_WORKER_LEASE_TTL_S": str(LEASE_TTL_S),
            "FITFLEET_WORKER_GRACE_S": "5",
            "OMP_NUM_THREADS": "1",
            **extra,
        }

    def worker(self, name: str, **extra: str) -> Any:
        return celery_worker(
            self.env(name, **extra), queue=self.queue, log=self.tmp / f"{name}.log"
        )

    def submit(self, name: str, **resources: Any) -> str:
        spec = ExperimentSpec.model_validate(
            {
                "version": 1,
                "name": name,
                "project": "faults",
                "seed": 3,
                "data": {
                    "source": str(self.digits / "digits"),
                    "split": {"by": "folder"},
                    "size": 16,
                    "batch_size": 32,
                    "augment": "none",
                },
                "model": {"arch": "resnet18", "pretrained": resources.pop("pretrained", "none")},
                "stages": [
                    {"name": "head", "train": "head", "epochs": resources.pop("head", 2),
                     "max_lr": resources.pop("head_lr", 1e-2)},
                    {"name": "all", "train": "all", "epochs": resources.pop("all", 2),
                     "max_lr": [1e-4, 1e-3]},
                ],
                "interpret": {"show_batch": None, "confusion_matrix": False},
                "resources": {"queue": self.queue, "gpus": 0, **resources},
            }
        )  # fmt: skip
        with session_scope(self.engine) as session:
            if session.get(SqlProject, "faults") is None:
                session.add(SqlProject(id="faults"))
                session.flush()
            run = SqlExperiment(
                project_id="faults",
                name=name,
                spec=dump_spec(spec),
                spec_hash="0" * 64,
                state=ExperimentState.QUEUED,
                queue=self.queue,
                priority=5,
                arch="resnet18",
                dataset="digits",
            )
            session.add(run)
            session.flush()
            session.add(train_message(run))
            return run.id

    def epochs(self, run_id: str) -> list[tuple[str, int]]:
        with session_scope(self.engine) as session:
            return sorted(
                (stage, epoch)
                for stage, epoch in session.execute(
                    select(SqlEpochMetric.stage, SqlEpochMetric.epoch).where(
                        SqlEpochMetric.experiment_id == run_id
                    )
                )
            )

    def final(self, run_id: str) -> tuple[float, float]:
        with session_scope(self.engine) as session:
            row = session.scalars(
                select(SqlEpochMetric).where(
                    SqlEpochMetric.experiment_id == run_id,
                    SqlEpochMetric.stage == "all",
                    SqlEpochMetric.epoch == 1,
                )
            ).one()
            assert row.valid_loss is not None
            return row.valid_loss, float(row.metrics["error_rate"])

    def logs(self) -> str:
        return "\n".join(
            f"--- {log.name}\n{log.read_text(errors='replace')[-3000:]}"
            for log in sorted(self.tmp.glob("*.log"))
        )

    def finished(self, run_id: str) -> bool:
        return state(self.engine, run_id) in (
            ExperimentState.SUCCEEDED,
            ExperimentState.FAILED,
            ExperimentState.CANCELLED,
        )


def _trainers(pid: int) -> list[int]:
    """Trainer processes (run_job or a stand-in) still alive below a worker."""
    found = []
    for child in descendants(pid):
        try:
            cmdline = Path(f"/proc/{child}/cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        if b"workers.run_job" in cmdline or b"sleepy_trainer" in cmdline:
            found.append(child)
    return found


EXPECTED_EPOCHS = [("all", 0), ("all", 1), ("head", 0), ("head", 1)]


def test_a_killed_worker_resumes_on_another_and_matches_an_uninterrupted_run(
    fleet: Fleet,
) -> None:
    with ExitStack() as stack:
        stack.enter_context(Dispatcher(fleet.engine, fleet.settings))
        first = stack.enter_context(fleet.worker("a"))
        resumed = fleet.submit("killed-mid-run")
        wait_for(lambda: fleet.epochs(resumed), timeout=300, what="the first epoch row")
        kill_tree(first.pid)  # SIGKILL mid-run: no checkpoint of the epoch in flight
        stack.enter_context(fleet.worker("b"))
        wait_for(lambda: fleet.finished(resumed), timeout=400, what="the resumed run to end")
        row = run_row(fleet.engine, resumed)
        assert row.state == ExperimentState.SUCCEEDED, (row.error, fleet.logs())
        assert row.attempt == 2
        assert count_events(fleet.engine, resumed, "requeued") == 1
        assert count_events(fleet.engine, resumed, "resumed") == 1
        assert fleet.epochs(resumed) == EXPECTED_EPOCHS  # none missing, none twice
        # The same spec, never interrupted, on the surviving worker.
        clean = fleet.submit("uninterrupted")
        wait_for(lambda: fleet.finished(clean), timeout=300, what="the uninterrupted run")
        assert state(fleet.engine, clean) == ExperimentState.SUCCEEDED, fleet.logs()
    loss_resumed, error_resumed = fleet.final(resumed)
    loss_clean, error_clean = fleet.final(clean)
    assert abs(loss_resumed - loss_clean) <= 1e-3 * loss_clean, (loss_resumed, loss_clean)
    assert abs(error_resumed - error_clean) <= 1 / 71 + 1e-9, (error_resumed, error_clean)


def test_cancel_stops_a_running_run_within_10_s_and_a_cancelled_queued_run_never_starts(
    fleet: Fleet,
) -> None:
    with session_scope(fleet.engine) as session:
        _, admin = create_token(session, None, admin=True)
    headers = {"Authorization": f"Bearer {admin}"}
    with ExitStack() as stack:
        stack.enter_context(Dispatcher(fleet.engine, fleet.settings))
        worker = stack.enter_context(fleet.worker("c"))
        client = stack.enter_context(TestClient(create_app(fleet.settings)))
        running = fleet.submit("to-cancel", head=1, all=30)
        waiting = fleet.submit("cancelled-while-queued")
        wait_for(lambda: fleet.epochs(running), timeout=300, what="the first epoch row")
        assert state(fleet.engine, waiting) == ExperimentState.DISPATCHED  # behind the first
        answer = client.post(f"/v1/experiments/{waiting}/cancel", headers=headers)
        assert answer.status_code == 200, answer.text
        assert state(fleet.engine, waiting) == ExperimentState.CANCELLED

        asked = time.monotonic()
        answer = client.post(f"/v1/experiments/{running}/cancel", headers=headers)
        assert answer.status_code == 200, answer.text
        wait_for(
            lambda: state(fleet.engine, running) == ExperimentState.CANCELLED,
            timeout=30,
            what="the running run to be cancelled",
            every=0.1,
        )
        took = time.monotonic() - asked
        assert took <= 10, f"cancel took {took:.1f} s"
        wait_for(lambda: not _trainers(worker.pid), timeout=5, what="no trainer process left")
        # The worker now takes the queued run's message, finds it cancelled and skips it.
        time.sleep(3)
        assert count_events(fleet.engine, waiting, "started") == 0
        assert state(fleet.engine, waiting) == ExperimentState.CANCELLED
    store = open_store(fleet.artifacts)
    kept = [info.key for info in store.list(f"runs/{running}/checkpoints")]
    assert kept, "the cancelled run's checkpoints were not kept"
    assert store.exists(f"runs/{running}/report.json")


SLEEPY = "import time\ntime.sleep(120)\n"


def test_resources_timeout_fails_the_run_and_stops_its_trainer(fleet: Fleet) -> None:
    trainer = fleet.tmp / "sleepy_trainer.py"
    trainer.write_text(SLEEPY)
    with ExitStack() as stack:
        stack.enter_context(Dispatcher(fleet.engine, fleet.settings))
        worker = stack.enter_context(
            fleet.worker("t", FITFLEET_WORKER_CHILD_COMMAND=f'["{sys.executable}", "{trainer}"]')
        )
        run_id = fleet.submit("too-slow", timeout="3s")
        wait_for(lambda: fleet.finished(run_id), timeout=60, what="the timeout")
        row = run_row(fleet.engine, run_id)
        assert row.state == ExperimentState.FAILED
        assert row.error == "timed out after 3 s (resources.timeout)"
        assert row.started_at is not None and row.finished_at is not None
        assert (row.finished_at - row.started_at).total_seconds() < 3 + 5 + 5  # + grace, slack
        wait_for(lambda: not _trainers(worker.pid), timeout=5, what="the trainer to be gone")


def test_max_restarts_fails_a_run_that_keeps_losing_its_worker(fleet: Fleet) -> None:
    trainer = fleet.tmp / "sleepy_trainer.py"
    trainer.write_text(SLEEPY)
    command = f'["{sys.executable}", "{trainer}"]'
    with ExitStack() as stack:
        stack.enter_context(Dispatcher(fleet.engine, fleet.settings))
        doomed = stack.enter_context(fleet.worker("m1", FITFLEET_WORKER_CHILD_COMMAND=command))
        run_id = fleet.submit("unlucky", max_restarts=0)
        wait_for(
            lambda: state(fleet.engine, run_id) == ExperimentState.RUNNING,
            timeout=60,
            what="the run to start",
        )
        kill_tree(doomed.pid)
        wait_for(lambda: fleet.finished(run_id), timeout=LEASE_TTL_S + 30, what="the rescue")
    row = run_row(fleet.engine, run_id)
    assert row.state == ExperimentState.FAILED
    assert row.error == "lost its worker 1 times (max_restarts 0)"
    assert row.attempt == 1


def test_a_diverging_run_stops_at_once_with_a_finding_about_the_lr(fleet: Fleet) -> None:
    with ExitStack() as stack:
        stack.enter_context(Dispatcher(fleet.engine, fleet.settings))
        stack.enter_context(fleet.worker("nan"))
        run_id = fleet.submit("lr-far-too-high", head=5, all=5, head_lr=1e9)
        wait_for(lambda: fleet.finished(run_id), timeout=300, what="the run to end")
    row = run_row(fleet.engine, run_id)
    assert row.state == ExperimentState.FAILED
    assert row.error is not None and "learning rate is too high" in row.error, row.error
    assert len(fleet.epochs(run_id)) < 10  # it did not burn the remaining epochs
    import json

    report = json.loads(open_store(fleet.artifacts).get_bytes(f"runs/{run_id}/report.json"))
    diverged = [f for f in report["findings"] if f["code"] == "diverged"]
    assert diverged and "learning rate" in diverged[0]["advice"].lower()
