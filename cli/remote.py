"""The commands that talk to a fitfleet server: ls, show, watch, logs, cancel, compare, ...

Every command here takes ``--server``, ``--token`` and ``--profile``, resolved
by :mod:`cli.config` (flag > environment > config file > default). Read
commands take ``--json``: the server's object on stdout, nothing else there;
messages go to stderr. Errors are one line and an exit code (see
:data:`EXIT_CODES`), never a traceback. ``cli.main`` registers
:data:`COMMANDS` on the ``fitfleet`` group and :data:`TOKEN_COMMANDS` on
``fitfleet token``. The HTTP client is imported inside the commands, so
``fitfleet spec check`` works on an install without httpx.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from datetime import datetime
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, NoReturn

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from cli.config import ConfigError, Resolved, resolve

if TYPE_CHECKING:
    from cli.client import ApiError, Client

EXIT_OK = 0
EXIT_FAILED = 1  # a run failed or was cancelled; the server failed (5xx); a checksum mismatch
EXIT_BAD_INPUT = 2  # bad arguments, a bad config file, a request the server refused (4xx)
EXIT_UNREACHABLE = 3  # no server at the URL
EXIT_AUTH = 4  # token missing, refused (401) or not allowed (403)
EXIT_NOT_FOUND = 5  # no such run / artifact / sweep (404)
EXIT_INTERRUPTED = 130

EXIT_CODES = {
    EXIT_OK: "ok (watch, logs --follow: every run succeeded)",
    EXIT_FAILED: "a run failed or was cancelled, or the server failed",
    EXIT_BAD_INPUT: "bad arguments or config file, or the server refused the request",
    EXIT_UNREACHABLE: "cannot reach the server",
    EXIT_AUTH: "token refused or not allowed",
    EXIT_NOT_FOUND: "no such run, artifact or sweep",
    EXIT_INTERRUPTED: "interrupted (Ctrl-C)",
}

ACTIVE_STATES = ("queued", "dispatched", "running")
TERMINAL_STATES = frozenset({"succeeded", "failed", "cancelled"})
HIGHER_IS_BETTER = frozenset({"accuracy", "accuracy_thresh", "fbeta"})

STATE_STYLE = {
    "queued": "yellow",
    "dispatched": "yellow",
    "running": "bold blue",
    "succeeded": "green",
    "failed": "bold red",
    "cancelled": "magenta",
}

err_console = Console(stderr=True, soft_wrap=True, highlight=False)


def out_console() -> Console:
    """stdout; wide when it is not a terminal, so piped tables are not cut at 80 columns."""
    if sys.stdout.isatty() or os.environ.get("COLUMNS"):
        return Console(highlight=False)
    return Console(width=200, highlight=False)


def make_client(resolved: Resolved) -> Client:
    """The API client for a resolved server and token (tests replace this)."""
    from cli.client import Client

    return Client(resolved.server, resolved.token)


# -- errors -------------------------------------------------------------------------------


def fail(message: str, code: int) -> NoReturn:
    """One red line on stderr, then exit with ``code``."""
    err_console.print(f"[red]{escape(message)}[/]")
    sys.exit(code)


def api_failure(exc: ApiError) -> tuple[str, int]:
    """The sentence and exit code for an error answer."""
    detail = "; ".join(exc.lines())
    if exc.status == 401:
        return (
            f"token refused (check --token / FITFLEET_TOKEN / config file): {detail}",
            EXIT_AUTH,
        )
    if exc.status == 403:
        return f"not allowed: {detail}", EXIT_AUTH
    if exc.status == 404:
        if detail in ("Not Found", "not_found", ""):
            # The route itself is missing: an older server, or a wrong --server path.
            return (
                f"the server does not know {exc.path or 'this route'} "
                "(an older fitfleet, or --server is not the API's URL?)",
                EXIT_NOT_FOUND,
            )
        return detail, EXIT_NOT_FOUND
    if exc.status >= 500:
        return f"the server failed (HTTP {exc.status}): {detail}", EXIT_FAILED
    return f"refused (HTTP {exc.status}): {detail}", EXIT_BAD_INPUT


def call_remote(
    server: str | None,
    token: str | None,
    profile: str | None,
    func: Callable[[Client, Resolved], Any],
) -> Any:
    """Resolve the config, open a client, run ``func``; every failure becomes one line."""
    from cli.client import ApiError, ChecksumMismatch, ServerDown

    try:
        resolved = resolve(server, token, profile=profile)
        with make_client(resolved) as api:
            return func(api, resolved)
    except ConfigError as exc:
        fail(str(exc), EXIT_BAD_INPUT)
    except ServerDown as exc:
        fail(str(exc), EXIT_UNREACHABLE)
    except ApiError as exc:
        message, code = api_failure(exc)
        fail(message, code)
    except ChecksumMismatch as exc:
        fail(str(exc), EXIT_FAILED)
    except OSError as exc:  # a download's folder or file cannot be written
        where = f" {exc.filename}" if exc.filename else ""
        fail(f"cannot write{where}: {exc.strerror or exc}", EXIT_FAILED)
    except KeyboardInterrupt:
        err_console.print("[yellow]interrupted[/]")
        sys.exit(EXIT_INTERRUPTED)


def connection_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """--server, --token and --profile."""
    func = click.option(
        "--profile", help="A [profiles.NAME] section of the config file (env FITFLEET_PROFILE)."
    )(func)
    func = click.option(
        "--token", help="Bearer token (else env FITFLEET_TOKEN, else the config file)."
    )(func)
    return click.option(
        "--server",
        help="The API URL (else env FITFLEET_SERVER_URL, else the config file, "
        "else http://127.0.0.1:8000).",
    )(func)


def remote_command(func: Callable[..., Any]) -> Callable[..., Any]:
    """Add the connection options; call ``func(api, **options)`` through :func:`call_remote`."""

    @functools.wraps(func)
    def wrapper(server: str | None, token: str | None, profile: str | None, **kwargs: Any) -> Any:
        return call_remote(server, token, profile, lambda api, _resolved: func(api, **kwargs))

    return connection_options(wrapper)


_json_option = click.option(
    "--json", "as_json", is_flag=True, help="Print the server's JSON on stdout (for scripts)."
)


def print_json(document: Any) -> None:
    """JSON on stdout, nothing else."""
    click.echo(json.dumps(document, indent=2, sort_keys=False))


# -- formatting ---------------------------------------------------------------------------


def fmt_num(value: Any) -> str:
    """A metric or loss: 4 decimals, ``3g`` for very small or large, ``—`` when missing."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—"
    if not isinstance(value, int | float):
        return str(value)
    if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e4):
        return f"{value:.3g}"
    return f"{value:.4f}"


