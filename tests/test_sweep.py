"""Nightly sweeps for real on the tiny models: cron-like start, lock, a failing combination, --resume after a kill,
a planted regression, analyze.py, and the HTML report rendered in headless Chromium."""
from __future__ import annotations

import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import wait_for

from lib.files import ROOT

CRON_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": os.environ.get("HOME", "/root"),
            **{k: os.environ[k] for k in ("SPECLAB_VENV",) if k in os.environ}}  # a venv made elsewhere
TINY_FIXED = {"NUM_PROMPTS": 2, "GENERATION_LENGTH": 8, "PROMPT_FILE": "prompts/prompt_small.txt",
              "ENABLE_BATCH": True, "BATCH_SIZE": 2, "TEMPERATURE": 0}


def write_sweep(path: Path, matrix: dict, include: list | None = None, **extra) -> Path:
    import yaml
    path.write_text(yaml.safe_dump({"fixed": TINY_FIXED, "matrix": matrix, "include": include or [], **extra}))
    return path


def start_sweep(*args, env=None, preexec_fn=None) -> subprocess.Popen:
    """run_sweep.sh as cron starts it: bare environment, no terminal (own session), stdin closed."""
    return subprocess.Popen([str(ROOT / "run_sweep.sh"), *map(str, args)], env=env or CRON_ENV, cwd="/",
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, preexec_fn=preexec_fn)


def run_sweep(*args, timeout=600, preexec_fn=None) -> subprocess.CompletedProcess:
    proc = start_sweep(*args, preexec_fn=preexec_fn)
    out, err = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def file_size_limit(size: int):
    """preexec_fn: no file of the child grows past `size` bytes (what a full disk does to the write in progress)."""
    import resource
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))


def one_line_error(proc, *needles):
    assert proc.returncode == 2, proc.stdout[-1500:] + proc.stderr[-1500:]
    assert "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr
    for needle in needles:
        assert needle in proc.stderr, proc.stderr


def statuses(night: Path) -> dict:
    return {c["id"]: c for c in json.loads((night / "sweep.json").read_text())["combos"]}


@pytest.fixture(scope="module")
def night1(tmp_path_factory):
    """One tiny night: two good combinations and one with a missing model, run from cron-like conditions,
    with a second start attempted while it runs."""
    base = tmp_path_factory.mktemp("sweep")
    sweep = write_sweep(base / "tinytest.yaml", {"GAMMA_VALUE": [2, 3]}, [{"TARGET_MODEL": "/nonexistent"}])
    out = base / "out"
    first = start_sweep(sweep, "--output-root", out, "--date", "2026-01-01")
    lock = out / ".lock"
    wait_for(lambda: lock.is_file() and lock.read_text().strip(), 120, "the first sweep to take the lock")
    second = run_sweep(sweep, "--output-root", out, "--date", "2026-01-01", timeout=120)
    stdout, stderr = first.communicate(timeout=900)
    return {"sweep": sweep, "out": out, "night": out / "tinytest" / "2026-01-01", "rc": first.returncode,
            "stdout": stdout, "stderr": stderr, "second": second}


def test_cron_like_night_records_failure_and_writes_report(night1):
    night = night1["night"]
    assert night1["rc"] == 1, night1["stderr"][-2000:]  # a combination failed -> non-zero for cron mail
    combos = statuses(night)
    assert combos["gamma_value-2"]["status"] == "ok" and combos["gamma_value-3"]["status"] == "ok"
    bad = combos["target_model-nonexistent"]
    assert bad["status"] == "failed" and bad["exit_code"] == 2
    assert "TARGET_MODEL=/nonexistent" in bad["error"]
    for cid in ("gamma_value-2", "gamma_value-3"):
        results = json.loads((night / cid / "benchmark_results.json").read_text())
        assert results["config"]["GAMMA_VALUE"] == int(cid[-1])
        assert {m["status"] for m in results["modes"].values()} == {"complete"}
    log = (night / "sweep.log").read_text()
    assert "target_model-nonexistent: failed" in log and "gamma_value-3: ok" in log
    md = (night / "report.md").read_text()
    alerts, rest = md.split("## Speedup of SD over AR")
    assert "target_model-nonexistent" in alerts and "no such folder" in alerts
    assert "n/a: no GPU energy readings" in rest  # CPU machine: energy per token is n/a, said so
    for png in ("speedup.png", "acceptance.png", "latency.png"):
        assert (night / "plots" / png).stat().st_size > 5000
        assert f"plots/{png}" in md
    assert (night / "report.html").read_text().count("data:image/png;base64,") == 3


