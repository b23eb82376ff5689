#!/usr/bin/env python3
"""Where does speculative decoding stop paying off? Runs AR and SD of one engine over a grid of load (request
rates or concurrency levels) x k (GAMMA_VALUE) (x BATCH_SIZE for the PyTorch engine), one benchmark run folder
per cell, every cell with the same SEED so AR and SD see the same requests and arrival times; then reports, from
the result files only, the SD/AR ratio of TPOT, output throughput, goodput and J/token per cell, the break-even
load per k, the best k per load, a heat-map (PNG) and an HTML page.

  ./payoff_map.py --rates 1,2,4 --duration 20 --k 1,2,4 --out results/payoff/tiny
  ./payoff_map.py --engine hf --concurrency 1,4,8 --batch-sizes 1,4,8 --k 2,4 --set NUM_PROMPTS=32
  ./payoff_map.py --out results/payoff/tiny --resume          # finish the cells that did not end ok
  ./payoff_map.py --out results/payoff/tiny --report-only     # rewrite the report from the result files

The benchmark's other variables come from the environment (as for ./run_benchmark.sh) or --set VAR=VALUE.
"""
from __future__ import annotations

import lib.environment  # noqa: F401  (first: a package this Python lacks is one line, not a traceback)

# isort: split

import argparse
import math
import os
import sys
from datetime import datetime
from pathlib import Path

from lib import config as C
from lib.engines import canonical, engine_choices
from lib.errors import UsageError, exit_on_usage_error
from lib.files import ROOT, for_display, output_dir, write_json
from lib.log import get_logger, setup_logging
from lib.payoff import FIGURES, GRID_FILE, Grid, cells_of, load_grid, sweep_of, write_report
from lib.sweep import RESERVED, check_combos, print_plan, run_locked

# set per cell by the map itself: a value given for them would be overwritten in every cell
PER_CELL = {"COMPARE_MODES", "GAMMA_VALUE", "VLLM_NUM_SPECULATIVE_TOKENS", "VLLM_ENABLE_SPECULATIVE",
            "INFERENCE_ENGINE", "INFERENCE_METHOD", "ENABLE_TARGET", "ENABLE_SPECULATIVE"}
logger = get_logger(__name__)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="payoff_map.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Exit codes: 0 every cell ended ok; 1 a cell failed, timed out or was skipped "
                                       "by the budget (the report covers the cells that finished); 2 bad flag or "
                                       "variable; 75 another run holds the folder's lock; 130 interrupted (the "
                                       "finished cells and a report of them are kept: --resume finishes the rest).")
    grid = p.add_argument_group("grid (a cell per load x k x batch size; AR once per load x batch size)")
    grid.add_argument("--engine", choices=engine_choices(), default=None,
                      help="the engine whose AR and SD are compared (default: INFERENCE_ENGINE, else hf)")
    loads = grid.add_mutually_exclusive_group()
    loads.add_argument("--rates", metavar="R,R,...",
                       help="request rates (AUTO_RATE, requests/s > 0), open-loop arrivals over --duration")
    loads.add_argument("--concurrency", metavar="N,N,...",
                       help="concurrency levels (MAX_CONCURRENCY >= 1); requests: NUM_PROMPTS, all at t=0")
    grid.add_argument("--duration", type=float, default=None,
                      help="with --rates: AUTO_DURATION, the seconds over which requests arrive in every cell")
    grid.add_argument("--k", metavar="K,K,...", help="draft tokens per round to try (GAMMA_VALUE values)")
    grid.add_argument("--batch-sizes", metavar="B,B,...",
                      help="hf engine only: BATCH_SIZE values (sets ENABLE_BATCH=true); default: not varied")
    grid.add_argument("--seed", type=int, default=None,
                      help="SEED of every cell: the prompts' order and the arrival times (default: SEED, else 42)")
    bench = p.add_argument_group("the benchmark's other variables (the same in every cell)")
    bench.add_argument("--set", action="append", default=[], metavar="VAR=VALUE",
                       help="a SpecLab variable for every cell (repeatable), e.g. --set NUM_PROMPTS=8; the "
                            "environment's variables apply too (./run_benchmark.sh --help lists them)")
    run = p.add_argument_group("running")
    run.add_argument("--out", default=None,
                     help="the map's folder: a run folder per cell, sweep.json, sweep.log, the report "
                          "(default: results/payoff/<engine>-<date-time>)")
    run.add_argument("--resume", action="store_true",
                     help="finish the map in --out: run only the cells that did not end ok (the grid flags may "
                          "be left out: the folder's grid is used)")
    run.add_argument("--fresh", action="store_true", help="rerun every cell of a map that --out already holds")
    run.add_argument("--budget-min", type=float, default=None,
                     help="time budget in minutes; a cell still running then is stopped, later ones are skipped")
    run.add_argument("--dry-run", action="store_true", help="list the cells and their variables, run nothing")
    report = p.add_argument_group("report")
    report.add_argument("--report-only", action="store_true",
                        help="run nothing; rewrite the report of --out from its result files")
    report.add_argument("--metric", choices=[f.key for f in FIGURES], default="tpot",
                        help="the figure the one-line summary gives the break-even load of (default: tpot); "
                             "the report shows every figure")
    return p


