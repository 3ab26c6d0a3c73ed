"""The Python SDK for fitfleet's HTTP API (``/v1``); the ``fitfleet`` CLI is built on it.

    from cli.client import Client, TERMINAL

    with Client("http://127.0.0.1:8000", token="ff_...") as api:
        run = api.submit(open("spec.yaml").read(), yaml=True)     # {id, state, name, ...}
        while api.get(run["id"])["state"] not in TERMINAL:
            time.sleep(2)
        for row in api.metrics(run["id"]):                         # the epoch table
            print(row["stage"], row["epoch"], row["valid_loss"], row["metrics"])
        page = api.runs(project="vision", sort="best:error_rate", limit=10)
        table = api.compare([r["id"] for r in page["items"][:2]])  # only what differs
        for item in api.artifacts(run["id"])["items"]:
            api.download_artifact(run["id"], item["name"], f"out/{item['name']}",
                                  expected_sha256=item["sha256"])

Every method returns the server's JSON as plain dicts and lists, shaped like
the pydantic models in ``services/api/schemas.py`` (``RunPage``,
``Comparison``, ...; see ``docs/queries.md`` and ``/openapi.json``). Errors
come back as :class:`ApiError` carrying the status and the server's JSON body
(for a bad spec: every field problem), an unreachable server as
:class:`ServerDown`, each with a sentence a person can act on. See
``docs/sdk.md``.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx

TERMINAL = frozenset({"succeeded", "failed", "cancelled"})
ACTIVE = ("queued", "dispatched", "running")

_CHUNK = 1024 * 1024
_MAX_REDIRECTS = 5


class ApiError(Exception):
    """The server answered with an error status."""

    def __init__(self, status: int, body: Any, *, path: str | None = None) -> None:
        self.status = status
        self.body = body
        self.path = path  # the request's path, when known
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


class ChecksumMismatch(Exception):
    """A downloaded file's sha256 is not the one the artifact listing promised."""


