"""Nothing finished is lost or mixed, and no small input hangs or blows up memory: real runs of benchmark.py and
run_sweep.sh on the tiny models, with signals sent at real moments (a request line appearing, a run starting)."""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import conftest
import pytest

from lib.files import ROOT

TINY = {"ENABLE_GPU_MONITOR": "false", "PROMPT_FILE": "prompts/prompt_small.txt", "GENERATION_LENGTH": "8",
        "NUM_PROMPTS": "2"}
# Nested aliases: about 300 bytes of YAML that expand to 9**7 strings
BOMB = "\n".join(['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]'] + [
    f"{b}: &{b} [{', '.join(['*' + a] * 9)}]" for a, b in zip("abcdef", "bcdefg")])


def bench_env(results: Path, **env) -> dict:
    return {**os.environ, **TINY, "RESULTS_DIR": str(results), "RUN_ID": "run", **{k: str(v) for k, v in env.items()}}


def start_benchmark(results: Path, **env) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "benchmark.py"], cwd=ROOT, env=bench_env(results, **env),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def run_benchmark(results: Path, *args, timeout=300, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "benchmark.py", *args], cwd=ROOT, env=bench_env(results, **env),
                          capture_output=True, text=True, timeout=timeout)




def wait_for(predicate, timeout=180, what="condition", poll=0.002):
    """conftest's, polling fast: these tests signal a run between two of its requests."""
    conftest.wait_for(predicate, timeout, what, poll)


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def one_line_error(proc, *needles):
    assert proc.returncode == 2, proc.stdout[-1500:] + proc.stderr[-1500:]
    assert "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr
    for needle in needles:
        assert needle in proc.stderr, proc.stderr


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"  # a zombie is dead
    except FileNotFoundError:
        return False


# ---------------------------------------------------------------- A. finished work lost or mixed

def test_stop_signals_wait_for_held_work_and_stop_once():
    from lib.interrupts import Interrupted, StopSignals
    with StopSignals() as stop:
        with pytest.raises(Interrupted) as exc, stop.held():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)
            saved = True  # the held work ran to its end
        assert saved and exc.value.exit_code == 143 and isinstance(exc.value, KeyboardInterrupt)
        os.kill(os.getpid(), signal.SIGINT)  # a second stop signal: only noted
        time.sleep(0.05)
        assert stop.signum == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the previous handlers are back


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_stop_signal_as_the_last_request_finishes_keeps_the_mode(tmp_path, sig):
    """The signal lands between a mode's last request and its saving: the finished mode is kept, the run says
    interrupted with the shell's exit code, for Ctrl-C, plain `kill` and a closed terminal alike."""
    proc = start_benchmark(tmp_path, NUM_PROMPTS=4)
    requests = tmp_path / "run" / "requests_hf_target.jsonl"
    wait_for(lambda: requests.is_file() and requests.read_text().count("\n") >= 4, what="the 4th request line")
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, err[-2000:]
    assert "Traceback" not in err
    results = read_json(tmp_path / "run" / "benchmark_results.json")
    target = results["modes"]["hf:target"]
    assert target["metrics"]["completed"] == 4 == len(lines(requests))
    assert results["modes"].get("hf:speculative", {"status": "interrupted"})["status"] == "interrupted"
    run = read_json(tmp_path / "run" / "run.json")
    assert (run["status"], run["exit_code"], results["status"]) == ("interrupted", 128 + sig, "interrupted")
    assert run["finished"] and "interrupted" in out.lower()


