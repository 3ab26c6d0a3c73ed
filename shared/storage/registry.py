"""Pick the artifact store from a URL: backends change by configuration, never by code.

Each scheme maps to a builder that imports its backend lazily, so a process
configured for ``file://`` never imports boto3.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from urllib.parse import SplitResult, unquote, urlsplit

from shared.errors import ConfigError
from shared.storage.base import ArtifactStore

_Builder = Callable[[SplitResult, str | None, str], ArtifactStore]


def _build_file(url: SplitResult, s3_endpoint_url: str | None, s3_region: str) -> ArtifactStore:
    from shared.storage.local import LocalStore

    # file:///abs/path (empty host) or file://localhost/abs/path; anything else
    # (file://relative/path) would silently put artifacts somewhere unexpected.
    if url.netloc not in ("", "localhost"):
        raise ConfigError(
            f"file URLs need an absolute path: file:///abs/path, not file://{url.netloc}{url.path}"
        )
    path = unquote(url.path)
    if not path.startswith("/"):
        raise ConfigError(f"file URLs need an absolute path, got {url.geturl()!r}")
    return LocalStore(Path(path))


def _build_memory(url: SplitResult, s3_endpoint_url: str | None, s3_region: str) -> ArtifactStore:
    from shared.storage.memory import MemoryStore

    if url.netloc or url.path not in ("", "/"):
        raise ConfigError(f"a memory store URL is just 'memory://', got {url.geturl()!r}")
    return MemoryStore()


def _build_s3(url: SplitResult, s3_endpoint_url: str | None, s3_region: str) -> ArtifactStore:
    from shared.storage.s3 import S3Store

    if not url.netloc:
        raise ConfigError(f"an S3 URL names a bucket: s3://bucket/prefix, got {url.geturl()!r}")
    return S3Store(
        url.netloc,
        unquote(url.path.lstrip("/")),
        endpoint_url=s3_endpoint_url,
        region=s3_region,
    )


_BUILDERS: dict[str, _Builder] = {
    "file": _build_file,
    "memory": _build_memory,
    "s3": _build_s3,
}


def known_schemes() -> list[str]:
    """The URL schemes :func:`open_store` understands."""
    return sorted(_BUILDERS)


def open_store(
    url: str, *, s3_endpoint_url: str | None = None, s3_region: str = "us-east-1"
) -> ArtifactStore:
    """Build the store a URL names (``file:///abs``, ``memory://``, ``s3://bucket/prefix``).

    Args:
        url: the artifacts URL, usually ``Settings.artifacts_url``.
        s3_endpoint_url: a non-AWS S3 endpoint (MinIO, moto); ignored by other schemes.
        s3_region: the S3 signing region; ignored by other schemes.

    Raises:
        ConfigError: the URL is malformed or its scheme unknown (the message lists
            the known schemes).
    """
    parts = urlsplit(url)
    builder = _BUILDERS.get(parts.scheme.lower())
    if builder is None:
        raise ConfigError(
            f"unknown artifact store URL {url!r}: the scheme must be one of "
            + ", ".join(f"{s}://" for s in known_schemes())
        )
    if parts.query or parts.fragment:
        raise ConfigError(f"artifact store URLs take no query or fragment, got {url!r}")
    return builder(parts, s3_endpoint_url, s3_region)
