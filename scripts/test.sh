#!/usr/bin/env bash
# Run the test suite (extra arguments go to pytest), e.g. scripts/test.sh -k e2e -x
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ ! -x .venv/bin/python ]; then
    echo "error: no .venv in $(pwd); run scripts/quickstart.sh first" >&2
    exit 1
fi
exec .venv/bin/python -m pytest -n 2 -q "$@"
