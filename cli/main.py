"""The ``fitfleet`` command.

Heavy parts (torch, the engine) are imported inside the commands that need
them, so ``fitfleet spec check`` answers instantly on a machine without torch.
"""

from __future__ import annotations

import io
import json
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import click
from rich.console import Console

from shared.errors import DataError, Diverged, InvalidSpec, Stopped, TrainingError, WeightsMissing
from shared.settings import get_settings
from shared.spec import ExperimentSpec
from shared.spec_io import load_spec_file, spec_json_schema

if TYPE_CHECKING:
    from cli.client import Client

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_STOPPED = 130

err_console = Console(stderr=True, soft_wrap=True)


def _load_or_exit(path: Path) -> ExperimentSpec:
    try:
        return load_spec_file(path)
    except InvalidSpec as exc:
        err_console.print(f"[red]{path}: invalid spec ({len(exc.problems)} problems)[/]")
        for problem in exc.problems:
            err_console.print(f"  {problem.path}: {problem.message}", highlight=False)
        sys.exit(EXIT_BAD_INPUT)


#: Commands imported only when run (or listed by --help): they pull in SQLAlchemy and
#: Celery, which the commands that talk to a server never need (a second per call).
_LAZY_COMMANDS = {"worker": "workers.cli", "dispatch": "workers.cli"}


class _Main(click.Group):
    """The ``fitfleet`` group, loading :data:`_LAZY_COMMANDS` on first use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *_LAZY_COMMANDS})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in _LAZY_COMMANDS and cmd_name not in self.commands:
            import importlib

            module = importlib.import_module(_LAZY_COMMANDS[cmd_name])
            self.add_command(getattr(module, cmd_name))
        return super().get_command(ctx, cmd_name)


@click.group(cls=_Main)
@click.option("-v", "--verbose", is_flag=True, help="Log what the engine does.")
def main(verbose: bool) -> None:
    """fitfleet: train image classifiers the fastai way."""
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )


@main.group()
def spec() -> None:
    """Check specs and print their schema."""


@spec.command("check")
@click.argument("files", nargs=-1, required=True, type=click.Path(path_type=Path))
def spec_check(files: tuple[Path, ...]) -> None:
    """Validate spec files; print every problem with its field path (exit 2)."""
    bad = 0
    for path in files:
        try:
            load_spec_file(path)
        except InvalidSpec as exc:
            bad += 1
            err_console.print(f"[red]{path}: invalid ({len(exc.problems)} problems)[/]")
            for problem in exc.problems:
                err_console.print(f"  {problem.path}: {problem.message}", highlight=False)
        else:
            click.echo(f"{path}: ok")
    if bad:
        sys.exit(EXIT_BAD_INPUT)


@spec.command("schema")
def spec_schema() -> None:
    """Print the JSON Schema of spec v1."""
    click.echo(json.dumps(spec_json_schema(), indent=2))


@main.command()
@click.argument("spec_file", type=click.Path(path_type=Path))
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    help="Run folder (default: a new one under $FITFLEET_HOME/runs).",
)
@click.option("--resume", is_flag=True, help="Continue from the run folder's latest checkpoint.")
@click.option(
    "--data-root",
    "data_roots",
    multiple=True,
    type=click.Path(path_type=Path),
    help="Allow reading data under this folder (repeatable; the current folder is allowed too).",
)
def train(spec_file: Path, out: Path | None, resume: bool, data_roots: tuple[Path, ...]) -> None:
    """Run SPEC_FILE locally, with no services: epoch table, findings, plots, report.

    With ``resources.gpus`` >= 2 the command runs itself once per rank under
    torchrun (DDP: NCCL on GPUs, gloo on CPU) and exits with rank 0's code.
    """
    from workers.training.launch import world_from_env, write_exit_code

    spec_obj = _load_or_exit(spec_file)
    if spec_obj.resources.gpus >= 2 and world_from_env()[2] == 1:
        sys.exit(_train_under_torchrun(spec_obj, spec_file, out, resume, data_roots))
    code = run_local(spec_obj, out=out, resume=resume, extra_roots=list(data_roots))
    write_exit_code(code)  # for the launching process, when this is rank 0 under torchrun
    sys.exit(code)


def _train_under_torchrun(
    spec_obj: ExperimentSpec,
    spec_file: Path,
    out: Path | None,
    resume: bool,
    data_roots: tuple[Path, ...],
) -> int:
    """Start ``fitfleet train`` on ``resources.gpus`` ranks; return rank 0's exit code."""
    import os
    import subprocess
    import tempfile

    from cli.local_runs import new_run_id, runs_dir
    from workers.training.launch import EXIT_FILE_ENV, torchrun_command

    if out is None:
        if resume:
            err_console.print("[red]--resume needs --out: the run folder to continue[/]")
            return EXIT_BAD_INPUT
        out = runs_dir(get_settings().home) / new_run_id(spec_obj.name)
    args = ["cli", "train", str(spec_file.resolve()), "--out", str(out.resolve())]
    if resume:
        args.append("--resume")
    for root in (*data_roots, Path.cwd()):
        args += ["--data-root", str(root.resolve())]
    with tempfile.TemporaryDirectory() as tmp:
        exit_file = Path(tmp) / "exit"
        env = {**os.environ, EXIT_FILE_ENV: str(exit_file)}
        code = subprocess.call(torchrun_command(spec_obj.resources.gpus, args), env=env)
        try:
            return int(exit_file.read_text().strip())
        except (OSError, ValueError):
            return code or EXIT_FAILED


