"""Per-token submission limits: a bucket per token, 429 with Retry-After when empty."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from services.api.app import create_app
from services.api.ratelimit import RateLimited, SubmitLimiter
from services.api.tokens import create_token
from shared.db.session import make_engine, session_scope
from shared.db.upgrade import upgrade
from shared.settings import Settings
from tests.unit.api.test_api_sqlite import make_spec


def test_bucket_refills_at_the_rate_and_caps_at_the_burst() -> None:
    now = [0.0]
    limiter = SubmitLimiter(2.0, 3, clock=lambda: now[0])
    for _ in range(3):
        limiter.take("tok_a")
    with pytest.raises(RateLimited) as caught:
        limiter.take("tok_a")
    assert caught.value.retry_after_s == pytest.approx(0.5)
    limiter.take("tok_b")  # another token has its own bucket
    now[0] = 0.5
    limiter.take("tok_a")  # one more after 1/rate seconds
    now[0] = 100.0
    for _ in range(3):
        limiter.take("tok_a")  # refilled, but only up to the burst
    with pytest.raises(RateLimited):
        limiter.take("tok_a")
    SubmitLimiter(0.0, 1).take("tok_a")  # 0 = no limit


def test_the_api_answers_429_with_retry_after(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'x.db'}"
    upgrade(url)
    engine = make_engine(url)
    with session_scope(engine) as session:
        _, alpha = create_token(session, "alpha")
        _, beta = create_token(session, "beta")
    settings = Settings(
        database_url=url,
        home=tmp_path,
        data_roots=[tmp_path / "data"],
        publish_on_submit=False,
        submit_rate_per_s=0.01,
        submit_burst=2,
    )
    with TestClient(create_app(settings)) as client:

        def submit(secret: str, project: str) -> object:
            return client.post(
                "/v1/experiments",
                json=make_spec(project=project),
                headers={"Authorization": f"Bearer {secret}"},
            )

        assert [submit(alpha, "alpha").status_code for _ in range(2)] == [201, 201]
        limited = submit(alpha, "alpha")
        assert limited.status_code == 429
        assert int(limited.headers["Retry-After"]) >= 1
        assert limited.json()["error"] == "rate_limited"
        assert submit(beta, "beta").status_code == 201  # limits are per token
    engine.dispose()
