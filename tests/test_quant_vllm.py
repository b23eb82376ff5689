"""A mixed-precision export loaded by vLLM's own CPU build: the schemes it accepts there (W8A8 int8 and W8A8 fp8,
fp16 layers ignored) must give the same greedy tokens as the project's loader on the same weights.

In float32 the tokens must be equal. In 16-bit dtypes the tiny model's logits tie exactly at many steps (its corpus
makes several names equally likely; bf16 keeps 8 bits), so the two implementations may break a tie differently and
then continue from different text; there every token vLLM chose must be the project loader's greedy choice, up to
a tie within that dtype's rounding (lib/numerics.py), at every position of vLLM's own output (teacher-forced).

vLLM's CPU kernels depend on the CPU: with AMX (amx_tile) it runs W8A8 layers through its own AMX int8 GEMM, which
takes bfloat16/float16 activations only; without AMX, oneDNN runs them in any of the three dtypes. bfloat16 and
float16 run on both kinds and are checked on both; float32 is checked where vLLM runs it, and where it refuses (AMX)
the test checks that the refusal is the documented one (docs/mixed_precision.md)."""
import json

import pytest
import torch

from lib.numerics import tie_bound
from lib.quant.export import export_compressed_tensors
from lib.quant.loader import load_mixed_model
from lib.quant.vllm_run import MIXED_W8A8_CONFIG, cpu_has_amx, run_vllm_greedy

PROMPT = [5, 6, 7, 8, 9, 10]
AMX_FLOAT32_REFUSAL = "int8_scaled_mm_with_quant: expect A to be bfloat16 or half"


@pytest.fixture(scope="module")
def mixed_export(tiny_models, tmp_path_factory):
    work = tmp_path_factory.mktemp("mixed")
    cfg = work / "mp.yaml"
    cfg.write_text(MIXED_W8A8_CONFIG)
    model, _, plan = load_mixed_model(cfg, tiny_models.target)
    assert set(plan.values()) == {"fp16", "fp8", "int8"}
    export_compressed_tensors(model, work / "ct", tiny_models.target, int8_scheme="w8a8", fp8_scheme="w8a8")
    qcfg = json.loads((work / "ct" / "config.json").read_text())["quantization_config"]
    assert qcfg["format"] == "mixed-precision" and len(qcfg["config_groups"]) == 2
    return cfg, work


def greedy_of_our_loader(cfg, target, dtype: str) -> list[int]:
    model, _, _ = load_mixed_model(cfg, target, "cpu", dtype)
    with torch.no_grad():
        out = model.generate(torch.tensor([PROMPT]), max_new_tokens=12, do_sample=False)
    return out[0, len(PROMPT):].tolist()


def gaps_to_our_greedy_choice(cfg, target, dtype: str, tokens: list[int]) -> list[tuple[float, float]]:
    """Teacher-forced on PROMPT + tokens: per position (our top logit - our logit of the token chosen, tie bound)."""
    model, _, _ = load_mixed_model(cfg, target, "cpu", dtype)
    with torch.no_grad():
        logits = model(torch.tensor([PROMPT + tokens])).logits[0, len(PROMPT) - 1:-1].float()
    top = logits.max(-1).values
    chosen = logits[torch.arange(len(tokens)), torch.tensor(tokens)]
    return [(float(t - c), tie_bound(float(t), dtype)) for t, c in zip(top, chosen)]


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_vllm_loads_w8a8_mixed_export_and_matches(mixed_export, tiny_models, tmp_path, dtype):
    cfg, work = mixed_export
    tokens, error, _ = run_vllm_greedy(work / "ct", dtype, tmp_path, PROMPT, 12, timeout=600)
    if dtype == "float32" and cpu_has_amx():
        assert tokens is None and AMX_FLOAT32_REFUSAL in (error or ""), (tokens, error)
        return
    assert tokens is not None, error
    if dtype == "float32":
        assert tokens == greedy_of_our_loader(cfg, tiny_models.target, dtype)
        return
    gaps = gaps_to_our_greedy_choice(cfg, tiny_models.target, dtype, tokens)
    assert len(gaps) == 12 and all(gap <= bound for gap, bound in gaps), gaps