def fmt_time(value: str | None, *, with_date: bool = True) -> str:
    """An ISO timestamp from the server in local time: ``2026-11-30 10:08`` or ``10:08:12``."""
    if not value:
        return "—"
    try:
        moment = datetime.fromisoformat(value).astimezone()
    except ValueError:
        return value
    return moment.strftime("%Y-%m-%d %H:%M" if with_date else "%H:%M:%S")


def fmt_bytes(size: int | None) -> str:
    """1536 -> ``1.5 KiB``."""
    if size is None:
        return "—"
    amount = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if amount < 1024 or unit == "GiB":
            return f"{int(amount)} B" if unit == "B" else f"{amount:.1f} {unit}"
        amount /= 1024
    return f"{size} B"


def state_text(state: str) -> Text:
    """A state in its colour."""
    return Text(state, style=STATE_STYLE.get(state, ""))


def bar(fraction: float, width: int = 12) -> Text:
    """A small text progress bar."""
    fraction = min(max(fraction, 0.0), 1.0)
    filled = round(fraction * width)
    return Text.assemble(("━" * filled, "blue"), ("━" * (width - filled), "grey37"))


def progress_cell(row: Mapping[str, Any]) -> Text:
    """``━━━━━━━━━━ stage-2 3/12 25%`` for a running run; ``3/12`` once it ended."""
    done = int(row.get("epochs_done") or 0)
    total = int(row.get("epochs_total") or 0)
    state = row.get("state", "")
    if state == "running":
        fraction = row.get("progress")
        if fraction is None:
            fraction = done / total if total else 0.0
        stage = row.get("current_stage") or ""
        return Text.assemble(bar(fraction), f" {stage} {done}/{total} {fraction:.0%}".rstrip())
    if state in ("queued", "dispatched"):
        return Text(f"waiting 0/{total}" if total else "waiting", style="dim")
    return Text(f"{done}/{total}" if total else "—")


def main_metric(rows: Iterable[Mapping[str, Any]], sort: str | None) -> str | None:
    """The metric to show: the sort's, else error_rate/accuracy, else any, else valid_loss."""
    if sort:
        key = sort.lstrip("-")
        if ":" in key:
            return key.split(":", 1)[1]
    names: list[str] = []
    for row in rows:
        for name in row.get("metrics") or {}:
            if name not in names:
                names.append(name)
    for preferred in ("error_rate", "accuracy"):
        if preferred in names:
            return preferred
    others = [n for n in names if n not in ("valid_loss", "train_loss")]
    if others:
        return others[0]
    return "valid_loss" if "valid_loss" in names else None


def metric_cell(row: Mapping[str, Any], metric: str | None) -> str:
    """``final / best`` of one metric."""
    if metric is None:
        return "—"
    summary = (row.get("metrics") or {}).get(metric)
    if not summary:
        return "—"
    return f"{fmt_num(summary.get('final'))} / {fmt_num(summary.get('best'))}"


def runs_table(items: list[Mapping[str, Any]], metric: str | None) -> Table:
    """The runs page as a table."""
    table = Table(show_edge=False, pad_edge=False, header_style="bold")
    table.add_column("id", no_wrap=True)
    table.add_column("name", overflow="fold")
    table.add_column("state", no_wrap=True)
    table.add_column("progress", no_wrap=True)
    table.add_column("arch", no_wrap=True)
    table.add_column("dataset", overflow="fold")
    table.add_column(f"{metric or 'metric'} final / best", no_wrap=True, justify="right")
    table.add_column("created", no_wrap=True)
    for row in items:
        table.add_row(
            row["id"],
            row.get("name", ""),
            state_text(row.get("state", "")),
            progress_cell(row),
            row.get("arch", ""),
            row.get("dataset", ""),
            metric_cell(row, metric),
            fmt_time(row.get("created_at")),
        )
    return table


# -- ls -----------------------------------------------------------------------------------


@click.command("ls")
@click.option("--state", help="queued, dispatched, running, succeeded, failed or cancelled.")
@click.option("--project")
@click.option("--tag")
@click.option("--name", help="Substring of the run's name (case-insensitive).")
@click.option("--arch")
@click.option("--dataset")
@click.option("--sweep", help="Only the runs of this sweep.")
@click.option(
    "--sort",
    help="created (default), name, state, best:METRIC or final:METRIC; a leading - reverses.",
)
@click.option("--metric", help="The metric column (default: the sort's, else error_rate).")
@click.option("--limit", type=click.IntRange(1, 200), default=50, show_default=True)
@click.option("--offset", type=click.IntRange(0), default=0, show_default=True)
@_json_option
@remote_command
def ls_command(
    api: Client,
    state: str | None,
    project: str | None,
    tag: str | None,
    name: str | None,
    arch: str | None,
    dataset: str | None,
    sweep: str | None,
    sort: str | None,
    metric: str | None,
    limit: int,
    offset: int,
    as_json: bool,
) -> None:
    """List runs: state, progress, the main metric's final and best value."""
    page = api.runs(
        state=state,
        project=project,
        tag=tag,
        name=name,
        arch=arch,
        dataset=dataset,
        sweep=sweep,
        sort=sort,
        limit=limit,
        offset=offset,
    )
    if as_json:
        print_json(page)
        return
    items = page.get("items", [])
    if not items:
        err_console.print("no runs match")
        return
    out_console().print(runs_table(items, metric or main_metric(items, sort)))
    count = int(page.get("count", len(items)))
    if count > offset + len(items) or offset:
        err_console.print(
            f"[dim]runs {offset + 1}-{offset + len(items)} of {count} "
            "(--limit / --offset for more)[/]"
        )


