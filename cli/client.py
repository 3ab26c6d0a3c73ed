"""A small Python client for fitfleet's HTTP API: what the CLI uses, and the SDK.

    from cli.client import Client
    with Client("http://127.0.0.1:8000", token="ff_...") as api:
        run = api.submit(open("spec.yaml").read(), yaml=True)
        for row in api.metrics(run["id"]):
            ...

Errors come back as :class:`ApiError` carrying the status and the server's
JSON body (for a bad spec: every field problem), and an unreachable server as
:class:`ServerDown`, each with a sentence a person can act on.
"""

from __future__ import annotations

from types import TracebackType
from typing import Any

import httpx

TERMINAL = frozenset({"succeeded", "failed", "cancelled"})


class ApiError(Exception):
    """The server answered with an error status."""

    def __init__(self, status: int, body: Any) -> None:
        self.status = status
        self.body = body
        super().__init__(f"HTTP {status}: {body}")

    def lines(self) -> list[str]:
        """What to show a person: the field problems of a 422, else the error."""
        if isinstance(self.body, dict):
            problems = self.body.get("problems")
            if problems:
                return [f"{p.get('path')}: {p.get('message')}" for p in problems]
            message = self.body.get("message") or self.body.get("detail") or self.body.get("error")
            if message:
                return [str(message)]
        return [str(self.body)]


class ServerDown(Exception):
    """The server could not be reached at all."""


class Client:
    """Calls ``/v1`` with a bearer token; pass ``http`` to reuse or inject a client."""

    def __init__(
        self, base_url: str, token: str | None, *, http: httpx.Client | None = None
    ) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.base_url = base_url
        self._owned = http is None
        self.http = http or httpx.Client(base_url=base_url, timeout=30.0)
        self.http.headers.update(headers)

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection pool if this client made it."""
        if self._owned:
            self.http.close()

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise ServerDown(
                f"cannot reach the fitfleet server at {self.base_url} ({exc}); "
                "is `fitfleet api` running, and is --server / FITFLEET_SERVER_URL right?"
            ) from exc
        if response.status_code >= 400:
            try:
                body: Any = response.json()
            except ValueError:
                body = response.text
            raise ApiError(response.status_code, body)
        if "json" in response.headers.get("content-type", ""):
            return response.json()
        return response.text

    def submit(self, spec_text: str, *, yaml: bool, idempotency_key: str | None = None) -> Any:
        """POST a spec (YAML or JSON text); returns ``{id, state, ...}``."""
        headers = {"Content-Type": "application/yaml" if yaml else "application/json"}
        if idempotency_key:
            headers["Idempotency-Key"] = idempotency_key
        return self._call("POST", "/v1/experiments", content=spec_text.encode(), headers=headers)

    def get(self, experiment_id: str) -> Any:
        """One run: state, attempt, current stage and epoch, latest metrics, error."""
        return self._call("GET", f"/v1/experiments/{experiment_id}")

    def metrics(self, experiment_id: str) -> Any:
        """Every epoch row so far."""
        return self._call("GET", f"/v1/experiments/{experiment_id}/metrics")

    def list_runs(self, **filters: Any) -> Any:
        """A page of runs (filters: state, tag, name, arch, dataset, limit, offset)."""
        params = {k: v for k, v in filters.items() if v is not None}
        return self._call("GET", "/v1/experiments", params=params)

    def cancel(self, experiment_id: str) -> Any:
        """Cancel a queued run or ask a running one to stop."""
        return self._call("POST", f"/v1/experiments/{experiment_id}/cancel")

    def compare(self, ids: list[str]) -> Any:
        """Runs side by side with only the spec fields that differ."""
        return self._call("GET", "/v1/compare", params={"ids": ",".join(ids)})
