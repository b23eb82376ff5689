"""The openai engine against real servers on loopback: vLLM's OpenAI server (the CPU build) and llama-cpp-python's,
launched by SpecLab on the tiny models, plus fault runs of the whole benchmark (a server killed mid-mode, one that
never becomes ready, the benchmark itself stopped or killed).

Each server starts once per module (vLLM's CPU start is slow); every prompt set is small and short.
"""
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psutil
import pytest

from lib.config import resolve
from lib.engines import create_engine
from lib.engines.openai_engine import LLAMACPP_PYTHON_NONE, ReplyError, Stream, parse_chunk, parse_sglang_chunk
from lib.errors import EngineUnavailable, UsageError
from lib.files import ROOT
from lib.metrics import chunks
from lib.models import ModelPaths
from lib.types import Clock, Request

NUM_PROMPTS, NEW_TOKENS, GAMMA = 4, 24, 4
VLLM_ENV = {"GAMMA_VALUE": str(GAMMA), "VLLM_MAX_NUM_SEQS": "8", "VLLM_MAX_MODEL_LEN": "512"}


def make_cfg(**env):
    return resolve(None, {**VLLM_ENV, **{k: str(v) for k, v in env.items()}})


def paths(tiny_models):
    return ModelPaths(tiny_models.target, tiny_models.draft, tiny=True)


@pytest.fixture(scope="module")
def requests_(tiny_tokenizer, shipped_prompts):
    return [Request(i, p, tiny_tokenizer.encode(p), NEW_TOKENS) for i, p in enumerate(shipped_prompts[:NUM_PROMPTS])]


def run_engine(engine, requests_) -> dict:
    """Start the engine, run the requests, stop it: {request id: record}."""
    engine.start()
    try:
        records = []
        engine.run(requests_, Clock(), records.append)
    finally:
        engine.stop()
    return {r.request_id: r for r in records}


def served_run(tiny_models, requests_, method, **env):
    """Launch the server for one mode, run the requests through it, stop it: (engine, {id: record})."""
    engine = create_engine("openai", make_cfg(**env), method, paths(tiny_models))
    records = run_engine(engine, requests_)
    assert engine.server.exit_code() is not None  # stopped
    return engine, records


# ------------------------------------------------------------------------------------------- vLLM's server

@pytest.fixture(scope="module")
def vllm_served(tiny_models, requests_):
    return {method: served_run(tiny_models, requests_, method, ENDPOINT_LAUNCH="vllm", VLLM_SPEC_METHOD="draft_model")
            for method in ("target", "speculative")}


@pytest.fixture(scope="module")
def vllm_in_process(tiny_models, requests_, vllm_served):
    """The in-process vLLM engine, same prompts and settings (draft_model, k=4), after the servers are gone."""
    from lib.engines.vllm_engine import VLLMEngine
    cfg = make_cfg(VLLM_ENABLE_SPECULATIVE="true", VLLM_SPEC_METHOD="draft_model")
    engine = VLLMEngine(cfg, "speculative", paths(tiny_models))
    records = run_engine(engine, requests_)
    return engine.run_spec_counters, {i: r.output_ids for i, r in records.items()}


def test_vllm_server_acceptance_counters_equal_the_in_process_engine(vllm_served, vllm_in_process):
    engine, _ = vllm_served["speculative"]
    in_process, _ = vllm_in_process
    counters = engine.run_spec_counters
    assert in_process.num_drafts > 0 and in_process.accepted_tokens > 0
    assert counters == in_process
    assert len(counters.accepted_per_position) == GAMMA
    assert engine.extra_results()["spec_counters_source"].startswith("vllm /metrics")
    raw = engine.extra_results()["server_spec_metrics"]
    assert raw["vllm:spec_decode_num_drafts"] == counters.num_drafts
    assert "--speculative-config" in engine.describe()["server_command"]


def test_vllm_plain_server_says_it_reports_no_draft_counters(vllm_served):
    engine, _ = vllm_served["target"]
    assert engine.run_spec_counters is None
    assert engine.spec_counters_source.startswith("none: ")
    assert "--speculative-config" not in engine.describe()["server_command"]


