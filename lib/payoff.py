"""The payoff map: where speculative decoding stops paying off, over a grid of load x k (x batch size).

A Grid names one engine, a load axis (AUTO_RATE request rates or MAX_CONCURRENCY levels), the k values
(GAMMA_VALUE) and, for the PyTorch engine, batch sizes. It becomes a sweep (lib/sweep.py runs it: one benchmark
run folder per cell, a lock, resume, budget, stop signals): per (load, batch) one AR cell and per k one SD cell,
all with the same SEED, so AR and SD see the same requests and the same arrival times.

The analysis reads only the cells' result files: per SD cell the SD/AR ratio of mean TPOT, output throughput,
goodput and J/token; per (batch, k) and figure the break-even load, where the ratio crosses 1 (linear
interpolation between the grid's loads); per (batch, load) and figure the best k. It writes payoff.json,
payoff.md, payoff.html (the heat-map inlined) and payoff_heatmap.png into the map's folder.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

from pydantic import AfterValidator, Field

from lib.config_models import Accepts, ConfigModel, choice, shown, validate_model
from lib.engines import ENGINE_BY_NAME
from lib.errors import UsageError
from lib.files import atomic_path, read_text, write_json, write_text
from lib.metrics import COLUMNS
from lib.results import mode_slug
from lib.sweep import MAX_COMBINATIONS, Combo, Sweep, Variables, env_text, unfinished_run
from lib.sweep_report import Doc

SCHEMA = "speclab.payoff_map/1"
GRID_SCHEMA = "speclab.payoff_grid/1"
GRID_FILE = "payoff_grid.json"
SLUG_MAX = 20  # characters of a load in a folder name; a longer one is cut and ends in a hash of the exact value
LOADS = {"rate": ("AUTO_RATE", "req/s"), "concurrency": ("MAX_CONCURRENCY", "concurrent requests")}
COLUMN = {c.name: c for c in COLUMNS}


@dataclass(frozen=True)
class Figure:
    """One figure compared between SD and AR: ratio = SD / AR; SD pays off when the ratio is on the good side
    of 1 (below it for a cost, above it for a rate)."""
    key: str
    column: str  # its lib/metrics.py column
    label: str
    lower_is_better: bool

    def pays(self, ratio: float) -> bool:
        return ratio < 1 if self.lower_is_better else ratio > 1

    def advantage(self, ratio: float) -> float:
        """> 1 where SD pays off, whatever the figure's direction."""
        return 1 / ratio if self.lower_is_better else ratio


FIGURES = (Figure("tpot", "mean_tpot_ms", "mean TPOT", True),
           Figure("throughput", "output_throughput", "output throughput", False),
           Figure("goodput", "request_goodput", "goodput", False),
           Figure("energy", "energy_per_token_j", "J/token", True))
FIGURE_BY_KEY = {f.key: f for f in FIGURES}


# ---------------------------------------------------------------- the grid and its cells

def _distinct(values: list) -> list:
    seen = set()
    for value in values:
        if value in seen:  # 2 and 2.0 are one load
            raise ValueError(f"{shown(value)} is listed twice")
        seen.add(value)
    return values


def distinct_list(item, what: str, min_length: int = 1):
    return Annotated[list[item], Field(min_length=min_length), AfterValidator(_distinct),
                     Accepts(f"a list of distinct {what}" + (" (at least one)" if min_length else ""))]


Load = Annotated[int | float, Field(gt=0), Accepts("a finite number > 0")]
Whole = Annotated[int, Field(ge=1), Accepts("a whole number >= 1")]


