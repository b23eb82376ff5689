#!/usr/bin/env python3
"""SpecLab benchmark: speculative decoding vs target-only AR on one workload, per engine.

Every option is also an environment variable (see the groups below; README has the table). Typical use is
through ./run_benchmark.sh, which sets up the environment first.
"""
from __future__ import annotations

import lib.environment  # noqa: F401  (first: a package this Python lacks is one line, not a traceback)

# isort: split

import argparse
import signal
import sys
import traceback
from dataclasses import dataclass, field

from lib import config as C
from lib.errors import UsageError, exit_on_usage_error
from lib.interrupts import Interrupted, StopSignals
from lib.log import get_logger, setup_logging
from lib.types import Clock

logger = get_logger(__name__)

REQUIREMENT_SETS_FLAG = "--print-requirement-sets"  # run_benchmark.sh's question before it installs anything


def build_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="run_benchmark.sh", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Precedence: defaults < environment variables < flags.\nExit codes: 0 ok, 1 a mode failed, 2 bad input, "
        "3 a losslessness verdict MISMATCH (greedy) or DIFFERENT (sampled)\nunder LOSSLESS_CHECK=fail (the result "
        "files hold it), 130/143/129 stopped by SIGINT/SIGTERM/SIGHUP.", add_help=add_help)
    parser.add_argument("--dry-run", action="store_true",
                        help="print the resolved configuration and the plan, then exit (loads nothing)")
    C.add_arguments(parser)
    return parser


def plan_of(cfg, pairs) -> dict:
    from lib.arrivals import arrivals
    ramp = {"strategy": cfg.ramp_up_strategy, "start_rps": cfg.ramp_up_start_rps, "end_rps": cfg.ramp_up_end_rps}
    workload = ({"mode": "rate", "rate_per_s": cfg.auto_rate, "duration_s": cfg.auto_duration,
                 "arrival_schedule": cfg.arrival_schedule, "burstiness": cfg.burstiness,
                 "ramp_up": ramp if cfg.ramp_up_strategy != "none" else None,
                 "expected_requests": len(arrivals(cfg))}  # at most MAX_REQUESTS offsets: cheap to draw
                if C.rate_mode(cfg) else {"mode": "fixed_count", "num_requests": cfg.num_prompts})
    from lib.workload import dataset_of, max_tokens_rule
    dataset = dataset_of(cfg)
    workload.update({"batch_size": cfg.batch_size if cfg.enable_batch else 1,
                     "generation_length": cfg.generation_length, "dataset": dataset,
                     "prompts": {"prompt_file": cfg.prompt_file, "sharegpt": cfg.sharegpt_dir,
                                 "custom": cfg.dataset_path, "spec_bench": cfg.dataset_path}.get(dataset, dataset),
                     "max_tokens": max_tokens_rule(cfg)})
    return {"modes": [f"{e}:{m}" for e, m in pairs], "workload": workload,
            "models": {"target": cfg.target_model or "tiny local target (built on first use)",
                       "draft": cfg.drafter_model or ("tiny local draft" if not cfg.target_model else None)},
            "gamma": cfg.gamma_value, "temperature": cfg.temperature}


def print_dry_run(cfg, plan):
    from rich.console import Console
    from rich.table import Table
    console = Console()
    table = Table(title="Resolved configuration")
    for col in ("variable", "value", "source"):
        table.add_column(col)
    shown = cfg.as_dict()
    for var in C.VARS:
        value = shown[var.name]
        table.add_row(var.name, "" if value is None else str(value), cfg.sources[var.name])
    console.print(table)
    console.print("[bold]Plan[/bold]")
    for i, mode in enumerate(plan["modes"], 1):
        console.print(f"  {i}. {mode}")
    w = plan["workload"]
    if w["mode"] == "rate":
        ramp = w["ramp_up"]
        rate = f"{w['rate_per_s']:g} req/s" if ramp is None else \
            f"a {ramp['strategy']} ramp-up from {ramp['start_rps']:g} to {ramp['end_rps']:g} req/s"
        span = f" for {w['duration_s']:g} s" if w["arrival_schedule"] == "speclab" else ""
        console.print(f"  workload: {w['arrival_schedule']} arrivals (gamma, burstiness {w['burstiness']:g}) at "
                      f"{rate}{span} ({w['expected_requests']} requests), batch size {w['batch_size']}")
    else:
        console.print(f"  workload: {w['num_requests']} requests, batch size {w['batch_size']}")
    console.print(f"  prompts: {w['prompts']} ({w['dataset']}); max new tokens: {w['max_tokens']}; "
                  f"GAMMA_VALUE={plan['gamma']}, TEMPERATURE={plan['temperature']:g}")
    console.print(f"  target: {plan['models']['target']}; draft: {plan['models']['draft']}")


