#!/usr/bin/env bash
# Build the wheel and the sdist into dist/ (python -m build), install the wheel into its own virtual environment
# (.venv-wheel: torch and the wheel's dependencies, kvsqueeze only from the wheel), and run scripts/wheel_smoke.py
# there from a temporary folder, so that nothing of the source tree is on the path. Idempotent; safe to rerun.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}
bash scripts/setup.sh
.venv/bin/python -c "import build" 2>/dev/null || .venv/bin/python -m pip install --quiet --disable-pip-version-check build
rm -rf dist
LOG=$(mktemp)
.venv/bin/python -m build --outdir dist . > "$LOG" 2>&1 || { cat "$LOG" >&2; exit 1; }
rm -f "$LOG"
WHEEL=$(ls dist/kvsqueeze-*.whl)
ls dist/kvsqueeze-*.tar.gz > /dev/null  # the sdist is there too
echo "wheel: built $(ls dist | tr '\n' ' ')" >&2

VENV=.venv-wheel
[ -x $VENV/bin/python ] || "$PYTHON" -m venv $VENV
PIP=($VENV/bin/python -m pip install --quiet --disable-pip-version-check)
# torch 2.13.0 is the CPU build available here; never let pip pull the multi-GB CUDA build implicitly
$VENV/bin/python -c "import torch" 2>/dev/null || "${PIP[@]}" torch==2.13.0
"${PIP[@]}" --force-reinstall --no-deps "$WHEEL"
"${PIP[@]}" "$WHEEL"  # its dependencies
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
cp scripts/wheel_smoke.py "$WORK/"
cd "$WORK"
KVSQUEEZE_SOURCE="$ROOT" PYTHONNOUSERSITE=1 "$ROOT/$VENV/bin/python" -I wheel_smoke.py
