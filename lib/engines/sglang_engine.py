"""SGLang engine: EAGLE / draft-model speculative decoding through `sglang.Engine` (offline, in-process).

Two uses: run_sglang_config.py (the logits comparison: the seed's config -> ServerArgs mapping, top-k logprobs
per token -> a capture) and INFERENCE_ENGINE=sglang in run_benchmark.sh (the Engine interface).
SGLang needs an NVIDIA GPU and its CUDA kernel package; it is not exercised on CPU-only machines (no CPU wheel
of sgl-kernel exists). Field names follow sglang 0.5.x: ServerArgs speculative_algorithm, speculative_draft_model_
path, speculative_num_steps, speculative_eagle_topk, speculative_num_draft_tokens; Engine.generate(...,
return_logprob=True, top_logprobs_num=K) -> meta_info output_token_logprobs / output_top_logprobs as
(logprob, token_id, text) tuples, spec_verify_ct, spec_accept_length.
"""
from __future__ import annotations

import numpy as np

from lib.capture import PromptCapture
from lib.engines.base import Clock, Engine, Request, RequestRecord, SpecCounters, record_from_tokens
from lib.errors import EngineUnavailable, UsageError

INSTALL_HINT = ("sglang is not installed: on a machine with an NVIDIA GPU run scripts/ensure_env.sh sglang "
                "(requirements/sglang.txt); it has no CPU build")


def import_sglang():
    try:
        import sglang
    except ImportError:
        raise EngineUnavailable(INSTALL_HINT) from None
    return sglang


def comparison_engine_args(cfg, target_path, draft_path) -> dict:
    """The seed's mapping: spec_num_iter -> speculative_num_steps, spec_tree_size -> speculative_num_draft_tokens,
    get_topk_per_iter() -> speculative_eagle_topk; EAGLE for an EAGLE head, STANDALONE for a draft model."""
    return {
        "model_path": str(target_path),
        "speculative_algorithm": "EAGLE" if cfg.draft_type == "eagle" else "STANDALONE",
        "speculative_draft_model_path": str(draft_path),
        "speculative_num_steps": cfg.spec_num_iter,
        "speculative_eagle_topk": cfg.get_topk_per_iter(),
        "speculative_num_draft_tokens": cfg.spec_tree_size,
        "mem_fraction_static": cfg.memory_limit,
        "chunked_prefill_size": cfg.chunk_length,
        "disable_cuda_graph": not cfg.cuda_graph,
        "random_seed": 0,
    }


def comparison_sampling(cfg) -> dict:
    """Keyword arguments of Engine.generate for one comparison prompt (greedy, top-k logprobs per token)."""
    return {"sampling_params": {"temperature": 0.0, "max_new_tokens": cfg.comparison_steps},
            "return_logprob": True, "top_logprobs_num": cfg.capture_topk}


def _top_row(entries, k: int) -> tuple[np.ndarray, np.ndarray]:
    ids = np.zeros(k, dtype=np.int64)
    values = np.full(k, -np.inf, dtype=np.float32)
    ranked = sorted(((float(e[0]), int(e[1])) for e in entries if e[0] is not None), key=lambda e: -e[0])[:k]
    for col, (logprob, token) in enumerate(ranked):
        ids[col], values[col] = token, logprob
    return ids, values


