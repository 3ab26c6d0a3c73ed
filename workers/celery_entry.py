"""The Celery app a worker runs (``celery -A workers.celery_entry worker``).

Built from the process's settings when imported (that is what ``-A`` needs);
importing :mod:`workers.tasks` registers ``workers.train_run`` on it.
"""

from __future__ import annotations

from celery import Celery

import workers.tasks  # noqa: F401  (registers the tasks)
from shared.celery import make_celery
from shared.settings import get_settings

app: Celery = make_celery(get_settings())
app.set_current()
