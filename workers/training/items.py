"""From ``data`` in a spec and a local folder to labelled train/valid items and classes.

This is fastai v1's ``ImageDataBunch.from_*`` up to the point where files are
opened: which files, which labels, which split, which classes.  Everything the
data can get wrong is found here, before any training time is spent, and is
raised as :class:`DataError` with the spec field it concerns.

Deliberate choices (fastai differs or is silent):

* Listed files (``folder``, ``regex``, ``function``) are **sorted** by path
  component; fastai uses filesystem order, which differs between machines.
  Named files (``csv``, ``table``, ``lists``) keep the order they are given in,
  which is deterministic already and is fastai's order, so a random split of a
  CSV selects the same rows fastai would (for the same seed, without skips).
* Files that cannot be used (missing, not an image, a regex non-match, a
  duplicate, a label absent from train) are skipped and listed rather than
  failing the run; the run fails only when nothing usable remains.
* ``folder`` labels skip images lying directly in the source folder (fastai
  would label them with the source folder's own name).
* A multi-label validation item with any label absent from train is dropped
  whole (its target could not be represented).
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import pandas as pd

from shared.errors import DataError
from shared.results import SkippedFile
from shared.spec import (
    ColumnSplit,
    CsvLabels,
    Data,
    FolderLabels,
    FolderSplit,
    FunctionLabels,
    ListsLabels,
    RandomSplit,
    RegexLabels,
    TableLabels,
)
from workers.training.files import is_image_file, list_image_files, safe_join
from workers.training.label_functions import get_label_function

logger = logging.getLogger(__name__)

Label = str | tuple[str, ...]

_TRUE = frozenset({"true", "1", "yes"})
_FALSE = frozenset({"false", "0", "no"})
_SEED_MAX = 2**32 - 1  # NumPy's RandomState accepts seeds in [0, 2**32)


@dataclass(frozen=True)
class LabeledItem:
    """One labelled image.

    Attributes:
        path: absolute path of the file.
        rel: POSIX path relative to the source folder (what reports show).
        label: the class name, or a tuple of class names for multi-label data.
    """

    path: Path
    rel: str
    label: Label


@dataclass
class ItemSplit:
    """What the data loaders are built from.

    Attributes:
        train: training items; sorted (listed files) or in the given order (named files),
            and for a random split in ascending original order, as fastai.
        valid: validation items; for a random split in permutation order, as fastai.
        test: unlabeled test images (``data.test``), sorted.
        classes: sorted labels of the training split (case-sensitive Python sort).
        multi_label: labels are tuples and targets one-hot.
        skipped: files found or named but not used, each with the reason.
        unsplit: items outside both folders of a folder split; fastai drops them
            silently, we count them so a surprising number can be shown.
    """

    train: list[LabeledItem]
    valid: list[LabeledItem]
    test: list[Path]
    classes: list[str]
    multi_label: bool
    skipped: list[SkippedFile]
    unsplit: int = 0


@dataclass(frozen=True)
class _Raw:
    """A file and its label as the strategy produced it, before normalisation."""

    rel: str
    path: Path
    label: Any
    is_valid: bool | None = None


@dataclass
class _Named:
    """A file named by a label table (csv rows, inline rows, lists), not yet checked."""

    rel: str
    label: Any
    is_valid: bool | None = None


@dataclass
class _Collected:
    items: list[_Raw]
    skipped: list[SkippedFile] = field(default_factory=list)
    delim: str | None = None


def build_items(data: Data, source_dir: Path) -> ItemSplit:
    """Label and split the images of ``source_dir`` as ``data`` says.

    Args:
        data: the spec's ``data`` section.
        source_dir: the local source folder, already checked by ``resolve_source``.

    Raises:
        DataError: no image, a regex matching nothing, an unreadable label table,
            a failing label function, an empty training set, or a class without a
            validation image; the message names the spec field.
    """
    source = source_dir.resolve()
    split = data.resolved_split
    collected = _collect(data, source, split)
    skipped = collected.skipped
    multi = data.is_multi_label or (
        bool(collected.items) and isinstance(collected.items[0].label, list | tuple)
    )
    labelled = _normalise(collected, multi)
    if not labelled:
        raise DataError(_nothing_left(source, skipped))
    train, valid, unsplit = _split(labelled, split, source)
    classes = _classes(train, multi)
    split_valid = len(valid)
    valid = _drop_unknown(valid, classes, skipped)
    if not multi and split_valid:
        # Checked against the split as drawn: dropping unknown labels may empty it.
        _check_valid_covers(classes, valid)
    test = _test_images(data, source)
    logger.info(
        "items: %d train, %d valid, %d test, %d classes, %d skipped, %d outside the split",
        len(train),
        len(valid),
        len(test),
        len(classes),
        len(skipped),
        unsplit,
    )
    return ItemSplit(
        train=[_item(r) for r in train],
        valid=[_item(r) for r in valid],
        test=test,
        classes=classes,
        multi_label=multi,
        skipped=skipped,
        unsplit=unsplit,
    )


# --------------------------------------------------------------------------- collecting


def _collect(
    data: Data, source: Path, split: RandomSplit | FolderSplit | ColumnSplit
) -> _Collected:
    """Run the label strategy: which files, with which raw labels."""
    labels = data.labels
    column = split.column if isinstance(split, ColumnSplit) else None
    if isinstance(labels, FolderLabels | RegexLabels | FunctionLabels):
        listed, escaping = _listed(data, source)
        if isinstance(labels, FolderLabels):
            collected = _Collected(_from_folders(listed))
        elif isinstance(labels, RegexLabels):
            collected = _from_regex(labels, listed, source)
        else:
            collected = _Collected(_from_function(labels, listed))
        collected.skipped[:0] = escaping
        return collected
    if isinstance(labels, ListsLabels):
        named = [_Named(f, lab) for f, lab in zip(labels.files, labels.labels, strict=True)]
        return _resolve_named(named, source)
    if isinstance(labels, CsvLabels):
        frame_named = _from_frame(labels, source, column, delimiter=labels.delimiter)
        return _resolve_named(frame_named, source, delim=labels.label_delim)
    if labels.rows is not None:
        if column is not None:
            raise DataError(
                "data.split: split by column needs a column, but inline table rows only "
                "have 'file' and 'label'; store the table as a csv or parquet file instead"
            )
        named = [_Named(_with_affixes(labels, r.file), r.label) for r in labels.rows]
        return _resolve_named(named, source, delim=labels.label_delim)
    frame_named = _from_frame(labels, source, column, delimiter=",")
    return _resolve_named(frame_named, source, delim=labels.label_delim)


def _listed(data: Data, source: Path) -> tuple[list[tuple[str, Path]], list[SkippedFile]]:
    """Every image under the source (sorted) as (rel, path), leaving out the test folder.

    A symlinked file that points outside the source is skipped (and listed), as
    :func:`safe_join` refuses one named in a label table: otherwise a link would
    read what the data roots are meant to keep out.
    """
    test_parts = PurePosixPath(data.test or "test").parts
    top_skip = (test_parts[0],) if len(test_parts) == 1 else ()
    listed: list[tuple[str, Path]] = []
    escaping: list[SkippedFile] = []
    for path in list_image_files(source, skip_dirs=top_skip):
        parts = path.relative_to(source).parts
        if len(test_parts) > 1 and parts[: len(test_parts)] == test_parts:
            continue
        rel = "/".join(parts)
        if path.is_symlink() and not path.resolve().is_relative_to(source):
            escaping.append(SkippedFile(path=rel, reason="symlink pointing outside the source"))
            continue
        listed.append((rel, path))
    if not listed:
        raise DataError(
            f"data.source: no image files found under {source} (searched sub-folders, "
            f"skipping hidden ones and the test folder {'/'.join(test_parts)!r}; an image "
            "is a file whose suffix is an image type such as .jpg or .png)"
        )
    return listed, escaping


def _from_folders(listed: list[tuple[str, Path]]) -> list[_Raw]:
    """fastai ``label_from_folder``: the parent folder's name."""
    raws: list[_Raw] = []
    for rel, path in listed:
        parent = PurePosixPath(rel).parent
        raws.append(_Raw(rel, path, parent.name if parent.parts else None))
    return raws


