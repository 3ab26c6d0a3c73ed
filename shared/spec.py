"""The experiment spec, version 1: the one model the API, the CLI and the worker read.

Every default is fastai v1's (1.0.61) unless its field says otherwise; see
``../shared/reference/fastai-v1-semantics.md``.  Unknown keys are an error so a
typo can never be silently ignored, and every model is frozen so a validated
spec cannot drift while a run uses it.
"""

from __future__ import annotations

import re
from pathlib import PurePosixPath
from typing import Annotated, Any, Literal, get_args

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    field_validator,
    model_validator,
)

Architecture = Literal[
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "mobilenet_v3_small",
    "mobilenet_v3_large",
]
ARCHITECTURES: tuple[str, ...] = get_args(Architecture)
SINGLE_LABEL_METRICS = ("error_rate", "accuracy")
MULTI_LABEL_METRICS = ("accuracy_thresh", "fbeta")
Metric = Literal["error_rate", "accuracy", "accuracy_thresh", "fbeta"]

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$")
_DURATION_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
_PRETRAINED = re.compile(r"^(imagenet|none|run:[A-Za-z0-9_.-]+(?::[A-Za-z0-9_.-]+)?)$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")

# What the validators below check, also written into the published JSON Schema
# so editors flag it as people type. Keywords of JSON Schema apply to their
# own type only ("pattern" to strings, "minimum" to numbers, "items" to
# arrays), so one set of them fits a field that takes several types.
_SIZE_SCHEMA: dict[str, Any] = {
    "minimum": 8,
    "maximum": 4096,
    "items": {"minimum": 8, "maximum": 4096},
}
_DROPOUT_SCHEMA: dict[str, Any] = {
    "minimum": 0,
    "exclusiveMaximum": 1,
    "items": {"minimum": 0, "exclusiveMaximum": 1},
}
_MAX_LR_SCHEMA: dict[str, Any] = {
    "exclusiveMinimum": 0,
    "items": {"exclusiveMinimum": 0},
    "minItems": 1,
    "maxItems": 2,
}


class _Model(BaseModel):
    """Base for every spec part: unknown keys forbidden, values frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def _relative_path(value: str, field: str) -> str:
    """Refuse absolute paths and ``..`` so a spec can never point outside its source."""
    path = PurePosixPath(value.replace("\\", "/"))
    if path.is_absolute() or ".." in path.parts:
        raise ValueError(f"{field} must be a relative path inside data.source, got {value!r}")
    if not value.strip():
        raise ValueError(f"{field} must not be empty")
    return value


# --------------------------------------------------------------------------- labels


class FolderLabels(_Model):
    """Label = name of the image's parent folder (fastai ``from_folder``)."""

    from_: Literal["folder"] = Field("folder", alias="from")


class CsvLabels(_Model):
    """Labels from a CSV stored with the data (fastai ``from_csv``)."""

    from_: Literal["csv"] = Field(alias="from")
    file: str = "labels.csv"
    fn_col: str | int = 0
    label_col: str | int = 1
    label_delim: str | None = None
    suffix: str = ""
    folder: str | None = None
    delimiter: str = ","

    @field_validator("file", "folder")
    @classmethod
    def _inside(cls, value: str | None) -> str | None:
        return None if value is None else _relative_path(value, "path")


class TableRow(_Model):
    """One inline row of a ``table`` label strategy."""

    file: str
    label: str | list[str]

    @field_validator("file")
    @classmethod
    def _inside(cls, value: str) -> str:
        return _relative_path(value, "file")


class TableLabels(_Model):
    """Labels from a table (fastai ``from_df``): rows sent inline, or a csv/parquet file."""

    from_: Literal["table"] = Field(alias="from")
    rows: list[TableRow] | None = None
    file: str | None = None
    fn_col: str | int = 0
    label_col: str | int = 1
    label_delim: str | None = None
    suffix: str = ""
    folder: str | None = None

    @field_validator("file", "folder")
    @classmethod
    def _inside(cls, value: str | None) -> str | None:
        return None if value is None else _relative_path(value, "path")

    @model_validator(mode="after")
    def _one_source(self) -> TableLabels:
        if (self.rows is None) == (self.file is None):
            raise ValueError("table labels need exactly one of 'rows' (inline) or 'file'")
        if self.rows is not None and not self.rows:
            raise ValueError("rows must not be empty")
        return self


