"""Result tables and the nightly sweep report.

`run_rows(run_dir)` turns one benchmark run folder into rows (one per mode); analyze.py and the report both use
it. `write_report(night, ...)` writes report.md, report.html (figures inlined as base64) and plots/*.png for one
night of a sweep, compares it with the previous night and the last N nights, and returns the verdict (failed
combinations and regressions first) that sets the sweep's exit code.
"""
from __future__ import annotations

import base64
import contextlib
import html
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated, Any

from pydantic import AfterValidator, ConfigDict

from lib.config_models import Accepts, ConfigModel, shown, validate_model
from lib.errors import UsageError
from lib.files import atomic_path, json_text, output_dir, output_file, path_component, read_json, write_texts
from lib.metrics import COLUMNS

ROW_COLUMNS = [c for c in COLUMNS if c.row]
RUN_KEYS = ["run", "mode", "engine", "method", "status", "error", "gamma", "batch_size"]  # what a row is about
ROW_KEYS = RUN_KEYS + [c.name for c in ROW_COLUMNS]
SHORT_KEYS = ["run", "mode", "status", "gamma", "batch_size"] + [c.name for c in ROW_COLUMNS if c.short]
# metric -> True when higher is better; the regression check compares these per combination and mode
REGRESSION_METRICS = {c.name: c.higher_is_better for c in COLUMNS if c.regress}
NUMBER_KEYS = ["gamma", "batch_size"] + [c.name for c in ROW_COLUMNS]  # a finite number or None in every row
LIST_KEYS = {c.name for c in ROW_COLUMNS if c.get({}, {}) == []}  # a list column reads as [] when it is missing
RESULTS_FILE = "benchmark_results.json"


# ---------------------------------------------------------------- the files, as their readers need them

class _FileModel(ConfigModel):
    """A file this project wrote, read back with strict types, so a damaged one is one line naming the key; keys
    these readers do not use (or a later version added) are ignored."""
    model_config = ConfigDict(extra="ignore", strict=True)


class _Part(_FileModel):
    """A mapping of a result file that the metric columns read as a whole: its other keys are kept."""
    model_config = ConfigDict(extra="allow")


class MetricGroups(_Part):
    latency: dict[str, Any] | None = None
    acceptance: dict[str, Any] | None = None


class Energy(_Part):
    available: bool = False
    reason: str | None = None  # why there are no readings


class ModeEntry(_Part):
    status: str | None = None
    error: str | None = None
    metrics: MetricGroups | None = None
    energy: Energy | None = None


class ComparisonEntry(_Part):
    mode: str


class ResultFile(_FileModel):
    """benchmark_results.json: what run_rows reads of it."""
    config: dict[str, Any] = {}
    modes: dict[str, ModeEntry] = {}
    comparisons: list[ComparisonEntry] = []


def _folder_name(value: str) -> str:
    try:
        return path_component(value, shown(value))
    except UsageError as exc:  # pydantic reports a ValueError as the key's problem
        raise ValueError(str(exc)) from None


class ComboResult(_FileModel):
    """One combination of a sweep as sweep.json records it."""
    id: Annotated[str, AfterValidator(_folder_name), Accepts("the name of the combination's folder")]
    vars: dict[str, str]  # the values this combination sets, as the benchmark's environment gets them
    status: str  # ok | failed | timeout | interrupted | skipped_budget | pending | running (the report: unreadable)
    exit_code: int | None = None
    error: str | None = None
    started: str | None = None
    duration_s: float | None = None
    failed_modes: list[str] = []


class SweepState(_FileModel):
    """sweep.json: the status of every combination of a night (or a payoff map), rewritten as the sweep runs."""
    sweep: str = ""
    fixed: dict[str, str] = {}
    combos: list[ComboResult] = []
    finished: str | None = None  # when every combination had ended; None while it runs, or stopped midway


def read_state(path: Path) -> SweepState:
    """A sweep.json, or one line naming it and what is wrong (for the report and for --resume alike)."""
    label = f"{path}: not a sweep state file"
    return validate_model(SweepState, read_json(path, label, "sweep.json as run_sweep.sh writes it"), label)


# ---------------------------------------------------------------- reading result folders

