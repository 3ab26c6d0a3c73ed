#!/usr/bin/env bash
# Print the path of a virtualenv with fitfleet's dependencies, building it when needed.
#
# The venv lives outside the clone (torch alone is ~6 GB), keyed by a hash of
# pyproject.toml, so every clone with the same dependency list shares it and a
# changed list builds a new one.  The project itself is not installed in it:
# the Makefile puts the clone on PYTHONPATH, so the code that runs is always
# this clone's.  A fresh machine with only Python 3.11 builds it from nothing.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-$(command -v python3.11 || command -v python3)}
key=$(cat "$here/pyproject.toml" "$here/scripts/venv.sh" | sha256sum | cut -c1-16)
root=${FITFLEET_VENV_ROOT:-$HOME/.cache/fitfleet}
venv="$root/venv-$key"
if [ ! -f "$venv/.complete" ]; then
  echo "building $venv (first time: a few minutes)" >&2
  rm -rf "$venv"
  mkdir -p "$root"
  "$python" -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --upgrade pip >&2
  deps=$("$venv/bin/python" - "$here/pyproject.toml" <<'PY'
import sys, tomllib
project = tomllib.load(open(sys.argv[1], "rb"))["project"]
extras = project.get("optional-dependencies", {})
wanted = project["dependencies"] + [d for name in ("worker", "dev") for d in extras.get(name, [])]
print("\n".join(wanted))
PY
)
  # shellcheck disable=SC2086
  echo "$deps" | tr '\n' '\0' | xargs -0 "$venv/bin/python" -m pip install --quiet >&2
  touch "$venv/.complete"
fi
echo "$venv"
