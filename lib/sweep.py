"""Nightly sweeps: every combination of a sweep file's matrix runs through the benchmark, one folder per night.

results/sweeps/<sweep>/<YYYY-MM-DD>/ holds sweep.log, sweep.json (the status of every combination), a folder per
combination (RESULTS_DIR + RUN_ID of benchmark.py: benchmark_results.json, run.json, benchmark.log) and the
night's report (report.md, report.html, plots/). Run through ./run_sweep.sh; `--help` lists the options.
"""
from __future__ import annotations

import argparse
import ctypes
import itertools
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date, datetime
from pathlib import Path
from typing import Annotated, Any

from pydantic import AfterValidator, Field

from lib import config as C
from lib.config_models import Accepts, ConfigModel, choice, read_config, shown
from lib.errors import UsageError, exit_on_usage_error
from lib.files import FolderLock, LockHeld, output_dir, output_file, write_json
from lib.interrupts import STOP_SIGNALS
from lib.log import get_logger, setup_logging
from lib.sweep_report import REGRESSION_METRICS, ComboResult, check_report_outputs, read_state, run_rows, write_report

ROOT = Path(__file__).resolve().parent.parent
SWEEPS_DIR = ROOT / "configs" / "sweeps"
SCHEMA = "speclab.sweep/1"
RESERVED = {"RESULTS_DIR", "RUN_ID"}  # the sweep sets these per combination
EXIT_OK, EXIT_LOCKED, EXIT_INTERRUPTED = 0, 75, 130  # the others come from the verdict and UsageError
ERROR_TAIL_LINES = 15
MAX_COMBINATIONS = 10_000  # a few lines of matrix multiply fast: refused before they are built
MAX_TREND_NIGHTS = 3660
logger = get_logger(__name__)


@dataclass
class Sweep:
    name: str
    path: Path
    description: str
    fixed: dict
    matrix: dict
    include: list
    budget_min: float | None
    threshold_pct: float
    regression_metrics: list
    trend_nights: int
    cells: list[Combo] | None = None  # combinations built by a script (payoff_map.py) instead of a matrix


@dataclass
class Combo:
    id: str
    vars: dict  # the values this combination sets (matrix + include), fixed ones excluded


# ---------------------------------------------------------------- sweep files

def find_sweep_file(name_or_path: str) -> Path:
    candidates = [Path(name_or_path)]
    if "/" not in name_or_path:
        candidates += [SWEEPS_DIR / f"{name_or_path}{suffix}" for suffix in ("", ".yaml", ".yml")]
    for path in candidates:
        if path.is_file():
            return path.resolve()
    known = ", ".join(sorted(p.stem for p in SWEEPS_DIR.glob("*.y*ml"))) or "none"
    raise UsageError(f"sweep {name_or_path!r}: no such sweep file (a name in configs/sweeps/: {known}; or a path)")