def run_local(
    spec_obj: ExperimentSpec,
    *,
    out: Path | None,
    resume: bool,
    extra_roots: list[Path],
    console: Console | None = None,
) -> int:
    """Train one spec in this process and print what happened; returns the exit code."""
    from cli.console import ConsoleReporter
    from cli.local_runs import make_resolver, new_run_id, runs_dir
    from workers.training.diagnosis import format_findings
    from workers.training.distributed import init_from_env, shutdown
    from workers.training.engine import EngineOptions, Runtime, choose_device, run_experiment

    console = console or Console(soft_wrap=True)
    settings = get_settings()
    if out is None:
        if resume:
            err_console.print("[red]--resume needs --out: the run folder to continue[/]")
            return EXIT_BAD_INPUT
        out = runs_dir(settings.home) / new_run_id(spec_obj.name)
    roots = [*(r.resolve() for r in extra_roots), *settings.data_roots, Path.cwd()]
    options = EngineOptions(
        out_dir=out,
        data_roots=roots,
        weights_dir=settings.weights_path,
        resume=resume,
        resolve_run=make_resolver(settings.home),
    )
    collectives = init_from_env(gpus=spec_obj.resources.gpus, sync_bn=spec_obj.resources.sync_bn)
    if collectives is None:
        runtime = Runtime(device=choose_device(spec_obj.resources.gpus))
    else:
        runtime = Runtime.distributed(collectives)
        if collectives.rank != 0:  # only rank 0 talks; the others train silently
            console = Console(file=io.StringIO())
    reporter = ConsoleReporter(console, list(spec_obj.metrics))
    console.print(f"run folder: {out}")
    reporter.install_interrupt()
    try:
        report = run_experiment(spec_obj, options, reporter, runtime)
    except (DataError, WeightsMissing) as exc:
        err_console.print(f"[red]cannot start:[/] {exc}", highlight=False)
        return EXIT_BAD_INPUT
    except Diverged as exc:
        err_console.print(f"[red]diverged:[/] {exc}", highlight=False)
        return EXIT_FAILED
    except Stopped as exc:
        err_console.print(
            f"[yellow]{exc}[/]\nresume with: fitfleet train SPEC --out {out} --resume"
        )
        return EXIT_STOPPED
    except TrainingError as exc:
        err_console.print(f"[red]failed:[/] {exc}", highlight=False)
        return EXIT_FAILED
    finally:
        reporter.restore_interrupt()
        shutdown()
    console.print("\n[bold]findings[/]")
    lines = format_findings(report.findings) or ["none: the run looks healthy"]
    for line in lines:
        console.print(f"  {line}", highlight=False)
    if report.skipped_files:
        console.print(f"\n{len(report.skipped_files)} files skipped (see report.json)")
    console.print(f"\nreport: {out / 'report.json'}\nplots:  {out / 'plots'}")
    return EXIT_OK


