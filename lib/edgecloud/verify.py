"""Cloud side: verify a whole draft in one target forward pass, with the block prefix cache.

The model steps (forward, commit, probabilities, sample) are lib/decoding/chain.py's; `accept_drafts` is the
Leviathan rule for one row with the draft distributions the edge shipped (one-hot drafts when greedy, so greedy
verification keeps exactly the target's argmax tokens). Nothing follows an EOS: drafts after the first EOS draft
are not verified, so `accepted` never counts past it.
"""
from __future__ import annotations

import threading
import time

import torch

from lib.decoding.chain import KVState, autoregressive_generate, commit, forward, probabilities, sample
from lib.edgecloud.kv_cache import BlockPrefixCache
from lib.edgecloud.protocol import GenerateRequest, GenerateResponse, VerifyRequest, VerifyResponse, check_vocab
from lib.errors import UsageError
from lib.models import eos_ids_of, load_model


def accept_drafts(p: torch.Tensor, q: torch.Tensor, drafts: torch.Tensor, generator) -> tuple[int, int]:
    """p [g+1, V] target, q [g, V] draft distributions, drafts [g] -> (accepted count, next token)."""
    gamma = len(drafts)
    if gamma:
        ratio = (p[:gamma].gather(-1, drafts[:, None])[:, 0] / q.gather(-1, drafts[:, None])[:, 0].clamp(min=1e-30))
        uniform = torch.rand(gamma, generator=generator, device=p.device)
        n = int((uniform < ratio.clamp(max=1.0)).long().cumprod(0).sum())
    else:
        n = 0
    p_next = p[n]
    if n < gamma:  # after a rejection: sample from max(0, p - q)
        residual = (p_next - q[n]).clamp(min=0)
        p_next = residual if residual.sum() > 0 else p_next
    return n, int(sample(p_next / p_next.sum(), generator))


class BaseVerifier:
    """What the HF and vLLM cloud verifiers share: the vocabulary check, the EOS cut, one lock, the counters behind
    /stats."""

    def __init__(self, vocab: int, context: int | None, eos_ids):
        self.vocab = vocab
        self.context = context  # tokens a sequence may hold (the HTTP layer refuses longer requests with a 422)
        self.eos_ids = set(eos_ids)
        self.lock = threading.Lock()
        self.counters = {"verify_requests": 0, "generate_requests": 0, "draft_tokens": 0, "accepted_tokens": 0,
                         "fed_tokens": 0}

    def check_ids(self, ids, what: str):
        check_vocab(ids, self.vocab, what)

    def drafts_to_verify(self, draft_ids) -> list[int]:
        """The drafts up to and including the first EOS."""
        drafts = list(draft_ids)
        end = next((i + 1 for i, token in enumerate(drafts) if token in self.eos_ids), len(drafts))
        return drafts[:end]

    def count_verify(self, drafted: int, accepted: int, fed: int):
        self.counters["verify_requests"] += 1
        self.counters["draft_tokens"] += drafted
        self.counters["accepted_tokens"] += accepted
        self.counters["fed_tokens"] += fed

    def prefix_cache_stats(self) -> dict:
        raise NotImplementedError

    def stats(self) -> dict:
        acc = self.counters["accepted_tokens"] / self.counters["draft_tokens"] if self.counters["draft_tokens"] else 0
        return {**self.counters, "acceptance_rate": round(acc, 4), "prefix_cache": self.prefix_cache_stats()}


class CloudVerifier(BaseVerifier):
    def __init__(self, target_dir, device: str = "cpu", dtype: str = "float32", block_size: int = 16,
                 max_blocks: int = 4096, seed: int = 0):
        self.model = load_model(target_dir, dtype, device)
        super().__init__(self.model.config.vocab_size, getattr(self.model.config, "max_position_embeddings", None),
                         eos_ids_of(self.model))
        self.device = device
        self.cache = BlockPrefixCache(block_size, max_blocks)
        self.generator = torch.Generator(device=device).manual_seed(seed)

    def _draft_dists(self, req: VerifyRequest, drafts: torch.Tensor) -> torch.Tensor:
        """q [len(drafts), V]; the request's rows were checked (one per draft, V long, summing to 1)."""
        if req.temperature <= 0:
            return torch.nn.functional.one_hot(drafts, self.vocab).float()
        if req.draft_dists is None and req.draft_ids:  # none needed without drafts (no_draft_verify)
            raise UsageError("draft_dists: temperature > 0 needs one draft distribution per draft token")
        rows = (req.draft_dists or [])[: len(drafts)]
        q = torch.tensor(rows, dtype=torch.float32, device=self.device).reshape(len(drafts), self.vocab)
        return q / q.sum(-1, keepdim=True)

    @torch.inference_mode()
    def verify(self, req: VerifyRequest) -> VerifyResponse:
        self.check_ids(req.context_ids, "context_ids")
        self.check_ids(req.draft_ids, "draft_ids")
        context, drafts_list = list(req.context_ids), self.drafts_to_verify(req.draft_ids)
        drafts = torch.tensor(drafts_list, dtype=torch.long, device=self.device)
        q = self._draft_dists(req, drafts)
        with self.lock:
            t0 = time.perf_counter()
            reuse, state = self.cache.take(context) if req.use_cache else (0, None)
            keep = min(reuse, len(context) - 1)
            if state is None or keep == 0:
                state, keep = KVState.empty(1, self.device), 0
            else:
                commit(state, state.mask.shape[1], torch.tensor([keep], device=self.device))
            feed = context[keep:] + drafts_list
            logits = forward(self.model, state, torch.tensor([feed], device=self.device))[0, -(len(drafts_list) + 1):]
            n, next_token = accept_drafts(probabilities(logits, req.temperature), q, drafts, self.generator)
            commit(state, len(feed), torch.tensor([len(feed) - len(drafts_list) + n], device=self.device))
            if req.use_cache:
                self.cache.put(context + drafts_list[:n], state)
            self.count_verify(len(drafts_list), n, len(feed))
            return VerifyResponse(accepted=n, next_token=next_token, reused_tokens=keep, fed_tokens=len(feed),
                                  compute_ms=(time.perf_counter() - t0) * 1000)

    @torch.inference_mode()
    def generate(self, req: GenerateRequest) -> GenerateResponse:
        """Cloud-only AR decoding (the reference output and the cloud_only experiment)."""
        self.check_ids(req.context_ids, "context_ids")
        with self.lock:
            t0 = time.perf_counter()
            generator = self.generator if req.seed is None else \
                torch.Generator(device=self.device).manual_seed(req.seed)  # a seeded request repeats itself
            gen = autoregressive_generate(self.model, [list(req.context_ids)], req.max_tokens, req.temperature,
                                          self.eos_ids, generator=generator)
            self.counters["generate_requests"] += 1
            return GenerateResponse(token_ids=gen.tokens[0], compute_ms=(time.perf_counter() - t0) * 1000)

    def prefix_cache_stats(self) -> dict:
        return self.cache.stats.to_json()
