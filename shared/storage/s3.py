"""Artifacts in an S3 bucket (``s3://bucket/prefix``): AWS, MinIO, moto, any S3 API.

This is the only module that touches boto3, and it imports it lazily, inside
functions: importing :mod:`shared.storage` (the API does, to build URIs) never
pays for boto3, and a process that only uses ``file://`` never loads it.

Every boto3/botocore exception is translated here, at the edge, into
:class:`~shared.errors.StorageError` naming the bucket and key (chained with
``from exc``); an endpoint that does not answer becomes
:class:`~shared.storage.base.StoreUnreachable`, which callers may retry.
"""

from __future__ import annotations

import hashlib
import logging
import math
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from io import BytesIO
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, BinaryIO, cast

from shared.errors import ConfigError, StorageError
from shared.storage.base import (
    ArtifactStore,
    ObjectInfo,
    StoredObject,
    StoreUnreachable,
    normalize_prefix,
    validate_key,
)

if TYPE_CHECKING:
    from boto3.s3.transfer import TransferConfig
    from mypy_boto3_s3.client import S3Client

logger = logging.getLogger(__name__)

MIB = 1024 * 1024
#: S3 refuses parts under 5 MiB (except the last) and more than 10,000 parts.
MIN_PART_BYTES = 5 * MIB
MAX_PARTS = 10_000

#: Error codes that mean "the service is struggling"; botocore has already
#: retried them, so what reaches us is an outage worth retrying later.
_TRANSIENT_CODES = frozenset(
    {"SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout"}
    | {"500", "502", "503", "504"}
)
_MISSING_KEY_CODES = frozenset({"NoSuchKey", "404", "NotFound"})


class _HashingReader:
    """A read-only, *non-seekable* view of a file that hashes what is read.

    Declaring it non-seekable makes s3transfer read the source exactly once,
    front to back, buffering each part in memory before sending it (retries
    re-send that buffer, never re-read the source). So the digest is of exactly
    the bytes uploaded, and a multi-gigabyte checkpoint is read from disk once.
    """

    def __init__(self, src: BinaryIO) -> None:
        self._src = src
        self._digest = hashlib.sha256()
        self.bytes = 0

    def read(self, size: int = -1) -> bytes:
        data = self._src.read(size)
        self._digest.update(data)
        self.bytes += len(data)
        return data

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def hexdigest(self) -> str:
        return self._digest.hexdigest()


