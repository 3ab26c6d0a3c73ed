"""Liveness and readiness, for load balancers and orchestrators (no auth)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError

from services.api.deps import ContextDep
from shared.db.session import translate_errors
from shared.errors import FitfleetError

router = APIRouter(tags=["health"])

#: A key that is never written: asking whether it exists is a cheap round trip.
PROBE_KEY = "_fitfleet/readyz-probe"


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
    down = sorted(name for name, result in checks.items() if result != "ok")
    body = {"status": "unavailable" if down else "ready", "down": down, "checks": checks}
    return JSONResponse(body, status_code=503 if down else 200)
