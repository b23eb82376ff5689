"""The SD cost model's formulas (lib/sd_model.py) on hand-computed cases, their assembly per mode
(lib/sd_report.py) and the plan's draft-as-target modes (lib/config.py)."""
import math

import pytest

from lib import sd_model as M
from lib import sd_report
from lib.config import modes, resolve
from lib.errors import UsageError


def test_tokens_per_round_from_per_position_acceptance():
    assert M.tokens_per_round([0.8, 0.6, 0.4, 0.2]) == pytest.approx(3.0)
    assert M.tokens_per_round([]) == 1.0  # no drafts: the target's own token


@pytest.mark.parametrize("alpha, k, tokens", [(0.5, 2, 1.75), (0.0, 4, 1.0), (1.0, 4, 5.0), (0.8, 1, 1.8)])
def test_leviathan_tokens_per_round(alpha, k, tokens):
    assert M.tokens_per_round_alpha(alpha, k) == pytest.approx(tokens)


def test_alpha_for_inverts_leviathan():
    assert M.alpha_for(1.75, 2) == pytest.approx(0.5, abs=1e-9)
    assert M.alpha_for(1.0, 4) == pytest.approx(0.0, abs=1e-9)
    assert M.alpha_for(5.0, 4) == pytest.approx(1.0, abs=1e-9)


def test_predicted_speedup_and_round_cost():
    assert M.round_cost(4, 0.1, 1.2) == pytest.approx(1.6)
    assert M.predicted_speedup(3.0, 4, 0.1, 1.2) == pytest.approx(1.875)
    assert M.predicted_speedup(3.0, 4, 0.1) == pytest.approx(3.0 / 1.4)  # v unknown: 1.0


@pytest.mark.parametrize("k, c, v, alpha", [
    (1, 0.5, None, 0.5),  # 1 + a = 1.5
    (2, 0.5, 1.0, (math.sqrt(5) - 1) / 2),  # 1 + a + a^2 = 2
    (4, 0.0, 1.0, 0.0),  # a round costs one target step: SD pays off at any acceptance
])
def test_break_even_acceptance(k, c, v, alpha):
    assert M.break_even_acceptance(k, c, v) == pytest.approx(alpha, abs=1e-9)


@pytest.mark.parametrize("k, c, v", [(2, 1.0, 1.0), (4, 0.9, 1.5)])  # k c + v >= k + 1: even a = 1 does not pay
def test_break_even_none_when_sd_cannot_pay_off(k, c, v):
    assert M.break_even_acceptance(k, c, v) is None


def test_extrapolated_rates_keep_the_last_conditional_acceptance():
    assert M.extrapolated_rates([0.8, 0.4], 4) == pytest.approx([0.8, 0.4, 0.2, 0.1])
    assert M.extrapolated_rates([0.6], 3) == pytest.approx([0.6, 0.36, 0.216])  # k = 1: r = rate[0]
    assert M.extrapolated_rates([0.5, 0.5], 3) == pytest.approx([0.5, 0.5, 0.5])
    assert M.extrapolated_rates([0.0, 0.0], 3) == [0.0, 0.0, 0.0]
    assert M.extrapolated_rates([0.9, 0.5, 0.1], 2) == [0.9, 0.5]


def test_verify_cost_at_other_k_is_linear_in_tokens():
    assert M.verify_cost_at(2, 4, 1.4) == pytest.approx(1.2)
    assert M.verify_cost_at(8, 4, 1.4) == pytest.approx(1.8)
    assert M.verify_cost_at(2, 4, None) is None


def test_best_k_within_the_measured_positions():
    # k'=1: 1.9 / 1.2 = 1.583; k'=2: 2.4 / 1.4 = 1.714; k'=3: 2.5 / 1.6 = 1.5625
    best = M.best_k([0.9, 0.5, 0.1, 0.05], c=0.2)
    assert best["k"] == 2 and best["speedup"] == pytest.approx(2.4 / 1.4) and not best["extrapolated"]
    assert sorted(best["by_k"]) == list(range(1, 9))  # up to max(2 k, 8)
    assert best["by_k"][3] == pytest.approx(2.5 / 1.6)
    # a measured v = 1.3 at k = 4 is 1 + 0.075 k' at k': k'=2: 2.4 / (0.4 + 1.15)
    with_v = M.best_k([0.9, 0.5, 0.1, 0.05], c=0.2, v=1.3)
    assert with_v["k"] == 2 and with_v["speedup"] == pytest.approx(2.4 / 1.55)
    assert with_v["by_k"][1] == pytest.approx(1.9 / 1.275)


