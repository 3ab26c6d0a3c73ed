"""The Celery app a worker runs (``celery -A workers.celery_entry worker``).

Built from the process's settings when imported (that is what ``-A`` needs);
importing :mod:`workers.tasks` registers ``workers.train_run`` on it. The
fleet's register/heartbeat/deregister signals (:mod:`workers.heartbeat`) are
connected here, the one module every worker loads, so ``fitfleet worker`` and
``celery -A workers.celery_entry worker`` both join the fleet, and both consume
their own node queue (:func:`shared.gangs.node_queue`) besides ``-Q``.
"""

from __future__ import annotations

from typing import Any

from celery import Celery
from celery.signals import celeryd_after_setup

import workers.tasks  # noqa: F401  (registers the tasks)
from shared.celery import make_celery
from shared.gangs import node_queue
from shared.settings import get_settings
from workers.heartbeat import connect_signals, fleet_worker_id

app: Celery = make_celery(get_settings())
app.set_current()
connect_signals()


def consume_own_queue(sender: str, instance: Any, **_: Any) -> None:
    """Also consume this worker's own queue, where a gang's node messages arrive."""
    instance.app.amqp.queues.select_add(node_queue(fleet_worker_id()))


celeryd_after_setup.connect(consume_own_queue)
