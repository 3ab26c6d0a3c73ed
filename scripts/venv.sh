#!/usr/bin/env bash
# Print the path of a virtualenv with fitfleet's dependencies, building it when needed.
#
# The venv lives outside the clone (torch alone is ~6 GB), keyed by a hash of
# the dependency list in pyproject.toml (not the whole file: a lint setting
# must not rebuild torch), so every clone with the same dependencies shares it
# and a changed list builds a new one.  The project itself is not installed in
# it: ./dev puts the clone on PYTHONPATH, so the code that runs is always this
# clone's.  A fresh machine with only Python 3.11 builds it from nothing.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-$(command -v python3.11 || command -v python3)}
deps=$("$python" - "$here/pyproject.toml" <<'PY'
import sys, tomllib
project = tomllib.load(open(sys.argv[1], "rb"))["project"]
extras = project.get("optional-dependencies", {})
wanted = project["dependencies"] + [d for name in ("api", "worker", "dev") for d in extras.get(name, [])]
print("\n".join(wanted))
PY
)
key=$( (echo "$deps"; "$python" --version; cat "$here/scripts/venv.sh") | sha256sum | cut -c1-16)
root=${FITFLEET_VENV_ROOT:-$HOME/.cache/fitfleet}
venv="$root/venv-$key"
mkdir -p "$root"
# One builder at a time: a second caller waits here instead of deleting a venv
# that is half-built (its `rm -rf` would pull files from under the first).
exec 9>"$venv.lock"
flock 9
if [ ! -f "$venv/.complete" ]; then
  echo "building $venv (first time: a few minutes)" >&2
  rm -rf "$venv"
  "$python" -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --upgrade pip >&2
  echo "$deps" | tr '\n' '\0' | xargs -0 "$venv/bin/python" -m pip install --quiet >&2
  touch "$venv/.complete"
  # Older venvs of other dependency lists are left alone: other clones may use them.
fi
echo "$venv"
