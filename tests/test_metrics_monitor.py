"""Metric definitions (docs/design.md) and the GPU monitor's energy arithmetic."""
import pytest

from lib.gpu_monitor import GPUMonitor, Sample, _gpu_window
from lib.metrics import acceptance, aggregate, request_metrics
from lib.types import RequestRecord, SpecCounters


def record(rid, arrival, times, spec=None, reason="length"):
    return RequestRecord(rid, 5, list(range(len(times))), "", arrival, arrival, times, reason, spec=spec)


def test_request_latencies():
    m = request_metrics(record(0, 1.0, [1.5, 1.6, 1.6, 1.9]))
    assert m.ttft_ms == pytest.approx(500) and m.e2el_ms == pytest.approx(900)
    assert m.tpot_ms == pytest.approx(400 / 3) and m.itl_per_token_ms == pytest.approx([100, 0, 300])
    # vLLM's ITL: one gap per emitted chunk (the two tokens at 1.6 came out together)
    assert m.itl_ms == pytest.approx([100, 300]) and m.chunk_tokens == [1, 2, 1]


def test_acceptance_definitions_and_aggregate():
    a = SpecCounters(num_drafts=10, draft_tokens=40, accepted_tokens=25, accepted_per_position=[9, 7, 5, 4])
    b = SpecCounters(num_drafts=5, draft_tokens=20, accepted_tokens=5, accepted_per_position=[3, 1, 1, 0])
    acc = acceptance(a.add(b))
    assert acc["acceptance_rate"] == pytest.approx(30 / 60)
    assert acc["acceptance_length"] == pytest.approx(1 + 30 / 15)
    assert acc["per_position_acceptance_rate"] == pytest.approx([12 / 15, 8 / 15, 6 / 15, 4 / 15])
    recs = [record(0, 0, [0.1, 0.2], a), record(1, 0, [0.3, 0.5], b), record(2, 0, [], None, "error")]
    agg = aggregate("hf:speculative", recs, 2.0)
    assert agg.completed == 2 and agg.failed == 1 and agg.total_output_tokens == 4
    assert agg.output_throughput == pytest.approx(2.0)
    assert agg.accepted_tokens == 30
    # an engine's run-level counters (vLLM) take precedence over per-request ones
    assert aggregate("x", recs, 2.0, engine_spec=b).accepted_tokens == 5


def test_energy_from_counter_else_integrated_power():
    counter = [Sample(t, 0, 100.0, 1000.0 + 50_000 * t, 50, 10, 40 + t) for t in (0.0, 1.0, 2.0)]
    w = _gpu_window(counter, "gpu")
    assert w["energy_j"] == pytest.approx(100.0) and w["energy_source"] == "nvml_total_energy_counter"
    assert w["peak_temp_c"] == 42 and w["avg_util_pct"] == 50
    power_only = [Sample(t, 0, p, None, None, None, None) for t, p in ((0.0, 100.0), (1.0, 200.0), (3.0, 200.0))]
    w = _gpu_window(power_only, None)
    assert w["energy_j"] == pytest.approx(150 + 400) and w["energy_source"] == "integrated_power"
    assert w["peak_power_w"] == 200
    # a window shorter than the counter's update period (seen on an H100: 0.09 s, counter unchanged): power, not 0 J
    stalled = [Sample(t, 0, 120.0, 5000.0, None, None, None) for t in (0.0, 0.05, 0.09)]
    w = _gpu_window(stalled, None)
    assert w["energy_j"] == pytest.approx(120 * 0.09) and w["energy_source"] == "integrated_power"


def test_monitor_without_nvml_records_why():
    mon = GPUMonitor(0.1, lambda: 0.0, enabled=False)
    assert not mon.available and "disabled" in mon.window(0, 1, 10)["reason"]
    mon = GPUMonitor(0.1, lambda: 0.0)
    if not mon.available:  # no GPU on this machine: the reason is recorded and nothing raises
        assert mon.reason and mon.window(0, 1, 10) == {"available": False, "reason": mon.reason}
    mon.start()
    mon.stop()
