"""End-to-end runs of benchmark.py on the tiny models (the same code path as ./run_benchmark.sh)."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from lib.files import ROOT


def run_benchmark(tmp_path, timeout=600, **env):
    full = {**os.environ, "RESULTS_DIR": str(tmp_path), "RUN_ID": "run", "GENERATION_LENGTH": "32",
            "NUM_PROMPTS": "6", **{k: str(v) for k, v in env.items()}}
    proc = subprocess.run([sys.executable, "benchmark.py"], cwd=ROOT, env=full, capture_output=True, text=True,
                          timeout=timeout)
    return proc, tmp_path / "run"


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def check_schemas(run_dir):
    for name, kind in (("benchmark_results.json", "benchmark_results"), ("run.json", "run"),
                       ("benchmark_results_speculative.json", "benchmark_results_speculative"),
                       ("benchmark_results_target.json", "benchmark_results_target"),
                       ("benchmark_results_gpu.json", "benchmark_results_gpu")):
        assert json.loads((run_dir / name).read_text())["schema"] == f"speclab.{kind}/1"


@pytest.mark.parametrize("batch", [1, 4])
def test_default_run_files_lossless_and_acceptance(tmp_path, batch):
    env = {"ENABLE_BATCH": "true", "BATCH_SIZE": batch} if batch > 1 else {}
    proc, run_dir = run_benchmark(tmp_path, **env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    check_schemas(run_dir)
    results = json.loads((run_dir / "benchmark_results.json").read_text())
    spec = results["modes"]["hf:speculative"]["metrics"]
    assert spec["completed"] == 6 and spec["acceptance"]["acceptance_rate"] >= 0.5
    acc = spec["acceptance"]
    assert acc["acceptance_length"] == pytest.approx(1 + acc["accepted_tokens"] / acc["num_drafts"])
    target = {r["request_id"]: r["output_ids"] for r in read_jsonl(run_dir / "requests_hf_target.jsonl")}
    specul = {r["request_id"]: r["output_ids"] for r in read_jsonl(run_dir / "requests_hf_speculative.jsonl")}
    assert target == specul and len(target) == 6
    assert results["comparisons"][0]["baseline"] == "hf:target"
    run = json.loads((run_dir / "run.json").read_text())
    assert run["engines"]["hf:speculative"]["placement"]["target"] == "cpu"  # no GPU here: the fallback, recorded
    assert run["config"]["GENERATION_LENGTH"] == 32 and run["config_sources"]["GENERATION_LENGTH"] == "env"
    assert results["config"] == run["config"] and run["config"]["INFERENCE_ENGINE"] == "hf"
    bandwidth = results["modes"]["hf:target"]["bandwidth"]
    assert 0 < bandwidth["bandwidth_efficiency"] < 1.5 and bandwidth["copy_bandwidth_gb_s"] > 0
    if batch == 1:  # one full read of the target's non-embedding weights per generated token
        from lib.models import ensure_tiny_models, load_model
        model = load_model(ensure_tiny_models().target)
        per_step = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "embed_tokens" not in n)
        assert bandwidth["weight_bytes_read"] == per_step * sum(len(ids) for ids in target.values())
    gpu = json.loads((run_dir / "benchmark_results_gpu.json").read_text())
    assert gpu["available"] is False and gpu["reason"]  # this machine has no GPU: recorded, run went on
    assert "SpecLab benchmark summary" in proc.stdout
    check_sd_model(results, proc.stdout, "hf:speculative", "timed")
    timing = results["modes"]["hf:speculative"]["sd_model"]["timing"]
    assert timing["batch_size"] == batch and timing["verify_rounds"] > 0
    assert timing["draft_steps"] == 4 * timing["verify_rounds"]  # GAMMA_VALUE draft steps a round
    assert "sd_model" not in results["modes"]["hf:target"]


def check_sd_model(results, stdout, mode, c_source):
    """The SD mode's cost model: c measured, predicted and measured speedup (the TPOT ratio against its engine's AR
    mode) in the results and on the mode's summary line."""
    modes = results["modes"]
    model = modes[mode]["sd_model"]
    engine = mode.partition(":")[0]
    tpot = {m: r["metrics"]["latency"]["mean_tpot_ms"] for m, r in modes.items()}
    assert model["baseline"] == f"{engine}:target"
    assert model["measured_speedup"] == pytest.approx(tpot[f"{engine}:target"] / tpot[mode])
    assert model["cost_ratio"] > 0 and model["cost_ratio_source"] == c_source
    accept = modes[mode]["metrics"]["acceptance"]
    assert model["tokens_per_round"] == pytest.approx(accept["acceptance_length"])
    assert model["predicted_speedup"] == pytest.approx(
        model["tokens_per_round"] / (model["k"] * model["cost_ratio"] + model["verify_cost_used"]))
    assert model["measured_over_predicted"] == pytest.approx(model["measured_speedup"] / model["predicted_speedup"])
    assert 1 <= model["best_k"]["k"] <= max(2 * model["k"], 8)
    line = next(line for line in stdout.splitlines() if line.startswith(f"{mode}: c "))
    assert f"-> x{model['predicted_speedup']:.2f}, measured x{model['measured_speedup']:.2f}" in line
    assert "break-even acceptance" in line and "best k" in line


