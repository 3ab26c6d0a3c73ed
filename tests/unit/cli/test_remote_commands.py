"""The remote commands' output, JSON mode, exit codes and error sentences (fake API)."""

from __future__ import annotations

import json
import socket
import stat
import tomllib
from pathlib import Path

import click
import httpx
import pytest
from click.testing import CliRunner

from cli import remote
from cli.config import Resolved
from tests.unit.cli.fake_api import FILE_BYTES, FakeApi


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> FakeApi:
    api = FakeApi()
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    for name in ("FITFLEET_SERVER_URL", "FITFLEET_TOKEN", "FITFLEET_CONFIG", "FITFLEET_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(remote, "make_client", lambda resolved: _client_for(api, resolved))
    monkeypatch.setattr("cli.remote.time.sleep", lambda _s: None)
    return api


def _client_for(api: FakeApi, resolved: Resolved) -> object:
    api.token = resolved.token or ""
    client = api.client()
    if resolved.token:
        client.http.headers["Authorization"] = f"Bearer {resolved.token}"
    else:
        client.http.headers.pop("Authorization", None)
    return client


def cli() -> click.Group:
    group = click.Group("fitfleet", commands=remote.COMMANDS)
    group.add_command(click.Group("token", commands=remote.TOKEN_COMMANDS))
    return group


def run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli(), list(args), catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


GOOD = ("--token", "ff_good")


def test_ls_table_and_json(fake: FakeApi) -> None:
    code, out, err = run("ls", *GOOD, "--sort", "best:error_rate")
    assert code == 0, err
    assert "exp_a" in out and "exp_r" in out
    assert "error_rate final / best" in out
    assert "0.0200 / 0.0100" in out
    assert "stage-2 1/4 25%" in out  # the running run's progress
    assert fake.requests[-1].url.params["sort"] == "best:error_rate"
    code, out, err = run("ls", *GOOD, "--json", "--state", "succeeded")
    assert code == 0
    page = json.loads(out)  # stdout is JSON and nothing else
    assert [r["id"] for r in page["items"]] == ["exp_a", "exp_r"]
    assert fake.requests[-1].url.params["state"] == "succeeded"


def test_show_prints_spec_epochs_lr_find_findings_artifacts(fake: FakeApi) -> None:
    code, out, err = run("show", *GOOD, "exp_b")
    assert code == 0, err
    for text in (
        "exp_b",
        "failed",
        "error: diverged: loss is nan",
        "model    resnet18  pretrained none",
        "stage 1  stage-2: train all, 2 epochs, max_lr [1e-06, 0.0001], lr_find",
        "train_loss",
        "01:05",  # 65 s like fastai's time column
        "lr_find  stage-2: suggested lr 0.00123 (steepest)",
        "WARNING  valid loss rose",
        "plots/losses.png",
    ):
        assert text in out, text
    code, out, _ = run("show", *GOOD, "exp_b", "--json")
    shown = json.loads(out)
    assert shown["experiment"]["id"] == "exp_b"
    assert len(shown["metrics"]) == 2
    assert shown["interpretation"]["findings"][0]["message"] == "valid loss rose"


def test_a_missing_run_says_so(fake: FakeApi) -> None:
    code, out, err = run("show", *GOOD, "exp_zzz")
    assert code == remote.EXIT_NOT_FOUND
    assert out == ""
    assert "no experiment 'exp_zzz'" in err
    assert "Traceback" not in err


def test_a_missing_route_is_said_plainly(fake: FakeApi) -> None:
    code, _, err = run("datasets", *GOOD)  # the fake API has no /v1/datasets
    assert code == remote.EXIT_NOT_FOUND
    assert "the server does not know /v1/datasets (an older fitfleet" in err


def test_a_wrong_token_is_one_clear_line(fake: FakeApi) -> None:
    code, out, err = run("ls", "--token", "ff_wrong")
    assert code == remote.EXIT_AUTH
    assert out == ""
    assert "token refused (check --token / FITFLEET_TOKEN / config file)" in err
    assert len(err.strip().splitlines()) == 1


def test_server_down_is_one_clear_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    code, out, err = run("ls", "--server", f"http://127.0.0.1:{port}", "--token", "x")
    assert code == remote.EXIT_UNREACHABLE
    assert out == ""
    assert f"cannot reach the fitfleet server at http://127.0.0.1:{port}" in err


def test_a_bad_config_file_names_it(
    fake: FakeApi, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "bad.toml"
    config.write_text("server = [oops\n")
    monkeypatch.setenv("FITFLEET_CONFIG", str(config))
    code, _, err = run("ls")
    assert code == remote.EXIT_BAD_INPUT
    assert f"config file {config}: not valid TOML" in err


def test_the_config_file_supplies_server_and_token(fake: FakeApi, tmp_path: Path) -> None:
    code, out, err = run("token", "save", "ff_good", "--server", "http://fake/")
    assert code == 0, err
    path = tmp_path / "home" / ".config" / "fitfleet" / "config.toml"
    assert str(path) in out
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert tomllib.loads(path.read_text()) == {"server": "http://fake", "token": "ff_good"}
    code, out, err = run("token", "whoami")
    assert code == 0, err
    assert out.strip() == "token tok_1 (project vision) at http://fake"
    assert f"token from config file {path}" in err
    code, out, _ = run("token", "whoami", "--json")
    assert json.loads(out) == {
        "token_id": "tok_1",
        "project": "vision",
        "is_admin": False,
        "server": "http://fake",
    }


def test_whoami_without_a_token(fake: FakeApi) -> None:
    code, _, err = run("token", "whoami")
    assert code == remote.EXIT_AUTH
    assert "no token" in err


def test_compare_shows_only_what_differs_then_metrics(fake: FakeApi) -> None:
    code, out, err = run("compare", *GOOD, "exp_a", "exp_b")
    assert code == 0, err
    assert "stages.0.max_lr" in out
    assert "final error_rate" in out and "best accuracy" in out
    assert fake.requests[-1].url.params["ids"] == "exp_a,exp_b"
    code, _, err = run("compare", *GOOD, "exp_a")
    assert code == remote.EXIT_BAD_INPUT
    assert "at least two" in err
    code, out, _ = run("compare", *GOOD, "--sweep", "swp_1", "--json")
    assert json.loads(out)["spec_differences"] == {"stages.0.max_lr": [0.003, 0.01]}
    assert fake.requests[-1].url.params["sweep"] == "swp_1"


def test_logs_and_follow(fake: FakeApi) -> None:
    code, out, err = run("logs", *GOOD, "exp_a")
    assert code == 0, err
    assert "experiment.submitted" in out and "claimed by w1" in out
    code, out, _ = run("logs", *GOOD, "exp_a", "--json")
    assert [e["id"] for e in json.loads(out)["items"]] == [1, 2]
    code, out, _ = run("logs", *GOOD, "exp_b", "--follow", "--json")
    assert code == remote.EXIT_FAILED  # exp_b failed
    assert [json.loads(line)["id"] for line in out.splitlines()] == [1, 2]


def test_watch_without_a_terminal_prints_lines_and_exits_by_outcome(fake: FakeApi) -> None:
    code, out, err = run("watch", *GOOD, "exp_a")
    assert code == 0, err
    assert "exp_a  succeeded  4/4" in out
    code, out, _ = run("watch", *GOOD, "exp_a", "exp_b")
    assert code == remote.EXIT_FAILED
    assert "diverged: loss is nan" in out


def test_watch_follows_a_run_until_it_ends(fake: FakeApi) -> None:
    run_state = fake.runs["exp_b"]
    states = iter(["queued", "running", "running", "succeeded"])

    def handle_with_progress(request):
        if request.url.path == "/v1/experiments/exp_b":
            run_state["state"] = next(states, "succeeded")
            run_state["error"] = None
        return original(request)

    original = fake.handle
    fake.handle = handle_with_progress  # type: ignore[method-assign]
    code, out, err = run("watch", *GOOD, "exp_b", "--poll", "0")
    assert code == 0, err
    assert out.splitlines()[0].startswith("exp_b  queued")
    assert "exp_b  running  1/4  stage-1  valid_loss 0.2500" in out


def test_cancel_reports_each_run(fake: FakeApi) -> None:
    fake.runs["exp_q"] = {**fake.runs["exp_a"], "id": "exp_q", "state": "queued"}
    code, out, err = run("cancel", *GOOD, "exp_q", "exp_a", "exp_zzz")
    assert "exp_q cancelled" in out
    assert "exp_a has already ended" in err
    assert "no experiment 'exp_zzz'" in err
    assert code == remote.EXIT_BAD_INPUT


def test_artifacts_ls_and_get(fake: FakeApi, tmp_path: Path) -> None:
    code, out, _ = run("artifacts", "ls", *GOOD, "exp_a")
    assert code == 0 and "plots/losses.png" in out
    target = tmp_path / "dl"
    code, out, err = run("artifacts", "get", *GOOD, "exp_a", "-o", str(target))
    assert code == 0, err
    assert out.splitlines() == [str(target / "report.json"), str(target / "plots" / "losses.png")]
    assert (target / "plots" / "losses.png").read_bytes() == FILE_BYTES
    assert stat.S_IMODE((target / "report.json").stat().st_mode) & 0o044  # not left 0600
    plots = tmp_path / "plots-only"
    code, out, _ = run("artifacts", "get", *GOOD, "exp_a", "--kind", "plot", "-o", str(plots))
    assert out.splitlines() == [str(plots / "plots" / "losses.png")]
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    code, _, err = run("artifacts", "get", *GOOD, "exp_a", "-o", str(blocked / "sub"))
    assert code == remote.EXIT_FAILED
    assert err.startswith("cannot write") and "Traceback" not in err
    code, _, err = run("artifacts", "get", *GOOD, "exp_a", "nope.bin", "-o", str(target))
    assert code == remote.EXIT_NOT_FOUND
    assert "has no artifact nope.bin" in err


def test_parse_sweep_choices() -> None:
    assert remote.parse_choice("--grid", "stages.0.max_lr=1e-3,3e-3") == (
        "stages.0.max_lr",
        [0.001, 0.003],
    )
    assert remote.parse_choice("--grid", "model.arch=resnet18,resnet34") == (
        "model.arch",
        ["resnet18", "resnet34"],
    )
    assert remote.parse_random("stages.0.max_lr=1e-4..1e-2:log") == (
        "stages.0.max_lr",
        {"low": 1e-4, "high": 1e-2, "log": True, "integer": False},
    )
    with pytest.raises(SystemExit):
        remote.parse_choice("--grid", "novalues")


def test_formatting_helpers() -> None:
    assert remote.fmt_num(None) == "—"
    assert remote.fmt_num(0.5) == "0.5000"
    assert remote.fmt_num(1.5e-5) == "1.5e-05"
    assert remote.fmt_bytes(1536) == "1.5 KiB"
    assert remote.main_metric([{"metrics": {"valid_loss": {}, "accuracy": {}}}], None) == "accuracy"
    assert remote.main_metric([], "-final:valid_loss") == "valid_loss"


def test_watch_rides_out_a_short_outage(fake: FakeApi) -> None:
    run_state = fake.runs["exp_b"]
    script = iter(["running", "down", "down", "succeeded"])

    def flaky(request):
        if request.url.path == "/v1/experiments/exp_b":
            step = next(script, "succeeded")
            if step == "down":
                raise httpx.ConnectError("connection refused", request=request)
            run_state["state"], run_state["error"] = step, None
        return original(request)

    original = fake.handle
    fake.handle = flaky  # type: ignore[method-assign]
    code, out, err = run("watch", *GOOD, "exp_b", "--poll", "0")
    assert code == 0, err
    assert "server not answering" in err and "server back" in err
    assert "exp_b  succeeded" in out


def test_watch_gives_up_on_a_server_that_stays_down(
    fake: FakeApi, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake.runs["exp_b"]["state"] = "running"
    calls = {"n": 0}

    def down_after_first(request):
        calls["n"] += 1
        if calls["n"] > 1:
            raise httpx.ConnectError("connection refused", request=request)
        return original(request)

    original = fake.handle
    fake.handle = down_after_first  # type: ignore[method-assign]
    clock = iter(range(0, 10_000, 30))
    monkeypatch.setattr("cli.remote.time.monotonic", lambda: float(next(clock)))
    code, _, err = run("watch", *GOOD, "exp_b", "--poll", "0")
    assert code == remote.EXIT_UNREACHABLE
    assert "cannot reach the fitfleet server" in err