def run_rows(run_dir: Path) -> list[dict]:
    """One row per mode of RUN_DIR/benchmark_results.json (speedup = SD over the run's AR baseline). A file that is
    not one benchmark.py writes (not JSON, a key of the wrong type, a metric that is not a finite number or null)
    is one UsageError naming it."""
    path = run_dir / RESULTS_FILE
    label = f"{path}: not a SpecLab result file"
    raw = read_json(path, label, f"{RESULTS_FILE} as benchmark.py writes it")
    data = validate_model(ResultFile, raw, label).model_dump()  # every key kept, the ones the rows read typed
    cfg = data["config"]
    speedups = {c["mode"]: c for c in data["comparisons"]}
    batch = cfg.get("BATCH_SIZE", 1) if cfg.get("ENABLE_BATCH") else 1
    rows = []
    for mode, res in data["modes"].items():
        energy = res["energy"] or {}
        engine, _, method = mode.partition(":")
        comp = speedups.get(mode, {})
        row = {"run": run_dir.name, "mode": mode, "engine": engine, "method": method, "status": res["status"],
               "error": res["error"], "gamma": cfg.get("GAMMA_VALUE") if method != "target" else None,
               "batch_size": batch, **{c.name: c.get(res, comp) for c in ROW_COLUMNS},
               "energy_note": None if energy.get("available") else (energy.get("reason") or "no GPU monitor"),
               "config": cfg}
        check_numbers(row, label)
        rows.append(row)
    return rows


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_numbers(row: dict, label: str):
    """Every number of a row is a finite number or None (a list column: a list of finite numbers), so tables,
    plots and comparisons can do arithmetic on them; else one UsageError naming `label`, the mode and the key."""
    for key in NUMBER_KEYS:
        value = row[key]
        if key in LIST_KEYS:
            ok, accepted = isinstance(value, list) and all(map(_finite, value)), "a list of finite numbers"
        else:
            ok, accepted = value is None or _finite(value), "a finite number or null"
        if not ok:
            raise UsageError(f"{label}: mode {row['mode']!r}: {key}: found {shown(value)}; accepted: {accepted}")


def varying_config(rows: list[dict]) -> list[str]:
    """Config variables whose value differs between the rows' runs (the columns worth showing)."""
    from lib.config import VAR_BY_NAME

    def value(row, name):  # a variable added since an older run counts as its default there
        default = VAR_BY_NAME[name].default if name in VAR_BY_NAME else None
        return json.dumps(row["config"].get(name, default))
    names = sorted({k for r in rows for k in r["config"]} - {"RUN_ID", "RESULTS_DIR"})
    return [n for n in names if len({value(r, n) for r in rows}) > 1]


# ---------------------------------------------------------------- formatting

def fmt(value, digits=3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1000 else f"{value:.0f}"
    if isinstance(value, list):
        return " ".join(fmt(v, 2) for v in value)
    return str(value)


def md_table(headers: list[str], rows: list[list]) -> str:
    def cell(v):
        return fmt(v).replace("|", "\\|").replace("\n", " ")
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


class Doc:
    """Blocks rendered twice: Markdown (images as files) and self-contained HTML (images inlined)."""

    def __init__(self, title: str):
        self.title, self.blocks = title, []

    def h(self, text):
        self.blocks.append(("h", text))

    def p(self, text):
        self.blocks.append(("p", text))

    def table(self, headers, rows):
        if rows:
            self.blocks.append(("table", headers, rows))

    def img(self, path: Path, alt: str, source: Path | None = None):
        """An image shown from `path` in Markdown; the HTML inlines the bytes of `source` (default: path), e.g. the
        temporary file of a plot not yet renamed into place."""
        self.blocks.append(("img", path, alt, source or path))

    def markdown(self, base: Path) -> str:
        out = [f"# {self.title}"]
        for b in self.blocks:
            if b[0] == "h":
                out.append(f"## {b[1]}")
            elif b[0] == "p":
                out.append(b[1])
            elif b[0] == "table":
                out.append(md_table(b[1], b[2]))
            else:
                out.append(f"![{b[2]}]({b[1].relative_to(base).as_posix()})")
        return "\n\n".join(out) + "\n"

    def html(self) -> str:
        e = html.escape
        out = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{e(self.title)}</title><style>"
               "body{font-family:sans-serif;max-width:1200px;margin:2em auto;color:#222}"
               "table{border-collapse:collapse;margin:1em 0;font-size:13px}td,th{border:1px solid #ccc;"
               "padding:3px 8px;text-align:right}th{background:#eee}td:first-child{text-align:left}"
               "img{max-width:100%;border:1px solid #ddd;margin:.5em 0}.bad{color:#b00;font-weight:bold}"
               f"</style></head><body><h1>{e(self.title)}</h1>"]
        for b in self.blocks:
            if b[0] == "h":
                out.append(f"<h2>{e(b[1])}</h2>")
            elif b[0] == "p":
                out.append(f"<p>{e(b[1]).replace(chr(10), '<br>')}</p>")
            elif b[0] == "table":
                head = "".join(f"<th>{e(h)}</th>" for h in b[1])
                body = "".join("<tr>" + "".join(f"<td>{e(fmt(v))}</td>" for v in row) + "</tr>" for row in b[2])
                out.append(f"<table><tr>{head}</tr>{body}</table>")
            else:
                data = base64.b64encode(b[3].read_bytes()).decode()
                out.append(f"<figure><img alt='{e(b[2])}' src='data:image/png;base64,{data}'>"
                           f"<figcaption>{e(b[2])}</figcaption></figure>")
        out.append("</body></html>")
        return "\n".join(out)