# -- show ---------------------------------------------------------------------------------


def _optional(call: Callable[[], Any]) -> Any:
    """``call()``, or None when the server has nothing (404) for it."""
    from cli.client import ApiError

    try:
        return call()
    except ApiError as exc:
        if exc.status == 404:
            return None
        raise


def spec_lines(spec: Mapping[str, Any]) -> list[str]:
    """A few lines saying what the spec trains."""
    data = spec.get("data") or {}
    model = spec.get("model") or {}
    lines = [
        f"data     {data.get('source')}  size {data.get('size')}  "
        f"batch {data.get('batch_size')}  augment {_short(data.get('augment'))}",
        f"model    {model.get('arch')}  pretrained {model.get('pretrained')}",
        f"metrics  {', '.join(spec.get('metrics') or []) or '—'}",
    ]
    for index, stage in enumerate(spec.get("stages") or []):
        lr = stage.get("max_lr")
        epochs = stage.get("epochs")
        parts = [
            f"train {stage.get('train')}",
            f"{epochs} epoch{'' if epochs == 1 else 's'}",
            f"max_lr {_short(lr)}",
        ]
        if stage.get("schedule"):
            parts.append(str(stage["schedule"]))
        if stage.get("lr_find"):
            parts.append("lr_find")
        lines.append(f"stage {index}  {stage.get('name')}: " + ", ".join(parts))
    return lines


def _short(value: Any) -> str:
    if isinstance(value, list):
        return "[" + ", ".join(_short(v) for v in value) + "]"
    if isinstance(value, float):
        return f"{value:.3g}"
    if isinstance(value, dict):
        return "custom"
    return str(value)


def epoch_table(rows: list[Mapping[str, Any]], metrics: list[str]) -> Table:
    """fastai's epoch table: stage, epoch, losses, metrics, time."""
    table = Table(show_edge=False, pad_edge=False, header_style="bold")
    for column in ("stage", "epoch", "train_loss", "valid_loss", *metrics, "time"):
        table.add_column(column, justify="left" if column == "stage" else "right")
    for row in rows:
        seconds = float(row.get("seconds") or 0.0)
        minutes, secs = divmod(round(seconds), 60)
        table.add_row(
            str(row.get("stage")),
            str(row.get("epoch")),
            fmt_num(row.get("train_loss")),
            fmt_num(row.get("valid_loss")),
            *(fmt_num((row.get("metrics") or {}).get(m)) for m in metrics),
            f"{minutes:02d}:{secs:02d}",
        )
    return table


@click.command("show")
@click.argument("experiment_id")
@_json_option
@remote_command
def show_command(api: Client, experiment_id: str, as_json: bool) -> None:
    """One run: state, error, spec, epoch table, lr_find, findings, artifacts."""
    run = api.get(experiment_id)
    rows = api.metrics(experiment_id)
    artifacts = _optional(lambda: api.artifacts(experiment_id)) or {"items": [], "count": 0}
    lr_find = _optional(lambda: api.lr_find(experiment_id))
    names = {a.get("name") for a in artifacts.get("items", [])}
    interpretation = (
        _optional(lambda: api.interpretation(experiment_id)) if "report.json" in names else None
    )
    if as_json:
        print_json(
            {
                "experiment": run,
                "metrics": rows,
                "lr_find": lr_find,
                "interpretation": interpretation,
                "artifacts": artifacts,
            }
        )
        return
    out = out_console()
    spec = run.get("spec") or {}
    header = Text.assemble(
        (run["id"], "bold"), "  ", run.get("name", ""), "  ", state_text(run.get("state", ""))
    )
    out.print(header)
    out.print(
        f"project {run.get('project')}  attempt {run.get('attempt')}  "
        f"queue {run.get('queue')}  tags {', '.join(run.get('tags') or []) or '—'}"
    )
    out.print(
        f"created {fmt_time(run.get('created_at'))}  started {fmt_time(run.get('started_at'))}"
        f"  finished {fmt_time(run.get('finished_at'))}"
    )
    if run.get("state") == "running":
        out.print(f"now      {run.get('current_stage')} epoch {run.get('current_epoch')}")
    if run.get("cancel_requested") and run.get("state") not in TERMINAL_STATES:
        out.print("[yellow]cancel requested: the worker stops at the next batch[/]")
    if run.get("waiting_reason"):
        out.print(f"[yellow]waiting: {escape(run['waiting_reason'])}[/]")
    if run.get("error"):
        out.print(f"[red]error: {escape(run['error'])}[/]")
    out.print()
    for line in spec_lines(spec):
        out.print(escape(line))
    out.print()
    if rows:
        metric_names = list(spec.get("metrics") or [])
        for row in rows:
            for name in row.get("metrics") or {}:
                if name not in metric_names:
                    metric_names.append(name)
        out.print(epoch_table(rows, metric_names))
    else:
        out.print("[dim]no epochs yet[/]")
    for stage in (lr_find or {}).get("stages", []):
        suggestion = stage.get("suggestion")
        if suggestion is None:
            points = len(stage.get("points") or [])
            out.print(f"lr_find  {stage.get('stage')}: no suggestion ({points} points)")
        else:
            out.print(
                f"lr_find  {stage.get('stage')}: suggested lr {suggestion:.3g}"
                + (f" ({stage['method']})" if stage.get("method") else "")
            )
    if interpretation is not None:
        findings = interpretation.get("findings") or []
        out.print("\n[bold]findings[/]")
        if not findings:
            out.print("  none: the run looks healthy")
        for finding in findings:
            severity = str(finding.get("severity", "")).upper()
            out.print(f"  {severity:8} {escape(str(finding.get('message', '')))}")
    items = artifacts.get("items", [])
    if items:
        out.print("\n[bold]artifacts[/]")
        table = Table(show_edge=False, pad_edge=False, header_style="bold")
        for column in ("name", "kind", "size", "sha256"):
            table.add_column(column, justify="right" if column == "size" else "left")
        for item in items:
            table.add_row(
                item["name"], item.get("kind", ""), fmt_bytes(item.get("bytes")),
                str(item.get("sha256", ""))[:12],
            )  # fmt: skip
        out.print(table)


