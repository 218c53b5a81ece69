#!/usr/bin/env bash
# Set up (first run only) and run the whole test suite; extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# one worker per core (pytest-xdist), each with one torch thread: the same CPU, about half the wall time on 2 cores
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec .venv/bin/python -m pytest -q -n "${KVSQUEEZE_TEST_WORKERS:-auto}" "$@"