# ---------------------------------------------------------------- one night of a sweep

@dataclass
class Night:
    path: Path
    state: SweepState
    rows: list = field(default_factory=list)  # run_rows of every combination that wrote results, + "combo"

    @property
    def name(self) -> str:
        return self.path.name

    def combos(self) -> list[ComboResult]:
        return self.state.combos


def load_night(path: Path) -> Night:
    """A night's sweep.json (one UsageError naming it if it is damaged) and the rows of its combinations. A result
    file that cannot be read makes its combination `unreadable`, with the reason, instead of costing the report;
    so does a missing one where the combination ran ok."""
    night = Night(path, read_state(path / "sweep.json"))
    for combo in night.combos():
        run_dir = path / combo.id
        if combo.status != "ok" and not (run_dir / RESULTS_FILE).is_file():
            continue  # a combination that failed early wrote no results
        try:
            rows = run_rows(run_dir)
        except UsageError as exc:
            combo.status, combo.error = "unreadable", str(exc)
            continue
        for row in rows:
            row["combo"] = combo.id
            night.rows.append(row)
    return night


def load_history(paths: list[Path]) -> tuple[list[Night], list[str]]:
    """The earlier nights that can be read, and why each of the others is left out of the comparison and the
    trend."""
    nights, left_out = [], []
    for p in paths:
        try:
            nights.append(load_night(p))
        except UsageError as exc:
            left_out.append(str(exc))
    return nights, left_out


def earlier_nights(night: Path, count: int) -> list[Path]:
    """Up to COUNT nights of the same sweep before this one, oldest first (folder names are ISO dates)."""
    older = sorted(p for p in night.parent.iterdir()
                   if p.is_dir() and p.name < night.name and (p / "sweep.json").is_file())
    return older[-count:] if count > 0 else []


@dataclass
class Change:
    combo: str
    mode: str
    metric: str
    before: float | None
    now: float | None
    change_pct: float | None
    regressed: bool
    improved: bool


@dataclass
class Verdict:
    night: str
    failed: list  # combos whose status is not ok: (id, status, error)
    broke: list  # combos ok the previous night and not ok now
    regressions: list
    improvements: list
    previous: str | None

    @property
    def exit_code(self) -> int:
        return 1 if self.failed or self.regressions else 0

    def summary(self) -> str:
        if self.exit_code == 0:
            return f"night {self.night}: all combinations ok, no regression" + (
                f" against {self.previous}" if self.previous else " (no previous night to compare with)")
        parts = []
        if self.failed:
            parts.append(f"{len(self.failed)} combination(s) not ok: " + ", ".join(f[0] for f in self.failed))
        if self.regressions:
            parts.append(f"{len(self.regressions)} regression(s) against {self.previous}: " + "; ".join(
                f"{r.combo} {r.mode} {r.metric} {fmt(r.before)} -> {fmt(r.now)} ({r.change_pct:+.1f}%)"
                for r in self.regressions[:5]))
        return f"night {self.night}: " + "; ".join(parts)


def compare_nights(now: Night, before: Night, threshold_pct: float, metrics: list[str]) -> list[Change]:
    old = {(r["combo"], r["mode"]): r for r in before.rows if r["status"] == "complete"}
    changes = []
    for row in now.rows:
        prev = old.get((row["combo"], row["mode"]))
        if prev is None or row["status"] != "complete":
            continue
        for metric in REGRESSION_METRICS:  # every change is shown; only the sweep's alert metrics can regress
            a, b = prev.get(metric), row.get(metric)
            if a is None or b is None or a == 0:
                continue
            pct = (b - a) / abs(a) * 100
            worse = -pct if REGRESSION_METRICS[metric] else pct
            alerting = metric in metrics
            changes.append(Change(row["combo"], row["mode"], metric, a, b, pct, alerting and worse > threshold_pct,
                                  alerting and -worse > threshold_pct))
    return changes


