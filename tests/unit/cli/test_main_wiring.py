"""The remote commands are on ``fitfleet``; old commands and options still work; live watch."""

from __future__ import annotations

import io
import json
from pathlib import Path

import click
import pytest
import yaml
from click.testing import CliRunner
from rich.console import Console

from cli import main as cli_main
from cli import remote
from tests.unit.cli.fake_api import FakeApi

SPEC = {
    "version": 1,
    "name": "new",
    "project": "vision",
    "data": {"source": "digits", "size": 16},
    "model": {"arch": "resnet18", "pretrained": "none"},
    "stages": [{"name": "stage-1", "epochs": 1}],
}


def test_every_command_is_registered() -> None:
    commands = set(cli_main.main.list_commands(None))  # type: ignore[arg-type]
    expected = {"ls", "show", "watch", "logs", "cancel", "compare", "artifacts", "leaderboard"}
    assert expected | {"submit", "train", "token", "worker", "dispatch", "api", "up"} <= commands
    token = cli_main.main.get_command(None, "token")  # type: ignore[arg-type]
    assert isinstance(token, click.Group)
    assert {"create", "revoke", "whoami", "save"} <= set(token.commands)
    worker = cli_main.main.get_command(None, "worker")  # type: ignore[arg-type]
    assert worker is not None and worker.name == "worker"


def test_submit_json_prints_the_created_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = FakeApi()
    seen: list[tuple[str | None, str | None]] = []

    def client(server: str | None, token: str | None) -> object:
        seen.append((server, token))
        return fake.client()

    monkeypatch.setattr(cli_main, "_client", client)
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(SPEC))
    result = CliRunner().invoke(cli_main.main, ["submit", str(spec_file), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["id"] == "exp_new"
    assert seen == [(None, None)]  # resolved later from env / config file
    result = CliRunner().invoke(cli_main.main, ["submit", str(spec_file)])
    assert result.stdout.strip() == "exp_new queued"


def test_submit_resolves_the_config_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "config.toml"
    config.write_text('server = "http://from-file:1"\ntoken = "ff_file"\n')
    monkeypatch.setenv("FITFLEET_CONFIG", str(config))
    monkeypatch.delenv("FITFLEET_SERVER_URL", raising=False)
    monkeypatch.delenv("FITFLEET_TOKEN", raising=False)
    api = cli_main._client(None, None)
    assert api.base_url == "http://from-file:1"
    assert api.http.headers["authorization"] == "Bearer ff_file"
    api.close()
    config.write_text("token = [\n")
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(SPEC))
    result = CliRunner().invoke(cli_main.main, ["submit", str(spec_file)])
    assert result.exit_code == 2
    assert f"config file {config}: not valid TOML" in result.stderr


def test_watch_with_a_terminal_draws_bars(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    fake = FakeApi()
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setattr(remote, "make_client", lambda resolved: fake.client())
    buffer = io.StringIO()
    terminal = Console(file=buffer, force_terminal=True, width=120)
    monkeypatch.setattr(remote, "out_console", lambda: terminal)
    result = CliRunner().invoke(
        cli_main.main, ["watch", "exp_a", "exp_b", "--token", "ff_good", "--poll", "0"]
    )
    assert result.exit_code == remote.EXIT_FAILED  # exp_b failed
    drawn = buffer.getvalue()
    assert "4/4" in drawn and "1/4" in drawn
    assert "diverged: loss is nan" in drawn