# ---------------------------------------------------------------- flags -> grid

def number_list(text: str, flag: str, var: str) -> list:
    """Comma-separated values of a SpecLab variable (checked against its bounds), none twice, in order."""
    values = []
    for item in text.split(","):
        value = C.VAR_BY_NAME[var].parse(item.strip(), f"in {flag}")
        if value in values:
            raise UsageError(f"{flag} {text!r}: {item.strip()!r} is listed twice")
        values.append(value)
    return sorted(values)


def load_list(args) -> list:
    if args.rates:
        loads = number_list(args.rates, "--rates", "AUTO_RATE")
        if loads[0] <= 0:
            raise UsageError(f"--rates {args.rates!r}: every rate must be > 0 (AUTO_RATE=0 is the fixed-count mode)")
        return loads
    loads = number_list(args.concurrency, "--concurrency", "MAX_CONCURRENCY")
    if loads[0] < 1:
        raise UsageError(f"--concurrency {args.concurrency!r}: every level must be >= 1 (0 is no limit)")
    return loads


def fixed_of(args, grid_vars: set[str]) -> dict:
    fixed = {}
    for item in args.set:
        name, eq, value = item.partition("=")
        name = name.strip()
        if not eq or name not in C.VAR_BY_NAME:
            raise UsageError(f"--set {item!r}: expected VAR=VALUE with VAR a SpecLab variable "
                             "(./run_benchmark.sh --help lists them)")
        if name in RESERVED or name in PER_CELL or name in grid_vars:
            raise UsageError(f"--set {item!r}: {name} is set by the payoff map in each cell (use the grid flags)")
        fixed[name] = value
    return fixed


def engine_of(args) -> str:
    """--engine, else INFERENCE_ENGINE read as the benchmark reads it (any case, aliases; empty: the default)."""
    if args.engine:
        return canonical(args.engine)
    var = C.VAR_BY_NAME["INFERENCE_ENGINE"]
    raw = os.environ.get(var.name, "")
    return var.parse(raw, "from the environment") if raw.strip() else var.default