@main.group()
def db() -> None:
    """The database schema (Alembic migrations: the only way it changes)."""


@db.command("upgrade")
@click.option("--revision", default="head", show_default=True)
def db_upgrade(revision: str) -> None:
    """Migrate FITFLEET_DATABASE_URL up to REVISION."""
    from shared.db.upgrade import current, upgrade

    url = get_settings().database_url
    upgrade(url, revision)
    click.echo(f"database at {current(url)}")


@db.command("downgrade")
@click.argument("revision")
def db_downgrade(revision: str) -> None:
    """Migrate FITFLEET_DATABASE_URL down to REVISION (e.g. base)."""
    from shared.db.upgrade import current, downgrade

    url = get_settings().database_url
    downgrade(url, revision)
    click.echo(f"database at {current(url) or 'base'}")


@db.command("current")
def db_current() -> None:
    """Print the database's revision."""
    from shared.db.upgrade import current

    click.echo(current(get_settings().database_url) or "base (empty)")


@main.group()
def token() -> None:
    """API tokens: one project each, or admin over all (stored hashed)."""


@token.command("create")
@click.option("--project", help="The project the token may see and change.")
@click.option(
    "--admin", is_flag=True, help="A token over every project, the fleet and the dashboard."
)
@click.option("--name", default="", help="A note saying whose token it is.")
def token_create(project: str | None, admin: bool, name: str) -> None:
    """Create a token and print its secret (shown once, stored only as a hash)."""
    from services.api.tokens import create_token
    from shared.db.session import make_engine, session_scope

    if project is None and not admin:
        err_console.print("[red]--project is required unless --admin[/]")
        sys.exit(EXIT_BAD_INPUT)
    engine = make_engine(get_settings().database_url)
    try:
        with session_scope(engine) as session:
            token_id, secret = create_token(session, project, admin, name=name, actor=_cli_actor())
    finally:
        engine.dispose()
    click.echo(f"token {token_id} for {'every project (admin)' if admin else project}")
    click.echo(secret)


def _cli_actor() -> str:
    """Who ran this command, for audit events: ``cli:<user>@<host>``."""
    import getpass
    import socket

    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"cli:{user}@{socket.gethostname()}"


@token.command("revoke")
@click.argument("token_id")
def token_revoke(token_id: str) -> None:
    """Revoke a token by its id: it stops working within FITFLEET_AUTH_CACHE_S (5 s)."""
    from datetime import UTC, datetime

    from shared.db.models import SqlApiToken, SqlEvent
    from shared.db.session import make_engine, session_scope

    engine = make_engine(get_settings().database_url)
    try:
        with session_scope(engine) as session:
            row = session.get(SqlApiToken, token_id)
            if row is None:
                err_console.print(f"[red]no token {token_id}[/]")
                sys.exit(EXIT_BAD_INPUT)
            if row.revoked_at is None:
                row.revoked_at = datetime.now(UTC)
                session.add(
                    SqlEvent(
                        kind="token.revoked",
                        message=f"token {token_id} revoked",
                        data={"token": token_id, "project": row.project_id},
                        actor=_cli_actor(),
                        created_at=datetime.now(UTC),
                    )
                )
    finally:
        engine.dispose()
    click.echo(f"token {token_id} revoked")


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=int)
@click.option("--workers", default=1, show_default=True, type=int, help="Server processes.")
def api(host: str, port: int, workers: int) -> None:
    """Serve the HTTP API (uvicorn) on FITFLEET_DATABASE_URL and FITFLEET_ARTIFACTS_URL."""
    import uvicorn

    uvicorn.run(
        "services.api.app:create_app",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        log_level="info",
    )