def test_vllm_server_greedy_outputs_equal_the_in_process_engine(vllm_served, vllm_in_process, requests_):
    _, expected = vllm_in_process
    for method, (engine, records) in vllm_served.items():
        assert sorted(records) == [r.request_id for r in requests_]
        assert engine.describe()["prompt"] == "token ids" and engine.output_ids_source == "server token ids"
        for rid, ids in expected.items():
            record = records[rid]
            assert record.output_ids == ids, f"{method}: request {rid}"
            assert record.finish_reason in ("stop", "length") and record.error is None
            assert record.text  # detokenized by the server
            assert record.top2_margin is not None and len(record.top2_margin) == len(ids)
            assert min(record.top2_margin) >= 0  # greedy: the chosen token is the top one


def test_vllm_server_token_times_come_from_stream_chunks(vllm_served):
    for method, (_, records) in vllm_served.items():
        sizes = []
        for record in records.values():
            times = record.token_times
            assert len(times) == len(record.output_ids) and times == sorted(times)
            assert times[0] > record.start >= record.arrival
            sizes += [n for _, n in chunks(times)]
            assert len(chunks(times)) > 1  # streamed: more than one delivery per request
        if method == "speculative":
            assert max(sizes) > 1  # an accepted round arrives as one chunk of several tokens


def test_vllm_launch_passes_the_vllm_variables(tiny_models):
    from lib.engines.endpoint_server import vllm_command
    argv, env = vllm_command(make_cfg(VLLM_SPEC_METHOD="ngram", VLLM_NUM_SPECULATIVE_TOKENS="3",
                                      ENDPOINT_API_KEY="k3y"), "speculative", paths(tiny_models), 1234)
    spec = json.loads(argv[argv.index("--speculative-config") + 1])
    assert spec == {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 4, "prompt_lookup_min": 2}
    assert argv[argv.index("--host") + 1] == "127.0.0.1" and argv[argv.index("--port") + 1] == "1234"
    assert argv[argv.index("--max-model-len") + 1] == "512"
    assert env["VLLM_API_KEY"] == "k3y" and "k3y" not in argv  # the key by environment: argv shows in ps
    assert "VLLM_CPU_KVCACHE_SPACE" in env  # the CPU build's environment goes to the child


# ------------------------------------------------------------------------------- llama-cpp-python's server

@pytest.fixture(scope="module")
def llamacpp_served(tiny_models, requests_):
    return {method: served_run(tiny_models, requests_, method, ENDPOINT_LAUNCH="llamacpp")
            for method in ("target", "speculative")}


def test_llamacpp_server_requests_complete_with_per_chunk_times(llamacpp_served, requests_):
    for method, (engine, records) in llamacpp_served.items():
        assert sorted(records) == [r.request_id for r in requests_]
        assert engine.describe()["prompt"] == "text"  # llama-cpp-python takes no token-id prompts
        for record in records.values():
            assert record.finish_reason in ("stop", "length") and record.error is None
            assert record.output_ids and len(record.token_times) == len(record.output_ids)
            assert record.token_times == sorted(record.token_times) and record.token_times[0] > record.start
            assert len(chunks(record.token_times)) > 1
        assert "tokenized again" in engine.output_ids_source
        if method == "speculative":
            assert "prompt-lookup-decoding" in engine.describe()["server_command"]


def test_llamacpp_server_says_which_counters_it_lacks(llamacpp_served):
    for engine, _ in llamacpp_served.values():
        assert engine.run_spec_counters is None
        assert engine.extra_results()["spec_counters_source"] == LLAMACPP_PYTHON_NONE


def test_llamacpp_server_greedy_outputs_equal_across_endpoints(llamacpp_served):
    (_, target), (_, speculative) = llamacpp_served["target"], llamacpp_served["speculative"]
    assert {rid: r.text for rid, r in target.items()} == {rid: r.text for rid, r in speculative.items()}