def _nested_repeat(pattern: str) -> bool:
    """Whether ``pattern`` has an unbounded repeat inside another: the catastrophic kind.

    Python's ``re`` backtracks and cannot be interrupted, so a pattern such as
    ``(a+)+$`` could hold a worker for hours on one file name. Refusing nested
    unbounded quantifiers at submission removes the classic cases (star height
    above one), before any worker sees the pattern.
    """
    from re import _constants as constants  # type: ignore[attr-defined]
    from re import _parser as parser  # type: ignore[attr-defined]

    repeats = {constants.MAX_REPEAT, constants.MIN_REPEAT}
    repeats |= {getattr(constants, "POSSESSIVE_REPEAT", constants.MAX_REPEAT)}

    def walk(items: Any, inside: bool) -> bool:
        for op, arg in items:
            if op in repeats:
                _low, high, sub = arg
                unbounded = high == constants.MAXREPEAT or high > 1
                found = (unbounded and inside) or walk(sub, inside or unbounded)
            elif op == constants.SUBPATTERN:
                found = walk(arg[-1], inside)
            elif op == constants.BRANCH:
                found = any(walk(branch, inside) for branch in arg[1])
            elif op in (constants.ASSERT, constants.ASSERT_NOT):
                found = walk(arg[1], inside)
            else:
                found = False
            if found:
                return True
        return False

    return walk(parser.parse(pattern), False)


class RegexLabels(_Model):
    """Label = first group of ``pattern`` searched in the POSIX path relative to the source."""

    from_: Literal["regex"] = Field(alias="from")
    pattern: str = Field(max_length=500)

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, value: str) -> str:
        try:
            compiled = re.compile(value)
        except re.error as exc:
            raise ValueError(f"pattern is not a valid regular expression: {exc}") from exc
        if compiled.groups < 1:
            raise ValueError("pattern needs a capturing group: its first group is the label")
        if _nested_repeat(value):
            raise ValueError(
                "pattern repeats a repetition, like (a+)+: matching it can take exponential "
                "time on some file names; write it with a single quantifier"
            )
        return value


class FunctionLabels(_Model):
    """Label from a *registered* function: code is never accepted from a request."""

    from_: Literal["function"] = Field(alias="from")
    name: str
    args: dict[str, Any] = Field(default_factory=dict)


class ListsLabels(_Model):
    """Files and labels given as two lists of the same length (fastai ``from_lists``)."""

    from_: Literal["lists"] = Field(alias="from")
    files: list[str] = Field(min_length=1)
    labels: list[str | list[str]] = Field(min_length=1)

    @field_validator("files")
    @classmethod
    def _inside(cls, value: list[str]) -> list[str]:
        return [_relative_path(v, "files[]") for v in value]

    @model_validator(mode="after")
    def _same_length(self) -> ListsLabels:
        if len(self.files) != len(self.labels):
            raise ValueError(
                f"files and labels must have the same length ({len(self.files)} files, "
                f"{len(self.labels)} labels)"
            )
        return self


Labels = Annotated[
    FolderLabels | CsvLabels | TableLabels | RegexLabels | FunctionLabels | ListsLabels,
    Field(discriminator="from_"),
]


# --------------------------------------------------------------------------- split


class RandomSplit(_Model):
    """Random, reproducible split; fastai's order (valid in permutation order)."""

    valid_pct: float = Field(0.2, ge=0.0, lt=1.0)
    seed: int = 42  # fitfleet default; fastai's is None (not reproducible)


class FolderSplit(_Model):
    """Split by the first path component under the source (fastai ``split_by_folder``)."""

    by: Literal["folder"] = "folder"
    train: str = "train"
    valid: str = "valid"


class ColumnSplit(_Model):
    """Split by a boolean column of the csv/table labels."""

    by: Literal["column"] = "column"
    column: str = "is_valid"


