"""The one place where errors become HTTP responses.

Handlers and dependencies raise fitfleet's domain errors (never
``HTTPException`` for domain cases); :func:`install_error_handlers` maps each
error's ``code`` to a status through :data:`STATUS_BY_CODE`, so the whole API
answers errors in one shape: ``{"error": code, "message": ...}``, plus
``problems`` (every field path and a sentence) for a 422.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from shared.errors import BackendUnavailable, FitfleetError, InvalidSpec

logger = logging.getLogger(__name__)

#: Bodies above this are refused with 413 before any parsing: a spec is a few KiB,
#: inline label tables included.
MAX_BODY_BYTES = 1024 * 1024

#: Seconds a client should wait before retrying a 503 (a database or store restart).
RETRY_AFTER_S = 5


class Unauthorized(FitfleetError):
    """No usable bearer token: missing, malformed, unknown or revoked."""

    code = "unauthorized"


class Forbidden(FitfleetError):
    """The caller is known but may not do this (submit into another project)."""

    code = "forbidden"


class PayloadTooLarge(FitfleetError):
    """The request body is over :data:`MAX_BODY_BYTES`."""

    code = "payload_too_large"


class UnsupportedMediaType(FitfleetError):
    """The body's Content-Type is not one the route reads."""

    code = "unsupported_media_type"


STATUS_BY_CODE: dict[str, int] = {
    InvalidSpec.code: 422,
    "not_found": 404,
    "conflict": 409,
    BackendUnavailable.code: 503,
    Unauthorized.code: 401,
    Forbidden.code: 403,
    PayloadTooLarge.code: 413,
    UnsupportedMediaType.code: 415,
    "rate_limited": 429,
    "config_error": 500,
    "storage_error": 500,
    # Training errors describe a run's data or weights; if one reaches the API it
    # is about what the client sent.
    "training_error": 400,
    "data_error": 400,
    "weights_missing": 400,
    "diverged": 400,
    "stopped": 400,
}


def status_for(error: FitfleetError) -> int:
    """The HTTP status for a domain error; an unknown code is a server bug (500)."""
    return STATUS_BY_CODE.get(error.code, 500)


def error_response(error: FitfleetError) -> JSONResponse:
    """Render ``error`` in the API's one error shape, with the headers its status needs."""
    status = status_for(error)
    body: dict[str, Any] = {"error": error.code, "message": str(error)}
    if isinstance(error, InvalidSpec):
        body["problems"] = [{"path": p.path, "message": p.message} for p in error.problems]
    headers: dict[str, str] = {}
    if status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    if status == 503:
        headers["Retry-After"] = str(RETRY_AFTER_S)
    if status == 429:
        from services.api.ratelimit import RateLimited, retry_after_header

        headers["Retry-After"] = (
            retry_after_header(error) if isinstance(error, RateLimited) else str(RETRY_AFTER_S)
        )
    if status >= 500:
        logger.warning("request failed with %s: %s", error.code, error)
    return JSONResponse(body, status_code=status, headers=headers)


def _dotted(loc: Sequence[int | str]) -> str:
    # ("body", "data", "source") reads data.source, the path a user writes;
    # query/header/path locations keep their prefix so the client knows where.
    parts = [str(p) for p in loc]
    if parts and parts[0] == "body":
        parts = parts[1:]
    return ".".join(parts) or "body"


async def _fitfleet_handler(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, FitfleetError)
    return error_response(exc)


async def _validation_handler(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    problems = [
        {"path": _dotted(item.get("loc", ())), "message": str(item.get("msg", "invalid"))}
        for item in exc.errors()
    ]
    return JSONResponse(
        {"error": InvalidSpec.code, "message": "the request is invalid", "problems": problems},
        status_code=422,
    )


async def _http_handler(_request: Request, exc: Exception) -> JSONResponse:
    # Unknown routes and wrong methods: same shape as every other error.
    assert isinstance(exc, StarletteHTTPException)
    code = "not_found" if exc.status_code == 404 else "http_error"
    return JSONResponse(
        {"error": code, "message": str(exc.detail)},
        status_code=exc.status_code,
        headers=dict(exc.headers or {}),
    )


def install_error_handlers(app: FastAPI) -> None:
    """Register the domain-error, request-validation and HTTP-error handlers on ``app``."""
    app.add_exception_handler(FitfleetError, _fitfleet_handler)
    app.add_exception_handler(RequestValidationError, _validation_handler)
    app.add_exception_handler(StarletteHTTPException, _http_handler)


class _BodyTooLarge(Exception):
    """Raised from ``receive`` once a streamed body passes the limit."""


class BodySizeLimit:
    """ASGI middleware answering 413 for bodies over ``max_bytes``.

    A declared ``Content-Length`` is checked before the app runs; a chunked
    body is counted as it is read, so a client cannot get around the limit by
    leaving the header out.
    """

    def __init__(self, app: ASGIApp, max_bytes: int = MAX_BODY_BYTES) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Pass the request on, or answer 413 if its body is too large."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            await self._refuse(send)
            return
        received = 0
        started = False

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise _BodyTooLarge
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except _BodyTooLarge:
            if started:
                raise
            await self._refuse(send)

    async def _refuse(self, send: Send) -> None:
        error = PayloadTooLarge(f"request body is larger than {self.max_bytes} bytes")
        body = json.dumps({"error": error.code, "message": str(error)}).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})
