"""The losslessness verdict (lib/lossless.py): its tie bound on hand-computed cases, ties told from bugs on
constructed records, the distribution test at temperature > 0, and real runs of benchmark.py on the tiny models: a
planted bug in the SD loop gives MISMATCH and exit 3 with the files written; float32 CPU runs give `exact`."""
import json

import numpy as np
import pytest
import torch

import benchmark
from lib import lossless
from lib.engines import pytorch_engine
from lib.numerics import tie_bound
from lib.types import Generation, RequestRecord


def record(request_id, ids, margins=None, tops=None, reason="length"):
    return RequestRecord(request_id, 3, list(ids), "", 0.0, 0.0, [0.0] * len(ids), reason, top2_margin=margins,
                         top_logit=tops)


# ---------------------------------------------------------------- the bound


@pytest.mark.parametrize("top, dtype, expected", [
    (10.0, "float32", 4 * 2.0 ** -23 * 8),  # 10 lies in [8, 16): one ulp is 2**-23 x 8
    (-10.0, "float32", 4 * 2.0 ** -23 * 8),  # the magnitude, whatever the sign
    (10.0, "bfloat16", 0.25),  # 4 x 2**-7 x 8
    (20.0, "bfloat16", 0.5),  # [16, 32): twice the spacing
    (16.0, "float16", 4 * 2.0 ** -10 * 16),
    (0.3, "bfloat16", 4 * 2.0 ** -7),  # logits under 1 get the spacing at 1
])
def test_tie_bound_is_a_few_ulps_at_the_top_logit(top, dtype, expected):
    assert tie_bound(top, dtype) == pytest.approx(expected, rel=1e-12)


def test_the_bound_covers_a_real_rounding_flip():
    """Two float32 sums of the same numbers in another order differ by rounding only; the bound at their
    magnitude holds that difference, and a difference of a few percent is far outside it."""
    gen = torch.Generator().manual_seed(0)
    terms = torch.randn(4096, generator=gen, dtype=torch.float64).float() * 0.1
    forward, backward = terms.sum().item(), terms.flip(0).cumsum(0)[-1].item()
    top = max(abs(forward), abs(backward))
    assert abs(forward - backward) <= tie_bound(top, "float32")
    assert 0.03 * max(top, 1.0) > tie_bound(top, "float32")


# ---------------------------------------------------------------- greedy: records


def test_equal_outputs_are_exact_and_unfinished_ones_are_counted():
    ar = [record(0, [5, 6, 7]), record(1, [8, 9]), record(2, [1], reason="error")]
    sd = [record(0, [5, 6, 7]), record(1, [8, 9]), record(2, [1, 2], reason="cancelled"), record(3, [4])]
    out = lossless.greedy_verdict(ar, sd, "float32")
    assert out["verdict"] == "exact" and out["compared"] == 2 and out["equal"] == 2
    assert out["not_compared"] == 2  # request 2 failed on both sides, request 3 ran on one side only
    assert out["differences"] == []


def test_near_tie_is_a_numerical_tie_and_a_confident_difference_a_mismatch():
    """bfloat16 with the top logit at 12.5: the bound is 4 x 2**-7 x 8 = 0.25."""
    ar = [record(0, [1, 2, 3, 4], [3.0, 2.0, 0.125, 1.0], [12.5] * 4),
          record(1, [1, 2, 3], [3.0, 4.0, 2.0], [12.5] * 3)]
    sd = [record(0, [1, 2, 9, 9], [3.0, 2.0, 0.0625, 1.5], [12.5] * 4),
          record(1, [1, 7, 3], [3.0, 4.0, 2.0], [12.5] * 3)]
    out = lossless.greedy_verdict(ar, sd, "bfloat16")
    tie, bug = out["differences"]
    assert (tie["request_id"], tie["position"], tie["class"]) == (0, 2, "numerical tie")
    assert (tie["ar_token"], tie["sd_token"], tie["ar_margin"], tie["sd_margin"]) == (3, 9, 0.125, 0.0625)
    assert tie["bound"] == 0.25
    assert (bug["request_id"], bug["position"], bug["class"]) == (1, 1, "MISMATCH")
    assert out["verdict"] == "MISMATCH" and out["equal"] == 0
    only_tie = lossless.greedy_verdict(ar[:1], sd[:1], "bfloat16")
    assert only_tie["verdict"] == "numerical tie"
    assert lossless.greedy_verdict(ar[:1], sd[:1], "float32")["verdict"] == "MISMATCH"  # 0.125 is no float32 tie


