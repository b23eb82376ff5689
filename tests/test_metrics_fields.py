"""ModeMetrics' fields are the one list of metrics: the result file's layout, the console summary, the report rows,
analyze.py's columns, the regression metrics and compare() are all derived from them."""
import io
import json
from dataclasses import fields

import pytest

import analyze
from lib import sweep_report as report
from lib.metrics import COLUMNS, GROUPS, ModeMetrics, aggregate, compare, summarize
from lib.results import comparison_line, print_summary, summary_columns
from lib.types import RequestRecord, SpecCounters


def record(rid, times, spec=None, reason="length"):
    return RequestRecord(rid, 5, list(range(len(times))), "", 0.0, 0.0, times, reason, spec=spec)


def spec_metrics() -> ModeMetrics:
    recs = [record(0, [0.125, 0.375], SpecCounters(2, 4, 2, [2, 0])),
            record(1, [0.25, 0.5, 1.0], SpecCounters(1, 2, 1, [1, 0])), record(2, [], None, "error")]
    return aggregate("hf:speculative", recs, 2.0)


def target_metrics() -> ModeMetrics:
    return aggregate("hf:target", [record(0, [0.125, 0.25]), record(1, [0.25, 0.5])], 1.0)


def result(metrics: ModeMetrics, energy_j=None) -> dict:
    energy = {"available": True, "energy_per_output_token_j": energy_j} if energy_j else \
        {"available": False, "reason": "no GPU"}
    return {"status": "complete", "error": None, "metrics": metrics.to_json(), "energy": energy}


def test_to_json_keeps_the_result_file_layout():
    out = spec_metrics().to_json()
    # ttft [125, 250], tpot [250, 375], itl [250, 250, 500], e2el [375, 1000] ms
    latency = {"mean_ttft_ms": 187.5, "median_ttft_ms": 187.5, "std_ttft_ms": 62.5, "p90_ttft_ms": 237.5,
               "p99_ttft_ms": 248.75, "mean_tpot_ms": 312.5, "median_tpot_ms": 312.5, "std_tpot_ms": 62.5,
               "p90_tpot_ms": 362.5, "p99_tpot_ms": 373.75, "mean_itl_ms": 1000 / 3, "median_itl_ms": 250.0,
               "std_itl_ms": (2 * (250 / 3) ** 2 + (500 / 3) ** 2) ** 0.5 / 3 ** 0.5, "p90_itl_ms": 450.0,
               "p99_itl_ms": 495.0, "mean_itl_per_token_ms": 1000 / 3, "median_itl_per_token_ms": 250.0,
               "std_itl_per_token_ms": (2 * (250 / 3) ** 2 + (500 / 3) ** 2) ** 0.5 / 3 ** 0.5,
               "p90_itl_per_token_ms": 450.0, "p99_itl_per_token_ms": 495.0, "mean_e2el_ms": 687.5,
               "median_e2el_ms": 687.5, "std_e2el_ms": 312.5,
               "p90_e2el_ms": 937.5, "p99_e2el_ms": 993.75}
    assert list(out) == ["mode", "completed", "failed", "duration_s", "duration", "total_input_tokens",
                         "total_output_tokens", "request_throughput", "output_throughput", "total_token_throughput",
                         "request_goodput", "max_output_tokens_per_s", "max_concurrent_requests",
                         "mean_tokens_per_chunk", "latency", "acceptance"]
    assert {k: v for k, v in out.items() if k not in GROUPS} == {
        "mode": "hf:speculative", "completed": 2, "failed": 1, "duration_s": 2.0, "duration": 2.0,
        "total_input_tokens": 10, "total_output_tokens": 5, "request_throughput": 1.0, "output_throughput": 2.5,
        "total_token_throughput": 7.5, "request_goodput": None, "max_output_tokens_per_s": 4.0,
        "max_concurrent_requests": 2, "mean_tokens_per_chunk": 1.0}
    assert list(out["latency"]) == list(latency) and out["latency"] == pytest.approx(latency)
    assert out["acceptance"] == {"num_drafts": 3, "draft_tokens": 6, "accepted_tokens": 3, "acceptance_rate": 0.5,
                                 "acceptance_length": 2.0, "per_position_acceptance_rate": [1.0, 0.0],
                                 "spec_decode_acceptance_rate": 50.0, "spec_decode_acceptance_length": 2.0,
                                 "spec_decode_num_drafts": 3, "spec_decode_draft_tokens": 6,
                                 "spec_decode_accepted_tokens": 3,
                                 "spec_decode_per_position_acceptance_rates": [1.0, 0.0], "per_category": {}}
    assert json.loads(json.dumps(out)) == out


def test_every_field_has_a_group_and_aggregate_fills_the_latency_stats():
    groups = {f.name: f.metadata["group"] for f in fields(ModeMetrics)}
    assert set(groups.values()) == {"top", *GROUPS}
    stats = [k for m in ("ttft_ms", "tpot_ms", "itl_ms", "itl_per_token_ms", "e2el_ms") for k in summarize([], m)]
    assert [name for name, g in groups.items() if g == "latency"] == stats