def test_chat_api_and_bearer_token_on_a_launched_server(tiny_models, requests_):
    engine, records = served_run(tiny_models, requests_[:2], "target", ENDPOINT_LAUNCH="llamacpp",
                                 ENDPOINT_API="chat", ENDPOINT_API_KEY="s3cret")
    assert all(r.finish_reason in ("stop", "length") and r.text for r in records.values())
    assert "s3cret" not in json.dumps(engine.describe())
    assert engine.cfg.as_dict()["ENDPOINT_API_KEY"] == "***"


def test_a_wrong_api_key_is_one_line(tiny_models, requests_):
    server_engine = create_engine("openai", make_cfg(ENDPOINT_LAUNCH="llamacpp", ENDPOINT_API_KEY="right"),
                                  "target", paths(tiny_models))
    server_engine.start()
    try:
        client = create_engine("openai", make_cfg(TARGET_ENDPOINT=server_engine.url, ENDPOINT_API_KEY="wrong"),
                               "target", paths(tiny_models))
        with pytest.raises(EngineUnavailable, match="HTTP 401 .set ENDPOINT_API_KEY"):
            client.start()
    finally:
        server_engine.stop()


# ------------------------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("url", ["localhost:8000", "ftp://host:8000", "http://", "http://host:99999",
                                 "http://user:pw@host:8000", "http://host:8000/?x=1"])
def test_bad_endpoint_urls_are_one_line(url):
    with pytest.raises(UsageError, match=r"TARGET_ENDPOINT=.*expected an http:// or https:// URL"):
        make_cfg(COMPARE_MODES="openai:target", TARGET_ENDPOINT=url)


def test_a_missing_endpoint_names_the_variable():
    with pytest.raises(UsageError, match="SPECULATIVE_ENDPOINT is empty"):
        make_cfg(COMPARE_MODES="openai:target openai:speculative", TARGET_ENDPOINT="http://127.0.0.1:1")


@pytest.mark.parametrize("key", ["s\u00e9cret", "a\nb", "two words"])
def test_api_keys_that_no_header_can_carry_are_one_line_without_the_key(key):
    with pytest.raises(UsageError, match="ENDPOINT_API_KEY: .*visible ASCII") as caught:
        make_cfg(ENDPOINT_API_KEY=key)
    assert key not in str(caught.value)


def test_endpoint_urls_drop_a_trailing_v1():
    from lib.engines.endpoints import endpoint_url
    assert endpoint_url(make_cfg(TARGET_ENDPOINT="https://h.example/v1/"), "target") == "https://h.example"


@pytest.mark.parametrize("data, needle", [
    ("not json", "not JSON"), ("[1, 2]", "not a JSON object"), ('{"error": {"message": "boom"}}', "boom"),
    ('{"choices": [{"text": 5, "token_ids": "ab"}]}', "another shape"),
    ('{"choices": [{"text": 5}]}', "another shape"),
    ('{"choices": [{"text": "a", "token_ids": "123"}]}', "another shape"),
    ('{"choices": [{"text": "a", "token_ids": [1e400]}]}', "another shape"),
    ('{"choices": [{"text": "a", "token_ids": [true]}]}', "another shape"),
    ('{"choices": [{"text": "a", "token_ids": [-1]}]}', "another shape"),
    ('{"choices": [{"text": "a", "finish_reason": {"type": "stop"}}]}', "another shape"),
    ('{"choices": [{"delta": {"content": ["a"]}}]}', "another shape"),
    ('{"choices": [], "usage": {"prompt_tokens": "12"}}', "another shape"),
])
def test_hostile_stream_lines_are_reply_errors(data, needle):
    with pytest.raises(ReplyError, match=needle):
        parse_chunk(data, "chat" if "delta" in data else "completions")


@pytest.mark.parametrize("meta", [{"completion_tokens": 1e400}, {"completion_tokens": "1"},
                                  {"completion_tokens": 1, "spec_verify_ct": "x"},
                                  {"completion_tokens": 1, "prompt_tokens": -3}])
