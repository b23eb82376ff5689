"""SGLang adapter: the comparison config's mapping, conversion of Engine.generate output into a capture, clear errors.
SGLang cannot run on CPU machines, so its output is built here in the shape its meta_info has (sglang 0.5.x)."""
import subprocess
import sys

import numpy as np
import pytest

from lib.capture_runs.sglang import comparison_engine_args, comparison_sampling, prompt_capture_from_output
from lib.comparison_config import ComparisonConfig
from lib.engines.sglang_engine import SGLangEngine
from lib.errors import UsageError
from lib.files import ROOT

SERVER_ARGS = {"model_path", "speculative_algorithm", "speculative_draft_model_path", "speculative_num_steps",
               "speculative_eagle_topk", "speculative_num_draft_tokens", "mem_fraction_static",
               "chunked_prefill_size", "disable_cuda_graph", "random_seed"}


def test_seed_mapping_config1_and_config2():
    one = comparison_engine_args(ComparisonConfig(spec_num_iter=5, spec_tree_size=32), "/m/t", "/m/e")
    assert set(one) == SERVER_ARGS
    assert one["speculative_algorithm"] == "EAGLE" and one["speculative_draft_model_path"] == "/m/e"
    assert (one["speculative_num_steps"], one["speculative_num_draft_tokens"], one["speculative_eagle_topk"]) == \
        (5, 32, 7)
    assert one["mem_fraction_static"] == 0.7 and one["chunked_prefill_size"] == 1024 and one["disable_cuda_graph"]
    two = comparison_engine_args(ComparisonConfig(spec_num_iter=2, spec_tree_size=12, cuda_graph=True,
                                                  draft_type="model"), "/m/t", "/m/d")
    assert (two["speculative_num_steps"], two["speculative_num_draft_tokens"], two["speculative_eagle_topk"]) == \
        (2, 12, 6)
    assert two["speculative_algorithm"] == "STANDALONE" and not two["disable_cuda_graph"]
    # SGLang requires num_draft_tokens <= num_steps * topk + 1 for tree drafts
    for cfg in (one, two):
        assert cfg["speculative_num_draft_tokens"] <= cfg["speculative_num_steps"] * cfg["speculative_eagle_topk"] + 1
    sampling = comparison_sampling(ComparisonConfig(comparison_steps=9, capture_topk=5))
    assert sampling == {"sampling_params": {"temperature": 0.0, "max_new_tokens": 9}, "return_logprob": True,
                        "top_logprobs_num": 5}


def sglang_output():
    """What sglang.Engine.generate returns for one prompt with return_logprob=True, top_logprobs_num=3."""
    return {
        "text": " a b c d",
        "output_ids": [11, 12, 13, 14],
        "meta_info": {
            "id": "abc", "finish_reason": {"type": "length", "length": 4}, "prompt_tokens": 5,
            "completion_tokens": 4, "cached_tokens": 0, "e2e_latency": 0.05,
            "output_token_logprobs": [(-0.1, 11, None), (-0.2, 12, None), (-0.3, 13, None), (-0.05, 14, None)],
            "output_top_logprobs": [
                [(-0.1, 11, None), (-2.5, 40, None), (-3.0, 41, None)],
                [(-2.2, 50, None), (-0.2, 12, None), (-4.0, 51, None)],  # unsorted on purpose
                [(-0.3, 13, None), (-1.9, 60, None), (-2.0, 61, None)],
                [(-0.05, 14, None), (-3.3, 70, None), (-5.0, 71, None)],
            ],
            "spec_verify_ct": 2, "spec_accept_length": 2.0, "spec_accept_rate": 0.5,
        },
    }


def test_output_becomes_a_capture(tmp_path):
    from lib.capture import Capture, load_capture, save_capture
    capture = prompt_capture_from_output("hi", [1, 2, 3, 4, 5], sglang_output(), 3, 12)
    assert capture.token_ids == [11, 12, 13, 14]
    assert capture.topk_ids[1].tolist() == [12, 50, 51]  # sorted by log-probability
    assert np.allclose(capture.topk_logprobs[1], [-0.2, -2.2, -4.0])
    assert capture.spec["num_drafts"] == 2 and capture.spec["accepted_tokens"] == 2
    assert capture.topk_logits is None
    path = save_capture(Capture("sglang", "config1", {}, {}, [capture]), tmp_path)
    assert path.name == "sglang_capture_config1.json"
    assert load_capture(path).prompts[0].token_ids == [11, 12, 13, 14]


def test_wider_k_than_returned_pads_and_bad_output_is_refused():
    capture = prompt_capture_from_output("hi", [1], sglang_output(), 5, 12)
    assert capture.topk_ids.shape == (4, 5) and np.isinf(capture.topk_logprobs[0, 3])
    broken = sglang_output()
    del broken["meta_info"]["output_top_logprobs"]
    with pytest.raises(UsageError, match="output_top_logprobs"):
        prompt_capture_from_output("hi", [1], broken, 3, 12)
    short = sglang_output()
    short["meta_info"]["output_top_logprobs"].pop()
    with pytest.raises(UsageError, match="3 top-logprob rows for 4 tokens"):
        prompt_capture_from_output("hi", [1], short, 3, 12)


def test_benchmark_engine_args_for_a_chain(tiny_models):
    from lib.config import resolve
    from lib.models import ModelPaths
    cfg = resolve(None, {"GAMMA_VALUE": "3"})
    engine = SGLangEngine(cfg, "speculative", ModelPaths(tiny_models.target, tiny_models.draft, True))
    args = engine.engine_args()
    assert args["speculative_algorithm"] == "STANDALONE"
    assert (args["speculative_num_steps"], args["speculative_eagle_topk"], args["speculative_num_draft_tokens"]) == \
        (3, 1, 4)
    assert "speculative_algorithm" not in SGLangEngine(cfg, "target", ModelPaths(tiny_models.target, None,
                                                                                  True)).engine_args()


def test_missing_sglang_is_one_clear_line():
    import importlib.util
    if importlib.util.find_spec("sglang") is not None:  # never on CPU machines (no CPU build)
        pytest.skip("sglang is installed here; this test checks the message given without it")
    proc = subprocess.run([sys.executable, "run_sglang_config.py", "--config-name", "config1"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert "sglang is not installed" in proc.stderr and "requirements/sglang.txt" in proc.stderr
