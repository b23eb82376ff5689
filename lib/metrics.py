"""Per-request metrics and their aggregates, named as `vllm bench serve` names them (times in ms).

ModeMetrics declares every aggregate once, as a typed field whose metadata says where it shows: its group in the
result file, its column in the console summary, the report rows and analyze.py, and how two modes compare on it.
Figures that are not ModeMetrics fields (speedups, energy, bandwidth, the decode path) are the few columns of
EXTRA_COLUMNS.
COLUMNS, in display order, is what print_summary, compare, lib/sweep_report.py and analyze.py are generated from.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np

from lib.types import RequestRecord, SpecCounters

STATS = ("mean", "median", "std", "p90", "p99")
GROUPS = ("latency", "acceptance")  # nested objects of ModeMetrics.to_json(); every other field sits at its top


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
    itl_ms: list[float]  # vLLM's ITL: one gap per emitted chunk (the tokens sharing a timestamp, e.g. an SD round)
    e2el_ms: float | None
    output_tokens: int
    itl_per_token_ms: list[float] = field(default_factory=list)  # every gap between consecutive tokens (0 in a chunk)
    chunk_tokens: list[int] = field(default_factory=list)  # tokens per emitted chunk


def chunks(times: list[float]) -> list[tuple[float, int]]:
    """(timestamp, tokens) per emitted chunk: consecutive tokens with one timestamp came out together."""
    out: list[tuple[float, int]] = []
    for t in times:
        if out and out[-1][0] == t:
            out[-1] = (t, out[-1][1] + 1)
        else:
            out.append((t, 1))
    return out


def request_metrics(rec: RequestRecord) -> RequestMetrics:
    times = rec.token_times
    if not times:
        return RequestMetrics(None, None, [], None, 0)
    ttft = (times[0] - rec.arrival) * 1000
    e2el = (times[-1] - rec.arrival) * 1000
    tpot = (e2el - ttft) / (len(times) - 1) if len(times) > 1 else None
    chunked = chunks(times)
    itl = [(b - a) * 1000 for (a, _), (b, _) in zip(chunked, chunked[1:])]
    per_token = [(b - a) * 1000 for a, b in zip(times, times[1:])]
    return RequestMetrics(ttft, tpot, itl, e2el, len(rec.output_ids), per_token, [n for _, n in chunked])


def acceptance(spec: SpecCounters | None) -> dict:
    """docs/design.md's definitions: rate = accepted/draft tokens; length = 1 + accepted/drafts (with the bonus)."""
    if spec is None or spec.num_drafts == 0:
        return {"num_drafts": 0 if spec else None, "draft_tokens": 0 if spec else None,
                "accepted_tokens": 0 if spec else None, "acceptance_rate": None, "acceptance_length": None,
                "per_position_acceptance_rate": []}
    return {"num_drafts": spec.num_drafts, "draft_tokens": spec.draft_tokens,
            "accepted_tokens": spec.accepted_tokens,
            "acceptance_rate": spec.accepted_tokens / spec.draft_tokens if spec.draft_tokens else None,
            "acceptance_length": 1 + spec.accepted_tokens / spec.num_drafts,
            "per_position_acceptance_rate": [c / spec.num_drafts for c in spec.accepted_per_position]}


def vllm_acceptance(spec: SpecCounters | None) -> dict:
    """The same figures under `vllm bench serve`'s keys: its rate is a percentage, and it writes them only when
    draft tokens were counted (None here otherwise)."""
    if spec is None or not spec.draft_tokens:
        return dict.fromkeys(VLLM_ACCEPTANCE_KEYS)
    return {"spec_decode_acceptance_rate": spec.accepted_tokens / spec.draft_tokens * 100,
            "spec_decode_acceptance_length": 1 + spec.accepted_tokens / spec.num_drafts if spec.num_drafts else 0.0,
            "spec_decode_num_drafts": spec.num_drafts, "spec_decode_draft_tokens": spec.draft_tokens,
            "spec_decode_accepted_tokens": spec.accepted_tokens,
            "spec_decode_per_position_acceptance_rates": [c / spec.num_drafts for c in spec.accepted_per_position]
            if spec.num_drafts else []}


VLLM_ACCEPTANCE_KEYS = ("spec_decode_acceptance_rate", "spec_decode_acceptance_length", "spec_decode_num_drafts",
                        "spec_decode_draft_tokens", "spec_decode_accepted_tokens",
                        "spec_decode_per_position_acceptance_rates")


def summed(specs) -> SpecCounters | None:
    out = None
    for s in specs:
        if s is not None:
            out = s if out is None else out.add(s)
    return out


