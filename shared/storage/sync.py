"""Turn a dataset in a store (``data.source: s3://bucket/prefix``) into a local folder.

Training reads images from a local folder many times per run, so a worker
downloads the dataset once into a cache and reuses it for every run on the same
data. The cache folder is named by the sha256 of a *manifest* (every key under the
prefix with its size and ETag), so:

* unchanged data is never downloaded twice, whatever run asks for it;
* changed data (one object added, replaced or removed) gets a new folder, so a
  run never trains on a half-updated mix;
* a folder is built in a temp folder and renamed into place in one step, with a
  marker written last: a folder under its final name is always complete, even if
  a worker died mid-download or two workers raced for the same dataset.

The manifest and marker are dot-files inside the folder; the data pipeline skips
hidden files, so they never become training items.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from pathlib import Path, PurePosixPath

from shared.errors import StorageError
from shared.storage.base import ArtifactStore, ObjectInfo, normalize_prefix

logger = logging.getLogger(__name__)

MANIFEST_NAME = ".fitfleet-manifest.json"
COMPLETE_NAME = ".fitfleet-complete"
_RESERVED = frozenset({MANIFEST_NAME, COMPLETE_NAME})


def sync_prefix_to_cache(
    store: ArtifactStore, prefix: str, cache_root: Path, *, max_workers: int = 8
) -> Path:
    """Download every object under ``prefix`` into ``cache_root/<sha256 of manifest>``.

    Returns the folder at once when it already exists complete. Otherwise the
    objects are downloaded (``max_workers`` in parallel: datasets are many small
    images, where latency, not bandwidth, is the cost) into a temp folder that is
    renamed into place. Keys become paths relative to ``prefix``.

    Raises:
        StorageError: nothing under the prefix; keys that cannot coexist as files
            (``a`` and ``a/b``) or clash with the cache's own dot-files; an object
            that changed size during the download; any store failure.
    """
    folder = normalize_prefix(prefix)
    objects = store.list(folder)
    if not objects:
        raise StorageError(f"nothing to sync: no objects under prefix {prefix!r} in {store!r}")
    files = _relative_files(objects, folder)
    digest = _manifest_digest(files)
    final = Path(cache_root) / digest
    if (final / COMPLETE_NAME).is_file():
        logger.debug("dataset %r: cached at %s", prefix, final)
        return final

    try:
        Path(cache_root).mkdir(parents=True, exist_ok=True)
        if final.exists():
            # A folder under the final name without the marker was not made by us
            # (we only ever rename complete folders into place): set it aside.
            _remove_tree(final, Path(cache_root))
        tmp = Path(tempfile.mkdtemp(dir=cache_root, prefix=f".tmp-{digest[:16]}-"))
    except OSError as exc:
        raise StorageError(f"cannot prepare the dataset cache {cache_root}: {exc}") from exc
    try:
        total = _download_all(store, files, tmp, max_workers=max_workers)
        manifest = [{"key": rel, "bytes": info.bytes, "etag": info.etag} for rel, info in files]
        (tmp / MANIFEST_NAME).write_text(json.dumps({"objects": manifest}, indent=1))
        (tmp / COMPLETE_NAME).write_text(digest + "\n")
        try:
            os.rename(tmp, final)
        except OSError as exc:
            # Another worker got there first: its folder is as good as ours.
            if not (final / COMPLETE_NAME).is_file():
                raise StorageError(f"cannot move the dataset into {final}: {exc}") from exc
            logger.info("dataset %r: another process cached it first at %s", prefix, final)
        else:
            logger.info(
                "dataset %r: downloaded %d object(s), %d bytes, into %s",
                prefix,
                len(files),
                total,
                final,
            )
    except OSError as exc:
        raise StorageError(f"cannot write the dataset cache {tmp}: {exc}") from exc
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def _relative_files(objects: list[ObjectInfo], folder: str) -> list[tuple[str, ObjectInfo]]:
    """Pair each object with its path relative to the prefix, refusing impossible layouts."""
    files = [(info.key[len(folder) + 1 :] if folder else info.key, info) for info in objects]
    names = {rel for rel, _ in files}
    for rel, info in files:
        if rel in _RESERVED:
            raise StorageError(f"object {info.key!r} clashes with the cache's own file {rel!r}")
        for parent in PurePosixPath(rel).parents:
            if str(parent) in names:
                raise StorageError(
                    f"objects {info.key!r} and {parent!s} cannot both be files in one folder"
                )
    return sorted(files)


def _manifest_digest(files: list[tuple[str, ObjectInfo]]) -> str:
    """sha256 of the canonical manifest: what the data is, not where or when it was read."""
    canonical = json.dumps(
        [[rel, info.bytes, info.etag] for rel, info in files], separators=(",", ":")
    )
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def _download_all(
    store: ArtifactStore, files: list[tuple[str, ObjectInfo]], dest: Path, *, max_workers: int
) -> int:
    """Download in parallel; check each size against the manifest; return total bytes."""

    def fetch(rel: str, info: ObjectInfo) -> int:
        target = dest / rel
        store.download(info.key, target)
        size = target.stat().st_size
        if size != info.bytes:
            raise StorageError(
                f"object {info.key!r} changed while syncing ({info.bytes} bytes listed, "
                f"{size} downloaded); sync again"
            )
        return size

    total = 0
    with ThreadPoolExecutor(max_workers=max(1, max_workers)) as pool:
        futures: list[Future[int]] = [pool.submit(fetch, rel, info) for rel, info in files]
        try:
            for future in as_completed(futures):
                total += future.result()
        except BaseException:
            # Stop queued downloads; the temp folder is removed by the caller.
            pool.shutdown(wait=True, cancel_futures=True)
            raise
    return total


def _remove_tree(path: Path, cache_root: Path) -> None:
    """Rename ``path`` aside (so its name is free at once), then delete it."""
    aside = Path(tempfile.mkdtemp(dir=cache_root, prefix=".trash-"))
    os.rename(path, aside / "old")
    shutil.rmtree(aside, ignore_errors=True)
