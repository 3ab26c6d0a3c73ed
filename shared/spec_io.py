"""Reading a spec from YAML or JSON text, with every problem named by its field path."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from shared.errors import FieldProblem, InvalidSpec
from shared.spec import ExperimentSpec


def parse_spec_text(text: str, *, source: str = "spec") -> dict[str, Any]:
    """Parse YAML or JSON (JSON is YAML) into a mapping, or raise InvalidSpec."""
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise InvalidSpec([FieldProblem(source, f"not valid YAML/JSON{where}: {problem}")]) from exc
    if not isinstance(document, dict):
        raise InvalidSpec(
            [FieldProblem(source, "must be a mapping with version, name, data, stages")]
        )
    return document


def problems_from_validation(error: ValidationError) -> list[FieldProblem]:
    """Turn pydantic's errors into field paths people can read (``stages.1.max_lr``)."""
    problems = []
    for item in error.errors():
        loc = _readable_location(item["loc"])
        path = ".".join(loc) or "spec"
        message = item["msg"].removeprefix("Value error, ")
        problems.append(FieldProblem(path, message))
    # A union reports one error per member it tried; say it once, listing the forms.
    by_path: dict[str, list[str]] = {}
    for problem in problems:
        messages = by_path.setdefault(problem.path, [])
        if problem.message not in messages:
            messages.append(problem.message)
    return [
        FieldProblem(
            path, msgs[0] if len(msgs) == 1 else "no accepted form fits: " + "; ".join(msgs)
        )
        for path, msgs in by_path.items()
    ]


_LABEL_TAGS = {"folder", "csv", "table", "regex", "function", "lists"}
_SPLIT_TAGS = {"random", "folder", "column"}


def _readable_location(raw: tuple[int | str, ...]) -> list[str]:
    """Drop the union members' tags pydantic adds to error locations.

    ``("data", "labels", "regex", "pattern")`` reads ``data.labels.pattern``:
    the path a user writes.  Union members show up as type names
    (``RandomSplit``, ``float``, ``list[float]``...), which are dropped too.
    """
    parts: list[str] = []
    for part in (str(p) for p in raw):
        if parts and parts[-1] == "labels" and part in _LABEL_TAGS:
            continue
        if parts and parts[-1] == "split" and part in _SPLIT_TAGS:
            continue
        if part[:1].isupper() or part.startswith(("function-", "literal[", "tagged-union[")):
            continue
        if part in {"int", "float", "str", "bool"} or part.startswith(("list[", "tuple[", "dict[")):
            continue
        parts.append(part)
    return parts


def validate_spec(document: dict[str, Any]) -> ExperimentSpec:
    """Validate a mapping as an ExperimentSpec, or raise InvalidSpec with every problem.

    Text with control characters (a NUL above all, which Postgres cannot store
    and no file name or label needs) is refused first, naming the field.
    """
    control = list(_control_characters(document, ""))
    if control:
        raise InvalidSpec(
            [FieldProblem(path or "body", "contains a control character") for path in control]
        )
    try:
        return ExperimentSpec.model_validate(document)
    except ValidationError as exc:
        raise InvalidSpec(problems_from_validation(exc)) from exc


_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def _control_characters(value: Any, path: str) -> Iterator[str]:
    """Dotted paths (``stages.0.name``) of strings, keys included, with control characters."""
    if isinstance(value, str):
        if _CONTROL.search(value):
            yield path
    elif isinstance(value, dict):
        for key, item in value.items():
            child = f"{path}.{key}" if path else str(key)
            if isinstance(key, str) and _CONTROL.search(key):
                yield child
            yield from _control_characters(item, child)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _control_characters(item, f"{path}.{index}" if path else str(index))


def load_spec_text(text: str, *, source: str = "spec") -> ExperimentSpec:
    """Parse and validate spec text (YAML or JSON)."""
    return validate_spec(parse_spec_text(text, source=source))


def load_spec_file(path: Path) -> ExperimentSpec:
    """Read and validate a spec file; a missing or unreadable file is a problem too."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise InvalidSpec(
            [FieldProblem(str(path), f"cannot read the file: {exc.strerror}")]
        ) from exc
    return load_spec_text(text, source=str(path))


def spec_json_schema() -> dict[str, Any]:
    """The published JSON Schema of spec v1 (by alias, so ``from`` is spelled as users write it)."""
    return ExperimentSpec.model_json_schema(by_alias=True)


def dump_spec(spec: ExperimentSpec) -> dict[str, Any]:
    """The spec as plain JSON data, keys spelled as users write them."""
    result: dict[str, Any] = json.loads(spec.model_dump_json(by_alias=True))
    return result