def _split_kind(value: Any) -> str:
    """Which split form a raw value is: ``by`` names it, otherwise it is random."""
    if isinstance(value, dict):
        return str(value.get("by", "random"))
    return str(getattr(value, "by", "random"))


Split = Annotated[
    Annotated[RandomSplit, Tag("random")]
    | Annotated[FolderSplit, Tag("folder")]
    | Annotated[ColumnSplit, Tag("column")],
    Discriminator(
        _split_kind,
        custom_error_type="split_form",
        custom_error_message="split is {valid_pct, seed}, {by: folder, ...} or {by: column, ...}",
    ),
]


# --------------------------------------------------------------------------- data


class Augment(_Model):
    """fastai ``get_transforms()`` parameters; the defaults are fastai's."""

    flip: bool = True
    flip_vert: bool = False
    max_rotate: float = Field(10.0, ge=0.0, le=180.0)
    max_zoom: float = Field(1.1, ge=1.0, le=4.0)
    max_lighting: float = Field(0.2, ge=0.0, lt=1.0)
    max_warp: float = Field(0.2, ge=0.0, lt=1.0)
    p_affine: float = Field(0.75, ge=0.0, le=1.0)
    p_lighting: float = Field(0.75, ge=0.0, le=1.0)


class Data(_Model):
    """Where the images are and how they are read."""

    source: str
    labels: Labels = Field(default_factory=FolderLabels)
    split: Split | None = None
    test: str | None = None
    size: int | tuple[int, int] = Field(224, json_schema_extra=_SIZE_SCHEMA)
    resize: Literal["crop", "pad", "squish"] | None = None
    batch_size: int = Field(64, ge=1, le=65536)
    augment: Literal["default", "none"] | Augment = "default"
    normalize: Literal["imagenet", "dataset", "none"] = "imagenet"

    @field_validator("source")
    @classmethod
    def _source(cls, value: str) -> str:
        if value.startswith("s3://"):
            if len(value) <= len("s3://") or value[5] == "/":
                raise ValueError("s3 source needs a bucket: s3://bucket/prefix")
            return value
        if value.startswith("file://"):
            if not value.startswith("file:///"):
                raise ValueError("file source must be absolute: file:///abs/path")
            return value
        if "://" in value:
            raise ValueError(
                f"unsupported source scheme in {value!r}: use s3://, file:/// or a path"
            )
        if value.startswith("/"):
            return value
        return _relative_path(value, "source")

    @field_validator("test")
    @classmethod
    def _test(cls, value: str | None) -> str | None:
        return None if value is None else _relative_path(value, "test")

    @field_validator("size")
    @classmethod
    def _size(cls, value: int | tuple[int, int]) -> int | tuple[int, int]:
        dims = (value,) if isinstance(value, int) else value
        if any(d < 8 or d > 4096 for d in dims):
            raise ValueError("size must be between 8 and 4096 pixels")
        return value

    @model_validator(mode="after")
    def _split_fits_labels(self) -> Data:
        if isinstance(self.split, ColumnSplit) and not isinstance(
            self.labels, CsvLabels | TableLabels
        ):
            raise ValueError("split by column needs csv or table labels")
        return self

    @property
    def resolved_split(self) -> RandomSplit | FolderSplit | ColumnSplit:
        """fastai's default: by folder for folder labels, else a random 20%."""
        if self.split is not None:
            return self.split
        if isinstance(self.labels, FolderLabels):
            return FolderSplit(by="folder")
        return RandomSplit()

    @property
    def resolved_resize(self) -> Literal["crop", "pad", "squish"]:
        """fastai: an int size crops, a (height, width) size squishes."""
        if self.resize is not None:
            return self.resize
        return "crop" if isinstance(self.size, int) else "squish"

    @property
    def augment_params(self) -> Augment | None:
        """The augmentation parameters, or None when augmentation is off."""
        if self.augment == "none":
            return None
        if self.augment == "default":
            return Augment()
        return self.augment

    @property
    def is_multi_label(self) -> bool:
        """True when labels are declared multi-label by the spec itself."""
        labels = self.labels
        if isinstance(labels, CsvLabels | TableLabels) and labels.label_delim is not None:
            return True
        if isinstance(labels, TableLabels) and labels.rows:
            return isinstance(labels.rows[0].label, list)
        if isinstance(labels, ListsLabels):
            return isinstance(labels.labels[0], list)
        return False