# -- watch --------------------------------------------------------------------------------


def epochs_of(run: Mapping[str, Any]) -> tuple[int, int, str | None]:
    """(epochs done, epochs in the spec, current stage) from one run as ``get`` returns it."""
    stages = (run.get("spec") or {}).get("stages") or []
    total = sum(int(s.get("epochs") or 0) for s in stages)
    if run.get("state") == "succeeded":
        return total, total, run.get("current_stage")
    latest = run.get("latest_metrics") or None
    stage = run.get("current_stage")
    if not latest:
        return 0, total, stage
    names = [s.get("name") for s in stages]
    done = int(latest.get("epoch", 0)) + 1
    if latest.get("stage") in names:
        index = names.index(latest.get("stage"))
        done += sum(int(s.get("epochs") or 0) for s in stages[:index])
    return min(done, total) if total else done, total, stage or latest.get("stage")


def latest_line(run: Mapping[str, Any]) -> str:
    """``valid_loss 0.2301  error_rate 0.0500`` from the latest epoch row."""
    latest = run.get("latest_metrics") or {}
    if not latest:
        return ""
    parts = [f"valid_loss {fmt_num(latest.get('valid_loss'))}"]
    for name, value in sorted((latest.get("metrics") or {}).items()):
        parts.append(f"{name} {fmt_num(value)}")
    return "  ".join(parts)


#: How long ``watch`` and ``logs --follow`` keep retrying a server that stopped answering.
RIDE_OUT_S = 60.0


class RideOut:
    """Retry polls while the server is briefly gone (a restart, a deploy); give up after a while.

    ``attempt(call)`` returns True when ``call`` ran, False when the server was
    unreachable or failed (5xx) and there is still time to wait; past
    :data:`RIDE_OUT_S` of failures it raises the last error.
    """

    def __init__(self, limit_s: float = RIDE_OUT_S) -> None:
        self.limit_s = limit_s
        self.down_since: float | None = None

    def attempt(self, call: Callable[[], None]) -> bool:
        from cli.client import ApiError, ServerDown

        try:
            call()
        except (ServerDown, ApiError) as exc:
            if isinstance(exc, ApiError) and exc.status < 500:
                raise
            now = time.monotonic()
            if self.down_since is None:
                self.down_since = now
                err_console.print(f"[yellow]server not answering ({_first_line(exc)}); retrying[/]")
            if now - self.down_since > self.limit_s:
                raise
            return False
        if self.down_since is not None:
            self.down_since = None
            err_console.print("[green]server back[/]")
        return True


def _first_line(exc: Exception) -> str:
    return escape(str(exc).split(";", 1)[0])


def _watch_ids(api: Client) -> list[str]:
    ids: list[str] = []
    for state in ACTIVE_STATES:
        for row in api.runs(state=state, limit=200).get("items", []):
            if row["id"] not in ids:
                ids.append(row["id"])
    return ids


@click.command("watch")
@click.argument("experiment_ids", nargs=-1)
@click.option("--poll", default=2.0, show_default=True, help="Seconds between checks.")
@remote_command
def watch_command(api: Client, experiment_ids: tuple[str, ...], poll: float) -> None:
    """Live progress bars for runs until they end (default: every queued or running run).

    Exits 0 when every run succeeded, 1 otherwise. Without a terminal it
    prints a plain line whenever a run moves.
    """
    ids = list(dict.fromkeys(experiment_ids)) or _watch_ids(api)
    if not ids:
        err_console.print("nothing to watch: no queued or running runs")
        return
    out = out_console()
    runs: dict[str, Mapping[str, Any]] = {}

    ride_out = RideOut()

    def fetch() -> None:
        for run_id in ids:
            if run_id in runs and runs[run_id].get("state") in TERMINAL_STATES:
                continue
            runs[run_id] = api.get(run_id)

    def poll_once() -> None:
        ride_out.attempt(fetch)

    def finished() -> bool:
        return all(runs[i].get("state") in TERMINAL_STATES for i in ids)

    fetch()  # the first answer must come at once: a wrong id or URL fails here
    if out.is_terminal:
        _watch_live(out, ids, runs, poll_once, finished, poll)
    else:
        _watch_plain(ids, runs, poll_once, finished, poll)
    failed = [i for i in ids if runs[i].get("state") != "succeeded"]
    for run_id in ids:
        run = runs[run_id]
        line = Text.assemble(run_id, " ", run.get("name", ""), " ", state_text(run["state"]))
        if run.get("error"):
            line.append(f"  {run['error']}", style="red")
        out.print(line)
    sys.exit(EXIT_FAILED if failed else EXIT_OK)


