#!/usr/bin/env bash
# Make sure a headless Chromium is available (the sweep report test renders report.html in it).
# Idempotent: does nothing when chromium is already on PATH. Prints the browser's path.
set -euo pipefail
for name in chromium chromium-browser google-chrome; do
  if command -v "$name" >/dev/null 2>&1; then command -v "$name"; exit 0; fi
done
if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  echo "[setup] installing chromium (Debian package)" >&2
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >&2
fi
command -v chromium >/dev/null 2>&1 || {
  echo "error: chromium is missing; install it (Debian/Ubuntu: apt-get install chromium)" >&2; exit 1; }
command -v chromium
