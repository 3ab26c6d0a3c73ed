"""Everything a route can ask for, as ``Annotated`` dependency aliases.

The app factory puts one :class:`AppContext` on ``app.state``; dependencies
read it from the request, so nothing here is global and tests can build as
many apps (with as many databases) as they like.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy import Engine
from starlette.concurrency import run_in_threadpool

from services.api.auth import Caller, TokenCache, authenticate
from services.api.publisher import SubmitPublisher
from services.api.ratelimit import SubmitLimiter
from shared.settings import Settings
from shared.storage.base import ArtifactStore


@dataclass(frozen=True)
class AppContext:
    """What the app factory built: settings, the database engine and the artifact store."""

    settings: Settings
    engine: Engine
    store: ArtifactStore
    publisher: SubmitPublisher | None = None  # sends new runs to their queues at once
    tokens: TokenCache = field(default_factory=lambda: TokenCache(0.0))
    limiter: SubmitLimiter = field(default_factory=lambda: SubmitLimiter(0.0, 1))


async def get_context(request: Request) -> AppContext:
    """The context :func:`services.api.app.create_app` stored on the app.

    The trivial dependencies are ``async`` on purpose: FastAPI runs a plain
    ``def`` dependency in its thread pool, a thread hop per dependency per
    request, which cost the submit route more than its own database work.
    """
    context = request.app.state.context
    assert isinstance(context, AppContext)
    return context


ContextDep = Annotated[AppContext, Depends(get_context)]


async def get_settings(context: ContextDep) -> Settings:
    """The settings the app was built with (not the process environment)."""
    return context.settings


async def get_engine(context: ContextDep) -> Engine:
    """The app's engine; routes open short transactions with ``session_scope``."""
    return context.engine


SettingsDep = Annotated[Settings, Depends(get_settings)]
EngineDep = Annotated[Engine, Depends(get_engine)]

# auto_error=False: a missing or malformed header is answered by our own 401
# (with WWW-Authenticate), in the API's error shape; the scheme still shows in /docs.
_bearer = HTTPBearer(auto_error=False, description="an API token: ff_...")


#: The dashboard's session cookie: an admin token, set by ``POST /dashboard/login``
#: (HttpOnly, SameSite=Strict); see :mod:`services.api.dashboard.routes`.
SESSION_COOKIE = "fitfleet_session"

#: Methods that only read: the only ones the session cookie may authenticate.
SAFE_METHODS = frozenset({"GET", "HEAD"})


async def get_caller(
    request: Request,
    context: ContextDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Caller:
    """The authenticated caller, or a 401 (a recently checked token skips the database).

    The token comes from the Authorization header; without that header, a
    GET or HEAD may use the dashboard's session cookie instead.
    """
    secret = credentials.credentials if credentials else None
    if "authorization" not in request.headers and request.method in SAFE_METHODS:
        # CSRF: a browser attaches cookies to requests other sites make (a form
        # posted from evil.example to /v1/experiments/{id}/cancel carries the
        # cookie; SameSite=Strict is a second line, not one to rely on alone).
        # The cookie is therefore honoured only for methods that change
        # nothing; every write needs the Authorization header, which no other
        # site can make a browser send. A present header always wins, so a bad
        # header is a 401 even with a good cookie.
        secret = request.cookies.get(SESSION_COOKIE) or None
    if secret:
        cached = context.tokens.get(secret)
        if cached is not None:
            return cached
    caller = await run_in_threadpool(authenticate, context.engine, secret)
    if secret:
        context.tokens.put(secret, caller)
    return caller


CallerDep = Annotated[Caller, Depends(get_caller)]
