"""A fake fitfleet API for unit tests of the client and the CLI's formatting.

Answers in the shapes of ``services/api/schemas.py`` through ``httpx.MockTransport``;
``requests`` records every call made.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import httpx

from cli.client import Client

CREATED = "2026-11-30T10:00:00Z"


def summary(run_id: str, name: str, state: str, **extra: Any) -> dict[str, Any]:
    return {
        "id": run_id,
        "name": name,
        "project": "vision",
        "state": state,
        "attempt": 1,
        "queue": "gpu",
        "priority": 0,
        "arch": "resnet18",
        "dataset": "digits",
        "tags": [],
        "cancel_requested": False,
        "created_at": CREATED,
        "updated_at": CREATED,
        "started_at": CREATED,
        "finished_at": None,
        **extra,
    }


def metric(final: float, best: float, higher: bool = False) -> dict[str, Any]:
    return {
        "final": final,
        "best": best,
        "best_stage": "stage-1",
        "best_epoch": 0,
        "higher_is_better": higher,
        "epochs": 2,
    }


def row(run_id: str, name: str, state: str, done: int, error_rate: float) -> dict[str, Any]:
    return {
        **summary(run_id, name, state),
        "current_stage": "stage-2" if state == "running" else None,
        "current_epoch": 0,
        "epochs_done": done,
        "epochs_total": 4,
        "progress": done / 4 if done else None,
        "sweep_id": None,
        "error": None,
        "metrics": {"error_rate": metric(error_rate, error_rate - 0.01)},
    }


def epoch(stage: str, index: int, error_rate: float) -> dict[str, Any]:
    return {
        "stage": stage,
        "epoch": index,
        "attempt": 1,
        "train_loss": 0.5,
        "valid_loss": 0.25,
        "metrics": {"error_rate": error_rate, "accuracy": 1 - error_rate},
        "seconds": 65.0,
        "images_per_second": 100.0,
        "lr": 0.001,
        "batch_size": 64,
        "recorded_at": CREATED,
    }


SPEC = {
    "name": "a",
    "data": {"source": "digits", "size": 16, "batch_size": 64, "augment": "default"},
    "model": {"arch": "resnet18", "pretrained": "none"},
    "metrics": ["error_rate", "accuracy"],
    "stages": [
        {"name": "stage-1", "train": "head", "epochs": 2, "max_lr": 0.003},
        {"name": "stage-2", "train": "all", "epochs": 2, "max_lr": [1e-6, 1e-4], "lr_find": True},
    ],
}
FILE_BYTES = b"hello artifact\n" * 100
FILE_SHA = hashlib.sha256(FILE_BYTES).hexdigest()


class FakeApi:
    """Routes -> canned answers; ``runs`` maps id -> what GET /v1/experiments/{id} says."""

    def __init__(self, token: str = "ff_good") -> None:
        self.token = token
        self.requests: list[httpx.Request] = []
        self.runs: dict[str, dict[str, Any]] = {
            "exp_a": {
                **summary("exp_a", "a", "succeeded"),
                "current_stage": "stage-2",
                "current_epoch": 1,
                "error": None,
                "submitted_by": "tok_1",
                "latest_metrics": epoch("stage-2", 1, 0.02),
                "spec": SPEC,
                "waiting_reason": None,
            },
            "exp_b": {
                **summary("exp_b", "b", "failed"),
                "current_stage": "stage-1",
                "current_epoch": 0,
                "error": "diverged: loss is nan",
                "submitted_by": "tok_1",
                "latest_metrics": epoch("stage-1", 0, 0.5),
                "spec": SPEC,
                "waiting_reason": None,
            },
        }
        self.events: list[dict[str, Any]] = [
            {
                "id": 1,
                "kind": "experiment.submitted",
                "message": "submitted",
                "data": {},
                "actor": "token:tok_1",
                "created_at": CREATED,
            },
            {
                "id": 2,
                "kind": "experiment.claimed",
                "message": "claimed by w1",
                "data": {},
                "actor": None,
                "created_at": CREATED,
            },
        ]
        self.redirect_to: str | None = None

    def client(self) -> Client:
        transport = httpx.MockTransport(self.handle)
        http = httpx.Client(base_url="http://fake", transport=transport)
        return Client("http://fake", self.token, http=http)

    def handle(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if request.url.host == "store.example":  # the presigned URL
            return httpx.Response(200, content=FILE_BYTES)
        if request.headers.get("authorization") != "Bearer ff_good":
            return httpx.Response(
                401, json={"error": "unauthorized", "message": "invalid or revoked token"}
            )
        path = request.url.path
        params = request.url.params
        if path == "/v1/runs":
            items = [row("exp_a", "a", "succeeded", 4, 0.02), row("exp_r", "r", "running", 1, 0.3)]
            return _json(
                {
                    "items": items,
                    "count": 2,
                    "limit": 50,
                    "offset": 0,
                    "sort": params.get("sort", "created"),
                }
            )
        if path == "/v1/experiments" and request.method == "POST":
            return _json(
                {
                    "id": "exp_new",
                    "state": "queued",
                    "name": "new",
                    "project": "vision",
                    "created_at": CREATED,
                }
            )
        if path == "/v1/me":
            return _json({"token_id": "tok_1", "project": "vision", "is_admin": False})
        if path == "/v1/compare":
            return _json(self.comparison())
        if path.startswith("/v1/experiments/"):
            return self.experiment(request, path.removeprefix("/v1/experiments/").split("/", 1))
        return httpx.Response(404, json={"error": "not_found", "message": "Not Found"})

    def experiment(self, request: httpx.Request, parts: list[str]) -> httpx.Response:
        run_id, rest = parts[0], (parts[1] if len(parts) > 1 else "")
        if run_id not in self.runs:
            return httpx.Response(
                404, json={"error": "not_found", "message": f"no experiment {run_id!r}"}
            )
        if rest == "":
            return _json(self.runs[run_id])
        if rest == "metrics":
            return _json([epoch("stage-1", 0, 0.1), epoch("stage-1", 1, 0.05)])
        if rest == "events":
            after = int(request.url.params.get("after", 0))
            items = [e for e in self.events if int(e["id"]) > after]
            return _json({"items": items, "last_id": items[-1]["id"] if items else None})
        if rest == "cancel":
            if self.runs[run_id]["state"] in ("succeeded", "failed", "cancelled"):
                return httpx.Response(
                    409, json={"error": "conflict", "message": f"{run_id} has already ended"}
                )
            return _json({**summary(run_id, "q", "cancelled")})
        if rest == "artifacts":
            items = [
                {
                    "id": 1,
                    "kind": "report",
                    "name": "report.json",
                    "uri": "file:///x",
                    "bytes": len(FILE_BYTES),
                    "sha256": FILE_SHA,
                    "created_at": CREATED,
                },
                {
                    "id": 2,
                    "kind": "plot",
                    "name": "plots/losses.png",
                    "uri": "file:///y",
                    "bytes": len(FILE_BYTES),
                    "sha256": FILE_SHA,
                    "created_at": CREATED,
                },
            ]
            return _json({"items": items, "count": 2})
        if rest.startswith("artifacts/"):
            if self.redirect_to:
                return httpx.Response(307, headers={"location": self.redirect_to})
            return httpx.Response(200, content=FILE_BYTES)
        if rest == "lr-find":
            return _json(
                {
                    "stages": [
                        {
                            "stage": "stage-2",
                            "points": [],
                            "suggestion": 0.00123,
                            "method": "steepest",
                        }
                    ]
                }
            )
        if rest == "interpretation":
            return _json(
                {
                    "status": "succeeded",
                    "classes": ["3", "7"],
                    "interpretation": None,
                    "findings": [{"severity": "warning", "message": "valid loss rose"}],
                }
            )
        return httpx.Response(404, json={"error": "not_found", "message": "Not Found"})

    def comparison(self) -> dict[str, Any]:
        runs = []
        for run_id, error_rate in (("exp_a", 0.02), ("exp_b", 0.04)):
            final = epoch("stage-2", 1, error_rate)
            runs.append(
                {
                    "experiment": summary(run_id, run_id[-1], "succeeded"),
                    "final": final,
                    "best": {
                        "error_rate": error_rate,
                        "accuracy": 1 - error_rate,
                        "valid_loss": 0.25,
                        "train_loss": 0.5,
                    },
                    "epochs": [final],
                }
            )
        return {
            "ids": ["exp_a", "exp_b"],
            "spec_differences": {"stages.0.max_lr": [0.003, 0.01]},
            "runs": runs,
        }


def _json(document: Any) -> httpx.Response:
    return httpx.Response(
        200, content=json.dumps(document), headers={"content-type": "application/json"}
    )
