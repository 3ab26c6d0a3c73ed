"""Everything a route can ask for, as ``Annotated`` dependency aliases.

The app factory puts one :class:`AppContext` on ``app.state``; dependencies
read it from the request, so nothing here is global and tests can build as
many apps (with as many databases) as they like.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy import Engine

from services.api.auth import Caller, authenticate
from shared.dispatch import Publish
from shared.settings import Settings
from shared.storage.base import ArtifactStore


@dataclass(frozen=True)
class AppContext:
    """What the app factory built: settings, the database engine and the artifact store."""

    settings: Settings
    engine: Engine
    store: ArtifactStore
    publish: Publish | None = None  # sends a new run to its queue at once (else the relay does)


def get_context(request: Request) -> AppContext:
    """The context :func:`services.api.app.create_app` stored on the app."""
    context = request.app.state.context
    assert isinstance(context, AppContext)
    return context


ContextDep = Annotated[AppContext, Depends(get_context)]


def get_settings(context: ContextDep) -> Settings:
    """The settings the app was built with (not the process environment)."""
    return context.settings


def get_engine(context: ContextDep) -> Engine:
    """The app's engine; routes open short transactions with ``session_scope``."""
    return context.engine


SettingsDep = Annotated[Settings, Depends(get_settings)]
EngineDep = Annotated[Engine, Depends(get_engine)]

# auto_error=False: a missing or malformed header is answered by our own 401
# (with WWW-Authenticate), in the API's error shape; the scheme still shows in /docs.
_bearer = HTTPBearer(auto_error=False, description="an API token: ff_...")


def get_caller(
    engine: EngineDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Caller:
    """The authenticated caller, or a 401."""
    return authenticate(engine, credentials.credentials if credentials else None)


CallerDep = Annotated[Caller, Depends(get_caller)]