class Grid(ConfigModel):
    """The map's grid, as payoff_grid.json holds it (and checked so when it is read back)."""
    engine: choice("engine", tuple(ENGINE_BY_NAME))
    load: choice("load axis", tuple(LOADS))
    loads: distinct_list(Load, "finite numbers > 0")
    ks: distinct_list(Whole, "whole numbers >= 1")
    batch_sizes: distinct_list(Whole, "whole numbers >= 1 (empty: BATCH_SIZE is not varied)", 0) = []
    fixed: Variables = {}  # other benchmark variables, the same for every cell

    @property
    def load_var(self) -> str:
        return LOADS[self.load][0]

    @property
    def unit(self) -> str:
        return LOADS[self.load][1]

    def batches(self) -> list:
        return self.batch_sizes or [None]

    def cell_count(self) -> int:
        return len(self.batches()) * len(self.loads) * (1 + len(self.ks))

    def check_size(self, label: str = "") -> Grid:
        if self.cell_count() > MAX_COMBINATIONS:
            raise UsageError((f"{label}: " if label else "") + f"the grid makes {self.cell_count()} cells; at most "
                             f"{MAX_COMBINATIONS}")
        return self

    def to_json(self) -> dict:
        return {"schema": GRID_SCHEMA, **self.model_dump()}

    @classmethod
    def from_json(cls, data, label: str) -> Grid:
        """The grid of a payoff_grid.json's data, or one line naming `label` and the key."""
        hint = "; use --fresh or another --out"
        if isinstance(data, dict) and data.get("schema", GRID_SCHEMA) != GRID_SCHEMA:
            raise UsageError(f"{label}: schema: found {shown(data['schema'])}; accepted: {GRID_SCHEMA}{hint}")
        body = {k: v for k, v in data.items() if k != "schema"} if isinstance(data, dict) else data
        try:
            return validate_model(cls, body, label).check_size(label)
        except UsageError as exc:
            raise UsageError(f"{exc}{hint}") from None


def exact_text(value) -> str:
    """The shortest text that reads back as exactly `value`: 2.0 -> 2, 0.5 -> 0.5, 3.0000001 -> 3.0000001."""
    return repr(value).removesuffix(".0") if isinstance(value, float) else env_text(value)


def slug(value) -> str:
    """A load as a folder name, exact: 2.0 -> 2, 0.5 -> 0p5, 3.0000001 -> 3p0000001; one longer than SLUG_MAX is
    cut and ends in a hash of the value, so two loads do not share a name."""
    text = exact_text(value).replace(".", "p")
    if len(text) <= SLUG_MAX:
        return text
    return f"{text[:SLUG_MAX - 9]}-{hashlib.sha256(repr(value).encode()).hexdigest()[:8]}"


def cell_id(kind: str, load, batch, k=None) -> str:
    parts = [kind, f"load-{slug(load)}"] + ([f"batch-{batch}"] if batch is not None else [])
    return "__".join(parts + ([f"k-{k}"] if k is not None else []))


def cells_of(grid: Grid) -> list[Combo]:
    """Per (load, batch): the AR cell, then one SD cell per k. The sweep runs them in this order."""
    cells = []
    for batch in grid.batches():
        for load in grid.loads:
            common = {grid.load_var: load, **({"ENABLE_BATCH": True, "BATCH_SIZE": batch} if batch else {})}
            cells.append(Combo(cell_id("ar", load, batch), {"COMPARE_MODES": f"{grid.engine}:target", **common}))
            for k in grid.ks:
                sd = {"COMPARE_MODES": f"{grid.engine}:speculative", **common, "GAMMA_VALUE": k}
                if grid.engine == "vllm":  # its SD is off unless asked for, and takes k from its own variable
                    sd.update(VLLM_ENABLE_SPECULATIVE=True, VLLM_NUM_SPECULATIVE_TOKENS=k)
                cells.append(Combo(cell_id("sd", load, batch, k), sd))
    check_distinct_folders(cells)
    return cells


def check_distinct_folders(cells: list[Combo]) -> None:
    """A cell's id names its run folder: two cells with one id would run into one folder, the second overwriting
    the first's results."""
    first: dict[str, Combo] = {}
    for cell in cells:
        other = first.setdefault(cell.id, cell)
        if other is not cell:
            raise UsageError(f"the grid's cells {other.vars} and {cell.vars} would share the run folder {cell.id}")