def _client(server: str | None, token: str | None) -> Client:
    """A client for --server/--token, else FITFLEET_SERVER_URL/FITFLEET_TOKEN, else the config."""
    from cli.client import Client
    from cli.config import resolve

    resolved = resolve(server, token)
    return Client(resolved.server, resolved.token)


_server_option = click.option(
    "--server",
    help="The API (else env FITFLEET_SERVER_URL, else the config file, "
    "else http://127.0.0.1:8000).",
)
_token_option = click.option(
    "--token", help="Bearer token (else env FITFLEET_TOKEN, else the config file)."
)


@main.command()
@click.argument("spec_file", type=click.Path(path_type=Path))
@_server_option
@_token_option
@click.option("--wait", is_flag=True, help="Follow the run: print each epoch row until it ends.")
@click.option("--idempotency-key", help="Submitting twice with one key creates one run.")
@click.option("--poll", default=2.0, show_default=True, help="Seconds between progress checks.")
@click.option(
    "--json", "as_json", is_flag=True, help="Print the created run as JSON (progress to stderr)."
)
def submit(
    spec_file: Path,
    server: str | None,
    token: str | None,
    wait: bool,
    idempotency_key: str | None,
    poll: float,
    as_json: bool,
) -> None:
    """Submit SPEC_FILE to the server; with --wait, show progress until the run ends."""
    from cli.client import ApiError, ServerDown
    from cli.config import ConfigError

    _load_or_exit(spec_file)  # the same checks as the server, before any network
    try:
        with _client(server, token) as api:
            created = api.submit(
                spec_file.read_text(encoding="utf-8"),
                yaml=spec_file.suffix.lower() in {".yaml", ".yml"},
                idempotency_key=idempotency_key,
            )
            if as_json:
                click.echo(json.dumps(created, indent=2))
            else:
                click.echo(f"{created['id']} {created['state']}")
            if wait:
                sys.exit(_follow(api, created["id"], poll, err=as_json))
    except ConfigError as exc:
        err_console.print(f"[red]{exc}[/]", highlight=False)
        sys.exit(EXIT_BAD_INPUT)
    except ServerDown as exc:
        err_console.print(f"[red]{exc}[/]", highlight=False)
        sys.exit(EXIT_FAILED)
    except ApiError as exc:
        what = (
            "token refused (check --token / FITFLEET_TOKEN / config file)"
            if exc.status == 401
            else "refused"
        )
        err_console.print(f"[red]{what}:[/] HTTP {exc.status}", highlight=False)
        for line in exc.lines():
            err_console.print(f"  {line}", highlight=False)
        sys.exit(EXIT_BAD_INPUT if exc.status in (400, 403, 413, 415, 422) else EXIT_FAILED)


def _follow(api: Client, experiment_id: str, poll: float, *, err: bool = False) -> int:
    """Print new epoch rows as they appear (to stderr with ``err``); returns the exit code."""
    import functools
    import time

    from cli.client import TERMINAL

    echo = functools.partial(click.echo, err=err)
    shown = 0
    state = ""
    waiting: str | None = None
    while True:
        run = api.get(experiment_id)
        if run["state"] != state:
            state = run["state"]
            echo(f"state: {state} (attempt {run['attempt']})")
        if run.get("waiting_reason") and run["waiting_reason"] != waiting:
            waiting = run["waiting_reason"]
            echo(f"waiting: {waiting}")
        rows = api.metrics(experiment_id)
        for row in rows[shown:]:
            metrics = "  ".join(
                f"{k} {v:.6f}" for k, v in sorted(row["metrics"].items()) if v is not None
            )
            echo(
                f"{row['stage']} epoch {row['epoch']}: train_loss {row['train_loss']} "
                f"valid_loss {row['valid_loss']}  {metrics}"
            )
        shown = len(rows)
        if state in TERMINAL:
            if run.get("error"):
                err_console.print(f"[red]{run['error']}[/]", highlight=False)
            return EXIT_OK if state == "succeeded" else EXIT_FAILED
        time.sleep(poll)


