"""The HTTP API on a SQLite file, end to end through FastAPI's TestClient (no servers)."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml
from fastapi.testclient import TestClient
from sqlalchemy import Engine, func, select

from services.api.app import create_app
from services.api.tokens import create_token
from shared.db.models import (
    ExperimentState,
    SqlApiToken,
    SqlArtifact,
    SqlEpochMetric,
    SqlEvent,
    SqlExperiment,
    SqlOutbox,
)
from shared.db.session import make_engine, session_scope
from shared.db.upgrade import upgrade
from shared.settings import Settings


def make_spec(**overrides: Any) -> dict[str, Any]:
    """A small valid spec; ``overrides`` replace top-level keys."""
    spec: dict[str, Any] = {
        "version": 1,
        "name": "digits-3v7",
        "project": "alpha",
        "tags": ["lesson-1"],
        "data": {"source": "digits", "split": {"by": "folder"}, "size": 28},
        "model": {"arch": "resnet18", "pretrained": "none"},
        "stages": [{"name": "stage-1", "train": "head", "epochs": 1, "max_lr": 1e-2}],
        "resources": {"queue": "cpu", "gpus": 0, "priority": 7},
    }
    spec.update(overrides)
    return spec


class Api:
    """A running app, its database engine and tokens for two projects and an admin."""

    def __init__(self, client: TestClient, engine: Engine, data_root: Path) -> None:
        self.client = client
        self.engine = engine
        self.data_root = data_root
        with session_scope(engine) as session:
            self.alpha_id, self.alpha = create_token(session, "alpha")
            self.beta_id, self.beta = create_token(session, "beta")
            self.admin_id, self.admin = create_token(session, None, admin=True)

    @staticmethod
    def auth(secret: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {secret}"}

    def submit(self, secret: str, spec: dict[str, Any], **headers: str) -> Any:
        return self.client.post(
            "/v1/experiments", json=spec, headers={**self.auth(secret), **headers}
        )

    def count(self, model: Any) -> int:
        with session_scope(self.engine) as session:
            return int(session.scalar(select(func.count()).select_from(model)) or 0)


@pytest.fixture
def api(tmp_path: Path) -> Iterator[Api]:
    url = f"sqlite:///{tmp_path / 'x.db'}"
    upgrade(url)
    data_root = tmp_path / "data"
    settings = Settings(
        database_url=url,
        home=tmp_path,
        data_roots=[data_root],
        artifacts_url=(tmp_path / "artifacts").as_uri(),
        publish_on_submit=False,  # these tests look at the rows the relay would send
    )
    app = create_app(settings)
    engine = make_engine(url)
    try:
        with TestClient(app) as client:
            yield Api(client, engine, data_root)
    finally:
        engine.dispose()


# --- health and auth ---------------------------------------------------------


def test_health_and_ready(api: Api) -> None:
    assert api.client.get("/healthz").json() == {"status": "ok"}
    ready = api.client.get("/readyz")
    assert ready.status_code == 200, ready.text
    assert ready.json()["down"] == []
    assert api.client.get("/docs").status_code == 200
    assert "/v1/experiments" in api.client.get("/openapi.json").json()["paths"]


def test_readyz_names_the_database_when_it_is_down(tmp_path: Path) -> None:
    db = tmp_path / "ok.db"
    app = create_app(Settings(database_url=f"sqlite:///{db}", home=tmp_path))
    with TestClient(app) as client:
        assert client.get("/readyz").status_code == 200
        app.state.context.engine.dispose()
        for path in tmp_path.glob("ok.db*"):
            path.unlink()
        db.mkdir()  # the file is now a folder: SQLite cannot open it
        response = client.get("/readyz")
    assert response.status_code == 503
    body = response.json()
    assert body["down"] == ["database"]
    assert body["checks"]["artifacts"] == "ok"


def test_401_without_token_or_with_wrong_or_revoked_token(api: Api) -> None:
    missing = api.client.get("/v1/experiments")
    assert missing.status_code == 401
    assert missing.headers["WWW-Authenticate"] == "Bearer"
    assert missing.json()["error"] == "unauthorized"
    wrong = api.client.get("/v1/experiments", headers=api.auth("ff_not-a-token"))
    assert wrong.status_code == 401
    assert wrong.headers["WWW-Authenticate"] == "Bearer"
    basic = api.client.get("/v1/experiments", headers={"Authorization": f"Basic {api.alpha}"})
    assert basic.status_code == 401
    with session_scope(api.engine) as session:
        token = session.get(SqlApiToken, api.alpha_id)
        assert token is not None
        token.revoked_at = datetime.now(UTC)
    revoked = api.client.get("/v1/experiments", headers=api.auth(api.alpha))
    assert revoked.status_code == 401
    assert api.client.get("/v1/experiments", headers=api.auth(api.beta)).status_code == 200


def test_token_secret_shape_and_stored_hash(api: Api) -> None:
    assert api.alpha.startswith("ff_")
    with session_scope(api.engine) as session:
        token = session.get(SqlApiToken, api.alpha_id)
        assert token is not None
        assert token.token_hash != api.alpha and len(token.token_hash) == 64
        assert token.project_id == "alpha" and not token.is_admin


# --- submission --------------------------------------------------------------


def test_submit_writes_experiment_outbox_and_event(api: Api) -> None:
    response = api.submit(api.alpha, make_spec())
    assert response.status_code == 201, response.text
    body = response.json()
    assert set(body) == {"id", "state", "name", "project", "created_at"}
    assert body["state"] == "queued" and body["project"] == "alpha"
    with session_scope(api.engine) as session:
        row = session.get(SqlExperiment, body["id"])
        assert row is not None
        assert (row.state, row.attempt, row.queue, row.priority) == (
            ExperimentState.QUEUED,
            0,
            "cpu",
            7,
        )
        assert (row.arch, row.dataset, row.tags) == ("resnet18", "digits", ["lesson-1"])
        assert row.submitted_by == api.alpha_id
        outbox = session.scalars(select(SqlOutbox)).all()
        assert len(outbox) == 1
        assert outbox[0].experiment_id == body["id"]
        assert outbox[0].payload == {"experiment_id": body["id"]}
        assert (outbox[0].task, outbox[0].queue, outbox[0].priority) == (
            "workers.train_run",
            "cpu",
            7,
        )
        events = session.scalars(select(SqlEvent).where(SqlEvent.experiment_id.is_not(None))).all()
        assert [(e.kind, e.actor, e.experiment_id) for e in events] == [
            ("submit", api.alpha_id, body["id"])
        ]


def test_invalid_spec_lists_every_field(api: Api) -> None:
    spec = make_spec(name="")
    spec["model"] = {"arch": "resnet9000"}
    spec["stages"] = [{"name": "s", "train": "head", "epochs": -1, "max_lr": 1e-3}]
    response = api.submit(api.alpha, spec)
    assert response.status_code == 422
    body = response.json()
    assert body["error"] == "invalid_spec"
    paths = {p["path"] for p in body["problems"]}
    assert {"name", "model.arch", "stages.0.epochs"} <= paths, body
    assert all(p["message"] for p in body["problems"])
    assert api.count(SqlExperiment) == 0


def test_yaml_submission(api: Api) -> None:
    response = api.client.post(
        "/v1/experiments",
        content=yaml.safe_dump(make_spec(name="from-yaml")),
        headers={**api.auth(api.alpha), "Content-Type": "application/yaml"},
    )
    assert response.status_code == 201, response.text
    assert response.json()["name"] == "from-yaml"
    bad = api.client.post(
        "/v1/experiments",
        content="name: [unclosed",
        headers={**api.auth(api.alpha), "Content-Type": "text/yaml"},
    )
    assert bad.status_code == 422
    assert bad.json()["problems"][0]["path"] == "body"


def test_unknown_content_type_and_bad_json(api: Api) -> None:
    xml = api.client.post(
        "/v1/experiments",
        content="<spec/>",
        headers={**api.auth(api.alpha), "Content-Type": "application/xml"},
    )
    assert xml.status_code == 415
    broken = api.client.post(
        "/v1/experiments",
        content="{not json",
        headers={**api.auth(api.alpha), "Content-Type": "application/json"},
    )
    assert broken.status_code == 422
    assert broken.json()["problems"][0]["path"] == "body"


def test_body_over_the_limit_is_413(api: Api) -> None:
    spec = make_spec(name="x" * (2 * 1024 * 1024))
    assert api.submit(api.alpha, spec).status_code == 413


def test_streamed_body_over_the_limit_is_413(api: Api) -> None:
    # No Content-Length: the middleware counts the chunks as they arrive.
    def chunks() -> Iterator[bytes]:
        for _ in range(3):
            yield b" " * (512 * 1024)

    response = api.client.post(
        "/v1/experiments",
        content=chunks(),
        headers={**api.auth(api.alpha), "Content-Type": "application/json"},
    )
    assert response.status_code == 413
    assert response.json()["error"] == "payload_too_large"


def test_missing_project_defaults_to_the_tokens(api: Api) -> None:
    spec = make_spec()
    del spec["project"]
    response = api.submit(api.beta, spec)
    assert response.status_code == 201
    assert response.json()["project"] == "beta"


def test_idempotency_key_returns_the_same_run(api: Api) -> None:
    first = api.submit(api.alpha, make_spec(), **{"Idempotency-Key": "k-1"})
    again = api.submit(api.alpha, make_spec(), **{"Idempotency-Key": "k-1"})
    assert first.status_code == 201 and again.status_code == 200
    assert first.json()["id"] == again.json()["id"]
    assert api.count(SqlExperiment) == 1
    assert api.count(SqlOutbox) == 1
    other = api.submit(api.alpha, make_spec(name="changed"), **{"Idempotency-Key": "k-1"})
    assert other.status_code == 409
    # The same key in another project is another run.
    beta = api.submit(api.beta, make_spec(project="beta"), **{"Idempotency-Key": "k-1"})
    assert beta.status_code == 201 and beta.json()["id"] != first.json()["id"]


def test_submit_into_another_project_is_forbidden(api: Api) -> None:
    response = api.submit(api.alpha, make_spec(project="beta"))
    assert response.status_code == 403
    assert "alpha" in response.json()["message"]
    admin = api.submit(api.admin, make_spec(project="gamma"))
    assert admin.status_code == 201  # admins may; the project is created
    assert admin.json()["project"] == "gamma"


@pytest.mark.parametrize(
    ("source", "ok"),
    [
        ("digits", True),
        ("nested/digits", True),
        ("s3://bucket/digits", True),
        ("/etc", False),
        ("file:///etc/passwd", False),
    ],
)
def test_data_source_must_be_inside_the_data_roots(api: Api, source: str, ok: bool) -> None:
    spec = make_spec()
    spec["data"]["source"] = source
    response = api.submit(api.alpha, spec)
    if ok:
        assert response.status_code == 201, response.text
        return
    assert response.status_code == 422
    problems = response.json()["problems"]
    assert [p["path"] for p in problems] == ["data.source"]
    assert "outside the data roots" in problems[0]["message"]


def test_absolute_sources_inside_a_root_are_accepted(api: Api) -> None:
    for source in (str(api.data_root / "digits"), (api.data_root / "digits").as_uri()):
        spec = make_spec()
        spec["data"]["source"] = source
        assert api.submit(api.alpha, spec).status_code == 201
    escaping = make_spec()
    escaping["data"]["source"] = str(api.data_root / ".." / "elsewhere")
    assert api.submit(api.alpha, escaping).status_code == 422


# --- reading -----------------------------------------------------------------


def test_other_projects_runs_are_not_found(api: Api) -> None:
    run_id = api.submit(api.alpha, make_spec()).json()["id"]
    assert (
        api.client.get(f"/v1/experiments/{run_id}", headers=api.auth(api.alpha)).status_code == 200
    )
    for path in ("", "/metrics", "/artifacts"):
        hidden = api.client.get(f"/v1/experiments/{run_id}{path}", headers=api.auth(api.beta))
        assert hidden.status_code == 404, path
        assert hidden.json()["error"] == "not_found"
    cancel = api.client.post(f"/v1/experiments/{run_id}/cancel", headers=api.auth(api.beta))
    assert cancel.status_code == 404
    assert api.client.get("/v1/experiments", headers=api.auth(api.beta)).json()["count"] == 0
    missing = api.client.get("/v1/experiments/exp_nope", headers=api.auth(api.admin))
    assert missing.status_code == 404


def test_admin_sees_every_project(api: Api) -> None:
    api.submit(api.alpha, make_spec())
    api.submit(api.beta, make_spec(project="beta"))
    listing = api.client.get("/v1/experiments", headers=api.auth(api.admin)).json()
    assert listing["count"] == 2
    assert {item["project"] for item in listing["items"]} == {"alpha", "beta"}
    only_beta = api.client.get(
        "/v1/experiments", params={"project": "beta"}, headers=api.auth(api.admin)
    ).json()
    assert [item["project"] for item in only_beta["items"]] == ["beta"]


def test_list_filters_and_pagination(api: Api) -> None:
    for i in range(7):
        spec = make_spec(name=f"Run-{i}", tags=["even"] if i % 2 == 0 else ["odd"])
        if i >= 5:
            spec["model"] = {"arch": "resnet34", "pretrained": "none"}
        assert api.submit(api.alpha, spec).status_code == 201

    def listing(**params: Any) -> dict[str, Any]:
        response = api.client.get("/v1/experiments", params=params, headers=api.auth(api.alpha))
        assert response.status_code == 200, response.text
        result: dict[str, Any] = response.json()
        return result

    page = listing(limit=3)
    assert page["count"] == 7 and len(page["items"]) == 3
    assert [i["name"] for i in page["items"]] == ["Run-6", "Run-5", "Run-4"]
    last = listing(limit=3, offset=6)
    assert last["count"] == 7 and [i["name"] for i in last["items"]] == ["Run-0"]
    assert listing(tag="even")["count"] == 4
    assert listing(tag="odd", arch="resnet34")["count"] == 1
    assert listing(name="run-1")["count"] == 1
    assert listing(dataset="digits")["count"] == 7
    assert listing(state="queued")["count"] == 7
    assert listing(state="running")["count"] == 0
    too_big = api.client.get("/v1/experiments", params={"limit": 201}, headers=api.auth(api.alpha))
    assert too_big.status_code == 422
    assert too_big.json()["problems"][0]["path"] == "query.limit"


def test_cancel_a_queued_run(api: Api) -> None:
    run_id = api.submit(api.alpha, make_spec()).json()["id"]
    response = api.client.post(f"/v1/experiments/{run_id}/cancel", headers=api.auth(api.alpha))
    assert response.status_code == 200, response.text
    assert response.json()["state"] == "cancelled"
    with session_scope(api.engine) as session:
        events = session.scalars(
            select(SqlEvent).where(SqlEvent.experiment_id == run_id).order_by(SqlEvent.id)
        ).all()
        assert [(e.kind, e.actor) for e in events] == [
            ("submit", api.alpha_id),
            ("cancel", api.alpha_id),
        ]
    again = api.client.post(f"/v1/experiments/{run_id}/cancel", headers=api.auth(api.alpha))
    assert again.status_code == 409


def test_cancel_a_running_run_asks_the_worker(api: Api) -> None:
    run_id = api.submit(api.alpha, make_spec()).json()["id"]
    with session_scope(api.engine) as session:
        row = session.get(SqlExperiment, run_id)
        assert row is not None
        row.state = ExperimentState.RUNNING
    response = api.client.post(f"/v1/experiments/{run_id}/cancel", headers=api.auth(api.alpha))
    assert response.status_code == 200
    assert response.json()["state"] == "running"
    assert response.json()["cancel_requested"] is True


def _record_epochs(api: Api, run_id: str) -> None:
    with session_scope(api.engine) as session:
        for epoch in range(2):
            session.add(
                SqlEpochMetric(
                    experiment_id=run_id,
                    stage="stage-1",
                    epoch=epoch,
                    attempt=1,
                    train_loss=0.5 - epoch / 10,
                    valid_loss=0.4 - epoch / 10,
                    metrics={"error_rate": 0.1 / (epoch + 1)},
                    seconds=1.5,
                    images_per_second=100.0,
                    lr=1e-3,
                    batch_size=32,
                )
            )
        row = session.get(SqlExperiment, run_id)
        assert row is not None
        row.current_stage, row.current_epoch = "stage-1", 1


def test_detail_and_metrics_json_and_csv(api: Api) -> None:
    run_id = api.submit(api.alpha, make_spec()).json()["id"]
    _record_epochs(api, run_id)
    detail = api.client.get(f"/v1/experiments/{run_id}", headers=api.auth(api.alpha)).json()
    assert (detail["current_stage"], detail["current_epoch"]) == ("stage-1", 1)
    assert detail["latest_metrics"]["epoch"] == 1
    assert detail["spec"]["name"] == "digits-3v7"
    rows = api.client.get(f"/v1/experiments/{run_id}/metrics", headers=api.auth(api.alpha))
    assert [r["epoch"] for r in rows.json()] == [0, 1]
    as_csv = api.client.get(
        f"/v1/experiments/{run_id}/metrics", params={"format": "csv"}, headers=api.auth(api.alpha)
    )
    assert as_csv.headers["content-type"].startswith("text/csv")
    table = list(csv.DictReader(io.StringIO(as_csv.text)))
    assert [r["epoch"] for r in table] == ["0", "1"]
    assert float(table[1]["error_rate"]) == pytest.approx(0.05)
    by_accept = api.client.get(
        f"/v1/experiments/{run_id}/metrics",
        headers={**api.auth(api.alpha), "Accept": "text/csv"},
    )
    assert by_accept.text == as_csv.text


def test_artifacts_and_spec_schema(api: Api) -> None:
    run_id = api.submit(api.alpha, make_spec()).json()["id"]
    with session_scope(api.engine) as session:
        session.add(
            SqlArtifact(
                experiment_id=run_id,
                kind="report",
                name="report.json",
                uri="file:///x/report.json",
                bytes=10,
                sha256="0" * 64,
            )
        )
    listing = api.client.get(f"/v1/experiments/{run_id}/artifacts", headers=api.auth(api.alpha))
    assert listing.json()["count"] == 1
    assert listing.json()["items"][0]["name"] == "report.json"
    schema = api.client.get("/v1/spec/schema").json()
    assert "stages" in schema["properties"]