def test_hostile_sglang_lines_are_reply_errors(meta):
    with pytest.raises(ReplyError, match="another shape"):
        parse_sglang_chunk(json.dumps({"text": "a", "output_ids": [5], "meta_info": meta}), Stream(start=0.0))
    with pytest.raises(ReplyError, match="another shape"):
        parse_sglang_chunk(json.dumps({"text": "a", "output_ids": "5", "meta_info": {"completion_tokens": 1}}),
                           Stream(start=0.0))


@pytest.mark.parametrize("body, needle", [
    ("# TYPE vllm:spec_decode_num_drafts_total counter\nvllm:spec_decode_num_drafts_total +Inf\n", "inf"),
    ("# TYPE vllm:spec_decode_num_accepted_tokens_per_pos_total counter\n"
     'vllm:spec_decode_num_accepted_tokens_per_pos_total{position="-1"} 3\n', "position"),
    ("# TYPE vllm:spec_decode_num_accepted_tokens_per_pos_total counter\n"
     'vllm:spec_decode_num_accepted_tokens_per_pos_total{position="99999999999"} 3\n', "position"),
])
def test_metrics_that_are_not_counts_are_value_errors(body, needle):
    """_scrape reads a ValueError as "no counters here", so a hostile /metrics cannot fail a mode."""
    from lib.vllm_support import spec_metrics_from_prometheus
    with pytest.raises(ValueError, match=needle):
        spec_metrics_from_prometheus(body)


class MisbehavingServer:
    """An OpenAI-style /v1/completions server whose streams go wrong on purpose, one way per prompt (no real
    server misbehaves on demand): prompt [1] streams well, [2] sends a chunk whose text is a number, [3] ignores
    max_tokens, [4] sends a finish_reason that is an object, [5] ends with "length" before max_tokens (as a server
    whose context is full does). /metrics answers +Inf counters."""

    def __init__(self):
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        def chunk(text, ids, finish=None):
            return "data: " + json.dumps({"choices": [{"text": text, "token_ids": ids, "finish_reason": finish}]})

        streams = {1: [chunk("a", [5]), chunk("b", [6], "length")],
                   2: [chunk("a", [5]), '{"choices": [{"text": 5}]}'.join(["data: ", ""])],
                   3: [chunk("a", [5]), chunk("b", [6]), chunk("c", [7]), chunk("d", [8], "length")],
                   4: [chunk("a", [5]), chunk("b", [6], {"type": "length"})],
                   5: [chunk("a", [5], "length")]}

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def reply(self, body: bytes, content_type="application/json"):
                self.send_response(200)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                if self.path == "/metrics":
                    self.reply(b"# TYPE vllm:spec_decode_num_drafts_total counter\n"
                               b"vllm:spec_decode_num_drafts_total +Inf\n", "text/plain")
                else:
                    self.reply(json.dumps({"data": [{"id": "misbehaving"}]}).encode())

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if not body.get("stream"):  # the engine's one-token probe: token-id prompts are taken
                    return self.reply(json.dumps({"choices": [{"text": "x"}]}).encode())
                lines = streams[body["prompt"][0]] + ["data: [DONE]"]
                self.reply("".join(line + "\n\n" for line in lines).encode(), "text/event-stream")

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def test_hostile_replies_fail_only_their_own_request(tiny_models, caplog):
    """One malformed chunk is that request's error record, a reply past max_tokens is cut to it (with a warning),
    a reply the server cut short is kept as it is (with a warning), and an unreadable /metrics means no counters;
    the other requests finish and nothing takes the run down."""
    server = MisbehavingServer()
    try:
        engine = create_engine("openai", make_cfg(TARGET_ENDPOINT=server.url), "target", paths(tiny_models))
        records = run_engine(engine, [Request(i, "p", [i], 2) for i in (1, 2, 3, 4, 5)])
    finally:
        server.close()
    assert records[1].finish_reason == "length" and records[1].output_ids == [5, 6] and records[1].error is None
    assert records[2].finish_reason == "error" and "another shape" in records[2].error
    assert records[3].output_ids == [5, 6] and len(records[3].token_times) == 2 and records[3].error is None
    assert records[4].finish_reason == "error" and "another shape" in records[4].error
    assert records[5].finish_reason == "length" and records[5].output_ids == [5] and records[5].error is None
    assert "more tokens than max_tokens in 1 of 5 requests" in caplog.text
    assert "ended 1 of 5 requests with finish_reason 'length' before max_tokens" in caplog.text
    assert engine.run_spec_counters is None and "not Prometheus text" in engine.spec_counters_source


