"""The async client that runs collaborative decoding over the edge and cloud servers.

One round: the edge drafts up to max_draft_tokens (stopping early below the confidence threshold), the cloud
verifies the whole draft in one pass and answers with the accepted count and its next token. Modes:
collaborative (the default), edge_only, cloud_only. Retries with exponential backoff on connection errors,
timeouts and 502/503/504 (a server not there yet, or overloaded); other answers are not retried: 4xx
(RequestRejected) and 500 (ServerFailed: the server is up and failed on this request, its error is reported).
Every reply is checked against its response model (protocol.py) before any of it is used: a malformed one is a
ServerFailed naming the field. Whatever ends a request (an error, EOS, max_tokens, a stop signal), the result
keeps the tokens committed so far.
"""
from __future__ import annotations

import asyncio
import json
import time
from dataclasses import asdict, dataclass, field

import httpx
from pydantic import BaseModel, ValidationError

from lib.edgecloud.protocol import DraftResponse, GenerateResponse, VerifyResponse, validation_problem
from lib.errors import UsageError, check_bearer_token


class ServiceUnavailable(Exception):
    """A server could not be reached after every retry."""


class ServerFailed(ServiceUnavailable):
    """A server is up and answered 500 (or another 5xx that waiting does not cure) or a malformed reply: reported
    with its error, never retried; like ServiceUnavailable, a failed cloud lets the edge finish (fallback_to_edge)."""


class RequestRejected(Exception):
    """A server answered 4xx (bad request, auth)."""


RETRIED_STATUS = (502, 503, 504)


def error_of(resp: httpx.Response) -> str:
    """The server's {"error": ...} message, or the start of its body."""
    try:
        data = resp.json()
    except ValueError:
        data = None
    detail = data.get("error") if isinstance(data, dict) else None
    return str(detail) if detail is not None else resp.text[:200]


def check_status(side: str, url: str, resp: httpx.Response) -> None:
    if resp.status_code >= 500:
        raise ServerFailed(f"{side} server at {url} answered {resp.status_code}: {error_of(resp)}")
    if resp.status_code >= 400:
        raise RequestRejected(f"{url}: HTTP {resp.status_code}: {error_of(resp)}")


def json_of(side: str, url: str, resp: httpx.Response) -> dict:
    """The JSON object a SpecLab server answers; anything else means the endpoint is not one."""
    try:
        data = resp.json()
    except ValueError:
        data = None
    if not isinstance(data, dict):
        raise ServerFailed(f"{side} server at {url} answered {resp.status_code} with no JSON object (is the "
                           f"endpoint a SpecLab {side} server?): {resp.text[:80]!r}")
    return data


def reply_of(side: str, url: str, resp: httpx.Response, model: type[BaseModel], expected: dict):
    """The reply as `model`, checked against what the request implies (`expected`: the validation context)."""
    data = json_of(side, url, resp)
    try:
        return model.model_validate(data, context=expected)
    except ValidationError as exc:
        raise ServerFailed(f"{side} server at {url} answered a malformed reply: "
                           f"{validation_problem(exc.errors(include_url=False)[0])}") from None


@dataclass
class InferenceResult:
    text: str
    token_ids: list[int]
    mode: str
    total_latency_ms: float = 0.0
    edge_latency_ms: float = 0.0  # edge compute, as the edge reports it
    cloud_latency_ms: float = 0.0  # cloud compute, as the cloud reports it
    network_latency_ms: float = 0.0  # round-trip time not spent computing (includes added network delay)
    acceptance_rate: float = 0.0  # accepted / drafted, over verified drafts
    confidence_score: float = 0.0  # mean edge confidence of drafted tokens
    rounds: int = 0
    edge_calls: int = 0
    cloud_calls: int = 0
    draft_tokens: int = 0
    accepted_tokens: int = 0
    unverified_tokens: int = 0  # committed without the cloud (lossy features / fallback)
    dropped_tokens: int = 0  # sent by a server past max_tokens or EOS, not kept
    bytes_sent: int = 0
    bytes_received: int = 0
    reused_cloud_tokens: int = 0
    edge_fallback: bool = False  # the cloud failed and the edge finished alone
    interrupted: bool = False  # a stop signal (or a cancelled task) cut the request short
    error: str | None = None

    @property
    def tokens_per_s(self) -> float:
        return len(self.token_ids) / (self.total_latency_ms / 1000) if self.total_latency_ms > 0 else 0.0

    def to_json(self) -> dict:
        return {**asdict(self), "tokens_per_s": round(self.tokens_per_s, 2)}