def test_the_drift_measured_where_the_runs_agree_widens_the_bound():
    """float32, top logit 12 (one ulp 2**-20): margins of the agreeing positions differ by up to 3 ulps, so the
    bound is 2 x 3 = 6 ulps; a flip with margins of 5 ulps is a tie then, and would not be at the floor of 4."""
    u = 2.0 ** -20
    ar = [record(0, [1, 2, 3], [1.0, 0.5, 5 * u], [12.0] * 3), record(1, [4, 5], [2.0, 1.0], [12.0] * 2)]
    sd = [record(0, [1, 2, 7], [1.0 + 3 * u, 0.5 - u, 4 * u], [12.0] * 3), record(1, [4, 5], [2.0, 1.0], [12.0] * 2)]
    out = lossless.greedy_verdict(ar, sd, "float32")
    bound = out["bound"]
    assert bound["measured_drift_ulps"] == pytest.approx(3.0) and bound["positions_measured"] == 4
    assert bound["ulps"] == pytest.approx(6.0) and bound["floor_ulps"] == 4
    (diff,) = out["differences"]
    assert diff["bound"] == pytest.approx(6 * u) and out["verdict"] == "numerical tie"
    assert lossless.greedy_verdict(ar[:1], [record(0, [1, 2, 7], [1.0, 0.5, 4 * u], [12.0] * 3)],
                                   "float32")["verdict"] == "MISMATCH"  # no drift: 5 ulps is over the floor of 4


def test_one_margin_over_the_bound_makes_it_a_mismatch():
    ar = [record(0, [1, 2], [1.0, 0.1], [10.0, 10.0])]
    sd = [record(0, [1, 3], [1.0, 0.9], [10.0, 10.0])]  # the SD run's target was sure of another token
    assert lossless.greedy_verdict(ar, sd, "bfloat16")["differences"][0]["class"] == "MISMATCH"


def test_without_margins_a_difference_is_unexplained_and_the_scale_assumed():
    ar, sd = [record(0, [1, 2, 3])], [record(0, [1, 2, 4])]
    out = lossless.greedy_verdict(ar, sd, None)
    assert out["verdict"] == "unexplained" and out["margins"] == "unknown"
    assert "assumed" in out["bound"]["dtype"] and "assumed" in out["bound"]["scale"]
    logprobs_only = lossless.greedy_verdict([record(0, [1, 2, 3], [1.0, 1.0, 0.2])],
                                            [record(0, [1, 2, 4], [1.0, 1.0, 0.3])], "bfloat16")
    diff = logprobs_only["differences"][0]  # margins without logits: the bound at the assumed scale of 32
    assert diff["bound"] == tie_bound(lossless.ASSUMED_LOGIT_SCALE, "bfloat16") == 1.0
    assert diff["class"] == "numerical tie"


def test_a_prefix_differs_where_the_shorter_output_ends():
    assert lossless.first_difference([1, 2], [1, 2, 3]) == 2
    assert lossless.first_difference([1, 2, 3], [1, 2, 3]) is None
    assert lossless.first_difference([4, 2], [1, 2]) == 0


def test_attach_prefers_the_same_engines_target_mode():
    modes = {"hf:target": {}, "vllm:target": {}, "hf:speculative": {"engine": {"dtype": "float32"}},
             "vllm:speculative": {}, "llamacpp:speculative": {}}
    records = {m: [record(0, [1, 2])] for m in modes}
    records["vllm:speculative"] = [record(0, [1, 3], [1.0, 5.0], [10.0, 10.0])]
    assert lossless.attach(modes, records, 0.0) == ["vllm:speculative"]
    assert modes["hf:speculative"]["lossless"]["verdict"] == "exact"
    assert modes["hf:speculative"]["lossless"]["baseline"] == "hf:target"
    assert modes["vllm:speculative"]["lossless"]["baseline"] == "vllm:target"
    assert modes["llamacpp:speculative"]["lossless"]["baseline"] == "hf:target"  # the run's first
    assert "lossless" not in modes["hf:target"] and "lossless" not in modes["vllm:target"]
    alone = {"hf:speculative": {}}
    lossless.attach(alone, {"hf:speculative": [record(0, [1])]}, 0.0)
    assert alone["hf:speculative"]["lossless"]["verdict"] == "not compared"


