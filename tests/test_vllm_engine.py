"""The vLLM engine, for real (the vLLM CPU build) on the tiny fp32 models.

Each vLLM configuration starts once per module (module fixtures) and is released before the next one.
"""
import gc
import logging
import sys

import pytest

from lib.config import resolve
from lib.errors import EngineUnavailable, UsageError
from lib.models import ModelPaths, load_model
from lib.types import Clock, Request

NUM_PROMPTS, NEW_TOKENS, GAMMA = 6, 32, 3


def make_cfg(**env):
    base = {"GAMMA_VALUE": str(GAMMA), "VLLM_MAX_NUM_SEQS": "8", "VLLM_MAX_MODEL_LEN": "512"}
    return resolve(None, {**base, **{k: str(v) for k, v in env.items()}})


def make_engine(tiny_models, method="target", **env):
    from lib.engines.vllm_engine import VLLMEngine
    return VLLMEngine(make_cfg(**env), method, ModelPaths(tiny_models.target, tiny_models.draft, tiny=True))


@pytest.fixture(scope="module")
def requests_(tiny_tokenizer, shipped_prompts):
    return [Request(i, p, tiny_tokenizer.encode(p), NEW_TOKENS) for i, p in enumerate(shipped_prompts[:NUM_PROMPTS])]


@pytest.fixture(scope="module")
def reference(tiny_models, requests_):
    """Greedy AR tokens from the project's own loop (one prompt at a time: no padding)."""
    from lib.decoding.chain import autoregressive_generate
    target = load_model(tiny_models.target, "float32", "cpu")
    eos = target.generation_config.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos]) - {None}
    tokens = {r.request_id: autoregressive_generate(target, [r.prompt_ids], NEW_TOKENS, eos_ids=eos_ids).tokens[0]
              for r in requests_}
    del target
    return tokens


def spec_metrics_direct():
    """vLLM's counters read with vLLM's own reader, independently of the engine's helper."""
    from vllm.v1.metrics.reader import get_metrics_snapshot
    out = {}
    for m in get_metrics_snapshot():
        if m.name.startswith("vllm:spec_decode_"):
            out[m.name] = list(m.values) if hasattr(m, "values") else m.value
    return out


SPEC_SETTINGS = {
    "target": ("target", {}),
    "draft_model": ("speculative", {"VLLM_ENABLE_SPECULATIVE": "true", "VLLM_SPEC_METHOD": "draft_model"}),
    "ngram": ("speculative", {"VLLM_ENABLE_SPECULATIVE": "true", "VLLM_SPEC_METHOD": "ngram",
                              "VLLM_NGRAM_PROMPT_LOOKUP_MAX": "3", "VLLM_NGRAM_PROMPT_LOOKUP_MIN": "1"}),
}


@pytest.fixture(scope="module", params=list(SPEC_SETTINGS))
def offline_run(request, tiny_models, requests_):
    method, env = SPEC_SETTINGS[request.param]
    engine = make_engine(tiny_models, method, **env)
    engine.start()
    before = spec_metrics_direct()
    records = []
    engine.run(requests_, Clock(), records.append)
    after = spec_metrics_direct()
    yield request.param, engine, {r.request_id: r for r in records}, before, after
    engine.stop()
    del engine
    gc.collect()


def test_offline_greedy_tokens_equal_autoregressive(offline_run, reference, requests_):
    name, engine, records, _, _ = offline_run
    assert engine.llm is not None and engine.async_engine is None  # fixed count -> offline engine
    assert sorted(records) == [r.request_id for r in requests_]
    for rid, tokens in reference.items():
        assert records[rid].output_ids == tokens, f"{name}: request {rid} differs from AR"
        assert len(records[rid].token_times) == len(tokens)
        assert records[rid].token_times == sorted(records[rid].token_times)
        assert records[rid].finish_reason in ("stop", "length")


@pytest.fixture(scope="module")
def reference_records(tiny_models, requests_):
    """The project's AR loop's records, with the target's top-2 margins and top logits (float32, one at a time)."""
    from lib.decoding.chain import autoregressive_generate
    from lib.types import RequestRecord
    target = load_model(tiny_models.target, "float32", "cpu")
    eos = target.generation_config.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos]) - {None}
    out = {}
    for r in requests_:
        gen = autoregressive_generate(target, [r.prompt_ids], NEW_TOKENS, eos_ids=eos_ids)
        out[r.request_id] = RequestRecord(r.request_id, len(r.prompt_ids), gen.tokens[0], "", 0.0, 0.0,
                                          gen.token_times[0], gen.finish_reasons[0],
                                          top2_margin=gen.top2_margins[0], top_logit=gen.top_logits[0])
    del target
    return out


