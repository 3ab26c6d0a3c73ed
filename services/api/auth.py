"""Bearer-token authentication: who is calling, and which project they may see.

Only the sha256 of a secret is stored (:func:`shared.db.models.hash_token`), so
a request is matched by hashing the presented secret and looking the hash up
among unrevoked tokens. Every failure (no header, another scheme, unknown or
revoked token) is the same 401, so a caller learns nothing about which tokens
exist.
"""

from __future__ import annotations

import hmac
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
