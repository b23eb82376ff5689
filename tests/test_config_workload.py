"""Configuration table, workload loading and schedules."""
import json

import numpy as np
import pytest

from lib import config as C
from lib.arrivals import speclab_arrivals as poisson_arrivals
from lib.errors import UsageError
from lib.workload import build_requests, load_sharegpt, read_prompt_file


def resolve(**env):
    return C.resolve(None, {k: str(v) for k, v in env.items()})


def test_defaults_and_precedence():
    import argparse
    cfg = resolve()
    assert cfg.gamma_value == 4 and cfg.inference_engine == "hf" and cfg.enable_target is True
    parser = argparse.ArgumentParser()
    C.add_arguments(parser)
    args = parser.parse_args(["--gamma-value", "7"])
    cfg = C.resolve(args, {"GAMMA_VALUE": "5", "NUM_PROMPTS": "3"})
    assert cfg.gamma_value == 7 and cfg.sources["GAMMA_VALUE"] == "cli"
    assert cfg.num_prompts == 3 and cfg.sources["NUM_PROMPTS"] == "env"
    cfg = C.resolve(parser.parse_args(["--results-dir", "", "--gamma-value", " "]),
                    {"RESULTS_DIR": "/elsewhere", "GAMMA_VALUE": "5"})
    assert (cfg.results_dir, cfg.gamma_value) == ("results", 4)  # an empty flag means the default, as an empty env
    assert cfg.sources["RESULTS_DIR"] == "cli"


def test_the_cuda_visible_devices_flag_sets_cudas_own_variable(monkeypatch):
    import argparse
    parser = argparse.ArgumentParser()
    C.add_arguments(parser)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    C.resolve(parser.parse_args([]))
    assert C.os.environ["CUDA_VISIBLE_DEVICES"] == "0,1"
    C.resolve(parser.parse_args(["--cuda-visible-devices", "1"]))
    assert C.os.environ["CUDA_VISIBLE_DEVICES"] == "1"


@pytest.mark.parametrize("name,value,accepted", [
    ("GAMMA_VALUE", "abc", "an integer"), ("GAMMA_VALUE", "0", ">= 1"), ("GPU_STRATEGY", "diagonal", "one of"),
    ("ENABLE_BATCH", "maybe", "true or false"), ("TEMPERATURE", "-1", "0, or a finite number >= 1e-05"),
    ("TEMPERATURE", "1e-300", "0, or a finite number >= 1e-05"), ("AUTO_RATE", "fast", "a finite number"),
    ("AUTO_RATE", "1e-322", "0, or a finite number >= 0.001"), ("RAMP_UP_END_RPS", "1e-9", ">= 0.001"),
    ("INFERENCE_METHOD", "guess", "speculative"), ("VLLM_SPEC_METHOD", "medusa", "ngram"),
    ("VLLM_GPU_MEMORY_UTILIZATION", "1.5", "<= 1"), ("RUN_ID", "r\udcff", "not UTF-8 text"),
    ("METADATA", "k=\udcff", "not UTF-8 text"),
])
def test_bad_values_name_variable_value_and_accepted(name, value, accepted):
    with pytest.raises(UsageError) as err:
        resolve(**{name: value})
    msg = str(err.value)
    assert msg.startswith(f"{name}={value!r}") and accepted in msg


