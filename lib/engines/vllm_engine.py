"""vLLM engine: vLLM's own scheduler, PagedAttention and native speculative decoding behind the engine interface.

Two ways in, chosen by the workload:
- fixed-count runs (every arrival is 0) go through the offline engine (`vllm.LLM`). We add the requests to its
  `LLMEngine` and drive `step()` ourselves with DELTA outputs, which is what `LLM.generate` does inside, so each
  new token gets its own timestamp (LLM.generate only returns finished requests).
- rate runs (some arrival > 0) go through the async engine (`AsyncLLM`, vLLM's serving engine): each request is
  submitted at its arrival and streamed, one timestamp per new token.
Greedy runs with LOSSLESS_CHECK on ask vLLM for the top-2 logits of every sampled token (logprobs=2 with
logprobs_mode raw_logits; in SD mode vLLM's rejection sampler gives the target's), which the losslessness verdict
reads (RequestRecord.top2_margin and .top_logit).
Acceptance comes from vLLM's own Prometheus counters (per engine, not per request): the difference over one run
is left in `run_spec_counters` (records keep spec=None so nothing is counted twice) and the raw difference in
`raw_spec_metrics`.
"""
from __future__ import annotations

import asyncio
import contextlib
import gc
import math
import sys
from collections.abc import Callable
from pathlib import Path

from lib.engines.base import Engine, record_from_tokens
from lib.errors import UsageError
from lib.log import get_logger
from lib.models import check_model_dir, load_tokenizer
from lib.types import Clock, Request, RequestRecord, SpecCounters
from lib.vllm_support import (
    import_vllm,
    metrics_difference,
    prepare_cpu_environment,
    read_spec_metrics,
    spec_counters_from,
)

BLOCK_MANAGER_NOTE = "no effect (vLLM has one block manager)"
logger = get_logger(__name__)
FINISH_REASONS = {"stop": "stop", "length": "length", "abort": "cancelled"}


def shield_llvmlite_from_kernel_scan():
    """Keep a second engine in one process working (vLLM 0.32 CPU, e.g. ngram then target).

    Each engine start re-registers vLLM's CPU kernel overrides by scanning every module's objects with vars();
    llvmlite's `ffi.lib` (loaded by numba for the ngram proposer) answers vars() with a C-function wrapper and the
    scan dies with "'_lib_fn_wrapper' object has no attribute 'get'". Its lookup table is where that answer comes
    from; an empty namespace there is what vars() should have returned.
    """
    ffi = sys.modules.get("llvmlite.binding.ffi")
    table = getattr(getattr(ffi, "lib", None), "_fntab", None)
    if isinstance(table, dict) and not isinstance(table.get("__dict__"), dict):
        table["__dict__"] = {}


def cpu_safe_dtype(dtype: str, on_cpu: bool) -> str:
    """VLLM_DTYPE as vLLM runs it here: fp16/bf16 are slow or crash in the CPU build (the CPU path is for checking)."""
    if (on_cpu and dtype in ("auto", "half", "float16", "bfloat16")) or dtype == "float":
        return "float32"
    return dtype


def top2_of(logprobs, count: int) -> list[tuple[float, float] | None]:
    """(top-1 minus top-2, top-1) per new token from vLLM's entries ({token: Logprob} per position: the top 2, and
    the sampled token when it is not among them); None per token where vLLM gave none."""
    if not logprobs:
        return [None] * count
    out = []
    for entry in logprobs:
        values = sorted((lp.logprob for lp in (entry or {}).values()), reverse=True)
        out.append((values[0] - values[1], values[0]) if len(values) >= 2 else None)
    return out


