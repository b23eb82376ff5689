"""llama.cpp engine (llama-cpp-python): target-only decoding and llama.cpp's own speculative decoding.

The HF folders of TARGET_MODEL / DRAFTER_MODEL are exported to f32 GGUF once (lib/gguf_export.py, cached) and run
with an f32 KV cache, so greedy output equals transformers'. Tokens are streamed from `Llama.generate`, one
timestamp per token (accepted drafts arrive in bursts).

Speculative mode passes a `LlamaDraftModel` to `Llama(draft_model=...)`: the GGUF draft (through the edge's
drafter, lib/edgecloud/draft.py) proposes GAMMA_VALUE greedy tokens; llama.cpp evaluates them in one batch,
samples the target at every position and keeps drafts while they equal the sampled token (so output follows the
target's distribution; greedy output equals AR). llama.cpp reports no acceptance, so we count it ourselves: the
draft model sees the committed tokens at its next call, and the drafts of the previous call that appear there
(common prefix) were accepted; the last round is settled against the request's final output, counting only
the drafts that fit inside it.

Greedy runs with LOSSLESS_CHECK on read the target's top-2 logits of each token as it is yielded (for the
losslessness verdict): target-only from the context's last logits, speculative from llama-cpp-python's per-position
scores (a draft model makes it keep every position's logits).
"""
from __future__ import annotations

import os

import numpy as np

from lib.engines.base import Engine, record_from_tokens
from lib.errors import EngineUnavailable, UsageError
from lib.models import load_tokenizer
from lib.types import Clock, Request, RequestRecord, SpecCounters

INSTALL_HINT = ("pip install -r requirements/edge.txt (compiles llama-cpp-python, 7-9 min; "
                "CMAKE_ARGS=-DGGML_NATIVE=OFF for a portable build)")


def default_threads() -> int:
    cores = os.cpu_count() or 1
    return 1 if cores <= 2 else cores // 2


def _draft_model_base():
    try:
        from llama_cpp.llama_speculative import LlamaDraftModel
    except ModuleNotFoundError:
        raise EngineUnavailable(f"INFERENCE_ENGINE=llamacpp: llama-cpp-python is not installed; {INSTALL_HINT}") \
            from None
    return LlamaDraftModel


def make_counting_draft(drafter, gamma: int):
    """A LlamaDraftModel over an EdgeDrafter that counts proposed and accepted draft tokens."""
    from lib.edgecloud.kv_cache import common_prefix
    from lib.edgecloud.protocol import DraftRequest

    class CountingDraftModel(_draft_model_base()):
        def __init__(self):
            self.begin()

        def begin(self):
            self.counters = SpecCounters(accepted_per_position=[0] * gamma)
            self.pending: list[int] = []
            self.pending_at = 0

        def settle(self, committed, final: bool = False) -> None:
            if final:  # drafts past the end of the output were never verified: not counted
                self.pending = self.pending[: max(len(committed) - self.pending_at, 0)]
            if not self.pending:
                return
            n = common_prefix(self.pending, committed[self.pending_at: self.pending_at + len(self.pending)])
            c = self.counters
            c.num_drafts += 1
            c.draft_tokens += len(self.pending)
            c.accepted_tokens += n
            for pos in range(n):
                c.accepted_per_position[pos] += 1
            self.pending = []

        def __call__(self, input_ids, /, **kwargs):
            ids = [int(t) for t in input_ids]
            self.settle(ids)
            req = DraftRequest.model_construct(context_ids=ids, max_draft=gamma)  # greedy, no early stop
            self.pending, self.pending_at = drafter.draft(req).draft_ids, len(ids)
            return np.array(self.pending, dtype=np.intc)

    return CountingDraftModel()


def context_size(cfg) -> int:
    return max(512, cfg.max_batch_length, 2 * cfg.generation_length + 1024)


