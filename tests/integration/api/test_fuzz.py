"""Bad input, fuzzed: schemathesis over the whole OpenAPI document, then over the spec itself.

Two passes, both on a real Postgres and bounded (derandomized, a few dozen
examples per operation) so the module stays well under a few minutes:

* every operation of ``/openapi.json``, valid and mutated requests: never a
  5xx, responses match what the document declares;
* ``POST /v1/experiments`` with bodies generated from the spec's own JSON
  Schema (``/v1/spec/schema``), valid and mutated: 201/200/413/415/422 only,
  every 4xx body carries an ``error`` code, every 422 names each bad field,
  and a refused submission leaves no experiment and no outbox row behind.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

schemathesis = pytest.importorskip("schemathesis")

from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis.errors import Unsatisfiable  # noqa: E402
from sqlalchemy import Engine, func, select  # noqa: E402

from services.api.app import create_app  # noqa: E402
from services.api.tokens import create_token  # noqa: E402
from shared.db.models import SqlExperiment, SqlOutbox  # noqa: E402
from shared.db.session import make_engine, session_scope  # noqa: E402
from shared.settings import Settings  # noqa: E402
from shared.spec_io import spec_json_schema  # noqa: E402
from tests.integration.pg import temporary_database  # noqa: E402

pytestmark = pytest.mark.integration

MAX_EXAMPLES = 25
# 403: a generated "project" other than the token's (submitting into another project).
# 409: a generated Idempotency-Key can repeat with another spec, which is refused.
SUBMIT_STATUSES = {200, 201, 403, 409, 413, 415, 422}
VALID_SPEC: dict[str, Any] = {
    "version": 1,
    "name": "fuzz-base",
    "project": "fuzz",
    "data": {"source": "digits", "split": {"by": "folder"}, "size": 28},
    "model": {"arch": "resnet18", "pretrained": "none"},
    "stages": [{"name": "stage-1", "train": "head", "epochs": 1, "max_lr": 1e-2}],
    "resources": {"queue": "cpu", "gpus": 0, "priority": 7},
}


def _settings(max_examples: int = MAX_EXAMPLES) -> Any:
    return settings(
        max_examples=max_examples,
        deadline=None,
        derandomize=True,
        # No shrinking: a failure reports the request as found, in seconds, not minutes.
        phases=[Phase.explicit, Phase.generate],
        database=None,
        suppress_health_check=list(HealthCheck),
    )


@dataclass
class Target:
    app: Any
    engine: Engine
    project: str
    token: str
    admin_token: str

    def auth(self, path: str) -> dict[str, str]:
        secret = self.admin_token if path.startswith("/v1/admin") else self.token
        return {"Authorization": f"Bearer {secret}"}

    def counts(self) -> tuple[int, int]:
        with session_scope(self.engine) as session:
            experiments = session.scalar(select(func.count()).select_from(SqlExperiment))
            outbox = session.scalar(select(func.count()).select_from(SqlOutbox))
        return int(experiments or 0), int(outbox or 0)


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    home = tmp_path_factory.mktemp("fuzz")
    (home / "data").mkdir()
    with temporary_database("fuzz") as url:
        engine = make_engine(url)
        with session_scope(engine) as session:
            _id, token = create_token(session, "fuzz")
            _admin_id, admin = create_token(session, None, admin=True)
        app = create_app(
            Settings(
                database_url=url,
                home=home,
                data_roots=[home / "data"],
                artifacts_url=(home / "artifacts").as_uri(),
                publish_on_submit=False,
                submit_rate_per_s=0,  # thousands of fuzzed submissions from one token
            )
        )
        try:
            yield Target(app=app, engine=engine, project="fuzz", token=token, admin_token=admin)
        finally:
            app.state.context.engine.dispose()
            engine.dispose()


def _check_submit_answer(target: Target, response: Any, before: tuple[int, int]) -> None:
    """What every answer to ``POST /v1/experiments`` must satisfy, and what it left behind."""
    status = response.status_code
    assert status < 500, f"{status}: {response.text}"
    after = target.counts()
    if status == 201:
        assert after == (before[0] + 1, before[1] + 1), (before, after)
        return
    # 200 (idempotent replay) and every refusal: nothing new queued or written.
    assert after == before, (status, response.text, before, after)
    if status >= 400:
        body = response.json()
        assert isinstance(body.get("error"), str) and body["error"], body
        assert isinstance(body.get("message"), str) and body["message"], body
    if status == 409:
        assert body["error"] == "conflict" and "Idempotency-Key" in body["message"], body
    if status == 422:
        problems = body.get("problems")
        assert isinstance(problems, list) and problems, body
        for problem in problems:
            assert isinstance(problem.get("path"), str) and problem["path"].strip(), body
            assert isinstance(problem.get("message"), str) and problem["message"], body


def _run_operation(target: Target, operation: Any, mode: Any, checks: list[Any]) -> None:
    is_submit = operation.method.upper() == "POST" and operation.path == "/v1/experiments"

    @_settings()
    @given(case=operation.as_strategy(generation_mode=mode))
    def run(case: Any) -> None:
        before = target.counts() if is_submit else (0, 0)
        headers = target.auth(operation.path)
        response = case.call(headers=headers)
        assert response.status_code < 500, f"{case.as_curl_command(headers)} -> {response.text}"
        if is_submit:
            _check_submit_answer(target, response, before)
        elif response.status_code >= 400:
            assert response.json().get("error"), response.text
        case.validate_response(response, checks=checks, headers=headers)

    run()


def test_every_operation_fuzzed_without_server_errors(target: Target) -> None:
    schema = schemathesis.openapi.from_asgi("/openapi.json", target.app)
    checks = [
        schemathesis.checks.not_a_server_error,
        schemathesis.checks.response_schema_conformance,
        schemathesis.checks.content_type_conformance,
    ]
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 10
    for operation in operations:
        _run_operation(target, operation, schemathesis.GenerationMode.POSITIVE, checks)
        try:
            _run_operation(target, operation, schemathesis.GenerationMode.NEGATIVE, checks)
        except Unsatisfiable:
            # Nothing to mutate (no parameters, no body): /healthz and the like.
            assert not operation.path_parameters and not operation.query, operation.label


def _spec_openapi(raw: dict[str, Any]) -> dict[str, Any]:
    """The app's document with the spec's JSON Schema as the submit body, so its fields are fuzzed."""
    document = copy.deepcopy(raw)
    spec = json.loads(
        json.dumps(spec_json_schema()).replace('"#/$defs/', '"#/components/schemas/Spec')
    )
    components = document.setdefault("components", {}).setdefault("schemas", {})
    for name, definition in spec.pop("$defs", {}).items():
        components[f"Spec{name}"] = definition
    components["SpecExperimentSpec"] = spec
    operation = document["paths"]["/v1/experiments"]["post"]
    # Fuzz the body, not the bearer token (the sweep above covers missing auth).
    operation.pop("security", None)
    operation["requestBody"]["content"] = {
        "application/json": {"schema": {"$ref": "#/components/schemas/SpecExperimentSpec"}}
    }
    document["paths"] = {"/v1/experiments": {"post": operation}}
    return document


def test_spec_fields_fuzzed_from_the_spec_schema(target: Target, tmp_path: Path) -> None:
    raw = schemathesis.openapi.from_asgi("/openapi.json", target.app).raw_schema
    schema = schemathesis.openapi.from_dict(_spec_openapi(raw))
    schema.app = target.app
    (operation,) = [result.ok() for result in schema.get_all_operations()]
    checks = [schemathesis.checks.not_a_server_error]
    seen: dict[int, int] = {}
    client = TestClient(target.app)
    assert (
        client.post("/v1/experiments", json=VALID_SPEC, headers=target.auth("/")).status_code == 201
    )

    for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE):

        @_settings(100)
        @given(case=operation.as_strategy(generation_mode=mode))
        def run(case: Any) -> None:
            before = target.counts()
            headers = target.auth(operation.path)
            response = case.call(headers=headers)
            assert response.status_code in SUBMIT_STATUSES, (
                f"{case.as_curl_command(headers)} -> {response.status_code} {response.text}"
            )
            seen[response.status_code] = seen.get(response.status_code, 0) + 1
            _check_submit_answer(target, response, before)
            # run() is called in the same iteration, so `mode` is the current one.
            if mode == schemathesis.GenerationMode.POSITIVE and isinstance(case.body, dict):  # noqa: B023
                # The schema is looser than the validators (names, ranges, paths), so
                # most generated specs fail somewhere: also try each generated field
                # alone on a valid spec, which reaches both 201 and a one-field 422.
                for key, value in sorted(case.body.items()):
                    prior = target.counts()
                    answer = client.post(
                        "/v1/experiments", json={**VALID_SPEC, key: value}, headers=headers
                    )
                    assert answer.status_code in SUBMIT_STATUSES, (key, value, answer.text)
                    seen[answer.status_code] = seen.get(answer.status_code, 0) + 1
                    _check_submit_answer(target, answer, prior)
            case.validate_response(response, checks=checks, headers=headers)

        run()

    assert seen.get(201) and seen.get(422), seen  # some accepted, mutated ones refused
