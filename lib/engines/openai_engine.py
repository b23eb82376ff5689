"""openai engine: a running OpenAI-compatible server (vLLM, SGLang, llama.cpp, TGI...) behind the engine interface.

Each request starts at its arrival (at most MAX_CONCURRENCY in flight) and is streamed over SSE from
/v1/completions or /v1/chat/completions, or SGLang's native /generate (ENDPOINT_API). Every chunk gets one
timestamp, repeated for each token it
carries, so a speculative round that arrives as one chunk shows as one ITL gap. Prompts go as token ids where the
server takes them (a one-token probe at start); output ids come from vLLM's `return_token_ids` (or its
`token_id:N` logprob tokens), else the streamed text is tokenized again. Greedy runs ask for two top logprobs per
token and keep their margin (RequestRecord.top2_margin). A request that fails or times out is a record with
finish_reason "error"; a server that goes away ends the mode with one line once every request is recorded.

SD counters come from the server: the difference of two scrapes of vLLM's Prometheus /metrics around the run, the
`timings.draft_n` / `draft_n_accepted` of llama.cpp's responses, or SGLang's per-request `meta_info.spec_verify_ct`
(sglang 0.5.x, the same reading as the in-process sglang engine's); `spec_counters_source` says which, or that the
server reports none. SGLang cannot run on CPU-only machines: its path is written against its documented /generate
stream and tested on recorded chunk shapes only.
"""
from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx

from lib.engines.base import Engine
from lib.engines.endpoints import endpoint_url
from lib.errors import EngineUnavailable, UsageError
from lib.log import get_logger
from lib.models import load_tokenizer
from lib.sglang_support import spec_counters_from_meta
from lib.types import Clock, Request, RequestRecord, SpecCounters
from lib.vllm_support import SPEC_COUNTERS, metrics_difference, spec_counters_from, spec_metrics_from_prometheus

logger = get_logger(__name__)
PATHS = {"completions": "/v1/completions", "chat": "/v1/chat/completions", "sglang": "/generate"}
SGLANG_INFO_PATHS = ("/get_server_info", "/server_info")  # older and newer sglang
FINISH_REASONS = {"stop": "stop", "length": "length", "abort": "cancelled", "eos": "stop"}
TOKEN_ID_PREFIX = "token_id:"  # vLLM's logprob tokens with return_tokens_as_token_ids
LLAMACPP_PYTHON_NONE = "none: llama-cpp-python's server reports no draft counters (no /metrics, no timings)"


def one_line(text: str, limit: int = 300) -> str:
    """A server's text for an error line: whitespace runs (newlines too) as one space, cut to `limit`."""
    return " ".join(str(text).split())[:limit]


class ReplyError(Exception):
    """The server answered, but not with a stream SpecLab can read."""


@dataclass
class Chunk:
    """What one streamed chunk carries."""
    text: str = ""
    ids: list[int] | None = None
    tokens: int = 0  # tokens in this chunk (ids, logprob entries, or 1 for text)
    margins: list[float | None] = field(default_factory=list)
    finish_reason: str | None = None
    timings: dict | None = None  # llama.cpp server
    prompt_tokens: int | None = None  # usage
    meta: dict | None = None  # SGLang's meta_info


@dataclass
class Stream:
    """One request's stream so far."""
    start: float
    text: list[str] = field(default_factory=list)
    ids: list[int] = field(default_factory=list)
    ids_known: bool = True
    times: list[float] = field(default_factory=list)
    margins: list[float | None] = field(default_factory=list)
    finish_reason: str | None = None
    error: str | None = None
    timings: dict | None = None
    prompt_tokens: int | None = None
    meta: dict | None = None

    def take(self, chunk: Chunk, now: float):
        self.text.append(chunk.text)
        if chunk.ids is not None:
            self.ids += chunk.ids
        elif chunk.tokens:
            self.ids_known = False
        self.times += [now] * chunk.tokens
        self.margins += chunk.margins
        self.finish_reason = chunk.finish_reason or self.finish_reason
        self.timings = chunk.timings or self.timings
        self.prompt_tokens = chunk.prompt_tokens or self.prompt_tokens
        self.meta = chunk.meta or self.meta


def _token_ids(values) -> list[int]:
    """A reply's token ids: a JSON list of non-negative integers (not strings, bools or floats such as 1e400)."""
    if not isinstance(values, list) or not all(type(i) is int and i >= 0 for i in values):
        raise TypeError("token ids")
    return values


