"""Edge/cloud collaborative decoding, for real on loopback: llama.cpp edge, transformers cloud, HTTP in between."""
import asyncio
import json
import signal
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

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
from lib.errors import UsageError

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


def port_of(cfg, side) -> int:
    return int(cfg["communication"][f"{side}_endpoint"].rsplit(":", 1)[1])


def post(cfg, side, path, body) -> httpx.Response:
    return httpx.post(cfg["communication"][f"{side}_endpoint"] + path, json=body,
                      headers={"authorization": f"Bearer {TOKEN}"}, timeout=60)


class FaultyPeer:
    """A deliberately misbehaving edge or cloud: every POST gets 200 with answer(path, body, call number) as JSON."""

    def __init__(self, answer):
        self.calls = 0
        peer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["content-length"])))
                peer.calls += 1
                data = json.dumps(answer(self.path, body, peer.calls)).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]

    def __enter__(self):
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def accept_all(path, body, call):
    return {"accepted": len(body["draft_ids"]), "next_token": 267, "compute_ms": 1.0}


def client_yaml(path, edge_port, cloud_port, **inference) -> str:
    path.write_text(json.dumps({"communication": {"edge_endpoint": f"http://127.0.0.1:{edge_port}",
                                                  "cloud_endpoint": f"http://127.0.0.1:{cloud_port}",
                                                  "auth_token": TOKEN,
                                                  "http_client": {"max_retries": 0, "backoff_s": 0.0,
                                                                  "timeout": 30.0, "connection_pool_size": 2}},
                                "inference": {"max_tokens": 32, **inference}}))  # JSON is YAML
    return str(path)


def script(*args, timeout=180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout)


def assert_one_line(proc, returncode: int, start: str):
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == returncode and len(lines) == 1, (proc.returncode, proc.stderr[-3000:])
    assert lines[0].startswith(start), lines[0]


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


# ------------------------------------------------------------------------------- replies the client cannot trust

MALFORMED_VERDICTS = [
    ({}, "accepted: Field required"),
    ({"accepted": "x", "next_token": 267}, "accepted: Input should be a valid integer"),
    ({"accepted": 99, "next_token": 267}, "accepted: 99 is more than the"),
    ({"accepted": -3, "next_token": 267}, "accepted: Input should be greater than or equal to 0"),
    ({"accepted": 0, "next_token": 10**12}, "next_token: token id 1000000000000 is outside the vocabulary"),
    ({"accepted": 0, "next_token": -5}, "next_token: Input should be greater than or equal to 0"),
    ({"accepted": 0, "next_token": "a"}, "next_token: Input should be a valid integer"),
    ({"accepted": 0, "next_token": 267, "compute_ms": "fast"}, "compute_ms: Input should be a valid number"),
]


@pytest.mark.parametrize("verdict,problem", MALFORMED_VERDICTS)
def test_malformed_cloud_reply_is_an_error_naming_the_field_and_keeps_committed_tokens(servers, tiny_tokenizer,
                                                                                      verdict, problem):
    def answer(path, body, call):
        return accept_all(path, body, call) if call <= 2 else verdict

    with FaultyPeer(answer) as cloud:
        res = run(config(port_of(servers, "edge"), cloud.port), tiny_tokenizer, "One day, Lily went to the hill")
    assert res.error.startswith(f"cloud server at http://127.0.0.1:{cloud.port}/v1/verify answered a malformed "
                                f"reply: {problem}"), res.error
    assert res.cloud_calls == 2 and res.token_ids[-1] == 267  # the two good rounds stay committed
    assert res.accepted_tokens <= res.draft_tokens and not res.edge_fallback


@pytest.mark.parametrize("draft,problem", [
    ({"draft_ids": [5] * 9, "draft_probs": [1.0] * 9, "confidences": [1.0] * 9}, "draft_ids: 9 drafts for max_draft"),
    ({"draft_ids": [5, 6], "draft_probs": [1.0, 1.0], "confidences": [1.0]}, "confidences: 1 values for 2 draft_ids"),
    ({"draft_ids": [5], "draft_probs": [1.0], "confidences": [1.0], "compute_ms": -1}, "compute_ms: Input should be"),
])
def test_malformed_edge_reply_is_an_error_naming_the_field(servers, tiny_tokenizer, draft, problem):
    with FaultyPeer(lambda path, body, call: {"draft_dists": None, "stopped_low_confidence": False, **draft}) as edge:
        res = run(config(edge.port, port_of(servers, "cloud")), tiny_tokenizer, "One day, Lily went to the hill")
    assert res.error.startswith(f"edge server at http://127.0.0.1:{edge.port}/v1/draft answered a malformed reply: "
                                f"{problem}"), res.error
    assert res.token_ids == [] and res.cloud_calls == 0


