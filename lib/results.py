"""Result files of a run (docs/design.md) and the console summary.

RESULTS_DIR/<run-id>/: run.json, requests_<mode>.jsonl (a line per finished request, flushed at once),
benchmark_results.json and its three slices (_speculative, _target, _gpu). The JSON files are rewritten
atomically after every mode, so a crash or Ctrl-C leaves valid files for everything that finished.
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from datetime import datetime
from pathlib import Path

from lib.engines import PACKAGES
from lib.files import ROOT, write_json
from lib.metrics import COLUMNS, Column
from lib.types import RequestRecord

SCHEMA_VERSION = 1


def schema(kind: str) -> str:
    return f"speclab.{kind}/{SCHEMA_VERSION}"


def mode_slug(mode: str) -> str:
    return mode.replace(":", "_")


def default_run_id(cfg) -> str:
    return datetime.now().strftime("%Y%m%d-%H%M%S") + f"-{cfg.inference_engine}"


def environment_info() -> dict:
    info = {"python": sys.version.split()[0], "platform": platform.platform(), "cpu_count": os.cpu_count()}
    for pkg in PACKAGES:
        module = sys.modules.get(pkg)
        if module is not None:
            info[pkg] = getattr(module, "__version__", "?")
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    try:
        info["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                                            text=True, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        info["git_commit"] = None
    return info


class RunWriter:
    def __init__(self, results_dir: str | Path, run_id: str, cfg, plan: dict):
        base = Path(results_dir)
        if not base.is_absolute():
            base = Path.cwd() / base
        self.dir = base / run_id
        self.dir.mkdir(parents=True, exist_ok=True)
        self.run_id, self.cfg = run_id, cfg
        self.run = {"schema": schema("run"), "run_id": run_id, "started": datetime.now().isoformat(),
                    "config": cfg.as_dict(), "config_sources": cfg.sources, "plan": plan, "environment": {}}
        self.modes: dict[str, dict] = {}
        self.comparisons: list[dict] = []
        self.gpu_info: dict = {}
        self._streams = {}
        self.save_run()

    def save_run(self, **extra):
        self.run.update(extra)
        self.run["environment"] = environment_info()
        write_json(self.dir / "run.json", self.run)

    def append_request(self, mode: str, record: RequestRecord, metrics: dict):
        stream = self._streams.get(mode)
        if stream is None:
            stream = self._streams[mode] = open(  # noqa: SIM115 - kept open for the run
                self.dir / f"requests_{mode_slug(mode)}.jsonl", "a",
                                                encoding="utf-8")
        line = {"schema": schema("request"), "mode": mode, **record.to_json(), "metrics": metrics}
        stream.write(json.dumps(line, ensure_ascii=False) + "\n")
        stream.flush()

    def save_mode(self, mode: str, result: dict):
        self.modes[mode] = result
        self.save_results()

    def save_results(self):
        is_target = {m: m.endswith(":target") for m in self.modes}
        common = {"run_id": self.run_id, "workload": self.run["plan"].get("workload")}
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
    for mode, res in modes.items():
        for line in (repeats_line(mode, res), category_line(mode, res)):
            if line:
                console.print(line, markup=False)
    energies = [r.get("energy") for r in modes.values() if r.get("energy")]
    if energies and not energies[0].get("available"):
        console.print(f"GPU monitor: unavailable ({energies[0].get('reason')})")
    console.print(f"Results: {run_dir}")
