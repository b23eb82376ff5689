"""Cloud side on vLLM (cloud.model.engine: vllm): verify a draft with one prefill of context + drafts.

vLLM scores every prompt position when asked for prompt logprobs: draft i is the target's greedy token exactly
when its rank there is 1, and the top-1 entry at the first rejected position is the correction; when every draft
is accepted, the one token vLLM generates is the bonus. vLLM's automatic prefix caching plays the role of the HF
verifier's block prefix cache (its hits are vLLM's `num_cached_tokens`). Greedy only: sampled verification needs
the target's full distribution at every position, which the HF verifier has and vLLM's logprobs do not give cheaply.
"""
from __future__ import annotations

import time

from lib.edgecloud.protocol import GenerateRequest, GenerateResponse, VerifyRequest, VerifyResponse
from lib.edgecloud.verify import BaseVerifier
from lib.errors import UsageError
from lib.vllm_support import import_vllm, prepare_cpu_environment


def greedy_verdict(prompt_logprobs: list, first_draft: int, drafts: list[int]) -> tuple[int, int | None]:
    """(accepted count, correction token or None when all drafts are accepted) from vLLM's prompt logprobs.

    prompt_logprobs[i] maps token id -> Logprob(rank) for prompt position i; the drafts sit at first_draft...
    """
    for i, token in enumerate(drafts):
        scored = prompt_logprobs[first_draft + i]
        if scored[token].rank != 1:
            return i, next(t for t, lp in scored.items() if lp.rank == 1)
    return len(drafts), None


class VLLMCloudVerifier(BaseVerifier):
    def __init__(self, target_dir, dtype: str = "float32", max_model_len: int | None = None, seed: int = 0,
                 gpu_memory_utilization: float = 0.9):
        on_cpu = prepare_cpu_environment()
        self.vllm = import_vllm()
        try:
            self.llm = self.vllm.LLM(model=str(target_dir), dtype=dtype, enforce_eager=on_cpu, seed=seed,
                                     max_model_len=max_model_len, enable_prefix_caching=True,
                                     gpu_memory_utilization=gpu_memory_utilization)
        except ValueError as exc:  # vLLM's config validation
            raise UsageError(f"cloud.model: vLLM rejected the configuration: {str(exc).strip().splitlines()[0]}") \
                from None
        model_config = self.llm.llm_engine.model_config
        super().__init__(model_config.get_vocab_size(), model_config.max_model_len,
                         {self.llm.get_tokenizer().eos_token_id} - {None})
        self.counters["prefix_cached_tokens"] = 0
        self.device = "cpu" if on_cpu else "cuda"

    def _run(self, token_ids: list[int], params):
        return self.llm.generate([{"prompt_token_ids": token_ids}], params, use_tqdm=False)[0]

    def verify(self, req: VerifyRequest) -> VerifyResponse:
        if req.temperature > 0:
            raise UsageError("temperature: the vLLM verifier (cloud.model.engine: vllm) verifies greedy drafts only "
                             "(temperature 0); use cloud.model.engine: hf for sampled verification")
        self.check_ids(req.context_ids, "context_ids")
        self.check_ids(req.draft_ids, "draft_ids")
        context, drafts = list(req.context_ids), self.drafts_to_verify(req.draft_ids)
        params = self.vllm.SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=1 if drafts else None)
        with self.lock:
            t0 = time.perf_counter()
            out = self._run(context + drafts, params)
            accepted, correction = greedy_verdict(out.prompt_logprobs, len(context), drafts) if drafts else (0, None)
            next_token = out.outputs[0].token_ids[0] if correction is None else correction
            cached = out.num_cached_tokens or 0
            fed = len(context) + len(drafts) - cached
            self.count_verify(len(drafts), accepted, fed)
            self.counters["prefix_cached_tokens"] += cached
            return VerifyResponse(accepted=accepted, next_token=next_token, reused_tokens=cached, fed_tokens=fed,
                                  compute_ms=(time.perf_counter() - t0) * 1000)

    def generate(self, req: GenerateRequest) -> GenerateResponse:
        """Cloud-only decoding on vLLM (the reference output and the cloud_only experiment)."""
        self.check_ids(req.context_ids, "context_ids")
        params = self.vllm.SamplingParams(max_tokens=req.max_tokens, temperature=req.temperature, seed=req.seed)
        with self.lock:
            t0 = time.perf_counter()
            out = self._run(list(req.context_ids), params)
            self.counters["generate_requests"] += 1
            return GenerateResponse(token_ids=list(out.outputs[0].token_ids),
                                    compute_ms=(time.perf_counter() - t0) * 1000)

    def prefix_cache_stats(self) -> dict:
        return {"kind": "vLLM automatic prefix caching", "reused_tokens": self.counters["prefix_cached_tokens"]}
