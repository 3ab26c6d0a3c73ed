"""Spec v1: fastai's defaults, every problem named by its field path, nothing unknown accepted."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from shared.errors import InvalidSpec
from shared.spec import (
    Augment,
    ColumnSplit,
    CsvLabels,
    FolderSplit,
    RandomSplit,
    RegexLabels,
)
from shared.spec_io import load_spec_file, load_spec_text, spec_json_schema, validate_spec

DESIGN_EXAMPLE = Path(__file__).resolve().parent / "fixtures" / "design-spec-example.yaml"


def minimal(**extra: object) -> dict[str, object]:
    spec: dict[str, object] = {
        "version": 1,
        "name": "x",
        "data": {"source": "pets"},
        "stages": [{"name": "stage-1", "epochs": 1}],
    }
    spec.update(extra)
    return spec


def problems(document: dict[str, object] | str) -> dict[str, str]:
    load = load_spec_text if isinstance(document, str) else validate_spec
    with pytest.raises(InvalidSpec) as caught:
        load(document)  # type: ignore[operator]
    return {p.path: p.message for p in caught.value.problems}


def test_the_design_documents_example_is_valid() -> None:
    spec = load_spec_file(DESIGN_EXAMPLE)
    assert spec.name == "mnist-sample-3v7"
    assert spec.stages[1].lr_find_params is not None
    assert spec.stages[1].max_lr == [1e-6, 1e-4]
    assert spec.resources.timeout_seconds == 6 * 3600


def test_fastai_defaults() -> None:
    spec = validate_spec(minimal())
    assert spec.data.batch_size == 64
    assert spec.data.size == 224 and spec.data.resolved_resize == "crop"
    assert spec.data.augment_params == Augment()
    assert Augment() == Augment(
        flip=True,
        flip_vert=False,
        max_rotate=10.0,
        max_zoom=1.1,
        max_lighting=0.2,
        max_warp=0.2,
        p_affine=0.75,
        p_lighting=0.75,
    )
    assert spec.data.normalize == "imagenet"
    assert spec.model.arch == "resnet34" and spec.model.pretrained == "imagenet"
    assert spec.model.head.ps == 0.5 and spec.model.head.lin_ftrs == [512]
    stage = spec.stages[0]
    assert stage.max_lr is None  # = fastai's slice(3e-3)
    assert (stage.pct_start, stage.div_factor, stage.final_div) == (0.3, 25.0, None)
    assert stage.moms == (0.95, 0.85) and stage.wd == 1e-2
    assert stage.schedule == "one_cycle" and stage.keep == "last"
    assert spec.metrics == ["error_rate"]


def test_split_defaults_follow_the_label_strategy() -> None:
    folder = validate_spec(minimal())
    assert isinstance(folder.data.resolved_split, FolderSplit)
    regex = validate_spec(
        minimal(data={"source": "p", "labels": {"from": "regex", "pattern": "(a)"}})
    )
    assert isinstance(regex.data.resolved_split, RandomSplit)
    assert regex.data.resolved_split.valid_pct == 0.2


def test_size_pair_squishes_like_fastai() -> None:
    spec = validate_spec(minimal(data={"source": "p", "size": [32, 48]}))
    assert spec.data.size == (32, 48) and spec.data.resolved_resize == "squish"


def test_every_problem_is_reported_with_its_path() -> None:
    found = problems(
        {
            "version": 1,
            "name": "x",
            "colour": "red",
            "data": {"source": "p", "batch_size": 0, "split": {"valid_pct": 1.5}},
            "model": {"arch": "resnet9000"},
            "stages": [{"name": "a", "epochs": 0, "max_lr": [3e-3, 1e-4]}],
        }
    )
    assert set(found) == {
        "colour",
        "data.batch_size",
        "data.split.valid_pct",
        "model.arch",
        "stages.0.epochs",
        "stages.0.max_lr",
    }
    assert "Extra inputs are not permitted" in found["colour"]
    assert "low <= high" in found["stages.0.max_lr"]


def test_label_strategy_fields_are_named_as_users_write_them() -> None:
    found = problems(minimal(data={"source": "p", "labels": {"from": "regex", "pattern": "a+"}}))
    assert found == {
        "data.labels.pattern": "pattern needs a capturing group: its first group is the label"
    }
    found = problems(minimal(data={"source": "p", "labels": {"from": "regex", "pattern": "(a"}}))
    assert "not a valid regular expression" in found["data.labels.pattern"]
    found = problems(minimal(data={"source": "p", "labels": {"from": "magic"}}))
    assert "data.labels" in found and "'folder'" in found["data.labels"]


def test_lists_must_have_the_same_length() -> None:
    found = problems(
        minimal(data={"source": "p", "labels": {"from": "lists", "files": ["a.png"], "labels": []}})
    )
    assert "data.labels.labels" in found  # empty list refused
    found = problems(
        minimal(
            data={
                "source": "p",
                "labels": {"from": "lists", "files": ["a.png", "b.png"], "labels": ["x"]},
            }
        )
    )
    assert found == {
        "data.labels": "files and labels must have the same length (2 files, 1 labels)"
    }


@pytest.mark.parametrize("path", ["../etc/passwd", "a/../../b", "/abs/file.png"])
def test_paths_inside_the_source_cannot_escape(path: str) -> None:
    found = problems(
        minimal(data={"source": "p", "labels": {"from": "lists", "files": [path], "labels": ["x"]}})
    )
    assert "relative path inside data.source" in found["data.labels.files"]


def test_sources() -> None:
    for ok in ("pets", "s3://bucket/prefix", "file:///data/pets", "/data/pets"):
        assert validate_spec(minimal(data={"source": ok})).data.source == ok
    assert "data.source" in problems(minimal(data={"source": "http://example.com/x"}))
    assert "data.source" in problems(minimal(data={"source": "../outside"}))
    assert "data.source" in problems(minimal(data={"source": "file://relative"}))


def test_table_needs_exactly_one_of_rows_or_file() -> None:
    assert "data.labels" in problems(minimal(data={"source": "p", "labels": {"from": "table"}}))
    spec = validate_spec(
        minimal(
            data={
                "source": "p",
                "labels": {"from": "table", "rows": [{"file": "a.png", "label": ["x", "y"]}]},
            },
            metrics=["accuracy_thresh", "fbeta"],
        )
    )
    assert spec.data.is_multi_label


def test_metrics_must_fit_the_label_kind() -> None:
    multi = {"source": "p", "labels": {"from": "csv", "label_delim": " "}}
    assert "single-label" in problems(minimal(data=multi, metrics=["error_rate"]))["spec"]
    assert "multi-label" in problems(minimal(metrics=["fbeta"]))["spec"]


def test_column_split_needs_csv_or_table_labels() -> None:
    assert "data" in problems(minimal(data={"source": "p", "split": {"by": "column"}}))
    spec = validate_spec(
        minimal(data={"source": "p", "labels": {"from": "csv"}, "split": {"by": "column"}})
    )
    assert isinstance(spec.data.split, ColumnSplit) and isinstance(spec.data.labels, CsvLabels)


def test_stage_rules() -> None:
    assert (
        "unique"
        in problems(minimal(stages=[{"name": "a", "epochs": 1}, {"name": "a", "epochs": 1}]))[
            "spec"
        ]
    )
    assert "stages.0.name" in problems(minimal(stages=[{"name": "has space", "epochs": 1}]))
    suggested = validate_spec(minimal(stages=[{"name": "a", "epochs": 1, "max_lr": "suggested"}]))
    assert suggested.stages[0].lr_find_params is not None  # suggested implies the finder
    assert "stages" in problems(minimal(stages=[]))


def test_pretrained_forms() -> None:
    assert validate_spec(
        minimal(model={"pretrained": "run:abc-1:stage-1"})
    ).model.pretrained_run == (
        "abc-1",
        "stage-1",
    )
    assert validate_spec(minimal(model={"pretrained": "run:abc"})).model.pretrained_run == (
        "abc",
        None,
    )
    assert "model.pretrained" in problems(minimal(model={"pretrained": "http://weights"}))


def test_resources() -> None:
    spec = validate_spec(minimal(resources={"timeout": "90m", "priority": 9}))
    assert spec.resources.timeout_seconds == 5400
    assert "resources.timeout" in problems(minimal(resources={"timeout": "soon"}))
    assert "resources.priority" in problems(minimal(resources={"priority": 10}))


def test_yaml_errors_name_the_line() -> None:
    found = problems("version: 1\nname: [unclosed\n")
    assert "line" in next(iter(found.values()))
    assert problems("- just\n- a list\n") == {
        "spec": "must be a mapping with version, name, data, stages"
    }


def test_json_is_accepted_too() -> None:
    spec = load_spec_text(
        '{"version": 1, "name": "j", "data": {"source": "p"}, "stages": [{"name": "s", "epochs": 2}]}'
    )
    assert spec.stages[0].epochs == 2


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(InvalidSpec, match="cannot read the file"):
        load_spec_file(tmp_path / "nope.yaml")


def test_schema_uses_the_public_key_names() -> None:
    schema = spec_json_schema()
    assert schema["title"] == "ExperimentSpec"
    regex = schema["$defs"]["RegexLabels"]
    assert "from" in regex["properties"] and "from_" not in regex["properties"]
    assert isinstance(RegexLabels.model_validate({"from": "regex", "pattern": "(x)"}), RegexLabels)


def test_control_characters_are_refused_naming_the_field() -> None:
    from shared.errors import InvalidSpec
    from shared.spec_io import validate_spec

    document = {
        "version": 1,
        "name": "nul\x00name",
        "data": {"source": "digits"},
        "tags": ["fine", "bell\x07"],
        "stages": [{"name": "s", "epochs": 1}],
    }
    with pytest.raises(InvalidSpec) as caught:
        validate_spec(document)
    paths = [problem.path for problem in caught.value.problems]
    assert paths == ["name", "tags.1"]
    assert all("control character" in p.message for p in caught.value.problems)
    document["name"] = "tabs\tand\nnewlines are fine"
    document["tags"] = ["fine"]
    assert validate_spec(document).name.startswith("tabs")


@pytest.mark.parametrize(
    ("pattern", "refused"),
    [
        (r"(a+)+$", True),
        (r"(\w+\s?)*$", True),
        (r"(.*)*x", True),
        (r"/([^/]+)_\d+\.jpg$", False),
        (r"(?:cat|dog)_(\d+)", False),
        (r"([^/]+)/\d+\.png", False),
    ],
)
def test_catastrophic_label_regexes_are_refused(pattern: str, refused: bool) -> None:
    from shared.errors import InvalidSpec
    from shared.spec_io import validate_spec

    document = {
        "version": 1,
        "name": "regex",
        "data": {"source": "pets", "labels": {"from": "regex", "pattern": pattern}},
        "stages": [{"name": "s", "epochs": 1}],
    }
    if not refused:
        assert validate_spec(document).data.labels.pattern == pattern  # type: ignore[union-attr]
        return
    with pytest.raises(InvalidSpec) as caught:
        validate_spec(document)
    (problem,) = caught.value.problems
    assert problem.path == "data.labels.pattern"
    assert "exponential" in problem.message


_SCHEMA_BASE: dict[str, Any] = {
    "version": 1,
    "name": "schema",
    "data": {"source": "digits", "size": 28},
    "model": {"arch": "resnet18", "pretrained": "none", "head": {"ps": 0.5}},
    "stages": [{"name": "stage-1", "epochs": 1, "max_lr": 1e-3}],
    "resources": {"timeout": "6h"},
}


@pytest.mark.parametrize(
    ("where", "value"),
    [
        (("stages", 0, "name"), "bad name!"),
        (("model", "pretrained"), "imagenet21k"),
        (("resources", "timeout"), "6 weeks"),
        (("resources", "timeout"), 0),
        (("data", "size"), 4),
        (("data", "size"), [28, 5000]),
        (("model", "head", "ps"), 1.0),
        (("stages", 0, "max_lr"), -1.0),
        (("stages", 0, "max_lr"), [1e-4, 1e-3, 1e-2]),
        (("stages", 0, "max_lr"), [0.0, 1e-3]),
    ],
)
def test_the_json_schema_refuses_what_the_validators_refuse(
    where: tuple[str | int, ...], value: Any
) -> None:
    """Editors check specs against the published schema: it must not be looser."""
    import copy

    import jsonschema

    from shared.spec_io import validate_spec

    schema = spec_json_schema()
    jsonschema.validate(_SCHEMA_BASE, schema)  # the base is fine both ways
    validate_spec(copy.deepcopy(_SCHEMA_BASE))
    document = copy.deepcopy(_SCHEMA_BASE)
    target: Any = document
    for key in where[:-1]:
        target = target[key]
    target[where[-1]] = value
    with pytest.raises(InvalidSpec):
        validate_spec(copy.deepcopy(document))
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(document, schema)