def sweep_of(grid: Grid, folder: Path, budget_min: float | None) -> Sweep:
    return Sweep(name="payoff_map", path=folder / GRID_FILE, description=f"payoff map of {grid.engine}",
                 fixed=grid.fixed, matrix={}, include=[], budget_min=budget_min, threshold_pct=10.0,
                 regression_metrics=[], trend_nights=1, cells=cells_of(grid))


# ---------------------------------------------------------------- reading the cells' results

@dataclass
class ModeRun:
    """One finished cell's mode as its result files give it."""
    figures: dict
    acceptance_rate: float | None
    acceptance_length: float | None
    arrivals: list
    energy_note: str | None
    moe_verify: dict | None


def read_mode(run_dir: Path, mode: str) -> tuple[ModeRun | None, str]:
    """(the mode's figures, "") when the cell's benchmark finished ok, else (None, why not)."""
    why = unfinished_run(run_dir)
    if why:
        return None, why
    try:
        result = json.loads((run_dir / "benchmark_results.json").read_text())["modes"][mode]
        lines = (run_dir / f"requests_{mode_slug(mode)}.jsonl").read_text().splitlines()
        # one line per request and run (NUM_RUNS repeats the same requests)
        arrivals = sorted({(line["request_id"], line["arrival"]) for line in map(json.loads, lines)})
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return None, f"result files unreadable ({exc.__class__.__name__}: {exc})"
    if result.get("status") != "complete":
        return None, f"{mode} is {result.get('status')}: {result.get('error')}"
    energy = result.get("energy") or {}
    return ModeRun({f.key: COLUMN[f.column].get(result, {}) for f in FIGURES},
                   COLUMN["acceptance_rate"].get(result, {}), COLUMN["acceptance_length"].get(result, {}),
                   arrivals, None if energy.get("available") else (energy.get("reason") or "no GPU monitor"),
                   result.get("moe_verify")), ""


def ratio(sd, ar) -> float | None:
    if sd is None or ar is None or ar == 0:
        return None
    return sd / ar


def moe_at(moe_verify: dict | None, k: int) -> float | None:
    """Distinct experts per layer per verify step at this k (the SD cell's own), from the engine's moe_verify."""
    rows = (moe_verify or {}).get("rows") or []
    return next((r["mean_distinct_experts"] for r in rows if r.get("k") == k), None)


def read_cells(grid: Grid, folder: Path) -> tuple[list[dict], list[dict]]:
    """(SD cells with their ratios, cells not done with the reason), from the result files only."""
    done, missing = [], []
    for batch in grid.batches():
        for load in grid.loads:
            ar_id = cell_id("ar", load, batch)
            ar, why = read_mode(folder / ar_id, f"{grid.engine}:target")
            if ar is None:
                missing.append({"cell": ar_id, "why": why})
            for k in grid.ks:
                sd_id = cell_id("sd", load, batch, k)
                sd, why = read_mode(folder / sd_id, f"{grid.engine}:speculative")
                if sd is None:
                    missing.append({"cell": sd_id, "why": why})
                if sd is None or ar is None:
                    continue
                done.append({"cell": sd_id, "ar_cell": ar_id, "batch": batch, "load": load, "k": k,
                             "ratios": {f.key: ratio(sd.figures[f.key], ar.figures[f.key]) for f in FIGURES},
                             "sd": sd.figures, "ar": ar.figures, "acceptance_rate": sd.acceptance_rate,
                             "acceptance_length": sd.acceptance_length, "same_arrivals": sd.arrivals == ar.arrivals,
                             "requests": len(sd.arrivals), "energy_note": sd.energy_note or ar.energy_note,
                             "moe_distinct_experts": moe_at(sd.moe_verify, k)})
    return done, missing