def verdict_of(now: Night, before: Night | None, threshold_pct: float, metrics: list[str]) -> tuple[Verdict, list]:
    failed = [(c.id, c.status, c.error or "") for c in now.combos() if c.status != "ok"]
    broke, changes = [], []
    if before is not None:
        ok_before = {c.id for c in before.combos() if c.status == "ok"}
        broke = [f for f in failed if f[0] in ok_before]
        changes = compare_nights(now, before, threshold_pct, metrics)
    regressions = sorted((c for c in changes if c.regressed), key=lambda c: -abs(c.change_pct))
    improvements = sorted((c for c in changes if c.improved), key=lambda c: -abs(c.change_pct))
    return Verdict(now.name, failed, broke, regressions, improvements, before.name if before else None), changes


# ---------------------------------------------------------------- plots: each its figure, or None (nothing to draw)

def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_speedup(rows: list[dict]):
    sd = [r for r in rows if r["speedup"] is not None]
    if not sd:
        return None
    plt = _plt()
    engines = sorted({r["engine"] for r in sd})
    fig, axes = plt.subplots(len(engines), 2, figsize=(11, 3.6 * len(engines)), squeeze=False)
    for i, engine in enumerate(engines):
        er = [r for r in sd if r["engine"] == engine]
        for ax, x_key, series_key, x_label, s_label in ((axes[i][0], "gamma", "batch_size", "GAMMA_VALUE", "batch"),
                                                        (axes[i][1], "batch_size", "gamma", "batch size", "gamma")):
            for s in sorted({r[series_key] for r in er}, key=lambda v: (v is None, v)):
                pts = sorted((r[x_key], r["speedup"]) for r in er if r[series_key] == s and r[x_key] is not None)
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{s_label} {s}")
            ax.axhline(1.0, color="grey", lw=0.8, ls="--")
            ax.xaxis.get_major_locator().set_params(integer=True)
            ax.set_xlabel(x_label)
            ax.set_ylabel("SD / AR output tokens/s")
            ax.set_title(f"{engine}: speedup vs {x_label}")
            ax.legend(fontsize=8)
            ax.grid(alpha=0.3)
    return fig


def plot_acceptance(rows: list[dict]):
    sd = [r for r in rows if r["per_position_acceptance"]]
    if not sd:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(11, 4))
    styles = [("-", "o"), ("--", "s"), (":", "^"), ("-.", "D")]  # identical curves stay visible on top of each other
    for i, r in enumerate(sd):
        line, marker = styles[i % len(styles)]
        ax.plot(range(1, len(r["per_position_acceptance"]) + 1), r["per_position_acceptance"], ls=line,
                marker=marker, markersize=5 + 2 * (i % len(styles)), fillstyle="none",
                label=f"{r['combo']} {r['mode']}")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_xlabel("draft position")
    ax.set_ylabel("accepted / drafts")
    ax.set_ylim(0, 1.02)
    ax.set_title("Acceptance per draft position")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return fig


def plot_latency(rows: list[dict]):
    done = [r for r in rows if r["status"] == "complete" and r["mean_ttft_ms"] is not None]
    if not done:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    labels = [f"{r['combo']}\n{r['mode']}" for r in done]
    x = range(len(done))
    for ax, metric in zip(axes, ("ttft_ms", "tpot_ms")):
        for stat, marker in (("median", "o"), ("p90", "s"), ("p99", "^"), ("mean", "x")):
            ax.scatter(x, [r[f"{stat}_{metric}"] or float("nan") for r in done], marker=marker, label=stat)
        ax.set_xticks(list(x))
        ax.set_xticklabels(labels, rotation=75, fontsize=6)
        ax.set_ylabel(f"{metric[:4].upper()} (ms)")
        ax.set_title(f"{metric[:4].upper()} percentiles")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    return fig


def plot_energy(rows: list[dict]):
    have = [r for r in rows if r["energy_per_token_j"] is not None]
    if not have:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(11, 4))
    ax.bar(range(len(have)), [r["energy_per_token_j"] for r in have])
    ax.set_xticks(range(len(have)))
    ax.set_xticklabels([f"{r['combo']}\n{r['mode']}" for r in have], rotation=75, fontsize=6)
    ax.set_ylabel("J / output token")
    ax.set_title("Energy per output token")
    return fig