def test_rate_mode_sends_poisson_schedule(tmp_path):
    proc, run_dir = run_benchmark(tmp_path, AUTO_RATE=2, AUTO_DURATION=10, INFERENCE_METHOD="target",
                                  GENERATION_LENGTH=8)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = read_jsonl(run_dir / "requests_hf_target.jsonl")
    arrivals = sorted(r["arrival"] for r in lines)
    assert 10 <= len(lines) <= 32 and arrivals[-1] < 10
    assert len(set(arrivals)) == len(arrivals)  # spread over time, not a burst at 0
    for r in lines:
        assert r["start"] >= r["arrival"] - 1e-3  # open loop: never started before it arrived
        assert r["token_times"][0] >= r["start"]


def test_sharegpt_sample_workload(tmp_path):
    proc, run_dir = run_benchmark(tmp_path, SHAREGPT_DIR=ROOT / "prompts" / "sharegpt_sample",
                                  INFERENCE_METHOD="target", NUM_PROMPTS=3, GENERATION_LENGTH=8)
    assert proc.returncode == 0, proc.stderr[-2000:]
    plan = json.loads((run_dir / "run.json").read_text())["plan"]
    assert plan["workload"]["source"]["source"] == "sharegpt" and plan["workload"]["source"]["kept"] >= 30


