"""Result files of a run (docs/design.md) and the console summary.

RESULTS_DIR/<run-id>/: run.json, requests_<mode>.jsonl (a line per finished request, flushed at once),
benchmark_results.json and its three slices (_speculative, _target, _gpu). The JSON files are written before the
first mode (status "running", the mode that runs named) and rewritten atomically at each mode's start and end and
when the run ends (status ok, failed or interrupted, and the exit code), so a crash, a kill or Ctrl-C leaves valid
files for everything that finished. One run at a time writes into a run folder (RunFolder).
"""
from __future__ import annotations

import functools
import itertools
import os
import platform
import subprocess
import sys
from datetime import datetime
from pathlib import Path

from lib.engines import PACKAGES
from lib.errors import UsageError
from lib.files import ROOT, FolderLock, LockHeld, for_display, json_line, output_dir, output_file, write_json
from lib.lossless import difference_lines
from lib.metrics import COLUMNS, Column
from lib.types import RequestRecord

SCHEMA_VERSION = 1


def schema(kind: str) -> str:
    return f"speclab.{kind}/{SCHEMA_VERSION}"


def mode_slug(mode: str) -> str:
    return mode.replace(":", "_")


def default_run_id(cfg) -> str:
    """date-time-engine, with -2, -3, ... when a run of the same second already has that folder."""
    base = datetime.now().strftime("%Y%m%d-%H%M%S") + f"-{cfg.inference_engine}"
    taken = Path(cfg.results_dir).absolute()
    suffixes = itertools.chain([""], (f"-{n}" for n in itertools.count(2)))
    return next(base + suffix for suffix in suffixes if not (taken / (base + suffix)).exists())


def environment_info() -> dict:
    info = {"python": sys.version.split()[0], "platform": platform.platform(), "cpu_count": os.cpu_count()}
    for pkg in PACKAGES:
        module = sys.modules.get(pkg)
        if module is not None:
            info[pkg] = getattr(module, "__version__", "?")
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    info["git_commit"] = git_commit()
    return info


@functools.cache
def git_commit() -> str | None:
    """The checkout's commit, asked once per process (environment_info runs at every mode's start and end)."""
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


# what a run writes into its folder
RUN_FILES = ("run.json", "benchmark_results*.json", "bench_serve_*.json", "requests_*.jsonl")


class RunFolder:
    """RESULTS_DIR/<run-id>/ claimed for one run: locked so that a second run into it at the same time is refused,
    and refused if it holds an earlier run's files unless OVERWRITE=true. Claiming only checks: the earlier files
    are removed by clear(), right before the run's first save, so a run that ends on bad input first (prepare())
    leaves them as they were, and a run that starts mixes no request line of the old run with its own."""

    def __init__(self, cfg, run_id: str):
        base = output_dir(Path(cfg.results_dir).absolute(), f"RESULTS_DIR={cfg.results_dir}")
        self.run_id, self.dir = run_id, base / run_id
        label = f"RUN_ID={run_id!r}"
        self.created = not self.dir.exists()
        output_dir(self.dir, label)
        self.lock = FolderLock(self.dir / ".lock")
        try:
            self.lock.acquire(f"pid {os.getpid()}, since {datetime.now().isoformat(timespec='seconds')}")
        except LockHeld as exc:
            raise UsageError(f"{label}: {self.dir} is being written by another run ({exc}); wait for it to end or "
                             "choose another RUN_ID") from None
        try:
            self.old = self._earlier_files(label, cfg.overwrite)
        except UsageError:
            self.release()
            raise

    def _earlier_files(self, label: str, overwrite: bool) -> list[Path]:
        """The files of an earlier run here (and half-written .tmp files of a killed one), each one this run can
        replace; refused unless `overwrite`."""
        old = [f for pattern in RUN_FILES for f in sorted(self.dir.glob(pattern))]
        for f in old:
            output_file(f, f"{label}: {f}")  # a folder where a result file goes
        if old and not overwrite:
            raise UsageError(f"{label}: {self.dir} already holds a run ({', '.join(f.name for f in old[:3])}"
                             f"{', ...' if len(old) > 3 else ''}); set OVERWRITE=true to replace it, or choose "
                             "another RUN_ID")
        return old + [f for f in self.dir.glob(".*.tmp") if f.is_file()]

    def clear(self):
        """Remove the earlier run's files (OVERWRITE=true); the run's first save follows."""
        for f in self.old:
            f.unlink(missing_ok=True)
        self.old = []

    def release(self):
        """Let go of the folder (and remove it if this run made it and wrote nothing into it)."""
        self.lock.release(remove=True)
        if self.created and not any(self.dir.iterdir()):
            self.dir.rmdir()