def per_category_acceptance(records: list[RequestRecord], categories: dict[int, str]) -> dict:
    """{category: acceptance figures and requests} from the per-request counters, for datasets with categories;
    the categories' counters add up to the per-request total."""
    by_cat: dict[str, list[RequestRecord]] = {}
    for r in records:
        if r.request_id in categories:
            by_cat.setdefault(categories[r.request_id], []).append(r)
    width = max((len(r.spec.accepted_per_position) for r in records if r.spec is not None), default=0)
    out = {}
    for cat in sorted(by_cat):
        spec = summed([SpecCounters(accepted_per_position=[0] * width), *(r.spec for r in by_cat[cat])])
        if spec.num_drafts or any(r.spec is not None for r in by_cat[cat]):
            out[cat] = {"requests": len(by_cat[cat]), **acceptance(spec)}
    return out


# ---------------------------------------------------------------- vLLM's peak figures and goodput

def request_goodput(per: list[RequestMetrics], slos: dict[str, float], duration: float) -> float | None:
    """vLLM's: requests meeting every SLO (ms) per second; a request with one token counts TPOT 0."""
    if not slos:
        return None
    values = {"ttft": lambda m: m.ttft_ms, "tpot": lambda m: m.tpot_ms or 0.0, "e2el": lambda m: m.e2el_ms}
    good = sum(all(values[k](m) <= slo for k, slo in slos.items()) for m in per)
    return good / duration


def peak_figures(done: list[RequestRecord]) -> tuple[float, int]:
    """vLLM's max_output_tokens_per_s and max_concurrent_requests: one-second buckets from the first request's
    start; vLLM rebuilds its token times from TTFT and the chunk gaps, so a bucket counts chunks, not tokens (a
    whole SD round is one)."""
    reqs = [r for r in done if r.token_times]
    if not reqs:
        return 0.0, 0
    starts = [r.arrival for r in reqs]
    latencies = [r.token_times[-1] - r.arrival for r in reqs]
    t0 = min(starts)
    n = int(np.ceil(max(s + lat for s, lat in zip(starts, latencies)) - t0)) + 1
    tokens, concurrent = np.zeros(n), np.zeros(n)
    for r, start, lat in zip(reqs, starts, latencies):
        chunked = [t for t, _ in chunks(r.token_times)]
        t = start + (chunked[0] - r.arrival)
        times = [t]
        for a, b in zip(chunked, chunked[1:]):
            t += b - a
            times.append(t)
        for t in times:
            bucket = int(t - t0)
            if 0 <= bucket < n:
                tokens[bucket] += 1
        for second in range(int(start - t0), int(start + lat - t0) + 1):
            concurrent[second] += 1
    return float(tokens.max()), int(concurrent.max())


# ---------------------------------------------------------------- how a metric shows

@dataclass(frozen=True)
class Column:
    """One metric as the console summary, the report rows, analyze.py and compare() show it."""
    name: str  # its key in report rows, analyze.py's columns and the sweep's regression metrics
    get: Callable[[dict, dict], Any]  # (a mode's result dict, its comparison with the AR mode) -> value
    row: bool = False  # a column of the report rows (and of analyze.py's CSV)
    short: bool = False  # also in analyze.py's short Markdown table
    summary: str | None = None  # console summary heading; the columns sharing one show as "a / b"
    digits: int = 2
    blank: str = "-"  # console text for a missing value
    higher_is_better: bool | None = None
    regress: bool = False  # a metric of the sweep report's regression check
    compare: str | None = None  # its key in compare()'s result
    as_speedup: bool = True  # compare(): oriented so that > 1 means better; False: plain mode / baseline
    compare_label: str | None = None  # shown in the console's comparison line
    after: str | None = None  # EXTRA_COLUMNS: the column it follows (None: at the end)


def metric(group: str = "top", row: bool | str = False, empty: Callable[[], Any] | None = None, **show) -> Any:
    """A ModeMetrics field. row: a report column (a str: under that name); empty: the value for one missing from an
    older result file; show: the other Column settings."""
    return field(metadata={"group": group, "row": row, "empty": empty, "show": show})


def latency(row: bool = True, **show) -> Any:
    return metric("latency", row=row, higher_is_better=False, **show)


def accept(**show) -> Any:
    return metric("acceptance", **show)


