"""An in-process store for unit tests of callers: no disk, no server, inspectable.

``open_store("memory://")`` returns a new, empty store each time; tests hand the
same instance to the code under test (dependency injection) rather than relying
on a process-wide singleton.
"""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path
from typing import BinaryIO

from shared.errors import StorageError
from shared.storage.base import CHUNK_BYTES, ArtifactStore, ObjectInfo, StoredObject, key_in_prefix


class MemoryStore(ArtifactStore):
    """Objects in a dict guarded by a lock (the worker writes from several threads)."""

    def __init__(self) -> None:
        self._objects: dict[str, bytes] = {}
        self._content_types: dict[str, str | None] = {}
        self._lock = threading.Lock()

    def content_type(self, key: str) -> str | None:
        """The content type an object was stored with, so tests can assert it."""
        with self._lock:
            return self._content_types.get(key)

    def _put_file(self, key: str, path: Path, *, content_type: str | None) -> StoredObject:
        digest = hashlib.sha256()
        parts: list[bytes] = []
        try:
            with path.open("rb") as fh:
                while chunk := fh.read(CHUNK_BYTES):
                    digest.update(chunk)
                    parts.append(chunk)
        except OSError as exc:
            raise StorageError(f"cannot store {key!r}: cannot read {path}: {exc}") from exc
        data = b"".join(parts)
        self._store(key, data, content_type)
        return StoredObject(key=key, uri=self._uri(key), bytes=len(data), sha256=digest.hexdigest())

    def _put_bytes(self, key: str, data: bytes, *, content_type: str | None) -> StoredObject:
        self._store(key, data, content_type)
        sha = hashlib.sha256(data).hexdigest()
        return StoredObject(key=key, uri=self._uri(key), bytes=len(data), sha256=sha)

    def _store(self, key: str, data: bytes, content_type: str | None) -> None:
        with self._lock:
            self._objects[key] = data
            self._content_types[key] = content_type

    def _get_bytes(self, key: str) -> bytes:
        with self._lock:
            data = self._objects.get(key)
        if data is None:
            raise StorageError(f"no object at {self._uri(key)}")
        return data

    def _download_into(self, key: str, fh: BinaryIO) -> None:
        fh.write(self._get_bytes(key))

    def _exists(self, key: str) -> bool:
        with self._lock:
            return key in self._objects

    def _list(self, prefix: str) -> list[ObjectInfo]:
        with self._lock:
            items = [(k, v) for k, v in self._objects.items() if key_in_prefix(k, prefix)]
        return [
            ObjectInfo(key=k, bytes=len(v), etag=hashlib.sha256(v).hexdigest()) for k, v in items
        ]

    def _delete_prefix(self, prefix: str) -> int:
        with self._lock:
            doomed = [k for k in self._objects if key_in_prefix(k, prefix)]
            for k in doomed:
                del self._objects[k]
                self._content_types.pop(k, None)
        return len(doomed)

    def _url_for(self, key: str, *, expires_s: int) -> str | None:
        return None

    def _uri(self, key: str) -> str:
        return f"memory:///{key}"
