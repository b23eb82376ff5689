"""The one engine interface: requests in, per-request records out.

The runner gives every engine the same `Request`s (already tokenized with the target's tokenizer, with an
arrival offset in seconds from the run's start) and receives `RequestRecord`s as requests finish. Engines that
decode a batch at a time only implement `start()` and `generate_batch()`; `run()` then honours the arrival
schedule (open loop: a request is never started before its arrival, and waits in a queue if the engine is
busy). Engines with their own scheduler (vLLM's async engine) override `run()`.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import replace

from lib.errors import UsageError
from lib.types import Clock, Request, RequestRecord, SpecCounters


class Engine(ABC):
    """Subclasses set `name`, and read what they need from the resolved Config in __init__."""
    name = "base"
    run_spec_counters: SpecCounters | None = None  # run-level acceptance, for engines that count per run (vLLM)
    weight_bytes_read: int | None = None  # weights read by the timed run, for engines that know (bandwidth)

    def __init__(self, cfg, method: str, models):
        self.cfg, self.method, self.models = cfg, method, models
        # the draft method runs the draft model as an AR target (the SD cost model's cost ratio c)
        self.target_folder = models.draft if method == "draft" else models.target
        batch = cfg.batch_size if cfg.enable_batch else 1
        self.batch_size = min(batch, cfg.max_concurrency) if cfg.max_concurrency else batch  # requests in flight

    @abstractmethod
    def start(self) -> None:
        """Load models; raise EngineUnavailable with a one-line fix if this engine cannot run here."""

    @abstractmethod
    def generate_batch(self, requests: list[Request], clock: Clock) -> list[RequestRecord]:
        """Decode these requests together and return their records (times from `clock`)."""

    def describe(self) -> dict:
        """Engine facts for run.json and the summary (versions, devices, knobs)."""
        return {"engine": self.name, "method": self.method}

    def weight_bytes(self) -> int | None:
        return None

    @classmethod
    def context_length(cls, cfg, method: str, models) -> tuple[int, str] | None:
        """(tokens one sequence may hold, prompt and generation together; what sets that limit), known before the
        engine starts; None where the engine does not say."""
        return None

    def stop(self) -> None:
        pass

    def warmup(self, requests: list[Request]) -> None:
        """One short untimed pass before the timed run (GPU kernels compiled, graphs captured, caches sized).
        The requests keep their arrival mode (rate runs stay on the engine's rate path); counters are reset after."""
        rate = any(r.arrival > 0 for r in requests)
        sizes = {min(self.batch_size, len(requests))}
        if not rate and len(requests) % self.batch_size:
            sizes.add(len(requests) % self.batch_size)  # the last, smaller batch of a fixed-count run
        for size in sorted(sizes):
            warm = [replace(r, arrival=1e-6 if rate else 0.0, max_new_tokens=min(r.max_new_tokens, 16))
                    for r in requests[:size]]
            self.run(warm, Clock(), lambda record: None)
        self.reset_counters()

    def reset_counters(self) -> None:
        """Forget what the warm-up counted (engines that accumulate run statistics override this)."""

    def cost_inputs(self) -> dict | None:
        """The SD cost model's inputs (lib/sd_report.py), read for SD modes with acceptance counters: the cost ratio
        c and the verify cost v, each None where not measured, with a source each. This default: c from the
        <engine>:draft mode of the same run (draft TPOT / target TPOT), v not timed. Engines that time their steps
        override it."""
        return {"cost_ratio": None, "cost_ratio_source": "draft-as-target TPOT ratio",
                "draft_mode": f"{self.name}:draft", "verify_cost": None,
                "verify_cost_source": f"the {self.name} engine does not time its verify step"}

    def extra_results(self) -> dict:
        """Engine-specific additions to the mode's results (e.g. MoE expert statistics)."""
        return {}

    def run(self, requests: list[Request], clock: Clock, on_done: Callable[[RequestRecord], None],
            should_stop: Callable[[], bool] = lambda: False) -> None:
        """Open-loop arrivals, batches of up to self.batch_size from the requests that have arrived."""
        queue = sorted(requests, key=lambda r: r.arrival)
        while queue and not should_stop():
            clock.sleep_until(queue[0].arrival)
            arrived = [r for r in queue if r.arrival <= clock.now()]
            batch = arrived[: self.batch_size]
            for record in self.generate_batch(batch, clock):
                on_done(record)
            queue = queue[len(batch):]


def check_context(requests: list[Request], limit: tuple[int, str] | None, mode: str, new_tokens_rule: str) -> None:
    """Every request fits the engine's context, or one line naming the first that does not (before any runs).
    `new_tokens_rule` says where a request's max new tokens come from (lib.workload.max_tokens_rule)."""
    if limit is None:
        return
    tokens, source = limit
    for r in requests:
        need = len(r.prompt_ids) + r.max_new_tokens
        if need > tokens:
            raise UsageError(f"request {r.request_id}: its prompt of {len(r.prompt_ids)} tokens + {r.max_new_tokens} "
                             f"new tokens ({new_tokens_rule}) is {need} tokens, more than {mode}'s context of "
                             f"{tokens} ({source}); use shorter prompts, fewer new tokens, or ENABLE_BATCH=true with "
                             "MAX_BATCH_LENGTH (prompts keep their last tokens)")


def record_from_tokens(request: Request, output_ids: list[int], token_times: list[float], start: float,
                       finish_reason: str, tokenizer, spec: SpecCounters | None = None) -> RequestRecord:
    """The common way engines turn decoded ids into a record (text via the HF tokenizer)."""
    return RequestRecord(request_id=request.request_id, prompt_tokens=len(request.prompt_ids),
                         output_ids=list(output_ids), text=tokenizer.decode(output_ids, skip_special_tokens=True),
                         arrival=request.arrival, start=start, token_times=list(token_times),
                         finish_reason=finish_reason, spec=spec)