def _watch_live(
    out: Console,
    ids: list[str],
    runs: dict[str, Mapping[str, Any]],
    poll_once: Callable[[], None],
    finished: Callable[[], bool],
    poll: float,
) -> None:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    with Progress(
        TextColumn("{task.description}"),
        BarColumn(complete_style="blue", finished_style="green"),
        MofNCompleteColumn(),
        TextColumn("{task.fields[state]}"),
        TextColumn("{task.fields[stage]}"),
        TextColumn("{task.fields[latest]}"),
        console=out,
    ) as progress:
        tasks = {
            run_id: progress.add_task(
                f"{run_id} {runs[run_id].get('name', '')}", total=None, state="", stage="",
                latest="",
            )
            for run_id in ids
        }  # fmt: skip

        def render() -> None:
            for run_id, task in tasks.items():
                run = runs[run_id]
                done, total, stage = epochs_of(run)
                style = STATE_STYLE.get(run.get("state", ""), "")
                progress.update(
                    task,
                    total=total or None,
                    completed=done,
                    state=f"[{style}]{run.get('state')}[/]" if style else run.get("state"),
                    stage=escape(stage or ""),
                    latest=latest_line(run),
                )

        render()
        while not finished():
            time.sleep(poll)
            poll_once()
            render()


def _watch_plain(
    ids: list[str],
    runs: dict[str, Mapping[str, Any]],
    poll_once: Callable[[], None],
    finished: Callable[[], bool],
    poll: float,
) -> None:
    shown: dict[str, tuple[Any, ...]] = {}

    def report() -> None:
        for run_id in ids:
            run = runs[run_id]
            done, total, stage = epochs_of(run)
            key = (run.get("state"), done, stage)
            if shown.get(run_id) == key:
                continue
            shown[run_id] = key
            parts = [run_id, str(run.get("state")), f"{done}/{total}"]
            if stage:
                parts.append(stage)
            latest = latest_line(run)
            if latest:
                parts.append(latest)
            click.echo("  ".join(parts))

    report()
    while not finished():
        time.sleep(poll)
        poll_once()
        report()


# -- logs ---------------------------------------------------------------------------------


def event_line(event: Mapping[str, Any]) -> Text:
    """``10:08:12 run.claimed     claimed by worker w1  (worker:w1)``."""
    line = Text.assemble(
        (fmt_time(event.get("created_at"), with_date=False), "dim"),
        " ",
        (f"{event.get('kind', ''):<22}", "cyan"),
        " ",
        str(event.get("message", "")),
    )
    if event.get("actor"):
        line.append(f"  ({event['actor']})", style="dim")
    return line


@click.command("logs")
@click.argument("experiment_id")
@click.option("-f", "--follow", is_flag=True, help="Keep printing new events until the run ends.")
@click.option("--poll", default=2.0, show_default=True, help="Seconds between checks (--follow).")
@_json_option
@remote_command
def logs_command(api: Client, experiment_id: str, follow: bool, poll: float, as_json: bool) -> None:
    """A run's events: submitted, claimed, stages, retries, cancel, finish.

    With --json: the EventList; with --json --follow: one event per line.
    With --follow the exit code says how the run ended (0 succeeded, 1 not).
    """
    after: int | None = None
    collected: list[Any] = []
    out = out_console()

    def drain() -> None:
        nonlocal after
        while True:
            page = api.events(experiment_id, after=after)
            items = page.get("items", [])
            for event in items:
                if follow and as_json:
                    click.echo(json.dumps(event))
                elif as_json:
                    collected.append(event)
                else:
                    out.print(event_line(event))
            last = page.get("last_id")
            if last is None and items:
                last = items[-1].get("id")
            if not items or last is None or last == after:
                return
            after = last

    if not follow:
        api.get(experiment_id)  # a clear "no experiment" rather than an empty list
        drain()
        if as_json:
            print_json({"items": collected, "last_id": after})
        return
    state: str | None = None

    def check() -> None:
        nonlocal state
        state = api.get(experiment_id).get("state")

    check()  # the first answer must come at once: a wrong id or URL fails here
    ride_out = RideOut()
    while True:
        # The state is read before the events, so once it is final every event is in.
        if ride_out.attempt(drain) and state in TERMINAL_STATES:
            sys.exit(EXIT_OK if state == "succeeded" else EXIT_FAILED)
        time.sleep(poll)
        ride_out.attempt(check)


# -- cancel -------------------------------------------------------------------------------


@click.command("cancel")
@click.argument("experiment_ids", nargs=-1, required=True)
@remote_command
def cancel_command(api: Client, experiment_ids: tuple[str, ...]) -> None:
    """Cancel queued runs now; ask running ones to stop at the next batch."""
    from cli.client import ApiError

    code = EXIT_OK
    for run_id in experiment_ids:
        try:
            run = api.cancel(run_id)
        except ApiError as exc:
            if exc.status in (401, 403):
                raise
            message, status_code = api_failure(exc)
            if exc.status == 409:
                detail = "; ".join(exc.lines())
                message = detail if run_id in detail else f"{run_id}: {detail}"
            err_console.print(f"[red]{escape(message)}[/]")
            code = code or status_code
            continue
        if run.get("state") == "cancelled":
            click.echo(f"{run_id} cancelled")
        else:
            click.echo(f"{run_id} cancel requested ({run.get('state')}: stops at the next batch)")
    sys.exit(code)


# -- compare ------------------------------------------------------------------------------


def _cell(value: Any) -> str:
    if isinstance(value, dict | list):
        return json.dumps(value)
    return str(value)


