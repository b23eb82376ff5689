"""vLLM helpers shared by the benchmark engine, the edge/cloud verifier and the comparison capture run.

Importing the vllm package, the environment its CPU build needs, and its speculative-decoding counters
(Prometheus, per engine) turned into SpecCounters.
"""
from __future__ import annotations

import atexit
import math
import os
import shutil
import tempfile

from lib.errors import EngineUnavailable
from lib.types import SpecCounters

INSTALL_HINT = "run ./run_benchmark.sh (installs it) or pip install -r requirements/vllm.txt"
SPEC_COUNTERS = {  # vLLM counter -> SpecCounters field
    "vllm:spec_decode_num_drafts": "num_drafts",
    "vllm:spec_decode_num_draft_tokens": "draft_tokens",
    "vllm:spec_decode_num_accepted_tokens": "accepted_tokens",
    "vllm:spec_decode_num_accepted_tokens_per_pos": "accepted_per_position",
}


def prepare_cpu_environment() -> bool:
    """On machines without CUDA: the settings the vLLM CPU build needs here (user values win). True on CPU."""
    import torch
    if torch.cuda.is_available():
        return False
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of KV cache
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # engine core in-process: starts in ~2 s
    if "VLLM_CACHE_ROOT" not in os.environ:
        cache = tempfile.mkdtemp(prefix="speclab-vllm-cache-")
        atexit.register(shutil.rmtree, cache, ignore_errors=True)
        os.environ["VLLM_CACHE_ROOT"] = cache
    return True


def import_vllm():
    try:
        import vllm
    except ModuleNotFoundError as exc:
        raise EngineUnavailable(f"INFERENCE_ENGINE=vllm: the vllm package is not installed ({exc.name} missing); "
                                f"{INSTALL_HINT}") from None
    return vllm


def read_spec_metrics() -> dict:
    """vLLM's speculative-decoding counters now, summed over engines/labels: name -> int or list[int]."""
    from vllm.v1.metrics.reader import Counter, Vector, get_metrics_snapshot
    totals: dict = {}
    for metric in get_metrics_snapshot():
        if metric.name not in SPEC_COUNTERS:
            continue
        if isinstance(metric, Counter):
            totals[metric.name] = totals.get(metric.name, 0) + int(metric.value)
        elif isinstance(metric, Vector):
            old = totals.get(metric.name, [])
            width = max(len(old), len(metric.values))
            totals[metric.name] = [(old[i] if i < len(old) else 0) + (metric.values[i] if i < len(metric.values)
                                                                      else 0) for i in range(width)]
    return totals


def metrics_difference(before: dict, after: dict) -> dict:
    diff = {}
    for name, value in after.items():
        old = before.get(name, [] if isinstance(value, list) else 0)
        if isinstance(value, list):
            diff[name] = [v - (old[i] if i < len(old) else 0) for i, v in enumerate(value)]
        else:
            diff[name] = value - old
    return diff


def spec_counters_from(raw: dict) -> SpecCounters:
    fields = {field: raw.get(name, [] if field == "accepted_per_position" else 0)
              for name, field in SPEC_COUNTERS.items()}
    return SpecCounters(**fields)


MAX_POSITIONS = 1024  # draft positions per round; vLLM's num_speculative_tokens is far below this


def _counter_value(value: float) -> int:
    if not (math.isfinite(value) and value >= 0 and float(value).is_integer()):
        raise ValueError(f"a counter sample of {value!r}, not a count")
    return int(value)


def _position(label: str) -> int:
    if not (label.isdigit() and int(label) < MAX_POSITIONS):
        raise ValueError(f"a position label of {label!r}, not 0 to {MAX_POSITIONS - 1}")
    return int(label)


def spec_metrics_from_prometheus(text: str) -> dict:
    """The same counters from a vLLM server's /metrics text, summed over engines/labels (per position by its
    `position` label). A body that is not Prometheus text, or holds a counter that is not a count, raises
    ValueError."""
    from prometheus_client.parser import text_string_to_metric_families
    totals: dict = {}
    for family in text_string_to_metric_families(text):
        if family.name not in SPEC_COUNTERS:  # counter families are named without their samples' _total
            continue
        for sample in family.samples:
            if not sample.name.endswith("_total"):
                continue  # _created timestamps
            value = _counter_value(sample.value)
            if "position" in sample.labels:
                counts = totals.setdefault(family.name, [])
                pos = _position(sample.labels["position"])
                counts.extend([0] * (pos + 1 - len(counts)))
                counts[pos] += value
            else:
                totals[family.name] = totals.get(family.name, 0) + value
    return totals