def test_second_start_is_refused_by_the_lock(night1):
    second = night1["second"]
    assert second.returncode == 75
    assert "another sweep is running" in second.stderr and "tinytest" in second.stderr
    assert second.stderr.count("\n") == 1  # one line, no traceback


def test_planted_regression_is_flagged(night1):
    out, night = night1["out"], night1["night"]
    copy = night.parent / "2026-01-02"
    shutil.copytree(night, copy)
    state = json.loads((copy / "sweep.json").read_text())
    state["combos"] = [c for c in state["combos"] if c["status"] == "ok"]  # tonight: nothing failed
    (copy / "sweep.json").write_text(json.dumps(state))
    args = (night1["sweep"], "--output-root", out, "--date", "2026-01-02", "--report-only")
    same = run_sweep(*args, timeout=120)
    assert same.returncode == 0, same.stdout + same.stderr  # an identical night is no regression

    path = copy / "gamma_value-3" / "benchmark_results.json"
    results = json.loads(path.read_text())
    for comp in results["comparisons"]:
        comp["output_throughput_speedup"] *= 0.5  # plant: SD got twice slower relative to AR
    path.write_text(json.dumps(results))
    flagged = run_sweep(*args, timeout=120)
    assert flagged.returncode == 1
    assert "regression" in flagged.stdout and "gamma_value-3" in flagged.stdout
    md = (copy / "report.md").read_text()
    alerts = md.split("## Speedup of SD over AR")[0]
    assert re.search(r"\| gamma_value-3 \| hf:speculative \| speedup \|.*\| -50\.0% \|", alerts)
    assert "gamma_value-2" not in alerts  # untouched combination: not flagged
    report = json.loads((copy / "report.json").read_text())
    assert report["previous"] == "2026-01-01" and [r["metric"] for r in report["regressions"]] == ["speedup"]
    assert (copy / "plots" / "trend.png").stat().st_size > 5000


def test_resume_after_kill_runs_only_what_was_missing(tmp_path):
    sweep = write_sweep(tmp_path / "resumetest.yaml", {"GAMMA_VALUE": [2, 4]})
    out, night = tmp_path / "out", tmp_path / "out" / "resumetest" / "2026-01-05"
    proc = start_sweep(sweep, "--output-root", out, "--date", "2026-01-05")
    wait_for(lambda: (night / "sweep.json").is_file() and statuses(night)["gamma_value-2"]["status"] == "ok",
             600, "the first combination")
    os.killpg(proc.pid, signal.SIGTERM)  # what cron's timeout or a shutdown does
    proc.communicate(timeout=120)
    assert proc.returncode == 130
    assert statuses(night)["gamma_value-4"]["status"] in ("interrupted", "pending")
    done_file = night / "gamma_value-2" / "benchmark_results.json"
    stamp = done_file.stat().st_mtime_ns

    resumed = run_sweep(sweep, "--output-root", out, "--date", "2026-01-05", "--resume")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert done_file.stat().st_mtime_ns == stamp  # the finished combination was not rerun
    assert "gamma_value-2: done on an earlier run, skipped" in resumed.stdout
    assert "[2/2] gamma_value-4: ok" in resumed.stdout
    assert {c["status"] for c in statuses(night).values()} == {"ok"}
    assert (night / "report.html").is_file()