COPY_BANDWIDTH: dict[str, float] = {}  # device -> measured copy bytes/s, once per run


@dataclass
class TimedPass:
    """One timed pass of the workload so far: what finished, its clock, where the GPU monitor's window starts."""
    t_start: float
    records: list = field(default_factory=list)
    clock: Clock = field(default_factory=Clock)


def timed_pass(mode, engine, requests, writer, stop, console, current: TimedPass, run_index: int | None):
    """Run the workload once into current (a failure propagates; what finished is in current)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from lib.metrics import request_metrics

    label = mode if run_index is None else f"{mode} run {run_index + 1}"
    with Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=False, disable=not console.is_terminal) as progress:
        task = progress.add_task(mode, total=len(requests))

        def on_done(record):
            with stop.held():  # the record counted and its line written, or neither
                current.records.append(record)
                m = request_metrics(record)
                line = {"ttft_ms": m.ttft_ms, "tpot_ms": m.tpot_ms, "e2el_ms": m.e2el_ms}
                writer.append_request(mode, record, line if run_index is None else {**line, "run": run_index})
            progress.advance(task)

        engine.run(requests, current.clock, on_done)


def run_mode(engine_name, method, cfg, models, requests, writer, monitor, stop, console, records: dict):
    """Start one engine, run the workload (NUM_RUNS times), save its results. Returns the mode's result dict;
    records[mode] gets the last pass's records (the losslessness verdict reads them). A mode that fails to start or
    warm up is saved too (status failed, its error); a stop signal ends the run once the mode is saved."""
    from lib.engines import create_engine

    mode = f"{engine_name}:{method}"
    writer.mode_started(mode)
    engine, started, status, error = None, False, "complete", None
    current, earlier = TimedPass(monitor.mark()), []  # earlier: metrics of the finished passes before current
    categories = {r.request_id: r.category for r in requests if r.category is not None}
    try:
        engine = create_engine(engine_name, cfg, method, models)
        console.print(f"[bold]== {mode}[/bold]: starting engine")
        engine.start()
        started = True
        if cfg.warmup:
            console.print(f"{mode}: warm-up (one short untimed batch)")
            engine.warmup(requests)
        for i in range(cfg.num_runs):
            if i:
                earlier.append(pass_metrics(cfg, mode, engine, current, categories).to_json())
                engine.reset_counters()
            current = TimedPass(monitor.mark())
            timed_pass(mode, engine, requests, writer, stop, console, current, i if cfg.num_runs > 1 else None)
    except KeyboardInterrupt:  # Interrupted, or a plain one from a library that took over SIGINT
        status = "interrupted"
    except UsageError as exc:
        status, error = "failed", str(exc)
        raise  # ends the run with its one line, once the mode is saved (below)
    except Exception as exc:  # noqa: BLE001 - a crash is recorded; finished requests are kept
        status, error = "failed", f"{exc.__class__.__name__}: {exc}"
        console.print(f"[red]{mode} failed:[/red] {error}")
        traceback.print_exc(file=sys.stderr)
    finally:
        records[mode] = current.records
        try:
            with stop.held():
                result = save_mode(cfg, mode, engine, started, models, requests, current, earlier, categories,
                                   writer, monitor, status, error)
        finally:
            if engine is not None:
                engine.stop()
    if status == "interrupted":
        raise Interrupted(stop.signum or signal.SIGINT)
    return result


def pass_metrics(cfg, mode, engine, current: TimedPass, categories):
    from lib.metrics import aggregate
    return aggregate(mode, current.records, current.clock.now(), engine.run_spec_counters if engine else None,
                     C.goodput_slos(cfg), categories)


def save_mode(cfg, mode, engine, started, models, requests, current: TimedPass, earlier, categories, writer,
              monitor, status, error) -> dict:
    """The mode's result (the last pass; NUM_RUNS > 1 adds the passes' means and intervals), written with its
    bench_serve_<mode>.json."""
    from lib import bench_serve
    from lib.files import write_json
    from lib.results import mode_slug

    duration, t_end = current.clock.now(), monitor.mark()
    metrics = pass_metrics(cfg, mode, engine, current, categories)
    result = {"status": status, "error": error, "engine": _describe(engine, mode),
              "weight_bytes": engine.weight_bytes() if started else None,
              "window": {"start_s": current.t_start, "end_s": t_end}, "metrics": metrics.to_json(),
              "energy": monitor.window(current.t_start, t_end, metrics.total_output_tokens)}
    if cfg.num_runs > 1:
        result["repeats"] = bench_serve.repeats_summary(earlier + [result["metrics"]])
    if engine is not None and engine.weight_bytes_read:
        from lib.bandwidth import bandwidth_report, copy_bandwidth
        device = result["engine"].get("device", "cpu")
        if device not in COPY_BANDWIDTH:
            COPY_BANDWIDTH[device] = copy_bandwidth(device)
        result["bandwidth"] = bandwidth_report(engine.weight_bytes_read, duration, COPY_BANDWIDTH[device])
    if started:
        result.update(engine.extra_results())
    if started and status == "complete":
        result["cost_inputs"] = engine.cost_inputs()  # the SD cost model's inputs (lib/sd_report.py)
    writer.save_mode(mode, result)
    if started:
        write_json(writer.dir / f"bench_serve_{mode_slug(mode)}.json",
                   bench_serve.result(cfg, mode, models, requests, current.records, metrics))
    return result


def _describe(engine, mode: str) -> dict:
    engine_name, _, method = mode.partition(":")
    try:
        return engine.describe() if engine is not None else {"engine": engine_name, "method": method}
    except Exception:  # noqa: BLE001 - an engine that failed to start may not know its devices yet
        return {"engine": engine_name, "method": method}


def comparisons_of(modes: dict) -> list[dict]:
    from lib.metrics import compare
    baseline = next((m for m in modes if m.endswith(":target")), None)
    if baseline is None:
        return []
    return [compare(modes[baseline], res) for m, res in modes.items() if m != baseline]


def lossless_outcome(cfg, modes: dict, records: dict, exit_code: int, error: str | None) -> tuple[int, str | None]:
    """Each SD mode's verdict into its result; (exit code, error line): lossless.EXIT_CODE for a failing verdict
    under LOSSLESS_CHECK=fail when the run would otherwise exit 0."""
    from lib import lossless
    failing = lossless.attach(modes, records, cfg.temperature, cfg.seed)
    if failing and cfg.lossless_check == "fail" and exit_code == 0:
        return lossless.EXIT_CODE, (lossless.failure_line(modes, failing)
                                    + f" (exit {lossless.EXIT_CODE} under LOSSLESS_CHECK=fail; warn keeps exit 0)")
    return exit_code, error


def print_requirement_sets(argv: list[str]) -> int:
    """The requirement sets (requirements/<set>.txt) this configuration needs, on one line. Env and flags resolve
    as for a run, so bad input ends here with its one-line error; unknown flags are left to the run, and --help
    needs only core."""
    parser = build_parser(add_help=False)
    parser.add_argument("-h", "--help", action="store_true")
    args, _ = parser.parse_known_args(argv)
    print(" ".join(["core"] if args.help else C.requirement_sets(C.resolve(args))))
    return 0


@exit_on_usage_error
def main(argv=None) -> int:
    setup_logging()
    argv = sys.argv[1:] if argv is None else list(argv)
    if REQUIREMENT_SETS_FLAG in argv:
        return print_requirement_sets([a for a in argv if a != REQUIREMENT_SETS_FLAG])
    args = build_parser().parse_args(argv)
    cfg = C.resolve(args)
    pairs = C.modes(cfg)
    plan = plan_of(cfg, pairs)
    if args.dry_run:
        print_dry_run(cfg, plan)
        return 0

    with StopSignals() as stop:
        try:
            return run(cfg, pairs, plan, stop)
        except Interrupted as exc:
            logger.warning(f"Interrupted ({signal.Signals(exc.signum).name}) before the first mode: nothing ran")
            return exc.exit_code


def prepare(cfg, pairs, plan):
    """Models, tokenizer, prompts and requests (plan gets the workload and models); (models, requests)."""
    from lib.engines import engine_class
    from lib.engines.base import check_context
    from lib.models import load_tokenizer, resolve_models
    from lib.workload import build_requests, describe_workload, load_prompts, max_tokens_rule

    need_draft = any(C.mode_needs_draft(cfg, e, m) for e, m in pairs)
    models = resolve_models(cfg, need_draft=need_draft)
    if cfg.mixed_precision_config:  # read by the hf modes as they start: checked now, so none costs a finished mode
        from lib.quant.loader import check_mixed_precision_config
        check_mixed_precision_config(cfg.mixed_precision_config, models.target)
    tokenizer = load_tokenizer(models.target, "TARGET_MODEL")
    prompts, stats = load_prompts(cfg, tokenizer)
    requests = build_requests(cfg, prompts, tokenizer)
    if not requests:
        raise UsageError(f"AUTO_RATE={cfg.auto_rate:g} x AUTO_DURATION={cfg.auto_duration:g}: no request arrives "
                         "in that window; raise the rate or the duration")
    for engine_name, method in pairs:  # every mode's context, before the first one runs
        limit = engine_class(engine_name).context_length(cfg, method, models)
        check_context(requests, limit, f"{engine_name}:{method}", max_tokens_rule(cfg))
    plan["workload"] = describe_workload(cfg, requests, stats)
    plan["models"] = models.describe()
    return models, requests


def run(cfg, pairs, plan, stop: StopSignals) -> int:
    """The modes one after another into one run folder; returns the exit code (0 ok, 1 a mode failed, 3 a
    losslessness verdict failed under LOSSLESS_CHECK=fail, 130/143/129 stopped by SIGINT/SIGTERM/SIGHUP).
    run.json and the result files say the same."""
    from rich.console import Console

    from lib.files import for_display
    from lib.gpu_monitor import GPUMonitor
    from lib.results import RunFolder, RunWriter, default_run_id, print_summary

    folder = RunFolder(cfg, cfg.run_id or default_run_id(cfg))  # refused at once if in use or holding a run
    try:
        console = Console() if sys.stdout.isatty() else Console(width=170)
        models, requests = prepare(cfg, pairs, plan)
        run_clock = Clock()
        monitor = GPUMonitor(cfg.gpu_monitor_interval, run_clock.now, enabled=cfg.enable_gpu_monitor)
    except BaseException:
        folder.release()
        raise
    exit_code, status, error, writer, records = 0, "ok", None, None, {}
    try:
        with stop.held():  # a signal now is raised once the first files are written
            writer = RunWriter(folder, cfg, plan)
        console.print(f"SpecLab: {len(requests)} requests, modes {', '.join(plan['modes'])}; results in "
                      f"{for_display(writer.dir)}")
        writer.gpu_info = {"available": monitor.available, "reason": monitor.reason or None,
                           "gpus": {str(i): n for i, n in monitor.names.items()}}
        monitor.start()
        for engine_name, method in pairs:
            result = run_mode(engine_name, method, cfg, models, requests, writer, monitor, stop, console, records)
            if result["status"] == "failed":
                exit_code, status = 1, "failed"
    except Interrupted as exc:
        console.print(f"[yellow]Interrupted ({signal.Signals(exc.signum).name}): results of finished requests are "
                      "saved.[/yellow]")
        exit_code, status = exc.exit_code, "interrupted"
    except BaseException as exc:
        exit_code, status = (2 if isinstance(exc, UsageError) else 1), "failed"
        error = str(exc) if isinstance(exc, UsageError) else f"{exc.__class__.__name__}: {exc}"
        raise
    finally:
        stop.hold_for_good()  # the last save is not cut short by a second signal
        monitor.stop()
        if writer is None:  # RunWriter itself failed (e.g. a full disk): its error follows
            folder.release()
        else:
            writer.comparisons = comparisons_of(writer.modes)
            from lib.sd_report import attach
            attach(writer.modes)  # each SD mode's cost model, once every mode it reads has run
            if cfg.lossless_check != "off":
                exit_code, error = lossless_outcome(cfg, writer.modes, records, exit_code, error)
            writer.finish(status, exit_code, error,
                          engines={mode: res["engine"] for mode, res in writer.modes.items()})  # placement too
            writer.close()
    print_summary(writer.modes, writer.comparisons, writer.dir, console)
    return exit_code


if __name__ == "__main__":
    sys.exit(main())
