#!/usr/bin/env bash
# Run every test: ruff (lint, import order), pytest (tests/test_*.py) and bats-core (tests/*.bats).
# Creates/updates the project's virtual environment with every requirement set first.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
SETS=(dev)
for extra in vllm edge quant endpoint; do [ -f "requirements/$extra.txt" ] && SETS+=("$extra"); done
PY="$(scripts/ensure_env.sh "${SETS[@]}")"

if ! command -v bats >/dev/null 2>&1; then
  echo "[tests] installing bats-core" >&2
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    (apt-get update -qq && apt-get install -y -qq bats) >/dev/null 2>&1 || true
  fi
  command -v bats >/dev/null 2>&1 || npm install -g bats >/dev/null 2>&1 || true
  command -v bats >/dev/null 2>&1 || { echo "error: bats-core could not be installed (apt-get install bats, or npm install -g bats)" >&2; exit 1; }
fi

scripts/ensure_chromium.sh >/dev/null  # the sweep report test renders its HTML in headless Chromium

export PATH="$(dirname "$PY"):$PATH"
status=0
"$(dirname "$PY")/ruff" check . || status=$?  # lint and import order (ruff.toml)
"$PY" -m pytest -q tests "$@" || status=$?
shopt -s nullglob
bats_files=(tests/*.bats)
if [ ${#bats_files[@]} -gt 0 ]; then bats "${bats_files[@]}" || status=$?; fi
exit $status
