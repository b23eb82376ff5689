"""Reference tree SD vs vLLM (EAGLE, fp32, CPU) on the tiny models: every greedy token agrees, logprobs match."""
import subprocess
import sys

import pytest

from lib.capture import load_capture
from lib.files import ROOT
from lib.logits_compare import compare_captures

COMMON = ["--config-name", "config1", "--num-prompts", "2", "--comparison-steps", "12", "--save-results"]


@pytest.fixture(scope="module")
def captures(tmp_path_factory):
    import vllm  # noqa: F401  (tests/run.sh installs requirements/vllm.txt; fail loudly if it is missing)
    out = tmp_path_factory.mktemp("vllm")
    for script in ("run_single_config.py", "run_vllm_config.py"):
        proc = subprocess.run([sys.executable, script, *COMMON, "--output-dir", str(out)], cwd=ROOT,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
    return load_capture(out / "logits_capture_config1.json"), load_capture(out / "vllm_capture_config1.json")


def test_reference_and_vllm_agree_on_every_greedy_token(captures):
    reference, vllm_capture = captures
    results = compare_captures(reference, vllm_capture)
    summary = results["summary"]
    assert summary["all_tokens_equal"], summary["first_divergent_step"]
    assert summary["aligned"]["steps"] == 24
    assert results["abs_diff_of"] == "logprobs"  # vLLM returns log-probabilities, not logits
    assert summary["aligned"]["max_abs_diff"] < 1e-3
    assert summary["aligned"]["mean_topk_overlap"] > 0.9


def test_vllm_capture_has_acceptance_counters(captures):
    _, vllm_capture = captures
    totals = vllm_capture.spec_totals()
    assert totals["num_drafts"] > 0 and 0 < totals["accepted_tokens"] <= totals["draft_tokens"]
    assert len(totals["accepted_per_position"]) == 5  # spec_num_iter of config1
    assert vllm_capture.extra["speculative_config"]["method"] == "eagle"
