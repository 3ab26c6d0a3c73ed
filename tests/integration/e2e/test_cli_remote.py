"""The ``fitfleet`` CLI through its real entry point (``python -m cli``) against the live stack.

Every command runs as a subprocess with ``live_stack.env`` (server URL and
admin token in the environment, no config file), on the stack's real
finished runs: three succeeded digits runs in project "vision" that differ in
stage 2's max_lr (the last also in batch size) and one that diverged.
Tests that change something submit runs of their own.
"""

from __future__ import annotations

import hashlib
import json
import socket
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.integration.e2e.stack import REPO, LiveStack

pytestmark = pytest.mark.integration

EXIT_UNREACHABLE = 3
EXIT_AUTH = 4
EXIT_NOT_FOUND = 5


def ok(answer: subprocess.CompletedProcess[str], live_stack: LiveStack) -> str:
    """stdout of a command that must have succeeded (its output and the logs otherwise)."""
    assert answer.returncode == 0, (
        answer.returncode,
        answer.stdout,
        answer.stderr,
        live_stack.logs(),
    )
    assert "Traceback" not in answer.stderr, answer.stderr
    return answer.stdout


def as_json(answer: subprocess.CompletedProcess[str], live_stack: LiveStack) -> Any:
    """stdout parsed as JSON: with --json, stdout holds JSON and nothing else."""
    return json.loads(ok(answer, live_stack))


def good_runs(live_stack: LiveStack, *args: str) -> list[dict[str, Any]]:
    """The stack's three succeeded runs as ``fitfleet ls --json`` lists them."""
    page = as_json(
        live_stack.cli("ls", "--json", "--state", "succeeded", "--name", "e2e-lr-", *args),
        live_stack,
    )
    return [row for row in page["items"] if row["id"] in live_stack.run_ids]


def test_ls_json_lists_the_three_runs_with_metrics(live_stack: LiveStack) -> None:
    rows = good_runs(live_stack, "--project", "vision")
    assert sorted(r["id"] for r in rows) == sorted(live_stack.run_ids)
    for row in rows:
        assert (row["state"], row["project"], row["dataset"]) == ("succeeded", "vision", "digits")
        assert (row["epochs_done"], row["epochs_total"]) == (2, 2)
        assert {"error_rate", "accuracy"} <= set(row["metrics"])
    table = ok(live_stack.cli("ls", "--project", "vision", "--limit", "200"), live_stack)
    for run_id in live_stack.run_ids:
        assert run_id in table
    assert "error_rate final / best" in table


def test_ls_sorts_by_best_error_rate(live_stack: LiveStack) -> None:
    rows = good_runs(live_stack, "--sort", "best:error_rate")
    best = [row["metrics"]["error_rate"]["best"] for row in rows]
    assert len(best) == 3 and best == sorted(best), best
    reverse = good_runs(live_stack, "--sort", "-best:error_rate")
    assert [r["metrics"]["error_rate"]["best"] for r in reverse] == sorted(best, reverse=True)
    # The best values are the minimum over each run's epoch rows (not the last row).
    for row in rows:
        shown = as_json(live_stack.cli("show", row["id"], "--json"), live_stack)
        values = [m["metrics"]["error_rate"] for m in shown["metrics"]]
        assert row["metrics"]["error_rate"]["best"] == pytest.approx(min(values))
    # The table lists them in the same order.
    table = ok(
        live_stack.cli(
            "ls", "--state", "succeeded", "--name", "e2e-lr-", "--sort", "best:error_rate"
        ),
        live_stack,
    )
    positions = [table.index(row["id"]) for row in rows]
    assert positions == sorted(positions), table


def test_show_prints_the_epoch_table_lr_find_findings_and_artifacts(live_stack: LiveStack) -> None:
    run_id = live_stack.run_ids[0]
    out = ok(live_stack.cli("show", run_id), live_stack)
    assert run_id in out and "succeeded" in out
    header = next(line for line in out.splitlines() if "train_loss" in line)
    for column in ("stage", "epoch", "train_loss", "valid_loss", "error_rate", "accuracy", "time"):
        assert column in header, header
    epoch_lines = [line for line in out.splitlines() if line.lstrip().startswith("stage-")]
    assert len(epoch_lines) == 2, out
    assert "lr_find  stage-2: " in out  # the finder's suggestion, or why there is none
    assert "findings" in out
    assert "report.json" in out
    failed = ok(live_stack.cli("show", live_stack.failed_run_id), live_stack)
    assert "error:" in failed and "learning rate is too high" in failed


