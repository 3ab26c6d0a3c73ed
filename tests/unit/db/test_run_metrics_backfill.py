"""Revision 0002 fills ``run_metrics`` for runs trained before it, by the same rule as
the epoch upsert: final = last epoch in the spec's stage order, best by the metric's
direction."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import select, text

from shared.db.models import SqlRunMetric
from shared.db.session import make_engine, session_scope
from shared.db.summaries import summarise
from shared.db.upgrade import upgrade


def test_upgrade_backfills_run_metrics_from_epoch_rows(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'old.db'}"
    upgrade(url, "0001")
    engine = make_engine(url)
    spec = '{"stages": [{"name": "head", "epochs": 2}, {"name": "all", "epochs": 1}]}'
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO projects (id, description, created_at) VALUES ('p', '', '2026-01-01')"
            )
        )
        conn.execute(
            text(
                "INSERT INTO experiments (id, project_id, name, spec, spec_hash, state, attempt,"
                " queue, priority, tags, arch, dataset, created_at, updated_at, cancel_requested)"
                " VALUES ('exp_old', 'p', 'old', :spec, '0', 'succeeded', 1, 'gpu', 5, '[]',"
                " 'resnet18', 'digits', '2026-01-01', '2026-01-01', 0)"
            ),
            {"spec": spec},
        )
        # Inserted out of order, and stage "all" sorts before "head" by name: the
        # spec's order must decide which row is final.
        for stage, epoch, valid, error in [
            ("all", 0, 0.30, 0.09),
            ("head", 1, 0.20, 0.04),
            ("head", 0, 0.50, 0.20),
        ]:
            conn.execute(
                text(
                    "INSERT INTO epoch_metrics (experiment_id, stage, epoch, attempt, train_loss,"
                    " valid_loss, metrics, seconds, images_per_second, lr, recorded_at)"
                    " VALUES ('exp_old', :stage, :epoch, 1, 1.0, :valid, :metrics, 1, 1, 0.001,"
                    " '2026-01-01')"
                ),
                {
                    "stage": stage,
                    "epoch": epoch,
                    "valid": valid,
                    "metrics": f'{{"error_rate": {error}, "accuracy": {1 - error}}}',
                },
            )
    upgrade(url)
    with session_scope(engine) as session:
        rows = {r.metric: r for r in session.scalars(select(SqlRunMetric))}
    engine.dispose()
    assert set(rows) == {"valid_loss", "train_loss", "error_rate", "accuracy"}
    error = rows["error_rate"]
    assert (error.final, error.best, error.best_stage, error.best_epoch) == (0.09, 0.04, "head", 1)
    assert rows["accuracy"].best == 0.96
    assert rows["accuracy"].higher_is_better is True
    assert error.epochs == 3


def test_summarise_skips_missing_values_for_best_but_keeps_them_final() -> None:
    out = summarise([("s", 0, {"valid_loss": 0.5}), ("s", 1, {"valid_loss": None})])
    assert (out["valid_loss"].best, out["valid_loss"].final) == (0.5, None)
