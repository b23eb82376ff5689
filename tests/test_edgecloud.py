"""Edge/cloud collaborative decoding, for real on loopback: llama.cpp edge, transformers cloud, HTTP in between."""
import asyncio
import json
import socket
import subprocess
import sys

import httpx
import numpy as np
import pytest

from lib.edgecloud.client import EdgeCloudHTTPClient
from lib.edgecloud.confidence import (
    AblatedConfidenceCalculator,
    ConfidenceCalculator,
    ConfidenceEnsemble,
    ConfidenceStrategy,
)
from lib.edgecloud.http_api import ServerThread
from lib.edgecloud.kv_cache import BlockPrefixCache, EdgeStateCache
from lib.edgecloud.settings import apply_overrides, load_config

TOKEN = "test-secret"
DEEP = b'{"context_ids": ' + b"[" * 50_000 + b"]" * 50_000 + b"}"  # 100 kB, under the test servers' body limit
pytestmark = pytest.mark.timeout(300)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def config(edge_port, cloud_port, **comm):
    over = {"edge": {"server": {"port": edge_port}}, "cloud": {"server": {"port": cloud_port}},
            "communication": {"edge_endpoint": f"http://127.0.0.1:{edge_port}",
                              "cloud_endpoint": f"http://127.0.0.1:{cloud_port}", "auth_token": TOKEN,
                              "max_body_bytes": 200_000, **comm},
            "inference": {"max_tokens": 32}}
    return apply_overrides(load_config(), over, "test")


@pytest.fixture(scope="module")
def apps(tiny_models):
    from lib.edgecloud.launch import build_cloud_app, build_edge_app
    cfg = config(free_port(), free_port())
    edge_app, drafter = build_edge_app(cfg)
    cloud_app, verifier = build_cloud_app(cfg)
    return edge_app, cloud_app, drafter, verifier


@pytest.fixture(scope="module")
def servers(apps):
    edge_port, cloud_port = free_port(), free_port()
    threads = [ServerThread(apps[0], "127.0.0.1", edge_port).start(),
               ServerThread(apps[1], "127.0.0.1", cloud_port).start()]
    yield config(edge_port, cloud_port)
    for t in threads:
        t.stop()


def run(cfg, tokenizer, prompt, **kw):
    async def go():
        async with EdgeCloudHTTPClient(cfg, tokenizer) as client:
            return await client.full_inference_pipeline(prompt, **kw)
    return asyncio.run(go())


def finished(res, max_tokens, eos_id=0) -> bool:
    """Ran to the length limit, or stopped right after EOS."""
    ids = res.token_ids
    return len(ids) == max_tokens or (0 < len(ids) < max_tokens and ids[-1] == eos_id and eos_id not in ids[:-1])


def stats(cfg, side):
    url = cfg["communication"][f"{side}_endpoint"] + "/stats"
    return httpx.get(url, headers={"authorization": f"Bearer {TOKEN}"}).json()


# -------------------------------------------------------------------------------------- draft and verify, end to end

def test_greedy_collaborative_equals_cloud_only(servers, tiny_tokenizer, shipped_prompts):
    for prompt in shipped_prompts[:3]:
        reference = run(servers, tiny_tokenizer, prompt, mode="cloud_only")
        assert reference.error is None and finished(reference, 32)
        for kw in ({}, {"use_confidence_check": False}, {"use_kv_cache": False}):
            got = run(servers, tiny_tokenizer, prompt, **kw)
            assert got.error is None
            assert got.token_ids == reference.token_ids, kw
            assert got.text == reference.text
            assert got.draft_tokens > 0 and got.accepted_tokens <= got.draft_tokens
        if got.acceptance_rate > 0.5:
            assert got.cloud_calls < len(got.token_ids)