def test_show_of_a_missing_run(live_stack: LiveStack) -> None:
    answer = live_stack.cli("show", "exp_doesnotexist")
    assert answer.returncode == EXIT_NOT_FOUND, (answer.stdout, answer.stderr)
    assert "no experiment" in answer.stderr and "exp_doesnotexist" in answer.stderr
    assert answer.stdout == ""
    assert "Traceback" not in answer.stderr


def test_compare_shows_exactly_the_fields_that_differ(live_stack: LiveStack) -> None:
    first, second, third = live_stack.run_ids
    comparison = as_json(live_stack.cli("compare", first, second, "--json"), live_stack)
    assert set(comparison["spec_differences"]) == {"stages.1.max_lr"}
    assert comparison["spec_differences"]["stages.1.max_lr"] == [1e-3, 3e-3]
    out = ok(live_stack.cli("compare", first, second), live_stack)
    field_rows = [
        line for line in out.splitlines() if line.strip().startswith(("stages.", "data."))
    ]
    assert len(field_rows) == 1 and "stages.1.max_lr" in field_rows[0], out
    assert "final error_rate" in out and "best error_rate" in out
    wider = as_json(live_stack.cli("compare", first, third, "--json"), live_stack)
    assert set(wider["spec_differences"]) == {"stages.1.max_lr", "data.batch_size"}


def test_logs_show_the_runs_events(live_stack: LiveStack) -> None:
    run_id = live_stack.run_ids[0]
    events = as_json(live_stack.cli("logs", run_id, "--json"), live_stack)["items"]
    assert events, "a finished run has events"
    ids = [e["id"] for e in events]
    assert ids == sorted(ids)
    out = ok(live_stack.cli("logs", run_id), live_stack)
    assert len(out.strip().splitlines()) == len(events)
    for event in events:
        assert event["kind"] in out
    # --follow on a finished run prints the same events and exits by its outcome.
    followed = live_stack.cli("logs", run_id, "--follow", "--json", "--poll", "0.2")
    assert [json.loads(line)["id"] for line in ok(followed, live_stack).splitlines()] == ids
    failed = live_stack.cli("logs", live_stack.failed_run_id, "--follow", "--poll", "0.2")
    assert failed.returncode == 1, (failed.stdout, failed.stderr)


def test_artifacts_get_downloads_files_whose_sha256_matches(
    live_stack: LiveStack, tmp_path: Path
) -> None:
    """Through the store's presigned S3 redirect; checkpoints are left out (hundreds of MB)."""
    run_id = live_stack.run_ids[1]
    listing = as_json(live_stack.cli("artifacts", "ls", run_id, "--json"), live_stack)["items"]
    assert "report.json" in {item["name"] for item in listing}
    wanted = [item for item in listing if item["kind"] in ("plot", "report")]
    assert len(wanted) >= 2, listing
    out_dir = tmp_path / "downloads"
    out = ok(
        live_stack.cli(
            "artifacts", "get", run_id, "--kind", "plot", "--kind", "report", "-o", str(out_dir)
        ),
        live_stack,
    )
    assert sorted(Path(line) for line in out.splitlines()) == sorted(
        out_dir / item["name"] for item in wanted
    )
    for item in wanted:
        data = (out_dir / item["name"]).read_bytes()
        assert len(data) == item["bytes"]
        assert hashlib.sha256(data).hexdigest() == item["sha256"]
    assert not [p for p in out_dir.rglob("*") if p.name.endswith(".part")]
    one = as_json(
        live_stack.cli(
            "artifacts", "get", run_id, "report.json", "-o", str(tmp_path / "one"), "--json"
        ),
        live_stack,
    )["items"]
    assert [(d["name"], d["path"]) for d in one] == [
        ("report.json", str(tmp_path / "one" / "report.json"))
    ]
    assert "findings" in json.loads((tmp_path / "one" / "report.json").read_text())
    missing = live_stack.cli("artifacts", "get", run_id, "nope.bin", "-o", str(tmp_path / "x"))
    assert missing.returncode == EXIT_NOT_FOUND and "nope.bin" in missing.stderr


def _long_spec(live_stack: LiveStack, path: Path, name: str) -> Path:
    """A run that trains long enough (many epochs) to be cancelled while it lives."""
    document = live_stack.spec(name, lr_find=False)
    for stage in document["stages"]:
        stage["epochs"] = 30
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


