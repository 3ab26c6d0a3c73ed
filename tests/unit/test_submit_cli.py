"""``fitfleet submit`` against the real API app: ids, field errors, bad tokens, a dead server."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner
from fastapi.testclient import TestClient

from cli import main as cli_main
from cli.client import Client
from services.api.app import create_app
from services.api.tokens import create_token
from shared.db.metrics import upsert_epoch_metric
from shared.db.models import ExperimentState, SqlExperiment
from shared.db.session import make_engine, session_scope
from shared.db.upgrade import upgrade
from shared.results import EpochRow
from shared.settings import Settings

SPEC = {
    "version": 1,
    "name": "from-cli",
    "project": "vision",
    "data": {"source": "digits", "size": 16},
    "model": {"arch": "resnet18", "pretrained": "none"},
    "stages": [{"name": "stage-1", "epochs": 1}],
    "resources": {"gpus": 0},
}


@pytest.fixture
def server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    url = f"sqlite:///{tmp_path / 'api.db'}"
    upgrade(url)
    (tmp_path / "data" / "digits").mkdir(parents=True)
    engine = make_engine(url)
    with session_scope(engine) as session:
        _, secret = create_token(session, "vision")
    app = create_app(Settings(database_url=url, home=tmp_path, data_roots=[tmp_path / "data"]))
    with TestClient(app) as http:
        monkeypatch.setattr(
            cli_main, "_client", lambda server, token: Client(server, token, http=http)
        )
        yield engine, secret, http
    engine.dispose()


def test_submit_prints_the_id(server: Any, tmp_path: Path) -> None:
    engine, secret, _ = server
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(SPEC))
    result = CliRunner().invoke(cli_main.main, ["submit", str(spec_file), "--token", secret])
    assert result.exit_code == 0, result.output
    run_id, state = result.output.split()
    assert state == "queued"
    with session_scope(engine) as session:
        assert session.get(SqlExperiment, run_id) is not None


def test_wrong_token_and_server_side_refusal(server: Any, tmp_path: Path) -> None:
    _, secret, _ = server
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(SPEC))
    result = CliRunner().invoke(cli_main.main, ["submit", str(spec_file), "--token", "ff_wrong"])
    assert result.exit_code == 1
    assert "token refused" in result.output
    outside = dict(SPEC, data={"source": "/etc", "size": 16})
    spec_file.write_text(yaml.safe_dump(outside))
    result = CliRunner().invoke(cli_main.main, ["submit", str(spec_file), "--token", secret])
    assert result.exit_code == 2
    assert "data.source" in result.output


def test_server_down_is_said_plainly(tmp_path: Path) -> None:
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(SPEC))
    result = CliRunner().invoke(
        cli_main.main, ["submit", str(spec_file), "--server", "http://127.0.0.1:9", "--token", "x"]
    )
    assert result.exit_code == 1
    assert "cannot reach the fitfleet server" in result.output


def test_follow_prints_epoch_rows_until_the_end(
    server: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    engine, secret, http = server
    api = Client("http://testserver", secret, http=http)
    run_id = api.submit(yaml.safe_dump(SPEC), yaml=True)["id"]
    with session_scope(engine) as session:
        upsert_epoch_metric(
            session,
            run_id,
            EpochRow(
                stage="stage-1",
                epoch=0,
                train_loss=0.5,
                valid_loss=0.4,
                metrics={"error_rate": 0.1},
                seconds=1.0,
                images_per_second=10.0,
                lr=1e-3,
            ),
        )
        session.get(SqlExperiment, run_id).state = ExperimentState.SUCCEEDED
    assert cli_main._follow(api, run_id, 0.0) == 0
    out = capsys.readouterr().out
    assert "state: succeeded" in out
    assert "stage-1 epoch 0: train_loss 0.5 valid_loss 0.4  error_rate 0.100000" in out