def test_cloud_only_equals_local_transformers_ar(servers, tiny_models, tiny_tokenizer, shipped_prompts):
    from lib.decoding.chain import autoregressive_generate
    from lib.models import load_model
    target = load_model(tiny_models.target)
    ids = tiny_tokenizer.encode(shipped_prompts[5], add_special_tokens=False)
    expected = autoregressive_generate(target, [ids], 32, eos_ids={tiny_tokenizer.eos_token_id}).tokens[0]
    assert run(servers, tiny_tokenizer, shipped_prompts[5]).token_ids == expected


def test_sampling_with_shipped_draft_distributions(servers, tiny_tokenizer, shipped_prompts):
    res = run(servers, tiny_tokenizer, shipped_prompts[0], temperature=0.8, max_tokens=24)
    assert res.error is None and finished(res, 24)
    assert res.draft_tokens > 0 and 0 <= res.acceptance_rate <= 1
    assert all(0 <= t < len(tiny_tokenizer) for t in res.token_ids)
    # no_draft_verify at T > 0: after a low-confidence stop the cloud samples the next token without drafts
    url = servers["communication"]["cloud_endpoint"] + "/v1/verify"
    resp = httpx.post(url, headers={"authorization": f"Bearer {TOKEN}"},
                      json={"context_ids": [5, 6, 7], "draft_ids": [], "draft_dists": None, "temperature": 0.8})
    assert resp.status_code == 200 and resp.json()["accepted"] == 0
    assert 0 <= resp.json()["next_token"] < len(tiny_tokenizer)


def test_no_draft_verify_and_edge_only_are_marked_unverified(servers, tiny_tokenizer, shipped_prompts):
    edge = run(servers, tiny_tokenizer, shipped_prompts[1], mode="edge_only")
    assert edge.cloud_calls == 0 and edge.unverified_tokens == len(edge.token_ids) and finished(edge, 32)
    loose = run(servers, tiny_tokenizer, shipped_prompts[1], use_draft_verify=False)
    assert loose.error is None and finished(loose, 32) and loose.unverified_tokens > 0
    assert loose.draft_tokens == 0  # nothing was verified


# ----------------------------------------------------------------------------------------------- KV caches

def test_prefix_cache_reuse_over_a_multi_round_session(servers, tiny_tokenizer):
    before_cloud, before_edge = stats(servers, "cloud")["prefix_cache"], stats(servers, "edge")["kv_cache"]
    prompt = "Every evening, Ben went to the kitchen with a sleepy frog. The frog found a yellow cake near it."
    res = run(servers, tiny_tokenizer, prompt, max_tokens=40)
    assert res.rounds > 2
    cloud, edge = stats(servers, "cloud")["prefix_cache"], stats(servers, "edge")["kv_cache"]
    assert cloud["hit_blocks"] > before_cloud["hit_blocks"]
    assert cloud["reused_tokens"] - before_cloud["reused_tokens"] >= len(tiny_tokenizer.encode(prompt)) - 1
    assert res.reused_cloud_tokens > 0
    assert edge["hits"] > before_edge["hits"] and edge["reused_tokens"] > before_edge["reused_tokens"]
    misses = stats(servers, "cloud")["prefix_cache"]["misses"]
    run(servers, tiny_tokenizer, prompt, max_tokens=8, use_kv_cache=False)
    assert stats(servers, "cloud")["prefix_cache"]["misses"] == misses  # no lookups with the cache off


def test_block_prefix_cache_lru_and_stats():
    cache = BlockPrefixCache(block_size=4, max_blocks=4)
    cache.put(list(range(10)), "A")  # 3 blocks (2 full)
    reuse, state = cache.take(list(range(9)) + [99])
    assert (reuse, state) == (9, "A") and cache.stats.hit_blocks == 2
    assert cache.take([5, 6, 7, 8]) == (0, None) and cache.stats.misses == 1
    cache.put(list(range(8)), "B")
    cache.put([7] * 8, "C")  # 2 + 2 blocks fill the budget; one more evicts B
    cache.put([9] * 4, "D")
    assert cache.stats.evictions == 1 and cache.take(list(range(8))) == (0, None)