def test_best_k_past_the_measured_positions_is_marked_extrapolated():
    # r = 0.8 / 0.9; k'=4: (2.7 + 0.8 r + 0.8 r^2) / 2.2 = 1.8378; k'=5: + 0.8 r^3, / 2.5 = 1.8420; k'=6: 1.8230
    r = 0.8 / 0.9
    best = M.best_k([0.9, 0.8], c=0.3)
    assert best["k"] == 5 and best["extrapolated"]
    assert best["speedup"] == pytest.approx((2.7 + 0.8 * (r + r * r + r ** 3)) / 2.5)
    assert best["by_k"][4] < best["speedup"] > best["by_k"][6]


def test_predicted_energy_per_token():
    assert M.predicted_energy_per_token(0.5, 3.0, 4, 0.1, 1.2) == pytest.approx(0.5 * 1.6 / 3.0)


def test_analyse_and_its_summary_line():
    model = M.analyse([0.8, 0.6, 0.4, 0.2], 0.1, "timed", 1.2, "timed", 1.5, ar_j_per_token=0.5,
                      sd_j_per_token=0.3)
    assert model["k"] == 4 and model["tokens_per_round"] == pytest.approx(3.0)
    assert M.tokens_per_round_alpha(model["alpha"], 4) == pytest.approx(3.0)
    assert model["predicted_speedup"] == pytest.approx(1.875)
    assert model["measured_over_predicted"] == pytest.approx(0.8)
    even = model["break_even_acceptance"]
    assert M.tokens_per_round_alpha(even, 4) == pytest.approx(1.6) and 0.37 < even < 0.39
    assert model["predicted_energy_per_token_j"] == pytest.approx(0.5 * 1.6 / 3.0)
    line = M.summary_line("hf:speculative", model)
    assert line.startswith("hf:speculative: c 0.100 (timed), verify 1.20 (timed), predicted 3.00 tokens/round "
                           "-> x1.88, measured x1.50 (0.80 of predicted); break-even acceptance 0.38 at k=4; best k ")
    assert "J/token predicted 0.2667, measured 0.3000" in line


def test_analyse_with_unknown_c_or_no_payoff():
    unknown = M.analyse([0.5, 0.25], None, "unknown: no draft mode", None, "not timed", 1.1)
    assert unknown["predicted_speedup"] is None and unknown["break_even"] is None and unknown["best_k"] is None
    assert unknown["tokens_per_round"] == pytest.approx(1.75) and unknown["verify_cost_used"] == 1.0
    line = M.summary_line("vllm:speculative", unknown)
    assert line == ("vllm:speculative: c unknown (unknown: no draft mode), verify unknown, 1 used (not timed), "
                    "predicted 1.75 tokens/round, measured x1.10")
    hopeless = M.analyse([0.1, 0.0], 1.0, "timed", 1.0, "timed", 0.5)
    assert hopeless["break_even_acceptance"] is None
    assert "break-even acceptance none: SD cannot pay off at this c; best k 1" in M.summary_line("m", hopeless)


# ---------------------------------------------------------------- lib/sd_report.py over result dicts

def _result(tpot_ms, per_position=None, cost_inputs=None, status="complete"):
    acceptance = {"num_drafts": 10 if per_position else 0, "per_position_acceptance_rate": per_position or []}
    out = {"status": status, "metrics": {"mode": "m", "latency": {"mean_tpot_ms": tpot_ms}, "acceptance": acceptance},
           "energy": {"available": False}}
    if cost_inputs is not None:
        out["cost_inputs"] = cost_inputs
    return out