def grid_of(args) -> Grid:
    if not (args.rates or args.concurrency) or not args.k:
        raise UsageError("the grid needs --rates or --concurrency, and --k (see --help)")
    engine = engine_of(args)
    load = "rate" if args.rates else "concurrency"
    loads, ks = load_list(args), number_list(args.k, "--k", "GAMMA_VALUE")
    batches = number_list(args.batch_sizes, "--batch-sizes", "BATCH_SIZE") if args.batch_sizes else []
    if batches and engine != "hf":
        raise UsageError(f"--batch-sizes: only the PyTorch engine (hf) decodes fixed batches; {engine} schedules "
                         "its own")
    grid_vars = {"AUTO_RATE" if args.rates else "MAX_CONCURRENCY"} | ({"BATCH_SIZE", "ENABLE_BATCH"} if batches
                                                                        else set())
    fixed = fixed_of(args, grid_vars)
    if args.duration is not None:
        if args.concurrency:
            raise UsageError("--duration: only with --rates (concurrency cells send NUM_PROMPTS requests)")
        if "AUTO_DURATION" in fixed:
            raise UsageError("--duration and --set AUTO_DURATION: give one")
        fixed["AUTO_DURATION"] = C.VAR_BY_NAME["AUTO_DURATION"].parse(str(args.duration), "from --duration")
    if args.seed is not None:
        fixed["SEED"] = C.VAR_BY_NAME["SEED"].parse(str(args.seed), "from --seed")
    elif "SEED" not in fixed:  # written into the grid, so a --resume in another shell keeps the same arrivals
        fixed["SEED"] = os.environ.get("SEED", "").strip() or C.VAR_BY_NAME["SEED"].default
    return Grid(engine=engine, load=load, loads=loads, ks=ks, batch_sizes=batches, fixed=fixed).check_size()


def check_cells(grid: Grid, folder: Path) -> list:
    """Every cell through the variable table (environment included) before anything runs; their Configs."""
    return check_combos(sweep_of(grid, folder, None), dict(os.environ), "payoff map")


def warn_if_load_changes_nothing(grid: Grid, configs: list):
    if grid.load == "concurrency" and grid.engine == "hf" and not any(cfg.enable_batch for cfg in configs):
        logger.warning("warning: the hf engine decodes one request at a time unless ENABLE_BATCH=true, so "
                       "MAX_CONCURRENCY changes nothing; add --batch-sizes")


def grid_for_run(args, folder: Path) -> Grid:
    """The grid the flags give; on --resume the folder's own when the grid flags are left out, and never another."""
    stored = load_grid(folder) if args.resume and (folder / GRID_FILE).is_file() else None
    if stored is not None and not (args.rates or args.concurrency or args.k):
        return stored
    grid = grid_of(args)
    if stored is not None and grid.to_json() != stored.to_json():
        raise UsageError(f"--resume: {folder} holds a map of another grid ({GRID_FILE}); give the same flags, "
                         "leave the grid flags out, or use --fresh")
    return grid


def default_out(args) -> Path:
    return ROOT / "results" / "payoff" / f"{engine_of(args)}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


# ---------------------------------------------------------------- main

@exit_on_usage_error
def main(argv=None) -> int:
    setup_logging()
    args = build_parser().parse_args(argv)
    if args.budget_min is not None and not (0 < args.budget_min < math.inf):
        raise UsageError(f"--budget-min {args.budget_min:g}: expected a finite number of minutes > 0")
    if (args.report_only or args.resume) and not args.out:
        raise UsageError(f"--{'report-only' if args.report_only else 'resume'}: needs --out, the map's folder")
    folder = Path(args.out).absolute() if args.out else default_out(args)
    if args.report_only:
        exit_code, summary = write_report(folder, args.metric)
        logger.info(f"{summary}\nreport: {for_display(folder / 'payoff.html')}")
        return exit_code
    grid = grid_for_run(args, folder)
    configs = check_cells(grid, folder)
    sweep = sweep_of(grid, folder, args.budget_min)
    if args.dry_run:
        return print_plan(sweep, cells_of(grid), for_display(folder))
    output_dir(folder, f"--out {args.out}" if args.out else "results/payoff")
    warn_if_load_changes_nothing(grid, configs)

    def report(where: Path) -> tuple[int, str]:
        exit_code, summary = write_report(where, args.metric)
        return exit_code, f"{summary}; report: {for_display(where / 'payoff.html')}"
    holder = f"pid {os.getpid()}, payoff map into {folder}, since {datetime.now().isoformat(timespec='seconds')}"
    return run_locked(sweep, folder, folder, holder, args.resume, args.fresh, args.budget_min, report,
                      refused=f"--out {folder} already holds a payoff map: --resume finishes it, --fresh reruns "
                              "every cell (or choose another --out)",
                      report_when_stopped=True, on_start=lambda: write_json(folder / GRID_FILE, grid.to_json()))


if __name__ == "__main__":
    sys.exit(main())