def comparison_tables(comparison: Mapping[str, Any]) -> list[Table | Text]:
    """What differs in the specs, then final and best metrics side by side."""
    runs = comparison.get("runs", [])
    heads = [f"{r['experiment'].get('name', '')}\n{r['experiment']['id']}" for r in runs]
    differences = comparison.get("spec_differences") or {}
    parts: list[Table | Text] = []
    if differences:
        table = Table(title="spec fields that differ", show_edge=False, header_style="bold")
        table.add_column("field", style="bold")
        for head in heads:
            table.add_column(head, overflow="fold")
        for path, per_run in differences.items():
            table.add_row(path, *(_cell(v) for v in per_run))
        parts.append(table)
    else:
        parts.append(Text("the specs are the same (apart from their names)", style="dim"))
    metrics: list[str] = []
    for run in runs:
        final = run.get("final") or {}
        for name in ["valid_loss", "train_loss", *(final.get("metrics") or {}), *run["best"]]:
            if name not in metrics:
                metrics.append(name)
    table = Table(title="metrics (final / best)", show_edge=False, header_style="bold")
    table.add_column("metric", style="bold")
    for head in heads:
        table.add_column(head, justify="right")
    table.add_row("state", *(state_text(r["experiment"].get("state", "")) for r in runs))
    table.add_row("epochs", *(str(len(r.get("epochs") or [])) for r in runs))
    for name in metrics:
        for kind in ("final", "best"):
            values: list[float | None] = []
            for run in runs:
                if kind == "best":
                    values.append((run.get("best") or {}).get(name))
                else:
                    final = run.get("final") or {}
                    values.append(
                        final.get(name)
                        if name in ("valid_loss", "train_loss")
                        else (final.get("metrics") or {}).get(name)
                    )
            present = [v for v in values if isinstance(v, int | float) and math.isfinite(v)]
            winner = (max if name in HIGHER_IS_BETTER else min)(present) if present else None
            cells = [
                Text(fmt_num(v), style="bold green" if v == winner and len(present) > 1 else "")
                for v in values
            ]
            table.add_row(f"{kind} {name}", *cells)
    parts.append(table)
    return parts


@click.command("compare")
@click.argument("experiment_ids", nargs=-1)
@click.option("--sweep", help="Compare every run of this sweep.")
@_json_option
@remote_command
def compare_command(
    api: Client, experiment_ids: tuple[str, ...], sweep: str | None, as_json: bool
) -> None:
    """Runs side by side: only the spec fields that differ, then final and best metrics."""
    if sweep and experiment_ids:
        fail("give run ids or --sweep, not both", EXIT_BAD_INPUT)
    if not sweep and len(experiment_ids) < 2:
        fail("compare needs at least two run ids (or --sweep S)", EXIT_BAD_INPUT)
    comparison = api.compare(list(experiment_ids) if not sweep else None, sweep=sweep)
    if as_json:
        print_json(comparison)
        return
    out = out_console()
    for part in comparison_tables(comparison):
        out.print(part)
        out.print()


# -- artifacts ----------------------------------------------------------------------------


@click.group("artifacts")
def artifacts_group() -> None:
    """List and download a run's files (checkpoints, plots, report.json)."""


@artifacts_group.command("ls")
@click.argument("experiment_id")
@_json_option
@remote_command
def artifacts_ls(api: Client, experiment_id: str, as_json: bool) -> None:
    """Every file a run produced: name, kind, size, sha256."""
    listing = api.artifacts(experiment_id)
    if as_json:
        print_json(listing)
        return
    items = listing.get("items", [])
    if not items:
        err_console.print(f"{experiment_id} has no artifacts yet")
        return
    table = Table(show_edge=False, pad_edge=False, header_style="bold")
    for column in ("name", "kind", "size", "sha256", "created"):
        table.add_column(column, justify="right" if column == "size" else "left", no_wrap=True)
    for item in items:
        table.add_row(
            item["name"],
            item.get("kind", ""),
            fmt_bytes(item.get("bytes")),
            str(item.get("sha256", "")),
            fmt_time(item.get("created_at")),
        )
    out_console().print(table)


def local_path(out_dir: Path, name: str) -> Path:
    """Where artifact ``name`` goes under ``out_dir``; names that would escape it are refused."""
    relative = PurePosixPath(name)
    if relative.is_absolute() or ".." in relative.parts or not relative.parts:
        fail(f"refusing to write artifact {name!r} outside {out_dir}", EXIT_FAILED)
    return out_dir.joinpath(*relative.parts)


@contextlib.contextmanager
def _download_progress(total: int) -> Iterator[Callable[[int], None] | None]:
    """A bytes bar on stderr when it is a terminal; nothing otherwise."""
    if not err_console.is_terminal:
        yield None
        return
    from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

    with Progress(
        BarColumn(), DownloadColumn(), TransferSpeedColumn(), console=err_console, transient=True
    ) as progress:
        task = progress.add_task("download", total=total or None)
        yield lambda n: progress.advance(task, n)


