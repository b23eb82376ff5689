#!/usr/bin/env bash
# SpecLab nightly sweep: every combination of configs/sweeps/<SWEEP>.yaml through the benchmark, one folder per
# night (results/sweeps/<SWEEP>/<date>/), a lock so two sweeps never overlap, and a report with regressions.
# Cron-safe: needs no terminal, resolves every path from this script's location, logs to the night's sweep.log.
#   ./run_sweep.sh nightly_tiny            ./run_sweep.sh --help
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
export PATH="${PATH:-/usr/local/bin:/usr/bin:/bin}"
PY="$("$ROOT/scripts/ensure_env.sh")"
# No cd: a sweep file given as a path stays relative to where it was typed; the package is found through PYTHONPATH.
PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" exec "$PY" -m lib.sweep "$@"