# ---------------------------------------------------------------- temperature > 0


def sampled_records(rng, probs, n, length=12):
    return [record(i, rng.choice(len(probs), size=length, p=probs).tolist()) for i in range(n)]


def test_distribution_test_tells_same_from_different_and_says_when_too_small():
    rng = np.random.default_rng(1)
    p = np.array([0.4, 0.3, 0.2, 0.1])
    q = np.array([0.25, 0.25, 0.25, 0.25])
    same = lossless.sampled_verdict(sampled_records(rng, p, 60), sampled_records(rng, p, 60))
    assert same["verdict"] == "consistent" and same["p_value"] > lossless.ALPHA
    assert same["tokens"] == {"ar": 720, "sd": 720} and same["categories"] == 5
    different = lossless.sampled_verdict(sampled_records(rng, p, 60), sampled_records(rng, q, 60))
    assert different["verdict"] == "DIFFERENT" and different["p_value"] < lossless.ALPHA
    small = lossless.sampled_verdict(sampled_records(rng, p, 6), sampled_records(rng, q, 6))
    assert small["verdict"] == "inconclusive" and "smallest p-value" in small["note"]


def test_sd_sampling_of_the_tiny_pair_is_consistent_with_ar(tiny_models, tiny_tokenizer, shipped_prompts):
    """The project's own SD sampler against the target's AR samples: consistent; the draft's own samples, a
    different distribution, are told apart by the same test."""
    from lib.decoding.chain import autoregressive_generate, speculative_generate
    from lib.models import load_model
    torch.set_num_threads(2)
    target, draft = load_model(tiny_models.target), load_model(tiny_models.draft)
    prompts = [tiny_tokenizer.encode(p) for p in shipped_prompts[:4]] * 30  # 120 requests of 12 tokens
    kw = dict(temperature=1.0, eos_ids=set(), pad_id=0)
    ar = autoregressive_generate(target, prompts, 12, generator=torch.Generator().manual_seed(1), **kw)
    sd = speculative_generate(target, draft, prompts, 12, 3, generator=torch.Generator().manual_seed(2), **kw)
    other = autoregressive_generate(draft, prompts, 12, generator=torch.Generator().manual_seed(3), **kw)

    def records(gen):
        return [record(i, tokens) for i, tokens in enumerate(gen.tokens)]
    assert lossless.sampled_verdict(records(ar), records(sd))["verdict"] == "consistent"
    assert lossless.sampled_verdict(records(ar), records(other))["verdict"] == "DIFFERENT"


# ---------------------------------------------------------------- real runs of benchmark.py


def run_main(monkeypatch, tmp_path, **env):
    base = {"RESULTS_DIR": str(tmp_path), "RUN_ID": "run", "NUM_PROMPTS": "3", "GENERATION_LENGTH": "16",
            "WARMUP": "false", "ENABLE_GPU_MONITOR": "false"}
    for key, value in {**base, **env}.items():
        monkeypatch.setenv(key, str(value))
    code = benchmark.main([])
    run_dir = tmp_path / "run"
    return code, json.loads((run_dir / "benchmark_results.json").read_text()), run_dir


PLANTED = {"request_row": 1, "position": 6}  # row 1 of the one batch of 3: request 1


def corrupting(decode):
    """The SD loop with a planted bug: one emitted token of one row replaced by another."""
    def decode_with_bug(engine, prompts, max_new):
        gen: Generation = decode(engine, prompts, max_new)
        row, pos = PLANTED["request_row"], PLANTED["position"]
        if row < len(gen.tokens) and pos < len(gen.tokens[row]):
            gen.tokens[row][pos] = (gen.tokens[row][pos] + 1) % engine.target.config.vocab_size
        return gen
    return decode_with_bug


