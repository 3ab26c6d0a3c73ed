"""Where the CLI finds server and token: flag > environment > config file > default."""

from __future__ import annotations

import stat
import tomllib
from pathlib import Path

import pytest

from cli.config import DEFAULT_SERVER, ConfigError, config_path, resolve, save


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    return {"HOME": str(tmp_path / "home"), **extra}


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "home" / ".config" / "fitfleet" / "config.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_default_without_anything(tmp_path: Path) -> None:
    resolved = resolve(env=_env(tmp_path))
    assert resolved.server == DEFAULT_SERVER
    assert resolved.token is None
    assert resolved.sources["server"] == "default"


def test_flag_beats_environment_beats_file(tmp_path: Path) -> None:
    _write(tmp_path, 'server = "http://file:1"\ntoken = "ff_file"\n')
    env = _env(tmp_path)
    assert resolve(env=env).server == "http://file:1"
    assert resolve(env=env).token == "ff_file"
    assert "config file" in resolve(env=env).sources["token"]
    env |= {"FITFLEET_SERVER_URL": "http://env:2/", "FITFLEET_TOKEN": "ff_env"}
    assert (resolve(env=env).server, resolve(env=env).token) == ("http://env:2", "ff_env")
    assert resolve(env=env).sources == {"server": "FITFLEET_SERVER_URL", "token": "FITFLEET_TOKEN"}
    flagged = resolve("http://flag:3", "ff_flag", env=env)
    assert (flagged.server, flagged.token) == ("http://flag:3", "ff_flag")
    assert flagged.sources == {"server": "--server", "token": "--token"}


def test_each_key_falls_back_on_its_own(tmp_path: Path) -> None:
    _write(tmp_path, 'server = "http://file:1"\ntoken = "ff_file"\n')
    resolved = resolve(token="ff_flag", env=_env(tmp_path))
    assert (resolved.server, resolved.token) == ("http://file:1", "ff_flag")


def test_fitfleet_config_points_elsewhere(tmp_path: Path) -> None:
    other = tmp_path / "other.toml"
    other.write_text('token = "ff_other"\n')
    env = _env(tmp_path, FITFLEET_CONFIG=str(other))
    assert config_path(env) == other
    assert resolve(env=env).token == "ff_other"


def test_profiles_override_the_top_level(tmp_path: Path) -> None:
    _write(
        tmp_path,
        'server = "http://prod:1"\ntoken = "ff_prod"\n\n'
        '[profiles.staging]\nserver = "http://staging:2"\n',
    )
    env = _env(tmp_path)
    staging = resolve(profile="staging", env=env)
    assert (staging.server, staging.token) == ("http://staging:2", "ff_prod")
    assert resolve(env=env | {"FITFLEET_PROFILE": "staging"}).server == "http://staging:2"
    with pytest.raises(ConfigError, match=r"no profile 'nope'.*staging"):
        resolve(profile="nope", env=env)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("server = http://x\n", "not valid TOML"),
        ('tokn = "ff_x"\n', "unknown key 'tokn'"),
        ("token = 3\n", "'token' must be a non-empty string"),
        ('server = "localhost:8000"\n', "must start with http:// or https://"),
        ('profiles = "x"\n', "'profiles' must be a table"),
        ('[profiles.a]\nserver = "ftp://x"\n', "'profiles.a.server' must start"),
    ],
)
def test_a_bad_file_names_itself_and_the_problem(tmp_path: Path, text: str, problem: str) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        resolve(env=_env(tmp_path))
    assert str(path) in str(caught.value)
    assert problem in str(caught.value)


def test_the_file_is_not_read_when_flags_or_env_say_everything(tmp_path: Path) -> None:
    _write(tmp_path, "this is not toml")
    resolved = resolve("http://a:1", "ff_a", env=_env(tmp_path))
    assert resolved.token == "ff_a"


def test_save_writes_0600_and_keeps_the_rest(tmp_path: Path) -> None:
    path = _write(tmp_path, '[profiles.staging]\nserver = "http://staging:2"\n')
    path.chmod(0o644)
    env = _env(tmp_path)
    written = save(token='ff_"quoted"\\', server="http://prod:1", env=env)
    assert written == path
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    document = tomllib.loads(path.read_text())
    assert document["token"] == 'ff_"quoted"\\'
    assert document["server"] == "http://prod:1"
    assert document["profiles"]["staging"]["server"] == "http://staging:2"
    save(token="ff_staging", profile="staging", env=env)
    staging = resolve(profile="staging", env=env)
    assert (staging.server, staging.token) == ("http://staging:2", "ff_staging")
    assert not [p for p in path.parent.iterdir() if p.name != "config.toml"]  # no temp files


def test_save_creates_the_folder_private(tmp_path: Path) -> None:
    env = _env(tmp_path)
    path = save(token="ff_new", env=env)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert resolve(env=env).token == "ff_new"


def test_save_refuses_a_bad_server(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="must start with http"):
        save(token="ff_x", server="localhost", env=_env(tmp_path))