def test_malformed_reply_on_the_command_line_is_one_line_after_the_committed_text(servers, tmp_path):
    def answer(path, body, call):
        return accept_all(path, body, call) if call <= 2 else {"accepted": 99, "next_token": 267}

    with FaultyPeer(answer) as cloud:
        cfg = client_yaml(tmp_path / "c.yaml", port_of(servers, "edge"), cloud.port)
        proc = script("edge_cloud.py", "--config", cfg, "--prompt", "One day, Lily went to the hill", "--json")
    assert_one_line(proc, 1, f"error: cloud server at http://127.0.0.1:{cloud.port}/v1/verify answered a malformed "
                             "reply: accepted: 99 is more than the")
    out = json.loads(proc.stdout)
    assert out["cloud_calls"] == 2 and out["token_ids"][-1] == 267 and out["text"]


def test_ablation_with_a_malformed_cloud_keeps_every_experiment(servers, tiny_tokenizer, tmp_path):
    from lib.edgecloud.ablation import experiments, run_ablations

    def answer(path, body, call):
        if call % 3 == 0:
            return {"token_ids": None} if path == "/v1/generate" else {}
        return {"token_ids": [267, 323]} if path == "/v1/generate" else accept_all(path, body, call)

    with FaultyPeer(answer) as cloud:
        cfg = apply_overrides(config(port_of(servers, "edge"), cloud.port), {"inference": {"max_tokens": 6}}, "test")
        report = asyncio.run(run_ablations(cfg, ["One day, Lily", "Once upon a time"], tiny_tokenizer, tmp_path))
    assert [e["name"] for e in report["experiments"]] == [e["name"] for e in experiments(cfg)]
    errors = [err for e in report["experiments"] for err in e["errors"]]
    assert errors and all("answered a malformed reply" in err for err in errors)
    assert all(e["requests"] == 2 for e in report["experiments"])


# ----------------------------------------------------------------------------------- every mode ends the same way

@pytest.mark.parametrize("mode", ["cloud_only", "edge_only"])
def test_generate_modes_keep_at_most_max_tokens_and_nothing_after_eos(servers, tiny_tokenizer, mode):
    sent = {2: [267, 323, 267, 323, 267], 4: [267, 0, 323]}  # max_tokens -> what the faulty server sends

    with FaultyPeer(lambda path, body, call: {"token_ids": sent[body["max_tokens"]]}) as peer:
        ports = (peer.port, port_of(servers, "cloud")) if mode == "edge_only" else (port_of(servers, "edge"), peer.port)
        cfg = config(*ports)
        long, eos = (run(cfg, tiny_tokenizer, "One day", mode=mode, max_tokens=n) for n in (2, 4))
    assert long.error is None and long.token_ids == [267, 323] and long.dropped_tokens == 3
    assert eos.token_ids == [267, 0] and eos.dropped_tokens == 1
    assert long.unverified_tokens == (2 if mode == "edge_only" else 0)


def test_cloud_only_over_the_limit_on_the_command_line(servers, tmp_path):
    with FaultyPeer(lambda path, body, call: {"token_ids": [267, 323]}) as cloud:
        cfg = client_yaml(tmp_path / "c.yaml", port_of(servers, "edge"), cloud.port)
        proc = script("edge_cloud.py", "--config", cfg, "--prompt", "One day", "--pipeline", "cloud_only",
                      "--max-tokens", "1", "--json")
    assert proc.returncode == 0 and json.loads(proc.stdout)["token_ids"] == [267]
    assert proc.stderr.strip().splitlines() == ["note: the servers sent 1 tokens past max_tokens or EOS; they were "
                                                "dropped"]


def test_collaborative_decoding_stops_at_eos(servers, tiny_tokenizer, shipped_prompts):
    prompt = shipped_prompts[22]  # the tiny target answers it in 16 tokens, the last one EOS
    reference = run(servers, tiny_tokenizer, prompt, mode="cloud_only", max_tokens=64)
    assert reference.token_ids[-1] == tiny_tokenizer.eos_token_id and len(reference.token_ids) < 64
    short, long = (run(servers, tiny_tokenizer, prompt, max_tokens=n) for n in (64, 200))
    for res in (short, long):
        assert res.error is None and res.token_ids == reference.token_ids
    work = ("rounds", "cloud_calls", "edge_calls", "draft_tokens", "accepted_tokens", "bytes_sent")
    assert {k: getattr(short, k) for k in work} == {k: getattr(long, k) for k in work}  # no round after EOS
    assert short.rounds <= len(reference.token_ids)


