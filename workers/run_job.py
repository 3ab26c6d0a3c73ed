"""Train one claimed experiment in this process: ``python -m workers.run_job EXP --worker-id W``.

The supervising Celery task claims the run (``shared.runs.claim_run``), starts
this in a child process (so a crash, an OOM kill or a CUDA fault takes down
only the child) and turns the exit code into the run's final state with
``release_run``. This module therefore never changes the experiment's state;
it prepares the inputs the engine cannot fetch itself (the spec from the
database, checkpoints of an earlier attempt, an ``s3://`` dataset, the weights
of a ``pretrained: run:<id>``), runs the engine with a
:class:`~workers.service_reporter.ServiceReporter`, and says how it went:

====  ==========================================================
0     succeeded
1     failed: diverged, another training error, or an unexpected error
2     bad input: the data or weights do not fit the spec (retrying cannot help)
130   stopped: a cancel was requested or the lease was lost; a checkpoint was saved
75    peer lost: a rank of a multi-node run vanished; the run resumes on a fresh gang
====  ==========================================================

Under torchrun (``resources.gpus`` >= 2 or ``resources.nodes`` >= 2) every rank
runs this module: each joins the process group, local rank 0 of each node
fetches the earlier attempt's checkpoints for its node, and only global rank 0
reports to the service. torchrun's own exit status cannot carry these codes
(any failed rank makes it 1), so rank 0 also writes its code to
``FITFLEET_EXIT_FILE`` when the supervisor set it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import sys
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from types import FrameType
from urllib.parse import urlsplit

from sqlalchemy import Engine, select

from shared.db.base import utcnow
from shared.db.models import SqlEvent, SqlExperiment
from shared.db.session import make_engine, session_scope
from shared.errors import (
    DataError,
    FitfleetError,
    InvalidSpec,
    Stopped,
    StorageError,
    TrainingError,
    WeightsMissing,
)
from shared.settings import Settings, get_settings
from shared.spec import ExperimentSpec
from shared.spec_io import validate_spec
from shared.storage.base import ArtifactStore, StoreUnreachable
from shared.storage.layout import run_prefix
from shared.storage.registry import open_store
from shared.storage.sync import sync_prefix_to_cache
from workers.service_reporter import ServiceReporter, with_retries
from workers.training.distributed import Collectives, init_from_env, is_comm_failure, shutdown
from workers.training.engine import EngineOptions, Runtime, choose_device, run_experiment
from workers.training.launch import world_from_env, write_exit_code

log = logging.getLogger(__name__)

EXIT_SUCCEEDED = 0
EXIT_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_STOPPED = 130
EXIT_PEER_LOST = 75


def run_job(experiment_id: str, *, worker_id: str, settings: Settings | None = None) -> int:
    """Train ``experiment_id`` as ``worker_id`` and return the exit code (see the module doc).

    Every failure is turned into an exit code, and recorded as an ``error``
    event when the database can still be reached, so the supervisor never has
    to parse a traceback.
    """
    settings = settings or get_settings()
    engine = make_engine(settings.database_url)
    try:
        code, error = _run(engine, experiment_id, worker_id=worker_id, settings=settings)
    finally:
        engine.dispose()
        shutdown()
    write_exit_code(code, error)
    return code


def _run(
    engine: Engine, experiment_id: str, *, worker_id: str, settings: Settings
) -> tuple[int, str | None]:
    """Train; (exit code, what went wrong in a sentence, for the run's ``error``)."""
    try:
        with session_scope(engine) as session:
            row = session.get(SqlExperiment, experiment_id)
            found = None if row is None else (dict(row.spec), row.attempt, row.project_id)
    except FitfleetError:
        log.exception("run %s: cannot read the experiment", experiment_id)
        return EXIT_FAILED, "cannot read the experiment from the database"
    if found is None:
        log.error("run %s: no such experiment", experiment_id)
        return EXIT_BAD_INPUT, f"no experiment {experiment_id!r}"
    document, attempt, project_id = found
    reporter: ServiceReporter | None = None
    collectives: Collectives | None = None
    is_main = world_from_env()[0] == 0
    try:
        store = open_store(
            settings.artifacts_url,
            s3_endpoint_url=settings.s3_endpoint_url,
            s3_region=settings.s3_region,
        )
        spec = validate_spec(document)
        collectives = init_from_env(gpus=spec.resources.gpus, sync_bn=spec.resources.sync_bn)
        run_dir = settings.home / "work" / experiment_id
        # One process per node fetches (checkpoints, an s3:// dataset); the node's
        # other ranks wait for it, then find everything in place.
        first_on_node = collectives is None or collectives.local_rank == 0
        if first_on_node:
            if attempt > 1:
                _download_checkpoints(store, experiment_id, run_dir)
            local_spec, data_roots = _local_data(spec, settings)
        if collectives is not None:
            collectives.barrier()
        if not first_on_node:
            local_spec, data_roots = _local_data(spec, settings)
        spec = local_spec
        options = EngineOptions(
            out_dir=run_dir,
            data_roots=data_roots,
            weights_dir=settings.weights_path,
            resume=True,
            resolve_run=_RunResolver(engine, store, project_id=project_id, settings=settings),
        )
        if is_main:
            reporter = ServiceReporter(
                engine,
                store,
                experiment_id=experiment_id,
                run_dir=run_dir,
                worker_id=worker_id,
                attempt=attempt,
                lease_ttl_s=settings.worker_lease_ttl_s,
                store_outage_limit_s=settings.store_outage_limit_s,
            )
            _stop_on_sigterm(reporter)
        if collectives is None:
            runtime = Runtime(device=choose_device(spec.resources.gpus))
        else:
            runtime = Runtime.distributed(collectives)
        run_experiment(spec, options, reporter, runtime)
    except Stopped as exc:
        if reporter is not None:
            reporter.drain(timeout_s=10)  # the epochs before the stop, if the database allows
        reason = (reporter.stop_reason if reporter else None) or "stop requested"
        log.warning("run %s stopped (%s): %s", experiment_id, reason, exc)
        _record(engine, experiment_id, worker_id, "stopped", f"{reason}: {exc}")
        return EXIT_STOPPED, None
    except (DataError, WeightsMissing, InvalidSpec) as exc:
        log.error("run %s: bad input: %s", experiment_id, exc)
        _record(engine, experiment_id, worker_id, "error", str(exc), code=exc.code)
        return EXIT_BAD_INPUT, str(exc)
    except TrainingError as exc:
        log.error("run %s failed: %s", experiment_id, exc)
        _record(engine, experiment_id, worker_id, "error", str(exc), code=exc.code)
        return EXIT_FAILED, str(exc)
    except Exception as exc:
        if collectives is not None and is_comm_failure(exc):
            log.error(
                "run %s: lost another rank (%s); the run resumes elsewhere", experiment_id, exc
            )
            return EXIT_PEER_LOST, f"lost another rank: {exc}"
        log.exception("run %s failed unexpectedly", experiment_id)
        code = exc.code if isinstance(exc, FitfleetError) else type(exc).__name__
        _record(
            engine, experiment_id, worker_id, "error", f"{type(exc).__name__}: {exc}", code=code
        )
        return EXIT_FAILED, f"{type(exc).__name__}: {exc}"
    if reporter is not None and not reporter.drain():
        log.error("run %s: trained, but its last records never reached the database", experiment_id)
        return EXIT_FAILED, "trained, but its last records never reached the database"
    log.info("run %s succeeded", experiment_id)
    return EXIT_SUCCEEDED, None


def _stop_on_sigterm(reporter: ServiceReporter) -> None:
    """SIGTERM (the supervisor stopping the group, or torchrun passing it on) stops
    the run at the next batch, after a checkpoint, instead of killing it mid-step.

    Only the flag is set here: the training loop sees it through
    ``should_stop`` (and under DDP tells every rank at the same step).
    """

    def handler(signum: int, _frame: FrameType | None) -> None:
        if reporter.stop_reason is None:
            reporter.stop_reason = f"{signal.Signals(signum).name}: stopping at the next batch"
            log.warning("run %s: %s", reporter.experiment_id, reporter.stop_reason)

    signal.signal(signal.SIGTERM, handler)


def _record(
    engine: Engine,
    experiment_id: str,
    worker_id: str,
    kind: str,
    message: str,
    *,
    code: str | None = None,
) -> None:
    """Add an event for the outcome; a database that is down must not hide the exit code.

    Only rank 0 speaks for a distributed run: the other ranks end the same way.
    """
    if world_from_env()[0] != 0:
        return
    try:
        with session_scope(engine) as session:
            session.add(
                SqlEvent(
                    experiment_id=experiment_id,
                    kind=kind,
                    message=message,
                    data={"code": code} if code else {},
                    actor=worker_id,
                    created_at=utcnow(),
                )
            )
    except FitfleetError:
        log.exception("run %s: could not record the %s event", experiment_id, kind)


def _download_checkpoints(store: ArtifactStore, experiment_id: str, run_dir: Path) -> None:
    """Bring an earlier attempt's checkpoints into the run folder, for ``resume=True``.

    The earlier attempt may have run on another machine, so the store, not the
    local disk, is the truth: anything stored overwrites a local copy.
    """
    prefix = f"{run_prefix(experiment_id)}/"
    listing = with_retries(lambda: store.list(prefix + "checkpoints"), what="listing checkpoints")
    for info in listing:
        dest = run_dir / info.key[len(prefix) :]
        with_retries(partial(store.download, info.key, dest), what=f"downloading {info.key}")
    log.info("run %s: %d checkpoint file(s) from the store", experiment_id, len(listing))


def _local_data(spec: ExperimentSpec, settings: Settings) -> tuple[ExperimentSpec, list[Path]]:
    """The spec with an ``s3://`` source replaced by its local cache, and the data roots.

    The engine only reads local folders inside its data roots; a synced
    dataset lives in the cache, so that folder becomes a root of its own.
    """
    source = spec.data.source
    if not source.startswith("s3://"):
        return spec, list(settings.data_roots)
    parts = urlsplit(source)
    prefix = parts.path.strip("/")
    if not parts.netloc or not prefix:
        raise DataError(f"data.source: {source!r} needs a bucket and a prefix: s3://bucket/prefix")
    bucket = open_store(
        f"s3://{parts.netloc}",
        s3_endpoint_url=settings.s3_endpoint_url,
        s3_region=settings.s3_region,
    )
    assert settings.cache_dir is not None  # filled in by Settings validation
    try:
        local = sync_prefix_to_cache(bucket, prefix, settings.cache_dir)
    except StoreUnreachable:
        raise
    except StorageError as exc:
        raise DataError(f"data.source: cannot fetch {source!r}: {exc}") from exc
    data = spec.data.model_copy(update={"source": str(local)})
    return spec.model_copy(update={"data": data}), [local, *settings.data_roots]


class _RunResolver:
    """``pretrained: run:<id>[:stage]`` from the store, refused across projects."""

    def __init__(
        self, engine: Engine, store: ArtifactStore, *, project_id: str, settings: Settings
    ) -> None:
        self.engine = engine
        self.store = store
        self.project_id = project_id
        assert settings.cache_dir is not None
        self.cache = settings.cache_dir / "runs"

    def __call__(self, run_id: str, stage: str | None) -> Path:
        with session_scope(self.engine) as session:
            project = session.scalar(
                select(SqlExperiment.project_id).where(SqlExperiment.id == run_id)
            )
        # One message for "missing" and "another project's": a run id must not
        # reveal whether a run exists in a project the caller cannot see.
        if project is None or project != self.project_id:
            raise DataError(f"model.pretrained: no run {run_id!r} in project {self.project_id!r}")
        prefix = run_prefix(run_id)
        try:
            if stage is None:
                report = json.loads(self.store.get_bytes(f"{prefix}/report.json"))
                stages = report.get("stages", [])
                if not stages:
                    raise DataError(f"model.pretrained: run {run_id!r} finished no stage")
                stage = str(stages[-1]["name"])
            key = f"{prefix}/checkpoints/{stage}.pt"
            if not self.store.exists(key):
                raise DataError(
                    f"model.pretrained: run {run_id!r} has no checkpoint for stage {stage!r}"
                )
            dest = self.cache / run_id / f"{stage}.pt"
            self.store.download(key, dest)
        except StoreUnreachable:
            raise
        except (StorageError, ValueError, KeyError, TypeError) as exc:
            raise DataError(f"model.pretrained: cannot fetch run {run_id!r}: {exc}") from exc
        return dest


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry: parse, set up logging, train, return the exit code."""
    parser = argparse.ArgumentParser(
        prog="python -m workers.run_job", description="Train one claimed fitfleet experiment."
    )
    parser.add_argument("experiment_id")
    parser.add_argument(
        "--worker-id",
        default=f"{socket.gethostname()}-{os.getpid()}",
        help="the lease owner the run was claimed as (default: host-pid)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    return run_job(args.experiment_id, worker_id=args.worker_id)


if __name__ == "__main__":
    sys.exit(main())
