"""The dashboard's queries: runs sorted by any metric, leaderboards on the best value,
datasets, failures grouped by reason, a run's events, ``/v1/me``; and sweeps.

Written against the ``api`` fixture (an app, its engine, two project tokens and an
admin token); tests/integration/api/test_queries_postgres.py runs the same tests
on Postgres.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, func, select

from services.api.app import create_app
from services.api.queries import failure_reason, parse_sort
from services.api.tokens import create_token
from shared.db.metrics import upsert_epoch_metric
from shared.db.models import ExperimentState, SqlEvent, SqlExperiment, SqlRunMetric, SqlSweep
from shared.db.session import make_engine, session_scope
from shared.db.upgrade import upgrade
from shared.errors import InvalidSpec
from shared.settings import Settings
from tests.unit.api.test_compare import row


class Api:
    """A TestClient plus what tests poke at directly."""

    def __init__(self, client: TestClient, engine: Engine, tokens: dict[str, str]) -> None:
        self.client = client
        self.engine = engine
        self.headers = {name: {"Authorization": f"Bearer {t}"} for name, t in tokens.items()}

    def get(self, path: str, who: str = "vision", **params: Any) -> Any:
        answer = self.client.get(path, params=params, headers=self.headers[who])
        assert answer.status_code == 200, answer.text
        return answer.json()

    def submit(self, name: str, who: str = "vision", **changes: Any) -> str:
        body = spec(name, project=who if who != "admin" else "vision", **changes)
        answer = self.client.post("/v1/experiments", json=body, headers=self.headers[who])
        assert answer.status_code == 201, answer.text
        return str(answer.json()["id"])

    def epochs(self, run_id: str, *rows: tuple[str, int, float, float]) -> None:
        with session_scope(self.engine) as session:
            for stage, epoch, valid, error in rows:
                upsert_epoch_metric(session, run_id, row(stage, epoch, valid, error))

    def set_state(self, run_id: str, state: ExperimentState, error: str | None = None) -> None:
        with session_scope(self.engine) as session:
            run = session.get(SqlExperiment, run_id)
            assert run is not None
            run.state = state
            run.error = error


def spec(
    name: str, *, project: str = "vision", source: str = "digits", **data: Any
) -> dict[str, Any]:
    return {
        "version": 1,
        "name": name,
        "project": project,
        "data": {"source": source, "size": 28, **data},
        "model": {"arch": "resnet18", "pretrained": "none"},
        "metrics": ["error_rate", "accuracy"],
        "stages": [
            {"name": "stage-1", "epochs": 2, "max_lr": 1e-3},
            {"name": "stage-2", "train": "all", "epochs": 2, "max_lr": [1e-5, 1e-3]},
        ],
        "resources": {"gpus": 0},
    }


def make_api(url: str, tmp_path: Path) -> Iterator[Api]:
    upgrade(url)
    for name in ("digits", "pets"):
        (tmp_path / "data" / name).mkdir(parents=True, exist_ok=True)
    # No publishing: runs stay queued, and nothing else writes while a test does.
    settings = Settings(
        database_url=url,
        home=tmp_path,
        data_roots=[tmp_path / "data"],
        publish_on_submit=False,
    )
    engine = make_engine(url)
    with session_scope(engine) as session:
        tokens = {
            "vision": create_token(session, "vision")[1],
            "audio": create_token(session, "audio")[1],
            "admin": create_token(session, None, admin=True)[1],
        }
    with TestClient(create_app(settings)) as client:
        yield Api(client, engine, tokens)
    engine.dispose()


@pytest.fixture
def api(tmp_path: Path) -> Iterator[Api]:
    yield from make_api(f"sqlite:///{tmp_path / 'api.db'}", tmp_path)


# --------------------------------------------------------------------------- runs page


def test_runs_sorted_by_best_and_final_metric_with_progress(api: Api) -> None:
    # a: best error 0.05 (epoch 1) but ends at 0.30; b: ends best at 0.10; c: no epochs yet.
    a = api.submit("a")
    b = api.submit("b")
    c = api.submit("c")
    api.epochs(a, ("stage-1", 0, 0.5, 0.2), ("stage-1", 1, 0.2, 0.05), ("stage-2", 0, 0.6, 0.3))
    api.epochs(b, ("stage-1", 0, 0.4, 0.15), ("stage-1", 1, 0.3, 0.1))

    best = api.get("/v1/runs", sort="best:error_rate")
    assert [r["id"] for r in best["items"]] == [a, b, c]  # no metric yet: last
    assert best["sort"] == "best:error_rate"
    final = api.get("/v1/runs", sort="final:error_rate")
    assert [r["id"] for r in final["items"]] == [b, a, c]
    worst_first = api.get("/v1/runs", sort="-best:error_rate")
    assert [r["id"] for r in worst_first["items"]][:2] == [b, a]
    by_accuracy = api.get("/v1/runs", sort="best:accuracy")  # higher is better: a (0.95) first
    assert [r["id"] for r in by_accuracy["items"]][:2] == [a, b]

    rows = {r["id"]: r for r in best["items"]}
    assert rows[a]["metrics"]["error_rate"] == {
        "final": 0.3,
        "best": 0.05,
        "best_stage": "stage-1",
        "best_epoch": 1,
        "higher_is_better": False,
        "epochs": 3,
    }
    assert rows[a]["metrics"]["accuracy"]["higher_is_better"] is True
    assert (rows[a]["epochs_done"], rows[a]["epochs_total"], rows[a]["progress"]) == (3, 4, 0.75)
    assert rows[c]["progress"] is None
    assert rows[c]["metrics"] == {}
    assert api.get("/v1/runs")["items"][0]["id"] == c  # default: newest first


def test_metric_sorts_page_through_runs_with_and_without_a_value(api: Api) -> None:
    runs = [api.submit(f"r{i}") for i in range(5)]
    for i, run in enumerate(runs[:3]):  # errors 0.3, 0.2, 0.1; runs[3:] have none
        api.epochs(run, ("stage-1", 0, 0.5, 0.3 - 0.1 * i))
    for sort, expected in [
        ("best:error_rate", [runs[2], runs[1], runs[0], runs[4], runs[3]]),
        ("-best:error_rate", [runs[0], runs[1], runs[2], runs[4], runs[3]]),
        ("final:accuracy", [runs[2], runs[1], runs[0], runs[4], runs[3]]),
    ]:
        whole = [r["id"] for r in api.get("/v1/runs", sort=sort)["items"]]
        assert whole == expected, sort
        for size in (1, 2, 3):
            paged = [
                r["id"]
                for offset in range(0, 6, size)
                for r in api.get("/v1/runs", sort=sort, limit=size, offset=offset)["items"]
            ]
            assert paged == expected, (sort, size)
    assert api.get("/v1/runs", sort="best:error_rate", offset=9)["items"] == []
    assert api.get("/v1/runs", sort="best:error_rate", offset=4)["count"] == 5


def test_runs_filters_and_visibility(api: Api) -> None:
    mine = api.submit("mine")
    api.submit("theirs", who="audio")
    assert [r["id"] for r in api.get("/v1/runs")["items"]] == [mine]
    assert api.get("/v1/runs", who="admin")["count"] == 2
    assert api.get("/v1/runs", who="admin", project="audio")["items"][0]["name"] == "theirs"
    assert api.get("/v1/runs", name="MIN")["count"] == 1
    assert api.get("/v1/runs", dataset="pets")["count"] == 0
    now = api.get(f"/v1/experiments/{mine}")["state"]  # queued, or dispatched once published
    assert api.get("/v1/runs", state=now)["count"] == 1
    assert api.get("/v1/runs", state="running")["count"] == 0


@pytest.mark.parametrize("sort", ["best", "best:", "size", "best:a b", "final:x;drop"])
def test_a_bad_sort_is_a_422_naming_the_field(api: Api, sort: str) -> None:
    answer = api.client.get("/v1/runs", params={"sort": sort}, headers=api.headers["vision"])
    assert answer.status_code == 422
    assert answer.json()["problems"][0]["path"] == "query.sort"


def test_parse_sort() -> None:
    assert parse_sort("-final:accuracy").text == "-final:accuracy"
    assert parse_sort("name").metric is None
    with pytest.raises(InvalidSpec):
        parse_sort("-")


# --------------------------------------------------------------------------- leaderboard


def test_leaderboard_ranks_by_best_value_not_last(api: Api) -> None:
    late_peak = api.submit("late-peak")
    steady = api.submit("steady")
    other_data = api.submit("pets", source="pets")
    api.epochs(
        late_peak, ("stage-1", 0, 0.9, 0.4), ("stage-1", 1, 0.1, 0.01), ("stage-2", 0, 0.9, 0.5)
    )
    api.epochs(steady, ("stage-1", 0, 0.3, 0.08), ("stage-1", 1, 0.25, 0.06))
    api.epochs(other_data, ("stage-1", 0, 0.05, 0.001))

    board = api.get("/v1/leaderboard", metric="error_rate", dataset="digits")
    assert board["higher_is_better"] is False
    assert board["count"] == 2
    assert [(e["rank"], e["run"]["id"], e["best"]) for e in board["entries"]] == [
        (1, late_peak, 0.01),
        (2, steady, 0.06),
    ]
    assert board["entries"][0]["final"] == 0.5  # ranked on 0.01 although it ended at 0.5
    assert board["entries"][0]["best_stage"] == "stage-1"
    accuracy = api.get("/v1/leaderboard", metric="accuracy", dataset="digits")
    assert accuracy["entries"][0]["run"]["id"] == late_peak
    assert accuracy["entries"][0]["best"] == pytest.approx(0.99)
    assert (
        api.get("/v1/leaderboard", metric="valid_loss", dataset="pets")["entries"][0]["best"]
        == 0.05
    )
    assert (
        api.get("/v1/leaderboard", metric="error_rate", dataset="digits", state="succeeded")[
            "count"
        ]
        == 0
    )
    assert (
        api.get("/v1/leaderboard", who="audio", metric="error_rate", dataset="digits")["count"] == 0
    )


def test_leaderboard_needs_a_dataset_or_a_sweep(api: Api) -> None:
    answer = api.client.get(
        "/v1/leaderboard", params={"metric": "error_rate"}, headers=api.headers["vision"]
    )
    assert answer.status_code == 422
    assert answer.json()["problems"][0]["path"] == "query.dataset"


def test_datasets_list_runs_and_metrics(api: Api) -> None:
    a = api.submit("a")
    api.submit("b", source="pets")
    api.epochs(a, ("stage-1", 0, 0.5, 0.2))
    items = {d["dataset"]: d for d in api.get("/v1/datasets")["items"]}
    assert items["digits"] == {
        "dataset": "digits",
        "runs": 1,
        "metrics": ["valid_loss", "train_loss", "accuracy", "error_rate"],
    }
    assert items["pets"]["metrics"] == []


def test_a_resumed_epoch_rewrites_the_summary(api: Api) -> None:
    run = api.submit("resumed")
    api.epochs(run, ("stage-1", 0, 0.5, 0.2), ("stage-1", 1, 0.1, 0.01))
    api.epochs(run, ("stage-1", 1, 0.4, 0.15))  # the same epoch again, after a resume
    with session_scope(api.engine) as session:
        summary = session.get(SqlRunMetric, (run, "error_rate"))
        assert summary is not None
        assert (summary.best, summary.final, summary.epochs) == (0.15, 0.15, 2)


# --------------------------------------------------------------------------- failures, events


def test_failures_grouped_by_reason(api: Api) -> None:
    oom = [api.submit(f"oom-{i}") for i in range(3)]
    missing = api.submit("missing")
    api.submit("fine")
    for i, run in enumerate(oom):
        api.set_state(
            run,
            ExperimentState.FAILED,
            f"CUDA out of memory: tried to allocate {i + 2}.5 GiB on exp_abc{i}\ntraceback...",
        )
    api.set_state(
        missing, ExperimentState.FAILED, "data/train/7/img_0001.png: cannot identify image file"
    )
    body = api.get("/v1/failures")
    assert body["total"] == 4
    groups = body["groups"]
    assert [g["count"] for g in groups] == [3, 1]
    assert groups[0]["reason"] == "CUDA out of memory: tried to allocate <n> GiB on exp_…"
    assert sorted(groups[0]["experiment_ids"]) == sorted(oom)
    assert groups[0]["example"].startswith("CUDA out of memory")
    assert groups[1]["experiment_ids"] == [missing]
    assert api.get("/v1/failures", who="audio")["total"] == 0


def test_failure_reason_blanks_what_differs() -> None:
    assert failure_reason(None) == "(no error recorded)"
    assert failure_reason("  ") == "(no error recorded)"
    assert (
        failure_reason("s3://bucket/runs/exp_1/x.pt unreachable after 300 s")
        == "<url> unreachable after <n> s"
    )
    assert failure_reason("worker wrk_9 lost at 0xdeadbeef") == "worker wrk_… lost at <hex>"


def test_events_follow_after_an_id(api: Api) -> None:
    run = api.submit("events")
    first = api.get(f"/v1/experiments/{run}/events")
    assert [e["kind"] for e in first["items"]] == ["submit"]
    with session_scope(api.engine) as session:
        session.add(SqlEvent(experiment_id=run, kind="claim", message="claimed", actor="w1"))
    later = api.get(f"/v1/experiments/{run}/events", after=first["last_id"])
    assert [e["kind"] for e in later["items"]] == ["claim"]
    none = api.get(f"/v1/experiments/{run}/events", after=later["last_id"])
    assert none == {"items": [], "last_id": later["last_id"]}
    hidden = api.client.get(f"/v1/experiments/{run}/events", headers=api.headers["audio"])
    assert hidden.status_code == 404


def test_me_says_who_the_token_is(api: Api) -> None:
    assert api.get("/v1/me")["project"] == "vision"
    assert api.get("/v1/me", who="admin") == {
        "token_id": api.get("/v1/me", who="admin")["token_id"],
        "project": None,
        "is_admin": True,
    }
    assert api.client.get("/v1/me").status_code == 401


# --------------------------------------------------------------------------- sweeps


def sweep_body(**changes: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "name": "lr-sweep",
        "spec": spec("base"),
        "strategy": "grid",
        "parameters": {"stages.0.max_lr": [1e-3, 1e-2], "model.arch": ["resnet18", "resnet34"]},
    }
    body.update(changes)
    return body


def test_a_grid_sweep_makes_every_combination_and_compares_per_sweep(api: Api) -> None:
    answer = api.client.post("/v1/sweeps", json=sweep_body(), headers=api.headers["vision"])
    assert answer.status_code == 201, answer.text
    sweep = answer.json()
    assert sweep["count"] == 4
    assert sum(sweep["states"].values()) == 4
    values = [t["values"] for t in sweep["trials"]]
    assert {(v["stages.0.max_lr"], v["model.arch"]) for v in values} == {
        (1e-3, "resnet18"),
        (1e-3, "resnet34"),
        (1e-2, "resnet18"),
        (1e-2, "resnet34"),
    }
    ids = [t["experiment_id"] for t in sweep["trials"]]
    for trial in sweep["trials"]:
        run = api.get(f"/v1/experiments/{trial['experiment_id']}")
        assert run["spec"]["stages"][0]["max_lr"] == trial["values"]["stages.0.max_lr"]
        assert run["arch"] == trial["values"]["model.arch"]
        assert f"sweep:{sweep['id']}" in run["tags"]
        assert run["name"].startswith("lr-sweep-")
    page = api.get("/v1/runs", sweep=sweep["id"])
    assert page["count"] == 4
    assert {r["sweep_id"] for r in page["items"]} == {sweep["id"]}

    api.epochs(ids[0], ("stage-1", 0, 0.4, 0.2))
    api.epochs(ids[3], ("stage-1", 0, 0.2, 0.1))
    board = api.get("/v1/leaderboard", metric="valid_loss", sweep=sweep["id"])
    assert [e["run"]["id"] for e in board["entries"]] == [ids[3], ids[0]]
    comparison = api.get("/v1/compare", sweep=sweep["id"])
    assert comparison["ids"][:2] == [ids[3], ids[0]]
    assert set(comparison["spec_differences"]) == {"stages.0.max_lr", "model.arch"}
    assert api.get(f"/v1/sweeps/{sweep['id']}")["trials"] == sweep["trials"]
    assert api.get("/v1/sweeps")["count"] == 1
    assert api.get("/v1/sweeps", who="audio")["count"] == 0


def test_a_random_sweep_draws_count_trials_reproducibly(api: Api) -> None:
    body = sweep_body(
        strategy="random",
        count=5,
        seed=7,
        parameters={
            "stages.*.epochs": {"low": 1, "high": 4, "integer": True},
            "stages.1.max_lr": {"low": 1e-5, "high": 1e-2, "log": True},
            "data.batch_size": [16, 32, 64],
        },
    )
    first = api.client.post("/v1/sweeps", json=body, headers=api.headers["vision"]).json()
    second = api.client.post("/v1/sweeps", json=body, headers=api.headers["vision"]).json()
    assert first["count"] == 5
    assert [t["values"] for t in first["trials"]] == [t["values"] for t in second["trials"]]
    for trial in first["trials"]:
        values = trial["values"]
        assert 1 <= values["stages.*.epochs"] <= 4
        assert 1e-5 <= values["stages.1.max_lr"] <= 1e-2
        run = api.get(f"/v1/experiments/{trial['experiment_id']}")
        assert [s["epochs"] for s in run["spec"]["stages"]] == [values["stages.*.epochs"]] * 2


@pytest.mark.parametrize(
    ("changes", "path"),
    [
        ({"parameters": {"model.nope.x": [1]}}, "parameters.model.nope.x"),
        ({"parameters": {"stages.5.max_lr": [1e-3]}}, "parameters.stages.5.max_lr"),
        ({"parameters": {"data.size": []}}, "parameters.data.size"),
        ({"parameters": {"data.batch_size": [32, -1]}}, "trials[1].data.batch_size"),
        ({"parameters": {}}, "parameters"),
        ({"strategy": "random"}, "count"),
        ({"parameters": {"data.size": {"low": 1, "high": 2}}}, "parameters.data.size"),
        ({"parameters": {"data.size": list(range(20, 40)), "seed": list(range(20))}}, "parameters"),
    ],
)
def test_a_bad_sweep_creates_nothing_and_names_the_field(
    api: Api, changes: dict[str, Any], path: str
) -> None:
    answer = api.client.post(
        "/v1/sweeps", json=sweep_body(**changes), headers=api.headers["vision"]
    )
    assert answer.status_code == 422, answer.text
    assert answer.json()["problems"][0]["path"] == path
    with session_scope(api.engine) as session:
        assert session.scalar(select(func.count()).select_from(SqlExperiment)) == 0
        assert session.scalar(select(func.count()).select_from(SqlSweep)) == 0


def test_a_sweep_into_another_project_is_refused(api: Api) -> None:
    body = sweep_body(spec=spec("base", project="audio"))
    answer = api.client.post("/v1/sweeps", json=body, headers=api.headers["vision"])
    assert answer.status_code == 403