def _text(value) -> str:
    if value is not None and not isinstance(value, str):
        raise TypeError("text")
    return value or ""


def _finish_reason(value) -> str | None:
    if value is not None and not isinstance(value, str):
        raise TypeError("finish_reason")
    return value


def _count(value) -> int | None:
    """A usage count (prompt_tokens): a non-negative integer, or None when the server sends none."""
    if value is None:
        return None
    if type(value) is not int or value < 0:
        raise TypeError("count")
    return value


def _margin(top: list[float]) -> float | None:
    best = sorted(top, reverse=True)
    return best[0] - best[1] if len(best) >= 2 else None


def _id_of(token) -> int | None:
    if isinstance(token, str) and token.startswith(TOKEN_ID_PREFIX) and token[len(TOKEN_ID_PREFIX):].isdigit():
        return int(token[len(TOKEN_ID_PREFIX):])
    return None


def completion_logprobs(logprobs: dict) -> tuple[list, list[float | None]]:
    """(tokens, top-2 margins) of a /v1/completions chunk's logprobs."""
    tokens = list(logprobs.get("tokens") or [])
    tops = logprobs.get("top_logprobs") or []
    return tokens, [_margin(list(top.values())) if isinstance(top, dict) else None for top in tops]


def chat_logprobs(logprobs: dict) -> tuple[list, list[float | None]]:
    entries = logprobs.get("content") or []
    return ([e.get("token") for e in entries],
            [_margin([t.get("logprob") for t in e.get("top_logprobs") or []]) for e in entries])


def stream_object(data: str) -> dict:
    """One SSE data line's JSON object; ReplyError for a line that is not one, or an error object."""
    import json
    try:
        body = json.loads(data)
    except json.JSONDecodeError:
        raise ReplyError(f"a stream line is not JSON: {data[:200]!r}") from None
    if not isinstance(body, dict):
        raise ReplyError(f"a stream line is not a JSON object: {data[:200]!r}")
    if body.get("error"):
        raise ReplyError(f"the server sent an error: {one_line(body['error'])}")
    return body


def parse_chunk(data: str, api: str) -> Chunk:
    """One SSE data line's JSON as a Chunk; ReplyError for an error object or a body of another shape."""
    body = stream_object(data)
    chunk = Chunk(timings=body.get("timings") if isinstance(body.get("timings"), dict) else None)
    try:
        usage = body.get("usage")
        if isinstance(usage, dict):
            chunk.prompt_tokens = _count(usage.get("prompt_tokens"))
        choices = body.get("choices")
        if not choices:
            return chunk  # a usage-only chunk
        choice = choices[0]
        if api == "chat":
            chunk.text = _text((choice.get("delta") or {}).get("content"))
            tokens, chunk.margins = chat_logprobs(choice.get("logprobs") or {})
        else:
            chunk.text = _text(choice.get("text"))
            tokens, chunk.margins = completion_logprobs(choice.get("logprobs") or {})
        ids = choice.get("token_ids")
        if ids is None and tokens and all(_id_of(t) is not None for t in tokens):
            ids = [_id_of(t) for t in tokens]
        if ids is not None:
            chunk.ids = _token_ids(ids)
        chunk.tokens = len(chunk.ids) if chunk.ids is not None else len(tokens) or (1 if chunk.text else 0)
        chunk.finish_reason = _finish_reason(choice.get("finish_reason"))
    except (AttributeError, TypeError, ValueError, IndexError, KeyError):
        raise ReplyError(f"a stream chunk of another shape than OpenAI's: {data[:200]!r}") from None
    return chunk


def _new_part(values: list, total: int, seen: int) -> list:
    """The entries of a /generate chunk past the `seen` already taken: the stream is cumulative by default and
    incremental under sglang's --incremental-streaming-output; `total` (meta_info.completion_tokens) tells which."""
    return list(values[seen:]) if len(values) == total else list(values)