def test_verifier_accepts_nothing_after_an_eos_draft(servers, tiny_tokenizer, shipped_prompts):
    context = tiny_tokenizer.encode(shipped_prompts[22], add_special_tokens=False)
    answer = post(servers, "cloud", "/v1/generate", {"context_ids": context, "max_tokens": 64}).json()["token_ids"]
    assert answer[-1] == tiny_tokenizer.eos_token_id
    after_eos = post(servers, "cloud", "/v1/verify", {"context_ids": context, "draft_ids": answer,
                                                      "use_cache": False}).json()
    assert after_eos["accepted"] == len(answer)
    # the target's own token after EOS, drafted after it: still not accepted
    verdict = post(servers, "cloud", "/v1/verify", {"context_ids": context, "use_cache": False,
                                                    "draft_ids": answer + [after_eos["next_token"]]}).json()
    assert verdict["accepted"] == len(answer)


# ----------------------------------------------------------------------------------- tokens, hosts and ports

@pytest.mark.parametrize("token,shown", [("sécret", "'é'"), ("a\nb", "'\\n'"), ("two words", "' '")])
def test_bearer_token_outside_visible_ascii_is_refused_where_it_enters(apps, token, shown):
    with pytest.raises(UsageError) as refused:
        apply_overrides(load_config(), {"communication": {"auth_token": token}}, "test")
    assert str(refused.value).startswith(f"test: communication.auth_token: the token holds {shown}; a bearer token")
    from lib.edgecloud.http_api import create_edge_app
    with pytest.raises(UsageError, match="visible ASCII"):
        create_edge_app(apps[2], auth_token=token)


def test_bearer_token_flag_outside_visible_ascii_is_one_line():
    assert_one_line(script("start_edge.py", "--auth-token", "sécret", "--port", str(free_port())), 2,
                    "error: --auth-token: the token holds 'é'")


def test_bad_host_and_busy_port_are_one_line_before_any_banner(apps, tmp_path):
    assert_one_line(script("start_cloud.py", "--host", "bad..host"), 2,
                    "error: --host bad..host: cloud.server.host: 'bad..host' is not an IP address or host name")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = script("start_cloud.py", "--port", str(port))
        assert_one_line(proc, 2, f"error: --port {port}: cannot listen on 127.0.0.1:{port} (Address already in use)")
        assert "server on" not in proc.stdout
        cfg = tmp_path / "busy.yaml"
        cfg.write_text(f"edge:\n  server:\n    port: {free_port()}\ncloud:\n  server:\n    port: {port}\n")
        proc = script("edge_cloud.py", "--mode", "server", "--config", str(cfg))
        assert_one_line(proc, 2, f"error: cloud.server.host/port: cannot listen on 127.0.0.1:{port}")
        assert "server on" not in proc.stdout
        with pytest.raises(UsageError, match="Address already in use"):
            ServerThread(apps[0], "127.0.0.1", port)


# ------------------------------------------------------------------------------------------- stop signals

def wait_for_verify_calls(cfg, more: int, proc: subprocess.Popen, timeout: float = 120):
    """Until the cloud has answered `more` verify requests beyond the count now (so the client committed some)."""
    target = stats(cfg, "cloud")["verify_requests"] + more
    deadline = time.monotonic() + timeout
    while stats(cfg, "cloud")["verify_requests"] < target:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "no verify requests came"
        time.sleep(0.1)


@pytest.mark.parametrize("signum,flags", [(signal.SIGINT, []), (signal.SIGTERM, ["--json"])])
def test_stop_signal_in_client_mode_prints_the_committed_tokens(servers, shipped_prompts, tmp_path, signum, flags):
    cfg = client_yaml(tmp_path / "c.yaml", port_of(servers, "edge"), port_of(servers, "cloud"), max_tokens=64)
    proc = subprocess.Popen([sys.executable, "edge_cloud.py", "--config", cfg, "--prompt", shipped_prompts[0],
                             "--network-delay-ms", "150", *flags], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    wait_for_verify_calls(servers, 2, proc)
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=60)
    assert_one_line(subprocess.CompletedProcess(proc.args, proc.returncode, out, err), 128 + signum,
                    f"interrupted ({signum.name}): what was committed is printed above")
    if flags:
        result = json.loads(out)
        assert result["interrupted"] and 2 <= len(result["token_ids"]) < 64 and result["text"]
    else:
        assert out.splitlines()[0].strip() and " rounds, " in out.splitlines()[-1]
        assert 2 <= int(out.splitlines()[-1].split()[1]) < 64  # "-- N tokens, ..."


