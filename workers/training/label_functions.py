"""Named label functions: the ``function`` label strategy picks one by name.

fastai's ``from_name_func`` takes any Python callable.  A service cannot accept
code from a request, so fitfleet keeps a registry: code is added here (or by a
deployment, with :func:`register`) and a spec only names it and passes JSON args.

A label function gets the image's POSIX path **relative to the data source**
(``train/3/a.png``) and the spec's ``args`` dict, and returns a label (``str``)
or several (``list[str]``, multi-label).  Bad ``args`` raise :class:`DataError`
naming the argument; any other exception is reported by the caller together with
the file it failed on.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import PurePosixPath
from typing import Any

from shared.errors import DataError

LabelFunction = Callable[[str, dict[str, Any]], str | list[str]]

_REGISTRY: dict[str, LabelFunction] = {}


def register(name: str) -> Callable[[LabelFunction], LabelFunction]:
    """Decorator adding a label function under ``name``.

    Registering a name twice is a programming error (two modules disagreeing on
    what a spec means), so it raises instead of silently replacing.
    """
    if not name or not name.strip():
        raise ValueError("a label function needs a non-empty name")

    def decorate(func: LabelFunction) -> LabelFunction:
        if name in _REGISTRY and _REGISTRY[name] is not func:
            raise ValueError(f"label function {name!r} is already registered")
        _REGISTRY[name] = func
        return func

    return decorate


def registered_names() -> list[str]:
    """Names a spec may use, sorted (for error messages and the API's docs)."""
    return sorted(_REGISTRY)


def get_label_function(name: str) -> LabelFunction:
    """The function registered as ``name``.

    Raises:
        DataError: no such name; the message lists the registered ones.
    """
    try:
        return _REGISTRY[name]
    except KeyError:
        raise DataError(
            f"unknown label function {name!r}; registered: {', '.join(registered_names())}"
        ) from None


def _check_args(name: str, args: Mapping[str, Any], allowed: set[str]) -> None:
    """Refuse unknown argument names so a typo (``seperator``) is not silently ignored."""
    unknown = sorted(set(args) - allowed)
    if unknown:
        accepted = ", ".join(sorted(allowed)) or "none"
        raise DataError(
            f"data.labels.args: label function {name!r} does not take {', '.join(unknown)}; "
            f"it accepts: {accepted}"
        )


@register("parent_folder")
def parent_folder(rel: str, args: dict[str, Any]) -> str:
    """Name of the folder holding the file: ``train/3/a.png`` -> ``3``.

    A file directly in the source has no folder of its own inside it, which is
    an error rather than a label made from the source folder's name.
    """
    _check_args("parent_folder", args, set())
    parents = PurePosixPath(rel).parent.parts
    if not parents:
        raise ValueError("the file is not inside a folder")
    return parents[-1]


@register("grandparent_folder")
def grandparent_folder(rel: str, args: dict[str, Any]) -> str:
    """Name of the folder two levels up: ``cats/train/a.png`` -> ``cats``."""
    _check_args("grandparent_folder", args, set())
    parents = PurePosixPath(rel).parent.parts
    if len(parents) < 2:
        raise ValueError("the file is not two folders deep")
    return parents[-2]


@register("name_prefix")
def name_prefix(rel: str, args: dict[str, Any]) -> str:
    """The file name's stem up to its **last** ``sep`` (default ``_``).

    The stem is the name without its last suffix; folders are ignored.  So with
    the default, ``images/great_pyrenees_173.jpg`` -> ``great_pyrenees`` and
    ``Abyssinian_1.jpg`` -> ``Abyssinian`` (the pets naming, the same labels as the
    notes' regex ``/([^/]+)_\\d+.jpg$``).  A stem without ``sep``, or one where
    nothing comes before it (``_12.jpg``), is an error.
    """
    _check_args("name_prefix", args, {"sep"})
    sep = args.get("sep", "_")
    if not isinstance(sep, str) or not sep:
        raise DataError("data.labels.args.sep: must be a non-empty string")
    stem = PurePosixPath(rel).stem
    prefix, found, _ = stem.rpartition(sep)
    if not found:
        raise ValueError(f"the file name {stem!r} does not contain {sep!r}")
    if not prefix:
        raise ValueError(f"nothing comes before the last {sep!r} in {stem!r}")
    return prefix


@register("path_contains")
def path_contains(rel: str, args: dict[str, Any]) -> str:
    """The label of the first ``mapping`` substring found in ``"/" + rel``.

    This is the notes' ``lambda x: '3' if '/3/' in str(x) else '7'`` without code:
    ``{mapping: {"/3/": "3"}, default: "7"}``.  fastai gave the lambda an absolute
    path; we match against the relative path **with a leading "/"** so a pattern
    written for that (``/3/``) also matches a class folder at the top of the
    source (``3/a.png``) as it matches ``train/3/a.png``.  Substrings are tried in
    the mapping's order.  Without a match the label is ``default``; a ``default``
    of ``None`` (the default) makes an unmatched file an error.
    """
    _check_args("path_contains", args, {"mapping", "default"})
    mapping = args.get("mapping")
    if not isinstance(mapping, dict) or not mapping:
        raise DataError("data.labels.args.mapping: must be a non-empty {substring: label} object")
    if not all(isinstance(k, str) and k for k in mapping):
        raise DataError("data.labels.args.mapping: substrings must be non-empty strings")
    default = args.get("default")
    if default is not None and not isinstance(default, str):
        raise DataError("data.labels.args.default: must be a string label or null")
    haystack = "/" + rel
    for substring, label in mapping.items():
        if substring in haystack:
            return str(label)
    if default is None:
        raise ValueError(
            f"no mapping substring ({', '.join(map(repr, mapping))}) occurs in {haystack!r} "
            "and no default is set"
        )
    return default