@artifacts_group.command("get")
@click.argument("experiment_id")
@click.argument("names", nargs=-1)
@click.option(
    "-o",
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Folder to write into (default: ./EXPERIMENT_ID).",
)
@click.option(
    "--kind",
    "kinds",
    multiple=True,
    help="Only artifacts of this kind (plot, report, checkpoint, ...; repeatable).",
)
@_json_option
@remote_command
def artifacts_get(
    api: Client,
    experiment_id: str,
    names: tuple[str, ...],
    out_dir: Path | None,
    kinds: tuple[str, ...],
    as_json: bool,
) -> None:
    """Download NAMES (default: every artifact); each file's sha256 is checked. Prints paths."""
    listing = {item["name"]: item for item in api.artifacts(experiment_id).get("items", [])}
    wanted = list(dict.fromkeys(names)) or list(listing)
    if kinds:
        wanted = [n for n in wanted if n not in listing or listing[n].get("kind") in kinds]
    missing = [n for n in wanted if n not in listing]
    if missing:
        known = ", ".join(listing) or "none yet"
        fail(
            f"{experiment_id} has no artifact {', '.join(missing)} (it has: {known})",
            EXIT_NOT_FOUND,
        )
    if not wanted:
        err_console.print(f"{experiment_id} has no artifacts yet")
        return
    folder = out_dir if out_dir is not None else Path(experiment_id)
    targets = {name: local_path(folder, name) for name in wanted}
    done: list[dict[str, Any]] = []
    with _download_progress(sum(int(listing[n].get("bytes") or 0) for n in wanted)) as advance:
        for name in wanted:
            got = api.download_artifact(
                experiment_id,
                name,
                targets[name],
                expected_sha256=listing[name].get("sha256"),
                on_bytes=advance,
            )
            done.append(
                {"name": name, "path": str(got.path), "bytes": got.bytes, "sha256": got.sha256}
            )
            if not as_json:
                click.echo(str(got.path))
    if as_json:
        print_json({"items": done})
    else:
        total = sum(d["bytes"] for d in done)
        err_console.print(f"[dim]{len(done)} files, {fmt_bytes(total)}, sha256 checked[/]")


# -- leaderboard, datasets, failures ------------------------------------------------------


@click.command("leaderboard")
@click.option("--metric", required=True, help="error_rate, accuracy, valid_loss, ...")
@click.option("--dataset")
@click.option("--sweep")
@click.option("--state", help="Only runs in this state (e.g. succeeded).")
@click.option("--limit", type=click.IntRange(1, 200), default=20, show_default=True)
@_json_option
@remote_command
def leaderboard_command(
    api: Client,
    metric: str,
    dataset: str | None,
    sweep: str | None,
    state: str | None,
    limit: int,
    as_json: bool,
) -> None:
    """Runs of a dataset or a sweep ranked by the best value of a metric."""
    if (dataset is None) == (sweep is None):
        fail("leaderboard needs --dataset D or --sweep S (one of them)", EXIT_BAD_INPUT)
    board = api.leaderboard(metric, dataset=dataset, sweep=sweep, state=state, limit=limit)
    if as_json:
        print_json(board)
        return
    entries = board.get("entries", [])
    if not entries:
        err_console.print("no runs with that metric")
        return
    direction = "higher" if board.get("higher_is_better") else "lower"
    table = Table(
        title=f"{metric} on {dataset or 'sweep ' + str(sweep)} ({direction} is better)",
        show_edge=False,
        header_style="bold",
    )
    for column in ("#", "id", "name", "best", "at", "final", "arch", "state"):
        table.add_column(column, justify="right" if column in ("#", "best", "final") else "left")
    for entry in entries:
        run = entry.get("run", {})
        where = f"{entry.get('best_stage') or ''} {entry.get('best_epoch', '')}".strip()
        table.add_row(
            str(entry.get("rank")),
            run.get("id", ""),
            run.get("name", ""),
            fmt_num(entry.get("best")),
            where,
            fmt_num(entry.get("final")),
            run.get("arch", ""),
            state_text(run.get("state", "")),
        )
    out_console().print(table)


@click.command("datasets")
@_json_option
@remote_command
def datasets_command(api: Client, as_json: bool) -> None:
    """Datasets your runs used, how many runs each, and the metrics they logged."""
    listing = api.datasets()
    if as_json:
        print_json(listing)
        return
    table = Table(show_edge=False, pad_edge=False, header_style="bold")
    for column in ("dataset", "runs", "metrics"):
        table.add_column(column, justify="right" if column == "runs" else "left")
    for item in listing.get("items", []):
        table.add_row(item["dataset"], str(item.get("runs")), ", ".join(item.get("metrics", [])))
    out_console().print(table)


@click.command("failures")
@click.option("--project")
@click.option("--limit", type=click.IntRange(1, 200))
@_json_option
@remote_command
def failures_command(api: Client, project: str | None, limit: int | None, as_json: bool) -> None:
    """Failed runs grouped by reason, largest group first."""
    listing = api.failures(project=project, limit=limit)
    if as_json:
        print_json(listing)
        return
    groups = listing.get("groups", [])
    if not groups:
        err_console.print("no failed runs")
        return
    out = out_console()
    for group in groups:
        out.print(
            f"[bold red]{group.get('count')}×[/] {escape(str(group.get('reason')))}  "
            f"[dim](last {fmt_time(group.get('last_at'))})[/]"
        )
        out.print(f"   e.g. {escape(str(group.get('example')))}")
        out.print(f"   runs {', '.join(group.get('experiment_ids', []))}", highlight=False)


# -- sweeps -------------------------------------------------------------------------------


def parse_choice(option: str, text: str) -> tuple[str, list[Any]]:
    """``stages.0.max_lr=1e-3,3e-3`` -> (path, [0.001, 0.003]); values are YAML scalars."""
    path, sep, values = text.partition("=")
    if not sep or not path.strip() or not values.strip():
        fail(
            f"{option} {text!r}: write PATH=V1,V2,... (e.g. model.arch=resnet18,resnet34)",
            EXIT_BAD_INPUT,
        )
    return path.strip(), [scalar(v.strip()) for v in values.split(",")]


def scalar(text: str) -> Any:
    """``3`` -> 3, ``1e-3`` -> 0.001 (YAML 1.1 would keep it a string), else YAML's reading."""
    import yaml

    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return yaml.safe_load(text)