class S3Store(ArtifactStore):
    """Keys map to ``<prefix>/<key>`` in one bucket.

    Credentials come from boto3's usual chain (``AWS_*`` environment variables,
    profile, instance role) unless given explicitly; secrets never live in
    fitfleet's settings. The client is built on first use and shared by threads
    (boto3 clients are thread-safe; sessions are not, so there is one per store).

    Args:
        bucket: the bucket name.
        prefix: a folder inside the bucket for all keys (``""``: the bucket root).
        endpoint_url: a non-AWS endpoint (MinIO, moto); path-style addressing is
            used with it, since such endpoints rarely have wildcard DNS.
        region: the signing region.
        multipart_threshold: files at least this big go up in parts, in parallel.
        multipart_chunksize: the part size (raised automatically for files that
            would otherwise need more than 10,000 parts).
        max_concurrency: threads per transfer.
        max_attempts: attempts per request *including the first* (botocore's
            ``total_max_attempts``, "standard" retry mode with jittered backoff).
        connect_timeout: seconds to wait for a TCP connection.
        read_timeout: seconds to wait for bytes on an open connection.
        access_key_id: explicit credentials (tests, one-off tools); both or neither.
        secret_access_key: see ``access_key_id``.
    """

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint_url: str | None = None,
        region: str = "us-east-1",
        multipart_threshold: int = 64 * MIB,
        multipart_chunksize: int = 8 * MIB,
        max_concurrency: int = 8,
        max_attempts: int = 5,
        connect_timeout: float = 5.0,
        read_timeout: float = 60.0,
        access_key_id: str | None = None,
        secret_access_key: str | None = None,
    ) -> None:
        if not bucket or "/" in bucket:
            raise ConfigError(f"invalid S3 bucket name {bucket!r}")
        if multipart_chunksize < MIN_PART_BYTES:
            raise ConfigError(
                f"multipart_chunksize must be at least {MIN_PART_BYTES} bytes (S3's minimum part)"
            )
        if multipart_threshold < 1 or max_concurrency < 1 or max_attempts < 1:
            raise ConfigError("multipart_threshold, max_concurrency and max_attempts must be >= 1")
        if (access_key_id is None) != (secret_access_key is None):
            raise ConfigError("give both access_key_id and secret_access_key, or neither")
        try:
            self._prefix = normalize_prefix(prefix)
        except StorageError as exc:
            raise ConfigError(f"invalid S3 prefix in s3://{bucket}/{prefix}: {exc}") from exc
        self.bucket = bucket
        self.endpoint_url = endpoint_url
        self.region = region
        self._threshold = multipart_threshold
        self._chunksize = multipart_chunksize
        self._concurrency = max_concurrency
        self._max_attempts = max_attempts
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout
        self._access_key_id = access_key_id
        self._secret_access_key = secret_access_key
        self._client_lock = threading.Lock()
        self._client_instance: S3Client | None = None

    def __repr__(self) -> str:
        where = f" at {self.endpoint_url}" if self.endpoint_url else ""
        return f"S3Store({self._uri_of(self._prefix)!r}{where})"

    # --- boto3 plumbing ------------------------------------------------------------

    @property
    def _client(self) -> S3Client:
        with self._client_lock:
            if self._client_instance is None:
                self._client_instance = self._build_client()
            return self._client_instance

    def _build_client(self) -> S3Client:
        import boto3
        from botocore.config import Config

        extra: dict[str, Any] = {}
        if self.endpoint_url:
            # Third-party S3 endpoints: path-style URLs (no wildcard DNS needed),
            # and checksums only where the API requires them, because several
            # S3-compatible stores reject the CRC headers botocore >= 1.36 adds
            # by default. Integrity does not suffer: we hash every upload ourselves.
            extra["s3"] = {"addressing_style": "path"}
            extra["request_checksum_calculation"] = "when_required"
            extra["response_checksum_validation"] = "when_required"
        config = Config(
            region_name=self.region,
            signature_version="s3v4",
            retries={"total_max_attempts": self._max_attempts, "mode": "standard"},
            connect_timeout=self._connect_timeout,
            read_timeout=self._read_timeout,
            # Room for several transfers at once (a dataset sync runs 8 in parallel).
            max_pool_connections=max(10, self._concurrency * 4),
            **extra,
        )
        session = boto3.session.Session(
            aws_access_key_id=self._access_key_id,
            aws_secret_access_key=self._secret_access_key,
            region_name=self.region,
        )
        with self._errors("connect to", None):
            return session.client("s3", endpoint_url=self.endpoint_url, config=config)

    def _transfer_config(self, size: int | None = None) -> TransferConfig:
        from boto3.s3.transfer import TransferConfig

        chunksize = self._chunksize
        if size is not None and size > chunksize * MAX_PARTS:
            # Bigger parts rather than a failed upload at part 10,001.
            chunksize = math.ceil(size / MAX_PARTS / MIB) * MIB
        return TransferConfig(
            multipart_threshold=self._threshold,
            multipart_chunksize=chunksize,
            max_concurrency=self._concurrency,
            num_download_attempts=self._max_attempts,
            # The CRT client needs seekable sources; our hashing reader is not.
            preferred_transfer_client="classic",
        )

    def _full_key(self, key: str) -> str:
        return f"{self._prefix}/{key}" if self._prefix else key

    def _uri_of(self, full_key: str) -> str:
        return f"s3://{self.bucket}/{full_key}"

    @contextmanager
    def _errors(self, action: str, key: str | None) -> Iterator[None]:
        """Translate whatever boto3, botocore or s3transfer raise into StorageError."""
        from boto3.exceptions import Boto3Error
        from botocore.exceptions import BotoCoreError, ClientError
        from s3transfer.exceptions import RetriesExceededError

        try:
            yield
        except (ClientError, BotoCoreError, Boto3Error, RetriesExceededError) as exc:
            raise self._translate(exc, action, key) from exc

    def _translate(self, exc: Exception, action: str, key: str | None) -> StorageError:
        from botocore.exceptions import (
            ClientError,
            ConnectionError,
            HTTPClientError,
            NoCredentialsError,
            PartialCredentialsError,
            SSLError,
        )
        from s3transfer.exceptions import RetriesExceededError

        # Wrappers (s3transfer's retries, boto3's S3UploadFailedError) hide the real
        # cause; unwrap so the message says what actually went wrong.
        if isinstance(exc, RetriesExceededError) and isinstance(exc.last_exception, Exception):
            exc = exc.last_exception
        elif not isinstance(exc, ClientError) and isinstance(exc.__context__, ClientError):
            exc = exc.__context__

        target = self._uri_of(self._full_key(key)) if key is not None else f"s3://{self.bucket}"
        where = self.endpoint_url or f"AWS S3 ({self.region})"
        head = f"cannot {action} {target}"

        if isinstance(exc, SSLError):
            return StorageError(f"{head}: TLS failed with {where}: {exc}")
        if isinstance(exc, ConnectionError | HTTPClientError):
            return StoreUnreachable(
                f"{head}: the S3 endpoint {where} did not answer after "
                f"{self._max_attempts} attempt(s): {exc}"
            )
        if isinstance(exc, NoCredentialsError | PartialCredentialsError):
            return StorageError(
                f"{head}: no usable AWS credentials (set AWS_ACCESS_KEY_ID and "
                f"AWS_SECRET_ACCESS_KEY, a profile, or an instance role): {exc}"
            )
        if not isinstance(exc, ClientError):
            return StorageError(f"{head}: {exc}")

        error = exc.response.get("Error", {})
        code = str(error.get("Code", ""))
        message = str(error.get("Message", ""))
        if code == "NoSuchBucket":
            return StorageError(f"{head}: bucket {self.bucket!r} does not exist at {where}")
        if code in _MISSING_KEY_CODES:
            return StorageError(f"{head}: no such object")
        if code == "InvalidAccessKeyId":
            return StorageError(
                f"{head}: the access key id is not known to {where}; "
                "check AWS_ACCESS_KEY_ID (or the profile in use)"
            )
        if code == "SignatureDoesNotMatch":
            return StorageError(
                f"{head}: the request signature was rejected: the secret access key "
                "does not match the access key id; check AWS_SECRET_ACCESS_KEY"
            )
        if code in ("ExpiredToken", "InvalidToken", "TokenRefreshRequired"):
            return StorageError(f"{head}: the session token is expired or invalid ({code})")
        if code == "AccessDenied":
            return StorageError(
                f"{head}: access denied: the credentials in use may not {action} in bucket "
                f"{self.bucket!r} (check the bucket and IAM policies)"
            )
        if code == "403":
            # HEAD responses have no body, so S3 cannot say which 403 it was.
            return StorageError(
                f"{head}: forbidden (HTTP 403): the credentials are wrong or lack permission "
                f"for bucket {self.bucket!r}"
            )
        if code in _TRANSIENT_CODES:
            return StoreUnreachable(f"{head}: {where} is unavailable ({code}: {message})")
        return StorageError(f"{head}: {code}: {message}" if code else f"{head}: {exc}")

    def _upload(
        self, key: str, src: BinaryIO, *, size: int | None, content_type: str | None
    ) -> StoredObject:
        reader = _HashingReader(src)
        extra_args = {"ContentType": content_type} if content_type else None
        with self._errors("upload", key):
            self._client.upload_fileobj(
                cast(IO[Any], reader),  # duck-typed file object, see _HashingReader
                self.bucket,
                self._full_key(key),
                ExtraArgs=extra_args,
                Config=self._transfer_config(size),
            )
        return StoredObject(
            key=key, uri=self._uri(key), bytes=reader.bytes, sha256=reader.hexdigest()
        )

    # --- hooks -------------------------------------------------------------------

    def _put_file(self, key: str, path: Path, *, content_type: str | None) -> StoredObject:
        try:
            with path.open("rb") as src:
                size = path.stat().st_size
                return self._upload(key, src, size=size, content_type=content_type)
        except OSError as exc:
            raise StorageError(
                f"cannot upload {self._uri(key)}: cannot read {path}: {exc}"
            ) from exc

    def _put_bytes(self, key: str, data: bytes, *, content_type: str | None) -> StoredObject:
        return self._upload(key, BytesIO(data), size=len(data), content_type=content_type)

    def _get_bytes(self, key: str) -> bytes:
        with self._errors("read", key):
            response = self._client.get_object(Bucket=self.bucket, Key=self._full_key(key))
            return response["Body"].read()

    def _download_into(self, key: str, fh: BinaryIO) -> None:
        with self._errors("download", key):
            self._client.download_fileobj(
                self.bucket, self._full_key(key), fh, Config=self._transfer_config()
            )

    def _exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        with self._errors("check", key):
            try:
                self._client.head_object(Bucket=self.bucket, Key=self._full_key(key))
            except ClientError as exc:
                if str(exc.response.get("Error", {}).get("Code")) in _MISSING_KEY_CODES:
                    return False
                raise
        return True

    def _list_prefix(self, prefix: str) -> str:
        """The bucket-level prefix for a store-level folder, ending in ``/`` unless empty."""
        full = self._full_key(prefix) if prefix else self._prefix
        return f"{full}/" if full else ""

    def _list(self, prefix: str) -> list[ObjectInfo]:
        strip = len(self._prefix) + 1 if self._prefix else 0
        found: list[ObjectInfo] = []
        with self._errors("list", prefix or None):
            paginator = self._client.get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=self.bucket, Prefix=self._list_prefix(prefix)):
                for item in page.get("Contents", []):
                    full = item["Key"]
                    if full.endswith("/") and item["Size"] == 0:
                        continue  # a "folder" marker made by a console, not an object
                    key = full[strip:]
                    # An object we could list but never address (``a//b``, ``..``)
                    # must fail loudly, not vanish from a dataset.
                    validate_key(key)
                    found.append(
                        ObjectInfo(key=key, bytes=item["Size"], etag=item["ETag"].strip('"'))
                    )
        return found

    def _delete_prefix(self, prefix: str) -> int:
        deleted = 0
        with self._errors("delete", prefix):
            paginator = self._client.get_paginator("list_objects_v2")
            # Pages hold at most 1000 keys, which is also DeleteObjects' limit.
            for page in paginator.paginate(Bucket=self.bucket, Prefix=self._list_prefix(prefix)):
                keys = [item["Key"] for item in page.get("Contents", [])]
                if not keys:
                    continue
                response = self._client.delete_objects(
                    Bucket=self.bucket,
                    Delete={"Objects": [{"Key": k} for k in keys], "Quiet": True},
                )
                errors = response.get("Errors", [])
                if errors:
                    first = errors[0]
                    raise StorageError(
                        f"cannot delete {len(errors)} object(s) under {self._uri(prefix)}, "
                        f"e.g. {first.get('Key')!r}: {first.get('Code')}: {first.get('Message')}"
                    )
                deleted += len(keys)
        logger.info("deleted %d object(s) under %s", deleted, self._uri(prefix))
        return deleted

    def _url_for(self, key: str, *, expires_s: int) -> str | None:
        with self._errors("presign", key):
            return self._client.generate_presigned_url(
                "get_object",
                Params={"Bucket": self.bucket, "Key": self._full_key(key)},
                ExpiresIn=expires_s,
            )

    def _uri(self, key: str) -> str:
        return self._uri_of(self._full_key(key))
