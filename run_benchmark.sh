#!/usr/bin/env bash
# SpecLab benchmark: speculative decoding vs target-only AR. Configure with environment variables or flags
# (./run_benchmark.sh --help lists them all). On first use this creates .venv and installs what the chosen
# engines need; the tiny local models are built on first use too.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$ROOT"

# Which optional requirement sets this run needs: the engines named in env or flags, and mixed precision.
wanted="${INFERENCE_ENGINE:-} ${COMPARE_MODES:-} $*"
sets=()
case "$wanted" in *vllm*) sets+=(vllm) ;; esac
case "$wanted" in *llamacpp*) sets+=(edge) ;; esac
case "$wanted" in *sglang*) [ -f requirements/sglang.txt ] && sets+=(sglang) ;; esac
if [ -n "${MIXED_PRECISION_CONFIG:-}" ] || [[ "$*" == *--mixed-precision-config* ]]; then sets+=(quant); fi

PY="$(scripts/ensure_env.sh ${sets[@]+"${sets[@]}"})"
exec "$PY" benchmark.py "$@"