def test_offline_records_carry_the_targets_top2_logits(offline_run, reference_records):
    """logprobs=2 in raw_logits mode: per token the target's top-2 logits (in SD mode too), as the project's own
    float32 loop computes them; the losslessness verdict against that loop is exact."""
    from lib import lossless
    name, _, records, _, _ = offline_run
    for rid, ref in reference_records.items():
        assert records[rid].top2_margin == pytest.approx(ref.top2_margin, abs=1e-3), name
        assert records[rid].top_logit == pytest.approx(ref.top_logit, abs=1e-3), name
    verdict = lossless.greedy_verdict(list(reference_records.values()), list(records.values()), "float32")
    assert verdict["verdict"] == "exact" and verdict["compared"] == len(reference_records)


def test_acceptance_equals_vllm_counters(offline_run):
    name, engine, _, before, after = offline_run
    if name == "target":
        assert engine.run_spec_counters is None
        return
    counters = engine.run_spec_counters
    diff = lambda key: after.get(key, 0) - before.get(key, 0)  # noqa: E731
    assert counters.num_drafts == diff("vllm:spec_decode_num_drafts") > 0
    assert counters.draft_tokens == diff("vllm:spec_decode_num_draft_tokens") > 0
    assert counters.accepted_tokens == diff("vllm:spec_decode_num_accepted_tokens")
    per_pos_before = before.get("vllm:spec_decode_num_accepted_tokens_per_pos", [0] * GAMMA)
    per_pos_after = after["vllm:spec_decode_num_accepted_tokens_per_pos"]
    assert counters.accepted_per_position == [a - b for a, b in zip(per_pos_after, per_pos_before)]
    assert len(counters.accepted_per_position) == GAMMA
    assert sum(counters.accepted_per_position) == counters.accepted_tokens
    assert engine.raw_spec_metrics["vllm:spec_decode_num_drafts"] == counters.num_drafts
    if name == "draft_model":  # the tiny draft was trained on the target's corpus: it does get accepted
        assert counters.accepted_tokens > 0


def test_rate_mode_streams_through_async_engine(tiny_models, requests_, reference):
    engine = make_engine(tiny_models, "target", AUTO_RATE="10", AUTO_DURATION="1")
    engine.start()
    try:
        assert engine.async_engine is not None and engine.llm is None
        arrivals = [0.0, 0.05, 0.1, 0.15]
        timed = [Request(r.request_id, r.prompt, r.prompt_ids, r.max_new_tokens, arrival=a)
                 for r, a in zip(requests_, arrivals)]
        records = {}
        engine.run(timed, Clock(), lambda rec: records.__setitem__(rec.request_id, rec))
    finally:
        engine.stop()
    assert sorted(records) == [r.request_id for r in timed]
    for request in timed:
        record = records[request.request_id]
        assert record.output_ids == reference[request.request_id]
        assert record.start >= request.arrival
        times = record.token_times
        assert times[0] > record.start and len(times) == len(record.output_ids)
        assert times == sorted(times)
        # streamed: tokens arrive over many deliveries (a lagging consumer may get two steps in one delta)
        assert len(set(times)) > len(times) // 4


def test_max_concurrency_caps_requests_in_flight_offline_and_streaming(tiny_models, requests_):
    engine = make_engine(tiny_models, "target", MAX_CONCURRENCY="2")
    engine.start()
    try:
        runs = []
        for arrivals in ([0.0] * 4, [0.01, 0.02, 0.03, 0.04]):  # offline engine, then the async engine
            timed = [Request(r.request_id, r.prompt, r.prompt_ids, r.max_new_tokens, arrival=a)
                     for r, a in zip(requests_, arrivals)]
            records = []
            engine.run(timed, Clock(), records.append)
            runs.append(records)
    finally:
        engine.stop()
    for records in runs:
        spans = [(r.start, r.token_times[-1]) for r in records]
        assert len(spans) == 4
        assert all(sum(s <= t < e for s, e in spans) <= 2 for t, _ in spans)
        assert max(s for s, _ in spans) >= min(e for _, e in spans)  # the last ones waited for a free slot


