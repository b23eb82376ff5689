"""PyTorch/transformers engine: the project's own AR and speculative decoding loops (lib/spec/chain.py)."""
from __future__ import annotations

import torch

from lib.engines.base import Clock, Engine, Request, RequestRecord, SpecCounters, record_from_tokens
from lib.models import load_model, load_tokenizer
from lib.spec.chain import autoregressive_generate, speculative_generate


def pick_device_and_dtype(dtype: str) -> tuple[str, str]:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype == "auto":
        dtype = "bfloat16" if device == "cuda" else "float32"
    return device, dtype


class HFEngine(Engine):
    name = "hf"

    def start(self):
        self.device, self.dtype = pick_device_and_dtype(self.cfg.dtype)
        self.tokenizer = load_tokenizer(self.models.target)
        self.target = load_model(self.models.target, self.dtype, self.device)
        self.draft = None
        if self.method == "speculative":
            self.draft = load_model(self.models.draft, self.dtype, self.device)
            if self.draft.config.vocab_size != self.target.config.vocab_size:
                from lib.errors import UsageError
                raise UsageError(f"DRAFTER_MODEL={self.models.draft}: vocabulary size "
                                 f"{self.draft.config.vocab_size} differs from the target's "
                                 f"{self.target.config.vocab_size}; the draft must share the target's tokenizer")
        self.generator = torch.Generator(device=self.device).manual_seed(self.cfg.seed)
        eos = self.target.generation_config.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos]) - {None}
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0

    def describe(self) -> dict:
        return {"engine": self.name, "method": self.method, "device": self.device, "dtype": self.dtype,
                "torch": torch.__version__, "gamma": self.cfg.gamma_value if self.draft is not None else None}

    def weight_bytes(self) -> int:
        models = [self.target] + ([self.draft] if self.draft is not None else [])
        return sum(p.numel() * p.element_size() for m in models for p in m.parameters())

    def generate_batch(self, requests: list[Request], clock: Clock) -> list[RequestRecord]:
        start = clock.now()
        prompts = [r.prompt_ids for r in requests]
        max_new = max(r.max_new_tokens for r in requests)
        common = dict(temperature=self.cfg.temperature, eos_ids=self.eos_ids, pad_id=self.pad_id,
                      generator=self.generator)
        if self.draft is not None:
            gen = speculative_generate(self.target, self.draft, prompts, max_new, self.cfg.gamma_value, **common)
        else:
            gen = autoregressive_generate(self.target, prompts, max_new, **common)
        records = []
        for row, request in enumerate(requests):
            ids = gen.tokens[row][: request.max_new_tokens]
            times = [t - clock.t0 for t in gen.token_times[row][: len(ids)]]
            reason = gen.finish_reasons[row] if len(ids) == len(gen.tokens[row]) else "length"
            spec = None
            if gen.num_drafts:
                spec = SpecCounters(gen.num_drafts[row], gen.draft_tokens[row], gen.accepted_tokens[row],
                                    gen.accepted_per_position[row])
            records.append(record_from_tokens(request, ids, times, start, reason, self.tokenizer, spec))
        return records