#: How long the label regex may take over all of a dataset's paths (seconds).
REGEX_TIME_LIMIT_S = 30.0

_SEARCH_SCRIPT = """
import json, re, sys
job = json.load(sys.stdin)
pattern = re.compile(job["pattern"])
found = []
for rel in job["paths"]:
    match = pattern.search(rel)
    found.append(None if match is None else match.group(1))
json.dump(found, sys.stdout)
"""


def search_all(pattern: str, paths: list[str], *, time_limit_s: float) -> list[str | None]:
    """Group 1 of ``pattern`` searched in each path (None: no match), within a time limit.

    Python's ``re`` backtracks and cannot be interrupted, and a pattern from a
    request may be catastrophic on some names (``(a|a)*b``); the submission
    check refuses nested quantifiers, this bounds everything else: the search
    runs in a child process that is killed after ``time_limit_s``.

    Raises:
        DataError: naming ``data.labels.pattern``, when the limit passes.
    """
    job = json.dumps({"pattern": pattern, "paths": paths})
    try:
        done = subprocess.run(
            [sys.executable, "-I", "-S", "-c", _SEARCH_SCRIPT],
            input=job,
            capture_output=True,
            text=True,
            timeout=time_limit_s,
            check=True,
        )
    except subprocess.TimeoutExpired as exc:
        raise DataError(
            f"data.labels.pattern: {pattern!r} took over {time_limit_s:g} s on "
            f"{len(paths)} file names (catastrophic backtracking?): simplify it"
        ) from exc
    except subprocess.CalledProcessError as exc:
        raise DataError(f"data.labels.pattern: {pattern!r} failed: {exc.stderr.strip()}") from exc
    found: list[str | None] = json.loads(done.stdout)
    return found


