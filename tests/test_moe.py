"""MoE expert tracking on the tiny Mixtral-shaped model (lib/quant/moe_tracker.py, moe_model.py)."""
import json
import subprocess
import sys

import pytest
import torch

from lib.files import ROOT
from lib.models import load_model
from lib.quant.moe_model import ensure_tiny_moe
from lib.quant.moe_tracker import track_experts


@pytest.fixture(scope="module")
def moe(tiny_models):
    return load_model(ensure_tiny_moe())


def test_counts_sum_to_tokens_times_top_k_per_layer(moe):
    tracker = track_experts(moe)
    try:
        ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11], [12, 13, 14, 15, 16, 17, 18]])
        with torch.no_grad():
            moe(input_ids=ids)                                              # 14 tokens
            moe.generate(ids[:1], max_new_tokens=5, do_sample=False)       # 7 + 4 more tokens forwarded
        tokens = 14 + 7 + 4
        stats = tracker.export()
        assert set(stats["layer_stats"]) == {"0", "1"}
        for _layer, s in stats["layer_stats"].items():
            assert s["tokens_routed"] == tokens
            assert s["total_tokens"] == tokens * 2 == sum(e["total_tokens_processed"] for e in s["experts"].values())
            assert s["total_experts"] == 8 and s["top_k"] == 2
            assert s["load_balance"]["max_over_mean"] >= 1.0
            loads = [s["experts"].get(str(e), {}).get("total_tokens_processed", 0) for e in range(8)]
            assert s["load_balance"]["max_over_mean"] == round(max(loads) / (sum(loads) / 8), 4)
            assert s["load_balance"]["idle_experts"] == loads.count(0)
    finally:
        tracker.remove()


def test_per_request_stats_top_experts_reset_and_export(moe, tmp_path):
    tracker = track_experts(moe)
    try:
        with torch.no_grad():
            with tracker.request("a"):
                moe(input_ids=torch.tensor([[5, 6, 7]]))
            with tracker.request("b"):
                moe(input_ids=torch.tensor([[8, 9, 10, 11, 12]]))
            moe(input_ids=torch.tensor([[13]]))  # outside any request
        data = tracker.export(tmp_path / "expert_stats.json")
        assert json.loads((tmp_path / "expert_stats.json").read_text()) == json.loads(json.dumps(data))
        assert sum(data["per_request"]["a"].values()) == 3 * 2 * 2   # tokens x top_k x layers
        assert sum(data["per_request"]["b"].values()) == 5 * 2 * 2
        one = tracker.stats(layer_id=0, expert_id=data["top_experts"][0]["expert_id"])
        assert set(one) == {"layer_id", "expert_id", "activation_count", "last_activation_time",
                            "total_tokens_processed"} and one["last_activation_time"] > 0
        loads = [e["total_tokens_processed"] for e in data["top_experts"]]
        assert loads == sorted(loads, reverse=True) and loads[0] == max(
            s["total_tokens_processed"] for s in data["expert_stats"].values())
        key = f"layer_{one['layer_id']}_expert_{one['expert_id']}"
        assert data["expert_stats"][key] == one
        tracker.reset()
        assert tracker.export()["expert_stats"] == {} and tracker.layer_stats(0)["total_tokens"] == 0
    finally:
        tracker.remove()
    with torch.no_grad():
        moe(input_ids=torch.tensor([[5, 6]]))
    assert tracker.export()["expert_stats"] == {}  # removed hooks record nothing


def test_dense_model_has_no_tracker(tiny_models):
    assert track_experts(load_model(tiny_models.target)) is None


def test_script_moe_mode_writes_stats_and_chart(tiny_models, moe, tmp_path):
    out, png = tmp_path / "moe.json", tmp_path / "moe.png"
    r = subprocess.run([sys.executable, "run_mixed_precision.py", "--moe", "--max-new-tokens", "4",
                        "--output", str(out), "--moe-plot", str(png)], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    data = json.loads(out.read_text())
    assert len(data["per_request"]) == 4 and png.stat().st_size > 1000
    for s in data["layer_stats"].values():
        assert s["total_tokens"] == s["tokens_routed"] * s["top_k"]


def test_benchmark_results_carry_expert_stats_for_a_moe_target(tiny_models, moe, tmp_path):
    """The runner on a MoE target (SD with the tiny draft, same tokenizer): each mode's results hold its experts."""
    env = {**__import__("os").environ, "TARGET_MODEL": str(ensure_tiny_moe()),
           "DRAFTER_MODEL": str(tiny_models.draft), "RESULTS_DIR": str(tmp_path), "RUN_ID": "moe",
           "NUM_PROMPTS": "2", "GENERATION_LENGTH": "8", "ENABLE_GPU_MONITOR": "false"}
    r = subprocess.run([sys.executable, "benchmark.py"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    results = json.loads((tmp_path / "moe" / "benchmark_results.json").read_text())
    modes = results["modes"]
    assert set(modes) == {"hf:target", "hf:speculative"}
    for mode in modes.values():
        experts = mode["moe_experts"]
        assert len(experts["per_request"]) == 2
        for s in experts["layer_stats"].values():
            assert s["tokens_routed"] > 0 and s["total_tokens"] == s["tokens_routed"] * s["top_k"]
