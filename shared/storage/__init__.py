"""The artifact store: checkpoints, plots and reports by key, on local disk, in memory or in S3.

Build one with :func:`open_store` from ``Settings.artifacts_url``; everything
else speaks to :class:`ArtifactStore`. The S3 backend lives in
:mod:`shared.storage.s3` and is imported only when an ``s3://`` URL is opened.
"""

from shared.storage.base import (
    ArtifactStore,
    ObjectInfo,
    StoredObject,
    StoreUnreachable,
    normalize_prefix,
    validate_key,
)
from shared.storage.local import LocalStore
from shared.storage.memory import MemoryStore
from shared.storage.registry import known_schemes, open_store
from shared.storage.sync import sync_prefix_to_cache

__all__ = [
    "ArtifactStore",
    "LocalStore",
    "MemoryStore",
    "ObjectInfo",
    "StoreUnreachable",
    "StoredObject",
    "known_schemes",
    "normalize_prefix",
    "open_store",
    "sync_prefix_to_cache",
    "validate_key",
]
