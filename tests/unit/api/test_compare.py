"""``/v1/compare`` and ``/lr-find``: only what differs, best not last, curves in order."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from services.api.app import create_app
from services.api.compare import best_values, flatten, spec_differences
from services.api.tokens import create_token
from shared.db.metrics import replace_lr_find_points, upsert_epoch_metric
from shared.db.models import SqlStage
from shared.db.session import make_engine, session_scope
from shared.db.upgrade import upgrade
from shared.results import EpochRow, LrFindResult
from shared.settings import Settings


def spec(name: str, **data: Any) -> dict[str, Any]:
    return {
        "version": 1,
        "name": name,
        "project": "vision",
        "data": {"source": "digits", "size": 28, **data},
        "model": {"arch": "resnet18", "pretrained": "none"},
        "stages": [{"name": "stage-1", "epochs": 2, "max_lr": 1e-3}],
        "resources": {"gpus": 0},
    }


def row(stage: str, epoch: int, valid: float, error: float) -> EpochRow:
    return EpochRow(
        stage=stage,
        epoch=epoch,
        train_loss=valid + 0.1,
        valid_loss=valid,
        metrics={"error_rate": error, "accuracy": 1 - error},
        seconds=1.0,
        images_per_second=100.0,
        lr=1e-3,
    )


@pytest.fixture
def api(tmp_path: Path) -> Any:
    url = f"sqlite:///{tmp_path / 'api.db'}"
    upgrade(url)
    (tmp_path / "data" / "digits").mkdir(parents=True)
    settings = Settings(database_url=url, home=tmp_path, data_roots=[tmp_path / "data"])
    engine = make_engine(url)
    with session_scope(engine) as session:
        _, secret = create_token(session, "vision")
        _, other = create_token(session, "audio")
    with TestClient(create_app(settings)) as client:
        yield (
            client,
            engine,
            {"Authorization": f"Bearer {secret}"},
            {"Authorization": f"Bearer {other}"},
        )
    engine.dispose()


def test_flatten_and_differences() -> None:
    assert flatten({"a": {"b": 1, "c": [1, 2]}, "s": [{"x": 1}]}) == {
        "a.b": 1,
        "a.c": [1, 2],
        "s.0.x": 1,
    }
    diff = spec_differences([spec("a"), spec("b", batch_size=32), spec("c", batch_size=16)])
    assert diff == {"data.batch_size": ["<absent>", 32, 16]}


def test_best_is_not_last() -> None:
    rows = [
        row("s", 0, 0.5, 0.2).model_dump(),
        row("s", 1, 0.3, 0.05).model_dump(),
        row("s", 2, 0.4, 0.1).model_dump(),
    ]
    best = best_values(rows)
    assert best["valid_loss"] == 0.3
    assert best["error_rate"] == 0.05
    assert best["accuracy"] == 0.95


def test_compare_two_runs_that_differ_in_one_field(api: Any) -> None:
    client, engine, headers, other = api
    first = client.post("/v1/experiments", json=spec("lr-small"), headers=headers).json()["id"]
    second_spec = spec("lr-big")
    second_spec["stages"][0]["max_lr"] = 1e-2
    second = client.post("/v1/experiments", json=second_spec, headers=headers).json()["id"]
    with session_scope(engine) as session:
        for epoch, (valid, error) in enumerate([(0.4, 0.1), (0.2, 0.02)]):
            upsert_epoch_metric(session, first, row("stage-1", epoch, valid, error))
        upsert_epoch_metric(session, second, row("stage-1", 0, 0.9, 0.3))

    answer = client.get(f"/v1/compare?ids={first},{second}", headers=headers)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["ids"] == [first, second]
    assert body["spec_differences"] == {"stages.0.max_lr": [1e-3, 1e-2]}
    runs = {r["experiment"]["id"]: r for r in body["runs"]}
    assert [e["epoch"] for e in runs[first]["epochs"]] == [0, 1]
    assert runs[first]["final"]["valid_loss"] == 0.2
    assert runs[first]["best"]["error_rate"] == 0.02
    assert runs[second]["best"]["valid_loss"] == 0.9

    assert client.get(f"/v1/compare?ids={first}", headers=headers).status_code == 422
    assert client.get(f"/v1/compare?ids={first},{second}", headers=other).status_code == 404


def test_lr_find_curve(api: Any) -> None:
    client, engine, headers, _ = api
    run = client.post("/v1/experiments", json=spec("finder"), headers=headers).json()["id"]
    with session_scope(engine) as session:
        session.add(
            SqlStage(
                experiment_id=run,
                name="stage-1",
                position=0,
                train="all",
                epochs=2,
                schedule="one_cycle",
                lr_suggestion=1e-3,
                lr_suggest_method="steep",
            )
        )
        replace_lr_find_points(
            session,
            run,
            LrFindResult(
                stage="stage-1",
                lrs=[1e-5, 1e-4, 1e-3],
                losses=[0.9, 0.7, 0.8],
                suggestion=1e-3,
                suggest_method="steep",
                min_loss_lr_div10=1e-5,
                stopped_early=False,
            ),
        )
    body = client.get(f"/v1/experiments/{run}/lr-find", headers=headers).json()
    assert body["stages"][0]["stage"] == "stage-1"
    assert [p[0] for p in body["stages"][0]["points"]] == [1e-5, 1e-4, 1e-3]
    assert body["stages"][0]["suggestion"] == 1e-3


def test_artifact_download_and_interpretation(api: Any, tmp_path: Path) -> None:
    import json

    from shared.db.models import SqlArtifact
    from shared.storage.layout import run_key
    from shared.storage.registry import open_store

    client, engine, headers, other = api
    run = client.post("/v1/experiments", json=spec("files"), headers=headers).json()["id"]
    store = open_store((tmp_path / "artifacts").absolute().as_uri())
    report = {
        "status": "succeeded",
        "classes": ["3", "7"],
        "interpretation": {"confusion_matrix": [[5, 0], [1, 4]]},
        "findings": [],
    }
    stored = store.put_bytes(run_key(run, "report.json"), json.dumps(report).encode())
    png = store.put_bytes(run_key(run, "plots/losses.png"), b"\x89PNG\r\n\x1a\nfake")
    with session_scope(engine) as session:
        for name, obj, kind in (
            ("report.json", stored, "report"),
            ("plots/losses.png", png, "plot"),
        ):
            session.add(
                SqlArtifact(
                    experiment_id=run,
                    kind=kind,
                    name=name,
                    uri=obj.uri,
                    bytes=obj.bytes,
                    sha256=obj.sha256,
                )
            )

    got = client.get(f"/v1/experiments/{run}/artifacts/plots/losses.png", headers=headers)
    assert got.status_code == 200
    assert got.content == b"\x89PNG\r\n\x1a\nfake"
    assert got.headers["content-type"] == "image/png"
    assert (
        client.get(f"/v1/experiments/{run}/artifacts/plots/nope.png", headers=headers).status_code
        == 404
    )
    assert (
        client.get(f"/v1/experiments/{run}/artifacts/plots/losses.png", headers=other).status_code
        == 404
    )
    body = client.get(f"/v1/experiments/{run}/interpretation", headers=headers).json()
    assert body["interpretation"]["confusion_matrix"] == [[5, 0], [1, 4]]
    assert body["classes"] == ["3", "7"]


def test_readyz_names_a_broker_that_is_down(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'r.db'}"
    upgrade(url)
    settings = Settings(
        database_url=url, home=tmp_path, broker_url="redis://127.0.0.1:1/0", data_roots=[tmp_path]
    )
    with TestClient(create_app(settings)) as client:
        answer = client.get("/readyz")
    assert answer.status_code == 503
    assert answer.json()["down"] == ["broker"]
    assert answer.json()["checks"]["database"] == "ok"


def test_a_new_run_is_published_at_once(tmp_path: Path) -> None:
    from shared.db.models import ExperimentState, SqlExperiment, SqlOutbox

    url = f"sqlite:///{tmp_path / 'p.db'}"
    upgrade(url)
    (tmp_path / "data" / "digits").mkdir(parents=True)
    settings = Settings(database_url=url, home=tmp_path, data_roots=[tmp_path / "data"])
    engine = make_engine(url)
    with session_scope(engine) as session:
        _, secret = create_token(session, "vision")
    with TestClient(create_app(settings)) as client:
        run = client.post(
            "/v1/experiments", json=spec("now"), headers={"Authorization": f"Bearer {secret}"}
        ).json()["id"]
    with session_scope(engine) as session:
        assert session.get(SqlExperiment, run).state == ExperimentState.DISPATCHED
        outbox = session.query(SqlOutbox).filter_by(experiment_id=run).one()
        assert outbox.sent_at is not None
    # The message is in the embedded broker's folder, for a worker to take.
    assert list((settings.broker_folder / "queue").iterdir())
    engine.dispose()