def test_stream_lines_of_each_server_kind_parse_into_tokens_ids_and_margins():
    vllm = parse_chunk('{"choices": [{"text": " a b", "logprobs": {"tokens": ["token_id:7", "token_id:9"], '
                       '"top_logprobs": [{"token_id:7": -0.1, "token_id:3": -2.6}, {"token_id:9": -0.5, '
                       '"token_id:1": -0.75}]}, "finish_reason": null}]}', "completions")
    assert vllm.ids == [7, 9] and vllm.tokens == 2 and vllm.margins == pytest.approx([2.5, 0.25])
    chat = parse_chunk('{"choices": [{"delta": {"content": "hi"}, "token_ids": [5], "logprobs": {"content": '
                       '[{"token": "hi", "logprob": -0.2, "top_logprobs": [{"token": "hi", "logprob": -0.2}, '
                       '{"token": "ho", "logprob": -1.2}]}]}, "finish_reason": "stop"}]}', "chat")
    assert (chat.text, chat.ids, chat.finish_reason, chat.margins) == ("hi", [5], "stop", pytest.approx([1.0]))
    server = parse_chunk('{"choices": [{"text": "x", "finish_reason": "length"}], '
                         '"timings": {"draft_n": 8, "draft_n_accepted": 5}}', "completions")
    assert server.ids is None and server.tokens == 1 and server.timings == {"draft_n": 8, "draft_n_accepted": 5}
    assert parse_chunk('{"choices": [], "usage": {"prompt_tokens": 12}}', "completions").prompt_tokens == 12


def sglang_line(text, ids, total, tops=None, finish=None, verify=None):
    meta = {"prompt_tokens": 6, "completion_tokens": total, "finish_reason": finish}
    if tops is not None:
        meta["output_top_logprobs"] = tops
    if verify is not None:
        meta["spec_verify_ct"] = verify
    return json.dumps({"text": text, "output_ids": ids, "meta_info": meta})


@pytest.mark.parametrize("incremental", [False, True])
def test_sglang_generate_streams_parse_into_new_tokens_margins_and_counters(incremental, tiny_tokenizer):
    """SGLang's /generate stream (cumulative by default, incremental under --incremental-streaming-output): each
    chunk adds only its new tokens, margins come from output_top_logprobs ([logprob, id, text] entries), and the
    final meta_info's spec_verify_ct gives the request's counters (SGLang cannot run here: recorded shapes)."""
    tops = [[[-0.1, 7, "a"], [-2.1, 3, "b"]], [[-0.2, 9, "c"], [-0.7, 1, "d"]], [[-0.3, 4, "e"], [-0.4, 5, "f"]]]
    parts = [(" a", [7], tops[:1], None), (" a c e", [7, 9, 4], tops, {"type": "length", "length": 3})]
    stream = Stream(start=0.0)
    for n, (text, ids, top, finish) in enumerate(parts):
        total = len(ids)
        if incremental and n:
            text, ids, top = text[len(parts[0][0]):], ids[1:], top[1:]
        chunk = parse_sglang_chunk(sglang_line(text, ids, total, top, finish, verify=2 if finish else 1), stream)
        stream.take(chunk, float(n + 1))
    assert stream.ids == [7, 9, 4] and stream.times == [1.0, 2.0, 2.0] and "".join(stream.text) == " a c e"
    assert stream.margins == pytest.approx([2.0, 0.5, 0.1]) and stream.finish_reason == "length"
    engine = create_engine("openai", make_cfg(ENDPOINT_API="sglang", TARGET_ENDPOINT="http://127.0.0.1:9"), "target",
                           ModelPaths(None, None, tiny=True))
    engine.tokenizer, engine.sglang_draft_tokens = tiny_tokenizer, 5  # k = 4: 4 drafts checked per verify
    record = engine._record(Request(0, "p", [1, 2], 3), stream)
    assert record.output_ids == [7, 9, 4] and record.finish_reason == "length" and record.prompt_tokens == 6
    assert (record.spec.num_drafts, record.spec.draft_tokens, record.spec.accepted_tokens) == (2, 8, 1)
    payload = engine._payload(Request(0, "p", [1, 2], 3))
    assert payload["input_ids"] == [1, 2] and payload["sampling_params"]["max_new_tokens"] == 3
    assert payload["top_logprobs_num"] == 2
    with pytest.raises(ReplyError, match="SGLang's /generate"):
        parse_sglang_chunk('{"text": "x"}', Stream(start=0.0))