def test_cross_checks_and_modes():
    with pytest.raises(UsageError, match="AUTO_DURATION"):
        resolve(AUTO_RATE=2)
    with pytest.raises(UsageError, match="AUTO_RATE=50 with RAMP_UP_STRATEGY=linear: the ramp-up sets the rate"):
        resolve(AUTO_RATE=50, AUTO_DURATION=3, RAMP_UP_STRATEGY="linear", RAMP_UP_START_RPS=1, RAMP_UP_END_RPS=2)
    with pytest.raises(UsageError, match=r"NUM_PROMPTS=2000 at AUTO_RATE=0.001 \(ARRIVAL_SCHEDULE=vllm\): arrivals"):
        resolve(AUTO_RATE=0.001, ARRIVAL_SCHEDULE="vllm", NUM_PROMPTS=2000)
    with pytest.raises(UsageError, match="MAX_BATCH_LENGTH"):
        resolve(ENABLE_BATCH="true", MAX_BATCH_LENGTH=50, GENERATION_LENGTH=100)
    with pytest.raises(UsageError, match="nothing to run"):
        resolve(ENABLE_TARGET="false", ENABLE_SPECULATIVE="false")
    assert C.modes(resolve()) == [("hf", "target"), ("hf", "speculative")]
    assert C.modes(resolve(INFERENCE_METHOD="target")) == [("hf", "target")]
    cfg = resolve(COMPARE_MODES="hf:speculative vllm:target vllm:speculative")
    assert C.modes(cfg) == [("hf", "speculative"), ("vllm", "target"), ("vllm", "speculative")]
    with pytest.raises(UsageError, match="COMPARE_MODES"):
        resolve(COMPARE_MODES="hf:fast")


def test_every_var_has_a_flag_and_help():
    assert len({v.flag for v in C.VARS}) == len(C.VARS)
    assert all(v.help and v.group for v in C.VARS)
    table = C.markdown_table()
    assert all(f"`{v.name}`" in table for v in C.VARS)


def test_poisson_arrivals_rate_and_determinism():
    a = poisson_arrivals(2.0, 500, seed=1)
    assert a == poisson_arrivals(2.0, 500, seed=1) and a != poisson_arrivals(2.0, 500, seed=2)
    assert 900 < len(a) < 1100 and all(0 <= t < 500 for t in a) and a == sorted(a)
    gaps = np.diff(a)
    assert abs(gaps.mean() - 0.5) < 0.05 and abs(gaps.std() / gaps.mean() - 1) < 0.1  # exponential: cv = 1