class VLLMEngine(Engine):
    name = "vllm"

    def __init__(self, cfg, method: str, models):
        super().__init__(cfg, method, models)
        self.llm = None  # vllm.LLM (offline) ...
        self.async_engine = None  # ... or vllm AsyncLLM (rate mode); never both at once
        self.run_spec_counters: SpecCounters | None = None
        self.raw_spec_metrics: dict | None = None
        self.use_speculative = method == "speculative" and cfg.vllm_enable_speculative
        self.num_speculative_tokens = cfg.vllm_num_speculative_tokens or cfg.gamma_value
        self.speculative_config = self._speculative_config() if self.use_speculative else None
        if method == "draft":
            self.target_folder = self._drafter_folder("draft_model")
        self._runs = 0

    # ------------------------------------------------------------------------------------------ configuration

    def _drafter_folder(self, what: str) -> Path:
        """The draft or head folder, checked here too: the engine is also built on its own, without resolve_models."""
        if self.cfg.drafter_model:
            return check_model_dir(self.cfg.drafter_model, "DRAFTER_MODEL")
        if what == "draft_model" and self.models.draft is not None:
            return Path(self.models.draft)
        needed = "a draft model folder" if what == "draft_model" else f"an {what.upper()} head folder"
        raise UsageError(f"VLLM_SPEC_METHOD={what} needs DRAFTER_MODEL set to {needed}")

    def _speculative_config(self) -> dict:
        method, k = self.cfg.vllm_spec_method, self.num_speculative_tokens
        if method == "draft_model":
            return {"method": "draft_model", "model": str(self._drafter_folder(method)), "num_speculative_tokens": k}
        if method in ("eagle", "eagle3"):
            return {"method": method, "model": str(self._drafter_folder(method)), "num_speculative_tokens": k}
        if method == "ngram":
            return {"method": "ngram", "num_speculative_tokens": k,
                    "prompt_lookup_max": self.cfg.vllm_ngram_prompt_lookup_max,
                    "prompt_lookup_min": self.cfg.vllm_ngram_prompt_lookup_min}
        if method == "mtp":  # the target's own multi-token-prediction layers
            return {"method": "mtp", "num_speculative_tokens": k}
        raise UsageError(f"VLLM_SPEC_METHOD={method}: expected one of draft_model, ngram, eagle, eagle3, mtp")

    def _engine_kwargs(self) -> dict:
        kwargs = dict(model=str(self.target_folder), tokenizer=str(self.models.target),
                      tensor_parallel_size=self.cfg.vllm_tensor_parallel_size,
                      gpu_memory_utilization=self.cfg.vllm_gpu_memory_utilization,
                      max_model_len=self.cfg.vllm_max_model_len, max_num_seqs=self.cfg.vllm_max_num_seqs,
                      dtype=self.dtype, seed=self.cfg.seed, disable_log_stats=False)
        if self.on_cpu:
            kwargs["enforce_eager"] = True  # compiled/bf16 CPU attention paths crash on some CPUs
        if self.speculative_config:
            kwargs["speculative_config"] = dict(self.speculative_config)
        if self.wants_top2():
            kwargs["logprobs_mode"] = "raw_logits"  # the logits themselves: their magnitude sets the tie bound
        return kwargs

    def wants_top2(self) -> bool:
        """The losslessness verdict's top-2 logits per token: greedy runs with LOSSLESS_CHECK on."""
        return self.cfg.temperature <= 0 and self.cfg.lossless_check != "off"

    @classmethod
    def context_length(cls, cfg, method: str, models) -> tuple[int, str]:
        return cfg.vllm_max_model_len, "VLLM_MAX_MODEL_LEN"

    # ------------------------------------------------------------------------------------------------ start-up

    def start(self):
        self.on_cpu = prepare_cpu_environment()
        self.vllm = import_vllm()
        self.dtype = cpu_safe_dtype(self.cfg.vllm_dtype, self.on_cpu)
        self.tokenizer = load_tokenizer(self.models.target)
        if self.method == "speculative" and not self.use_speculative:
            logger.warning("WARNING: INFERENCE_METHOD=speculative but VLLM_ENABLE_SPECULATIVE=false\n"
                           "   falling back to target-only generation")
        self._print_startup()
        self._build(rate_mode=self.cfg.auto_rate > 0)
        logger.info("vLLM engine started.")
        self._print_configuration()

    def _print_startup(self):
        mode = "speculative decoding" if self.use_speculative else "target only"
        logger.info(f"Starting the vLLM engine ({mode}): target {self.target_folder}")

    def _print_configuration(self):
        spec = self.use_speculative
        logger.info("\n".join([
            "Inference Engine: vllm",
            f"Inference Method: {'speculative' if spec else 'target'}",
            "",
            "vLLM Configuration:",
            f"  Tensor Parallel: {self.cfg.vllm_tensor_parallel_size}",
            f"  GPU Memory Utilization: {self.cfg.vllm_gpu_memory_utilization:g}",
            f"  Max Model Length: {self.cfg.vllm_max_model_len}",
            f"  Max Num Seqs: {self.cfg.vllm_max_num_seqs}",
            f"  Data Type: {self.dtype}" + (" (CPU build: float32, eager)" if self.on_cpu else ""),
            "",
            "vLLM Speculative Decoding:",
            f"  Enabled: {'Yes' if spec else 'No'}",
            f"  Method: {self.cfg.vllm_spec_method if spec else '-'}",
            f"  Drafter: {self.speculative_config.get('model', '-') if spec else '-'}",
            f"  Num Speculative Tokens: {self.num_speculative_tokens if spec else '-'}",
            f"  VLLM_USE_V2_BLOCK_MANAGER: {BLOCK_MANAGER_NOTE}",
        ]))

    def _build(self, rate_mode: bool):
        """Build the offline or the async engine, releasing the other first (they would share the GPU)."""
        self._release()
        shield_llvmlite_from_kernel_scan()
        kwargs = self._engine_kwargs()
        try:
            if rate_mode:
                from vllm.engine.arg_utils import AsyncEngineArgs
                from vllm.v1.engine.async_llm import AsyncLLM
                self.async_engine = AsyncLLM.from_engine_args(AsyncEngineArgs(**kwargs))
            else:
                self.llm = self.vllm.LLM(**kwargs)
        except ValueError as exc:  # vLLM's config validation (pydantic errors are ValueErrors too)
            first = str(exc).strip().splitlines()
            raise UsageError(f"vLLM rejected the configuration: {' '.join(first[:3])}") from None

    def _release(self):
        if self.async_engine is not None:
            self.async_engine.shutdown()
        if self.llm is not None:  # frees the engine core (a separate process on GPU machines) now, not at gc
            self.llm.llm_engine.engine_core.shutdown()
        self.llm = self.async_engine = None
        gc.collect()

    def stop(self):
        self._release()

    # ------------------------------------------------------------------------------------------------- facts

    def describe(self) -> dict:
        return {"engine": self.name, "method": self.method,
                "effective_method": "speculative" if self.use_speculative else "target",
                "vllm": self.vllm.__version__, "device": "cpu" if self.on_cpu else "cuda", "dtype": self._dtype_run(),
                "model": str(self.target_folder),
                "speculative_config": self.speculative_config,
                "tensor_parallel_size": self.cfg.vllm_tensor_parallel_size,
                "gpu_memory_utilization": self.cfg.vllm_gpu_memory_utilization,
                "max_model_len": self.cfg.vllm_max_model_len, "max_num_seqs": self.cfg.vllm_max_num_seqs}

    def _dtype_run(self) -> str:
        """The dtype vLLM runs (VLLM_DTYPE=auto resolved by vLLM from the model; the losslessness bound needs it)."""
        engine = self.llm.llm_engine if self.llm is not None else self.async_engine
        dtype = getattr(getattr(engine, "model_config", None), "dtype", None)
        return str(dtype).removeprefix("torch.") if dtype is not None else self.dtype

    def weight_bytes(self) -> int:
        """Parameters x bytes per element at the dtype vLLM runs (headers only; no tensor is read)."""
        from safetensors import safe_open
        folders = [self.target_folder]
        if self.speculative_config and "model" in self.speculative_config:
            folders.append(Path(self.speculative_config["model"]))
        size = {"float32": 4}.get(self.dtype, 2)
        count = 0
        for folder in folders:
            for file in Path(folder).glob("*.safetensors"):
                with safe_open(str(file), "pt") as f:
                    count += sum(math.prod(f.get_slice(name).get_shape()) for name in f.keys())
        return count * size

    # ---------------------------------------------------------------------------------------------- running

    def _sampling_params(self, request: Request):
        from vllm.sampling_params import RequestOutputKind
        seed = self.cfg.seed + request.request_id if self.cfg.temperature > 0 else None
        return self.vllm.SamplingParams(temperature=self.cfg.temperature, max_tokens=request.max_new_tokens,
                                        seed=seed, detokenize=False, output_kind=RequestOutputKind.DELTA,
                                        logprobs=2 if self.wants_top2() else None)

    def _prompt(self, request: Request) -> dict:
        return {"prompt_token_ids": list(request.prompt_ids)}

    def run(self, requests: list[Request], clock: Clock, on_done: Callable[[RequestRecord], None],
            should_stop: Callable[[], bool] = lambda: False) -> None:
        rate_mode = any(r.arrival > 0 for r in requests)
        if rate_mode != (self.async_engine is not None):
            self._build(rate_mode)
        self._runs += 1
        before = read_spec_metrics()
        try:
            if rate_mode:
                asyncio.run(self._run_async(requests, clock, on_done, should_stop))
            else:
                self._run_offline(requests, clock, on_done, should_stop)
        finally:
            self.raw_spec_metrics = metrics_difference(before, read_spec_metrics())
            self.run_spec_counters = spec_counters_from(self.raw_spec_metrics) if self.use_speculative else None

    def generate_batch(self, requests: list[Request], clock: Clock) -> list[RequestRecord]:
        records: list[RequestRecord] = []
        self.run(requests, clock, records.append)
        return sorted(records, key=lambda r: r.request_id)

    def _vllm_id(self, request: Request) -> str:
        return f"speclab-{self._runs}-{request.request_id}"

    def _finish(self, request: Request, ids: list[int], times: list[float], start: float, reason,
                tops: list[tuple]) -> RequestRecord:
        record = record_from_tokens(request, ids, times, start, FINISH_REASONS.get(reason, str(reason)),
                                    self.tokenizer)
        if self.wants_top2() and len(tops) == len(ids) and all(t is not None for t in tops):
            record.top2_margin, record.top_logit = [t[0] for t in tops], [t[1] for t in tops]
        return record

    def _run_offline(self, requests, clock: Clock, on_done, should_stop):
        engine = self.llm.llm_engine
        by_id, ids, times, starts, tops = {}, {}, {}, {}, {}
        waiting = list(requests)

        def admit():  # MAX_CONCURRENCY: a request enters when one in flight has finished
            while waiting and (not self.cfg.max_concurrency or len(ids) < self.cfg.max_concurrency):
                request = waiting.pop(0)
                rid = self._vllm_id(request)
                by_id[rid], ids[rid], times[rid], starts[rid], tops[rid] = request, [], [], clock.now(), []
                engine.add_request(rid, self._prompt(request), self._sampling_params(request))

        admit()
        while engine.has_unfinished_requests():
            if should_stop():
                engine.abort_request(list(ids))  # the unfinished ones
                break
            outputs = engine.step()
            now = clock.now()
            for out in outputs:
                rid = out.request_id
                if rid not in ids:
                    continue
                new = list(out.outputs[0].token_ids)
                ids[rid] += new
                times[rid] += [now] * len(new)
                tops[rid] += top2_of(out.outputs[0].logprobs, len(new))
                if out.finished:
                    on_done(self._finish(by_id[rid], ids.pop(rid), times[rid], starts[rid],
                                         out.outputs[0].finish_reason, tops[rid]))
            admit()

    async def _run_async(self, requests, clock: Clock, on_done, should_stop):
        # MAX_CONCURRENCY, as vllm bench serve's semaphore
        limit = asyncio.Semaphore(self.cfg.max_concurrency) if self.cfg.max_concurrency else contextlib.nullcontext()

        async def one(request: Request):
            await asyncio.sleep(max(0.0, request.arrival - clock.now()))
            async with limit:
                await admitted(request)

        async def admitted(request: Request):
            if should_stop():
                return
            start, ids, times, tops, reason = clock.now(), [], [], [], None
            stream = self.async_engine.generate(self._prompt(request), self._sampling_params(request),
                                                self._vllm_id(request))
            async for out in stream:
                new = list(out.outputs[0].token_ids)
                now = clock.now()
                ids += new
                times += [now] * len(new)
                tops += top2_of(out.outputs[0].logprobs, len(new))
                if out.finished:
                    reason = out.outputs[0].finish_reason
            on_done(self._finish(request, ids, times, start, reason, tops))

        await asyncio.gather(*(one(r) for r in sorted(requests, key=lambda r: r.arrival)))
