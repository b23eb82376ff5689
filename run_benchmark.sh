#!/usr/bin/env bash
# SpecLab benchmark: speculative decoding vs target-only AR. Configure with environment variables or flags
# (./run_benchmark.sh --help lists them all). On first use this creates .venv and installs what the chosen
# engines need; the tiny local models are built on first use too.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# No cd: paths the user types (PROMPT_FILE, RESULTS_DIR, model folders) stay relative to where they typed them.

# The core set first, then the sets the chosen modes need (benchmark.py resolves env and flags as for the run:
# bad input stops here with its one-line error and exit 2).
PY="$("$ROOT/scripts/ensure_env.sh")"
sets="$("$PY" "$ROOT/benchmark.py" --print-requirement-sets "$@")"
# shellcheck disable=SC2086 # one word per set
PY="$("$ROOT/scripts/ensure_env.sh" $sets)"
exec "$PY" "$ROOT/benchmark.py" "$@"
