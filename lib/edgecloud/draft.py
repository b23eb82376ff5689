"""Edge side: draft tokens with llama.cpp over a GGUF model, scored by confidence, reusing cached llama.cpp states."""
from __future__ import annotations

import threading
import time

import numpy as np

from lib.edgecloud.confidence import ConfidenceCalculator
from lib.edgecloud.kv_cache import EdgeStateCache, common_prefix
from lib.edgecloud.protocol import DraftRequest, DraftResponse
from lib.gguf_export import load_llama


def softmax(logits: np.ndarray, temperature: float) -> np.ndarray:
    z = logits.astype(np.float64) / (temperature if temperature > 0 else 1.0)
    z = np.exp(z - z.max())
    return z / z.sum()


class EdgeDrafter:
    """One llama.cpp context; requests are served one at a time (llama.cpp contexts are not thread-safe)."""

    def __init__(self, gguf_path, calculator: ConfidenceCalculator, eos_ids=(), n_ctx: int = 2048,
                 n_threads: int = 1, cache_size: int = 16, seed: int = 0, label: str = ""):
        self.llm = load_llama(gguf_path, n_ctx=n_ctx, n_threads=n_threads, label=label)
        self.calculator, self.eos_ids = calculator, set(eos_ids)
        self.cache = EdgeStateCache(cache_size)
        self.vocab = self.llm.n_vocab()
        self.context = self.llm.n_ctx()
        self.rng = np.random.default_rng(seed)
        self.lock = threading.Lock()
        self.counters = {"requests": 0, "drafted_tokens": 0, "evaluated_tokens": 0, "reused_tokens": 0,
                         "low_confidence_stops": 0}

    def _load_context(self, context: list[int], use_cache: bool) -> int:
        """Make llama.cpp hold `context` with logits for its last token; returns the tokens reused.

        Reuse comes from the live context (the previous request's tokens) or, when an LRU entry shares more,
        from that saved state."""
        keep = 0
        if use_cache:
            keep = common_prefix(self.llm.input_ids[: self.llm.n_tokens], context)
            if self.cache.max_size:
                shared, state = self.cache.lookup(context)
                if state is not None and shared > keep:
                    self.llm.load_state(state)
                    keep = shared
            keep = min(keep, len(context) - 1)  # re-evaluate at least the last token for its logits
        self.llm.n_tokens = keep  # eval() removes KV entries from here on
        self.llm.eval(context[keep:])
        self.counters["evaluated_tokens"] += len(context) - keep
        self.counters["reused_tokens"] += keep
        return keep

    def draft(self, req: DraftRequest) -> DraftResponse:
        with self.lock:
            t0 = time.perf_counter()
            rng = np.random.default_rng(req.seed) if req.seed is not None else self.rng
            reused = self._load_context(list(req.context_ids), req.use_cache)
            out = DraftResponse(draft_ids=[], draft_probs=[], confidences=[],
                                draft_dists=[] if req.return_dists else None, reused_tokens=reused)
            for i in range(req.max_draft):
                logits = self.llm.scores[self.llm.n_tokens - 1]
                probs = softmax(logits, req.temperature)
                token = int(rng.choice(len(probs), p=probs)) if req.temperature > 0 else int(np.argmax(logits))
                # confidence is judged on the untempered distribution (softmax uses T=1 when greedy)
                plain = probs if req.temperature <= 0 or req.temperature == 1 else softmax(logits, 1.0)
                confidence = self.calculator.score(plain)
                if req.confidence_threshold is not None and confidence < req.confidence_threshold:
                    out.stopped_low_confidence = True
                    self.counters["low_confidence_stops"] += 1
                    break
                out.draft_ids.append(token)
                out.draft_probs.append(float(probs[token]) if req.temperature > 0 else 1.0)
                out.confidences.append(round(confidence, 6))
                if req.return_dists:
                    out.draft_dists.append(probs.astype(np.float32).tolist())
                if token in self.eos_ids or i == req.max_draft - 1:
                    break
                self.llm.eval([token])
            if req.use_cache and self.cache.max_size:
                self.cache.put(self.llm.input_ids[: self.llm.n_tokens].tolist(), self.llm.save_state())
            self.counters["requests"] += 1
            self.counters["drafted_tokens"] += len(out.draft_ids)
            out.compute_ms = (time.perf_counter() - t0) * 1000
            return out

    def stats(self) -> dict:
        return {**self.counters, "kv_cache": self.cache.stats.to_json()}
