"""fitfleet settings: every backend is a URL, every value comes from ``FITFLEET_*``.

Nothing is read at import time: call :func:`get_settings` (cached) so tests can
swap backends by setting the environment and clearing the cache.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


def _default_home() -> Path:
    return Path("~/.fitfleet").expanduser()


class Settings(BaseSettings):
    """Where things live. Hyper-parameters belong in the spec, never here."""

    model_config = SettingsConfigDict(env_prefix="FITFLEET_", env_nested_delimiter="__")

    home: Path = Field(default_factory=_default_home)
    weights_dir: Path | None = None
    data_roots: Annotated[list[Path], NoDecode] = Field(default_factory=list)
    cache_dir: Path | None = None
    # Where checkpoints, plots and reports go: file:///abs, memory:// or s3://bucket/prefix.
    # Empty means file://<home>/artifacts (filled in by _derived, once home is known).
    artifacts_url: str = ""
    s3_endpoint_url: str | None = None  # MinIO, moto or another S3-compatible endpoint
    s3_region: str = "us-east-1"
    # Empty means the embedded default, sqlite:///<home>/fitfleet.db (filled in below).
    database_url: str = Field("", validate_default=True)
    # The Celery broker. Empty means the embedded default, kombu's filesystem://
    # transport with its folders under <home>/broker (no server to run);
    # redis://host:6379/0 in production. See shared/celery.py.
    broker_url: str = ""
    # The API publishes a new run right after committing it (the dispatcher's
    # relay is the safety net for a publish that fails or a crash in between).
    publish_on_submit: bool = True
    # How long the API trusts a token it has checked (seconds): a revoked token
    # stops working within this. 0 checks the database on every request.
    auth_cache_s: float = Field(5.0, ge=0)
    # Submissions per second each API token may make (per API process), and
    # the burst it may spend at once; 0 turns the limit off. Over it: 429.
    submit_rate_per_s: float = Field(20.0, ge=0)
    submit_burst: int = Field(200, ge=1)
    # How long the nodes of a multi-node run wait for each other at torchrun's
    # rendezvous before the run goes back to the queue (seconds).
    gang_join_timeout_s: float = Field(120.0, gt=0)
    # A dispatched run still unclaimed after this long, while its queue is empty
    # in the broker, lost its message (a broker restart): the dispatcher sends
    # it again (seconds; see shared.runs.redispatch_lost).
    redispatch_after_s: float = Field(120.0, gt=0)
    # How long a run rides out an unreachable artifact store (uploads held,
    # training going on) before it fails saying so (seconds).
    store_outage_limit_s: float = Field(300.0, gt=0)
    # Overrides the command a worker task supervises (a JSON list, e.g.
    # FITFLEET_WORKER_CHILD_COMMAND='["python", "fake_trainer.py"]'); the
    # experiment id and "--worker-id ID" are appended. Empty means
    # [sys.executable, "-m", "workers.run_job"]. For tests and debugging.
    worker_child_command: list[str] = Field(default_factory=list)
    # How long a worker's lease lives without renewal, and how often the
    # supervising task renews it and polls for a cancel (seconds).
    worker_lease_ttl_s: float = Field(60.0, gt=0)
    worker_poll_s: float = Field(1.0, gt=0)
    # SIGTERM -> SIGKILL grace for the training process group (seconds).
    worker_grace_s: float = Field(10.0, ge=0)
    # The worker's name in the fleet (``GET /v1/admin/workers``). Empty means
    # "<hostname>:<pid of the Celery main process>"; set it when a stable name
    # matters more than telling restarts apart (a pod name, a test).
    worker_name: str = ""
    # GPUs the worker offers per node. None means what nvidia-smi finds (0 on a
    # CPU machine); on a CPU machine a number means that many gloo CPU ranks.
    worker_gpus: int | None = Field(None, ge=0, le=64)
    # How often a worker's main process heartbeats (seconds). A worker is shown
    # ``lost`` once its last heartbeat is older than ``worker_lost_after_s``;
    # API, dispatcher and workers must agree on it (same environment).
    worker_heartbeat_s: float = Field(5.0, gt=0)
    # Empty (0) means 3 heartbeats: one late beat (a GC pause, a slow commit)
    # must not flap a worker to lost, three missed ones mean it is gone.
    worker_lost_after_s: float = Field(0.0, ge=0)

    @field_validator("data_roots", mode="before")
    @classmethod
    def _split_roots(cls, value: Any) -> Any:
        """Accept ``a:b`` (like PATH) or ``a,b`` as well as a list."""
        if isinstance(value, str):
            parts = [p for chunk in value.split(os.pathsep) for p in chunk.split(",")]
            return [p.strip() for p in parts if p.strip()]
        return value

    @field_validator("database_url", mode="after")
    @classmethod
    def _default_database_url(cls, value: str, info: ValidationInfo) -> str:
        """Default to a SQLite file in ``home``: one machine, nothing to install."""
        if value:
            return value
        home = Path(info.data.get("home") or _default_home()).expanduser()
        return f"sqlite:///{(home / 'fitfleet.db').absolute()}"

    @model_validator(mode="after")
    def _derived(self) -> Settings:
        self.home = self.home.expanduser()
        if self.weights_dir is None:
            self.weights_dir = self.home / "weights"
        if self.cache_dir is None:
            self.cache_dir = self.home / "cache"
        if not self.broker_url:
            self.broker_url = "filesystem://"
        if not self.artifacts_url:
            self.artifacts_url = (self.home / "artifacts").absolute().as_uri()
        if not self.worker_lost_after_s:
            self.worker_lost_after_s = 3 * self.worker_heartbeat_s
        if not self.data_roots:
            self.data_roots = [self.home / "datasets"]
        self.data_roots = [p.expanduser() for p in self.data_roots]
        return self

    @property
    def broker_folder(self) -> Path:
        """Where the embedded ``filesystem://`` broker keeps its messages (under ``home``)."""
        return self.home / "broker"

    @property
    def weights_path(self) -> Path:
        """The weights folder (never None after validation)."""
        assert self.weights_dir is not None
        return self.weights_dir


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process's settings, read once from the environment."""
    return Settings()