def plot_trend(nights: list[Night]):
    if len(nights) < 2:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    keys = sorted({(r["combo"], r["mode"]) for n in nights for r in n.rows})
    names = [n.name for n in nights]
    for ax, metric, title in ((axes[0], "speedup", "SD speedup over AR"),
                              (axes[1], "output_throughput", "output tokens/s")):
        for combo, mode in keys:
            ys = []
            for n in nights:
                row = next((r for r in n.rows if r["combo"] == combo and r["mode"] == mode), None)
                ys.append(row[metric] if row and row["status"] == "complete" and row[metric] is not None
                          else float("nan"))
            if any(not math.isnan(y) for y in ys):
                ax.plot(names, ys, marker="o", ls="--" if mode.endswith(":target") else "-",
                        label=f"{combo} {mode}")
        ax.set_title(f"Trend: {title}, last {len(nights)} nights")
        ax.tick_params(axis="x", rotation=45, labelsize=7)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=2, frameon=False)
    fig.set_size_inches(12, 4 + 0.09 * len(keys))
    return fig


# ---------------------------------------------------------------- the report

def change_rows(changes: list[Change]) -> list[list]:
    return [[c.combo, c.mode, c.metric, c.before, c.now, f"{c.change_pct:+.1f}%"] for c in changes]


REPORT_FILES = ("report.md", "report.html", "report.json")
PLOT_FILES = ("speedup.png", "acceptance.png", "energy.png", "latency.png", "trend.png")


def check_report_outputs(night_path: Path) -> Path:
    """Every file the report writes can be written (no folder in the way of a file, no file in the way of plots/):
    checked before a sweep runs its combinations, and before each report. Returns plots/."""
    for name in REPORT_FILES:
        output_file(night_path / name, str(night_path / name))
    plots = output_dir(night_path / "plots", "the report's plots")
    for name in PLOT_FILES:
        output_file(plots / name, str(plots / name))
    return plots


class Plots:
    """The report's figures, each saved into a temporary file that is renamed into place only when the whole
    report has been written (the ExitStack closes), so a failure midway leaves the previous report's set whole."""

    def __init__(self, folder: Path, doc: Doc, stack: contextlib.ExitStack):
        self.folder, self.doc, self.stack = folder, doc, stack

    def add(self, fig, name: str, alt: str) -> bool:
        """Show `fig` (None: nothing to draw, False returned) in the report as plots/<name>."""
        if fig is None:
            return False
        tmp = self.stack.enter_context(atomic_path(self.folder / name))
        fig.tight_layout()
        fig.savefig(tmp, dpi=90)
        _plt().close(fig)
        self.doc.img(self.folder / name, alt, source=tmp)
        return True


def write_report(night_path: Path, threshold_pct: float = 10.0, trend_nights: int = 7,
                 metrics: list[str] | None = None) -> Verdict:
    """report.md, report.html, report.json and plots/ of one night, all replaced together; returns the verdict.
    A damaged sweep.json of this night is one UsageError naming it."""
    metrics = metrics or list(REGRESSION_METRICS)
    plots_dir = check_report_outputs(night_path)
    now = load_night(night_path)
    history, left_out = load_history(earlier_nights(night_path, trend_nights - 1))
    before = history[-1] if history else None
    verdict, changes = verdict_of(now, before, threshold_pct, metrics)
    doc = Doc(f"SpecLab sweep {now.state.sweep} - night {now.name}")
    with contextlib.ExitStack() as stack:
        plots = Plots(plots_dir, doc, stack)
        doc.p(verdict.summary())
        alerts_section(doc, now, verdict, threshold_pct)
        night_sections(doc, now, plots)
        previous_night_section(doc, now, before, verdict, changes, threshold_pct, metrics)
        trend_section(doc, now, history, left_out, plots)
        combinations_section(doc, now)
        write_texts({night_path / "report.md": doc.markdown(night_path), night_path / "report.html": doc.html(),
                     night_path / "report.json": json_text(verdict_json(verdict, threshold_pct))})
    return verdict


def verdict_json(verdict: Verdict, threshold_pct: float) -> dict:
    return {"schema": "speclab.sweep_report/1", "night": verdict.night, "previous": verdict.previous,
            "threshold_pct": threshold_pct, "exit_code": verdict.exit_code,
            "failed": [{"id": f[0], "status": f[1], "error": f[2]} for f in verdict.failed],
            "broke": [f[0] for f in verdict.broke],
            "regressions": [asdict(c) for c in verdict.regressions],
            "improvements": [asdict(c) for c in verdict.improvements]}