def test_edge_state_cache_longest_prefix():
    cache = EdgeStateCache(max_size=2)
    cache.put([1, 2, 3], "x")
    cache.put([1, 2, 4, 5], "y")
    assert cache.lookup([1, 2, 4, 5, 6]) == (4, "y")
    cache.put([7], "z")  # evicts x (least recently used)
    assert cache.lookup([1, 2, 3]) == (2, "y") and cache.stats.evictions == 1


# ----------------------------------------------------------------------------------------------- confidence

def test_confidence_strategies():
    vocab = 8
    uniform, certain = np.full(vocab, 1 / vocab), np.eye(vocab)[3]
    for strategy in ConfidenceStrategy:
        calc = ConfidenceCalculator(strategy, top_k=2)
        assert calc.score(certain) == pytest.approx(1.0)
        assert calc.score(uniform) < 0.3
    assert ConfidenceCalculator("max_prob").score(uniform) == pytest.approx(1 / vocab)
    assert ConfidenceCalculator("entropy").score(uniform) == pytest.approx(0.0, abs=1e-9)
    ens = ConfidenceEnsemble(["max_prob", "entropy"], weights=[3, 1])
    score, parts = ens.ensemble_confidence(uniform)
    assert parts[1] == pytest.approx(0) and score == pytest.approx(0.75 / vocab)
    assert AblatedConfidenceCalculator().score(uniform) == 1.0
    with pytest.raises(ValueError):
        ConfidenceEnsemble(["max_prob"], weights=[1, 2])


# ----------------------------------------------------------------------------------------------- HTTP robustness

@pytest.mark.parametrize("side,path", [("edge", "/v1/draft"), ("cloud", "/v1/verify")])
def test_bad_requests_get_4xx_json(servers, side, path):
    url = servers["communication"][f"{side}_endpoint"] + path
    auth = {"authorization": f"Bearer {TOKEN}", "content-type": "application/json"}
    cases = [
        (b'{"context_ids": [1, 2,', 422, "malformed JSON"),  # malformed JSON
        (json.dumps({"context_ids": [1, 99999]}).encode(), 422, "outside"),  # id beyond the vocabulary
        (json.dumps({"context_ids": [1, -4]}).encode(), 422, "context_ids"),
        (json.dumps({"context_ids": []}).encode(), 422, "context_ids"),
        (json.dumps({"context_ids": [1], "surprise": 1}).encode(), 422, "surprise"),
        (json.dumps({"context_ids": [1] * 100_000}).encode(), 413, "over the limit"),
        (json.dumps({"context_ids": [True, False]}).encode(), 422, "context_ids.0"),  # strict: no bool ids
        (json.dumps({"context_ids": ["5"]}).encode(), 422, "context_ids.0"),  # ... and no text ids
        (b'{"context_ids": [1], "temperature": NaN}', 422, "temperature"),
        (json.dumps({"context_ids": [1], "use_cache": "no"}).encode(), 422, "use_cache"),
        (json.dumps({"context_ids": [1] * 3000}).encode(), 422, "context of 2048 tokens"),  # longer than n_ctx
        (DEEP, 400, "could not be parsed"),
    ]
    if side == "edge":
        cases.append((json.dumps({"context_ids": [1], "seed": -1}).encode(), 422, "seed"))
    else:
        cases += [(b'{"context_ids": [1], "draft_ids": [2], "draft_probs": [NaN]}', 422, "draft_probs"),
                  (b'{"context_ids": [1], "draft_ids": [2], "draft_probs": [0.5], "draft_dists": [[Infinity]], '
                   b'"temperature": 1.0}', 422, "draft_dists")]
    for body, status, words in cases:
        resp = httpx.post(url, content=body, headers=auth)
        assert resp.status_code == status, (body[:40], resp.text)
        assert words in resp.json()["error"]
    for headers in ({}, {"authorization": "Bearer wrong"}):
        resp = httpx.post(url, json={"context_ids": [1]}, headers=headers)
        assert resp.status_code == 401 and "bearer" in resp.json()["error"]
        resp = httpx.post(url, content=DEEP, headers={**headers, "content-type": "application/json"})
        assert resp.status_code == 401, "the token is checked before the body is parsed"
    generate = servers["communication"][f"{side}_endpoint"] + "/v1/generate"
    resp = httpx.post(generate, json={"context_ids": [1], "max_tokens": 2, "seed": -1}, headers=auth)
    assert resp.status_code == 422 and "seed" in resp.json()["error"]
    resp = httpx.get(servers["communication"][f"{side}_endpoint"] + "/nowhere", headers=auth)
    assert resp.status_code == 404 and "error" in resp.json()
    assert httpx.get(servers["communication"][f"{side}_endpoint"] + "/health").json()["status"] == "ok"