@pytest.mark.parametrize("env, needle", [
    ({"VLLM_NUM_SPECULATIVE_TOKENS": "zero"}, "VLLM_NUM_SPECULATIVE_TOKENS"),
    ({"VLLM_SPEC_METHOD": "medusa"}, "VLLM_SPEC_METHOD"),
    ({"VLLM_TENSOR_PARALLEL_SIZE": "0"}, "VLLM_TENSOR_PARALLEL_SIZE"),
    ({"VLLM_GPU_MEMORY_UTILIZATION": "1.5"}, "VLLM_GPU_MEMORY_UTILIZATION"),
    ({"VLLM_ENABLE_SPECULATIVE": "maybe"}, "VLLM_ENABLE_SPECULATIVE"),
    ({"VLLM_DTYPE": "int3"}, "VLLM_DTYPE"),
])
def test_bad_vllm_values_are_usage_errors(env, needle):
    with pytest.raises(UsageError, match=needle):
        make_cfg(**env)


def test_missing_draft_folder_is_a_usage_error(tiny_models, tmp_path):
    with pytest.raises(UsageError, match="DRAFTER_MODEL"):
        make_engine(tiny_models, "speculative", VLLM_ENABLE_SPECULATIVE="true",
                    DRAFTER_MODEL=str(tmp_path / "no-such-draft"))


def test_eagle_without_head_folder_is_a_usage_error(tiny_models):
    with pytest.raises(UsageError, match="VLLM_SPEC_METHOD=eagle3 needs DRAFTER_MODEL"):
        make_engine(tiny_models, "speculative", VLLM_ENABLE_SPECULATIVE="true", VLLM_SPEC_METHOD="eagle3")


def test_speculative_config_follows_the_variables(tiny_models):
    engine = make_engine(tiny_models, "speculative", VLLM_ENABLE_SPECULATIVE="true", VLLM_SPEC_METHOD="ngram",
                         VLLM_NUM_SPECULATIVE_TOKENS="5")
    assert engine.speculative_config == {"method": "ngram", "num_speculative_tokens": 5,
                                         "prompt_lookup_max": 4, "prompt_lookup_min": 2}
    engine = make_engine(tiny_models, "speculative", VLLM_ENABLE_SPECULATIVE="true")
    assert engine.speculative_config == {"method": "draft_model", "model": str(tiny_models.draft),
                                         "num_speculative_tokens": GAMMA}  # defaults to GAMMA_VALUE


def test_disabled_speculative_falls_back_to_target_with_warning(tiny_models, caplog):
    engine = make_engine(tiny_models, "speculative", VLLM_ENABLE_SPECULATIVE="false")
    assert not engine.use_speculative and engine.speculative_config is None
    engine.start()
    try:
        assert "speculative_config" not in engine._engine_kwargs()
    finally:
        engine.stop()
    err = "\n".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert "INFERENCE_METHOD=speculative but VLLM_ENABLE_SPECULATIVE=false" in err
    assert "falling back to target-only generation" in err


def test_missing_vllm_package_says_how_to_install(monkeypatch):
    from lib.vllm_support import import_vllm
    monkeypatch.setitem(sys.modules, "vllm", None)
    with pytest.raises(EngineUnavailable, match="requirements/vllm.txt"):
        import_vllm()


def test_weight_bytes_counts_target_and_draft_parameters_from_the_headers(tiny_models):
    """vLLM's weight bytes (for bandwidth_efficiency) from safetensors headers: float32 = 4 bytes a parameter."""
    target = load_model(tiny_models.target, "float32", "cpu")
    draft = load_model(tiny_models.draft, "float32", "cpu")
    engine = make_engine(tiny_models, "speculative", VLLM_ENABLE_SPECULATIVE="true", VLLM_DTYPE="float32")
    params = sum(p.numel() for m in (target, draft) for p in m.state_dict().values() if p.dtype.is_floating_point)
    engine.dtype = "float32"  # what start() sets on CPU; weight_bytes reads only headers, no engine needed
    assert engine.weight_bytes() == 4 * params


def test_draft_method_runs_the_draft_folder_as_target_with_the_targets_tokenizer(tiny_models):
    """vllm:draft, the SD cost model's draft-as-target mode: the draft model, no speculation."""
    engine = make_engine(tiny_models, "draft")
    engine.dtype, engine.on_cpu = "float32", True  # what start() sets on CPU
    kwargs = engine._engine_kwargs()
    assert kwargs["model"] == str(tiny_models.draft) and kwargs["tokenizer"] == str(tiny_models.target)
    assert "speculative_config" not in kwargs and not engine.use_speculative
    draft = load_model(tiny_models.draft, "float32", "cpu")
    assert engine.weight_bytes() == 4 * sum(p.numel() for p in draft.state_dict().values()
                                            if p.dtype.is_floating_point)