def test_fixed_count_cycles_prompts_and_batch_truncation(tiny_tokenizer, tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("one two three four five six seven eight nine ten\nshort prompt\n\n")
    prompts = read_prompt_file(f)
    assert [p.text for p in prompts] == ["one two three four five six seven eight nine ten", "short prompt"]
    cfg = resolve(NUM_PROMPTS=5, ENABLE_BATCH="true", MAX_BATCH_LENGTH=8, GENERATION_LENGTH=4)
    reqs = build_requests(cfg, prompts, tiny_tokenizer)
    assert len(reqs) == 5 and all(r.arrival == 0 and r.max_new_tokens == 4 for r in reqs)
    long_ids = tiny_tokenizer.encode(prompts[0].text)
    truncated = [r for r in reqs if r.prompt == prompts[0].text][0]
    assert truncated.prompt_ids == long_ids[-4:]


def _conv(*turns):
    return {"conversations": [{"from": "human" if i % 2 == 0 else "gpt", "value": t} for i, t in enumerate(turns)]}


def test_sharegpt_rules_malformed_and_chinese(tiny_tokenizer, tmp_path):
    lines = [json.dumps(_conv("Tell me a story about a little cat in the garden.",
                              "The little cat found a red ball near the garden and played.")),
             "{not json",
             json.dumps({"conversations": "oops"}),
             json.dumps(_conv("only one turn here, nothing else to say")),
             json.dumps(_conv("hi", "The little cat found a red ball near the garden.")),  # prompt < 4 tokens
             json.dumps(_conv("小猫在花园里找到了一个红色的球，然后发生了什么？", "小猫和小狗一起玩球，玩得很开心。"),
                        ensure_ascii=False)]
    (tmp_path / "sharegpt_zh_38K_format.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    prompts, stats = load_sharegpt(tmp_path, tiny_tokenizer)
    assert stats.entries == 6 and stats.malformed == 2 and stats.filtered == 2 and stats.kept == 2  # they add up
    assert prompts[1].text.startswith("小猫") and prompts[1].reference_output_len >= 4


def test_sharegpt_json_array_and_errors(tiny_tokenizer, tmp_path):
    (tmp_path / "data.json").write_text(json.dumps([_conv("What does the brave fox carry to the river?",
                                                          "The brave fox carried a blue kite to the river.")]))
    prompts, _ = load_sharegpt(tmp_path, tiny_tokenizer)
    assert len(prompts) == 1
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UsageError, match="SHAREGPT_DIR=.*none of"):
        load_sharegpt(empty, tiny_tokenizer)
    (empty / "sharegpt_gpt4.jsonl").write_text("garbage\n{]\n")
    with pytest.raises(UsageError, match="no usable conversations"):
        load_sharegpt(empty, tiny_tokenizer)
    with pytest.raises(UsageError, match="no such folder"):
        load_sharegpt(tmp_path / "missing", tiny_tokenizer)


def test_readme_variable_table_is_generated_from_the_table():
    from scripts.update_readme_vars import README, rendered
    text = README.read_text()
    assert rendered(text) == text, "README's variable table is stale: run scripts/update_readme_vars.py"


@pytest.mark.parametrize("env,message", [
    ({"GOODPUT": "ttft:fast"}, "GOODPUT='ttft:fast': 'ttft:fast' is not NAME:MS"),
    ({"GOODPUT": "latency:5"}, "NAME one of ttft, tpot, e2el"),
    ({"PERCENTILE_METRICS": "ttft,speed"}, "PERCENTILE_METRICS='ttft,speed': expected"),
    ({"METRIC_PERCENTILES": "99,120"}, "METRIC_PERCENTILES='99,120': expected"),
    ({"METADATA": "gpu"}, "METADATA='gpu': 'gpu' is not KEY=VALUE"),
    ({"RAMP_UP_STRATEGY": "linear", "RAMP_UP_END_RPS": 4, "AUTO_DURATION": 5}, "needs RAMP_UP_START_RPS"),
    ({"DATASET": "custom"}, "DATASET=custom: needs DATASET_PATH"),
    ({"DATASET_PATH": "x.jsonl"}, "DATASET_PATH=x.jsonl: read only with DATASET=custom or spec_bench"),
    ({"DATASET": "sharegpt"}, "DATASET=sharegpt: needs SHAREGPT_DIR"),
    ({"DATASET": "prefix_repetition", "NUM_PROMPTS": 2}, "NUM_PROMPTS=2: DATASET=prefix_repetition"),
    ({"BURSTINESS": "0"}, "BURSTINESS='0'"),
    ({"AUTO_RATE": 2, "ARRIVAL_SCHEDULE": "vllm", "NUM_PROMPTS": 0}, "NUM_PROMPTS=0 with ARRIVAL_SCHEDULE=vllm"),
])
def test_traffic_and_metric_options_refuse_bad_input(env, message):
    with pytest.raises(UsageError) as err:
        resolve(**env)
    assert message in str(err.value)


def test_vllm_schedule_needs_no_duration_and_goodput_parses():
    cfg = resolve(AUTO_RATE=4, ARRIVAL_SCHEDULE="vllm", NUM_PROMPTS=8, GOODPUT="ttft:500 tpot:50",
                  METADATA="gpu=h200 run=3", METRIC_PERCENTILES="25,99.5")
    assert C.goodput_slos(cfg) == {"ttft": 500.0, "tpot": 50.0}
    assert C.metadata_pairs(cfg) == {"gpu": "h200", "run": "3"}
    assert C.percentile_selection(cfg) == (["ttft", "tpot", "itl"], [25.0, 99.5])
    from lib.arrivals import arrivals
    times = arrivals(cfg)
    assert len(times) == 8 and times[-1] == pytest.approx(8 / 4)  # vLLM rescales the last arrival to N / rate


def test_burstiness_and_ramp_up_shape_speclab_arrivals():
    def cv(times):
        gaps = np.diff(times)
        return gaps.std() / gaps.mean()
    bursty, even = poisson_arrivals(2.0, 500, 1, burstiness=0.25), poisson_arrivals(2.0, 500, 1, burstiness=4)
    assert abs(cv(bursty) - 2) < 0.3 and abs(cv(even) - 0.5) < 0.1  # gamma shape k: cv = 1 / sqrt(k)
    assert 850 < len(bursty) < 1150 and 900 < len(even) < 1100
    constant = poisson_arrivals(2.0, 10, 1, burstiness=float("inf"))
    assert constant == pytest.approx([0.5 * i for i in range(1, 20)])
    ramp = poisson_arrivals(0, 100, 1, ramp=("linear", 1.0, 9.0))
    first, second = sum(t < 50 for t in ramp), sum(t >= 50 for t in ramp)
    assert 1.5 < second / first < 3  # rate 1 -> 5 in the first half (mean 3), 5 -> 9 in the second (mean 7)


def test_custom_and_spec_bench_files(tmp_path):
    from lib.datasets import load_file
    f = tmp_path / "c.jsonl"
    f.write_text('{"prompt": "a cat", "output_tokens": 7, "category": "pets"}\n{"prompt": "a dog"}\nnot json\n'
                 '{"prompt": "x", "output_tokens": -1}\n{"text": "no prompt"}\n\n')
    prompts, stats = load_file("custom", str(f))
    assert [(p.text, p.max_tokens, p.category) for p in prompts] == [("a cat", 7, "pets"), ("a dog", None, None)]
    assert stats.entries == stats.malformed + stats.filtered + stats.kept == 5
    cfg = resolve(DATASET="custom", DATASET_PATH=f, NUM_PROMPTS=2, GENERATION_LENGTH=9)
    from lib.workload import max_new_tokens
    assert [max_new_tokens(p, cfg) for p in prompts] == [7, 9]
    prompts, stats = load_file("spec_bench", str(C.shipped("prompts/spec_bench_sample/question.jsonl")))
    assert stats.kept == stats.entries == 16 and {"translation", "rag", "writing"} <= {p.category for p in prompts}
    with pytest.raises(UsageError, match="DATASET_PATH=.*no usable entry"):
        load_file("spec_bench", str(f))
    with pytest.raises(UsageError, match="DATASET_PATH=.*no such file"):
        load_file("custom", str(tmp_path / "missing.jsonl"))


def test_the_dry_runs_plan_counts_a_ramp_ups_requests():
    import benchmark
    cfg = resolve(RAMP_UP_STRATEGY="linear", RAMP_UP_START_RPS=10, RAMP_UP_END_RPS=20, AUTO_DURATION=3)
    workload = benchmark.plan_of(cfg, [("hf", "target")])["workload"]
    assert 30 <= workload["expected_requests"] <= 60  # ~45 arrivals at 10 to 20 req/s over 3 s
    assert workload["ramp_up"] == {"strategy": "linear", "start_rps": 10, "end_rps": 20}


def test_strict_json_and_byte_order_marks_in_datasets(tmp_path):
    """NaN, Infinity, 1e400 and integers past Python's digit limit are malformed entries, never a crash; a UTF-8
    byte-order mark (Windows editors) is not part of the first entry or prompt."""
    from lib.datasets import load_file
    f = tmp_path / "custom.jsonl"
    f.write_text('\ufeff{"prompt": "a cat", "output_tokens": 7}\n{"prompt": "b", "output_tokens": NaN}\n'
                 '{"prompt": "c", "output_tokens": Infinity}\n{"prompt": "d", "output_tokens": 1e400}\n'
                 '{"prompt": "e", "output_tokens": ' + "9" * 5000 + "}\n")
    prompts, stats = load_file("custom", str(f))
    assert [(p.text, p.max_tokens) for p in prompts] == [("a cat", 7)]
    assert (stats.entries, stats.malformed + stats.filtered, stats.kept) == (5, 4, 1)
    text = tmp_path / "prompts.txt"
    text.write_text("\ufeffhello\nworld\n")
    assert [p.text for p in read_prompt_file(str(text))] == ["hello", "world"]


def test_result_json_is_strict_json():
    from lib.files import json_line, json_text
    data = {"burstiness": float("inf"), "low": -float("inf"), "margin": [1.5, float("nan")]}
    for text in (json_text(data), json_line(data)):
        assert json.loads(text, parse_constant=lambda name: pytest.fail(f"{name} in the JSON")) == {
            "burstiness": "inf", "low": "-inf", "margin": [1.5, None]}