DRAFT_INPUTS = {"cost_ratio": None, "cost_ratio_source": "draft-as-target TPOT ratio", "draft_mode": "vllm:draft",
                "verify_cost": None, "verify_cost_source": "not timed"}


def test_report_reads_timed_inputs_and_the_draft_mode():
    modes = {"hf:target": _result(10.0), "vllm:target": _result(20.0),
             "hf:speculative": _result(5.0, [0.8, 0.6, 0.4, 0.2], {"cost_ratio": 0.1, "cost_ratio_source": "timed",
                                                                     "verify_cost": 1.2,
                                                                     "verify_cost_source": "timed"}),
             "vllm:speculative": _result(16.0, [0.5, 0.25], DRAFT_INPUTS), "vllm:draft": _result(8.0)}
    sd_report.attach(modes)
    hf = modes["hf:speculative"]["sd_model"]
    assert hf["baseline"] == "hf:target" and hf["measured_speedup"] == pytest.approx(2.0)
    assert hf["predicted_speedup"] == pytest.approx(1.875)
    vllm = modes["vllm:speculative"]["sd_model"]
    assert vllm["baseline"] == "vllm:target" and vllm["measured_speedup"] == pytest.approx(20 / 16)
    assert vllm["cost_ratio"] == pytest.approx(0.4) and vllm["cost_ratio_source"] == "draft-as-target TPOT ratio"
    assert vllm["predicted_speedup"] == pytest.approx(1.75 / 1.8)  # 2 x 0.4 + 1 (v unknown)
    assert "sd_model" not in modes["vllm:draft"] and "sd_model" not in modes["hf:target"]
    lines = sd_report.summary_lines(modes)
    assert [line.split(":")[0] + ":" + line.split(":")[1] for line in lines] == ["hf:speculative",
                                                                               "vllm:speculative"]


def test_report_without_a_complete_draft_mode_says_why_c_is_unknown():
    modes = {"vllm:target": _result(20.0), "vllm:speculative": _result(16.0, [0.5], DRAFT_INPUTS),
             "vllm:draft": _result(8.0, status="interrupted")}
    sd_report.attach(modes)
    model = modes["vllm:speculative"]["sd_model"]
    assert model["cost_ratio"] is None and "no complete vllm:draft and vllm:target" in model["cost_ratio_source"]
    assert model["measured_speedup"] == pytest.approx(1.25) and model["predicted_speedup"] is None


# ---------------------------------------------------------------- the plan's draft-as-target modes

@pytest.mark.parametrize("env, expected", [
    ({"INFERENCE_ENGINE": "vllm", "VLLM_ENABLE_SPECULATIVE": "true"},
     [("vllm", "target"), ("vllm", "speculative"), ("vllm", "draft")]),
    ({"INFERENCE_ENGINE": "llamacpp"}, [("llamacpp", "target"), ("llamacpp", "speculative"), ("llamacpp", "draft")]),
    ({"INFERENCE_ENGINE": "llamacpp", "SD_DRAFT_COST": "false"}, [("llamacpp", "target"), ("llamacpp", "speculative")]),
    ({"INFERENCE_ENGINE": "vllm", "VLLM_ENABLE_SPECULATIVE": "true", "VLLM_SPEC_METHOD": "ngram"},
     [("vllm", "target"), ("vllm", "speculative")]),  # no draft model to run
    ({"INFERENCE_ENGINE": "vllm"}, [("vllm", "target"), ("vllm", "speculative")]),  # SD off: target fallback
    ({}, [("hf", "target"), ("hf", "speculative")]),  # hf times its draft steps in the loop
    ({"COMPARE_MODES": "hf:speculative llamacpp:speculative llamacpp:target"},
     [("hf", "speculative"), ("llamacpp", "speculative"), ("llamacpp", "draft"), ("llamacpp", "target")]),
])
def test_plan_adds_the_draft_as_target_mode(env, expected):
    assert modes(resolve(None, env)) == expected


