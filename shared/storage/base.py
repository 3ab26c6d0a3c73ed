"""The artifact store contract: checkpoints, plots and reports by key, whatever the backend.

Callers speak only in *keys*: POSIX relative paths such as
``runs/<run-id>/plots/losses.png`` (the layout is in the architecture notes). A
backend (``file://``, ``memory://``, ``s3://``) maps keys onto its own space, so
the same worker code writes to a laptop folder in development and to a bucket in
production.

The public methods live here, once, and every one of them validates its key
before a backend sees it: a key that came from a request can never name
something outside the store. Backends implement the ``_``-prefixed hooks, which
are abstract, so a backend that forgets one cannot even be instantiated.
"""

from __future__ import annotations

import builtins
import hashlib
import os
import tempfile
import unicodedata
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from shared.errors import BackendUnavailable, StorageError

#: Copy and hash in pieces this big: large enough to be fast, small enough that
#: a multi-gigabyte checkpoint never sits in memory.
CHUNK_BYTES = 1024 * 1024

#: S3's own limit on a key, in UTF-8 bytes; applied everywhere so a key that works
#: on a laptop also works in production.
MAX_KEY_BYTES = 1024


class StoreUnreachable(StorageError, BackendUnavailable):
    """The store did not answer (connection refused, timeouts, throttling after retries).

    It is both a :class:`StorageError` (the operation failed) and a
    :class:`BackendUnavailable` (trying again later may work), so the worker's
    "retry only ``BackendUnavailable``" rule applies to a store outage too.
    """

    code = BackendUnavailable.code


@dataclass(frozen=True)
class StoredObject:
    """What a write stored: the caller records it as an artifact row in Postgres.

    Attributes:
        key: the key written.
        uri: where it lives, e.g. ``s3://bucket/prefix/<key>`` or ``file:///...``.
        bytes: its size.
        sha256: hex digest of exactly the bytes stored, computed while they streamed.
    """

    key: str
    uri: str
    bytes: int
    sha256: str


@dataclass(frozen=True)
class ObjectInfo:
    """One entry of a listing.

    Attributes:
        key: the full key (not relative to the prefix listed).
        bytes: its size.
        etag: a tag that changes when the content changes, as cheap as the backend
            can offer it: S3's ETag, the memory store's sha256, the local store's
            size + modification time. Used to key download caches, never to verify.
    """

    key: str
    bytes: int
    etag: str


def validate_key(key: str) -> str:
    """Return ``key`` if it is a safe, canonical POSIX relative path; else raise.

    Refused: empty keys, absolute keys, backslashes (a Windows separator on one
    machine is a file name on another), empty segments (``a//b``, a trailing
    ``/``), ``.`` and ``..`` segments, control characters, and keys over 1024
    UTF-8 bytes. Refusing rather than normalising keeps one object one key.

    Raises:
        StorageError: naming the key and the reason.
    """
    if not isinstance(key, str):
        raise StorageError(f"invalid key {key!r}: a key is a string")
    reason = _key_problem(key)
    if reason is not None:
        raise StorageError(f"invalid key {key!r}: {reason}")
    return key


def _key_problem(key: str) -> str | None:
    if not key:
        return "it is empty"
    if key.startswith("/"):
        return "keys are relative, it starts with '/'"
    if "\\" in key:
        return "backslashes are not allowed, use '/'"
    if any(unicodedata.category(ch) == "Cc" for ch in key):
        return "it contains a control character"
    if len(key.encode("utf-8")) > MAX_KEY_BYTES:
        return f"it is longer than {MAX_KEY_BYTES} UTF-8 bytes"
    for segment in key.split("/"):
        if segment == "":
            return "it has an empty segment ('//' or a trailing '/')"
        if segment in (".", ".."):
            return f"'{segment}' segments are not allowed"
    return None


def normalize_prefix(prefix: str) -> str:
    """A prefix names a *folder* of keys: validated like a key, one trailing ``/`` allowed.

    ``""`` means the whole store. The result has no trailing slash, and matching is
    by whole segments, so ``runs/ab`` never matches ``runs/abc/x``: deleting one
    run can never delete another whose id merely starts the same way.
    """
    if prefix in ("", "/"):
        return ""
    stripped = prefix[:-1] if prefix.endswith("/") else prefix
    reason = _key_problem(stripped)
    if reason is not None:
        raise StorageError(f"invalid prefix {prefix!r}: {reason}")
    return stripped


def key_in_prefix(key: str, prefix: str) -> bool:
    """Whether ``key`` lies under the normalized ``prefix`` (whole segments only)."""
    return prefix == "" or key.startswith(prefix + "/")


def sha256_file(path: Path) -> tuple[str, int]:
    """Hex sha256 and size of a file, read in chunks so memory stays flat."""
    digest = hashlib.sha256()
    size = 0
    with path.open("rb") as fh:
        while chunk := fh.read(CHUNK_BYTES):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