def test_an_unreachable_endpoint_fails_at_start(tiny_models):
    engine = create_engine("openai", make_cfg(TARGET_ENDPOINT="http://127.0.0.1:9"), "target", paths(tiny_models))
    with pytest.raises(EngineUnavailable, match=r"openai:target \(http://127.0.0.1:9\): GET /v1/models failed"):
        engine.start()


# ------------------------------------------------------------------------------------------- fault runs

def benchmark(tmp_path, mark, **env):
    """benchmark.py in a child process; every process it starts inherits SPECLAB_TEST_MARK=mark."""
    full = {**os.environ, **VLLM_ENV, "RESULTS_DIR": str(tmp_path), "RUN_ID": "run", "ENABLE_GPU_MONITOR": "false",
            "SPECLAB_TEST_MARK": mark, **{k: str(v) for k, v in env.items()}}
    return subprocess.Popen([sys.executable, str(ROOT / "benchmark.py")], env=full, cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def marked_processes(mark: str) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.environ().get("SPECLAB_TEST_MARK") == mark:
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def server_of(bench: subprocess.Popen, module: str, timeout: float = 300) -> psutil.Process:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for child in psutil.Process(bench.pid).children(recursive=True):
            try:
                if module in " ".join(child.cmdline()):
                    return child
            except psutil.NoSuchProcess:
                continue
        time.sleep(0.2)
    raise AssertionError(f"no {module} child appeared")


def wait_for_lines(path: Path, count: int, bench: subprocess.Popen, timeout: float = 300):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and bench.poll() is None:
        if path.exists() and len(path.read_text().splitlines()) >= count:
            return
        time.sleep(0.05)
    raise AssertionError(f"{path.name} never reached {count} lines")


def nothing_left(mark: str, timeout: float = 30):
    deadline = time.monotonic() + timeout
    while marked_processes(mark) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert marked_processes(mark) == []


LONG_RUN = {"COMPARE_MODES": "openai:target", "ENDPOINT_LAUNCH": "llamacpp", "NUM_PROMPTS": "40",
            "GENERATION_LENGTH": "256", "MAX_CONCURRENCY": "1", "WARMUP": "false"}


def test_a_server_killed_mid_mode_keeps_finished_requests(tmp_path, tiny_models):
    mark = uuid.uuid4().hex
    bench = benchmark(tmp_path, mark, **LONG_RUN)
    requests_file = tmp_path / "run" / "requests_openai_target.jsonl"
    wait_for_lines(requests_file, 2, bench)
    server_of(bench, "llama_cpp.server").kill()
    _, err = bench.communicate(timeout=120)
    assert bench.returncode == 2
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert "Traceback" not in err
    assert "the server exited with code -9 during the mode" in lines[-1]
    records = [json.loads(line) for line in requests_file.read_text().splitlines()]
    failed = [r for r in records if r["finish_reason"] == "error"]
    assert len(records) == 40 and 2 <= 40 - len(failed) < 40 and all(r["error"] for r in failed)
    assert f"{40 - len(failed)} of 40 requests finished, the other {len(failed)} are recorded as errors" in lines[-1]
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    results = json.loads((tmp_path / "run" / "benchmark_results.json").read_text())
    assert run["status"] == "failed" and run["exit_code"] == 2
    mode = results["modes"]["openai:target"]
    assert mode["status"] == "failed" and mode["metrics"]["completed"] == 40 - len(failed)
    nothing_left(mark)


def test_a_server_that_never_becomes_ready_is_one_line_and_stopped(tmp_path, tiny_models):
    mark = uuid.uuid4().hex
    bench = benchmark(tmp_path, mark, COMPARE_MODES="openai:target", ENDPOINT_LAUNCH="vllm",
                      ENDPOINT_STARTUP_TIMEOUT="8")
    _, err = bench.communicate(timeout=300)
    assert bench.returncode == 2 and "Traceback" not in err
    line = err.strip().splitlines()[-1]
    assert line.startswith("error: ENDPOINT_LAUNCH=vllm: vllm.entrypoints.openai.api_server on http://127.0.0.1:")
    assert "did not answer /health within ENDPOINT_STARTUP_TIMEOUT=8 s; last log lines: " in line
    nothing_left(mark)


def test_a_server_that_exits_at_start_is_one_line_with_its_log_tail(tmp_path, tiny_models):
    mark = uuid.uuid4().hex
    bench = benchmark(tmp_path, mark, COMPARE_MODES="openai:target", ENDPOINT_LAUNCH="vllm",
                      VLLM_MAX_MODEL_LEN="100000")  # past the tiny target's 2048 positions: vLLM refuses it
    _, err = bench.communicate(timeout=600)
    assert bench.returncode == 2 and "Traceback" not in err.split("error: ")[-1]
    line = err.strip().splitlines()[-1]
    assert re.match(r"error: ENDPOINT_LAUNCH=vllm: .* exited with code 1 before it was ready; last log lines: ", line)
    assert "max_model_len" in line.split("last log lines: ")[1]  # vLLM's own reason, from its log
    nothing_left(mark)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_a_stopped_or_killed_benchmark_leaves_no_server(tmp_path, tiny_models, sig):
    mark = uuid.uuid4().hex
    bench = benchmark(tmp_path, mark, **LONG_RUN)
    requests_file = tmp_path / "run" / "requests_openai_target.jsonl"
    wait_for_lines(requests_file, 1, bench)
    server = server_of(bench, "llama_cpp.server")
    bench.send_signal(sig)
    bench.communicate(timeout=120)
    assert bench.returncode == (143 if sig == signal.SIGTERM else -9)
    server.wait(timeout=60)  # SIGKILL: the server's parent-death signal stops it
    nothing_left(mark)
    if sig == signal.SIGTERM:
        run = json.loads((tmp_path / "run" / "run.json").read_text())
        assert run["status"] == "interrupted" and run["exit_code"] == 143


def test_greedy_outputs_of_two_endpoints_are_compared_per_request_in_the_results(tmp_path, tiny_models):
    mark = uuid.uuid4().hex
    bench = benchmark(tmp_path, mark, COMPARE_MODES="openai:target openai:speculative", ENDPOINT_LAUNCH="llamacpp",
                      NUM_PROMPTS="3", GENERATION_LENGTH="24")
    out, err = bench.communicate(timeout=600)
    assert bench.returncode == 0, err[-2000:]
    modes = json.loads((tmp_path / "run" / "benchmark_results.json").read_text())["modes"]
    verdict = modes["openai:speculative"]["lossless"]
    assert verdict["baseline"] == "openai:target" and verdict["compared"] == 3 and verdict["verdict"] == "exact"
    assert verdict["margins"] == "known"  # the top-2 logprob margins the server streamed
    assert modes["openai:speculative"]["spec_counters_source"] == LLAMACPP_PYTHON_NONE
    assert modes["openai:speculative"]["metrics"]["acceptance"]["acceptance_rate"] is None  # not a zero
    nothing_left(mark)