def test_one_run_per_folder_kill_leaves_files_and_rerun_needs_overwrite(tmp_path):
    """While a run writes RUN_ID=run a second one is refused; SIGKILL in the first mode still leaves result files
    naming what ran; a rerun into the folder is refused, and OVERWRITE=true starts it clean (no old lines)."""
    first = start_benchmark(tmp_path, NUM_PROMPTS=400, GENERATION_LENGTH=32, INFERENCE_METHOD="target")
    run_dir = tmp_path / "run"
    requests = run_dir / "requests_hf_target.jsonl"
    try:
        wait_for(lambda: requests.is_file() and requests.read_text().count("\n") >= 1, what="a request line")
        second = run_benchmark(tmp_path, INFERENCE_METHOD="target", OVERWRITE="true", timeout=120)
        one_line_error(second, "RUN_ID='run'", "is being written by another run", f"pid {first.pid}")
        assert first.poll() is None  # the refused run touched nothing of the first one
    finally:
        first.kill()
        first.communicate(timeout=60)
    done = lines(requests)
    results, run = read_json(run_dir / "benchmark_results.json"), read_json(run_dir / "run.json")
    assert results["status"] == run["status"] == "running" and run["exit_code"] is None
    assert results["running_mode"] == run["running_mode"] == "hf:target" and run["pid"] == first.pid
    assert len(done) >= 1 and len({r["request_id"] for r in done}) == len(done)

    again = run_benchmark(tmp_path, INFERENCE_METHOD="target", timeout=120)
    one_line_error(again, "RUN_ID='run'", "already holds a run (run.json", "OVERWRITE=true")
    assert lines(requests) == done  # nothing appended

    stale = run_dir / "bench_serve_hf_speculative.json"  # a mode of an older run that this one does not run
    stale.write_text("{}")
    fresh = run_benchmark(tmp_path, INFERENCE_METHOD="target", OVERWRITE="true")
    assert fresh.returncode == 0, fresh.stderr[-2000:]
    assert sorted(r["request_id"] for r in lines(requests)) == [0, 1]  # 2 new lines, none of the old run
    assert not stale.exists() and (run_dir / "bench_serve_hf_target.json").is_file()
    run = read_json(run_dir / "run.json")
    assert (run["status"], run["exit_code"]) == ("ok", 0) and run["pid"] != first.pid
    assert read_json(run_dir / "benchmark_results.json")["status"] == "ok"
    assert not list(run_dir.glob(".*"))  # no lock or temporary file left behind


def test_a_mode_that_fails_to_start_is_recorded_with_the_real_exit_code(tmp_path):
    """SGLang cannot start on this CPU machine: its mode gets an entry with the error, and run.json says failed
    with exit code 2 (not 0), after the finished target mode was kept."""
    proc = run_benchmark(tmp_path, COMPARE_MODES="hf:target sglang:target")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    results = read_json(tmp_path / "run" / "benchmark_results.json")
    failed = results["modes"]["sglang:target"]
    assert failed["status"] == "failed" and failed["error"] and failed["error"] in proc.stderr
    assert results["modes"]["hf:target"]["metrics"]["completed"] == 2
    run = read_json(tmp_path / "run" / "run.json")
    assert (run["status"], run["exit_code"], results["status"]) == ("failed", 2, "failed")
    assert run["error"] == failed["error"] and run["finished"]


@pytest.mark.parametrize("run_id", ["../../escape", "/tmp/absolute", "a/b", "..", ".", "x\ny", "x" * 201])
def test_run_id_is_one_folder_name(run_id):
    from lib import config as C
    from lib.errors import UsageError
    with pytest.raises(UsageError, match=r"^RUN_ID=.*: expected one folder name"):
        C.resolve(None, environ={"RUN_ID": run_id})


