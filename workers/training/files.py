"""Finding image files and resolving paths without ever leaving the data roots.

fastai v1 decides "is an image" by the file's last suffix through :mod:`mimetypes`
and lists folders in filesystem order.  We keep the suffix rule (so the same files
are picked up) but **sort** every listing, because filesystem order differs between
machines and a random split over an unsorted list would not be reproducible.

Every path that comes from a request (a source, a file named in a CSV) goes
through :func:`resolve_source` or :func:`safe_join`, so a spec can never make a
worker read outside the folders an operator allowed.
"""

from __future__ import annotations

import logging
import mimetypes
import os
from collections.abc import Collection, Sequence
from functools import lru_cache
from pathlib import Path, PurePath, PurePosixPath
from urllib.parse import unquote, urlparse

from shared.errors import DataError

logger = logging.getLogger(__name__)


@lru_cache(maxsize=256)
def _suffix_is_image(suffix: str) -> bool:
    """Whether a lower-case suffix maps to ``image/*``; cached, mimetypes reads files once."""
    mime, _ = mimetypes.guess_type(f"file{suffix}", strict=True)
    return mime is not None and mime.startswith("image/")


def is_image_file(path: str | PurePath) -> bool:
    """True when the last suffix (any case) maps to ``image/*``, as fastai decides.

    Names starting with ``.`` (``.DS_Store``, ``._x.jpg`` from macOS) are never
    images: they are metadata that would only fail later when decoded.
    """
    name = PurePath(path).name
    if not name or name.startswith("."):
        return False
    suffix = PurePath(name).suffix.lower()
    return bool(suffix) and _suffix_is_image(suffix)


def path_sort_key(rel: str | PurePath) -> tuple[str, ...]:
    """The order every listing uses: component by component, case-sensitive.

    Comparing components (not the whole string) keeps a folder's files together:
    ``a/b.png`` sorts before ``a-c.png`` even though ``-`` < ``/`` as characters.
    This is the order :class:`pathlib.PurePosixPath` itself sorts in.
    """
    return PurePosixPath(rel).parts


def list_image_files(
    folder: Path, *, recurse: bool = True, skip_dirs: Collection[str] = ()
) -> list[Path]:
    """Image files under ``folder``, **sorted** (fastai's order is the filesystem's).

    Args:
        folder: where to look.
        recurse: descend into sub-folders (fastai's ``from_folder`` does).
        skip_dirs: names of **top-level** sub-folders to leave out, e.g. ``test``
            so unlabeled test images never become training items.

    Hidden files and hidden folders (name starting with ``.``) are skipped at every
    level.  Symlinked folders are not followed (``os.walk``'s default, as fastai),
    which also keeps a link loop from hanging the listing.
    """
    skip = set(skip_dirs)
    found: list[Path] = []
    for index, (dirpath, dirnames, filenames) in enumerate(os.walk(folder)):
        here = Path(dirpath)
        at_top = index == 0  # os.walk is top-down: the first folder yielded is `folder`
        # Pruning dirnames in place is how os.walk is told not to descend.
        dirnames[:] = [d for d in dirnames if not d.startswith(".") and not (at_top and d in skip)]
        found.extend(here / name for name in filenames if is_image_file(name))
        if not recurse:
            break
    found.sort(key=lambda p: path_sort_key(p.relative_to(folder)))
    return found


def _inside(path: Path, roots: Sequence[Path]) -> bool:
    """Whether an already resolved path is one of the roots or below one."""
    return any(path.is_relative_to(root.resolve()) for root in roots)


def resolve_source(source: str, roots: Sequence[Path]) -> Path:
    """The local folder a ``data.source`` names, refused unless it lies inside a root.

    Accepted forms: ``file:///abs/path`` (percent-escapes decoded), ``/abs/path``,
    or a path relative to the first root.  Symlinks are resolved **before** the
    check, so a link inside a root that points elsewhere is refused too.

    Raises:
        DataError: ``s3://`` (the worker service syncs those to disk first and
            passes the local folder), another scheme, a path outside every root,
            or a folder that does not exist.
    """
    if source.startswith("s3://"):
        raise DataError(
            f"data.source: {source!r} is an s3 source; s3 sources are synced to a local "
            "folder by the worker service first, and training reads that folder"
        )
    if source.startswith("file://"):
        parsed = urlparse(source)
        if parsed.netloc not in ("", "localhost"):
            raise DataError(f"data.source: {source!r} names a remote host; use file:///abs/path")
        candidate = Path(unquote(parsed.path))
    elif "://" in source:
        raise DataError(
            f"data.source: unsupported scheme in {source!r}; use s3://, file:/// or a path"
        )
    elif source.startswith("/"):
        candidate = Path(source)
    else:
        if not roots:
            raise DataError(f"data.source: {source!r} is relative but no data root is configured")
        candidate = roots[0] / source
    resolved = candidate.resolve()
    if not _inside(resolved, roots):
        allowed = ", ".join(str(r) for r in roots) or "(none configured)"
        raise DataError(
            f"data.source: {source!r} resolves to {resolved}, which is outside the "
            f"allowed data roots: {allowed}"
        )
    if not resolved.exists():
        raise DataError(f"data.source: folder {resolved} does not exist")
    if not resolved.is_dir():
        raise DataError(f"data.source: {resolved} is a file, not a folder")
    return resolved


def safe_join(root: Path, rel: str) -> Path:
    """``root / rel``, refused unless the result stays inside ``root``.

    ``rel`` comes from data we do not control (a CSV row, a list in a request),
    so absolute paths, ``..`` components and symlinks that resolve outside
    ``root`` raise instead of being followed.  The returned path is the plain
    join (not resolved), so it keeps the names the user gave.

    Raises:
        DataError: the path is empty, absolute, contains ``..`` or escapes through a symlink.
    """
    if not rel or not rel.strip():
        raise DataError("path must not be empty")
    if "\x00" in rel:
        raise DataError(f"path {rel!r} contains a NUL character")
    pure = PurePosixPath(rel)
    if pure.is_absolute():
        raise DataError(f"path {rel!r} is absolute; it must be relative to {root}")
    if ".." in pure.parts:
        raise DataError(f"path {rel!r} contains '..'; it must stay inside {root}")
    joined = root / pure
    resolved = joined.resolve()
    if not resolved.is_relative_to(root.resolve()):
        raise DataError(f"path {rel!r} resolves to {resolved} through a symlink, outside {root}")
    return joined