@pytest.mark.parametrize("fast", ["true", "false"])
def test_planted_bug_is_a_mismatch_and_exits_3_with_the_files_written(monkeypatch, tmp_path, capsys, fast):
    method = pytorch_engine.METHODS["speculative"]
    monkeypatch.setitem(pytorch_engine.METHODS, "speculative", pytorch_engine.Method(
        corrupting(method.plain), corrupting(method.fast)))
    code, results, run_dir = run_main(monkeypatch, tmp_path, HF_FAST_PATH=fast, ENABLE_BATCH="true", BATCH_SIZE=3)
    assert code == lossless.EXIT_CODE == 3
    verdict = results["modes"]["hf:speculative"]["lossless"]
    assert verdict["verdict"] == "MISMATCH" and verdict["baseline"] == "hf:target"
    (diff,) = verdict["differences"]
    assert (diff["request_id"], diff["position"], diff["class"]) == (1, PLANTED["position"], "MISMATCH")
    assert diff["sd_token"] in (diff["ar_token"] + 1, 0)
    assert diff["ar_margin"] > diff["bound"] and verdict["bound"]["dtype"] == "float32"
    run = json.loads((run_dir / "run.json").read_text())
    assert run["exit_code"] == 3 and "MISMATCH" in run["error"] and run["status"] == "ok"
    out = capsys.readouterr().out
    assert "MISMATCH" in out and f"request 1 MISMATCH at token {PLANTED['position']}" in out

    code, results, _ = run_main(monkeypatch, tmp_path, HF_FAST_PATH=fast, ENABLE_BATCH="true", BATCH_SIZE=3,
                                LOSSLESS_CHECK="warn", OVERWRITE="true")
    assert code == 0 and results["modes"]["hf:speculative"]["lossless"]["verdict"] == "MISMATCH"


def test_float32_cpu_run_is_exact_with_margins_in_the_request_lines(monkeypatch, tmp_path, capsys):
    code, results, run_dir = run_main(monkeypatch, tmp_path, COMPARE_MODES="hf:target hf:speculative hf:assisted")
    assert code == 0
    for mode in ("hf:speculative", "hf:assisted"):
        verdict = results["modes"][mode]["lossless"]
        assert verdict["verdict"] == "exact" and verdict["compared"] == 3 and verdict["not_compared"] == 0
        assert verdict["margins"] == "known" and verdict["bound"]["dtype"] == "float32"
        # the margins of two computations of the same logits: a few ulps apart, and measured
        assert verdict["bound"]["positions_measured"] > 0 and verdict["bound"]["measured_drift_ulps"] < 16
    lines = {m: {json.loads(line)["request_id"]: json.loads(line) for line in
                 (run_dir / f"requests_hf_{m}.jsonl").read_text().splitlines()} for m in ("target", "speculative")}
    for rid, ar in lines["target"].items():
        sd = lines["speculative"][rid]
        assert len(ar["top2_margin"]) == len(ar["output_ids"]) == len(sd["top2_margin"])
        assert min(ar["top2_margin"]) >= 0
        # the same target logits, once from 1-token steps and once from verify passes: equal up to rounding
        assert np.allclose(ar["top2_margin"], sd["top2_margin"], atol=1e-4)
        assert np.allclose(ar["top_logit"], sd["top_logit"], atol=1e-4)
    assert "exact" in capsys.readouterr().out


def test_sampled_run_gets_the_distribution_check_and_says_how_little_it_tells(monkeypatch, tmp_path, capsys):
    code, results, _ = run_main(monkeypatch, tmp_path, TEMPERATURE=1.0)
    verdict = results["modes"]["hf:speculative"]["lossless"]
    assert code == 0 and verdict["check"] == "distribution" and verdict["compared"] == 3
    assert verdict["verdict"] == "inconclusive" and "smallest p-value they can give is 0.12" in verdict["note"]
    assert 0 < verdict["p_value"] <= 1 and verdict["tokens"]["ar"] > 0
    assert "lossless (inconclusive)" in capsys.readouterr().out


def test_lossless_check_off_writes_no_verdict(monkeypatch, tmp_path):
    code, results, _ = run_main(monkeypatch, tmp_path, LOSSLESS_CHECK="off", NUM_PROMPTS=1, GENERATION_LENGTH=4)
    assert code == 0 and "lossless" not in results["modes"]["hf:speculative"]
