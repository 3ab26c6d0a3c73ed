"""Bearer-token authentication: who is calling, and which project they may see.

Only the sha256 of a secret is stored (:func:`shared.db.models.hash_token`), so
a request is matched by hashing the presented secret and looking the hash up
among unrevoked tokens. Every failure (no header, another scheme, unknown or
revoked token) is the same 401, so a caller learns nothing about which tokens
exist.

A token that passed is remembered for ``auth_cache_s`` seconds
(:class:`TokenCache`), so a busy client costs one lookup per few seconds, not
one per request; a revocation therefore takes effect within that time. Failed
lookups are never cached.
"""

from __future__ import annotations

import hmac
import threading
import time
from dataclasses import dataclass

from sqlalchemy import Engine, select

from services.api.errors import Unauthorized
from shared.db.models import SqlApiToken, hash_token
from shared.db.session import session_scope


@dataclass(frozen=True)
class Caller:
    """The authenticated token: its id (the audit actor), project and admin flag.

    ``project`` is None only for an admin token that spans every project.
    """

    token_id: str
    project: str | None
    is_admin: bool

    def can_see(self, project: str) -> bool:
        """Whether this caller may read or change runs of ``project``."""
        return self.is_admin or self.project == project


class TokenCache:
    """Callers by token digest for ``ttl_s`` seconds; thread-safe, bounded.

    Keyed by the sha256 digest, never the secret, so the process memory holds
    no more than the database does.
    """

    def __init__(self, ttl_s: float, max_entries: int = 10_000) -> None:
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self._entries: dict[str, tuple[Caller, float]] = {}
        self._lock = threading.Lock()

    def get(self, secret: str) -> Caller | None:
        """The cached caller for ``secret`` if it was checked less than ``ttl_s`` ago."""
        if self.ttl_s <= 0:
            return None
        digest = hash_token(secret)
        with self._lock:
            entry = self._entries.get(digest)
            if entry is None:
                return None
            if entry[1] <= time.monotonic():
                del self._entries[digest]
                return None
            return entry[0]

    def put(self, secret: str, caller: Caller) -> None:
        """Remember ``caller`` for ``secret`` (a full cache starts over: simple and bounded)."""
        if self.ttl_s <= 0:
            return
        with self._lock:
            if len(self._entries) >= self.max_entries:
                self._entries.clear()
            self._entries[hash_token(secret)] = (caller, time.monotonic() + self.ttl_s)


def authenticate(engine: Engine, secret: str | None) -> Caller:
    """The caller holding ``secret``, or :class:`Unauthorized`.

    Args:
        engine: the API's database engine.
        secret: the bearer credentials from the Authorization header, if any.
    """
    if not secret:
        raise Unauthorized("missing bearer token: send 'Authorization: Bearer <token>'")
    digest = hash_token(secret)
    with session_scope(engine) as session:
        token = session.scalars(
            select(SqlApiToken).where(
                SqlApiToken.token_hash == digest, SqlApiToken.revoked_at.is_(None)
            )
        ).first()
        # The lookup already matched by value; the constant-time comparison keeps
        # the final decision free of timing differences whatever the index does.
        if token is None or not hmac.compare_digest(token.token_hash, digest):
            raise Unauthorized("invalid or revoked token")
        return Caller(token_id=token.id, project=token.project_id, is_admin=token.is_admin)
