#!/usr/bin/env bash
# Set up (first run only) and run the kvsqueeze demo on the bundled model; extra arguments go to `kvsqueeze`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/kvsqueeze "$@"