def env_text(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return "" if value is None else str(value)


def env_texts(values: dict) -> dict:
    return {name: env_text(value) for name, value in values.items()}


def _one_value(value):
    if value is not None and not isinstance(value, (str, int, float, bool)):
        raise ValueError(f"found {shown(value)}")
    return value


Value = Annotated[Any, AfterValidator(_one_value), Accepts("one value (text, a number, true or false)")]
Variables = Annotated[dict[str, Value], Accepts("a mapping of VARIABLE: value")]
Positive = Annotated[float, Field(gt=0)]


class RegressionSection(ConfigModel):
    threshold_pct: Positive = 10.0
    metrics: Annotated[list[choice("metric", REGRESSION_METRICS)],
                       Accepts(f"a list of metrics out of {', '.join(REGRESSION_METRICS)}")] = list(REGRESSION_METRICS)


class SweepFile(ConfigModel):
    description: str = ""
    fixed: Variables = {}
    matrix: Annotated[dict[str, Annotated[list[Value], Field(min_length=1), Accepts("a non-empty list of values")]],
                      Accepts("a mapping of VARIABLE: [values]")] = {}
    include: Annotated[list[Variables], Accepts("a list of mappings of VARIABLE: value (extra combinations)")] = []
    budget_min: Positive | None = None
    regression: RegressionSection = Field(default_factory=RegressionSection)
    trend_nights: Annotated[int, Field(ge=1, le=MAX_TREND_NIGHTS)] = 7


def check_vars(where: str, values: dict, path: Path):
    for name in values:
        if name in RESERVED:
            raise UsageError(f"{path}: {where}.{name}: set by the sweep itself (one folder per combination)")
        if name not in C.VAR_BY_NAME:
            raise UsageError(f"{path}: {where}.{name}: not a SpecLab variable (./run_benchmark.sh --help lists them)")


def load_sweep(name_or_path: str) -> Sweep:
    path = find_sweep_file(name_or_path)
    data = read_config(SweepFile, path, str(path), f"a mapping with keys {', '.join(SweepFile.model_fields)}")
    for where, values in [("fixed", data.fixed), ("matrix", data.matrix),
                          *((f"include[{i}]", extra) for i, extra in enumerate(data.include))]:
        check_vars(where, values, path)
    both = sorted(set(data.fixed) & set(data.matrix))
    if both:
        raise UsageError(f"{path}: {both[0]} is in both fixed and matrix; a variable is either the same for every "
                         "combination (fixed) or varied (matrix)")
    sweep = Sweep(name=path.stem, path=path, description=data.description, fixed=data.fixed, matrix=data.matrix,
                  include=data.include, budget_min=data.budget_min, threshold_pct=data.regression.threshold_pct,
                  regression_metrics=data.regression.metrics, trend_nights=data.trend_nights)
    check_combos(sweep, {}, str(path))
    return sweep


def check_combos(sweep: Sweep, base: dict, label: str) -> list:
    """Every combination resolved through the variable table before anything runs (their Configs, in order);
    an error names `label` and the combination."""
    configs = []
    for combo in combos_of(sweep):
        try:
            configs.append(C.resolve(None, environ=combo_env(sweep, combo, base),
                                     env_source=f"in combination {combo.id}"))
        except UsageError as exc:
            raise UsageError(f"{label}: {exc}") from None
    return configs


def combo_id(values: dict) -> str:
    def short(value):  # a path names its file, not the whole path
        text = env_text(value)
        return Path(text).stem if "/" in text else (text or "default")
    parts = [f"{name.lower()}-{short(value)}" for name, value in values.items()]
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", "__".join(parts)).strip("_")[:200] or "default"


def combos_of(sweep: Sweep) -> list[Combo]:
    if sweep.cells is not None:
        return sweep.cells
    names = list(sweep.matrix)
    count = math.prod(len(values) for values in sweep.matrix.values()) + len(sweep.include)
    if count > MAX_COMBINATIONS:
        raise UsageError(f"{sweep.path}: matrix and include make {count} combinations; at most {MAX_COMBINATIONS}")
    combos = [dict(zip(names, values)) for values in itertools.product(*(sweep.matrix[n] for n in names))]
    combos = combos if names else ([] if sweep.include else [{}])
    combos += [dict(extra) for extra in sweep.include]
    result, seen = [], set()
    for values in combos:
        cid = combo_id(values)
        if cid in seen:
            raise UsageError(f"{sweep.path}: combination {cid} appears twice")
        seen.add(cid)
        result.append(Combo(cid, values))
    return result


def combo_env(sweep: Sweep, combo: Combo, base: dict) -> dict:
    return {**base, **env_texts({**sweep.fixed, **combo.vars})}


# ---------------------------------------------------------------- running

class Log:
    """Lines to the night's sweep.log and to stdout (cron mails stdout)."""

    def __init__(self, path: Path):
        try:
            self.file = open(path, "a", encoding="utf-8")  # noqa: SIM115 - the sweep's log, open while it runs
        except OSError as exc:
            raise UsageError(f"{path}: cannot be opened for writing ({exc.strerror}); expected a writable file") \
                from None

    def __call__(self, msg: str):
        line = f"{datetime.now().strftime('%Y-%m-%d %H:%M:%S')} {msg}"
        self.file.write(line + "\n")
        self.file.flush()
        logger.info(line)


class SweepLock(FolderLock):
    """An flock on <output root>/.lock: one sweep at a time per results tree. Each benchmark child is given the
    lock's fd, so the lock stays held while a child lives, even if the sweep itself was killed."""

    def __init__(self, root: Path):
        super().__init__(root / ".lock")

    def acquire(self, holder: str):
        try:
            super().acquire(holder)
        except LockHeld as exc:
            raise LockHeld(f"another sweep is running ({exc}); lock {self.path}; not starting") from None


def load_state(night: Path) -> dict[str, ComboResult]:
    path = night / "sweep.json"
    if not path.exists():
        return {}
    try:
        return {c.id: c for c in read_state(path).combos}
    except UsageError as exc:
        raise UsageError(f"{exc}; move it away or start with --fresh") from None


def every_combination_ended(night: Path) -> bool:
    """sweep.json says the sweep ran every combination (its "finished" time is set)."""
    try:
        return read_state(night / "sweep.json").finished is not None
    except UsageError:
        return False


def save_state(night: Path, sweep: Sweep, results: dict[str, ComboResult], **extra):
    data = {"schema": SCHEMA, "sweep": sweep.name, "sweep_file": str(sweep.path), "night": night.name,
            "fixed": env_texts(sweep.fixed), "matrix": list(sweep.matrix),
            "combos": [r.model_dump() for r in results.values()], **extra}
    write_json(night / "sweep.json", data)


def tail(path: Path, lines: int = ERROR_TAIL_LINES) -> str:
    if not path.is_file():
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def failed_modes(run_dir: Path) -> list[str]:
    try:
        rows = run_rows(run_dir)
    except UsageError:  # no result file, or one the report will call unreadable
        return []
    return [f"{r['mode']}: {r['error'] or r['status']}" for r in rows if r["status"] != "complete"]


def unfinished_run(run_dir: Path) -> str | None:
    """Why the benchmark's own files do not show a finished run (None if they do)."""
    path = run_dir / "run.json"
    try:
        run = json.loads(path.read_text())
    except (OSError, ValueError):
        return f"{path.name} is missing or unreadable"
    if not isinstance(run, dict):
        return f"{path.name} is not a JSON object"
    if run.get("status") != "ok" or run.get("exit_code") != 0:
        return f"{path.name} says status {run.get('status')!r}, exit code {run.get('exit_code')!r}"
    return None


class Stop(Exception):
    """SIGTERM/SIGINT/SIGHUP while a combination runs."""


def die_with_parent(parent: int, mask: set):
    """preexec_fn of a benchmark child: SIGTERM when the sweep dies, however it dies (SIGKILL included), so no
    benchmark goes on writing into a folder a later --resume reuses. SIGTERM lets the benchmark save what finished.
    `mask`: the signal mask the sweep had before it held stops back for the start; a stop held back since the fork
    ends the child here, by the default action that exec would give it anyway (the sweep's handler must not run in
    the child)."""
    for sig in STOP_SIGNALS:
        if signal.getsignal(sig) is not signal.SIG_IGN:
            signal.signal(sig, signal.SIG_DFL)
    PR_SET_PDEATHSIG = 1
    prctl = getattr(ctypes.CDLL(None), "prctl", None)  # Linux only
    if prctl is not None:
        prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # the sweep died before prctl: the signal will never come
        os.kill(os.getpid(), signal.SIGTERM)
    signal.pthread_sigmask(signal.SIG_SETMASK, mask)


def run_combo(sweep: Sweep, combo: Combo, night: Path, timeout_s: float | None, lock_fd: int) -> ComboResult:
    run_dir = night / combo.id
    if run_dir.exists():
        shutil.rmtree(run_dir)  # a rerun starts clean: no mix of two attempts
    run_dir.mkdir(parents=True)
    env = combo_env(sweep, combo, os.environ)
    env.update(RESULTS_DIR=str(night), RUN_ID=combo.id)
    result = ComboResult(id=combo.id, vars=env_texts(combo.vars), status="failed",
                         started=datetime.now().isoformat(timespec="seconds"))
    t0 = time.monotonic()
    with open(run_dir / "benchmark.log", "wb") as out, open(run_dir / "stderr.log", "wb") as err:
        # Own session: stop_group reaches the benchmark's own children (vLLM workers) too. preexec_fn is safe
        # here: the sweep runs no threads.
        # A stop that lands while the child starts is held until `proc` exists and the try below can stop it: a
        # Stop raised inside Popen would leave a child running that holds the sweep's lock. The child gets the
        # mask back before it runs the benchmark.
        parent, mask = os.getpid(), signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            proc = subprocess.Popen([str(ROOT / "run_benchmark.sh")], cwd=ROOT, env=env, stdin=subprocess.DEVNULL,
                                    stdout=out, stderr=err, start_new_session=True, pass_fds=(lock_fd,),
                                    preexec_fn=lambda: die_with_parent(parent, mask))
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)  # a held stop raises Stop from here on
            result.exit_code = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            stop_group(proc)
            result.status, result.exit_code = "timeout", proc.returncode
            result.error = f"stopped by the sweep's time budget after {time.monotonic() - t0:.0f} s"
        except Stop:
            stop_group(proc)
            result.status, result.exit_code = "interrupted", proc.returncode
            result.error = "the sweep was stopped while this combination ran"
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)  # already so, unless Popen itself failed
    result.duration_s = round(time.monotonic() - t0, 2)
    if result.status == "failed":
        unfinished = unfinished_run(run_dir)
        if result.exit_code == 0 and not unfinished:
            result.status = "ok"
        elif result.exit_code == 0:
            result.error = f"exit code 0 but {unfinished}"
        else:
            result.failed_modes = failed_modes(run_dir)
            result.error = f"exit code {result.exit_code}; last lines of stderr:\n" + tail(run_dir / "stderr.log")
    write_json(run_dir / "combo.json", result.model_dump())
    return result


