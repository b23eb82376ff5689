"""A mixed-precision export loaded by vLLM's own CPU build: the schemes it accepts there (W8A8 int8 and W8A8 fp8,
fp16 layers ignored) must give the same greedy tokens as the project's loader on the same weights."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

from lib.quant.export import export_compressed_tensors
from lib.quant.loader import load_mixed_model

CONFIG = """mixed_precision:
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
        from vllm import LLM, SamplingParams
        from vllm.inputs import TokensPrompt
        llm = LLM(model=sys.argv[1], dtype="float32", enforce_eager=True, max_model_len=256)
        out = llm.generate([TokensPrompt(prompt_token_ids=json.loads(sys.argv[2]))],
                           SamplingParams(temperature=0, max_tokens=12))
        print("TOKENS " + json.dumps(list(out[0].outputs[0].token_ids)))
""")


def test_vllm_loads_w8a8_mixed_export_and_matches(tiny_models, tmp_path):
    cfg = tmp_path / "mp.yaml"
    cfg.write_text(CONFIG)
    model, _, plan = load_mixed_model(cfg, tiny_models.target)
    assert set(plan.values()) == {"fp16", "fp8", "int8"}
    export_compressed_tensors(model, tmp_path / "ct", tiny_models.target, int8_scheme="w8a8", fp8_scheme="w8a8")
    qcfg = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    assert qcfg["format"] == "mixed-precision" and len(qcfg["config_groups"]) == 2
    prompt = [5, 6, 7, 8, 9, 10]
    ours = model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False)[0, len(prompt):].tolist()
    script = tmp_path / "run_vllm.py"
    script.write_text(VLLM_RUN)
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", VLLM_ENABLE_V1_MULTIPROCESSING="0",
               VLLM_CACHE_ROOT=str(tmp_path / "vllm-cache"))
    r = subprocess.run([sys.executable, str(script), str(tmp_path / "ct"), json.dumps(prompt)], env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    line = [l for l in r.stdout.splitlines() if l.startswith("TOKENS ")][-1]
    assert json.loads(line[len("TOKENS "):]) == ours