def test_server_answering_500_is_reported_not_retried(servers, tiny_tokenizer):
    """A server that is up and fails is not 'unreachable', and asking it again would not help."""
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse
    hits = []
    failing = FastAPI()

    @failing.post("/v1/verify")
    def verify():
        hits.append(1)
        return JSONResponse({"error": "verifier crashed"}, status_code=500)

    port = free_port()
    cloud = ServerThread(failing, "127.0.0.1", port).start()
    edge_port = int(servers["communication"]["edge_endpoint"].rsplit(":", 1)[1])
    cfg = config(edge_port, port, http_client={"max_retries": 3, "backoff_s": 0.01, "timeout": 5.0,
                                               "connection_pool_size": 4})
    try:
        failed = run(cfg, tiny_tokenizer, "One day, Lily went to the hill")
    finally:
        cloud.stop()
    assert "answered 500: verifier crashed" in failed.error and "unreachable" not in failed.error
    assert len(hits) == 1


def test_ablation_with_servers_gone_is_one_line(tmp_path):
    cfg = tmp_path / "dead.yaml"
    cfg.write_text(f"communication:\n  edge_endpoint: http://127.0.0.1:{free_port()}\n"
                   f"  cloud_endpoint: http://127.0.0.1:{free_port()}\n"
                   "  http_client: {max_retries: 0, backoff_s: 0.0, timeout: 2.0, connection_pool_size: 2}\n"
                   "experiments: {num_prompts: 1}\ninference: {max_tokens: 4}\n")
    proc = subprocess.run([sys.executable, "edge_cloud.py", "--mode", "ablation", "--external-servers", "--config",
                           str(cfg), "--output-dir", str(tmp_path / "out")], capture_output=True, text=True,
                          timeout=180)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith("error: edge server at http://127.0.0.1:")
    assert (tmp_path / "out" / "ablation_report.json").is_file()


def test_cloud_stopped_mid_session_retries_then_fails_or_falls_back(apps, servers, tiny_tokenizer):
    cloud_port = free_port()
    cloud = ServerThread(apps[1], "127.0.0.1", cloud_port).start()
    edge_port = int(servers["communication"]["edge_endpoint"].rsplit(":", 1)[1])
    cfg = config(edge_port, cloud_port, http_client={"max_retries": 2, "backoff_s": 0.01, "timeout": 5.0,
                                                     "connection_pool_size": 4})
    assert run(cfg, tiny_tokenizer, "One day, Lily went to the hill").error is None
    cloud.stop()
    failed = run(cfg, tiny_tokenizer, "One day, Lily went to the hill")
    assert "cloud server" in failed.error and "unreachable after 2 retries" in failed.error
    assert not failed.edge_fallback
    fallback_cfg = apply_overrides(cfg, {"communication": {"fallback_to_edge": True}}, "test")
    rescued = run(fallback_cfg, tiny_tokenizer, "One day, Lily went to the hill")
    assert rescued.edge_fallback and "edge_fallback" in rescued.error
    assert finished(rescued, 32) and rescued.unverified_tokens == len(rescued.token_ids)