def stop_group(proc: subprocess.Popen):
    """SIGINT first (the benchmark saves what finished), SIGKILL if it lingers."""
    for sig, wait_s in ((signal.SIGINT, 20), (signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


def raise_stop(signum, frame):
    for sig in STOP_SIGNALS:  # one stop is enough; the cleanup must not be cut short
        signal.signal(sig, signal.SIG_IGN)
    raise Stop(signal.Signals(signum).name)


def run_sweep(sweep: Sweep, night: Path, resume: bool, budget_min: float | None, log: Log,
              lock_fd: int) -> dict[str, ComboResult]:
    previous = load_state(night) if resume else {}
    combos = combos_of(sweep)
    results = {c.id: previous.get(c.id) or ComboResult(id=c.id, vars=env_texts(c.vars), status="pending")
               for c in combos}
    deadline = time.monotonic() + budget_min * 60 if budget_min else None
    save_state(night, sweep, results, finished=None)
    for i, combo in enumerate(combos, 1):
        if resume and results[combo.id].status == "ok":
            log(f"[{i}/{len(combos)}] {combo.id}: done on an earlier run, skipped (--resume)")
            continue
        left = deadline - time.monotonic() if deadline else None
        if left is not None and left <= 0:
            results[combo.id] = ComboResult(id=combo.id, vars=results[combo.id].vars, status="skipped_budget",
                                            error=f"time budget of {budget_min:g} min spent before it started")
            log(f"[{i}/{len(combos)}] {combo.id}: skipped, time budget spent")
            continue
        log(f"[{i}/{len(combos)}] {combo.id}: running")
        results[combo.id] = ComboResult(id=combo.id, vars=results[combo.id].vars, status="running",
                                        started=datetime.now().isoformat(timespec="seconds"))
        save_state(night, sweep, results, finished=None)  # a kill of the sweep leaves "running", never "ok"
        try:
            results[combo.id] = res = run_combo(sweep, combo, night, left, lock_fd)
        except BaseException:  # stopped before its benchmark started or after it ended
            results[combo.id].status, results[combo.id].error = "interrupted", "the sweep was stopped"
            raise
        finally:
            save_state(night, sweep, results, finished=None)
        first_error = (res.error or "").splitlines()[-1:] or [""]
        log(f"[{i}/{len(combos)}] {combo.id}: {res.status} in {res.duration_s:.1f} s"
            + (f" (exit {res.exit_code}: {first_error[0]})" if res.status != "ok" else ""))
        if res.status == "interrupted":
            raise KeyboardInterrupt
    save_state(night, sweep, results, finished=datetime.now().isoformat(timespec="seconds"))
    return results


# ---------------------------------------------------------------- command line

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="run_sweep.sh", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run every combination of a sweep file (configs/sweeps/<name>.yaml) through the benchmark into "
                    "results/sweeps/<name>/<date>/<combination>/, then write the night's report "
                    "(report.md, report.html, plots/) with the comparison to the previous night.",
        epilog="Exit codes: 0 all combinations ok and no regression; 1 a combination failed, timed out or was "
               "skipped by the budget, or a metric regressed beyond the threshold; 2 bad sweep file or flag; "
               "75 another sweep holds the lock; 130 interrupted (finished combinations are kept: use --resume).")
    p.add_argument("sweep", help="sweep name in configs/sweeps/ (e.g. nightly_tiny) or a path to a sweep file")
    p.add_argument("--resume", action="store_true",
                   help="continue the night's folder: skip combinations that finished ok, run the rest")
    p.add_argument("--fresh", action="store_true",
                   help="start the night over: rerun every combination of a night folder that already exists")
    p.add_argument("--budget-min", type=float, default=None,
                   help="time budget in minutes (default: budget_min in the sweep file, else none); a combination "
                        "still running when it is spent is stopped, later ones are skipped")
    p.add_argument("--date", default=None, help="night folder name YYYY-MM-DD (default: today)")
    p.add_argument("--output-root", default=None,
                   help="folder that holds <sweep>/<date>/ (default: results/sweeps in the repository)")
    p.add_argument("--threshold-pct", type=float, default=None,
                   help="regression threshold in percent (default: regression.threshold_pct in the file, else 10)")
    p.add_argument("--trend-nights", type=int, default=None, help="nights in the trend plot (default: file, else 7)")
    p.add_argument("--report-only", action="store_true", help="run nothing; rewrite the night's report and exit "
                                                              "with its verdict")
    p.add_argument("--dry-run", action="store_true", help="list the combinations and exit")
    return p


def night_name(text: str | None) -> str:
    if text is None:
        return date.today().isoformat()
    try:
        return date.fromisoformat(text).isoformat()
    except ValueError:
        raise UsageError(f"--date {text!r}: expected YYYY-MM-DD") from None


def print_plan(sweep, combos, results) -> int:
    """--dry-run: each combination's variables and where the results would go."""
    for combo in combos:
        logger.info(f"{combo.id}: " + " ".join(f"{k}={v}" for k, v in combo_env(sweep, combo, {}).items()))
    logger.info(f"results: {results}")
    return EXIT_OK


@exit_on_usage_error
def main(argv=None) -> int:
    setup_logging()
    args = build_parser().parse_args(argv)
    sweep = load_sweep(args.sweep)
    if args.budget_min is not None and not (0 < args.budget_min < math.inf):
        raise UsageError(f"--budget-min {args.budget_min:g}: expected a finite number of minutes > 0")
    if args.threshold_pct is not None and not (0 < args.threshold_pct < math.inf):
        raise UsageError(f"--threshold-pct {args.threshold_pct:g}: expected a finite percentage > 0")
    if args.trend_nights is not None and not 1 <= args.trend_nights <= MAX_TREND_NIGHTS:
        raise UsageError(f"--trend-nights {args.trend_nights}: expected an integer from 1 to {MAX_TREND_NIGHTS}")
    budget = args.budget_min or sweep.budget_min
    threshold = args.threshold_pct if args.threshold_pct is not None else sweep.threshold_pct
    trend = args.trend_nights or sweep.trend_nights
    out_root = Path(args.output_root).resolve() if args.output_root else ROOT / "results" / "sweeps"
    night = out_root / sweep.name / night_name(args.date)
    if args.dry_run:
        return print_plan(sweep, combos_of(sweep), night)
    output_dir(out_root, f"--output-root {args.output_root}" if args.output_root else "results/sweeps")

    if args.report_only:
        if not (night / "sweep.json").exists():
            raise UsageError(f"--report-only: {night} has no sweep.json (no sweep ran that night)")
        verdict = write_report(night, threshold, trend, sweep.regression_metrics)
        logger.info(verdict.summary())
        return verdict.exit_code

    holder = (f"pid {os.getpid()}, sweep {sweep.name}, night {night.name}, since "
              f"{datetime.now().isoformat(timespec='seconds')}")

    def report(folder: Path) -> tuple[int, str]:
        verdict = write_report(folder, threshold, trend, sweep.regression_metrics)
        return verdict.exit_code, verdict.summary()
    return run_locked(sweep, night, out_root, holder, args.resume, args.fresh, budget, report,
                      refused=f"{night} already holds this night's sweep: --resume finishes it, --fresh reruns "
                              "every combination (or pick another --date)",
                      on_start=lambda: check_report_outputs(night))


def run_locked(sweep: Sweep, folder: Path, lock_root: Path, holder: str, resume: bool, fresh: bool,
               budget: float | None, report: Callable[[Path], tuple[int, str]], refused: str,
               report_when_stopped: bool = False, on_start: Callable[[], None] | None = None) -> int:
    """Take the lock on lock_root, run every combination into folder (refused, with the line `refused`, when it
    already holds a sweep and neither resume nor fresh is asked), then report(folder) -> (exit code, summary).
    on_start runs once the folder is ours (a script writes its own description of the sweep there, or checks
    where its report goes). SIGINT/SIGTERM/SIGHUP stop the running combination or the report, keep what finished,
    log one line and return 130 (after a report of what finished when report_when_stopped)."""
    if resume and fresh:
        raise UsageError("--resume and --fresh: choose one")
    lock = SweepLock(lock_root)
    try:
        lock.acquire(holder)
    except LockHeld as exc:
        logger.error(f"error: {exc}")
        return EXIT_LOCKED
    try:
        if (folder / "sweep.json").is_file() and not (resume or fresh):
            raise UsageError(refused)
        for name in ("sweep.json", "sweep.log"):
            output_file(folder / name, str(folder / name))
        if on_start is not None:
            on_start()
        log = Log(folder / "sweep.log")
        for sig in STOP_SIGNALS:
            if signal.getsignal(sig) is not signal.SIG_IGN:  # nohup's SIGHUP stays ignored
                signal.signal(sig, raise_stop)
        log(f"sweep {sweep.name} ({sweep.path}) -> {folder}; {len(combos_of(sweep))} combinations"
            + (f"; budget {budget:g} min" if budget else "") + ("; resuming" if resume else ""))
        try:
            run_sweep(sweep, folder, resume, budget, log, lock.fd)
            exit_code, summary = report(folder)
            log(summary)
        except (KeyboardInterrupt, Stop):
            # what sweep.json says, not where the stop landed: its last write (every combination ended) may be
            # followed by a stop before run_sweep returns
            log("interrupted while writing the report: every combination is kept; --resume writes it"
                if every_combination_ended(folder) else
                "interrupted: finished combinations are kept; rerun with --resume to finish")
            if report_when_stopped:
                log(report(folder)[1])
            return EXIT_INTERRUPTED
    finally:
        for sig in STOP_SIGNALS:  # the sweep is over: a stop from now on has nothing left to stop
            signal.signal(sig, signal.SIG_IGN)
        lock.release()
    return exit_code


if __name__ == "__main__":
    sys.exit(main())