@pytest.mark.parametrize("env, needle", [
    ({"INFERENCE_METHOD": "draft"}, "INFERENCE_METHOD='draft'"),
    ({"COMPARE_MODES": "hf:target hf:draft"}, "with engine hf"),
    ({"SD_DRAFT_COST": "sometimes"}, "SD_DRAFT_COST"),
])
def test_draft_method_is_not_a_choice_and_bad_values_are_refused(env, needle):
    with pytest.raises(UsageError, match=needle):
        resolve(None, env)


# ---------------------------------------------------------------- the loops' step timing (lib/decoding/timing.py)

@pytest.fixture(scope="module")
def random_pair():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    target = LlamaForCausalLM(config).eval()
    draft = LlamaForCausalLM(LlamaConfig(**{**config.to_dict(), "num_hidden_layers": 1})).eval()
    return target, draft


def test_both_sd_loops_time_every_round(random_pair):
    from lib.decoding import fast_path
    from lib.decoding.chain import speculative_generate
    from lib.decoding.timing import plain_step_seconds, step_seconds
    target, draft = random_pair
    prompts, gamma = [[1, 2, 3, 4, 5]], 3
    plain = speculative_generate(target, draft, prompts, 20, gamma)
    decoders = [fast_path.StaticDecoder(fast_path.weights_from_hf(m, 256), 1, 64) for m in (target, draft)]
    fast = fast_path.static_speculative_generate(*decoders, prompts, 20, gamma)
    for gen in (plain, fast):
        times = gen.step_times
        assert times.verify_rounds == gen.num_drafts[0] > 0  # batch 1: one verify step per counted round
        assert times.draft_steps == gamma * times.verify_rounds
        assert times.draft_s > 0 and times.verify_s > 0
    assert plain_step_seconds(target, prompts, repeats=3) > 0
    assert plain_step_seconds(target, [[1, 2, 3], [4, 5]], repeats=2) > 0  # a batch, left-padded
    assert step_seconds(decoders[0], 1, repeats=3) > 0
    # the measurement writes cache columns after the run; the next generation's prefill starts anew: unchanged
    assert fast_path.static_speculative_generate(*decoders, prompts, 20, gamma).tokens == fast.tokens == plain.tokens


def test_target_step_is_timed_where_the_run_was(random_pair):
    """step_seconds feeds every row at the given column (on CUDA the decode attention's cost grows with it) and
    leaves the rows' lengths as it found them; past the cache it clamps."""
    import torch

    from lib.decoding import fast_path
    from lib.decoding.timing import mid_position, step_seconds
    decoder = fast_path.StaticDecoder(fast_path.weights_from_hf(random_pair[0], 256), 2, 64)
    decoder.lengths.copy_(torch.tensor([3, 5]))
    assert step_seconds(decoder, 2, repeats=1, position=mid_position([[1] * 10, [1] * 20], 9)) > 0  # column 20
    def written():
        return (decoder.k_cache.abs().sum((0, 1, 2, 4)) > 0).nonzero().flatten().tolist()  # columns
    assert written() == [20, 21]
    assert decoder.lengths.tolist() == [3, 5]
    step_seconds(decoder, 1, repeats=1, position=10_000)
    assert written() == [20, 21, decoder.max_len - 1]


def test_the_target_step_is_timed_as_the_ar_loop_runs_it(random_pair):
    """Greedy AR picks inside its step (ar_step_then), so the target step the cost model divides by carries that
    pick, as the draft steps timed inside the SD loop carry theirs; a sampled AR picks outside the step."""
    from lib.decoding import fast_path
    from lib.decoding.timing import step_seconds
    decoder = fast_path.StaticDecoder(fast_path.weights_from_hf(random_pair[0], 256), 1, 64)
    assert fast_path.ar_step_then(0.0) is fast_path.greedy_pick and fast_path.ar_step_then(0.7) is None
    assert fast_path.ar_step_then(0.0, width=5) is None  # a verify step: no AR step is wider than one token
    picks = []
    step_seconds(decoder, 1, repeats=3, then=lambda logits: picks.append(fast_path.greedy_pick(logits)))
    assert len(picks) == 2 + 3 and all(token.shape == (1,) and tops.shape == (1, 2) for token, tops in picks)