def parse_random(text: str) -> tuple[str, Any]:
    """``PATH=LOW..HIGH[:log][:int]`` -> a range; ``PATH=A,B`` -> choices."""
    path, _, values = text.partition("=")
    if ".." not in values:
        return parse_choice("--random", text)
    bounds, *flags = values.split(":")
    low_text, _, high_text = bounds.partition("..")
    try:
        low, high = float(low_text), float(high_text)
    except ValueError:
        fail(f"--random {text!r}: write PATH=LOW..HIGH[:log][:int]", EXIT_BAD_INPUT)
    unknown = [f for f in flags if f not in ("log", "int")]
    if unknown or not path.strip():
        fail(f"--random {text!r}: flags are :log and :int", EXIT_BAD_INPUT)
    return path.strip(), {
        "low": low,
        "high": high,
        "log": "log" in flags,
        "integer": "int" in flags,
    }


@click.command("sweep")
@click.argument("spec_file", type=click.Path(path_type=Path))
@click.option("--grid", "grid", multiple=True, help="PATH=V1,V2,... every combination.")
@click.option(
    "--random", "randoms", multiple=True, help="PATH=V1,V2 or PATH=LOW..HIGH[:log][:int]."
)
@click.option("--count", type=click.IntRange(1), help="How many random trials.")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the random draws.")
@click.option("--name", help="The sweep's name (default: the spec's).")
@_json_option
@remote_command
def sweep_command(
    api: Client,
    spec_file: Path,
    grid: tuple[str, ...],
    randoms: tuple[str, ...],
    count: int | None,
    seed: int,
    name: str | None,
    as_json: bool,
) -> None:
    """Expand SPEC_FILE over --grid or --random choices into one run per trial."""
    import yaml

    from shared.errors import InvalidSpec
    from shared.spec_io import load_spec_file

    if bool(grid) == bool(randoms):
        fail("give --grid PATH=V1,V2 ... or --random PATH=... --count N", EXIT_BAD_INPUT)
    if randoms and count is None:
        fail("--random needs --count N", EXIT_BAD_INPUT)
    try:
        load_spec_file(spec_file)
    except InvalidSpec as exc:
        err_console.print(f"[red]{spec_file}: invalid spec ({len(exc.problems)} problems)[/]")
        for problem in exc.problems:
            err_console.print(f"  {problem.path}: {problem.message}")
        sys.exit(EXIT_BAD_INPUT)
    document = yaml.safe_load(spec_file.read_text(encoding="utf-8"))
    parameters = dict(parse_choice("--grid", g) for g in grid) if grid else {}
    if randoms:
        parameters = dict(parse_random(r) for r in randoms)
    created = api.create_sweep(
        name or str(document.get("name") or spec_file.stem),
        document,
        parameters,
        strategy="grid" if grid else "random",
        count=count,
        seed=seed,
    )
    if as_json:
        print_json(created)
        return
    click.echo(f"sweep {created['id']}: {created.get('count')} runs")
    table = Table(show_edge=False, pad_edge=False, header_style="bold")
    paths = list(parameters)
    table.add_column("run")
    for path in paths:
        table.add_column(path)
    for trial in created.get("trials", []):
        values = trial.get("values", {})
        table.add_row(trial["experiment_id"], *(_cell(values.get(p)) for p in paths))
    out_console().print(table)
    err_console.print(
        f"[dim]follow them: fitfleet watch; rank them: "
        f"fitfleet leaderboard --sweep {created['id']} --metric METRIC[/]"
    )


# -- token whoami / save ------------------------------------------------------------------


@click.command("whoami")
@_json_option
@connection_options
def token_whoami(as_json: bool, server: str | None, token: str | None, profile: str | None) -> None:
    """Ask the server who the token is (GET /v1/me), and say where it came from."""

    def ask(api: Client, resolved: Resolved) -> None:
        if resolved.token is None:
            fail(
                "no token: pass --token, set FITFLEET_TOKEN, or run `fitfleet token save TOKEN`",
                EXIT_AUTH,
            )
        me = api.me()
        if as_json:
            print_json({**me, "server": resolved.server})
            return
        who = "admin: every project" if me.get("is_admin") else f"project {me.get('project')}"
        click.echo(f"token {me.get('token_id')} ({who}) at {resolved.server}")
        err_console.print(
            f"[dim]server from {resolved.sources.get('server')}, "
            f"token from {resolved.sources.get('token')}[/]"
        )

    call_remote(server, token, profile, ask)


@click.command("save")
@click.argument("secret", metavar="TOKEN")
@click.option("--server", help="Also save the server URL.")
@click.option("--profile", help="Save into [profiles.NAME] instead of the top level.")
def token_save(secret: str, server: str | None, profile: str | None) -> None:
    """Write TOKEN (``-``: read it from stdin) to the config file, readable only by you."""
    from cli.config import SERVER_ENV, TOKEN_ENV, save

    if secret == "-":
        secret = sys.stdin.readline().strip()
    if not secret:
        fail("the token is empty", EXIT_BAD_INPUT)
    try:
        path = save(token=secret, server=server.rstrip("/") if server else None, profile=profile)
    except ConfigError as exc:
        fail(str(exc), EXIT_BAD_INPUT)
    where = f" [profiles.{profile}]" if profile else ""
    click.echo(f"saved to {path}{where} (mode 600)")
    for name in (TOKEN_ENV, SERVER_ENV):
        if os.environ.get(name):
            err_console.print(f"[yellow]note: {name} is set and wins over the config file[/]")


COMMANDS: list[click.Command] = [
    ls_command,
    show_command,
    watch_command,
    logs_command,
    cancel_command,
    compare_command,
    artifacts_group,
    leaderboard_command,
    datasets_command,
    failures_command,
    sweep_command,
]
TOKEN_COMMANDS: list[click.Command] = [token_whoami, token_save]