def _from_regex(labels: RegexLabels, listed: list[tuple[str, Path]], source: Path) -> _Collected:
    """fastai ``label_from_re``: ``re.search`` on the relative POSIX path, group 1."""
    found = search_all(labels.pattern, [rel for rel, _ in listed], time_limit_s=REGEX_TIME_LIMIT_S)
    raws: list[_Raw] = []
    skipped: list[SkippedFile] = []
    for (rel, path), label in zip(listed, found, strict=True):
        if label is None:
            skipped.append(SkippedFile(path=rel, reason="does not match data.labels.pattern"))
        else:
            raws.append(_Raw(rel, path, label))
    if not raws:
        examples = ", ".join(repr(rel) for rel, _ in listed[:3])
        raise DataError(
            f"data.labels.pattern: {labels.pattern!r} matches none of the {len(listed)} "
            f"image files under {source}; it is searched in paths relative to the source, "
            f"such as {examples}"
        )
    return _Collected(raws, skipped)


def _from_function(labels: FunctionLabels, listed: list[tuple[str, Path]]) -> list[_Raw]:
    """fastai ``from_name_func``, with a registered function instead of a lambda."""
    try:
        func = get_label_function(labels.name)
    except DataError as exc:
        raise DataError(f"data.labels.name: {exc}") from exc
    raws: list[_Raw] = []
    for rel, path in listed:
        try:
            label = func(rel, dict(labels.args))
        except DataError:
            raise  # bad args: already names its field
        except Exception as exc:
            raise DataError(
                f"data.labels: label function {labels.name!r} failed on {rel!r}: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        raws.append(_Raw(rel, path, label))
    return raws


def _with_affixes(labels: CsvLabels | TableLabels, name: str) -> str:
    """fastai ``from_df``: ``[folder/]<name><suffix>``."""
    rel = f"{name}{labels.suffix}"
    return f"{labels.folder.rstrip('/')}/{rel}" if labels.folder else rel


def _from_frame(
    labels: CsvLabels | TableLabels, source: Path, column: str | None, *, delimiter: str
) -> list[_Named]:
    """Rows of a label table stored with the data."""
    assert labels.file is not None  # TableLabels without rows has a file (spec validator)
    try:
        path = safe_join(source, labels.file)
    except DataError as exc:
        raise DataError(f"data.labels.file: {exc}") from exc
    frame = _read_frame(path, csv_only=isinstance(labels, CsvLabels), delimiter=delimiter)
    files, values, flags = _columns(frame, path.name, labels, column)
    named: list[_Named] = []
    for row, (name, value) in enumerate(zip(files, values, strict=True)):
        is_valid = None if flags is None else _parse_flag(flags[row], column, path.name, row)
        named.append(_Named(_with_affixes(labels, str(name)), value, is_valid))
    return named


def _read_frame(path: Path, *, csv_only: bool, delimiter: str) -> pd.DataFrame:
    """A label table as strings: CSV (any suffix for ``csv``) or parquet (``table``)."""
    if not path.is_file():
        raise DataError(f"data.labels.file: label file {path} does not exist")
    suffix = path.suffix.lower()
    if not csv_only and suffix in (".parquet", ".pq"):
        try:
            return pd.read_parquet(path)
        except ImportError as exc:
            raise DataError(
                f"data.labels.file: reading {path.name} needs the 'pyarrow' package, which "
                "this worker does not have; install it, or store the table as a .csv file"
            ) from exc
        except (OSError, ValueError) as exc:
            raise DataError(f"data.labels.file: cannot read {path} as parquet: {exc}") from exc
    if not csv_only and suffix != ".csv":
        raise DataError(f"data.labels.file: {path.name} must be a .csv or .parquet file")
    try:
        # dtype=str keeps file names and labels exactly as written ("007" stays "007").
        return pd.read_csv(path, sep=delimiter, dtype=str, keep_default_na=False)
    except (OSError, ValueError) as exc:  # pandas' parser errors are ValueErrors
        raise DataError(f"data.labels.file: cannot read {path} as CSV: {exc}") from exc


def _columns(
    frame: pd.DataFrame, file: str, labels: CsvLabels | TableLabels, split_col: str | None
) -> tuple[list[Any], list[Any], list[Any] | None]:
    """(file names, labels, split flags or None): every missing column named at once."""
    names = [str(c) for c in frame.columns]
    wanted: list[tuple[str, str | int]] = [
        ("data.labels.fn_col", labels.fn_col),
        ("data.labels.label_col", labels.label_col),
    ]
    if split_col is not None:
        wanted.append(("data.split.column", split_col))
    found: list[int] = []
    problems: list[str] = []
    for spec_field, col in wanted:
        if isinstance(col, int) and -len(names) <= col < len(names):
            found.append(col % len(names))
        elif isinstance(col, str) and col in names:
            found.append(names.index(col))
        else:
            problems.append(f"{spec_field}={col!r}")
    if problems:
        raise DataError(
            f"data.labels: {file} has no column {', '.join(problems)}; available columns: "
            f"{', '.join(names) or '(none)'}"
        )
    cells = [[_cell(v) for v in frame.iloc[:, i].tolist()] for i in found]
    return cells[0], cells[1], (cells[2] if split_col is not None else None)


def _cell(value: Any) -> Any:
    """A table cell as a string, or a list of strings for a parquet list column."""
    if isinstance(value, list | tuple | np.ndarray):
        return [str(v) for v in value]
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return ""
    return str(value)


def _parse_flag(value: object, column: str | None, file: str, row: int) -> bool:
    """A split column value: true/false, 1/0, yes/no (any case)."""
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise DataError(
        f"data.split.column: value {value!r} in column {column!r} of {file} (data row "
        f"{row + 1}) is not a boolean; use true/false, 1/0 or yes/no"
    )


def _resolve_named(named: list[_Named], source: Path, delim: str | None = None) -> _Collected:
    """Check named files: inside the source, unique, existing, images."""
    raws: list[_Raw] = []
    skipped: list[SkippedFile] = []
    seen: set[str] = set()
    for entry in named:
        try:
            path = safe_join(source, entry.rel)
        except DataError as exc:
            skipped.append(SkippedFile(path=entry.rel, reason=str(exc)))
            continue
        rel = PurePosixPath(entry.rel).as_posix()
        if rel in seen:
            skipped.append(SkippedFile(path=rel, reason="duplicate"))
            continue
        seen.add(rel)
        if not path.exists():
            skipped.append(SkippedFile(path=rel, reason="file does not exist"))
        elif not path.is_file():
            skipped.append(SkippedFile(path=rel, reason="not a file"))
        elif not is_image_file(rel):
            skipped.append(SkippedFile(path=rel, reason="not an image file (by its suffix)"))
        else:
            raws.append(_Raw(rel, path, entry.label, entry.is_valid))
    return _Collected(raws, skipped, delim)


# --------------------------------------------------------------------------- labels


def _normalise(collected: _Collected, multi: bool) -> list[_Raw]:
    """Labels as strings (or tuples of strings); items without a usable label skipped."""
    out: list[_Raw] = []
    for raw in collected.items:
        label = _label(raw, multi, collected.delim)
        if label is None:
            reason = "empty label"
            if raw.label is None:
                reason = "directly in the source folder, so it has no class folder"
            collected.skipped.append(SkippedFile(path=raw.rel, reason=reason))
            continue
        out.append(_Raw(raw.rel, raw.path, label, raw.is_valid))
    return out


def _label(raw: _Raw, multi: bool, delim: str | None) -> Label | None:
    """One raw label as a class name, or a tuple of them (order kept, repeats removed)."""
    value = raw.label
    if value is None:
        return None
    if isinstance(value, list | tuple):
        if not multi:
            raise DataError(
                f"data.labels: {raw.rel!r} has a list of labels but the first label is a "
                "single label; give lists for every file or for none"
            )
        parts = [str(v) for v in value]
    elif multi:
        text = str(value)
        parts = text.split(delim) if delim else [text]
    else:
        text = str(value)
        return text or None
    return tuple(dict.fromkeys(p for p in parts if p))


def _classes(train: Sequence[_Raw], multi: bool) -> list[str]:
    """Sorted labels of the training split only (fastai ``CategoryProcessor``)."""
    if multi:
        union: set[str] = set()
        for raw in train:
            union.update(raw.label)
        if not union:
            raise DataError("data.labels: no training image has any label")
        return sorted(union)
    return sorted({raw.label for raw in train})


def _drop_unknown(valid: list[_Raw], classes: list[str], skipped: list[SkippedFile]) -> list[_Raw]:
    """fastai drops validation items whose label the training split does not have."""
    known = set(classes)
    kept: list[_Raw] = []
    for raw in valid:
        labels = raw.label if isinstance(raw.label, tuple) else (raw.label,)
        unknown = [lab for lab in labels if lab not in known]
        if unknown:
            names = ", ".join(repr(lab) for lab in unknown)
            skipped.append(
                SkippedFile(
                    path=raw.rel,
                    reason=f"validation label {names} does not occur in the training set",
                )
            )
        else:
            kept.append(raw)
    return kept


def _check_valid_covers(classes: list[str], valid: list[_Raw]) -> None:
    """A class nobody validates makes error_rate silent about it: refuse early."""
    present = {raw.label for raw in valid}
    missing = [c for c in classes if c not in present]
    if missing:
        raise DataError(
            f"data.split: class(es) {', '.join(repr(c) for c in missing)} have no image in "
            f"the validation set ({len(valid)} validation images); add validation images "
            "for them or use a larger valid_pct"
        )


# --------------------------------------------------------------------------- split


def _split(
    items: list[_Raw], split: RandomSplit | FolderSplit | ColumnSplit, source: Path
) -> tuple[list[_Raw], list[_Raw], int]:
    """(train, valid, number of items in neither) for the split form."""
    unsplit = 0
    if isinstance(split, RandomSplit):
        train_idx, valid_idx = random_split_indices(len(items), split.valid_pct, split.seed)
        train = [items[i] for i in train_idx]
        valid = [items[i] for i in valid_idx]
        why = "the random split left no training image"
    elif isinstance(split, FolderSplit):
        train_parts = PurePosixPath(split.train).parts
        valid_parts = PurePosixPath(split.valid).parts
        if train_parts == valid_parts:
            raise DataError("data.split: the train and valid folders must differ")
        train, valid = [], []
        for raw in items:
            parts = PurePosixPath(raw.rel).parts
            if parts[: len(train_parts)] == train_parts:
                train.append(raw)
            elif parts[: len(valid_parts)] == valid_parts:
                valid.append(raw)
            else:
                unsplit += 1
        tops = sorted({PurePosixPath(raw.rel).parts[0] for raw in items})
        why = (
            f"no labelled image under the train folder {split.train!r} of {source} "
            f"(top-level entries with images: {', '.join(tops)})"
        )
    else:
        train = [raw for raw in items if not raw.is_valid]
        valid = [raw for raw in items if raw.is_valid]
        why = f"every usable row has {split.column} set to true"
    if not train:
        raise DataError(f"data.split: the training set is empty: {why}")
    return train, valid, unsplit


def random_split_indices(n: int, valid_pct: float, seed: int) -> tuple[list[int], list[int]]:
    """fastai ``split_by_rand_pct``: (train ascending, valid in permutation order).

    A local ``RandomState(seed)`` draws the same permutation as fastai's
    ``np.random.seed(seed); np.random.permutation(n)`` without touching the
    global generator other code relies on.  ``cut = int(valid_pct * n)``.
    """
    if not 0 <= seed <= _SEED_MAX:
        raise DataError(f"data.split.seed: must be between 0 and {_SEED_MAX}, got {seed}")
    perm = np.random.RandomState(seed).permutation(n)
    cut = int(valid_pct * n)
    return sorted(int(i) for i in perm[cut:]), [int(i) for i in perm[:cut]]


# --------------------------------------------------------------------------- rest


def _test_images(data: Data, source: Path) -> list[Path]:
    """``data.test``: unlabeled images, listed recursively and sorted."""
    if data.test is None:
        return []
    try:
        folder = safe_join(source, data.test)
    except DataError as exc:
        raise DataError(f"data.test: {exc}") from exc
    if not folder.is_dir():
        raise DataError(f"data.test: folder {folder} does not exist")
    return list_image_files(folder)


def _nothing_left(source: Path, skipped: list[SkippedFile]) -> str:
    """The message when every file was skipped: say why for the first few."""
    examples = "; ".join(f"{s.path}: {s.reason}" for s in skipped[:3])
    return (
        f"data.labels: no usable labelled image under {source}; {len(skipped)} file(s) "
        f"skipped, e.g. {examples}"
    )


def _item(raw: _Raw) -> LabeledItem:
    """The public, typed item."""
    label: Label = raw.label
    return LabeledItem(path=raw.path, rel=raw.rel, label=label)
