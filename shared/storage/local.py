"""Artifacts as files under one root folder: the one-machine default (``file:///abs/path``).

Two promises matter here. Writes are atomic (a temp file in the same folder,
fsynced, then renamed), so a crash never leaves half a checkpoint under a real
name. And no key can reach outside the root: keys are validated lexically by the
base class, and every path is additionally *resolved* and checked, so a symlink
planted inside the root cannot redirect a read or a write elsewhere.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from shared.errors import ConfigError, StorageError
from shared.storage.base import CHUNK_BYTES, ArtifactStore, ObjectInfo, StoredObject

#: Temp files being written carry this prefix; listings skip them, so a crashed
#: write never shows up as an artifact.
TEMP_PREFIX = ".fitfleet-tmp-"


class LocalStore(ArtifactStore):
    """Objects are files ``<root>/<key>``; the root is created on first write."""

    def __init__(self, root: Path) -> None:
        root = Path(root)
        if not root.is_absolute():
            raise ConfigError(f"a local artifact root must be an absolute path, got {root}")
        self._root = root

    @property
    def root(self) -> Path:
        """The folder as configured (not resolved)."""
        return self._root

    def _resolved_root(self) -> Path:
        try:
            return self._root.resolve()
        except (OSError, RuntimeError) as exc:
            raise StorageError(f"cannot resolve the artifact root {self._root}: {exc}") from exc

    def _path(self, name: str, *, what: str = "key") -> Path:
        """The real path for a key (or prefix), refused if it resolves outside the root.

        ``resolve`` follows every symlink that exists, so a link anywhere on the
        way to the key that points out of the root is caught here, before any I/O
        on the target. (A link swapped in *after* this check is a race this store
        does not defend against: the root is the operator's folder, not a
        shared drop box.)
        """
        root = self._resolved_root()
        try:
            target = (root / name).resolve()
        except (OSError, RuntimeError) as exc:  # RuntimeError: symlink loop (Python 3.11)
            raise StorageError(f"cannot resolve {what} {name!r}: {exc}") from exc
        if target == root or not target.is_relative_to(root):
            raise StorageError(
                f"{what} {name!r} resolves outside the artifact root {self._root} "
                f"(to {target}): refused"
            )
        return target

    # --- writes -----------------------------------------------------------------

    def _put_file(self, key: str, path: Path, *, content_type: str | None) -> StoredObject:
        try:
            with path.open("rb") as src:
                return self._write(key, src)
        except OSError as exc:
            raise StorageError(f"cannot store {key!r}: cannot read {path}: {exc}") from exc

    def _put_bytes(self, key: str, data: bytes, *, content_type: str | None) -> StoredObject:
        digest = hashlib.sha256(data).hexdigest()
        target = self._path(key)
        self._atomic_write(key, target, lambda fh: fh.write(data))
        return StoredObject(key=key, uri=self._uri(key), bytes=len(data), sha256=digest)

    def _write(self, key: str, src: BinaryIO) -> StoredObject:
        """Copy ``src`` to the key's file, hashing the very bytes written."""
        digest = hashlib.sha256()
        size = 0

        def copy(fh: BinaryIO) -> None:
            nonlocal size
            while chunk := src.read(CHUNK_BYTES):
                digest.update(chunk)
                fh.write(chunk)
                size += len(chunk)

        self._atomic_write(key, self._path(key), copy)
        return StoredObject(key=key, uri=self._uri(key), bytes=size, sha256=digest.hexdigest())

    def _atomic_write(self, key: str, target: Path, fill: Callable[[BinaryIO], object]) -> None:
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=TEMP_PREFIX)
        except OSError as exc:
            raise StorageError(f"cannot store {key!r} under {self._root}: {exc}") from exc
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as fh:
                fill(fh)
                fh.flush()
                # fsync before the rename: otherwise a power cut can leave the new
                # name pointing at an empty file.
                os.fsync(fh.fileno())
            os.chmod(tmp, 0o644)  # mkstemp makes 0600; artifacts are meant to be read
            os.replace(tmp, target)
        except OSError as exc:
            raise StorageError(f"cannot store {key!r} under {self._root}: {exc}") from exc
        finally:
            tmp.unlink(missing_ok=True)

    # --- reads ------------------------------------------------------------------

    def _get_bytes(self, key: str) -> bytes:
        target = self._path(key)
        try:
            return target.read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as exc:
            raise StorageError(f"no object at {self._uri(key)}") from exc
        except OSError as exc:
            raise StorageError(f"cannot read {self._uri(key)}: {exc}") from exc

    def _download_into(self, key: str, fh: BinaryIO) -> None:
        target = self._path(key)
        try:
            with target.open("rb") as src:
                shutil.copyfileobj(src, fh, CHUNK_BYTES)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as exc:
            raise StorageError(f"no object at {self._uri(key)}") from exc

    def _exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def _list(self, prefix: str) -> list[ObjectInfo]:
        root = self._resolved_root()
        base = self._path(prefix, what="prefix") if prefix else root
        if not base.is_dir():
            return []
        found: list[ObjectInfo] = []
        # os.walk does not follow symlinked folders, so a link loop cannot hang us
        # and a linked folder outside the root is never listed.
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames.sort()
            for name in filenames:
                if name.startswith(TEMP_PREFIX):
                    continue
                full = Path(dirpath) / name
                try:
                    real = full.resolve()
                    if not real.is_relative_to(root) or not real.is_file():
                        continue  # a symlinked file pointing out of the root: not ours
                    stat = real.stat()
                except (OSError, RuntimeError):
                    continue  # vanished or a link loop: not an object
                rel = full.relative_to(base).as_posix()
                key = f"{prefix}/{rel}" if prefix else rel
                found.append(
                    ObjectInfo(
                        key=key, bytes=stat.st_size, etag=f"{stat.st_size}-{stat.st_mtime_ns}"
                    )
                )
        return found

    # --- deletes ----------------------------------------------------------------

    def _delete_prefix(self, prefix: str) -> int:
        base = self._path(prefix, what="prefix")
        if not base.is_dir():
            return 0
        count = sum(len(files) for _, _, files in os.walk(base))
        try:
            # rmtree unlinks symlinks inside the tree rather than following them.
            shutil.rmtree(base)
        except OSError as exc:
            raise StorageError(f"cannot delete {self._uri(prefix)}: {exc}") from exc
        return count

    # --- addresses --------------------------------------------------------------

    def _url_for(self, key: str, *, expires_s: int) -> str | None:
        return None

    def _uri(self, key: str) -> str:
        return (self._root / key).as_uri()