def test_stop_signal_in_ablation_mode_keeps_the_finished_requests(servers, tmp_path):
    cfg = client_yaml(tmp_path / "c.yaml", port_of(servers, "edge"), port_of(servers, "cloud"), max_tokens=4)
    report = tmp_path / "out" / "ablation_report.json"
    proc = subprocess.Popen([sys.executable, "edge_cloud.py", "--mode", "ablation", "--external-servers", "--config",
                             cfg, "--experiments", "baseline", "--num-prompts", "8", "--network-delay-ms", "200",
                             "--output-dir", str(tmp_path / "out")], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    wait_for_verify_calls(servers, 5, proc)  # a request of 4 tokens takes at most 4 rounds: one has finished
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 143 and "Traceback" not in err, err[-3000:]
    assert err.strip().splitlines()[-1] == "interrupted (SIGTERM): the report keeps every finished request"
    saved = json.loads(report.read_text())
    assert saved["stopped_early"] and [e["name"] for e in saved["experiments"]] == ["cloud_only", "baseline"]
    assert saved["experiments"][0]["requests"] == 8
    baseline = saved["experiments"][1]
    assert baseline["stopped_early"] and 1 <= baseline["requests"] < 8
    assert all(0 < len(r["token_ids"]) <= 4 and not r["interrupted"] for r in baseline["requests_detail"])


def test_ctrl_c_in_interactive_mode_cancels_only_the_request(servers, shipped_prompts, tmp_path):
    cfg = client_yaml(tmp_path / "c.yaml", port_of(servers, "edge"), port_of(servers, "cloud"), max_tokens=64)
    proc = subprocess.Popen([sys.executable, "edge_cloud.py", "--mode", "interactive", "--config", cfg,
                             "--network-delay-ms", "150"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    proc.stdin.write(shipped_prompts[0] + "\n")
    proc.stdin.flush()
    wait_for_verify_calls(servers, 2, proc)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate("One day, Lily went to the hill\nquit\n", timeout=120)
    assert proc.returncode == 0 and "Traceback" not in err, err[-3000:]
    assert err.strip().splitlines() == ["request cancelled (SIGINT)"]
    summaries = [line for line in out.splitlines() if line.startswith("-- ")]
    assert len(summaries) == 2  # the cancelled request's partial output, then the next request in full
    assert 2 <= int(summaries[0].split()[1]) < 64 and int(summaries[1].split()[1]) > 0


# -------------------------------------------------------------------------------- server inputs that mislead

def test_server_inputs_that_would_crash_or_mislead_are_422(servers, tiny_tokenizer):
    vocab = len(tiny_tokenizer)
    cases = [
        ("cloud", "/v1/generate", {"context_ids": [5], "temperature": 1e-40}, "temperature: 1e-40 is neither 0"),
        ("edge", "/v1/generate", {"context_ids": [5], "temperature": 1e-310}, "temperature: 1e-310 is neither 0"),
        ("edge", "/v1/draft", {"context_ids": [5], "temperature": 1e-4}, "temperature"),
        ("cloud", "/v1/verify", {"context_ids": [5], "draft_ids": [2], "draft_dists": [[0, 0, 0]], "temperature": 1.0},
         "draft_dists[0]: sums to 0"),
        ("cloud", "/v1/verify", {"context_ids": [5], "draft_ids": [2], "draft_dists": [[]], "temperature": 1.0},
         "draft_dists[0]: sums to 0"),
        ("cloud", "/v1/verify", {"context_ids": [5], "draft_ids": [0], "draft_dists": [[1.0]], "temperature": 1.0},
         f"draft_dists[0]: 1 probabilities, expected one per target token ({vocab})"),
        ("cloud", "/v1/verify", {"context_ids": [5], "draft_ids": [2], "draft_dists": [[1.0] + [0.0] * (vocab - 1)],
                                 "temperature": 1.0}, "draft_dists[0]: gives the draft token 2 no probability"),
        ("cloud", "/v1/verify", {"context_ids": [5], "draft_ids": [2, 3], "draft_dists": [[1.0]]},
         "draft_dists: 1 distributions for 2 draft_ids"),
        ("cloud", "/v1/verify", {"context_ids": [5], "draft_ids": [2], "draft_probs": [0.5, 0.5]},
         "draft_probs: 2 values for 1 draft_ids"),
    ]
    for side, path, body, words in cases:
        resp = post(servers, side, path, body)
        assert resp.status_code == 422 and words in resp.json()["error"], (body, resp.text)
    uniform = [1 / vocab] * vocab
    ok = post(servers, "cloud", "/v1/verify", {"context_ids": [5], "draft_ids": [2], "draft_dists": [uniform],
                                               "draft_probs": [1 / vocab], "temperature": 1.0})
    assert ok.status_code == 200 and 0 <= ok.json()["accepted"] <= 1
    with pytest.raises(UsageError, match="inference.temperature: 1e-05 is neither 0"):
        apply_overrides(load_config(), {"inference": {"temperature": 1e-5}}, "test")


def test_cloud_generate_honours_the_seed(servers):
    def sampled(seed):
        return post(servers, "cloud", "/v1/generate", {"context_ids": [5, 6, 7], "max_tokens": 24,
                                                       "temperature": 1.5, "seed": seed}).json()["token_ids"]
    first = sampled(5)
    assert sampled(5) == first and sampled(6) != first


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
