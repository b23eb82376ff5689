"""Per-request metrics and their aggregates, named as `vllm bench serve` names them (times in ms)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from lib.engines.base import RequestRecord, SpecCounters

STATS = ("mean", "median", "std", "p90", "p99")


def summarize(values: list[float], prefix: str) -> dict:
    arr = np.asarray(values, dtype=float)
    if arr.size == 0:
        return {f"{s}_{prefix}": None for s in STATS}
    return {f"mean_{prefix}": float(arr.mean()), f"median_{prefix}": float(np.median(arr)),
            f"std_{prefix}": float(arr.std()), f"p90_{prefix}": float(np.percentile(arr, 90)),
            f"p99_{prefix}": float(np.percentile(arr, 99))}


@dataclass
class RequestMetrics:
    ttft_ms: float | None  # first token time - arrival (queueing included, as a served request sees it)
    tpot_ms: float | None  # (e2el - ttft) / (output_tokens - 1)
    itl_ms: list[float]  # every gap between consecutive tokens
    e2el_ms: float | None
    output_tokens: int


def request_metrics(rec: RequestRecord) -> RequestMetrics:
    times = rec.token_times
    if not times:
        return RequestMetrics(None, None, [], None, 0)
    ttft = (times[0] - rec.arrival) * 1000
    e2el = (times[-1] - rec.arrival) * 1000
    tpot = (e2el - ttft) / (len(times) - 1) if len(times) > 1 else None
    itl = [(b - a) * 1000 for a, b in zip(times, times[1:])]
    return RequestMetrics(ttft, tpot, itl, e2el, len(rec.output_ids))


def acceptance(spec: SpecCounters | None) -> dict:
    """DESIGN.md's definitions: rate = accepted/draft tokens; length = 1 + accepted/drafts (with the bonus)."""
    if spec is None or spec.num_drafts == 0:
        return {"num_drafts": 0 if spec else None, "draft_tokens": 0 if spec else None,
                "accepted_tokens": 0 if spec else None, "acceptance_rate": None, "acceptance_length": None,
                "per_position_acceptance_rate": []}
    return {"num_drafts": spec.num_drafts, "draft_tokens": spec.draft_tokens,
            "accepted_tokens": spec.accepted_tokens,
            "acceptance_rate": spec.accepted_tokens / spec.draft_tokens if spec.draft_tokens else None,
            "acceptance_length": 1 + spec.accepted_tokens / spec.num_drafts,
            "per_position_acceptance_rate": [c / spec.num_drafts for c in spec.accepted_per_position]}


@dataclass
class ModeMetrics:
    mode: str
    completed: int
    failed: int
    duration_s: float
    total_input_tokens: int
    total_output_tokens: int
    request_throughput: float
    output_throughput: float
    total_token_throughput: float
    latency: dict = field(default_factory=dict)  # mean/median/std/p90/p99 of ttft_ms, tpot_ms, itl_ms, e2el_ms
    acceptance: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return asdict(self)


def aggregate(mode: str, records: list[RequestRecord], duration_s: float,
              engine_spec: SpecCounters | None = None) -> ModeMetrics:
    """Aggregate finished requests. Acceptance: the engine's run-level counters when it keeps them (vLLM),
    else the sum of the per-request counters."""
    done = [r for r in records if r.finish_reason in ("stop", "length")]
    per = [request_metrics(r) for r in done]
    out_tokens = sum(m.output_tokens for m in per)
    in_tokens = sum(r.prompt_tokens for r in done)
    duration = max(duration_s, 1e-9)
    latency = {}
    latency.update(summarize([m.ttft_ms for m in per if m.ttft_ms is not None], "ttft_ms"))
    latency.update(summarize([m.tpot_ms for m in per if m.tpot_ms is not None], "tpot_ms"))
    latency.update(summarize([x for m in per for x in m.itl_ms], "itl_ms"))
    latency.update(summarize([m.e2el_ms for m in per if m.e2el_ms is not None], "e2el_ms"))
    spec = engine_spec
    if spec is None:
        specs = [r.spec for r in done if r.spec is not None]
        if specs:
            spec = SpecCounters()
            for s in specs:
                spec = spec.add(s)
    return ModeMetrics(mode, len(done), len(records) - len(done), duration_s, in_tokens, out_tokens,
                       len(done) / duration, out_tokens / duration, (in_tokens + out_tokens) / duration,
                       latency, acceptance(spec))


def _ratio(a, b):
    return a / b if a is not None and b not in (None, 0) else None


def compare(baseline: dict, other: dict) -> dict:
    """Speedup of `other` over `baseline` (both result dicts of one mode: metrics + energy)."""
    bm, om = baseline["metrics"], other["metrics"]
    be, oe = baseline.get("energy") or {}, other.get("energy") or {}
    return {
        "baseline": bm["mode"], "mode": om["mode"],
        "output_throughput_speedup": _ratio(om["output_throughput"], bm["output_throughput"]),
        "tpot_speedup": _ratio(bm["latency"]["mean_tpot_ms"], om["latency"]["mean_tpot_ms"]),
        "e2el_speedup": _ratio(bm["latency"]["mean_e2el_ms"], om["latency"]["mean_e2el_ms"]),
        "energy_per_token_ratio": _ratio(oe.get("energy_per_output_token_j"), be.get("energy_per_output_token_j")),
    }