# --------------------------------------------------------------------------- model


class Head(_Model):
    """fastai's ``create_head`` parameters."""

    ps: float | list[float] = Field(0.5, json_schema_extra=_DROPOUT_SCHEMA)
    lin_ftrs: list[int] = Field(default_factory=lambda: [512])
    concat_pool: bool = True
    bn_final: bool = False

    @field_validator("ps")
    @classmethod
    def _ps(cls, value: float | list[float]) -> float | list[float]:
        values = value if isinstance(value, list) else [value]
        if any(p < 0 or p >= 1 for p in values):
            raise ValueError("dropout probabilities must be in [0, 1)")
        return value

    @model_validator(mode="after")
    def _ps_length(self) -> Head:
        if isinstance(self.ps, list) and len(self.ps) != len(self.lin_ftrs) + 1:
            raise ValueError(
                f"ps as a list needs one value per Linear layer ({len(self.lin_ftrs) + 1})"
            )
        return self


class ModelSpec(_Model):
    """Which network: a torchvision body with fastai's head."""

    arch: Architecture = "resnet34"
    pretrained: str = Field("imagenet", json_schema_extra={"pattern": _PRETRAINED.pattern})
    head: Head = Field(default_factory=Head)

    @field_validator("pretrained")
    @classmethod
    def _pretrained(cls, value: str) -> str:
        if not _PRETRAINED.match(value):
            raise ValueError(
                "pretrained must be 'imagenet', 'none' or 'run:<experiment-id>[:<stage>]'"
            )
        return value

    @property
    def pretrained_run(self) -> tuple[str, str | None] | None:
        """(experiment id, stage or None) for ``run:`` weights, else None."""
        if not self.pretrained.startswith("run:"):
            return None
        _, run_id, *stage = self.pretrained.split(":")
        return run_id, (stage[0] if stage else None)


# --------------------------------------------------------------------------- stages


class LrFind(_Model):
    """fastai ``lr_find`` parameters; ``suggest`` picks the suggestion rule."""

    start_lr: float = Field(1e-7, gt=0)
    end_lr: float = Field(10.0, gt=0)
    num_it: int = Field(100, ge=6, le=10000)
    stop_div: bool = True
    suggest: Literal["steep", "minimum", "valley"] = "steep"

    @model_validator(mode="after")
    def _range(self) -> LrFind:
        if self.end_lr <= self.start_lr:
            raise ValueError("end_lr must be greater than start_lr")
        return self


class Stage(_Model):
    """One fit call: what trains, for how long, at which learning rates."""

    name: str = Field(json_schema_extra={"pattern": _NAME.pattern})
    train: Literal["head", "all"] = "head"
    epochs: int = Field(ge=1, le=10000)
    max_lr: float | list[float] | Literal["suggested"] | None = Field(
        None, json_schema_extra=_MAX_LR_SCHEMA
    )
    lr_find: bool | LrFind = False
    keep: Literal["last", "best", "better"] = "last"
    schedule: Literal["one_cycle", "constant"] = "one_cycle"
    pct_start: float = Field(0.3, gt=0.0, lt=1.0)
    div_factor: float = Field(25.0, gt=0.0)
    final_div: float | None = None
    moms: tuple[float, float] = (0.95, 0.85)
    wd: float = Field(1e-2, ge=0.0)

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not _NAME.match(value):
            raise ValueError("stage name: letters, digits, '_', '.', '-' (max 64), e.g. stage-1")
        return value

    @field_validator("max_lr")
    @classmethod
    def _max_lr(cls, value: float | list[float] | str | None) -> float | list[float] | str | None:
        if isinstance(value, float | int) and not isinstance(value, bool) and value <= 0:
            raise ValueError("max_lr must be positive")
        if isinstance(value, list):
            if len(value) not in (1, 2) or any(v <= 0 for v in value):
                raise ValueError("max_lr as a list is [high] or [low, high], all positive")
            if len(value) == 2 and value[0] > value[1]:
                raise ValueError("max_lr [low, high] needs low <= high")
        return value

    @property
    def lr_find_params(self) -> LrFind | None:
        """The finder's parameters when it runs (also implied by ``max_lr: suggested``)."""
        if isinstance(self.lr_find, LrFind):
            return self.lr_find
        if self.lr_find or self.max_lr == "suggested":
            return LrFind()
        return None