class LlamaCppEngine(Engine):
    name = "llamacpp"

    @classmethod
    def context_length(cls, cfg, method: str, models) -> tuple[int, str]:
        return context_size(cfg), "llama.cpp's n_ctx: the larger of 512, MAX_BATCH_LENGTH, 2 x GENERATION_LENGTH + 1024"

    def start(self):
        _draft_model_base()
        import llama_cpp

        from lib.edgecloud.confidence import AblatedConfidenceCalculator
        from lib.edgecloud.draft import EdgeDrafter
        from lib.gguf_export import ensure_gguf, load_llama
        self.version = llama_cpp.__version__
        self.threads = self.cfg.llamacpp_n_threads or default_threads()
        self.tokenizer = load_tokenizer(self.models.target)
        self.eos_id = self.tokenizer.eos_token_id
        n_ctx = context_size(self.cfg)
        self.wants_top2 = self.cfg.temperature <= 0 and self.cfg.lossless_check != "off"
        role = "DRAFTER_MODEL" if self.method == "draft" else "TARGET_MODEL"  # draft: the draft run as a target
        self.target_path = ensure_gguf(self.target_folder, role)
        self.draft = None
        if self.method == "speculative":
            self.draft_path = ensure_gguf(self.models.draft, "DRAFTER_MODEL")
            drafter = EdgeDrafter(self.draft_path, AblatedConfidenceCalculator(), eos_ids={self.eos_id},
                                  n_ctx=n_ctx, n_threads=self.threads, cache_size=0,
                                  label=f"DRAFTER_MODEL's GGUF export {self.draft_path}")
            self.draft = make_counting_draft(drafter, self.cfg.gamma_value)
        self.llm = load_llama(self.target_path, n_ctx=n_ctx, n_threads=self.threads, logits_all=False,
                              label=f"{role}'s GGUF export {self.target_path}", draft_model=self.draft,
                              seed=self.cfg.seed)
        if self.draft is not None and drafter.vocab != self.llm.n_vocab():
            raise UsageError(f"DRAFTER_MODEL={self.models.draft}: vocabulary {drafter.vocab} differs from the "
                             f"target's {self.llm.n_vocab()}")

    def describe(self) -> dict:
        return {"engine": self.name, "method": self.method, "llama_cpp_python": self.version,
                "n_threads": self.threads, "model": str(self.target_folder), "target_gguf": self.target_path.name,
                "gamma": self.cfg.gamma_value if self.draft is not None else None, "kv_cache_type": "f32"}

    def weight_bytes(self) -> int:
        paths = [self.target_path] + ([self.draft_path] if self.draft is not None else [])
        return sum(p.stat().st_size for p in paths)

    def generate_batch(self, requests: list[Request], clock: Clock) -> list[RequestRecord]:
        return [self._generate_one(r, clock) for r in requests]  # llama.cpp here decodes one sequence at a time

    def _generate_one(self, request: Request, clock: Clock) -> RequestRecord:
        start = clock.now()
        if self.draft is not None:
            self.draft.begin()
        out, times, reason = [], [], "length"
        stream = self.llm.generate(request.prompt_ids, temp=self.cfg.temperature, top_k=0, top_p=1.0, min_p=0.0,
                                   repeat_penalty=1.0, reset=True)
        tops = [] if self.wants_top2 else None
        for token in stream:
            out.append(int(token))
            times.append(clock.now())
            if tops is not None:  # the token was chosen from the logits at the position before it
                tops.append(self._top2(len(request.prompt_ids) + len(out) - 2))
            if token == self.eos_id:
                reason = "stop"
                break
            if len(out) >= request.max_new_tokens:
                break
        stream.close()
        spec = None
        if self.draft is not None:
            self.draft.settle(list(request.prompt_ids) + out, final=True)
            spec = self.draft.counters
        record = record_from_tokens(request, out, times, start, reason, self.tokenizer, spec)
        if tops:
            record.top2_margin, record.top_logit = [t[0] for t in tops], [t[1] for t in tops]
        return record

    def _top2(self, position: int) -> tuple[float, float]:
        """(top-1 minus top-2, top-1) of the target's logits that chose the token after `position`, read while the
        generator is paused at that token."""
        if self.draft is not None:  # every position's logits (llama-cpp-python keeps them with a draft model)
            logits = self.llm.scores[position]
        else:  # the last decode's logits: those of the token just sampled
            logits = np.ctypeslib.as_array(self.llm._ctx.get_logits(), shape=(self.llm.n_vocab(),))
        second, first = np.partition(logits, -2)[-2:]
        return float(first - second), float(first)
