#!/usr/bin/env bash
# Set up a virtualenv with the dev requirements and run the whole test suite.
# Needs: python3 (3.11+) with venv, mosquitto and redis-server binaries (tests start private
# instances on free ports), chromium for the status page test, and for the database tests
# PostgreSQL/MariaDB on 127.0.0.1 (.ci/run installs/starts what is missing).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
exec .venv/bin/python -m pytest "$@"