# ----------------------------------------------------------------------------------------------- ablations, CLI

def test_ablation_report_has_every_experiment(servers, tiny_tokenizer, tmp_path):
    from lib.edgecloud.ablation import experiments, run_ablations
    cfg = apply_overrides(servers, {"inference": {"max_tokens": 12}}, "test")
    report = asyncio.run(run_ablations(cfg, ["One morning, Zoe went to the river"], tiny_tokenizer, tmp_path))
    saved = json.loads((tmp_path / "ablation_report.json").read_text())
    names = [e["name"] for e in saved["experiments"]]
    assert names == [e["name"] for e in experiments(cfg)]
    assert {"baseline", "no_confidence", "no_draft_verify", "no_kv_cache", "edge_only", "cloud_only",
            "strict_confidence", "wan_50ms"} <= set(names)
    by_name = {e["name"]: e for e in report["experiments"]}
    for name in ("baseline", "no_confidence", "no_kv_cache", "wan_50ms"):
        assert by_name[name]["matches_cloud_only"] is True and by_name[name]["success_rate"] == 1.0
    assert by_name["edge_only"]["cloud_calls"] == 0 and by_name["baseline"]["cloud_calls"] > 0
    assert by_name["baseline"]["bytes_sent"] > 0 and by_name["baseline"]["tokens_per_s"] > 0
    assert by_name["wan_50ms"]["mean_network_ms"] >= 50
    assert (tmp_path / "ablation_report.png").stat().st_size > 0
    assert saved["schema"].startswith("speclab.")


def test_bad_config_is_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("edge:\n  confidence:\n    strategy: psychic\n")
    proc = subprocess.run([sys.executable, "edge_cloud.py", "--mode", "client", "--prompt", "hi", "--config",
                           str(bad)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"error: --config {bad}: edge.confidence.strategy='psychic': expected one of max_prob, entropy, "
        "temperature, top_k_agg, ensemble"]


# ----------------------------------------------------------------------------------------- the vLLM verifier

def test_vllm_cloud_verifier_greedy_equals_hf_cloud_only(servers, tiny_tokenizer, shipped_prompts):
    """cloud.model.engine: vllm, for real (vLLM's CPU build): edge + vLLM cloud = HF cloud-only, token for token."""
    from lib.edgecloud.launch import build_cloud_app
    port = free_port()
    over = {"cloud": {"model": {"engine": "vllm"}, "server": {"port": port}},
            "communication": {"cloud_endpoint": f"http://127.0.0.1:{port}"}}
    cfg = apply_overrides(servers, over, "test")
    app, verifier = build_cloud_app(cfg)
    thread = ServerThread(app, "127.0.0.1", port).start()
    try:
        for prompt in shipped_prompts[:2]:
            reference = run(servers, tiny_tokenizer, prompt, mode="cloud_only")  # the HF cloud
            got = run(cfg, tiny_tokenizer, prompt)
            assert got.error is None and got.token_ids == reference.token_ids
            assert got.draft_tokens > 0 and 0 < got.accepted_tokens <= got.draft_tokens
            assert run(cfg, tiny_tokenizer, prompt, mode="cloud_only").token_ids == reference.token_ids
        s = stats(cfg, "cloud")
        assert s["verify_requests"] > 0 and s["accepted_tokens"] <= s["draft_tokens"]
        sampled = httpx.post(f"http://127.0.0.1:{port}/v1/verify", headers={"authorization": f"Bearer {TOKEN}"},
                             json={"context_ids": [5, 6], "draft_ids": [7], "temperature": 0.8})
        assert sampled.status_code == 422 and "greedy" in sampled.json()["error"]
    finally:
        thread.stop()
        verifier.llm.llm_engine.engine_core.shutdown()