# ---------------------------------------------------------------- break-even and best k

def break_even(points: list[tuple[float, float]], figure: Figure) -> dict:
    """Where the ratio crosses 1 along the load axis. points: (load, SD/AR ratio), any order. Between two
    neighbouring loads on either side of 1 the crossing is interpolated linearly; a ratio of exactly 1 does not
    pay off."""
    points = sorted(points)
    if not points:
        return {"verdict": "no data", "crossings": [], "pays_at": []}
    pays = [figure.pays(r) for _, r in points]
    crossings = []
    for (x0, r0), (x1, r1), p0, p1 in zip(points, points[1:], pays, pays[1:]):
        if p0 != p1:
            crossings.append({"load": x0 + (1 - r0) * (x1 - x0) / (r1 - r0), "between": [x0, x1],
                              "direction": "stops paying" if p0 else "starts paying"})
    verdict = "everywhere" if all(pays) else "nowhere" if not any(pays) else "crosses"
    return {"verdict": verdict, "crossings": crossings, "pays_at": [x for (x, _), p in zip(points, pays) if p]}


def break_even_text(result: dict, unit: str) -> str:
    if result["verdict"] == "no data":
        return "no data"
    if result["verdict"] == "everywhere":
        return "pays off everywhere on this grid"
    if result["verdict"] == "nowhere":
        return "pays off nowhere on this grid"
    return "; ".join(f"{c['direction']} at {c['load']:.3g} {unit} (between {exact_text(c['between'][0])} and "
                     f"{exact_text(c['between'][1])})" for c in result["crossings"])


def best_k(candidates: list[tuple[int, float]], figure: Figure) -> dict:
    """The k whose SD/AR ratio is best (the smaller k on a tie), and whether it pays off at all."""
    if not candidates:
        return {"k": None, "ratio": None, "pays": None}
    k, r = max(candidates, key=lambda c: (figure.advantage(c[1]), -c[0]))
    return {"k": k, "ratio": r, "pays": figure.pays(r)}


def best_k_text(result: dict) -> str:
    if result["k"] is None:
        return "no data"
    if result["pays"]:
        return f"k={result['k']} ({result['ratio']:.3g})"
    return f"AR: no k pays off (best k={result['k']} at {result['ratio']:.3g})"


def analyse(grid: Grid, cells: list[dict]) -> tuple[list[dict], list[dict]]:
    """(break-even rows per (batch, k), best-k rows per (batch, load)), each with one entry per figure."""
    breaks, bests = [], []
    for batch in grid.batches():
        mine = [c for c in cells if c["batch"] == batch]
        for k in grid.ks:
            row = {"batch": batch, "k": k}
            for f in FIGURES:
                result = break_even([(c["load"], c["ratios"][f.key]) for c in mine
                                     if c["k"] == k and c["ratios"][f.key] is not None], f)
                row[f.key] = {**result, "text": break_even_text(result, grid.unit)}
            breaks.append(row)
        for load in grid.loads:
            row = {"batch": batch, "load": load}
            for f in FIGURES:
                result = best_k([(c["k"], c["ratios"][f.key]) for c in mine
                                 if c["load"] == load and c["ratios"][f.key] is not None], f)
                row[f.key] = {**result, "text": best_k_text(result)}
            bests.append(row)
    return breaks, bests


# ---------------------------------------------------------------- the heat-map

