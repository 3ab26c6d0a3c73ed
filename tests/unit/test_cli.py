"""The ``fitfleet`` command: exit codes, messages, and what it leaves on disk."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from cli.main import main
from shared.results import Report

REPO = Path(__file__).resolve().parents[2]


def write_spec(path: Path, **data: object) -> Path:
    spec = {
        "version": 1,
        "name": "cli-test",
        "data": {"source": "digits", "size": 16, "batch_size": 32, **data},
        "model": {"arch": "resnet18", "pretrained": "none"},
        "stages": [{"name": "stage-1", "train": "all", "epochs": 1}],
        "interpret": {"show_batch": None},
        "resources": {"gpus": 0},
    }
    path.write_text(yaml.safe_dump(spec))
    return path


def test_spec_check_ok_and_bad(tmp_path: Path) -> None:
    good = write_spec(tmp_path / "good.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 1\nname: x\ndata: {source: p, batch_size: -1}\nstages: [{name: a}]\n")
    result = CliRunner().invoke(main, ["spec", "check", str(good)])
    assert result.exit_code == 0 and "ok" in result.output
    result = CliRunner().invoke(main, ["spec", "check", str(good), str(bad)])
    assert result.exit_code == 2
    assert "data.batch_size" in result.output and "stages.0.epochs" in result.output


def test_spec_schema_is_json() -> None:
    result = CliRunner().invoke(main, ["spec", "schema"])
    assert result.exit_code == 0
    assert json.loads(result.output)["title"] == "ExperimentSpec"


def test_real_entry_point_reports_problems(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(
        json.dumps({"version": 1, "name": "x", "data": {"source": "p"}, "stages": [], "oops": 1})
    )
    done = subprocess.run(
        [sys.executable, "-m", "cli", "spec", "check", str(bad)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 2
    assert "oops: Extra inputs are not permitted" in done.stderr
    assert "stages:" in done.stderr


def test_data_digits(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        main, ["data", "digits", str(tmp_path / "d"), "--classes", "0,1", "--size", "12"]
    )
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "d" / "train").iterdir()) == ["0", "1"]
    result = CliRunner().invoke(main, ["data", "digits", str(tmp_path / "e"), "--classes", "3,12"])
    assert result.exit_code == 2


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"source": "nowhere"}, "does not exist"),
        ({"source": "/etc"}, "outside the allowed data roots"),
        (
            {"labels": {"from": "regex", "pattern": r"/(\d)x/"}, "split": {"valid_pct": 0.2}},
            "matches none of the",
        ),
        ({"source": "empty"}, "no image files found"),
    ],
)
def test_bad_data_exits_2_and_writes_only_the_report(
    tmp_path: Path, fitfleet_home: Path, digits_root: Path, data: dict[str, object], message: str
) -> None:
    (digits_root / "empty").mkdir(exist_ok=True)
    spec = write_spec(tmp_path / "spec.yaml", **data)
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["train", str(spec), "--out", str(out)])
    assert result.exit_code == 2, result.output
    assert message in result.output.replace("\n", " ")
    assert sorted(p.name for p in out.iterdir()) == ["report.json"]
    report = Report.model_validate_json((out / "report.json").read_text())
    assert report.status == "failed" and message in (report.error or "")


def test_missing_weights_name_the_file(tmp_path: Path, fitfleet_home: Path) -> None:
    spec = yaml.safe_load(write_spec(tmp_path / "s.yaml").read_text())
    spec["model"] = {"arch": "resnet50", "pretrained": "imagenet"}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(spec))
    result = CliRunner().invoke(
        main, ["train", str(tmp_path / "s.yaml"), "--out", str(tmp_path / "o")]
    )
    assert result.exit_code == 2
    flat = result.output.replace("\n", "")
    assert "resnet50-0676ba61.pth" in flat and str(fitfleet_home / "weights") in flat


def test_resume_needs_a_run_folder(tmp_path: Path, fitfleet_home: Path) -> None:
    result = CliRunner().invoke(main, ["train", str(write_spec(tmp_path / "s.yaml")), "--resume"])
    assert result.exit_code == 2 and "--resume needs --out" in result.output


def test_db_upgrade_current_downgrade(
    tmp_path: Path, fitfleet_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from shared.settings import get_settings

    monkeypatch.setenv("FITFLEET_DATABASE_URL", f"sqlite:///{tmp_path / 'ff.db'}")
    get_settings.cache_clear()
    runner = CliRunner()
    assert runner.invoke(main, ["db", "current"]).output.strip() == "base (empty)"
    result = runner.invoke(main, ["db", "upgrade"])
    assert result.exit_code == 0, result.output
    assert "0002" in runner.invoke(main, ["db", "current"]).output
    result = runner.invoke(main, ["db", "downgrade", "base"])
    assert result.exit_code == 0, result.output
    assert runner.invoke(main, ["db", "current"]).output.strip() == "base (empty)"


def test_token_create_then_use_then_revoke(
    tmp_path: Path, fitfleet_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fastapi.testclient import TestClient

    from services.api.app import create_app
    from shared.db.upgrade import upgrade
    from shared.settings import get_settings

    url = f"sqlite:///{tmp_path / 'ff.db'}"
    monkeypatch.setenv("FITFLEET_DATABASE_URL", url)
    # Revocation is immediate without the API's token cache (its delay is
    # tested in tests/unit/api/test_fast_path.py).
    monkeypatch.setenv("FITFLEET_AUTH_CACHE_S", "0")
    get_settings.cache_clear()
    upgrade(url)
    runner = CliRunner()
    assert runner.invoke(main, ["token", "create"]).exit_code == 2
    created = runner.invoke(main, ["token", "create", "--project", "vision"])
    assert created.exit_code == 0, created.output
    token_id = created.output.split()[1]
    secret = created.output.strip().splitlines()[-1]
    assert secret.startswith("ff_")
    with TestClient(create_app(get_settings())) as client:
        headers = {"Authorization": f"Bearer {secret}"}
        assert client.get("/v1/experiments", headers=headers).status_code == 200
        assert runner.invoke(main, ["token", "revoke", token_id]).exit_code == 0
        assert client.get("/v1/experiments", headers=headers).status_code == 401
    assert runner.invoke(main, ["token", "revoke", "tok_nope"]).exit_code == 2
    # Every token change leaves an audit event naming who made it.
    from sqlalchemy import select

    from shared.db.models import SqlEvent
    from shared.db.session import make_engine, session_scope

    engine = make_engine(url)
    with session_scope(engine) as session:
        audit = [
            (e.kind, e.data.get("token"), (e.actor or "").startswith("cli:"))
            for e in session.scalars(select(SqlEvent).order_by(SqlEvent.id))
        ]
    engine.dispose()
    assert audit == [("token.created", token_id, True), ("token.revoked", token_id, True)]
