"""Liveness and readiness, for load balancers and orchestrators (no auth)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError

from services.api.deps import ContextDep
from shared.db.session import translate_errors
from shared.errors import FitfleetError
from shared.settings import Settings

router = APIRouter(tags=["health"])

#: A key that is never written: asking whether it exists is a cheap round trip.
PROBE_KEY = "_fitfleet/readyz-probe"


def _broker_check(settings: Settings) -> str:
    """One connection attempt to the broker (the worker's own options), seconds at most."""
    from kombu.connection import Connection

    from shared.celery import transport_options

    options = transport_options(settings)
    try:
        with Connection(  # type: ignore[no-untyped-call]
            settings.broker_url, connect_timeout=2, transport_options=options
        ) as conn:
            conn.ensure_connection(max_retries=1, timeout=2)
    except Exception as exc:  # kombu raises many transport-specific types
        return f"down: {exc}"
    return "ok"


@router.get("/healthz")
def healthz() -> dict[str, str]:
    """The process is up; says nothing about its backends (that is ``/readyz``)."""
    return {"status": "ok"}


@router.get("/readyz", responses={503: {"description": "a backend is down"}})
def readyz(context: ContextDep) -> JSONResponse:
    """Whether the database and the artifact store answer; 503 names what is down."""
    checks: dict[str, str] = {}
    try:
        with translate_errors(), context.engine.connect() as connection:
            connection.execute(text("SELECT 1"))
        checks["database"] = "ok"
    except (FitfleetError, SQLAlchemyError) as exc:
        checks["database"] = f"down: {exc}"
    try:
        context.store.exists(PROBE_KEY)
        checks["artifacts"] = "ok"
    except (FitfleetError, OSError) as exc:
        checks["artifacts"] = f"down: {exc}"
    checks["broker"] = _broker_check(context.settings)
    down = sorted(name for name, result in checks.items() if result != "ok")
    body = {"status": "unavailable" if down else "ready", "down": down, "checks": checks}
    return JSONResponse(body, status_code=503 if down else 200)