class ArtifactStore(ABC):
    """Where a run's artifacts live, addressed by key.

    Subclasses implement the ``_`` hooks; the public methods validate keys and
    give every backend the same behaviour (atomic downloads, prefix semantics).
    All methods raise :class:`~shared.errors.StorageError` on failure, never a
    backend's own exception type, so callers need to know no backend.
    """

    # --- writing ---------------------------------------------------------------

    def put_file(self, key: str, path: Path, *, content_type: str | None = None) -> StoredObject:
        """Store a local file under ``key``, replacing any object there.

        The file is streamed, never loaded whole; the sha256 in the result is of
        the bytes actually sent, so the caller can record it as the artifact's
        checksum.

        Args:
            key: where to store it.
            path: the local file.
            content_type: a MIME type for stores that keep one (S3); ignored by others.
        """
        validate_key(key)
        path = Path(path)
        if not path.is_file():
            raise StorageError(f"cannot store {key!r}: {path} is not a file")
        return self._put_file(key, path, content_type=content_type)

    def put_bytes(self, key: str, data: bytes, content_type: str | None = None) -> StoredObject:
        """Store ``data`` under ``key`` (small artifacts: plots, report.json)."""
        validate_key(key)
        return self._put_bytes(key, bytes(data), content_type=content_type)

    # --- reading ---------------------------------------------------------------

    def get_bytes(self, key: str) -> bytes:
        """The whole object in memory; use :meth:`download` for checkpoints."""
        validate_key(key)
        return self._get_bytes(key)

    def download(self, key: str, dest: Path) -> None:
        """Copy the object to ``dest`` atomically.

        The bytes go to a temporary file next to ``dest`` which is renamed over it
        only when complete, so a reader (or a resumed run) never sees half a
        checkpoint, and a failed download leaves any previous ``dest`` untouched.
        """
        validate_key(key)
        dest = Path(dest)
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp_name = tempfile.mkstemp(
                dir=dest.parent, prefix=f".{dest.name}.", suffix=".part"
            )
        except OSError as exc:
            raise StorageError(f"cannot download {key!r} to {dest}: {exc}") from exc
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as fh:
                self._download_into(key, fh)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, dest)
        except OSError as exc:
            raise StorageError(f"cannot download {key!r} to {dest}: {exc}") from exc
        finally:
            # After a successful replace the temp name is gone; otherwise clean up.
            tmp.unlink(missing_ok=True)

    def exists(self, key: str) -> bool:
        """Whether an object is stored under exactly ``key``."""
        validate_key(key)
        return self._exists(key)

    def list(self, prefix: str) -> builtins.list[ObjectInfo]:
        """Every object under the folder ``prefix`` (``""``: all), sorted by key."""
        return sorted(self._list(normalize_prefix(prefix)), key=lambda info: info.key)

    # --- deleting --------------------------------------------------------------

    def delete_prefix(self, prefix: str) -> int:
        """Delete every object under the folder ``prefix``; return how many went.

        This is how a deleted run's artifacts are garbage-collected. An empty
        prefix is refused: nothing legitimate deletes the whole store, and a bug
        that passes ``""`` must not be able to.
        """
        normalized = normalize_prefix(prefix)
        if not normalized:
            raise StorageError("refusing to delete the whole store: the prefix is empty")
        return self._delete_prefix(normalized)

    # --- addressing ------------------------------------------------------------

    def url_for(self, key: str, *, expires_s: int = 300) -> str | None:
        """A time-limited URL a browser can GET directly, or None.

        S3 gives a presigned URL so the API need not proxy large files; local and
        memory stores give None and the API streams the bytes itself.
        """
        validate_key(key)
        if not 1 <= expires_s <= 7 * 24 * 3600:
            raise ValueError(f"expires_s must be between 1 s and 7 days, got {expires_s}")
        return self._url_for(key, expires_s=expires_s)

    def uri(self, key: str) -> str:
        """The object's stable address (``s3://...``, ``file:///...``), as recorded in Postgres."""
        validate_key(key)
        return self._uri(key)

    # --- backend hooks: keys (and prefixes) arrive validated ------------------

    @abstractmethod
    def _put_file(self, key: str, path: Path, *, content_type: str | None) -> StoredObject:
        """Stream ``path`` into the store, hashing as it goes."""

    @abstractmethod
    def _put_bytes(self, key: str, data: bytes, *, content_type: str | None) -> StoredObject:
        """Store ``data``."""

    @abstractmethod
    def _get_bytes(self, key: str) -> bytes:
        """Read the whole object; StorageError if missing."""

    @abstractmethod
    def _download_into(self, key: str, fh: BinaryIO) -> None:
        """Write the object's bytes into ``fh`` (a temp file; the base renames it)."""

    @abstractmethod
    def _exists(self, key: str) -> bool:
        """Whether ``key`` exists."""

    @abstractmethod
    def _list(self, prefix: str) -> builtins.list[ObjectInfo]:
        """Objects under the normalized folder ``prefix``, any order."""

    @abstractmethod
    def _delete_prefix(self, prefix: str) -> int:
        """Delete objects under the normalized, non-empty ``prefix``."""

    @abstractmethod
    def _url_for(self, key: str, *, expires_s: int) -> str | None:
        """A presigned GET URL, or None when the backend has none."""

    @abstractmethod
    def _uri(self, key: str) -> str:
        """The object's address."""
