"""Rows tests need often: a run as the API leaves it (experiment + outbox message)."""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from shared.db.models import ExperimentState, SqlExperiment, SqlProject
from shared.runs import train_message


def add_queued_run(
    session: Session,
    *,
    spec: dict[str, Any] | None = None,
    queue: str = "gpu",
    priority: int = 5,
    state: ExperimentState = ExperimentState.QUEUED,
    cancel_requested: bool = False,
    project: str = "pets",
) -> str:
    """Add a run of ``project`` (created if missing) and its outbox row; return the run's id."""
    if session.get(SqlProject, project) is None:
        session.add(SqlProject(id=project))
        session.flush()
    run = SqlExperiment(
        project_id=project,
        name="pets",
        spec=spec if spec is not None else {},
        spec_hash="0" * 64,
        state=state,
        queue=queue,
        priority=priority,
        arch="resnet34",
        dataset="s3://bucket/pets",
        cancel_requested=cancel_requested,
    )
    session.add(run)
    session.flush()
    session.add(train_message(run))
    return run.id