def test_a_stop_as_a_benchmark_starts_stops_that_benchmark_too(tmp_path):
    """A SIGTERM that lands as Popen returns (the window a cron timeout hits when combinations are short) is held
    until the sweep can stop its child: the combination is recorded as interrupted, and no orphan benchmark keeps
    the sweep's lock (a --resume right after is not refused)."""
    sweep = write_sweep(tmp_path / "startstop.yaml", {"GAMMA_VALUE": [2]})
    out, night = tmp_path / "out", tmp_path / "out" / "startstop" / "2026-01-06"
    stop_as_it_starts = (
        "import os, signal, subprocess, sys\n"
        "from lib import sweep\n"
        "class StoppedAsItStarts(subprocess.Popen):\n"
        "    def __init__(self, args, *rest, **kwargs):\n"
        "        super().__init__(args, *rest, **kwargs)\n"
        "        if str(args[0]).endswith('run_benchmark.sh'):\n"
        "            os.kill(os.getpid(), signal.SIGTERM)\n"
        "sweep.subprocess.Popen = StoppedAsItStarts\n"
        "sys.exit(sweep.main(sys.argv[1:]))\n")
    proc = subprocess.run([sys.executable, "-c", stop_as_it_starts, str(sweep), "--output-root", str(out),
                           "--date", "2026-01-06"], cwd=ROOT, env={**CRON_ENV, "PYTHONPATH": str(ROOT)},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 130, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    combo = json.loads((night / "gamma_value-2" / "combo.json").read_text())
    assert combo["status"] == "interrupted" and combo["exit_code"] is not None
    resumed = run_sweep(sweep, "--output-root", out, "--date", "2026-01-06", "--resume", timeout=300)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "[1/1] gamma_value-2: ok" in resumed.stdout


def test_bad_sweep_file_is_one_line_exit_2(tmp_path):
    bad = write_sweep(tmp_path / "bad.yaml", {"GAMMA_VALUES": [2]})
    proc = subprocess.run([sys.executable, "-m", "lib.sweep", str(bad)], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2 and "GAMMA_VALUES: not a SpecLab variable" in proc.stderr
    assert "Traceback" not in proc.stderr
    bad_value = write_sweep(tmp_path / "bad2.yaml", {"GAMMA_VALUE": [2, "many"]})
    proc = subprocess.run([sys.executable, "-m", "lib.sweep", str(bad_value)], cwd=ROOT, capture_output=True,
                          text=True)
    assert proc.returncode == 2 and "GAMMA_VALUE='many'" in proc.stderr
    both = write_sweep(tmp_path / "both.yaml", {"NUM_PROMPTS": [1, 2]})  # NUM_PROMPTS is one of TINY_FIXED's too
    proc = subprocess.run([sys.executable, "-m", "lib.sweep", str(both)], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2 and "NUM_PROMPTS is in both fixed and matrix" in proc.stderr


def test_analyze_reads_folders_into_csv_and_markdown(night1, tmp_path):
    csv_path, md_path = tmp_path / "t.csv", tmp_path / "t.md"
    proc = subprocess.run([sys.executable, "analyze.py", str(night1["out"] / "tinytest" / "2026-01-0*"),
                           "--csv", str(csv_path), "--md", str(md_path)], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    rows = list(csv.DictReader(csv_path.open()))
    assert len(rows) >= 4  # 2 combinations x 2 modes, per night found
    assert {r["mode"] for r in rows} == {"hf:target", "hf:speculative"}
    assert {r["GAMMA_VALUE"] for r in rows} == {"2", "3"}  # the varying config shows as a column
    sd = [r for r in rows if r["mode"] == "hf:speculative"]
    assert all(0 < float(r["acceptance_rate"]) <= 1 and float(r["speedup"]) > 0 for r in sd)
    md = md_path.read_text().splitlines()
    assert md[0].startswith("| run | mode | GAMMA_VALUE |") and len(md) == 2 + len(rows)


def test_report_html_renders_with_figures_in_chromium(night1, chromium_render):
    dom, images, pixels = chromium_render(night1["night"] / "report.html")
    assert len(images) == 3
    assert all(min(image.size) > 100 for image in images)
    import numpy as np
    # matplotlib's first series colour (#1f77b4) only appears where a plot was painted
    blue = (np.abs(pixels - np.array([31, 119, 180])).max(axis=2) < 25).sum()
    assert blue > 500


def test_time_budget_stops_the_running_combination_and_skips_the_rest(tmp_path):
    sweep = write_sweep(tmp_path / "budgettest.yaml", {"GAMMA_VALUE": [2, 4]})
    night = tmp_path / "out" / "budgettest" / "2026-01-07"
    proc = run_sweep(sweep, "--output-root", tmp_path / "out", "--date", "2026-01-07", "--budget-min", "0.05")
    assert proc.returncode == 1  # an incomplete night is reported to cron
    combos = statuses(night)
    assert combos["gamma_value-2"]["status"] == "timeout" and "time budget" in combos["gamma_value-2"]["error"]
    assert combos["gamma_value-4"]["status"] == "skipped_budget"
    assert "skipped_budget" in (night / "report.md").read_text().split("## Speedup")[0]


# ---------------------------------------------------------------- damaged nights, outputs in the way, stops

def copy_night(night1, out: Path, date: str) -> Path:
    """night1's combinations that ran ok, as night `date` of its sweep under `out`."""
    copy = out / "tinytest" / date
    shutil.copytree(night1["night"], copy, ignore=shutil.ignore_patterns("report.*", "plots"))
    shutil.rmtree(copy / "target_model-nonexistent")
    state = json.loads((copy / "sweep.json").read_text())
    state["combos"] = [c for c in state["combos"] if c["status"] == "ok"]
    (copy / "sweep.json").write_text(json.dumps(state))
    return copy


def report_only(night1, out: Path, date: str, **kwargs) -> subprocess.CompletedProcess:
    return run_sweep(night1["sweep"], "--output-root", out, "--date", date, "--report-only", timeout=120, **kwargs)


def edit_json(path: Path, change):
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def set_acceptance_length(value):
    def change(results):
        results["modes"]["hf:speculative"]["metrics"]["acceptance"]["acceptance_length"] = value
    return change


def report_failures(night: Path) -> dict:
    return {f["id"]: (f["status"], f["error"]) for f in json.loads((night / "report.json").read_text())["failed"]}


def test_a_damaged_earlier_night_is_left_out_of_the_comparison(night1, tmp_path):
    out = tmp_path / "out"
    earlier, _ = copy_night(night1, out, "2026-01-01"), copy_night(night1, out, "2026-01-02")
    results = earlier / "gamma_value-2" / "benchmark_results.json"
    edit_json(results, set_acceptance_length("3.1"))  # a number as text, in the night compared with
    proc = report_only(night1, out, "2026-01-02")
    assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]
    assert "no regression against 2026-01-01" in proc.stdout
    proc = report_only(night1, out, "2026-01-01")  # in its own report the combination is unreadable
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert report_failures(earlier) == {"gamma_value-2": (
        "unreadable", f"{results}: not a SpecLab result file: mode 'hf:speculative': acceptance_length: found text "
                      "'3.1'; accepted: a finite number or null")}

    edit_json(earlier / "sweep.json", lambda state: state["combos"][0].pop("status"))
    proc = report_only(night1, out, "2026-01-02")
    assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]
    assert "(no previous night to compare with)" in proc.stdout
    trend = (out / "tinytest" / "2026-01-02" / "report.md").read_text().split("## Trend")[1]
    assert f"{earlier / 'sweep.json'}: not a sweep state file: combos[0].status: missing" in trend


@pytest.mark.parametrize("damage", ["missing", "folder", "text metric", "null in a list"])
def test_a_damaged_result_file_makes_only_its_combination_unreadable(night1, tmp_path, damage):
    out = tmp_path / "out"
    night = copy_night(night1, out, "2026-01-02")
    results = night / "gamma_value-3" / "benchmark_results.json"
    if damage in ("missing", "folder"):
        results.unlink()
    if damage == "folder":
        results.mkdir()
    if damage == "text metric":
        edit_json(results, set_acceptance_length("3.1"))
    if damage == "null in a list":
        edit_json(results, lambda r: r["modes"]["hf:speculative"]["metrics"]["acceptance"].update(
            per_position_acceptance_rate=[0.5, None]))
    proc = report_only(night1, out, "2026-01-02")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "1 combination(s) not ok: gamma_value-3" in proc.stdout
    status, error = report_failures(night)["gamma_value-3"]
    assert status == "unreadable" and error.startswith(f"{results}: not a SpecLab result file: "), error
    assert {"missing": "no such file", "folder": "is a folder", "text metric": "found text '3.1'",
            "null in a list": "per_position_acceptance: found a list [0.5, None]"}[damage] in error
    md = (night / "report.md").read_text()
    assert "| gamma_value-2 | hf:speculative | 2 |" in md  # the other combination is still reported


@pytest.mark.parametrize("state,words", [
    ([1, 2], "not a sweep state file: found a list [1, 2]; accepted: a mapping with keys"),
    ({"combos": [{"id": "gamma_value-2", "vars": None, "status": "ok"}]},
     "not a sweep state file: combos[0].vars: found an empty value"),
    ({"combos": [{"id": "../../etc", "vars": {}, "status": "ok"}]},
     "not a sweep state file: combos[0].id: text '../../etc': expected one folder name"),
])
def test_a_damaged_sweep_state_is_one_line_naming_it(night1, tmp_path, state, words):
    out = tmp_path / "out"
    night = copy_night(night1, out, "2026-01-02")
    copy_night(night1, out, "2026-01-01")
    (night / "sweep.json").write_text(json.dumps(state))
    one_line_error(report_only(night1, out, "2026-01-02"), f"error: {night / 'sweep.json'}: {words}")
    assert not (night / "report.md").exists()


def test_a_full_disk_leaves_the_previous_report_whole(night1, tmp_path):
    out = tmp_path / "out"
    night = copy_night(night1, out, "2026-01-02")
    assert report_only(night1, out, "2026-01-02").returncode == 0
    written = sorted([*night.glob("report.*"), *night.glob("plots/*")])
    before = {p: (p.stat().st_ino, p.read_bytes()) for p in written}
    assert len(before) == 6 and (night / "report.html").stat().st_size > 100_000
    proc = report_only(night1, out, "2026-01-02", preexec_fn=file_size_limit(100_000))  # the HTML is larger
    one_line_error(proc, f"error: {night / 'report.html'}: cannot be written (File too large); it is left as it was")
    assert sorted([*night.glob("report.*"), *night.glob("plots/*")]) == written and not list(night.glob(".*"))
    assert {p: (p.stat().st_ino, p.read_bytes()) for p in written} == before  # not one of them replaced


def test_outputs_in_the_way_are_one_line_before_anything_runs(tmp_path):
    sweep = write_sweep(tmp_path / "waytest.yaml", {"GAMMA_VALUE": [2]})
    night = tmp_path / "out" / "waytest" / "2026-01-09"
    args = (sweep, "--output-root", tmp_path / "out", "--date", "2026-01-09")
    for blocker, words in ((tmp_path / "out" / ".lock", "cannot be opened (Is a directory)"),  # before any lock file
                           (night / "sweep.json", "is a folder; expected the path of a file to write"),
                           (night / "sweep.log", "is a folder; expected the path of a file to write"),
                           (night / "report.html", "is a folder; expected the path of a file to write"),
                           (night / "plots" / "trend.png", "is a folder; expected the path of a file to write")):
        blocker.mkdir(parents=True)
        one_line_error(run_sweep(*args, timeout=120), f"{blocker}: {words}")
        assert not (night / "gamma_value-2").exists() and not (night / "sweep.log").is_file()
        shutil.rmtree(blocker)
    shutil.rmtree(night / "plots")
    (night / "plots").write_text("")
    one_line_error(run_sweep(*args, timeout=120), f"{night / 'plots'} is a file, not a folder")
    assert not (night / "gamma_value-2").exists()


def test_analyze_skips_folders_named_like_results_and_names_damaged_files(night1, tmp_path):
    runs = tmp_path / "runs"
    shutil.copytree(night1["night"] / "gamma_value-2", runs / "good")
    (runs / "odd" / "benchmark_results.json").mkdir(parents=True)
    table_csv = tmp_path / "t.csv"
    proc = subprocess.run([sys.executable, "analyze.py", str(runs), "--csv", str(table_csv)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert {r["run"] for r in csv.DictReader(table_csv.open())} == {"good"}

    before = table_csv.read_bytes()
    proc = subprocess.run([sys.executable, "analyze.py", str(runs), "--md", str(tmp_path / "t.md"), "--csv",
                           str(table_csv)], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          preexec_fn=file_size_limit(0))
    one_line_error(proc, f"error: {table_csv}: cannot be written (File too large)")
    assert table_csv.read_bytes() == before and not (tmp_path / "t.md").exists()

    results = runs / "good" / "benchmark_results.json"
    for value in (["a", 1], [0.5, None]):
        edit_json(results, lambda r, value=value: r["modes"]["hf:speculative"]["metrics"]["acceptance"].update(
            per_position_acceptance_rate=value))
        proc = subprocess.run([sys.executable, "analyze.py", str(runs), "--csv", "-"], cwd=ROOT,
                              capture_output=True, text=True, timeout=120)
        one_line_error(proc, f"error: {results}: not a SpecLab result file: mode 'hf:speculative': "
                             f"per_position_acceptance: found a list {value!r}; accepted: a list of finite numbers")


def stop_sweep(tmp_path, name: str, date: str) -> tuple[Path, list]:
    """A sweep of one short target-only combination (gamma_value-2, as in night1), and its command line."""
    import yaml
    sweep = tmp_path / f"{name}.yaml"
    sweep.write_text(yaml.safe_dump({"fixed": {**TINY_FIXED, "INFERENCE_METHOD": "target"},
                                     "matrix": {"GAMMA_VALUE": [2]}}))
    return tmp_path / "out" / name / date, [sweep, "--output-root", tmp_path / "out", "--date", date]


def test_a_night_after_a_damaged_one_ends_with_its_report(night1, tmp_path):
    night, args = stop_sweep(tmp_path, "tinytest", "2026-01-02")
    earlier = copy_night(night1, tmp_path / "out", "2026-01-01")
    edit_json(earlier / "gamma_value-2" / "benchmark_results.json",
              lambda r: r["modes"]["hf:target"]["metrics"].update(output_throughput="3.1"))
    proc = run_sweep(*args)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and "night 2026-01-02: all combinations ok" in proc.stdout
    assert json.loads((night / "report.json").read_text())["previous"] == "2026-01-01"


def test_a_stop_while_the_report_is_written_is_one_line_and_exit_130(tmp_path):
    night, args = stop_sweep(tmp_path, "stoptest", "2026-01-03")
    proc = start_sweep(*args)

    def reporting():
        try:
            return json.loads((night / "sweep.json").read_text())["finished"] is not None
        except (OSError, ValueError):
            return False
    wait_for(reporting, 600, "the combinations to finish", poll=0.002)
    os.killpg(proc.pid, signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in err, out[-2000:] + err[-2000:]
    assert "interrupted while writing the report: every combination is kept; --resume writes it" in out
    assert not list(night.glob(".*")) and not list(night.glob("plots/.*"))  # no half-written file
    assert statuses(night)["gamma_value-2"]["status"] == "ok"
    resumed = run_sweep(*args, "--resume")
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    assert "done on an earlier run, skipped" in resumed.stdout and (night / "report.html").is_file()