def parse_sglang_chunk(data: str, stream: Stream) -> Chunk:
    """One /generate stream line as a Chunk of what is new since `stream`; ReplyError for another shape."""
    body = stream_object(data)
    meta = body.get("meta_info")
    try:
        total, seen = _count(meta["completion_tokens"]), len(stream.times)
        text, before = _text(body.get("text")), "".join(stream.text)
        chunk = Chunk(text=text[len(before):] if text.startswith(before) else text, meta=meta,
                      prompt_tokens=_count(meta.get("prompt_tokens")))
        if body.get("output_ids") is not None:
            chunk.ids = _token_ids(_new_part(_token_ids(body["output_ids"]), total, seen))
        chunk.tokens = max(0, total - seen)
        tops = _new_part(meta.get("output_top_logprobs") or [], total, seen)
        chunk.margins = [_margin([entry[0] for entry in top]) for top in tops] if tops else []
        finish = meta.get("finish_reason")
        chunk.finish_reason = _finish_reason(finish.get("type") if isinstance(finish, dict) else finish)
        _count(meta.get("spec_verify_ct"))  # read with the record: an integer or none
    except (AttributeError, TypeError, ValueError, IndexError, KeyError):
        raise ReplyError(f"a stream chunk of another shape than SGLang's /generate: {data[:200]!r}") from None
    return chunk


