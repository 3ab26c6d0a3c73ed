"""Fixtures for integration tests: real servers on loopback, started here when needed.

House rule: an integration test whose server cannot be reached *fails*; it never
skips, so a broken environment can never pass CI by running nothing.

S3: moto's standalone server (see :mod:`tests.integration.moto_server`).
Credentials are handed to clients explicitly; the process environment is
touched only through :func:`s3_env`, per test.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.moto_server import S3Endpoint, start_moto_server, stop_server


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Endpoint]:
    """A moto S3 server for the whole session; accepts any credentials."""
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    proc, url = start_moto_server(log)
    try:
        yield S3Endpoint(url=url, log=log)
    finally:
        stop_server(proc)


@pytest.fixture(scope="session")
def s3_endpoint_with_auth(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Endpoint]:
    """A second moto server that *checks* credentials, like real S3.

    moto accepts anything unless ``INITIAL_NO_AUTH_ACTION_COUNT`` is set; then,
    after that many unauthenticated calls (spent here creating an IAM user, its
    key and an ``s3:*`` policy), every request must be signed with a known key.
    A separate server, so the permissive one stays permissive for everyone else.
    """
    log = tmp_path_factory.mktemp("moto-auth") / "moto.log"
    proc, url = start_moto_server(log, extra_env={"INITIAL_NO_AUTH_ACTION_COUNT": "3"})
    try:
        import boto3

        iam = boto3.session.Session().client(
            "iam",
            endpoint_url=url,
            region_name="us-east-1",
            aws_access_key_id="bootstrap",
            aws_secret_access_key="bootstrap",
        )
        iam.create_user(UserName="fitfleet")
        key = iam.create_access_key(UserName="fitfleet")["AccessKey"]
        policy = {
            "Version": "2012-10-17",
            "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}],
        }
        iam.put_user_policy(
            UserName="fitfleet", PolicyName="s3-all", PolicyDocument=json.dumps(policy)
        )
        yield S3Endpoint(
            url=url,
            access_key_id=key["AccessKeyId"],
            secret_access_key=key["SecretAccessKey"],
            log=log,
        )
    finally:
        stop_server(proc)


@pytest.fixture
def s3_env(s3_endpoint: S3Endpoint, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> S3Endpoint:
    """Point boto3's default credential chain at moto for one test, then restore.

    For code under test that opens stores from settings (``open_store``) rather
    than taking credentials. The developer's ``~/.aws`` and ``AWS_PROFILE`` are
    hidden so they cannot leak in.
    """
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_endpoint.access_key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_endpoint.secret_access_key)
    monkeypatch.setenv("AWS_DEFAULT_REGION", s3_endpoint.region)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    return s3_endpoint


@pytest.fixture
def s3_bucket(s3_endpoint: S3Endpoint) -> str:
    """A fresh bucket on the session's moto server."""
    return s3_endpoint.create_bucket()
