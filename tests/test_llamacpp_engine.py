"""The llama.cpp engine on the tiny models: greedy output equals transformers' AR, SD counters add up."""
import pytest

from lib.config import resolve
from lib.decoding.chain import autoregressive_generate
from lib.engines import create_engine
from lib.models import ModelPaths, load_model
from lib.types import Clock, Request


@pytest.fixture(scope="module")
def requests_(tiny_tokenizer, shipped_prompts):
    return [Request(i, p, tiny_tokenizer.encode(p, add_special_tokens=False), 40)
            for i, p in enumerate(shipped_prompts[:4])]


def engine(tiny_models, method, **env):
    cfg = resolve(None, {"INFERENCE_ENGINE": "llamacpp", "GAMMA_VALUE": "4", **env})
    eng = create_engine("llamacpp", cfg, method, ModelPaths(tiny_models.target, tiny_models.draft, tiny=True))
    eng.start()
    return eng


def test_greedy_target_and_speculative_equal_transformers_ar(tiny_models, tiny_tokenizer, requests_):
    hf = load_model(tiny_models.target)
    expected = [autoregressive_generate(hf, [r.prompt_ids], r.max_new_tokens,
                                        eos_ids={tiny_tokenizer.eos_token_id}).tokens[0] for r in requests_]
    for method in ("target", "speculative"):
        eng = engine(tiny_models, method)
        records = eng.generate_batch(requests_, Clock())
        assert [rec.output_ids for rec in records] == expected, method
        for rec in records:
            assert len(rec.token_times) == len(rec.output_ids)
            assert rec.token_times == sorted(rec.token_times) and rec.token_times[0] >= rec.start
            assert rec.finish_reason in ("stop", "length")
            if method == "target":
                assert rec.spec is None
            else:
                s = rec.spec
                assert s.num_drafts > 0 and 0 < s.accepted_tokens <= s.draft_tokens <= 4 * s.num_drafts
                assert s.accepted_per_position[0] >= s.accepted_per_position[-1]
                assert sum(s.accepted_per_position) == s.accepted_tokens
                # every output token is either an accepted draft or one target token per verification round
                assert len(rec.output_ids) <= s.accepted_tokens + s.num_drafts + 1
        assert eng.describe()["n_threads"] >= 1 and eng.weight_bytes() > 0


def test_greedy_records_carry_the_targets_top2_logits(tiny_models, tiny_tokenizer, requests_):
    """Per token the target's top-2 margin and top logit, as transformers' float32 loop computes them (target-only
    and speculative); the losslessness verdict of SD against AR is exact."""
    from lib import lossless
    hf = load_model(tiny_models.target)
    expected = [autoregressive_generate(hf, [r.prompt_ids], r.max_new_tokens, eos_ids={tiny_tokenizer.eos_token_id})
                for r in requests_[:2]]
    records = {}
    for method in ("target", "speculative"):
        records[method] = engine(tiny_models, method).generate_batch(requests_[:2], Clock())
        for rec, ref in zip(records[method], expected):
            assert rec.top2_margin == pytest.approx(ref.top2_margins[0], abs=1e-3), method
            assert rec.top_logit == pytest.approx(ref.top_logits[0], abs=1e-3), method
    assert lossless.greedy_verdict(records["target"], records["speculative"], "float32")["verdict"] == "exact"


def test_sampling_runs_and_respects_the_limit(tiny_models, requests_):
    eng = engine(tiny_models, "speculative", TEMPERATURE="0.8")
    rec = eng.generate_batch(requests_[:1], Clock())[0]
    assert 0 < len(rec.output_ids) <= 40 and rec.spec.draft_tokens > 0


def test_bad_thread_count_is_a_usage_error():
    from lib.errors import UsageError
    with pytest.raises(UsageError, match="LLAMACPP_N_THREADS"):
        resolve(None, {"LLAMACPP_N_THREADS": "-1"})
