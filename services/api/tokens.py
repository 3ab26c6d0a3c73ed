"""Issuing API tokens: the secret is shown once and only its hash is stored."""

from __future__ import annotations

import secrets

from sqlalchemy.orm import Session

from shared.db.base import utcnow
from shared.db.models import SqlApiToken, SqlEvent, SqlProject, hash_token, new_id

#: Every secret starts with this, so leaked tokens are easy to grep for.
SECRET_PREFIX = "ff_"

#: How much of the secret is kept in clear, to tell tokens apart in listings.
SHOWN_PREFIX_CHARS = 11


def create_token(
    session: Session,
    project: str | None,
    admin: bool = False,
    *,
    name: str = "",
    actor: str = "system",
) -> tuple[str, str]:
    """Create a token for ``project`` (created if missing); return ``(token_id, secret)``.

    The secret is returned only here; the database keeps its sha256. A token
    without a project must be an admin token (it spans every project). A
    ``token.created`` audit event names ``actor``.

    Raises:
        ValueError: a non-admin token without a project.
    """
    if project is None and not admin:
        raise ValueError("a token without a project must be an admin token")
    if project is not None and session.get(SqlProject, project) is None:
        session.add(SqlProject(id=project))
        session.flush()
    secret = SECRET_PREFIX + secrets.token_urlsafe(32)
    token = SqlApiToken(
        id=new_id("tok"),
        name=name,
        token_hash=hash_token(secret),
        prefix=secret[:SHOWN_PREFIX_CHARS],
        project_id=project,
        is_admin=admin,
    )
    session.add(token)
    session.flush()
    session.add(
        SqlEvent(
            kind="token.created",
            message=f"token {token.id} created for "
            + (f"project {project!r}" if project else "every project")
            + (" (admin)" if admin else ""),
            data={"token": token.id, "project": project, "admin": admin},
            actor=actor,
            created_at=utcnow(),
        )
    )
    return token.id, secret
