#!/usr/bin/env bash
# Offline tests of the Helm chart: lint, render with several value sets, validate every object
# against the Kubernetes schemas, and check the facts users rely on. No helm binary, no cluster.
#
#   bash chart/tests/run.sh [pytest args...]
#
# VENV (default .venv, relative to the repository root) is created when missing.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"

VENV="${VENV:-.venv}"
PYTHON="${PYTHON:-python3}"

if [[ ! -x "$VENV/bin/python" ]]; then
  "$PYTHON" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -r chart/tests/requirements.txt

export PYTHONDONTWRITEBYTECODE=1
exec "$VENV/bin/python" -m pytest -q -p no:cacheprovider chart/tests "$@"
