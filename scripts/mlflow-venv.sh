#!/usr/bin/env bash
# A separate virtual environment with MLflow's tracking server, for
# bench/dashboard.py's comparison only: MLflow is not a dependency of
# fitfleet and must not share its venv.  Prints the venv's path.
#
#   scripts/mlflow-venv.sh            # ~/.cache/fitfleet/mlflow-venv
#   MLFLOW_VENV=/tmp/v scripts/mlflow-venv.sh
set -euo pipefail
venv="${MLFLOW_VENV:-$HOME/.cache/fitfleet/mlflow-venv}"
if [ ! -x "$venv/bin/mlflow" ]; then
    python3 -m venv "$venv" >&2
    "$venv/bin/pip" install --quiet --upgrade pip >&2
    "$venv/bin/pip" install --quiet mlflow psycopg2-binary >&2
fi
echo "$venv"