@main.group()
def data() -> None:
    """Build datasets for demos and tests (nothing is downloaded)."""


@data.command("digits")
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--classes", default="3,7", show_default=True, help="Comma-separated digits.")
@click.option("--size", default=28, show_default=True, type=int, help="Image side in pixels.")
def data_digits(out: Path, classes: str, size: int) -> None:
    """Write scikit-learn's bundled digits to OUT, laid out like fastai's MNIST_SAMPLE."""
    from workers.training.digits import build_digits

    try:
        wanted = [int(c) for c in classes.split(",") if c.strip()]
        counts = build_digits(out, classes=wanted, size=size)
    except ValueError as exc:
        err_console.print(f"[red]{exc}[/]")
        sys.exit(EXIT_BAD_INPUT)
    click.echo(f"{out}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))


@main.command()
@click.option("--port", type=int, help="API port (default: a free one).")
@click.option("--queues", default="gpu", show_default=True, help="The worker's queues.")
def up(port: int | None, queues: str) -> None:
    """Start the embedded stack (API, dispatcher, worker) until Ctrl-C."""
    import time

    from cli.stack import start_stack

    settings = get_settings()
    stack = start_stack(settings, port=port, queues=queues)
    click.echo(f"fitfleet is up: {stack.url} (OpenAPI at {stack.url}/docs)")
    click.echo(f"database {settings.database_url}, broker {settings.broker_url}")
    click.echo(f"artifacts {settings.artifacts_url}, logs {stack.logs}")
    click.echo("create a token: fitfleet token create --project default")
    click.echo(
        f"dashboard: {stack.url}/dashboard (sign in with an admin token: "
        "fitfleet token create --admin)"
    )
    try:
        while True:
            stack.check()
            time.sleep(1)
    except KeyboardInterrupt:
        click.echo("stopping")
    finally:
        stack.stop()


@main.command()
def demo() -> None:
    """Build digits 3 vs 7, start the embedded stack, submit the recipe over HTTP, follow it."""
    import yaml

    from cli.client import Client
    from cli.stack import start_stack
    from services.api.tokens import create_token
    from shared.db.session import make_engine, session_scope
    from workers.training.digits import build_digits

    settings = get_settings()
    dataset = settings.data_roots[0] / "digits"
    if not dataset.exists():
        click.echo(f"building digits 3 vs 7 in {dataset}")
        build_digits(dataset)
    example = Path(__file__).resolve().parent.parent / "examples" / "digits-3v7.yaml"
    document = yaml.safe_load(example.read_text(encoding="utf-8"))
    document["data"]["source"] = str(dataset)
    click.echo("starting the embedded stack (SQLite, filesystem broker, local artifacts)")
    stack = start_stack(settings)
    try:
        engine = make_engine(settings.database_url)
        with session_scope(engine) as session:
            _, secret = create_token(session, document.get("project", "default"), name="demo")
        engine.dispose()
        with Client(stack.url, secret) as api:
            created = api.submit(yaml.safe_dump(document), yaml=True)
            run_id = created["id"]
            click.echo(f"submitted {run_id} to {stack.url}; following it")
            code = _follow(api, run_id, 1.0)
            result = api.interpretation(run_id)
        click.echo("\nfindings")
        for finding in result.get("findings", []) or [{"message": "none: the run looks healthy"}]:
            click.echo(f"  {finding.get('severity', '').upper():8} {finding['message']}")
        artifacts = settings.artifacts_url.removeprefix("file://")
        click.echo(f"\nplots and report: {artifacts}/runs/{run_id}/")
        click.echo(
            "to browse it: `./dev fitfleet up`, then open the dashboard URL it prints "
            f"(`fitfleet show {run_id}` from another terminal)"
        )
        sys.exit(code)
    finally:
        stack.stop()


from cli.remote import COMMANDS, TOKEN_COMMANDS  # noqa: E402  (ls, show, watch, logs, ...)

for _command in COMMANDS:
    main.add_command(_command)
for _command in TOKEN_COMMANDS:
    token.add_command(_command)

if __name__ == "__main__":
    main()
