#!/usr/bin/env bash
# The fast compatibility subset (pytest -m compat: tiny models, ratio 0 exact, half really freed, hooks removed, the
# loud-failure tests) on the OLDEST transformers release pyproject.toml allows, in its own .venv-oldest.
# It installs the same test extras as scripts/setup.sh, so every test module collects there too.
# Extra arguments go to pytest. Idempotent; safe to rerun.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}
OLDEST=$(sed -n 's/^ *"transformers>=\([0-9.]*\),.*/\1/p' pyproject.toml)
[ -n "$OLDEST" ] || { echo "test-oldest: no transformers lower bound found in pyproject.toml" >&2; exit 1; }
VENV=.venv-oldest
[ -x $VENV/bin/python ] || "$PYTHON" -m venv $VENV
PIP=($VENV/bin/python -m pip install --quiet --disable-pip-version-check)
$VENV/bin/python -c "import torch" 2>/dev/null || "${PIP[@]}" torch==2.13.0
if [ "$($VENV/bin/python -c 'import transformers; print(transformers.__version__)' 2>/dev/null)" != "$OLDEST" ] \
        || [ pyproject.toml -nt $VENV/.kvsqueeze-installed ]; then
    echo "test-oldest: installing kvsqueeze with transformers==$OLDEST in $VENV" >&2
    "${PIP[@]}" -e ".[test,integration-test]" "transformers==$OLDEST"
    touch $VENV/.kvsqueeze-installed
fi
exec $VENV/bin/python -m pytest -q -m compat -p no:cacheprovider "$@"
