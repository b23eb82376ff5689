"""SGLang engine (INFERENCE_ENGINE=sglang in run_benchmark.sh): EAGLE / draft-model speculative decoding through
`sglang.Engine` (offline, in-process) behind the engine interface.

SGLang needs an NVIDIA GPU and its CUDA kernel package; it is not exercised on CPU-only machines (no CPU wheel
of sgl-kernel exists). Field names follow sglang 0.5.x: ServerArgs speculative_algorithm, speculative_draft_model_
path, speculative_num_steps, speculative_eagle_topk, speculative_num_draft_tokens; meta_info spec_verify_ct.
The logits comparison's SGLang run is lib/capture_runs/sglang.py.
"""
from __future__ import annotations

from lib.engines.base import Engine, record_from_tokens
from lib.sglang_support import import_sglang, spec_counters_from_meta
from lib.types import Clock, Request, RequestRecord


class SGLangEngine(Engine):
    """INFERENCE_ENGINE=sglang: GAMMA_VALUE drafts per round in a chain (topk 1, gamma + 1 verified tokens)."""
    name = "sglang"

    @property
    def num_draft_tokens(self) -> int:
        """Tokens SGLang verifies per round: the chain's GAMMA_VALUE drafts and its root."""
        return self.cfg.gamma_value + 1

    def engine_args(self) -> dict:
        args = {"model_path": str(self.models.target), "random_seed": self.cfg.seed,
                "max_running_requests": self.batch_size}
        if self.method == "speculative" and self.models.draft is not None:
            from lib.decoding.eagle import is_eagle_folder
            args.update(speculative_algorithm="EAGLE" if is_eagle_folder(self.models.draft) else "STANDALONE",
                        speculative_draft_model_path=str(self.models.draft),
                        speculative_num_steps=self.cfg.gamma_value, speculative_eagle_topk=1,
                        speculative_num_draft_tokens=self.num_draft_tokens)
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
        spec = spec_counters_from_meta(meta, self.num_draft_tokens, len(ids))
        return record_from_tokens(request, ids, times[: len(ids)], start, "stop" if reason == "stop" else reason,
                                  self.tokenizer, spec)
