"""The whole service on real parts, with real finished runs, for end-to-end tests.

CLI and dashboard tests need what a user sees after a day's work: a server to
talk to, a fleet that is alive, runs that succeeded (epoch rows, plots,
reports in S3) and one that failed. Faking any of it would test the fakes, so
:func:`start_live_stack` brings up

* a fresh, migrated Postgres database (:func:`tests.integration.pg.temporary_database`),
* a bucket on the session's moto S3 server as the artifact store,
* a Redis broker with a queue of this session only (concurrent sessions on
  one Redis must never take each other's messages),
* the API as a real subprocess (``python -m cli api``), ready on ``/readyz``,
* real ``celery worker`` subprocesses, heartbeating into the database and
  left running for the whole session (a fleet page lists them live),
* the dispatcher (relay, lease reconciler) as a thread, so runs that tests
  submit later are trained too,

then submits three small two-stage runs and one that diverges over HTTP and
waits for them to end. Everything is torn down by SIGKILLing each process tree
(:func:`tests.faults.harness.kill_tree`) and dropping the database.

Runs submitted by tests must name :attr:`LiveStack.queue` in
``resources.queue`` (use :meth:`LiveStack.spec`): the workers listen on this
session's queue only, not the spec's default ``gpu``.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from sqlalchemy import Engine

from services.api.tokens import create_token
from shared.db.session import make_engine, session_scope
from shared.settings import Settings
from tests.faults.harness import Dispatcher, kill_tree
from tests.integration.celery_worker import celery_worker, redis_or_fail, unique_queue
from tests.integration.moto_server import S3Endpoint
from tests.integration.pg import temporary_database

REPO = Path(__file__).resolve().parents[3]

logger = logging.getLogger(__name__)

#: Redis db 10 is used by no other test (faults: 15, flow: 13, bench: 11-14).
REDIS_URL = os.environ.get("FITFLEET_TEST_E2E_REDIS_URL", "redis://127.0.0.1:6379/10")

#: The project the finished runs belong to; ``project_token`` is scoped to it.
PROJECT = "vision"

#: States after which a run never changes again (as ``cli.client.TERMINAL``).
TERMINAL = frozenset({"succeeded", "failed", "cancelled"})

#: The three succeeded runs: (name, stage-2 max_lr, batch size). All run the LR
#: finder before stage 2. The first two differ in one spec field (the learning
#: rate), so comparing them shows exactly that; the third also has a larger batch.
#: The CLI and dashboard tests rely on these names, values and differences.
GOOD_RUNS: tuple[tuple[str, float, int], ...] = (
    ("e2e-lr-1e-3", 1e-3, 32),
    ("e2e-lr-3e-3", 3e-3, 32),
    ("e2e-lr-1e-2-bs64", 1e-2, 64),
)

#: Generous: on a loaded 2-core machine (other stacks, test sessions) setup's four
#: runs have taken 4 minutes, against well under one when the machine is idle.
API_READY_TIMEOUT_S = 120.0
WORKERS_LISTED_TIMEOUT_S = 120.0
RUNS_TIMEOUT_S = 600.0

#: Inherited variables that must not reach the subprocesses: a developer's own
#: fitfleet or AWS settings, or a proxy that would intercept loopback.
_SCRUBBED_PREFIXES = ("FITFLEET_", "AWS_")
_SCRUBBED_NAMES = frozenset(
    {"http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"}
)


def spec(
    name: str,
    *,
    queue: str,
    project: str = PROJECT,
    max_lr: float = 3e-3,
    batch_size: int = 32,
    lr_find: bool = True,
    head_lr: float = 1e-2,
) -> dict[str, Any]:
    """A small two-stage digits spec (head 1 epoch, then all 1 epoch), seconds on a CPU.

    The notes' recipe at its smallest: 16 px digits 3 vs 7, resnet18 from
    scratch with a 64-wide head, ``lr_find`` before stage 2 (40 iterations:
    enough left, after fastai trims 10 + 5 points, for a "steep" suggestion) and
    every interpretation output, so the runs have every artifact a page shows.
    """
    stage_2: dict[str, Any] = {"name": "stage-2", "train": "all", "epochs": 1, "max_lr": max_lr}
    if lr_find:
        stage_2["lr_find"] = {"num_it": 40}
    return {
        "version": 1,
        "name": name,
        "project": project,
        "tags": ["e2e"],
        "seed": 1,
        "data": {
            "source": "digits",
            "size": 16,
            "batch_size": batch_size,
            "augment": {"flip": False},
            "normalize": "dataset",
        },
        "model": {"arch": "resnet18", "pretrained": "none", "head": {"lin_ftrs": [64]}},
        "metrics": ["error_rate", "accuracy"],
        "stages": [
            {"name": "stage-1", "train": "head", "epochs": 1, "max_lr": head_lr},
            stage_2,
        ],
        "interpret": {
            "show_batch": {"rows": 2},
            "top_losses": 4,
            "confusion_matrix": True,
            "most_confused_min": 1,
        },
        "resources": {"queue": queue, "gpus": 0, "timeout": "10m"},
    }


def tail(path: Path, chars: int = 3000) -> str:
    """The end of a log file, or a note that there is none (for failure messages)."""
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return "(no log)"


def logs_in(log_dir: Path) -> str:
    """The tail of every ``*.log`` in ``log_dir``, each under its name."""
    return "\n".join(f"--- {log.name}\n{tail(log)}" for log in sorted(log_dir.glob("*.log")))


@dataclass(frozen=True)
class LiveStack:
    """A running service and what it holds once set up; see the module docstring.

    The lists are never changed after setup; they are lists (not tuples)
    because that is what tests compare them with.
    """

    url: str  #: base URL of the API server, e.g. ``http://127.0.0.1:40123``
    admin_token: str
    project_token: str  #: scoped to :data:`PROJECT` ("vision")
    project: str
    database_url: str
    engine: Engine  #: on ``database_url``; disposed at teardown
    broker_url: str
    queue: str  #: the only queue the workers listen on
    artifacts_url: str  #: ``s3://<bucket>/fitfleet``
    s3: S3Endpoint
    data_root: Path  #: holds ``digits`` (the runs' data source)
    env: dict[str, str]  #: a complete environment for ``python -m cli ...``
    run_ids: list[str]  #: the three succeeded runs, in :data:`GOOD_RUNS` order
    failed_run_id: str
    worker_names: list[str]
    log_dir: Path  #: api.log and worker-*.log
    setup_s: float = field(compare=False)  #: how long bringing it up took (seconds)
    #: seconds from the start until: api_ready, submitted, workers_listed, runs_finished
    timings: dict[str, float] = field(compare=False, default_factory=dict)

    def headers(self, token: str | None = None) -> dict[str, str]:
        """``Authorization`` for ``token`` (default: the admin token)."""
        return {"Authorization": f"Bearer {token or self.admin_token}"}

    def client(self, token: str | None = None) -> httpx.Client:
        """An HTTP client on the server (admin token by default); close it (``with``)."""
        # trust_env=False: a developer's proxy settings must not intercept loopback.
        return httpx.Client(
            base_url=self.url, headers=self.headers(token), timeout=30.0, trust_env=False
        )

    def spec(self, name: str, **changes: Any) -> dict[str, Any]:
        """:func:`spec` on this stack's queue: a run the workers will pick up."""
        return spec(name, queue=self.queue, **changes)

    def write_spec(self, path: Path, name: str, **changes: Any) -> Path:
        """:meth:`spec` as a YAML file, for ``fitfleet submit``."""
        path.write_text(yaml.safe_dump(self.spec(name, **changes), sort_keys=False))
        return path

    def cli(
        self, *args: str, timeout: float = 120.0, env: Mapping[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        """``python -m cli ARGS`` against this server (admin token), output captured."""
        return subprocess.run(
            [sys.executable, "-m", "cli", *args],
            cwd=REPO,
            env={**self.env, **(env or {})},
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def wait_finished(self, run_id: str, timeout: float = RUNS_TIMEOUT_S) -> dict[str, Any]:
        """Poll the run until it ends; its final ``GET /v1/experiments/{id}`` body."""
        with self.client() as http:
            return _wait_terminal(http, [run_id], timeout, self.logs)[run_id]

    def logs(self) -> str:
        """The tail of every subprocess log, for assertion messages."""
        return logs_in(self.log_dir)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _base_environ() -> dict[str, str]:
    """This process's environment without anything that could point a subprocess elsewhere."""
    return {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(_SCRUBBED_PREFIXES) and key not in _SCRUBBED_NAMES
    }


def _readyz(url: str) -> str | None:
    """None when ``/readyz`` answers 200; otherwise what it said (or why it did not)."""
    try:
        answer = httpx.get(f"{url}/readyz", timeout=3.0, trust_env=False)
    except httpx.HTTPError as exc:
        return f"no answer: {exc!r}"
    return None if answer.status_code == 200 else f"HTTP {answer.status_code}: {answer.text}"


def _start_api(env: dict[str, str], log: Path) -> tuple[subprocess.Popen[bytes], str]:
    """``python -m cli api`` on a free port, ready on ``/readyz``; ``pytest.fail`` otherwise.

    A port found free can be taken before uvicorn binds it, so an early exit
    that says so is retried on a new port (three tries); anything else fails at
    once with the server's log.
    """
    outcome = "never started"
    for _ in range(3):
        port = _free_port()
        url = f"http://127.0.0.1:{port}"
        command = [sys.executable, "-m", "cli", "api", "--host", "127.0.0.1", "--port", str(port)]
        with log.open("ab") as out:
            proc = subprocess.Popen(
                command,
                cwd=REPO,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + API_READY_TIMEOUT_S
        while True:
            outcome = _readyz(url) or ""
            if not outcome:
                return proc, url
            if proc.poll() is not None:
                outcome = f"exited with code {proc.returncode}"
                break
            if time.monotonic() > deadline:
                outcome = f"not ready after {API_READY_TIMEOUT_S:g} s ({outcome})"
                break
            time.sleep(0.2)
        kill_tree(proc.pid)
        proc.wait()
        if "address already in use" not in tail(log).lower():
            break
    pytest.fail(f"the API server {outcome}. Log {log}:\n{tail(log)}", pytrace=False)


def _wait_terminal(
    http: httpx.Client, run_ids: list[str], timeout: float, logs: Callable[[], str]
) -> dict[str, dict[str, Any]]:
    """Each run's final body once all have ended; ``pytest.fail`` with the logs on timeout."""
    bodies: dict[str, dict[str, Any]] = {}
    deadline = time.monotonic() + timeout
    while True:
        for run_id in run_ids:
            if run_id not in bodies or bodies[run_id]["state"] not in TERMINAL:
                answer = http.get(f"/v1/experiments/{run_id}")
                answer.raise_for_status()
                bodies[run_id] = answer.json()
        if all(body["state"] in TERMINAL for body in bodies.values()):
            return bodies
        if time.monotonic() > deadline:
            states = {run_id: body["state"] for run_id, body in bodies.items()}
            pytest.fail(f"runs not finished after {timeout:g} s: {states}\n{logs()}", pytrace=False)
        time.sleep(0.5)


def _wait_workers_listed(
    http: httpx.Client,
    names: list[str],
    logs: Callable[[], str],
    timeout: float = WORKERS_LISTED_TIMEOUT_S,
) -> None:
    """Until ``GET /v1/admin/workers`` shows every worker heartbeating (not lost)."""
    deadline = time.monotonic() + timeout
    while True:
        answer = http.get("/v1/admin/workers")
        answer.raise_for_status()
        live = {w["id"] for w in answer.json()["workers"] if w["state"] != "lost"}
        if set(names) <= live:
            return
        if time.monotonic() > deadline:
            pytest.fail(
                f"workers {sorted(set(names) - live)} not listed live by /v1/admin/workers "
                f"after {timeout:g} s\n{logs()}",
                pytrace=False,
            )
        time.sleep(0.3)


@contextmanager
def start_live_stack(
    base: Path, s3: S3Endpoint, data_root: Path, *, workers: int = 2
) -> Iterator[LiveStack]:
    """Bring the service up under ``base``, train the runs, yield; tear everything down.

    The API and the workers boot in parallel, and the runs are submitted as
    soon as the API is ready (Redis holds them until a worker takes them), so
    setup costs about one API start plus two runs' training per worker.
    """
    started = time.monotonic()
    log_dir = base / "logs"
    log_dir.mkdir(parents=True)
    broker_url = redis_or_fail(REDIS_URL)
    queue = unique_queue("e2e")
    bucket = s3.create_bucket("e2e")
    artifacts_url = f"s3://{bucket}/fitfleet"
    worker_names = [f"{queue}-w{i}" for i in range(workers)]

    with ExitStack() as stack:
        database_url = stack.enter_context(temporary_database("e2e"))
        engine = make_engine(database_url)
        stack.callback(engine.dispose)
        with session_scope(engine) as session:
            _, admin_token = create_token(session, None, admin=True, name="e2e-admin")
            _, project_token = create_token(session, PROJECT, name="e2e-vision")

        # What API, workers and dispatcher share: the same backends and the same
        # idea of when a worker is lost (the settings say they must agree).
        service_env = {
            **_base_environ(),
            "PYTHONPATH": str(REPO),
            "HOME": str(base / "home"),
            "FITFLEET_DATABASE_URL": database_url,
            "FITFLEET_BROKER_URL": broker_url,
            "FITFLEET_ARTIFACTS_URL": artifacts_url,
            "FITFLEET_S3_ENDPOINT_URL": s3.url,
            "FITFLEET_DATA_ROOTS": str(data_root),
            "AWS_ACCESS_KEY_ID": s3.access_key_id,
            "AWS_SECRET_ACCESS_KEY": s3.secret_access_key,
            "AWS_DEFAULT_REGION": s3.region,
            "AWS_CONFIG_FILE": str(base / "no-aws-config"),
            "AWS_SHARED_CREDENTIALS_FILE": str(base / "no-aws-credentials"),
            "NO_PROXY": "127.0.0.1,localhost",
            "no_proxy": "127.0.0.1,localhost",
        }

        # Workers first: their boot (torch imports) overlaps the API's.
        for name in worker_names:
            worker_env = {
                **service_env,
                "FITFLEET_HOME": str(base / name),
                "FITFLEET_WORKER_NAME": name,
                "FITFLEET_WORKER_POLL_S": "0.5",
                # Each trainer gets one core: two workers on two cores train side by side.
                "OMP_NUM_THREADS": "1",
            }
            proc = stack.enter_context(
                celery_worker(worker_env, queue=queue, log=log_dir / f"worker-{name}.log")
            )
            # Runs first (LIFO): SIGKILL the whole tree, trainers in their own
            # sessions included, so the warm stop after it has nothing to wait for.
            stack.callback(kill_tree, proc.pid)

        timings: dict[str, float] = {}
        api, url = _start_api(
            {**service_env, "FITFLEET_HOME": str(base / "api")}, log_dir / "api.log"
        )

        def stop_api() -> None:
            kill_tree(api.pid)
            api.wait()

        stack.callback(stop_api)
        timings["api_ready"] = time.monotonic() - started

        settings = Settings(
            home=base / "dispatcher",
            database_url=database_url,
            broker_url=broker_url,
            artifacts_url=artifacts_url,
            s3_endpoint_url=s3.url,
            data_roots=[data_root],
            publish_on_submit=False,
        )
        stack.enter_context(Dispatcher(engine, settings, lost_after_s=settings.worker_lost_after_s))

        cli_home = base / "cli-home"
        env = {
            **_base_environ(),
            "PYTHONPATH": str(REPO),
            "HOME": str(cli_home),
            "XDG_CONFIG_HOME": str(cli_home / ".config"),
            # No such file: a user's CLI config must never be read by a test.
            "FITFLEET_CONFIG": str(cli_home / ".config" / "fitfleet" / "config.toml"),
            "FITFLEET_HOME": str(cli_home / ".fitfleet"),
            "FITFLEET_DATA_ROOTS": str(data_root),
            "FITFLEET_SERVER_URL": url,
            "FITFLEET_TOKEN": admin_token,
            "NO_PROXY": "127.0.0.1,localhost",
            "no_proxy": "127.0.0.1,localhost",
        }

        def logs() -> str:
            return logs_in(log_dir)

        headers = {"Authorization": f"Bearer {project_token}"}
        with httpx.Client(base_url=url, headers=headers, timeout=30.0, trust_env=False) as http:
            good = [
                spec(name, queue=queue, max_lr=lr, batch_size=batch)
                for name, lr, batch in GOOD_RUNS
            ]
            # lr 1e9 on the head: the loss is NaN within a batch and the run fails at once.
            diverging = spec("e2e-diverges", queue=queue, head_lr=1e9, lr_find=False)
            # The short failing run second: with two workers, one takes a good run
            # and the other the failing one and then the next good run, so the
            # work splits about evenly (a worker takes one run at a time).
            order = [good[0], diverging, good[1], good[2]]
            ids = {body["name"]: _submit(http, body) for body in order}
        run_ids = [ids[body["name"]] for body in good]
        failed_run_id = ids[diverging["name"]]
        timings["submitted"] = time.monotonic() - started

        admin = {"Authorization": f"Bearer {admin_token}"}
        with httpx.Client(base_url=url, headers=admin, timeout=30.0, trust_env=False) as http:
            _wait_workers_listed(http, worker_names, logs)
            timings["workers_listed"] = time.monotonic() - started
            bodies = _wait_terminal(http, [*run_ids, failed_run_id], RUNS_TIMEOUT_S, logs)
            timings["runs_finished"] = time.monotonic() - started
        wrong = {
            run_id: (body["state"], body.get("error"))
            for run_id, body in bodies.items()
            if body["state"] != ("failed" if run_id == failed_run_id else "succeeded")
        }
        if wrong:
            pytest.fail(f"setup runs ended wrong: {wrong}\n{logs()}", pytrace=False)

        setup_s = time.monotonic() - started
        logger.info(
            "live stack up in %.1f s (%s); logs in %s",
            setup_s,
            ", ".join(f"{phase} at {at:.1f} s" for phase, at in timings.items()),
            log_dir,
        )
        yield LiveStack(
            url=url,
            admin_token=admin_token,
            project_token=project_token,
            project=PROJECT,
            database_url=database_url,
            engine=engine,
            broker_url=broker_url,
            queue=queue,
            artifacts_url=artifacts_url,
            s3=s3,
            data_root=data_root,
            env=env,
            run_ids=run_ids,
            failed_run_id=failed_run_id,
            worker_names=worker_names,
            log_dir=log_dir,
            setup_s=setup_s,
            timings=timings,
        )


def _submit(http: httpx.Client, body: dict[str, Any]) -> str:
    """POST the spec; its run id (``pytest.fail`` with the server's answer if refused)."""
    answer = http.post("/v1/experiments", json=body)
    if answer.status_code != 201:
        pytest.fail(
            f"submitting {body['name']!r} was refused: HTTP {answer.status_code} {answer.text}",
            pytrace=False,
        )
    run_id: str = answer.json()["id"]
    return run_id