class RunWriter:
    def __init__(self, folder: RunFolder, cfg, plan: dict):
        self.folder, self.dir, self.run_id, self.cfg = folder, folder.dir, folder.run_id, cfg
        self.run = {"schema": schema("run"), "run_id": self.run_id, "pid": os.getpid(),
                    "started": datetime.now().isoformat(), "finished": None, "status": "running", "exit_code": None,
                    "error": None, "running_mode": None, "config": cfg.as_dict(), "config_sources": cfg.sources,
                    "plan": plan, "environment": {}}
        self.modes: dict[str, dict] = {}
        self.comparisons: list[dict] = []
        self.gpu_info: dict = {}
        self._streams = {}
        folder.clear()
        self.save_run()
        self.save_results()  # before the first mode: a kill during it still leaves a file saying what ran

    def save_run(self, **extra):
        self.run.update(extra)
        self.run["environment"] = environment_info()
        write_json(self.dir / "run.json", self.run)

    def mode_started(self, mode: str):
        self.run["running_mode"] = mode
        self.save_results()
        self.save_run()

    def finish(self, status: str, exit_code: int, error: str | None, **extra):
        """The run's end: status ok | failed | interrupted, the exit code it ends with, its error line if any."""
        self.run.update(status=status, exit_code=exit_code, error=error, running_mode=None,
                        finished=datetime.now().isoformat(timespec="seconds"))
        self.save_results()
        self.save_run(**extra)

    def append_request(self, mode: str, record: RequestRecord, metrics: dict):
        stream = self._streams.get(mode)
        if stream is None:
            stream = self._streams[mode] = open(  # noqa: SIM115 - kept open for the run
                self.dir / f"requests_{mode_slug(mode)}.jsonl", "a",
                                                encoding="utf-8")
        line = {"schema": schema("request"), "mode": mode, **record.to_json(), "metrics": metrics}
        stream.write(json_line(line) + "\n")
        stream.flush()

    def save_mode(self, mode: str, result: dict):
        self.modes[mode] = result
        self.save_results()

    def save_results(self):
        is_target = {m: m.endswith(":target") for m in self.modes}
        common = {"run_id": self.run_id, "status": self.run["status"], "running_mode": self.run["running_mode"],
                  "workload": self.run["plan"].get("workload")}
        full = {"schema": schema("benchmark_results"), **common, "config": self.cfg.as_dict(), "modes": self.modes,
                "comparisons": self.comparisons, "gpu": self.gpu_info}
        write_json(self.dir / "benchmark_results.json", full)
        write_json(self.dir / "benchmark_results_speculative.json",
                   {"schema": schema("benchmark_results_speculative"), **common,
                    "modes": {m: r for m, r in self.modes.items() if not is_target[m]}})
        write_json(self.dir / "benchmark_results_target.json",
                   {"schema": schema("benchmark_results_target"), **common,
                    "modes": {m: r for m, r in self.modes.items() if is_target[m]}})
        write_json(self.dir / "benchmark_results_gpu.json",
                   {"schema": schema("benchmark_results_gpu"), **common, **self.gpu_info,
                    "modes": {m: r.get("energy") for m, r in self.modes.items()}})

    def close(self):
        for stream in self._streams.values():
            stream.close()
        self._streams.clear()
        self.folder.release()


def _fmt(value, digits=2):
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def summary_columns() -> dict[str, list[Column]]:
    """Console heading -> the metric columns shown under it."""
    headings: dict[str, list[Column]] = {}
    for c in COLUMNS:
        if c.summary:
            headings.setdefault(c.summary, []).append(c)
    return headings


def _cell(columns: list[Column], result: dict) -> str:
    return " / ".join(_text(c, c.get(result, {})) for c in columns)


def _text(column: Column, value) -> str:
    return column.blank if value is None else _fmt(value, column.digits)


