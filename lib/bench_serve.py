"""A mode's results in `vllm bench serve`'s result-file layout (bench_serve_<mode>.json), and NUM_RUNS' summary.

The file holds vLLM's run metadata (date, model_id, tokenizer_id, num_prompts, request_rate, burstiness,
max_concurrency, ramp-up, METADATA pairs), its figures under its keys (duration, request_goodput,
max_output_tokens_per_s, spec_decode_*), its per-request lists (seconds) and the statistics of PERCENTILE_METRICS
at METRIC_PERCENTILES, computed as vllm/benchmarks/serve.py computes them, so one script reads both tools' files.
"""
from __future__ import annotations

import math
from datetime import datetime

import numpy as np

from lib import config as C
from lib.metrics import VLLM_ACCEPTANCE_KEYS, ModeMetrics, request_metrics
from lib.types import Request, RequestRecord

TOP_KEYS = ("duration", "completed", "failed", "total_input_tokens", "total_output_tokens", "request_throughput",
            "request_goodput", "output_throughput", "total_token_throughput", "max_output_tokens_per_s",
            "max_concurrent_requests")


def _stats(values_ms: list[float], name: str, percentiles: list[float]) -> dict:
    """vLLM's process_one_metric: mean, median, std and p<P> of one metric (an empty list counts as [0])."""
    arr = np.asarray(values_ms or [0.0], dtype=float)
    out = {f"mean_{name}_ms": float(arr.mean()), f"median_{name}_ms": float(np.median(arr)),
           f"std_{name}_ms": float(arr.std())}
    for p in percentiles:
        word = str(int(p)) if int(p) == p else str(p)
        out[f"p{word}_{name}_ms"] = float(np.percentile(arr, p))
    return out


def selected_statistics(records: list[RequestRecord], per: list, metrics: list[str], percentiles: list[float]
                        ) -> dict:
    """per: request_metrics() of each record."""
    done = [m for r, m in zip(records, per) if r.finish_reason in ("stop", "length")]
    values = {"ttft": [m.ttft_ms for m in done if m.ttft_ms is not None],
              "tpot": [m.tpot_ms for m in done if m.tpot_ms is not None],
              "itl": [x for m in done for x in m.itl_ms],
              "e2el": [m.e2el_ms for m in done if m.e2el_ms is not None]}
    out = {}
    for name in C.PERCENTILE_METRIC_NAMES:  # vLLM's order
        if name in metrics:
            out.update(_stats(values[name], name, percentiles))
    return out


def _per_request(records: list[RequestRecord], per: list) -> dict:
    ok = [r.finish_reason in ("stop", "length") for r in records]
    return {"input_lens": [r.prompt_tokens for r in records],
            "output_lens": [m.output_tokens if good else 0 for m, good in zip(per, ok)],
            "ttfts": [(m.ttft_ms or 0.0) / 1000 for m in per], "itls": [[x / 1000 for x in m.itl_ms] for m in per],
            "latencies": [(m.e2el_ms or 0.0) / 1000 for m in per], "start_times": [r.arrival for r in records],
            "queue_times": [r.start - r.arrival for r in records],  # waited before the engine took it up
            "generated_texts": [r.text for r in records], "errors": [r.error or "" for r in records]}


def result(cfg, mode: str, models, requests: list[Request], records: list[RequestRecord],
           metrics: ModeMetrics) -> dict:
    """The bench_serve_<mode>.json of one mode."""
    engine, _, method = mode.partition(":")
    target = str(models.target) if models is not None else None
    rate = cfg.auto_rate if C.rate_mode(cfg) and cfg.auto_rate > 0 else math.inf
    out = {"date": datetime.now().strftime("%Y%m%d-%H%M%S"), "endpoint_type": engine, "backend": engine,
           "label": mode, "model_id": target, "tokenizer_id": target, "num_prompts": len(requests),
           **C.metadata_pairs(cfg),
           "request_rate": rate if rate < math.inf else "inf", "burstiness": cfg.burstiness,
           "max_concurrency": cfg.max_concurrency or None}
    if cfg.ramp_up_strategy != "none":
        out.update(ramp_up_strategy=cfg.ramp_up_strategy, ramp_up_start_rps=cfg.ramp_up_start_rps,
                   ramp_up_end_rps=cfg.ramp_up_end_rps)
    out.update({k: getattr(metrics, k) for k in TOP_KEYS}, rtfx=0.0)  # rtfx: vLLM's audio figure, none here
    per = [request_metrics(r) for r in records]
    out.update(_per_request(records, per))
    if metrics.spec_decode_draft_tokens:
        out.update({k: getattr(metrics, k) for k in VLLM_ACCEPTANCE_KEYS})
    out.update(selected_statistics(records, per, *C.percentile_selection(cfg)))
    return out


# ---------------------------------------------------------------- NUM_RUNS

REPEATED = ("output_throughput", "mean_tpot_ms", "acceptance_rate", "acceptance_length")


def interval(values: list[float]) -> dict:
    """Mean and 95 % Student-t interval (two-sided, n - 1 degrees of freedom) of the runs' values."""
    from scipy import stats
    arr = np.asarray(values, dtype=float)
    mean = float(arr.mean())
    if arr.size < 2:
        return {"mean": mean, "ci95_low": None, "ci95_high": None, "values": list(values)}
    half = float(stats.t.ppf(0.975, arr.size - 1) * arr.std(ddof=1) / math.sqrt(arr.size))
    return {"mean": mean, "ci95_low": mean - half, "ci95_high": mean + half, "values": list(values)}


def repeats_summary(runs: list[dict]) -> dict:
    """{n, metric: interval} over the runs' metrics dicts (ModeMetrics.to_json())."""
    def value(metrics: dict, key: str):
        for group in (metrics, metrics.get("latency") or {}, metrics.get("acceptance") or {}):
            if key in group:
                return group[key]
        return None

    out: dict = {"n": len(runs)}
    for key in REPEATED:
        values = [value(m, key) for m in runs]
        out[key] = interval(values) if values and all(v is not None for v in values) else None
    return out