def prompt_capture_from_output(prompt: str, prompt_ids: list[int], output: dict, k: int) -> PromptCapture:
    """One Engine.generate result (dict with output_ids / text / meta_info) -> a PromptCapture."""
    try:
        meta = output["meta_info"]
        token_logprobs = meta["output_token_logprobs"]
        top = meta["output_top_logprobs"]
    except (KeyError, TypeError) as exc:
        raise UsageError(f"SGLang output lacks {exc} (generate with return_logprob=True, top_logprobs_num=K)") \
            from None
    tokens = [int(entry[1]) for entry in token_logprobs]
    if output.get("output_ids") is not None and list(output["output_ids"])[-len(tokens):] != tokens:
        raise UsageError("SGLang output: output_ids and output_token_logprobs disagree")
    if len(top) != len(tokens):
        raise UsageError(f"SGLang output: {len(top)} top-logprob rows for {len(tokens)} tokens")
    rows = [_top_row(entries or [], k) for entries in top]
    ids = np.stack([r[0] for r in rows]) if rows else np.zeros((0, k), dtype=np.int64)
    values = np.stack([r[1] for r in rows]) if rows else np.zeros((0, k), dtype=np.float32)
    verify = int(meta.get("spec_verify_ct", 0) or 0)
    completion = int(meta.get("completion_tokens", len(tokens)))
    spec = {}
    if verify:
        # every verification emits its accepted drafts plus one target token
        spec = {"num_drafts": verify, "accepted_tokens": completion - verify, "draft_tokens": 0,
                "accepted_per_position": [], "spec_accept_length": meta.get("spec_accept_length")}
    return PromptCapture(prompt, list(prompt_ids), tokens, ids, values, text=output.get("text", ""), spec=spec,
                         seconds=float(meta.get("e2e_latency", 0.0) or 0.0))


class SGLangEngine(Engine):
    """INFERENCE_ENGINE=sglang: GAMMA_VALUE drafts per round in a chain (topk 1, gamma + 1 verified tokens)."""
    name = "sglang"

    def engine_args(self) -> dict:
        args = {"model_path": str(self.models.target), "random_seed": self.cfg.seed,
                "max_running_requests": self.batch_size}
        if self.method == "speculative" and self.models.draft is not None:
            from lib.spec.eagle import is_eagle_folder
            args.update(speculative_algorithm="EAGLE" if is_eagle_folder(self.models.draft) else "STANDALONE",
                        speculative_draft_model_path=str(self.models.draft),
                        speculative_num_steps=self.cfg.gamma_value, speculative_eagle_topk=1,
                        speculative_num_draft_tokens=self.cfg.gamma_value + 1)
        return args

    def start(self):
        sglang = import_sglang()
        from lib.models import load_tokenizer
        self.tokenizer = load_tokenizer(self.models.target)
        self.engine = sglang.Engine(**self.engine_args())
        self.version = sglang.__version__

    def describe(self) -> dict:
        return {"engine": self.name, "method": self.method, "sglang": getattr(self, "version", None),
                **{k: v for k, v in self.engine_args().items() if k.startswith("speculative")}}

    def stop(self):
        if getattr(self, "engine", None) is not None:
            self.engine.shutdown()

    def generate_batch(self, requests: list[Request], clock: Clock) -> list[RequestRecord]:
        """Streams one request at a time (real per-token times); batches go through one non-streamed call."""
        start = clock.now()
        params = [{"temperature": self.cfg.temperature, "max_new_tokens": r.max_new_tokens} for r in requests]
        if len(requests) == 1:
            return [self._stream_one(requests[0], params[0], clock, start)]
        outputs = self.engine.generate(input_ids=[r.prompt_ids for r in requests], sampling_params=params)
        done = clock.now()  # a non-streamed batch has one completion time for every token
        return [self._record(r, out, [done] * len(out["output_ids"]), start) for r, out in zip(requests, outputs)]

    def _stream_one(self, request: Request, params: dict, clock: Clock, start: float) -> RequestRecord:
        times, last = [], None
        for chunk in self.engine.generate(input_ids=request.prompt_ids, sampling_params=params, stream=True):
            now = clock.now()
            times += [now] * (len(chunk["output_ids"]) - len(times))
            last = chunk
        return self._record(request, last, times, start)

    def _record(self, request: Request, out: dict, times: list[float], start: float) -> RequestRecord:
        meta = out["meta_info"]
        ids = list(out["output_ids"])
        reason = (meta.get("finish_reason") or {}).get("type", "length")
        spec = None
        verify = int(meta.get("spec_verify_ct", 0) or 0)
        if verify:
            accepted = len(ids) - verify
            spec = SpecCounters(verify, verify * self.cfg.gamma_value, accepted, [])
        return record_from_tokens(request, ids, times[: len(ids)], start, "stop" if reason == "stop" else reason,
                                  self.tokenizer, spec)