def comparison_line(comparison: dict) -> str:
    parts = [f"{c.compare_label} {'x' if c.as_speedup else ''}{_fmt(comparison.get(c.compare))}"
             for c in COLUMNS if c.compare_label]
    return f"{comparison['mode']} vs {comparison['baseline']}: " + ", ".join(parts)


def repeats_line(mode: str, result: dict) -> str | None:
    """NUM_RUNS > 1: each repeated figure's mean and 95 % interval, or None."""
    repeats = result.get("repeats")
    if not repeats:
        return None
    parts = [f"{key} {_fmt(r['mean'], 3)} [{_fmt(r['ci95_low'], 3)}, {_fmt(r['ci95_high'], 3)}]"
             for key, r in repeats.items() if isinstance(r, dict)]
    return f"{mode} over {repeats['n']} runs, mean [95 % interval]: " + ", ".join(parts)


def category_line(mode: str, result: dict) -> str | None:
    """The acceptance rate / length per dataset category, or None for a dataset without categories."""
    per = ((result.get("metrics") or {}).get("acceptance") or {}).get("per_category") or {}
    parts = [f"{cat} {_fmt(a.get('acceptance_rate'), 3)}/{_fmt(a.get('acceptance_length'))}"
             for cat, a in per.items()]
    return f"{mode} acceptance rate/length per category: " + ", ".join(parts) if parts else None


def moe_verify_line(mode: str, result: dict) -> str | None:
    """MoE targets under SD: per k drafts verified, distinct experts per layer per step and tokens per round."""
    table = result.get("moe_verify") or {}
    rows = table.get("rows") or []
    if len(rows) < 2:
        return None
    parts = [f"k={r['k']} {_fmt(r['mean_distinct_experts'])}/{_fmt(r['tokens_per_round'])}" for r in rows]
    return (f"{mode} MoE target ({table['num_experts']} experts, top-{table['top_k']}), distinct experts per layer "
            f"per verify step / tokens per round: {', '.join(parts)}; fewest expert reads per emitted token at "
            f"k={table['cheapest_k']}")


OVERHEAD_BOUND = 0.2  # bandwidth efficiency under which a GPU run is bound by the engine's overhead


def overhead_bound_line(modes: dict) -> str | None:
    """A warning for the modes that ran on a GPU far from the memory-bandwidth floor, or None."""
    efficiency = next(c for c in COLUMNS if c.name == "bandwidth_efficiency")
    slow = [f"{mode} ({value:.3f})" for mode, res in modes.items()
            if str((res.get("engine") or {}).get("device", "")).startswith("cuda")
            and (value := efficiency.get(res, {})) is not None and value < OVERHEAD_BOUND]
    if not slow:
        return None
    return (f"warning: BW eff under {OVERHEAD_BOUND:g} on a GPU: {', '.join(slow)}: an overhead-bound engine; SD "
            "verdicts from it do not carry over to a fast one")


def print_summary(modes: dict, comparisons: list[dict], run_dir: Path, console=None):
    from rich.console import Console
    from rich.table import Table

    console = console or Console(stderr=False)
    table = Table(title="SpecLab benchmark summary", show_lines=False)
    headings = summary_columns()
    for col in ("mode", "status", *headings):
        table.add_column(col, justify="left" if col in ("mode", "status") else "right")
    for mode, res in modes.items():
        table.add_row(mode, res["status"], *(_cell(cols, res) for cols in headings.values()))
    console.print(table)
    warning = overhead_bound_line(modes)
    if warning:
        console.print(warning, markup=False)
    for c in comparisons:
        console.print(comparison_line(c))
    from lib.sd_report import summary_lines
    for line in summary_lines(modes):
        console.print(line, markup=False, soft_wrap=True)  # one line per mode, for logs and greps
    for mode, res in modes.items():
        for line in (repeats_line(mode, res), category_line(mode, res), moe_verify_line(mode, res),
                     *difference_lines(mode, res)):
            if line:
                console.print(line, markup=False)
    energies = [r.get("energy") for r in modes.values() if r.get("energy")]
    if energies and not energies[0].get("available"):
        console.print(f"GPU monitor: unavailable ({energies[0].get('reason')})")
    console.print(f"Results: {for_display(run_dir)}")
