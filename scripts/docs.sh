#!/usr/bin/env bash
# Build the documentation site into site/ with `mkdocs build --strict` (a broken link, a missing page, anchor or
# API reference fails it); `bash scripts/docs.sh serve` serves it at http://127.0.0.1:8000/ instead. The docs tools
# (the `docs` extra) go into .venv: the methods catalogue is generated from kvsqueeze's registry. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if ! .venv/bin/python -c "import mkdocs, material, mkdocstrings_handlers.python" 2>/dev/null; then
    echo "kvsqueeze docs: installing the docs tools" >&2
    .venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".[docs]"
fi
export NO_MKDOCS_2_WARNING=1
if [ "${1:-build}" = serve ]; then
    exec .venv/bin/mkdocs serve
fi
exec .venv/bin/mkdocs build --strict