def alerts_section(doc: Doc, now: Night, verdict: Verdict, threshold_pct: float):
    doc.h("Alerts: failures and regressions")
    if not (verdict.failed or verdict.regressions):
        doc.p("None.")
    doc.table(["combination", "status", "error (last lines)"],
              [[cid + (" (broke since last night)" if (cid, st, err) in verdict.broke else ""), st,
                err.strip().splitlines()[-1] if err.strip() else ""] for cid, st, err in verdict.failed])
    if verdict.regressions:
        doc.p(f"Regressions beyond {threshold_pct:g}% against {verdict.previous} (worst first):")
        doc.table(["combination", "mode", "metric", verdict.previous, now.name, "change"],
                  change_rows(verdict.regressions))


def night_sections(doc: Doc, now: Night, plots: Plots):
    """Tonight's figures: speedup, acceptance, energy, latency."""
    doc.h("Speedup of SD over AR")
    plots.add(plot_speedup(now.rows), "speedup.png", "speedup of SD over AR vs GAMMA_VALUE and batch size, per engine")
    sd_rows = [r for r in now.rows if r["method"] != "target"]
    doc.table(["combination", "mode", "gamma", "batch", "speedup (tok/s)", "TPOT speedup", "accept rate",
               "accept length"],
              [[r["combo"], r["mode"], r["gamma"], r["batch_size"], r["speedup"], r["tpot_speedup"],
                r["acceptance_rate"], r["acceptance_length"]] for r in sd_rows])

    doc.h("Acceptance per position")
    if not plots.add(plot_acceptance(now.rows), "acceptance.png", "acceptance rate per draft position"):
        doc.p("No speculative mode reported per-position acceptance.")

    doc.h("Energy per output token")
    if not plots.add(plot_energy(now.rows), "energy.png", "energy per output token"):
        notes = sorted({r["energy_note"] for r in now.rows if r["energy_note"]})
        doc.p("n/a: no GPU energy readings this night" + (f" ({notes[0]})" if notes else "") + ".")

    doc.h("Latency: TTFT and TPOT percentiles")
    plots.add(plot_latency(now.rows), "latency.png", "TTFT and TPOT percentiles per combination and mode")
    doc.table(["combination", "mode", "status", "out tok/s", "TTFT p50", "TTFT p90", "TTFT p99", "TPOT p50",
               "TPOT p90", "TPOT p99", "J/token"],
              [[r["combo"], r["mode"], r["status"], r["output_throughput"], r["median_ttft_ms"], r["p90_ttft_ms"],
                r["p99_ttft_ms"], r["median_tpot_ms"], r["p90_tpot_ms"], r["p99_tpot_ms"], r["energy_per_token_j"]]
               for r in now.rows])


def previous_night_section(doc: Doc, now: Night, before: Night | None, verdict: Verdict, changes: list[Change],
                           threshold_pct: float, metrics: list[str]):
    doc.h(f"Compared with the previous night ({verdict.previous or 'none'})")
    if before is None:
        doc.p("No earlier night of this sweep: nothing to compare with yet.")
        return
    doc.p(f"Alerts: {', '.join(metrics)} beyond {threshold_pct:g}%. Improvements beyond it: "
          f"{len(verdict.improvements)}; regressions: {len(verdict.regressions)}.")
    doc.table(["combination", "mode", "metric", before.name, now.name, "change"], change_rows(
        [c for c in changes if c.metric in ("speedup", "output_throughput", "acceptance_length")]))


def trend_section(doc: Doc, now: Night, history: list[Night], left_out: list[str], plots: Plots):
    doc.h("Trend")
    if not plots.add(plot_trend(history + [now]), "trend.png", f"trend over the last {len(history) + 1} nights"):
        doc.p("A trend needs at least two nights.")
    if left_out:
        doc.p("Earlier nights left out of the comparison and the trend:\n" + "\n".join(left_out))


def combinations_section(doc: Doc, now: Night):
    doc.h("Combinations")
    doc.table(["combination", "status", "exit code", "seconds", "variables"],
              [[c.id, c.status, c.exit_code, c.duration_s, " ".join(f"{k}={v}" for k, v in c.vars.items())]
               for c in now.combos()])
    doc.p("Fixed: " + (" ".join(f"{k}={v}" for k, v in now.state.fixed.items()) or "nothing"))