# --------------------------------------------------------------------------- rest


class ShowBatch(_Model):
    """``data.show_batch(rows=...)``."""

    rows: int = Field(3, ge=1, le=10)


class Interpret(_Model):
    """What the interpretation step computes and plots."""

    show_batch: ShowBatch | None = Field(default_factory=ShowBatch)
    top_losses: int = Field(9, ge=0, le=100)
    confusion_matrix: bool = True
    most_confused_min: int = Field(2, ge=1)


class Resources(_Model):
    """Where and how the run executes."""

    queue: str = Field("gpu", pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    gpus: int = Field(1, ge=0, le=64)
    nodes: int = Field(1, ge=1, le=64)
    # fitfleet extension: SyncBatchNorm across DDP ranks (CUDA only; torch has no
    # CPU implementation, so CPU ranks keep per-rank statistics and say so).
    sync_bn: bool = False
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    priority: int = Field(5, ge=0, le=9)
    max_restarts: int = Field(3, ge=0, le=100)
    timeout: str | int = Field("6h", json_schema_extra={"pattern": _DURATION.pattern, "minimum": 1})

    @field_validator("timeout")
    @classmethod
    def _timeout(cls, value: str | int) -> str | int:
        _duration_seconds(value)
        return value

    @property
    def timeout_seconds(self) -> float:
        """``timeout`` in seconds ("90m", "6h", "1d" or plain seconds)."""
        return _duration_seconds(self.timeout)


def _duration_seconds(value: str | int) -> float:
    if isinstance(value, int):
        if value <= 0:
            raise ValueError("timeout must be positive")
        return float(value)
    match = _DURATION.match(value)
    if not match or float(match.group(1)) <= 0:
        raise ValueError("timeout must look like 90s, 30m, 6h or 1d")
    return float(match.group(1)) * _DURATION_UNITS[match.group(2)]


def _default_metrics() -> list[Metric]:
    return ["error_rate"]


class ExperimentSpec(_Model):
    """A whole experiment: data, model, staged schedule, interpretation, resources."""

    version: Literal[1] = 1
    name: str = Field(min_length=1, max_length=200)
    project: str = Field("default", pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    tags: list[str] = Field(default_factory=list, max_length=50)
    seed: int = 42  # fitfleet extension: one seed for weights init, shuffling and augmentation
    data: Data
    model: ModelSpec = Field(default_factory=ModelSpec)
    metrics: list[Metric] = Field(default_factory=lambda: _default_metrics())
    stages: list[Stage] = Field(min_length=1, max_length=50)
    interpret: Interpret = Field(default_factory=Interpret)
    resources: Resources = Field(default_factory=Resources)

    @model_validator(mode="after")
    def _coherent(self) -> ExperimentSpec:
        names = [s.name for s in self.stages]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"stage names must be unique, repeated: {', '.join(duplicates)}")
        if self.data.is_multi_label:
            wrong = [m for m in self.metrics if m in SINGLE_LABEL_METRICS]
            if wrong:
                raise ValueError(
                    f"metrics {wrong} are single-label; "
                    "multi-label data uses accuracy_thresh, fbeta"
                )
        elif any(m in MULTI_LABEL_METRICS for m in self.metrics) and not isinstance(
            self.data.labels, CsvLabels | TableLabels | ListsLabels
        ):
            raise ValueError("accuracy_thresh and fbeta need multi-label data (label_delim)")
        if len(set(self.metrics)) != len(self.metrics):
            raise ValueError("metrics must not repeat")
        return self
