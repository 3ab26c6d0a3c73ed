"""The ``live_stack`` fixture holds what it promises: finished runs, live workers, epoch rows."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import select

from shared.db.models import SqlEpochMetric
from shared.db.session import session_scope
from tests.integration.e2e.stack import LiveStack


def test_live_stack_has_finished_runs_live_workers_and_epoch_rows(live_stack: LiveStack) -> None:
    with live_stack.client(live_stack.project_token) as http:
        listed = http.get("/v1/experiments", params={"limit": 100})
        assert listed.status_code == 200, listed.text
        shown = {run["id"] for run in listed.json()["items"]}
        assert {*live_stack.run_ids, live_stack.failed_run_id} <= shown, listed.json()
        for run_id in live_stack.run_ids:
            body = http.get(f"/v1/experiments/{run_id}").json()
            assert (body["state"], body["project"]) == ("succeeded", "vision"), body
        failed = http.get(f"/v1/experiments/{live_stack.failed_run_id}").json()
        assert failed["state"] == "failed", failed
        assert "learning rate is too high" in (failed["error"] or ""), failed
        lr_find = http.get(f"/v1/experiments/{live_stack.run_ids[2]}/lr-find")
        assert lr_find.status_code == 200, lr_find.text
        (curve,) = lr_find.json()["stages"]
        assert curve["stage"] == "stage-2"
        assert curve["method"] == "steep"
        assert curve["suggestion"] is not None, curve  # enough points left after the trim

    with live_stack.client() as http:
        workers = http.get("/v1/admin/workers")
    assert workers.status_code == 200, workers.text
    live = {w["id"] for w in workers.json()["workers"] if w["state"] != "lost"}
    assert set(live_stack.worker_names) <= live, (workers.json(), live_stack.logs())

    with session_scope(live_stack.engine) as session:
        rows = session.execute(
            select(SqlEpochMetric.experiment_id, SqlEpochMetric.stage, SqlEpochMetric.epoch)
        ).all()
    for run_id in live_stack.run_ids:
        assert sorted((stage, epoch) for rid, stage, epoch in rows if rid == run_id) == [
            ("stage-1", 0),
            ("stage-2", 0),
        ]


def test_a_run_submitted_later_through_the_cli_is_trained(
    live_stack: LiveStack, tmp_path: Path
) -> None:
    """The dispatcher and workers stay up for the session, and ``env`` reaches the server."""
    spec_file = live_stack.write_spec(tmp_path / "later.yaml", "e2e-later", lr_find=False)
    answer = live_stack.cli("submit", str(spec_file), "--wait", "--poll", "0.5", timeout=600)
    assert answer.returncode == 0, (answer.stdout, answer.stderr, live_stack.logs())
    assert "state: succeeded" in answer.stdout, answer.stdout
