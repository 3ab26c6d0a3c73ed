"""Where the CLI finds the server and the token: flag > environment > config file > default.

The config file is TOML, ``$FITFLEET_CONFIG`` or ``~/.config/fitfleet/config.toml``::

    server = "https://fitfleet.example.com"
    token = "ff_..."

    [profiles.staging]           # picked with --profile staging or FITFLEET_PROFILE
    server = "https://staging.fitfleet.example.com"
    token = "ff_..."

A profile's keys override the top-level ones. The file holds a secret, so
:func:`save` writes it with mode 0600 (and its folder 0700), atomically.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_SERVER = "http://127.0.0.1:8000"
SERVER_ENV = "FITFLEET_SERVER_URL"
TOKEN_ENV = "FITFLEET_TOKEN"
CONFIG_ENV = "FITFLEET_CONFIG"
PROFILE_ENV = "FITFLEET_PROFILE"
KEYS = ("server", "token")


class ConfigError(Exception):
    """The config file cannot be used; the message names the file and the problem."""


@dataclass(frozen=True)
class Resolved:
    """The server and token to use, and where each came from (for ``token whoami``)."""

    server: str
    token: str | None
    path: Path
    profile: str | None = None
    sources: dict[str, str] = field(default_factory=dict)


def config_path(env: Mapping[str, str] | None = None) -> Path:
    """``$FITFLEET_CONFIG``, else ``~/.config/fitfleet/config.toml``."""
    env = os.environ if env is None else env
    explicit = env.get(CONFIG_ENV)
    if explicit:
        return Path(explicit).expanduser()
    home = env.get("HOME")
    base = Path(home) if home else Path.home()
    return base / ".config" / "fitfleet" / "config.toml"


def read_file(path: Path) -> dict[str, Any]:
    """The parsed config file ({} when there is none); :class:`ConfigError` when unusable."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return {}
    except IsADirectoryError:
        raise ConfigError(f"config file {path}: is a folder, not a file") from None
    except OSError as exc:
        raise ConfigError(f"config file {path}: cannot be read ({exc.strerror})") from exc
    try:
        document = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path}: not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path}: not valid TOML ({exc})") from exc
    _check_section(path, document, "")
    profiles = document.get("profiles", {})
    if not isinstance(profiles, dict):
        raise ConfigError(f"config file {path}: 'profiles' must be a table ([profiles.NAME])")
    for name, section in profiles.items():
        if not isinstance(section, dict):
            raise ConfigError(f"config file {path}: 'profiles.{name}' must be a table")
        _check_section(path, section, f"profiles.{name}.")
    return document


def _check_section(path: Path, section: Mapping[str, Any], prefix: str) -> None:
    for key, value in section.items():
        if not prefix and key == "profiles":
            continue
        if key not in KEYS:
            raise ConfigError(
                f"config file {path}: unknown key '{prefix}{key}' (known: {', '.join(KEYS)})"
            )
        if not isinstance(value, str) or not value.strip():
            raise ConfigError(f"config file {path}: '{prefix}{key}' must be a non-empty string")
        if key == "server" and not value.startswith(("http://", "https://")):
            raise ConfigError(
                f"config file {path}: '{prefix}server' must start with http:// or https://, "
                f"got {value!r}"
            )


def resolve(
    server: str | None = None,
    token: str | None = None,
    *,
    profile: str | None = None,
    env: Mapping[str, str] | None = None,
) -> Resolved:
    """The server and token: flag, else environment, else config file, else the default."""
    env = os.environ if env is None else env
    path = config_path(env)
    profile = profile or env.get(PROFILE_ENV) or None
    need_file = (
        profile is not None
        or not (server or env.get(SERVER_ENV))
        or not (token or env.get(TOKEN_ENV))
    )
    document = read_file(path) if need_file else {}
    from_file: dict[str, str] = {k: v for k, v in document.items() if k in KEYS}
    if profile is not None:
        section = document.get("profiles", {}).get(profile)
        if section is None:
            known = ", ".join(sorted(document.get("profiles", {}))) or "none"
            raise ConfigError(f"config file {path}: no profile {profile!r} (profiles: {known})")
        from_file.update(section)
    where_file = f"config file {path}" + (f" [profiles.{profile}]" if profile else "")
    sources: dict[str, str] = {}
    values: dict[str, str | None] = {}
    for key, flag, env_name in (("server", server, SERVER_ENV), ("token", token, TOKEN_ENV)):
        if flag:
            values[key], sources[key] = flag, f"--{key}"
        elif env.get(env_name):
            values[key], sources[key] = env[env_name], env_name
        elif from_file.get(key):
            values[key], sources[key] = from_file[key], where_file
        else:
            values[key] = None
    resolved_server = values["server"] or DEFAULT_SERVER
    sources.setdefault("server", "default")
    return Resolved(
        server=resolved_server.rstrip("/"),
        token=values["token"],
        path=path,
        profile=profile,
        sources=sources,
    )


def save(
    *,
    token: str | None = None,
    server: str | None = None,
    profile: str | None = None,
    env: Mapping[str, str] | None = None,
) -> Path:
    """Set ``token`` / ``server`` (top level, or in ``[profiles.<profile>]``); keep the rest.

    Written to a temporary file with mode 0600 in the same folder, then renamed
    over the old one, so a reader never sees half a file or a readable secret.
    """
    path = config_path(env)
    document = read_file(path)
    section: dict[str, Any] = document
    if profile is not None:
        section = document.setdefault("profiles", {}).setdefault(profile, {})
    for key, value in (("server", server), ("token", token)):
        if value is not None:
            section[key] = value
    _check_section(path, section, f"profiles.{profile}." if profile else "")
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, tmp = tempfile.mkstemp(prefix=".config-", suffix=".toml", dir=path.parent)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(dumps(document))
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    os.chmod(path, 0o600)
    return path


def dumps(document: Mapping[str, Any]) -> str:
    """The config as TOML: top-level keys, then one ``[profiles.NAME]`` table each."""
    lines = [f"{key} = {_string(value)}" for key, value in document.items() if key in KEYS]
    for name, section in document.get("profiles", {}).items():
        lines += ["", f"[profiles.{_key(name)}]"]
        lines += [f"{key} = {_string(value)}" for key, value in section.items() if key in KEYS]
    return "\n".join(lines) + "\n"


def _string(value: str) -> str:
    # A JSON string is a valid TOML basic string (same escapes, \uXXXX included).
    return json.dumps(value)


def _key(name: str) -> str:
    bare = name and all(c.isalnum() or c in "-_" for c in name) and name.isascii()
    return name if bare else json.dumps(name)