def test_rows_analyze_and_regressions_come_from_the_columns():
    rows = [c.name for c in COLUMNS if c.row]
    assert report.RUN_KEYS + rows == report.ROW_KEYS and analyze.ROW_KEYS is report.ROW_KEYS
    assert analyze.SHORT_KEYS[:2] == ["run", "mode"] and set(analyze.SHORT_KEYS) <= set(report.ROW_KEYS)
    assert [k for k in analyze.SHORT_KEYS if k not in report.RUN_KEYS] == [c.name for c in COLUMNS if c.short]
    assert all(c.row for c in COLUMNS if c.short)
    assert {c.name: c.higher_is_better for c in COLUMNS if c.regress} == report.REGRESSION_METRICS
    assert None not in report.REGRESSION_METRICS.values() and set(report.REGRESSION_METRICS) <= set(rows)
    for f in fields(ModeMetrics):
        row = f.metadata["row"]
        if row:
            assert (row if isinstance(row, str) else f.name) in report.ROW_KEYS
    assert len({c.name for c in COLUMNS}) == len(COLUMNS)


def test_compare_and_report_rows_of_a_written_run(tmp_path):
    sd, ar = result(spec_metrics(), 0.25), result(target_metrics(), 0.5)
    comp = compare(ar, sd)
    # AR: 4 tokens in 1 s, mean TPOT 187.5 ms, mean E2EL 375 ms
    assert comp == {"baseline": "hf:target", "mode": "hf:speculative", "output_throughput_speedup": 2.5 / 4,
                    "tpot_speedup": 187.5 / 312.5, "e2el_speedup": 375 / 687.5, "energy_per_token_ratio": 0.5}
    assert compare(result(target_metrics()), result(spec_metrics()))["energy_per_token_ratio"] is None
    run = tmp_path / "run1"
    run.mkdir()
    (run / "benchmark_results.json").write_text(json.dumps({
        "config": {"GAMMA_VALUE": 3}, "modes": {"hf:target": ar, "hf:speculative": sd}, "comparisons": [comp]}))
    target, spec = report.run_rows(run)
    assert list(spec) == report.ROW_KEYS + ["energy_note", "config"]
    assert spec["speedup"] == comp["output_throughput_speedup"] and spec["tpot_speedup"] == comp["tpot_speedup"]
    assert spec["per_position_acceptance"] == [1.0, 0.0] and spec["energy_per_token_j"] == 0.25
    assert spec["p99_ttft_ms"] == pytest.approx(248.75) and spec["gamma"] == 3 and target["gamma"] is None
    assert target["speedup"] is None and target["per_position_acceptance"] == []


def test_console_summary_columns_and_comparison_line():
    assert list(summary_columns()) == ["done", "out tok/s", "TTFT ms (mean/p99)", "TPOT ms (mean/p99)",
                                       "ITL ms (mean)", "E2EL ms (mean)", "accept rate", "accept len", "J/token",
                                       "BW eff", "path", "lossless"]
    sd, ar = result(spec_metrics()), result(target_metrics(), 0.5)
    sd["lossless"] = {"verdict": "exact", "baseline": "hf:target", "differences": [], "not_compared": 0}
    comp = compare(ar, sd)
    assert comparison_line(comp) == ("hf:speculative vs hf:target: output throughput x0.62, TPOT x0.60, "
                                     "energy/token ratio -")
    from rich.console import Console
    buf = io.StringIO()
    print_summary({"hf:target": ar, "hf:speculative": sd}, [comp], "out", Console(file=buf, width=250))
    line = next(ln for ln in buf.getvalue().splitlines() if "hf:speculative" in ln and "│" in ln)
    cells = [c.strip() for c in line.strip("│ ").split("│")]
    assert cells == ["hf:speculative", "complete", "2", "2.5", "187.5 / 248.8", "312.50 / 373.75", "333.33",
                     "687.5", "0.500", "2.00", "n/a", "-", "-", "exact"]


def test_summary_shows_the_decode_path_and_warns_on_an_overhead_bound_gpu_run():
    from rich.console import Console
    sd, ar = result(spec_metrics()), result(target_metrics())
    sd["engine"] = {"engine": "hf", "device": "cuda", "fast_path": False}
    ar["engine"] = {"engine": "hf", "device": "cuda", "fast_path": True}
    sd["bandwidth"], ar["bandwidth"] = {"bandwidth_efficiency": 0.04}, {"bandwidth_efficiency": 0.6}
    buf = io.StringIO()
    print_summary({"hf:target": ar, "hf:speculative": sd}, [], "out", Console(file=buf, width=250))
    lines = buf.getvalue().splitlines()
    cells = {ln.split("│")[1].strip(): ln.split("│")[-3].strip() for ln in lines if "│ hf:" in ln}
    assert cells == {"hf:target": "fast", "hf:speculative": "plain"}
    warnings = [ln for ln in lines if ln.startswith("warning: BW eff")]
    assert len(warnings) == 1 and "hf:speculative (0.040)" in warnings[0] and "hf:target" not in warnings[0]
    assert lines.index(warnings[0]) == max(i for i, ln in enumerate(lines) if ln.startswith("└")) + 1
    sd["engine"]["device"] = "cpu"  # CPU runs are not judged against the floor
    buf = io.StringIO()
    print_summary({"hf:speculative": sd}, [], "out", Console(file=buf, width=250))
    assert "warning" not in buf.getvalue()
