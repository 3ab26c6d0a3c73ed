"""The Celery app both sides agree on: the dispatcher publishes with it, workers consume with it.

This is the only module in ``shared/`` that imports celery, so the API (which
publishes through :mod:`shared.dispatch`'s outbox relay, never directly) does
not pay for it. The configuration encodes the traps listed in the pitfalls
reference: a training message may be delivered more than once, so it is acked
late and the task is made idempotent by the lease in Postgres
(:mod:`shared.runs`), not by the broker.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from celery import Celery

from shared.runs import TRAIN_TASK
from shared.settings import Settings

logger = logging.getLogger(__name__)

__all__ = ["DEFAULT_QUEUE", "REDIS_VISIBILITY_TIMEOUT_S", "TRAIN_TASK", "make_celery"]

#: Where a message goes when nothing names a queue (``resources.queue`` defaults to it too).
DEFAULT_QUEUE = "gpu"

#: Redis redelivers an unacked message after ``visibility_timeout``. With late acks a
#: run longer than that would start a second copy, so keep it above any run's
#: ``resources.timeout`` (7 days; the lease still guards against duplicates).
REDIS_VISIBILITY_TIMEOUT_S = 7 * 24 * 3600


def transport_options(settings: Settings) -> dict[str, Any]:
    """Broker transport options for the configured broker URL.

    ``filesystem://`` (the embedded default) needs folders that every process on
    the machine shares: messages are written to and read from one folder, so
    ``data_folder_in`` and ``data_folder_out`` are the same. They are created
    here because kombu does not create them and a fresh machine has none.
    """
    url = settings.broker_url
    if url.startswith("filesystem:"):
        queue_dir = settings.broker_folder / "queue"
        processed_dir = settings.broker_folder / "processed"
        control_dir = settings.broker_folder / "control"  # kombu's default is ./control
        for folder in (queue_dir, processed_dir, control_dir):
            folder.mkdir(parents=True, exist_ok=True)
        return {
            "control_folder": str(control_dir),
            "data_folder_in": str(queue_dir),
            "data_folder_out": str(queue_dir),
            "processed_folder": str(processed_dir),
            "store_processed": False,
        }
    if url.startswith(("redis:", "rediss:", "sentinel:")):
        return {"visibility_timeout": REDIS_VISIBILITY_TIMEOUT_S}
    return {}


def make_celery(settings: Settings, *, events: bool = False) -> Celery:
    """A Celery app for ``settings.broker_url``, configured for long, at-least-once training tasks.

    * ``task_acks_late`` + ``task_reject_on_worker_lost``: a worker that dies
      mid-run (OOM killer, node loss) leaves its message to be redelivered
      instead of silently acked; the attempt counter in Postgres
      (``resources.max_restarts``) stops a poison message from looping.
    * ``worker_prefetch_multiplier=1``: a worker reserves only what it runs, so
      one busy GPU box does not hoard the queue.
    * ``task_ignore_result``: run state lives in fitfleet's own tables; no
      result backend to poll or fill.
    * JSON only: a broker message can never make a worker unpickle code.
    * ``events`` turns on worker/task events (``celery events``, Flower).
    """
    app = Celery("fitfleet", broker=settings.broker_url, set_as_current=False)
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_ignore_result=True,
        task_default_queue=DEFAULT_QUEUE,
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        broker_transport_options=transport_options(settings),
        # Keep retrying the broker at startup (and say so explicitly: Celery 5
        # warns when this is left to the default).
        broker_connection_retry_on_startup=True,
        worker_send_task_events=events,
        task_send_sent_event=events,
        enable_utc=True,
        timezone="UTC",
    )
    return app


#: Seconds to wait for the broker before giving up on depths.
BROKER_TIMEOUT_S = 2.0


def broker_depths(
    settings: Settings, queues: Sequence[str]
) -> tuple[dict[str, int | None], str | None]:
    """Messages waiting in the broker per queue, and an error string if the broker is down.

    A passive declare of a queue the broker does not know (Redis drops the
    list of an empty queue) is a depth of 0, not an error.
    """
    from kombu.connection import Connection
    from kombu.exceptions import ChannelError

    depths: dict[str, int | None] = dict.fromkeys(queues)
    try:
        with Connection(  # type: ignore[no-untyped-call]
            settings.broker_url,
            connect_timeout=BROKER_TIMEOUT_S,
            transport_options=transport_options(settings),
        ) as conn:
            conn.ensure_connection(max_retries=1, timeout=BROKER_TIMEOUT_S)
            for name in queues:
                channel = conn.channel()
                try:
                    depths[name] = int(
                        channel.queue_declare(queue=name, passive=True).message_count
                    )
                except ChannelError:
                    depths[name] = 0
                finally:
                    channel.close()
    except Exception as exc:  # kombu raises many transport-specific types
        logger.warning("broker depths unavailable: %s", exc)
        return dict.fromkeys(queues), f"broker unavailable: {exc}"
    return depths, None