@dataclass
class ModeMetrics:
    """One mode's aggregates (latency statistics as named by summarize())."""
    mode: str = metric()
    completed: int = metric(row=True, summary="done")
    failed: int = metric()
    duration_s: float = metric()
    duration: float = metric()  # vLLM's name for duration_s
    total_input_tokens: int = metric()
    total_output_tokens: int = metric()
    request_throughput: float = metric()
    output_throughput: float = metric(row=True, short=True, summary="out tok/s", digits=1, higher_is_better=True,
                                      regress=True, compare="output_throughput_speedup",
                                      compare_label="output throughput")
    total_token_throughput: float = metric()
    request_goodput: float | None = metric()  # requests/s meeting every GOODPUT SLO (None without GOODPUT)
    max_output_tokens_per_s: float = metric()
    max_concurrent_requests: int = metric()
    mean_tokens_per_chunk: float | None = metric()  # tokens per emitted chunk (an SD round's accepted + bonus)
    mean_ttft_ms: float | None = latency(short=True, summary="TTFT ms (mean/p99)", digits=1, regress=True)
    median_ttft_ms: float | None = latency()
    std_ttft_ms: float | None = latency(row=False)
    p90_ttft_ms: float | None = latency()
    p99_ttft_ms: float | None = latency(short=True, summary="TTFT ms (mean/p99)", digits=1, regress=True)
    mean_tpot_ms: float | None = latency(short=True, summary="TPOT ms (mean/p99)", regress=True,
                                         compare="tpot_speedup", compare_label="TPOT")
    median_tpot_ms: float | None = latency()
    std_tpot_ms: float | None = latency(row=False)
    p90_tpot_ms: float | None = latency()
    p99_tpot_ms: float | None = latency(short=True, summary="TPOT ms (mean/p99)", regress=True)
    mean_itl_ms: float | None = latency(summary="ITL ms (mean)")
    median_itl_ms: float | None = latency()
    std_itl_ms: float | None = latency(row=False)
    p90_itl_ms: float | None = latency()
    p99_itl_ms: float | None = latency()
    mean_itl_per_token_ms: float | None = latency(row=False)
    median_itl_per_token_ms: float | None = latency(row=False)
    std_itl_per_token_ms: float | None = latency(row=False)
    p90_itl_per_token_ms: float | None = latency(row=False)
    p99_itl_per_token_ms: float | None = latency(row=False)
    mean_e2el_ms: float | None = latency(summary="E2EL ms (mean)", digits=1, compare="e2el_speedup")
    median_e2el_ms: float | None = latency()
    std_e2el_ms: float | None = latency(row=False)
    p90_e2el_ms: float | None = latency()
    p99_e2el_ms: float | None = latency()
    num_drafts: int | None = accept()
    draft_tokens: int | None = accept()
    accepted_tokens: int | None = accept()
    acceptance_rate: float | None = accept(row=True, short=True, summary="accept rate", digits=3,
                                           higher_is_better=True)
    acceptance_length: float | None = accept(row=True, short=True, summary="accept len", higher_is_better=True,
                                             regress=True)
    per_position_acceptance_rate: list[float] = accept(row="per_position_acceptance", short=True, empty=list)
    spec_decode_acceptance_rate: float | None = accept()  # vLLM's keys: the rate in percent
    spec_decode_acceptance_length: float | None = accept()
    spec_decode_num_drafts: int | None = accept()
    spec_decode_draft_tokens: int | None = accept()
    spec_decode_accepted_tokens: int | None = accept()
    spec_decode_per_position_acceptance_rates: list[float] | None = accept()
    per_category: dict = accept(empty=dict)  # {category: acceptance figures} for datasets with categories

    def to_json(self) -> dict:
        """{top fields..., "latency": {...}, "acceptance": {...}}, each in field order."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.metadata["group"] == "top"}
        for group in GROUPS:
            out[group] = {f.name: getattr(self, f.name) for f in fields(self) if f.metadata["group"] == group}
        return out


def _field_reader(f) -> Callable[[dict, dict], Any]:
    group, empty = f.metadata["group"], f.metadata["empty"]

    def get(result: dict, comparison: dict):
        metrics = result.get("metrics") or {}
        value = (metrics if group == "top" else metrics.get(group) or {}).get(f.name)
        return empty() if value is None and empty else value
    return get


def _field_column(f) -> Column:
    row = f.metadata["row"]
    return Column(row if isinstance(row, str) else f.name, _field_reader(f), row=bool(row), **f.metadata["show"])


FIELD_COLUMNS = [_field_column(f) for f in fields(ModeMetrics)]


def _compared(name: str) -> Callable[[dict, dict], Any]:
    """Reads the comparison of the field column NAME with the AR mode."""
    key = next(c.compare for c in FIELD_COLUMNS if c.name == name)
    return lambda result, comparison: comparison.get(key)


def _energy_per_token(result: dict, comparison: dict):
    energy = result.get("energy") or {}
    return energy.get("energy_per_output_token_j") if energy.get("available") else None


def _bandwidth_efficiency(result: dict, comparison: dict):
    return (result.get("bandwidth") or {}).get("bandwidth_efficiency")


def _decode_path(result: dict, comparison: dict):
    """The PyTorch engine's decode loop (its engine facts' fast_path); None for engines without the choice."""
    fast = (result.get("engine") or {}).get("fast_path")
    return None if fast is None else "fast" if fast else "plain"


def _lossless_verdict(result: dict, comparison: dict):
    """The SD mode's losslessness verdict against its engine's target-only mode (lib/lossless.py)."""
    return (result.get("lossless") or {}).get("verdict")


EXTRA_COLUMNS = [
    Column("speedup", _compared("output_throughput"), row=True, short=True, higher_is_better=True, regress=True,
           after="output_throughput"),
    Column("tpot_speedup", _compared("mean_tpot_ms"), row=True, higher_is_better=True, after="speedup"),
    Column("energy_per_token_j", _energy_per_token, row=True, short=True, summary="J/token", digits=4, blank="n/a",
           higher_is_better=False, regress=True, compare="energy_per_token_ratio", as_speedup=False,
           compare_label="energy/token ratio"),
    Column("bandwidth_efficiency", _bandwidth_efficiency, summary="BW eff", digits=3),
    Column("path", _decode_path, summary="path"),
    Column("lossless", _lossless_verdict, summary="lossless"),
]


def _in_order(columns: list[Column], extras: list[Column]) -> list[Column]:
    out = list(columns)
    for extra in extras:
        at = next(i + 1 for i, c in enumerate(out) if c.name == extra.after) if extra.after else len(out)
        out.insert(at, extra)
    return out


COLUMNS = _in_order(FIELD_COLUMNS, EXTRA_COLUMNS)


# ---------------------------------------------------------------- aggregating and comparing

def aggregate(mode: str, records: list[RequestRecord], duration_s: float,
              engine_spec: SpecCounters | None = None, slos: dict[str, float] | None = None,
              categories: dict[int, str] | None = None) -> ModeMetrics:
    """Aggregate finished requests. Acceptance: the engine's run-level counters when it keeps them (vLLM),
    else the sum of the per-request counters; per category from the per-request counters. slos: GOODPUT's
    {ttft|tpot|e2el: ms}; categories: {request_id: category}."""
    done = [r for r in records if r.finish_reason in ("stop", "length")]
    per = [request_metrics(r) for r in done]
    out_tokens = sum(m.output_tokens for m in per)
    in_tokens = sum(r.prompt_tokens for r in done)
    duration = max(duration_s, 1e-9)
    latencies = {}
    latencies.update(summarize([m.ttft_ms for m in per if m.ttft_ms is not None], "ttft_ms"))
    latencies.update(summarize([m.tpot_ms for m in per if m.tpot_ms is not None], "tpot_ms"))
    latencies.update(summarize([x for m in per for x in m.itl_ms], "itl_ms"))
    latencies.update(summarize([x for m in per for x in m.itl_per_token_ms], "itl_per_token_ms"))
    latencies.update(summarize([m.e2el_ms for m in per if m.e2el_ms is not None], "e2el_ms"))
    spec = engine_spec or summed(r.spec for r in done)
    chunk_sizes = [n for m in per for n in m.chunk_tokens]
    peak_tokens, peak_concurrent = peak_figures(done)
    return ModeMetrics(mode=mode, completed=len(done), failed=len(records) - len(done), duration_s=duration_s,
                       duration=duration_s, total_input_tokens=in_tokens, total_output_tokens=out_tokens,
                       request_throughput=len(done) / duration, output_throughput=out_tokens / duration,
                       total_token_throughput=(in_tokens + out_tokens) / duration,
                       request_goodput=request_goodput(per, slos or {}, duration),
                       max_output_tokens_per_s=peak_tokens, max_concurrent_requests=peak_concurrent,
                       mean_tokens_per_chunk=float(np.mean(chunk_sizes)) if chunk_sizes else None,
                       **latencies, **acceptance(spec), **vllm_acceptance(spec),
                       per_category=per_category_acceptance(done, categories or {}))


def _ratio(a, b):
    return a / b if a is not None and b not in (None, 0) else None


def compare(baseline: dict, other: dict) -> dict:
    """`other` against `baseline` (both result dicts of one mode: metrics + energy), on every column that has a
    compare key."""
    out = {"baseline": baseline["metrics"]["mode"], "mode": other["metrics"]["mode"]}
    for c in COLUMNS:
        if c.compare:
            mine, base = c.get(other, {}), c.get(baseline, {})
            inverted = c.as_speedup and not c.higher_is_better
            out[c.compare] = _ratio(base, mine) if inverted else _ratio(mine, base)
    return out