def test_names_that_become_folders_escape_nothing(tmp_path):
    """RUN_ID in a real run (and --dry-run), workflow.py's --run-id, run_single_config.py's --config-name."""
    results = tmp_path / "deep" / "results"
    for args in ((), ("--dry-run",)):
        one_line_error(run_benchmark(results, *args, RUN_ID="../../escape", timeout=60),
                       "RUN_ID='../../escape': expected one folder name")
    proc = subprocess.run([sys.executable, "workflow.py", "--results-dir", str(results), "--run-id", "../escape"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    one_line_error(proc, "--run-id='../escape': expected one folder name")
    proc = subprocess.run([sys.executable, "run_single_config.py", "--config-name", "../../x"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    one_line_error(proc, "--config-name='../../x': expected one folder name")
    assert not list(tmp_path.rglob("*"))


def test_sweep_child_dies_with_the_sweep_and_resume_waits_for_it(tmp_path):
    """SIGKILL of the sweep: its benchmark child (held stopped here, so it is surely still there) keeps the lock, so
    --resume is refused; once it runs again it gets SIGTERM, saves and ends; the combination is not ok until a
    resume reruns it cleanly."""
    import yaml
    sweep = tmp_path / "killtest.yaml"

    def write_sweep(num_prompts):
        fixed = {**TINY, "INFERENCE_METHOD": "target", "NUM_PROMPTS": num_prompts}
        sweep.write_text(yaml.safe_dump({"fixed": fixed, "matrix": {"SEED": [1]}}))

    write_sweep(400)  # surely still running when it is stopped
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/root"),
           **{k: os.environ[k] for k in ("SPECLAB_VENV",) if k in os.environ}}
    cmd = [str(ROOT / "run_sweep.sh"), str(sweep), "--output-root", str(tmp_path / "out"), "--date", "2026-02-01"]
    night = tmp_path / "out" / "killtest" / "2026-02-01"
    run_json = night / "seed-1" / "run.json"
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    wait_for(lambda: run_json.is_file(), what="the benchmark child's run.json")
    child = read_json(run_json)["pid"]
    os.kill(child, signal.SIGSTOP)
    try:
        os.kill(proc.pid, signal.SIGKILL)  # the sweep only, not its group
        proc.communicate(timeout=60)
        assert read_json(night / "sweep.json")["combos"][0]["status"] == "running"
        refused = subprocess.run([*cmd, "--resume"], env=env, capture_output=True, text=True, timeout=120)
        assert refused.returncode == 75 and "another sweep is running" in refused.stderr, refused.stderr
    finally:
        os.kill(child, signal.SIGCONT)
    wait_for(lambda: not alive(child), 60, "the orphaned benchmark to end", poll=0.1)
    stopped = read_json(run_json)
    assert (stopped["status"], stopped["exit_code"]) == ("interrupted", 143), \
        (night / "seed-1" / "stderr.log").read_text()[-3000:]  # SIGTERM, handled like Ctrl-C

    write_sweep(2)  # the rerun: short
    resumed = subprocess.run([*cmd, "--resume"], env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    assert read_json(night / "sweep.json")["combos"][0]["status"] == "ok"
    assert sorted(r["request_id"] for r in lines(night / "seed-1" / "requests_hf_target.jsonl")) == [0, 1]


# ---------------------------------------------------------------- B. hangs and memory blow-ups

def test_every_number_in_the_table_is_bounded():
    from lib import config as C
    for var in C.VARS:
        if var.kind in ("int", "float"):
            assert var.min is not None and var.max is not None and math.isfinite(var.max), var.name


@pytest.mark.parametrize(("env", "expected"), [
    ({"TEMPERATURE": "nan"}, "TEMPERATURE='nan' (from the environment): expected 0, or a finite number >= 1e-05"),
    ({"TEMPERATURE": "inf"}, "TEMPERATURE='inf'"),
    ({"AUTO_RATE": "inf", "AUTO_DURATION": "1"}, "AUTO_RATE='inf'"),
    ({"AUTO_RATE": "nan", "AUTO_DURATION": "1"}, "AUTO_RATE='nan'"),
    ({"AUTO_DURATION": "1e400", "AUTO_RATE": "1"}, "AUTO_DURATION='1e400'"),
    ({"AUTO_RATE": "1e12", "AUTO_DURATION": "1"}, "AUTO_RATE='1e12' (from the environment): expected 0, or a finite"),
    ({"AUTO_RATE": "10000", "AUTO_DURATION": "3600"}, "about 3.6e+07 requests; at most 100000 per run"),
    ({"NUM_PROMPTS": "10000000000"}, "NUM_PROMPTS='10000000000' (from the environment): expected an integer >= 0 "
                                     "and <= 100000"),
    ({"GENERATION_LENGTH": "10000000"}, "GENERATION_LENGTH='10000000'"),
    ({"NUM_PROMPTS": "100000", "GENERATION_LENGTH": "2000"}, "2e+08 new tokens per mode; at most 100000000"),
    ({"ENABLE_BATCH": "true", "BATCH_SIZE": "4096", "MAX_BATCH_LENGTH": "4096"}, "16777216 token slots per batch"),
    ({"SEED": str(2**70)}, f"SEED='{2**70}' (from the environment): expected an integer >= 0 and <= 4294967294"),
    ({"GPU_MONITOR_INTERVAL": "inf"}, "GPU_MONITOR_INTERVAL='inf'"),
])
def test_numbers_must_be_finite_and_bounded(env, expected):
    from lib import config as C
    from lib.errors import UsageError
    with pytest.raises(UsageError) as exc:
        C.resolve(None, environ=env)
    assert expected in str(exc.value)


def test_bounds_hold_in_dry_run_and_in_sweeps(tmp_path):
    start = time.monotonic()
    proc = run_benchmark(tmp_path, "--dry-run", AUTO_RATE="1e12", AUTO_DURATION="1", timeout=60)
    one_line_error(proc, "AUTO_RATE='1e12'")
    sweep = tmp_path / "bounds.yaml"
    sweep.write_text("fixed: {NUM_PROMPTS: 2}\nmatrix:\n  TEMPERATURE: [0, .nan]\n")
    proc = subprocess.run([sys.executable, "-m", "lib.sweep", str(sweep), "--dry-run"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    one_line_error(proc, "TEMPERATURE='nan'", "a finite number")
    sweep.write_text("fixed: {GENERATION_LENGTH: 10000000}\n")
    proc = subprocess.run([sys.executable, "-m", "lib.sweep", str(sweep), "--dry-run"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    one_line_error(proc, "GENERATION_LENGTH='10000000'", f"<= {131072}")
    names = ("SEED", "GAMMA_VALUE", "BATCH_SIZE", "NUM_PROMPTS", "GENERATION_LENGTH", "MAX_BATCH_LENGTH",
             "TEMPERATURE", "LLAMACPP_N_THREADS")
    sweep.write_text(f"matrix: {json.dumps(dict.fromkeys(names, list(range(1, 11))))}\n")  # 10**8 combinations
    proc = subprocess.run([sys.executable, "-m", "lib.sweep", str(sweep), "--dry-run"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    one_line_error(proc, "100000000 combinations; at most 10000")
    sweep.write_text("fixed: {NUM_PROMPTS: 2}\n")
    for flag, value in (("--budget-min", "nan"), ("--threshold-pct", "inf"), ("--trend-nights", "100000000")):
        proc = subprocess.run([sys.executable, "-m", "lib.sweep", str(sweep), flag, value, "--report-only"],
                              cwd=ROOT, capture_output=True, text=True, timeout=60)
        one_line_error(proc, f"{flag} ")
    assert time.monotonic() - start < 60


def test_yaml_alias_bomb_is_refused_by_every_reader(tmp_path):
    """The bomb as a sweep's fixed.PROMPT_FILE (also with --dry-run), an ablation's description, a mixed-precision
    config, an edge/cloud config and a comparison preset: one line each, at once."""
    assert len(BOMB) < 400
    indented = BOMB.replace("\n", "\n  ")
    sweep = tmp_path / "bomb.yaml"
    sweep.write_text(f"fixed:\n  {indented}\n  PROMPT_FILE: *g\n")
    proc = subprocess.run([sys.executable, "-m", "lib.sweep", str(sweep), "--dry-run"], cwd=ROOT,
                          capture_output=True, text=True, timeout=30)
    one_line_error(proc, "aliases (*name) are not accepted")
    ablation = tmp_path / "ablation.yaml"
    ablation.write_text(f"experiments:\n  {indented}\n  ablations:\n    - name: x\n      description: *g\n")
    proc = subprocess.run([sys.executable, "edge_cloud.py", "--mode", "ablation", "--config", str(ablation)],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    one_line_error(proc, f"--config {ablation}", "aliases (*name) are not accepted")

    from lib.comparison_config import Preset
    from lib.config_models import read_config
    from lib.edgecloud.settings import load_config as edge_config
    from lib.errors import UsageError
    from lib.quant.loader import load_config as mixed_precision_config
    plain = tmp_path / "plain.yaml"
    plain.write_text(BOMB + "\n")
    for read in (mixed_precision_config, edge_config, lambda p: read_config(Preset, p, str(p))):
        with pytest.raises(UsageError, match=r"aliases \(\*name\) are not accepted"):
            read(plain)


def test_overwrite_with_bad_input_keeps_the_finished_run(tmp_path):
    """OVERWRITE=true and an input refused before the first mode (a request longer than the context): one line,
    exit 2, and every file of the finished run as it was."""
    done = run_benchmark(tmp_path, INFERENCE_METHOD="target")
    assert done.returncode == 0, done.stderr[-2000:]
    run_dir = tmp_path / "run"
    finished = {p.name: p.read_bytes() for p in run_dir.iterdir()}
    refused = run_benchmark(tmp_path, INFERENCE_METHOD="target", OVERWRITE="true", GENERATION_LENGTH=100000)
    one_line_error(refused, "request 0", "more than hf:target's context of")
    assert {p.name: p.read_bytes() for p in run_dir.iterdir()} == finished


def test_folders_in_the_way_of_run_files_are_one_line(tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / "benchmark_results.json").mkdir(parents=True)
    one_line_error(run_benchmark(tmp_path, INFERENCE_METHOD="target", OVERWRITE="true", timeout=120),
                   f"RUN_ID='run': {run_dir / 'benchmark_results.json'}: is a folder; expected the path of a file")
    (run_dir / "benchmark_results.json").rmdir()
    (run_dir / ".lock").mkdir()
    one_line_error(run_benchmark(tmp_path, INFERENCE_METHOD="target", timeout=120),
                   f"lock {run_dir / '.lock'}: cannot be opened (Is a directory)")
    assert [p.name for p in run_dir.iterdir()] == [".lock"]


_WRITER = """
import os, signal, sys, time
from pathlib import Path
from lib.files import atomic_path
with atomic_path(Path(sys.argv[1])) as tmp:
    tmp.write_text("half")
    print(tmp.name, flush=True)
    if sys.argv[2] == "kill":
        os.kill(os.getpid(), signal.SIGKILL)  # killed before its rename, as a SIGKILL or a power cut leaves it
    time.sleep(60)
"""


def _writer_midway(target: Path, how: str) -> tuple[subprocess.Popen, str]:
    """A writer of target that has written its temporary file and not renamed it: killed, or still running."""
    child = subprocess.Popen([sys.executable, "-c", _WRITER, str(target), how], cwd=ROOT, stdout=subprocess.PIPE,
                             text=True)
    return child, child.stdout.readline().strip()


def test_a_killed_writers_temporary_file_is_removed_by_the_next_write(tmp_path):
    from lib.files import write_json
    target = tmp_path / "sweep.json"
    killed, left_behind = _writer_midway(target, "kill")
    assert killed.wait(timeout=60) == -signal.SIGKILL and (tmp_path / left_behind).exists()
    live, kept = _writer_midway(target, "sleep")  # a writer still running: its file must stay
    other = tmp_path / ".sweep.json.otherhost-1.0000abcd.tmp"  # another host's writer, on a shared folder
    other.write_text("half")
    try:
        write_json(target, {"night": 1})
        assert json.loads(target.read_text()) == {"night": 1}
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted([kept, other.name, "sweep.json"])
    finally:
        live.kill()
        live.wait()


def test_two_first_runs_set_up_the_environment_one_after_the_other():
    """scripts/ensure_env.sh holds a lock on the environment while it installs: a second run started meanwhile
    waits, then finds the sets installed (here the environment is complete, so only the wait is left to see)."""
    import fcntl
    venv = Path(sys.executable).parent.parent
    assert any((venv / ".speclab").glob("core.*")), "run by ./tests/run.sh, in the environment ensure_env.sh made"
    with open(venv / ".speclab-setup.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a first run, still installing
        second = subprocess.Popen(["bash", str(ROOT / "scripts" / "ensure_env.sh")], stdout=subprocess.PIPE,
                                  text=True, env={**os.environ, "SPECLAB_VENV": str(venv)})
        with pytest.raises(subprocess.TimeoutExpired):
            second.wait(timeout=3)
    out, _ = second.communicate(timeout=60)
    assert second.returncode == 0 and out.strip() == f"{venv}/bin/python"
