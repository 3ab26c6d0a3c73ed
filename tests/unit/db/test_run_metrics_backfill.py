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


def test_the_lr_finder_and_the_report_fill_the_stage_rows(tmp_path: Path) -> None:
    from shared.db.metrics import record_stage_reports, replace_lr_find_points, upsert_stage
    from shared.db.models import SqlExperiment, SqlProject, SqlStage
    from shared.results import LrFindResult, StageReport

    url = f"sqlite:///{tmp_path / 'stages.db'}"
    upgrade(url)
    engine = make_engine(url)
    spec = {
        "stages": [
            {"name": "head", "train": "head", "epochs": 2, "schedule": "one_cycle"},
            {"name": "all", "train": "all", "epochs": 3, "schedule": "constant"},
        ]
    }
    with session_scope(engine) as session:
        session.add(SqlProject(id="p"))
        session.flush()
        session.add(
            SqlExperiment(
                id="exp_s",
                project_id="p",
                name="s",
                spec=spec,
                spec_hash="0",
                queue="gpu",
                priority=5,
                arch="resnet18",
                dataset="digits",
            )
        )
        session.flush()
        # The finder runs before its stage starts: its write creates the row.
        replace_lr_find_points(
            session,
            "exp_s",
            LrFindResult(
                stage="all",
                lrs=[1e-5, 1e-3],
                losses=[1.0, 0.5],
                suggestion=1e-3,
                suggest_method="steep",
                min_loss_lr_div10=1e-4,
                stopped_early=False,
            ),
        )
        upsert_stage(session, "exp_s", "all", started_at=None)
        record_stage_reports(
            session,
            "exp_s",
            [
                StageReport(
                    name="all",
                    train="all",
                    epochs=3,
                    schedule="constant",
                    lrs=[1e-4, 1e-3],
                    kept="best",
                    kept_epoch=1,
                    seconds=2.5,
                )
            ],
        )
    with session_scope(engine) as session:
        row = session.get(SqlStage, ("exp_s", "all"))
        assert row is not None
        assert (row.position, row.train, row.epochs, row.schedule) == (1, "all", 3, "constant")
        assert (row.lr_suggestion, row.lr_suggest_method) == (1e-3, "steep")
        assert (row.kept, row.kept_epoch, row.lrs, row.seconds) == ("best", 1, [1e-4, 1e-3], 2.5)
    engine.dispose()