@dataclass(frozen=True)
class Download:
    """A file :meth:`Client.download_artifact` wrote: where, how big, its sha256."""

    path: Path
    bytes: int
    sha256: str


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

    def _down(self, exc: Exception) -> ServerDown:
        return ServerDown(
            f"cannot reach the fitfleet server at {self.base_url} ({exc}); "
            "is `fitfleet api` running, and is --server / FITFLEET_SERVER_URL right?"
        )

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise self._down(exc) from exc
        if response.status_code >= 400:
            raise _api_error(response)
        if "json" in response.headers.get("content-type", ""):
            return response.json()
        return response.text

    @staticmethod
    def _params(filters: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in filters.items() if v is not None}

    # -- runs -------------------------------------------------------------------------

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
        return self._call("GET", "/v1/experiments", params=self._params(filters))

    def runs(
        self,
        *,
        state: str | None = None,
        project: str | None = None,
        tag: str | None = None,
        name: str | None = None,
        arch: str | None = None,
        dataset: str | None = None,
        sweep: str | None = None,
        sort: str | None = None,
        limit: int | None = None,
        offset: int | None = None,
    ) -> Any:
        """The runs page (``RunPage``): progress and every metric's final and best per run.

        ``sort``: ``created`` (default, newest first), ``name``, ``state``,
        ``best:<metric>`` or ``final:<metric>`` (best value first); ``-`` reverses.
        """
        params = self._params(
            {
                "state": state,
                "project": project,
                "tag": tag,
                "name": name,
                "arch": arch,
                "dataset": dataset,
                "sweep": sweep,
                "sort": sort,
                "limit": limit,
                "offset": offset,
            }
        )
        return self._call("GET", "/v1/runs", params=params)

    def cancel(self, experiment_id: str) -> Any:
        """Cancel a queued run or ask a running one to stop."""
        return self._call("POST", f"/v1/experiments/{experiment_id}/cancel")

    def events(self, experiment_id: str, *, after: int | None = None) -> Any:
        """A run's timeline (``EventList``) after event id ``after``, oldest first."""
        params = self._params({"after": after})
        return self._call("GET", f"/v1/experiments/{experiment_id}/events", params=params)

    def lr_find(self, experiment_id: str) -> Any:
        """Each stage's LR-finder curve and suggestion (``LrFindRead``)."""
        return self._call("GET", f"/v1/experiments/{experiment_id}/lr-find")

    def interpretation(self, experiment_id: str) -> Any:
        """Top losses, confusion matrix, most_confused and findings (needs ``report.json``)."""
        return self._call("GET", f"/v1/experiments/{experiment_id}/interpretation")

    # -- comparing ----------------------------------------------------------------------

    def compare(self, ids: list[str] | None = None, *, sweep: str | None = None) -> Any:
        """Runs (2..20 ids, or a sweep's) side by side with only the spec fields that differ."""
        if (ids is None) == (sweep is None):
            raise ValueError("compare takes ids or sweep, not both")
        params = {"sweep": sweep} if sweep is not None else {"ids": ",".join(ids or [])}
        return self._call("GET", "/v1/compare", params=params)

    def leaderboard(
        self,
        metric: str,
        *,
        dataset: str | None = None,
        sweep: str | None = None,
        state: str | None = None,
        limit: int | None = None,
    ) -> Any:
        """Runs of a dataset or sweep ranked by the best value of ``metric`` (``Leaderboard``)."""
        params = self._params(
            {"metric": metric, "dataset": dataset, "sweep": sweep, "state": state, "limit": limit}
        )
        return self._call("GET", "/v1/leaderboard", params=params)

    def datasets(self) -> Any:
        """Datasets the caller's runs used, with run counts and metrics (``DatasetList``)."""
        return self._call("GET", "/v1/datasets")

    def failures(self, *, project: str | None = None, limit: int | None = None) -> Any:
        """Failed runs grouped by reason, largest group first (``FailureList``)."""
        params = self._params({"project": project, "limit": limit})
        return self._call("GET", "/v1/failures", params=params)

    def me(self) -> Any:
        """Who this token is (``CallerRead``: token_id, project, is_admin)."""
        return self._call("GET", "/v1/me")

    # -- sweeps -------------------------------------------------------------------------

    def create_sweep(
        self,
        name: str,
        spec: dict[str, Any],
        parameters: dict[str, Any],
        *,
        strategy: str = "grid",
        count: int | None = None,
        seed: int = 0,
    ) -> Any:
        """Expand ``spec`` over ``parameters`` into one run per trial (``SweepRead``).

        ``parameters`` maps a dotted spec path (``stages.0.max_lr``) to a list of
        values, or for ``strategy="random"`` to ``{"low", "high", "log", "integer"}``.
        """
        body: dict[str, Any] = {
            "name": name,
            "spec": spec,
            "strategy": strategy,
            "parameters": parameters,
            "seed": seed,
        }
        if count is not None:
            body["count"] = count
        return self._call("POST", "/v1/sweeps", json=body)

    def sweeps(self) -> Any:
        """Sweeps the caller may see, newest first (``SweepList``)."""
        return self._call("GET", "/v1/sweeps")

    def sweep(self, sweep_id: str) -> Any:
        """One sweep, its trials and how many runs are in each state (``SweepRead``)."""
        return self._call("GET", f"/v1/sweeps/{sweep_id}")

    # -- artifacts ----------------------------------------------------------------------

    def artifacts(self, experiment_id: str) -> Any:
        """Every file the run produced, with size and sha256 (``ArtifactList``)."""
        return self._call("GET", f"/v1/experiments/{experiment_id}/artifacts")

    def download_artifact(
        self,
        experiment_id: str,
        name: str,
        dest: str | os.PathLike[str],
        *,
        expected_sha256: str | None = None,
        on_bytes: Callable[[int], None] | None = None,
    ) -> Download:
        """Stream one artifact to the file ``dest``, atomically (a temporary file, then rename).

        A redirect to a presigned store URL is followed without the bearer token.
        With ``expected_sha256`` a mismatch raises :class:`ChecksumMismatch`
        and leaves nothing at ``dest``. ``on_bytes(n)`` is called after each chunk
        written (for a progress bar).
        """
        dest = Path(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.parent / f".{dest.name}.{secrets.token_hex(6)}.part"
        # 0o666 less the umask, like any new file (mkstemp's 0600 would stick after the rename).
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            with os.fdopen(fd, "wb") as out:
                digest, size = self._stream_to(
                    f"/v1/experiments/{experiment_id}/artifacts/{name}", out, on_bytes
                )
                out.flush()
                os.fsync(out.fileno())
            if expected_sha256 is not None and digest != expected_sha256:
                raise ChecksumMismatch(
                    f"{name}: sha256 {digest} does not match the listing's {expected_sha256}"
                )
            os.replace(tmp, dest)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        return Download(path=dest, bytes=size, sha256=digest)

    def _stream_to(
        self, path: str, out: Any, on_bytes: Callable[[int], None] | None
    ) -> tuple[str, int]:
        digest = hashlib.sha256()
        size = 0
        try:
            request = self.http.build_request("GET", path)
            response = self.http.send(request, stream=True, follow_redirects=False)
            try:
                hops = 0
                while response.is_redirect:
                    hops += 1
                    location = response.headers.get("location")
                    if not location or hops > _MAX_REDIRECTS:
                        raise ApiError(response.status_code, "too many or empty redirects")
                    target = response.url.join(location)
                    response.close()
                    # A presigned URL carries its own credentials; ours must not go along.
                    same_origin = (target.scheme, target.host, target.port) == (
                        request.url.scheme,
                        request.url.host,
                        request.url.port,
                    )
                    headers = None if same_origin else {"Authorization": ""}
                    redirected = self.http.build_request("GET", target, headers=headers)
                    if not same_origin:
                        del redirected.headers["Authorization"]
                    response = self.http.send(redirected, stream=True, follow_redirects=False)
                if response.status_code >= 400:
                    response.read()
                    raise _api_error(response)
                for chunk in response.iter_bytes(_CHUNK):
                    out.write(chunk)
                    digest.update(chunk)
                    size += len(chunk)
                    if on_bytes is not None:
                        on_bytes(len(chunk))
            finally:
                response.close()
        except httpx.TransportError as exc:
            raise self._down(exc) from exc
        return digest.hexdigest(), size


def _api_error(response: httpx.Response) -> ApiError:
    try:
        body: Any = response.json()
    except ValueError:
        body = response.text
    return ApiError(response.status_code, body, path=response.request.url.path)