def test_cancel_a_freshly_submitted_run(live_stack: LiveStack, tmp_path: Path) -> None:
    spec_file = _long_spec(live_stack, tmp_path / "long.yaml", "e2e-cli-cancel")
    created = as_json(live_stack.cli("submit", str(spec_file), "--json"), live_stack)
    assert created["state"] == "queued"
    out = ok(live_stack.cli("cancel", created["id"]), live_stack)
    assert out.startswith(created["id"]) and "cancel" in out
    final = live_stack.wait_finished(created["id"], timeout=120)
    assert final["state"] == "cancelled", (final, live_stack.logs())
    again = live_stack.cli("cancel", created["id"])
    assert again.returncode != 0 and created["id"] in again.stderr


def test_watch_a_small_run_until_it_succeeds(live_stack: LiveStack, tmp_path: Path) -> None:
    document = live_stack.spec("e2e-cli-watch", lr_find=False)
    document["stages"] = document["stages"][:1]  # one stage of one epoch
    spec_file = tmp_path / "small.yaml"
    spec_file.write_text(yaml.safe_dump(document, sort_keys=False))
    created = as_json(live_stack.cli("submit", str(spec_file), "--json"), live_stack)
    answer = live_stack.cli("watch", created["id"], "--poll", "0.5", timeout=300)
    out = ok(answer, live_stack)
    lines = [line for line in out.splitlines() if line.startswith(created["id"])]
    assert lines, out
    assert "succeeded" in lines[-1], out
    assert any("1/1" in line for line in lines), out
    failed = live_stack.cli("watch", live_stack.failed_run_id, "--poll", "0.2")
    assert failed.returncode == 1, (failed.stdout, failed.stderr)


def test_token_whoami_for_admin_and_project_tokens(live_stack: LiveStack) -> None:
    admin = as_json(live_stack.cli("token", "whoami", "--json"), live_stack)
    assert admin["is_admin"] is True and admin["server"] == live_stack.url
    out = ok(live_stack.cli("token", "whoami", "--token", live_stack.project_token), live_stack)
    assert "project vision" in out and live_stack.url in out


def test_the_config_file_works_when_the_environment_is_silent(
    live_stack: LiveStack, tmp_path: Path
) -> None:
    config = tmp_path / "config" / "config.toml"
    env = {**live_stack.env, "FITFLEET_CONFIG": str(config)}
    env.pop("FITFLEET_TOKEN")
    env.pop("FITFLEET_SERVER_URL")
    saved = subprocess.run(
        [sys.executable, "-m", "cli", "token", "save", "-", "--server", live_stack.url],
        input=live_stack.project_token + "\n",
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert saved.returncode == 0, (saved.stdout, saved.stderr)
    assert stat.S_IMODE(config.stat().st_mode) == 0o600
    whoami = subprocess.run(
        [sys.executable, "-m", "cli", "token", "whoami"],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert whoami.returncode == 0, (whoami.stdout, whoami.stderr)
    assert "project vision" in whoami.stdout
    assert f"token from config file {config}" in whoami.stderr


def test_a_wrong_token_is_said_plainly(live_stack: LiveStack) -> None:
    for command in (["ls"], ["show", live_stack.run_ids[0]], ["token", "whoami"]):
        answer = live_stack.cli(*command, env={"FITFLEET_TOKEN": "ff_wrong"})
        assert answer.returncode == EXIT_AUTH, (command, answer.stdout, answer.stderr)
        assert "token refused (check --token / FITFLEET_TOKEN / config file)" in answer.stderr
        assert answer.stdout == ""
        assert "Traceback" not in answer.stderr


def test_a_server_that_is_down_is_said_plainly(live_stack: LiveStack) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    for command in (["ls"], ["watch", "exp_x"], ["token", "whoami"]):
        answer = live_stack.cli(*command, env={"FITFLEET_SERVER_URL": url})
        assert answer.returncode == EXIT_UNREACHABLE, (command, answer.stdout, answer.stderr)
        assert f"cannot reach the fitfleet server at {url}" in answer.stderr
        assert "Traceback" not in answer.stderr
        assert answer.stdout == ""


def test_leaderboard_ranks_by_best_error_rate(live_stack: LiveStack) -> None:
    board = as_json(
        live_stack.cli("leaderboard", "--metric", "error_rate", "--dataset", "digits", "--json"),
        live_stack,
    )
    ours = [e for e in board["entries"] if e["run"]["id"] in live_stack.run_ids]
    assert len(ours) == 3
    values = [e["best"] for e in board["entries"]]
    assert values == sorted(values)
    table = ok(
        live_stack.cli("leaderboard", "--metric", "error_rate", "--dataset", "digits"), live_stack
    )
    assert all(run_id in table for run_id in live_stack.run_ids)
