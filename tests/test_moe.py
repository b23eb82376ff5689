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
    # per k drafts verified (GAMMA_VALUE 4): distinct experts per layer per step; AR has one-token steps only
    assert [r["k"] for r in modes["hf:speculative"]["moe_verify"]["rows"]] == [0, 1, 2, 3, 4]
    (ar_step,) = modes["hf:target"]["moe_verify"]["rows"]
    assert ar_step["k"] == 0 and ar_step["mean_distinct_experts"] == 2.0  # batch 1: one token's top-2
    assert "hf:speculative MoE target (8 experts, top-2), distinct experts per layer per verify step" in r.stdout


# ---------------------------------------------------------------- distinct experts per verify step, k = 0..K

def moe_sd(tiny_models, gamma: int, generation_length: int, prompts: int = 3, batch: int = 1):
    """The hf engine's SD on the tiny MoE target (the tiny Llama draft shares its tokenizer): (moe_verify, the
    run's records)."""
    from lib import config as C
    from lib.engines import create_engine
    from lib.models import ModelPaths, load_tokenizer
    from lib.types import Clock
    from lib.workload import build_requests, load_prompts

    target = ensure_tiny_moe()
    cfg = C.resolve(None, {"GAMMA_VALUE": str(gamma), "GENERATION_LENGTH": str(generation_length),
                           "NUM_PROMPTS": str(prompts), "ENABLE_BATCH": str(batch > 1).lower(),
                           "BATCH_SIZE": str(batch), "TARGET_MODEL": str(target),
                           "DRAFTER_MODEL": str(tiny_models.draft)})
    tokenizer = load_tokenizer(target)
    requests = build_requests(cfg, load_prompts(cfg, tokenizer)[0], tokenizer)
    engine = create_engine("hf", cfg, "speculative", ModelPaths(target, tiny_models.draft, False))
    engine.start()
    try:
        engine.warmup(requests)  # counted, then forgotten: the table below is the timed run's alone
        records = []
        engine.run(requests, Clock(), records.append)
        return engine.extra_results()["moe_verify"], records
    finally:
        engine.stop()


@pytest.mark.parametrize("batch", [1, 2])
def test_a_verify_of_k_drafts_touches_the_experts_of_the_first_k_plus_1_tokens_of_a_longer_one(tiny_models, batch):
    """Two tokens per request: one verify step per batch. The steps of GAMMA_VALUE=1 and 2 route exactly as the
    first 2 and 3 tokens of every row of GAMMA_VALUE=3's steps (attention is causal, the greedy drafts are the
    same), so one run gives the whole curve."""
    prompts = 2 * batch
    longest, _ = moe_sd(tiny_models, 3, 2, prompts, batch)
    assert [r["k"] for r in longest["rows"]] == [0, 1, 2, 3] and all(r["steps"] == 2 for r in longest["rows"])
    if batch == 1:
        assert longest["rows"][0]["distinct_experts_per_layer"] == {"0": 2.0, "1": 2.0}  # one token: its top-2
    for k in (1, 2):
        shorter, _ = moe_sd(tiny_models, k, 2, prompts, batch)
        assert [r["k"] for r in shorter["rows"]] == list(range(k + 1))
        assert shorter["rows"][k]["distinct_experts_per_layer"] == longest["rows"][k]["distinct_experts_per_layer"]
        assert shorter["rows"][k]["tokens_per_round"] == pytest.approx(longest["rows"][k]["tokens_per_round"])


def test_distinct_experts_grow_with_k_within_bounds_next_to_the_acceptance(tiny_models):
    table, records = moe_sd(tiny_models, 4, 16, prompts=4, batch=2)
    assert table["num_experts"] == 8 and table["top_k"] == 2 and table["layers"] == 2
    rows = table["rows"]
    assert [r["k"] for r in rows] == [0, 1, 2, 3, 4] and all(r["rows_per_step"] == 2 for r in rows)
    for layer in ("0", "1"):
        per_k = [r["distinct_experts_per_layer"][layer] for r in rows]
        assert per_k == sorted(per_k), per_k  # verifying more drafts never touches fewer experts
        for r, n in zip(rows, per_k):
            assert 2 <= n <= min(8, 2 * (r["k"] + 1) * 2)  # at least top-2; at most every token's own top-2
    assert all(r["max_distinct_experts"] <= 8 for r in rows)
    assert rows[-1]["mean_distinct_experts"] > rows[0]["mean_distinct_experts"]
    # acceptance at k from the run's own counters: K drafts give the run's acceptance rate
    drafts = sum(r.spec.draft_tokens for r in records)
    accepted = sum(r.spec.accepted_tokens for r in records)
    rounds = sum(r.spec.num_drafts for r in records)
    assert rows[-1]["acceptance_rate"] == pytest.approx(accepted / drafts)
    assert rows[-1]["tokens_per_round"] == pytest.approx(1 + accepted / rounds)
    assert rows[0]["tokens_per_round"] == 1.0 and rows[0]["expert_reads_per_token_vs_ar"] == 1.0
    for r in rows[1:]:
        assert r["expert_reads_per_token_vs_ar"] == pytest.approx(
            r["mean_distinct_experts"] / rows[0]["mean_distinct_experts"] / r["tokens_per_round"], abs=1e-3)
    assert table["cheapest_k"] == min(rows, key=lambda r: (r["expert_reads_per_token_vs_ar"], r["k"]))["k"]
