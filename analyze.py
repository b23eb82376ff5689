#!/usr/bin/env python3
"""Read any set of SpecLab result folders into one table (CSV and Markdown) for ad-hoc study.

Each PATH may be a run folder (with benchmark_results.json), a folder holding runs at any depth (a sweep night, a
whole sweep, results/), or a glob of those (quote it so the shell leaves it alone). One row per run and mode:
the config variables that differ between the runs, throughput, SD speedup over the run's AR mode, TTFT/TPOT/ITL/
E2EL statistics, acceptance (rate, length, per position) and energy per token (n/a without a GPU).

  ./analyze.py 'results/sweeps/nightly_tiny/2026-11-*' --csv table.csv --md table.md
"""
from __future__ import annotations

import lib.environment  # noqa: F401  (first: a package this Python lacks is one line, not a traceback)

# isort: split

import argparse
import csv
import glob
import io
import os
import sys
from pathlib import Path

from lib.errors import UsageError, exit_on_usage_error
from lib.files import output_file, write_texts
from lib.log import setup_logging
from lib.sweep_report import RESULTS_FILE, ROW_KEYS, SHORT_KEYS, md_table, run_rows, varying_config


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="analyze.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="+", metavar="PATH", help="result folder(s) or glob(s)")
    p.add_argument("--csv", metavar="FILE", help="write every column as CSV here ('-' = stdout)")
    p.add_argument("--md", metavar="FILE", help="write the Markdown table here (default: stdout)")
    p.add_argument("--all-columns", action="store_true", help="Markdown with every column, not the short set")
    return p


def find_runs(patterns: list[str]) -> list[Path]:
    runs = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern)) or ([pattern] if Path(pattern).exists() else [])
        if not matches:
            raise UsageError(f"{pattern}: no such folder (expected result folders or a glob of them)")
        for match in map(Path, matches):
            found = [match] if (match / RESULTS_FILE).is_file() else result_folders_under(match)
            runs += [r for r in found if r not in runs]
    if not runs:
        raise UsageError(f"{' '.join(patterns)}: no {RESULTS_FILE} under these paths")
    return runs


def result_folders_under(folder: Path) -> list[Path]:
    """The folders at any depth under `folder` holding a result file (a folder of that name is not one)."""
    try:
        return sorted(p.parent for p in folder.rglob(RESULTS_FILE) if p.is_file())
    except OSError as exc:
        raise UsageError(f"{folder}: cannot be searched for {RESULTS_FILE} ({exc.strerror}); expected readable "
                         "result folders") from None


def load_rows(runs: list[Path]) -> list[dict]:
    rows = []
    common = Path(os.path.commonpath([r.resolve().parent for r in runs]))  # runs are named relative to it
    for run in runs:
        loaded = run_rows(run)  # a damaged result file: one line naming it
        for row in loaded:
            row["run"] = str(run.resolve().relative_to(common))
        rows += loaded
    return rows


def table(rows: list[dict], keys: list[str]) -> tuple[list[str], list[list]]:
    config_cols = varying_config(rows)
    headers = keys[:2] + config_cols + keys[2:]
    body = [[r[k] for k in keys[:2]] + [r["config"].get(c) for c in config_cols] + [r[k] for k in keys[2:]]
            for r in rows]
    return headers, body


def csv_value(value):
    if isinstance(value, list):  # per-position acceptance (finite numbers), or a config value that is a list
        return " ".join(f"{v:.4f}" if isinstance(v, float) else str(v) for v in value)
    return "" if value is None else value


def csv_text(rows: list[dict]) -> str:
    headers, body = table(rows, ROW_KEYS)
    out = io.StringIO(newline="")
    writer = csv.writer(out)
    writer.writerow(headers)
    writer.writerows([[csv_value(v) for v in row] for row in body])
    return out.getvalue()


@exit_on_usage_error
def main(argv=None) -> int:
    setup_logging()
    args = build_parser().parse_args(argv)
    for flag, path in (("--csv", args.csv), ("--md", args.md)):
        if path and path != "-":
            output_file(path, f"{flag} {path}")
    rows = load_rows(find_runs(args.paths))
    outputs = []  # (file, text); "-" is stdout
    if args.csv:
        outputs.append((args.csv, csv_text(rows)))
    if args.md or args.csv != "-":
        headers, body = table(rows, ROW_KEYS if args.all_columns else SHORT_KEYS)
        outputs.append((args.md or "-", md_table(headers, body) + "\n"))
    write_texts({path: text for path, text in outputs if path != "-"})  # both files, or neither
    sys.stdout.write("".join(text for path, text in outputs if path == "-"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
