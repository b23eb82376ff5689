"""Run a compressed-tensors export in vLLM's CPU build, in a fresh process: greedy tokens or the error it ended with.

A fresh process per run because vLLM's CPU kernels may abort the process (an unsupported instruction, a kernel's
dtype check) and because one LLM per process is how vLLM is meant to be used offline.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from lib.files import ROOT

# fp16 (vLLM ignores it), fp8 W8A8 on every MLP, int8 W8A8 on one layer: the schemes vLLM's CPU build runs
MIXED_W8A8_CONFIG = """mixed_precision:
  default: fp16
  patterns:
    '.*\\.mlp\\..*': fp8
  weight_mapping:
    model.layers.3.mlp.gate_proj.weight: int8
    model.layers.3.mlp.up_proj.weight: int8
    model.layers.3.mlp.down_proj.weight: int8
"""

VLLM_RUN = textwrap.dedent("""
    import json, sys
    if __name__ == "__main__":
        from lib.vllm_support import prepare_cpu_environment
        prepare_cpu_environment()
        from vllm import LLM, SamplingParams
        from vllm.inputs import TokensPrompt
        llm = LLM(model=sys.argv[1], dtype=sys.argv[2], enforce_eager=True, max_model_len=256)
        out = llm.generate([TokensPrompt(prompt_token_ids=json.loads(sys.argv[3]))],
                           SamplingParams(temperature=0, max_tokens=int(sys.argv[4])))
        print("TOKENS " + json.dumps(list(out[0].outputs[0].token_ids)))
""")


def _child_env() -> dict:
    """The child finds the project's lib (for the vLLM settings of lib/vllm_support.py) from any folder."""
    path = os.environ.get("PYTHONPATH")
    return dict(os.environ, PYTHONPATH=str(ROOT) + (os.pathsep + path if path else ""))


def run_vllm_greedy(folder: Path, dtype: str, work: Path, prompt: list[int], new_tokens: int, timeout: float = 900):
    """(tokens or None, the error line vLLM ended with, seconds) from a fresh process."""
    script = work / "run_vllm.py"
    script.write_text(VLLM_RUN)
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, str(script), str(folder), dtype, json.dumps(prompt), str(new_tokens)],
                       env=_child_env(), capture_output=True, text=True, timeout=timeout)
    seconds = time.perf_counter() - t0
    lines = [line for line in r.stdout.splitlines() if line.startswith("TOKENS ")]
    if r.returncode == 0 and lines:
        return json.loads(lines[-1][len("TOKENS "):]), None, seconds
    return None, error_line(r.stdout + r.stderr, r.returncode), seconds


def error_line(output: str, returncode: int) -> str:
    errors = re.findall(r"^(?:\[\w+\]:)?\s*([\w.]+(?:Error|Exception): .+)$", output, re.M)  # "[rank0]: " prefixes
    if errors:
        return errors[0].strip()[:200]  # the first is the cause; later ones re-raise it
    return f"exit code {returncode} (signal {-returncode})" if returncode < 0 else f"exit code {returncode}"


def cpu_has_amx() -> bool:
    """The check vLLM's CPU build makes before it picks its AMX kernels (check_cpu_sgl_kernel)."""
    import torch
    return bool(torch.cpu._is_amx_tile_supported())
