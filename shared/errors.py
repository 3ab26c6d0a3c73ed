"""fitfleet's error tree: one base type with a ``code``; edges translate third-party errors.

```
FitfleetError
 +-- ConfigError          bad settings (unknown backend scheme, missing weights dir)
 +-- InvalidSpec          the spec itself is wrong; carries every field problem
 +-- NotFound
 +-- Conflict
 +-- BackendUnavailable   database, broker or store unreachable: retry later
 +-- StorageError         the artifact store refused or lost something
 +-- TrainingError
      +-- DataError       the data does not fit the spec (no image, regex matches nothing...)
      +-- WeightsMissing  a pretrained weight file is not in the weights folder
      +-- Diverged        the loss became NaN or infinite
      +-- Stopped         cancelled or interrupted; a checkpoint was saved first
```
"""

from __future__ import annotations

from dataclasses import dataclass


class FitfleetError(Exception):
    """Base of every error fitfleet raises on purpose."""

    code = "error"


class ConfigError(FitfleetError):
    """Settings that cannot work (unknown URL scheme, unusable folder)."""

    code = "config_error"


@dataclass(frozen=True)
class FieldProblem:
    """One problem in a spec: the dotted field path and a sentence saying why."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


class InvalidSpec(FitfleetError):
    """The spec is wrong; ``problems`` lists every offending field."""

    code = "invalid_spec"

    def __init__(self, problems: list[FieldProblem]) -> None:
        self.problems = problems
        super().__init__("; ".join(str(p) for p in problems))


class NotFound(FitfleetError):
    """The thing asked for does not exist (or is not visible to the caller)."""

    code = "not_found"


class Conflict(FitfleetError):
    """The request conflicts with the current state."""

    code = "conflict"


class BackendUnavailable(FitfleetError):
    """A server we depend on is unreachable; the operation may be retried."""

    code = "backend_unavailable"


class StorageError(FitfleetError):
    """The artifact store failed an operation."""

    code = "storage_error"


class TrainingError(FitfleetError):
    """A run cannot go on."""

    code = "training_error"


class DataError(TrainingError):
    """The data does not fit the spec; found before any training time is spent."""

    code = "data_error"


class WeightsMissing(TrainingError):
    """Pretrained weights were asked for but the file is not in the weights folder."""

    code = "weights_missing"


class Diverged(TrainingError):
    """The training loss became NaN or infinite."""

    code = "diverged"


class Stopped(TrainingError):
    """Training stopped on request (cancel, Ctrl-C) after saving a checkpoint."""

    code = "stopped"