def plot_heatmap(grid: Grid, cells: list[dict], figures: list[Figure], path: Path) -> bool:
    """A panel per (batch, figure): k down, load across, each cell coloured by SD's advantage (green: SD pays
    off, red: it loses; the colour saturates at 2x either way, one scale for every panel) and labelled with its
    SD/AR ratio; grey where the cell has no value."""
    if not cells or not figures:
        return False
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.colors import TwoSlopeNorm

    batches = grid.batches()
    fig, axes = plt.subplots(len(batches), len(figures), squeeze=False,
                             figsize=(1.2 + 0.9 * len(grid.loads) * len(figures) + 1.5 * len(figures),
                                      1.4 + 0.55 * len(grid.ks) * len(batches) + 0.6 * len(batches)))
    cmap = plt.get_cmap("RdYlGn").with_extremes(bad="#d9d9d9")
    for i, batch in enumerate(batches):
        for j, figure in enumerate(figures):
            ax = axes[i][j]
            ratios = np.full((len(grid.ks), len(grid.loads)), np.nan)
            for c in cells:
                r = c["ratios"][figure.key]
                if c["batch"] == batch and r is not None and r > 0:
                    ratios[grid.ks.index(c["k"]), grid.loads.index(c["load"])] = r
            logs = np.log2(ratios) * (-1 if figure.lower_is_better else 1)  # > 0: SD pays off
            image = ax.imshow(np.ma.masked_invalid(np.clip(logs, -1, 1)), cmap=cmap, aspect="auto",
                              norm=TwoSlopeNorm(vcenter=0.0, vmin=-1, vmax=1))
            for (y, x), r in np.ndenumerate(ratios):
                ax.text(x, y, "n/a" if np.isnan(r) else f"{r:.2f}", ha="center", va="center", fontsize=8)
            ax.set_xticks(range(len(grid.loads)), [exact_text(v) for v in grid.loads])
            ax.set_yticks(range(len(grid.ks)), [str(k) for k in grid.ks])
            ax.set_xlabel(f"load ({grid.unit})")
            ax.set_ylabel("k (GAMMA_VALUE)")
            ax.set_title(f"SD/AR {figure.label}" + (f", batch {batch}" if batch else ""), fontsize=10)
            bar = fig.colorbar(image, ax=ax, shrink=0.8, ticks=[-1, 0, 1])
            bar.ax.set_yticklabels(["SD 2x worse", "even", "SD 2x better"], fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=90)
    plt.close(fig)
    return True


# ---------------------------------------------------------------- the report

def write_report(folder: Path, headline: str = "tpot") -> tuple[int, str]:
    """payoff.json, payoff.md, payoff.html and payoff_heatmap.png for the cells that finished; returns (exit code:
    0 when every cell finished, 1 otherwise; a one-line summary)."""
    grid = load_grid(folder)
    cells, missing = read_cells(grid, folder)
    breaks, bests = analyse(grid, cells)
    shown = [f for f in FIGURES if any(c["ratios"][f.key] is not None for c in cells)]
    heatmap = folder / "payoff_heatmap.png"
    drawn = plot_heatmap(grid, cells, shown, heatmap)
    total = len(cells_of(grid))
    mixed = [c["cell"] for c in cells if not c["same_arrivals"]]
    summary = summary_line(grid, cells, missing, breaks, FIGURE_BY_KEY[headline], total)
    write_json(folder / "payoff.json", {
        "schema": SCHEMA, "grid": grid.to_json(), "headline": headline, "summary": summary,
        "cells_total": total, "cells_done": total - len(missing), "cells": cells, "not_done": missing,
        "break_even": breaks, "best_k": bests, "different_arrivals": mixed,
        "heatmap": heatmap.name if drawn else None})
    doc = report_doc(grid, cells, missing, breaks, bests, shown, heatmap if drawn else None, summary, mixed)
    write_text(folder / "payoff.md", doc.markdown(folder))
    write_text(folder / "payoff.html", doc.html())
    return (1 if missing else 0), summary


def summary_line(grid: Grid, cells: list[dict], missing: list[dict], breaks: list[dict], figure: Figure,
                 total: int) -> str:
    head = f"payoff map of {grid.engine}: {total - len(missing)}/{total} cells done"
    parts = [f"k={row['k']}" + (f" batch {row['batch']}" if row["batch"] else "") + f": {row[figure.key]['text']}"
             for row in breaks if row[figure.key]["verdict"] != "no data"]
    return head + (f"; {figure.label} " + "; ".join(parts) if parts else "")