class OpenAIEngine(Engine):
    name = "openai"

    def __init__(self, cfg, method: str, models):
        super().__init__(cfg, method, models)
        self.url = endpoint_url(cfg, method)  # None until a launched server is up
        self.server = None
        self.api = cfg.endpoint_api
        self.headers = {"Authorization": f"Bearer {cfg.endpoint_api_key}"} if cfg.endpoint_api_key else {}
        self.model = cfg.endpoint_model or None
        self.prompt_as_ids = False
        self.run_spec_counters: SpecCounters | None = None
        self.raw_spec_metrics: dict | None = None
        self.draft_timings: dict | None = None
        self.spec_counters_source = "not run yet"
        self.output_ids_source = "none yet"
        self.sglang_draft_tokens: int | None = None  # the server's speculative_num_draft_tokens (ENDPOINT_API=sglang)
        self.overlong_replies = 0  # requests of the run whose server sent more tokens than max_tokens

    @classmethod
    def context_length(cls, cfg, method: str, models) -> tuple[int, str] | None:
        if cfg.endpoint_launch == "vllm":
            return cfg.vllm_max_model_len, "VLLM_MAX_MODEL_LEN, the launched vLLM server's --max-model-len"
        if cfg.endpoint_launch == "llamacpp":
            from lib.engines.llamacpp_engine import context_size
            return context_size(cfg), "the launched llama.cpp server's n_ctx (as the llamacpp engine's)"
        return None  # a running server keeps its own limit; a prompt past it is that request's error

    @property
    def label(self) -> str:
        return f"openai:{self.method} ({self.url})"

    # ------------------------------------------------------------------------------------------------ start-up

    def start(self):
        self.tokenizer = load_tokenizer(self.models.target)
        if self.cfg.endpoint_launch != "none":
            from lib.engines.endpoint_server import LaunchedServer
            self.server = LaunchedServer(self.cfg.endpoint_launch, self.cfg, self.method, self.models)
            self.server.wait_healthy(self.headers)
            self.url = self.server.url
        self.model = self.model or self._first_model()
        self.prompt_as_ids = self.api == "sglang" or self._takes_token_ids()
        if self.api == "sglang":
            self.sglang_draft_tokens = self._sglang_draft_tokens()
        logger.info(f"{self.label}: model {self.model!r}, {self.api} API, prompts as "
                    f"{'token ids' if self.prompt_as_ids else 'text'}")

    def _get_json(self, path: str) -> dict:
        try:
            response = httpx.get(self.url + path, headers=self.headers, timeout=30)
        except httpx.HTTPError as exc:
            raise EngineUnavailable(f"{self.label}: GET {path} failed ({exc.__class__.__name__}: {exc}); is the "
                                    "server running there?") from None
        if response.status_code != 200:
            hint = " (set ENDPOINT_API_KEY)" if response.status_code in (401, 403) else ""
            raise EngineUnavailable(f"{self.label}: GET {path} answered HTTP {response.status_code}{hint}: "
                                    f"{one_line(response.text)}")
        try:
            return response.json()
        except ValueError:
            raise UsageError(f"{self.label}: GET {path} did not answer JSON: {one_line(response.text)!r}") from None

    def _first_model(self) -> str:
        body = self._get_json("/v1/models")
        try:
            return str(body["data"][0]["id"])
        except (KeyError, IndexError, TypeError):
            raise UsageError(f"{self.label}: /v1/models lists no model ({one_line(body)}); set ENDPOINT_MODEL") \
                from None

    def _sglang_draft_tokens(self) -> int | None:
        """The tokens SGLang verifies per round (its server args' speculative_num_draft_tokens), or None when it
        runs no speculative decoding."""
        for path in SGLANG_INFO_PATHS:
            with contextlib.suppress(EngineUnavailable, UsageError):
                info = self._get_json(path)
                if isinstance(info, dict) and info.get("speculative_algorithm"):
                    return int(info.get("speculative_num_draft_tokens") or self.cfg.gamma_value + 1)
                if isinstance(info, dict):
                    return None
        return None

    def _takes_token_ids(self) -> bool:
        """Whether /v1/completions accepts a prompt of token ids (vLLM, SGLang do; llama-cpp-python does not)."""
        if self.api != "completions":
            return False
        probe = {"model": self.model, "prompt": [int(self.tokenizer.eos_token_id or 0)], "max_tokens": 1}
        try:
            response = httpx.post(self.url + PATHS["completions"], json=probe, headers=self.headers, timeout=60)
        except httpx.HTTPError:
            return False
        return response.status_code == 200

    def stop(self):
        if self.server is not None:
            self.server.stop()

    # ------------------------------------------------------------------------------------------------- facts

    def describe(self) -> dict:
        facts = {"engine": self.name, "method": self.method, "url": self.url, "api": self.api, "model": self.model,
                 "launch": self.cfg.endpoint_launch, "prompt": "token ids" if self.prompt_as_ids else "text",
                 "output_ids_source": self.output_ids_source, "spec_counters_source": self.spec_counters_source}
        if self.server is not None:
            key = self.cfg.endpoint_api_key
            facts["server_command"] = ["***" if key and arg == key else arg for arg in self.server.argv]
            facts["dtype"] = self.server.dtype  # what the losslessness bound reads
        return facts

    def extra_results(self) -> dict:
        extra = {"spec_counters_source": self.spec_counters_source, "output_ids_source": self.output_ids_source}
        if self.raw_spec_metrics is not None:
            extra["server_spec_metrics"] = self.raw_spec_metrics
        if self.draft_timings is not None:
            extra["server_draft_timings"] = self.draft_timings
        return extra

    # ---------------------------------------------------------------------------------------------- running

    def generate_batch(self, requests: list[Request], clock: Clock) -> list[RequestRecord]:
        records: list[RequestRecord] = []
        self.run(requests, clock, records.append)
        return sorted(records, key=lambda r: r.request_id)

    def run(self, requests: list[Request], clock: Clock, on_done: Callable[[RequestRecord], None],
            should_stop: Callable[[], bool] = lambda: False) -> None:
        before = self._scrape()
        records: list[RequestRecord] = []
        self.draft_timings = None
        self.overlong_replies = 0

        def done(record: RequestRecord):
            records.append(record)
            on_done(record)

        try:
            asyncio.run(self._run_async(requests, clock, done, should_stop))
        finally:
            self._settle_counters(before, self._scrape())
        if self.overlong_replies:
            logger.warning(f"WARNING: {self.label}: the server sent more tokens than max_tokens in "
                           f"{self.overlong_replies} of {len(requests)} requests; each record keeps the first "
                           "max_tokens (does the server ignore max_tokens?)")
        asked = {request.request_id: request.max_new_tokens for request in requests}
        cut = sum(r.finish_reason == "length" and len(r.output_ids) < asked[r.request_id] for r in records)
        if cut:  # the server's context ended first
            logger.warning(f"WARNING: {self.label}: the server ended {cut} of {len(requests)} requests "
                           "with finish_reason 'length' before max_tokens; their records hold fewer tokens than "
                           "GENERATION_LENGTH (is the server's context length below prompt + GENERATION_LENGTH?)")
        self._check_server(records, len(requests))

    async def _run_async(self, requests, clock: Clock, on_done, should_stop):
        cap = self.cfg.max_concurrency or None
        limit = asyncio.Semaphore(cap) if cap else contextlib.nullcontext()  # as vllm bench serve's semaphore
        timeout = httpx.Timeout(self.cfg.endpoint_timeout, connect=min(10.0, self.cfg.endpoint_timeout))
        limits = httpx.Limits(max_connections=cap, max_keepalive_connections=cap)
        async with httpx.AsyncClient(base_url=self.url, headers=self.headers, timeout=timeout,
                                     limits=limits) as client:
            async def one(request: Request):
                await asyncio.sleep(max(0.0, request.arrival - clock.now()))
                async with limit:
                    if not should_stop():
                        on_done(await self._request(client, request, clock))

            await asyncio.gather(*(one(r) for r in sorted(requests, key=lambda r: r.arrival)))

    def _payload(self, request: Request) -> dict:
        greedy = self.cfg.temperature == 0
        if self.api == "sglang":
            return {"input_ids": list(request.prompt_ids), "stream": True,
                    "sampling_params": {"max_new_tokens": request.max_new_tokens, "temperature": self.cfg.temperature,
                                        "top_p": 1.0, "top_k": -1, "min_p": 0.0},
                    **({"return_logprob": True, "top_logprobs_num": 2, "logprob_start_len": -1} if greedy else {})}
        payload = {"model": self.model, "max_tokens": request.max_new_tokens, "temperature": self.cfg.temperature,
                   "top_p": 1.0, "top_k": 0, "min_p": 0.0, "repeat_penalty": 1.0, "stream": True,
                   "stream_options": {"include_usage": True}, "return_token_ids": True}
        if not greedy:
            payload["seed"] = self.cfg.seed + request.request_id  # as the vLLM engine seeds each request
        if self.api == "chat":
            payload["messages"] = [{"role": "user", "content": request.prompt}]
            if greedy:
                payload.update(logprobs=True, top_logprobs=2)
        else:
            payload["prompt"] = list(request.prompt_ids) if self.prompt_as_ids else \
                self.tokenizer.decode(request.prompt_ids, skip_special_tokens=True)
            if greedy:
                payload.update(logprobs=2, return_tokens_as_token_ids=True)
        return payload

    async def _request(self, client: httpx.AsyncClient, request: Request, clock: Clock) -> RequestRecord:
        stream = Stream(start=clock.now())
        try:
            await asyncio.wait_for(self._stream(client, request, clock, stream), self.cfg.endpoint_timeout)
        except TimeoutError:
            stream.error = f"no end of stream within ENDPOINT_TIMEOUT={self.cfg.endpoint_timeout:g} s"
        except httpx.HTTPError as exc:
            stream.error = f"{exc.__class__.__name__}: {exc}".rstrip(": ")
        except ReplyError as exc:
            stream.error = str(exc)
        except Exception as exc:  # a reply no parser foresaw ends this request, never the other requests of the run
            stream.error = f"unreadable reply ({exc.__class__.__name__}: {one_line(exc)})"
        if stream.error is None and stream.finish_reason is None:
            stream.error = "the stream ended without a finish_reason"
        return self._record(request, stream)

    async def _stream(self, client: httpx.AsyncClient, request: Request, clock: Clock, stream: Stream):
        async with client.stream("POST", PATHS[self.api], json=self._payload(request)) as response:
            if response.status_code != 200:
                body = (await response.aread()).decode(errors="replace")
                raise ReplyError(f"HTTP {response.status_code}: {one_line(body)}")
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue  # blank separators, SSE comments and event names
                data = line[len("data:"):].strip()
                if data == "[DONE]":
                    break
                chunk = parse_sglang_chunk(data, stream) if self.api == "sglang" else parse_chunk(data, self.api)
                stream.take(chunk, clock.now())

    def _record(self, request: Request, stream: Stream) -> RequestRecord:
        text = "".join(stream.text)
        ids, times = stream.ids, stream.times
        if not stream.ids_known:  # the server sent no ids: the text's tokens, on the chunks' times
            ids = self.tokenizer.encode(text, add_special_tokens=False)
            times = (times + times[-1:] * len(ids))[: len(ids)] if times else []
        self.output_ids_source = "server token ids" if stream.ids_known else \
            "the streamed text tokenized again (the server returns no token ids)"
        margins = stream.margins if len(stream.margins) == len(ids) and None not in stream.margins else None
        if len(ids) > request.max_new_tokens:  # a server that ignores max_tokens: count only what was asked
            self.overlong_replies += 1
            ids, times = ids[: request.max_new_tokens], times[: request.max_new_tokens]
            margins = margins[: request.max_new_tokens] if margins else margins
            text = self.tokenizer.decode(ids, skip_special_tokens=True)
        if stream.timings is not None:
            self._count_timings(stream.timings)
        reason = "error" if stream.error else FINISH_REASONS.get(stream.finish_reason, str(stream.finish_reason))
        prompt_tokens = stream.prompt_tokens or len(request.prompt_ids)  # usage counts the chat template too
        spec = None
        if stream.meta is not None and self.sglang_draft_tokens:
            spec = spec_counters_from_meta(stream.meta, self.sglang_draft_tokens, len(ids))
        return RequestRecord(request_id=request.request_id, prompt_tokens=prompt_tokens,
                             output_ids=list(ids), text=text, arrival=request.arrival, start=stream.start,
                             token_times=list(times), finish_reason=reason, error=stream.error, top2_margin=margins,
                             spec=spec)

    # ----------------------------------------------------------------------------------- counters and health

    def _count_timings(self, timings: dict):
        """llama.cpp server's per-response draft counts, summed over the run."""
        drafted, accepted = timings.get("draft_n"), timings.get("draft_n_accepted")
        if not isinstance(drafted, int) or not isinstance(accepted, int):
            return
        totals = self.draft_timings or {"draft_n": 0, "draft_n_accepted": 0}
        totals["draft_n"] += drafted
        totals["draft_n_accepted"] += accepted
        totals["acceptance_rate"] = totals["draft_n_accepted"] / totals["draft_n"] if totals["draft_n"] else None
        self.draft_timings = totals

    def _scrape(self) -> tuple[dict | None, str]:
        """(vLLM's spec-decode counters now or None, why none)."""
        try:
            response = httpx.get(self.url + "/metrics", headers=self.headers, timeout=10)
        except httpx.HTTPError as exc:
            return None, f"/metrics unreachable ({exc.__class__.__name__})"
        if response.status_code != 200:
            return None, f"/metrics: HTTP {response.status_code}"
        try:
            counters = spec_metrics_from_prometheus(response.text)
        except ValueError as exc:
            return None, f"/metrics is not Prometheus text SpecLab can count ({one_line(exc)})"
        if not counters:
            return None, f"/metrics has no {', '.join(SPEC_COUNTERS)} counters (no speculative decoding configured)"
        return counters, ""

    def _settle_counters(self, before: tuple, after: tuple):
        (old, _), (new, why) = before, after
        self.raw_spec_metrics, self.run_spec_counters = None, None
        if old is not None and new is not None:
            self.raw_spec_metrics = metrics_difference(old, new)
            counters = spec_counters_from(self.raw_spec_metrics)
            self.spec_counters_source = "vllm /metrics: the difference of two scrapes around the run"
            if self.method == "speculative":
                self.run_spec_counters = counters
            elif counters.num_drafts:
                logger.warning(f"WARNING: {self.label} is the target (AR) mode but its server drafted "
                               f"{counters.num_drafts} times: it runs speculative decoding")
        elif self.api == "sglang":
            self.spec_counters_source = (f"sglang meta_info: spec_verify_ct per request, {self.sglang_draft_tokens} "
                                         "tokens verified per round (its server args)" if self.sglang_draft_tokens
                                         else "none: the SGLang server runs no speculative decoding (its server "
                                         "args have no speculative_algorithm)")
        elif self.draft_timings is not None:
            self.spec_counters_source = "llama.cpp server timings: draft_n, draft_n_accepted per response " \
                                        "(no count of drafts, so no acceptance length)"
        elif self.cfg.endpoint_launch == "llamacpp":
            self.spec_counters_source = LLAMACPP_PYTHON_NONE
        else:
            self.spec_counters_source = f"none: the server reports no draft counters ({why or 'unknown'}; " \
                                        "no llama.cpp timings in its responses)"

    def _check_server(self, records: list[RequestRecord], total: int):
        """After a run with failed requests: one line if the server went away (every request is recorded by now)."""
        failed = [r for r in records if r.finish_reason == "error"]
        if not failed:
            return
        finished = len(records) - len(failed)
        said = f"{finished} of {total} requests finished, the other {len(failed)} are recorded as errors " \
               f"(first: {failed[0].error})"
        if self.server is not None and self.server.exit_code() is not None:
            raise EngineUnavailable(f"{self.label}: the server exited with code {self.server.exit_code()} during "
                                    f"the mode; {said}; last log lines: {self.server.log_tail()}")
        try:
            httpx.get(self.url + "/v1/models", headers=self.headers, timeout=10)
        except httpx.HTTPError as exc:
            raise EngineUnavailable(f"{self.label}: the server stopped answering during the mode "
                                    f"({exc.__class__.__name__}); {said}") from None
        logger.warning(f"WARNING: {self.label}: {said}")