def test_ctrl_c_midway_leaves_valid_results(tmp_path):
    env = {**os.environ, "RESULTS_DIR": str(tmp_path), "RUN_ID": "run", "NUM_PROMPTS": "400",
           "GENERATION_LENGTH": "64", "INFERENCE_METHOD": "target"}
    proc = subprocess.Popen([sys.executable, "benchmark.py"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    requests_file = tmp_path / "run" / "requests_hf_target.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and (not requests_file.exists() or len(requests_file.read_text().splitlines()) < 3):
        time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err
    done = read_jsonl(requests_file)
    results = json.loads((tmp_path / "run" / "benchmark_results.json").read_text())
    mode = results["modes"]["hf:target"]
    assert mode["status"] == "interrupted"
    assert 3 <= mode["metrics"]["completed"] <= len(done) < 400


def test_num_runs_max_concurrency_and_bench_serve_file(tmp_path):
    proc, run_dir = run_benchmark(tmp_path, ENABLE_TARGET="false", NUM_RUNS=2, NUM_PROMPTS=4, GENERATION_LENGTH=8,
                                  ENABLE_BATCH="true", BATCH_SIZE=4, MAX_CONCURRENCY=2, GOODPUT="e2el:100000",
                                  METADATA="gpu=none", DATASET="custom",
                                  DATASET_PATH=ROOT / "prompts" / "custom_sample.jsonl")
    assert proc.returncode == 0, proc.stderr[-2000:]
    mode = json.loads((run_dir / "benchmark_results.json").read_text())["modes"]["hf:speculative"]
    repeats = mode["repeats"]
    assert repeats["n"] == 2
    for key in ("output_throughput", "mean_tpot_ms", "acceptance_rate", "acceptance_length"):
        r = repeats[key]
        assert len(r["values"]) == 2 and r["ci95_low"] <= r["mean"] <= r["ci95_high"]
    assert "hf:speculative over 2 runs, mean [95 % interval]: output_throughput" in proc.stdout
    lines = read_jsonl(run_dir / "requests_hf_speculative.jsonl")
    for run in (0, 1):
        spans = [(r["start"], r["token_times"][-1]) for r in lines if r["metrics"]["run"] == run]
        assert len(spans) == 4
        assert all(sum(s <= t < e for s, e in spans) <= 2 for t, _ in spans)  # MAX_CONCURRENCY=2 of BATCH_SIZE=4
    assert {r["metrics"]["run"] for r in lines} == {0, 1}
    vllm = json.loads((run_dir / "bench_serve_hf_speculative.json").read_text())
    metrics = mode["metrics"]
    assert vllm["num_prompts"] == 4 and vllm["gpu"] == "none" and vllm["request_rate"] == "inf"
    assert vllm["max_concurrency"] == 2 and vllm["model_id"] and vllm["date"]
    assert vllm["duration"] == metrics["duration_s"] and vllm["request_goodput"] == metrics["request_throughput"]
    assert vllm["spec_decode_acceptance_rate"] == pytest.approx(100 * metrics["acceptance"]["acceptance_rate"])
    assert {"mean_ttft_ms", "p99_tpot_ms", "median_itl_ms"} <= set(vllm) and "mean_e2el_ms" not in vllm
    assert sorted(vllm["output_lens"]) != [8] * 4  # the custom file's output_tokens set max tokens


def test_sd_cost_model_of_vllm_and_llamacpp_from_their_draft_modes(tmp_path, tiny_models):
    """vLLM's and llama.cpp's c comes from <engine>:draft, the draft run as an AR target, added to the plan."""
    modes = "vllm:target vllm:speculative llamacpp:target llamacpp:speculative"
    proc, run_dir = run_benchmark(tmp_path, COMPARE_MODES=modes, VLLM_ENABLE_SPECULATIVE="true", NUM_PROMPTS=3,
                                  GENERATION_LENGTH=16, WARMUP="false", VLLM_MAX_MODEL_LEN=512, VLLM_MAX_NUM_SEQS=4)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((run_dir / "benchmark_results.json").read_text())
    assert list(results["modes"]) == ["vllm:target", "vllm:speculative", "vllm:draft", "llamacpp:target",
                                      "llamacpp:speculative", "llamacpp:draft"]
    for engine in ("vllm", "llamacpp"):
        check_sd_model(results, proc.stdout, f"{engine}:speculative", "draft-as-target TPOT ratio")
        model = results["modes"][f"{engine}:speculative"]["sd_model"]
        tpot = {m: r["metrics"]["latency"]["mean_tpot_ms"] for m, r in results["modes"].items()}
        assert model["cost_ratio"] == pytest.approx(tpot[f"{engine}:draft"] / tpot[f"{engine}:target"])
        assert model["verify_cost"] is None and model["verify_cost_used"] == 1.0
        assert f"{engine}:speculative: c {model['cost_ratio']:.3f} (draft-as-target TPOT ratio), verify unknown" \
            in proc.stdout
        assert "sd_model" not in results["modes"][f"{engine}:draft"]
    for engine in ("vllm", "llamacpp"):  # the draft ran as the target of its mode
        assert results["modes"][f"{engine}:draft"]["engine"]["model"] == str(tiny_models.draft)
        assert results["modes"][f"{engine}:target"]["engine"]["model"] == str(tiny_models.target)