def load_grid(folder: Path) -> Grid:
    path = folder / GRID_FILE
    if not path.exists():
        raise UsageError(f"--out {folder}: no {GRID_FILE} (no payoff map was started there)")
    text = read_text(path, str(path), "the grid a payoff map wrote")
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise UsageError(f"{path}: not JSON ({exc}); use --fresh or another --out") from None
    return Grid.from_json(data, str(path))


def report_doc(grid: Grid, cells, missing, breaks, bests, shown: list[Figure], heatmap: Path | None,
               summary: str, mixed: list[str]) -> Doc:
    batch_col = ["batch"] if grid.batch_sizes else []
    doc = Doc(f"SpecLab payoff map: {grid.engine}, {grid.load_var} x GAMMA_VALUE"
              + (" x BATCH_SIZE" if grid.batch_sizes else ""))
    doc.p(summary)
    doc.p(f"Grid: {grid.load_var} {', '.join(map(exact_text, grid.loads))} ({grid.unit}); GAMMA_VALUE "
          f"{', '.join(map(str, grid.ks))}" + (f"; BATCH_SIZE {', '.join(map(str, grid.batch_sizes))}"
                                                if grid.batch_sizes else "")
          + "; fixed: " + (" ".join(f"{k}={env_text(v)}" for k, v in grid.fixed.items()) or "nothing")
          + ". Each ratio is SD / AR on the same requests and arrival times (one SEED for every cell).")
    if mixed:
        doc.p("Warning: these SD cells did not see their AR cell's arrivals (a variable changed between the "
              "runs?): " + ", ".join(mixed))
    doc.h("Heat-map")
    if heatmap is not None:
        doc.img(heatmap, "SD/AR ratio per load and k; green where SD pays off, red where it loses")
    else:
        doc.p("No finished pair of AR and SD cells yet.")
    for f in FIGURES:
        if f not in shown:
            doc.p(f"{f.label}: n/a" + (" (set GOODPUT for goodput)" if f.key == "goodput" else "")
                  + (f" ({cells[0]['energy_note']})" if f.key == "energy" and cells and cells[0]["energy_note"]
                     else ""))
    doc.h("Break-even load per k")
    doc.p("Where the SD/AR ratio crosses 1, interpolated linearly between the grid's loads.")
    doc.table(batch_col + ["k"] + [f.label for f in shown],
              [[row["batch"]] * bool(batch_col) + [row["k"]] + [row[f.key]["text"] for f in shown] for row in breaks])
    doc.h("Best k per load")
    doc.table(batch_col + [f"load ({grid.unit})"] + [f.label for f in shown],
              [[row["batch"]] * bool(batch_col) + [exact_text(row["load"])] + [row[f.key]["text"] for f in shown]
               for row in bests])
    doc.h("Cells")
    moe = any(c["moe_distinct_experts"] is not None for c in cells)
    doc.table(batch_col + ["load", "k"] + [f"SD/AR {f.label}" for f in FIGURES]
              + ["AR TPOT ms", "SD TPOT ms", "accept rate", "accept length"]
              + (["distinct experts / layer / verify"] if moe else []) + ["requests"],
              [[c["batch"]] * bool(batch_col) + [exact_text(c["load"]), c["k"]] + [c["ratios"][f.key] for f in FIGURES]
               + [c["ar"]["tpot"], c["sd"]["tpot"], c["acceptance_rate"], c["acceptance_length"]]
               + ([c["moe_distinct_experts"]] if moe else []) + [c["requests"]] for c in cells])
    if missing:
        doc.h("Cells not done")
        doc.p("Rerun with --resume to finish them; the tables above use the cells that finished.")
        doc.table(["cell", "why"], [[m["cell"], m["why"]] for m in missing])
    return doc
