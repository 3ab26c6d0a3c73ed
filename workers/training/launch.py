"""How to start a run's ranks: torchrun's command line and the environment it sets.

Kept free of torch so the Celery worker, which only starts the command, never
loads it (see :mod:`workers.training.distributed` for the rank side).
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

log = logging.getLogger(__name__)

#: Where rank 0 writes its exit code under torchrun, whose own status is 1 for
#: any failed rank and so cannot carry ``run_job``'s codes (set by the task).
EXIT_FILE_ENV = "FITFLEET_EXIT_FILE"


def world_from_env() -> tuple[int, int, int]:
    """(rank, local_rank, world_size) as torchrun set them; (0, 0, 1) outside torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 0, 1
    return int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0")), world


def torchrun_command(
    nproc_per_node: int,
    module_args: Sequence[str],
    *,
    nnodes: int = 1,
    rdzv_endpoint: str | None = None,
    rdzv_id: str | None = None,
    join_timeout_s: float | None = None,
    is_host: bool | None = None,
) -> list[str]:
    """The torchrun command line that runs ``python -m <module_args>`` on every rank.

    One node uses ``--standalone`` (a rendezvous on a free local port). Several
    nodes use torchrun's c10d rendezvous at ``rdzv_endpoint`` with ``rdzv_id``
    (the run id) and a join timeout: a node that does not join in time fails the
    rendezvous on every node. Restarts are the service's business (it resumes
    the run from a checkpoint on a fresh gang), so torchrun's own are off.
    """
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        str(nproc_per_node),
        "--max-restarts",
        "0",
        "--monitor-interval",
        "0.5",
    ]
    if nnodes <= 1:
        command.append("--standalone")
    else:
        if rdzv_endpoint is None or rdzv_id is None:
            raise ValueError("a multi-node run needs a rendezvous endpoint and id")
        conf = []
        if join_timeout_s is not None:
            conf.append(f"join_timeout={int(join_timeout_s)}")
        if is_host is not None:
            conf.append(f"is_host={'true' if is_host else 'false'}")
        command += [
            "--nnodes",
            str(nnodes),
            "--rdzv-backend",
            "c10d",
            "--rdzv-endpoint",
            rdzv_endpoint,
            "--rdzv-id",
            rdzv_id,
        ]
        if conf:
            command += ["--rdzv-conf", ",".join(conf)]
    return [*command, "-m", *module_args]


def write_exit_code(code: int, error: str | None = None) -> None:
    """Local rank 0 leaves ``code`` in ``$FITFLEET_EXIT_FILE``, for whoever started torchrun.

    One file per node: on a multi-node run each node's supervisor learns how
    its own ranks ended (all ranks agree on a training outcome; a lost peer
    shows as ``75`` on the nodes that survived). ``error``, one line saying what
    went wrong, follows the code on the next line and becomes the run's error.
    """
    path = os.environ.get(EXIT_FILE_ENV)
    if path and world_from_env()[1] == 0:
        try:
            reason = " ".join((error or "").split())[:1000]
            Path(path).write_text(f"{code}\n{reason}" if reason else str(code))
        except OSError:
            log.exception("could not write the exit code to %s", path)