@dataclass
class _Tally:
    result: InferenceResult
    confidences: list[float] = field(default_factory=list)


class EdgeCloudHTTPClient:
    def __init__(self, cfg: dict, tokenizer=None):
        self.cfg = cfg
        comm = cfg["communication"]
        self.edge_url, self.cloud_url = comm["edge_endpoint"].rstrip("/"), comm["cloud_endpoint"].rstrip("/")
        http = comm["http_client"]
        self.timeout, self.max_retries, self.backoff_s = http["timeout"], int(http["max_retries"]), http["backoff_s"]
        self.pool = int(http["connection_pool_size"])
        self.delay_s = comm["network_delay_ms"] / 1000
        self.headers = {"content-type": "application/json"}
        if comm["auth_token"]:
            self.headers["authorization"] = f"Bearer {check_bearer_token(comm['auth_token'], 'auth_token')}"
        if tokenizer is None:
            from lib.edgecloud.settings import tokenizer_dir
            from lib.models import load_tokenizer
            tokenizer = load_tokenizer(tokenizer_dir(cfg))
        self.tokenizer = tokenizer
        self.eos_id = tokenizer.eos_token_id
        self.vocab = len(tokenizer)  # a token id the tokenizer cannot decode is a malformed reply
        self.http: httpx.AsyncClient | None = None
        self.last_result: InferenceResult | None = None  # the latest request's, complete or not (a stop signal)

    async def __aenter__(self):
        self.http = httpx.AsyncClient(timeout=self.timeout, headers=self.headers, limits=httpx.Limits(
            max_connections=self.pool, max_keepalive_connections=self.pool))
        return self

    async def __aexit__(self, *exc):
        await self.http.aclose()

    # ------------------------------------------------------------------------------------------- transport
    def _url(self, side: str, path: str) -> str:
        return (self.cloud_url if side == "cloud" else self.edge_url) + path

    async def _post(self, side: str, path: str, body: dict, tally: _Tally, reply: type[BaseModel], **expected):
        """One request with retries; its reply as `reply`, checked with `expected` (see protocol.py's replies)."""
        url = self._url(side, path)
        payload = json.dumps(body, separators=(",", ":")).encode()
        res = tally.result
        last = ""
        for attempt in range(self.max_retries + 1):
            if attempt:
                await asyncio.sleep(self.backoff_s * 2 ** (attempt - 1))
            t0 = time.perf_counter()
            try:
                if side == "cloud" and self.delay_s:
                    await asyncio.sleep(self.delay_s)
                resp = await self.http.post(url, content=payload)
            except httpx.TransportError as exc:
                last = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
                continue
            wall_ms = (time.perf_counter() - t0) * 1000
            res.bytes_sent += len(payload)
            res.bytes_received += len(resp.content)
            if resp.status_code in RETRIED_STATUS:
                last = f"answered {resp.status_code}: {error_of(resp)}"
                continue
            check_status(side, url, resp)
            answer = reply_of(side, url, resp, reply, {"vocab": self.vocab, **expected})
            res.network_latency_ms += max(wall_ms - answer.compute_ms, 0.0)
            if side == "cloud":
                res.cloud_calls += 1
                res.cloud_latency_ms += answer.compute_ms
            else:
                res.edge_calls += 1
                res.edge_latency_ms += answer.compute_ms
            return answer
        raise ServiceUnavailable(f"{side} server at {url} unreachable after {self.max_retries} retries ({last})")

    async def get_json(self, side: str, path: str) -> dict:
        """One GET (no retries); failures raise this module's errors, with the server's answer, not httpx's."""
        url = self._url(side, path)
        try:
            resp = await self.http.get(url)
        except httpx.TransportError as exc:
            raise ServiceUnavailable(f"{side} server at {url} unreachable ({type(exc).__name__}: {exc})") from None
        check_status(side, url, resp)
        return json_of(side, url, resp)

    async def server_stats(self) -> dict:
        """Each server's /stats, or {"error": ...} for one that does not answer (a server down is reported)."""
        out = {}
        for side in ("edge", "cloud"):
            try:
                out[side] = await self.get_json(side, "/stats")
            except (ServiceUnavailable, RequestRejected) as exc:
                out[side] = {"error": str(exc)}
        return out

    # ------------------------------------------------------------------------------------------- pipeline
    async def full_inference_pipeline(self, prompt: str, max_tokens: int | None = None,
                                      use_draft_verify: bool | None = None, use_confidence_check: bool | None = None,
                                      use_kv_cache: bool | None = None, mode: str = "collaborative",
                                      temperature: float | None = None) -> InferenceResult:
        self.last_result = None
        inf = self.cfg["inference"]
        feats = inf["features"]
        max_tokens = inf["max_tokens"] if max_tokens is None else max_tokens
        temperature = inf["temperature"] if temperature is None else temperature
        opts = {"verify": feats["use_draft_verify"] if use_draft_verify is None else use_draft_verify,
                "confidence": feats["use_confidence_check"] if use_confidence_check is None else use_confidence_check,
                "cache": feats["use_kv_cache"] if use_kv_cache is None else use_kv_cache,
                "temperature": temperature}
        if mode not in ("collaborative", "edge_only", "cloud_only"):
            raise UsageError(f"mode={mode!r}: expected collaborative, edge_only or cloud_only")
        prompt_ids = self.tokenizer.encode(prompt, add_special_tokens=False)
        if not prompt_ids:
            raise UsageError("prompt: empty after tokenization")
        tally = _Tally(InferenceResult(text="", token_ids=[], mode=mode))
        self.last_result = res = tally.result
        t0 = time.perf_counter()
        try:
            if mode == "collaborative":
                await self._collaborate(prompt_ids, max_tokens, opts, tally)
            else:
                await self._generate_alone("edge" if mode == "edge_only" else "cloud", prompt_ids, max_tokens,
                                           temperature, tally)
        except (ServiceUnavailable, RequestRejected) as exc:
            res.error = str(exc)
        except (KeyboardInterrupt, asyncio.CancelledError):
            res.interrupted, res.error = True, "interrupted"
            raise
        finally:
            self._summarize(tally, t0)
        return res

    def _summarize(self, tally: _Tally, t0: float):
        res = tally.result
        res.text = self.tokenizer.decode(res.token_ids, skip_special_tokens=True)
        res.total_latency_ms = (time.perf_counter() - t0) * 1000
        res.acceptance_rate = res.accepted_tokens / res.draft_tokens if res.draft_tokens else 0.0
        res.confidence_score = sum(tally.confidences) / len(tally.confidences) if tally.confidences else 0.0

    def _commit(self, res: InferenceResult, tokens: list[int], max_tokens: int, unverified: bool = False):
        """Append `tokens` to the output up to max_tokens and the first EOS (kept): every mode ends the same way."""
        room = max(max_tokens - len(res.token_ids), 0)
        kept = tokens[:room]
        if self.eos_id in kept:
            kept = kept[: kept.index(self.eos_id) + 1]
        res.token_ids.extend(kept)
        res.dropped_tokens += len(tokens) - len(kept)
        if unverified:
            res.unverified_tokens += len(kept)

    def _done(self, out: list[int], max_tokens: int) -> bool:
        return len(out) >= max_tokens or (bool(out) and out[-1] == self.eos_id)  # _commit keeps EOS last

    async def _generate_alone(self, side: str, context: list[int], max_tokens: int, temperature: float,
                              tally: _Tally):
        """One /v1/generate call for the rest of the output (edge_only, cloud_only, the edge fallback)."""
        res = tally.result
        body = {"context_ids": context, "max_tokens": max_tokens - len(res.token_ids), "temperature": temperature}
        reply = await self._post(side, "/v1/generate", body, tally, GenerateResponse)
        self._commit(res, reply.token_ids, max_tokens, unverified=side == "edge")
        tally.confidences.extend(reply.confidences)
        res.rounds += 1

    async def _collaborate(self, prompt_ids: list[int], max_tokens: int, opts: dict, tally: _Tally):
        conf_cfg = self.cfg["edge"]["confidence"]
        gamma = int(self.cfg["edge"]["draft"]["max_draft_tokens"])
        accept_confident = opts["confidence"] and self.cfg["inference"]["features"]["accept_confident_drafts"]
        res = tally.result
        out = res.token_ids  # committed tokens; a failure keeps them
        temperature = opts["temperature"]
        while not self._done(out, max_tokens):
            res.rounds += 1
            context = prompt_ids + out
            want = min(gamma, max_tokens - len(out))
            draft = await self._post("edge", "/v1/draft", {
                "context_ids": context, "max_draft": want, "temperature": temperature,
                "confidence_threshold": conf_cfg["threshold"] if opts["confidence"] else None,
                "use_cache": opts["cache"], "return_dists": temperature > 0 and opts["verify"],
                "seed": None}, tally, DraftResponse, max_draft=want)
            drafts = draft.draft_ids
            tally.confidences.extend(draft.confidences)
            if accept_confident and len(drafts) == want and min(draft.confidences, default=0) >= \
                    conf_cfg["accept_threshold"]:
                self._commit(res, drafts, max_tokens, unverified=True)  # lossy: no verification
                continue
            if not opts["verify"] and drafts and not draft.stopped_low_confidence:
                # no draft/verify: confident drafts are final, the cloud decides the rest
                self._commit(res, drafts, max_tokens, unverified=True)
                continue
            if opts["verify"]:
                body = {"context_ids": context, "draft_ids": drafts, "draft_probs": draft.draft_probs,
                        "draft_dists": draft.draft_dists}
            else:  # the drafts before the low-confidence stop are final; the cloud decides the next token
                self._commit(res, drafts, max_tokens, unverified=True)
                if self._done(out, max_tokens):
                    break
                body = {"context_ids": prompt_ids + out, "draft_ids": [], "draft_probs": [], "draft_dists": None}
            body.update(temperature=temperature, use_cache=opts["cache"])
            try:
                verdict = await self._post("cloud", "/v1/verify", body, tally, VerifyResponse,
                                           drafted=len(body["draft_ids"]))
            except ServiceUnavailable as exc:
                if not self.cfg["communication"]["fallback_to_edge"]:
                    raise
                return await self._edge_fallback(prompt_ids, max_tokens, temperature, tally, str(exc))
            if opts["verify"]:
                res.draft_tokens += len(drafts)
                res.accepted_tokens += verdict.accepted
                self._commit(res, drafts[: verdict.accepted], max_tokens)
            if not self._done(out, max_tokens):  # after an accepted EOS, or at max_tokens, the cloud's token is moot
                self._commit(res, [verdict.next_token], max_tokens)
            res.reused_cloud_tokens += verdict.reused_tokens

    async def _edge_fallback(self, prompt_ids, max_tokens, temperature, tally, why: str):
        tally.result.edge_fallback = True
        tally.result.error = f"cloud failed, finished on the edge (edge_fallback): {why}"
        if not self._done(tally.result.token_ids, max_tokens):
            await self._generate_alone("edge", prompt_ids + tally.result.token_ids, max_tokens, temperature, tally)
