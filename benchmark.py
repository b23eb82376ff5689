#!/usr/bin/env python3
"""SpecLab benchmark: speculative decoding vs target-only AR on one workload, per engine.

Every option is also an environment variable (see the groups below; README has the table). Typical use is
through ./run_benchmark.sh, which sets up the environment first.
"""
from __future__ import annotations

import argparse
import sys
import time
import traceback

from lib import config as C
from lib.errors import UsageError, exit_on_usage_error
from lib.log import setup_logging

REQUIREMENT_SETS_FLAG = "--print-requirement-sets"  # run_benchmark.sh's question before it installs anything


def build_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="run_benchmark.sh", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Precedence: defaults < environment variables < flags.", add_help=add_help)
    parser.add_argument("--dry-run", action="store_true",
                        help="print the resolved configuration and the plan, then exit (loads nothing)")
    C.add_arguments(parser)
    return parser


def plan_of(cfg, pairs) -> dict:
    workload = ({"mode": "rate", "rate_per_s": cfg.auto_rate, "duration_s": cfg.auto_duration,
                 "expected_requests": round(cfg.auto_rate * cfg.auto_duration)} if cfg.auto_rate > 0
                else {"mode": "fixed_count", "num_requests": cfg.num_prompts})
    workload.update({"batch_size": cfg.batch_size if cfg.enable_batch else 1,
                     "generation_length": cfg.generation_length,
                     "prompts": cfg.sharegpt_dir or cfg.prompt_file})
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
    for var in C.VARS:
        value = getattr(cfg, var.attr)
        table.add_row(var.name, "" if value is None else str(value), cfg.sources[var.name])
    console.print(table)
    console.print("[bold]Plan[/bold]")
    for i, mode in enumerate(plan["modes"], 1):
        console.print(f"  {i}. {mode}")
    w = plan["workload"]
    if w["mode"] == "rate":
        console.print(f"  workload: Poisson arrivals at {w['rate_per_s']:g} req/s for {w['duration_s']:g} s "
                      f"(~{w['expected_requests']} requests), batch size {w['batch_size']}")
    else:
        console.print(f"  workload: {w['num_requests']} requests, batch size {w['batch_size']}")
    console.print(f"  prompts: {w['prompts']}; {w['generation_length']} new tokens each; "
                  f"GAMMA_VALUE={plan['gamma']}, TEMPERATURE={plan['temperature']:g}")
    console.print(f"  target: {plan['models']['target']}; draft: {plan['models']['draft']}")


COPY_BANDWIDTH: dict[str, float] = {}  # device -> measured copy bytes/s, once per run


def run_mode(engine_name, method, cfg, models, requests, writer, monitor, run_clock, console):
    """Start one engine, run the workload, save its results. Returns the mode's result dict."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from lib.engines import create_engine
    from lib.metrics import aggregate, request_metrics
    from lib.types import Clock

    mode = f"{engine_name}:{method}"
    engine = create_engine(engine_name, cfg, method, models)
    console.print(f"[bold]== {mode}[/bold]: starting engine")
    engine.start()
    if cfg.warmup:
        console.print(f"{mode}: warm-up (one short untimed batch)")
        engine.warmup(requests)
    records, status, error = [], "complete", None
    clock = Clock()
    t_start = monitor.mark()
    with Progress(TextColumn(f"{mode}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=False, disable=not console.is_terminal) as progress:
        task = progress.add_task(mode, total=len(requests))

        def on_done(record):
            records.append(record)
            m = request_metrics(record)
            writer.append_request(mode, record, {"ttft_ms": m.ttft_ms, "tpot_ms": m.tpot_ms, "e2el_ms": m.e2el_ms})
            progress.advance(task)

        try:
            engine.run(requests, clock, on_done)
        except KeyboardInterrupt:
            status = "interrupted"
        except UsageError:
            raise
        except Exception as exc:  # noqa: BLE001 - an engine crash is recorded; finished requests are kept
            status, error = "failed", f"{exc.__class__.__name__}: {exc}"
            console.print(f"[red]{mode} failed:[/red] {error}")
            traceback.print_exc(file=sys.stderr)
    duration = clock.now()
    t_end = monitor.mark()
    metrics = aggregate(mode, records, duration, engine.run_spec_counters)
    result = {"status": status, "error": error, "engine": engine.describe(), "weight_bytes": engine.weight_bytes(),
              "window": {"start_s": t_start, "end_s": t_end}, "metrics": metrics.to_json(),
              "energy": monitor.window(t_start, t_end, metrics.total_output_tokens)}
    if engine.weight_bytes_read:
        from lib.bandwidth import bandwidth_report, copy_bandwidth
        device = result["engine"].get("device", "cpu")
        if device not in COPY_BANDWIDTH:
            COPY_BANDWIDTH[device] = copy_bandwidth(device)
        result["bandwidth"] = bandwidth_report(engine.weight_bytes_read, duration, COPY_BANDWIDTH[device])
    result.update(engine.extra_results())
    writer.save_mode(mode, result)
    engine.stop()
    if status == "interrupted":
        raise KeyboardInterrupt
    return result


def comparisons_of(modes: dict) -> list[dict]:
    from lib.metrics import compare
    baseline = next((m for m in modes if m.endswith(":target")), None)
    if baseline is None:
        return []
    return [compare(modes[baseline], res) for m, res in modes.items() if m != baseline]


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

    from rich.console import Console

    from lib.engines import engine_class
    from lib.engines.base import check_context
    from lib.files import output_dir
    from lib.gpu_monitor import GPUMonitor
    from lib.models import load_tokenizer, resolve_models
    from lib.results import RunWriter, default_run_id, print_summary
    from lib.types import Clock
    from lib.workload import build_requests, describe_workload, load_prompts

    console = Console() if sys.stdout.isatty() else Console(width=170)
    output_dir(cfg.results_dir, f"RESULTS_DIR={cfg.results_dir}")  # before any work
    need_draft = any(C.mode_needs_draft(cfg, e, m) for e, m in pairs)
    models = resolve_models(cfg, need_draft=need_draft)
    tokenizer = load_tokenizer(models.target, "TARGET_MODEL")
    prompts, stats = load_prompts(cfg, tokenizer)
    requests = build_requests(cfg, prompts, tokenizer)
    if not requests:
        raise UsageError(f"AUTO_RATE={cfg.auto_rate:g} x AUTO_DURATION={cfg.auto_duration:g}: no request arrives "
                         "in that window; raise the rate or the duration")
    for engine_name, method in pairs:  # every mode's context, before the first one runs
        limit = engine_class(engine_name).context_length(cfg, method, models)
        check_context(requests, limit, f"{engine_name}:{method}")
    plan["workload"] = describe_workload(cfg, requests, stats)
    plan["models"] = models.describe()
    writer = RunWriter(cfg.results_dir, cfg.run_id or default_run_id(cfg), cfg, plan)
    console.print(f"SpecLab: {len(requests)} requests, modes {', '.join(plan['modes'])}; results in {writer.dir}")
    run_clock = Clock()
    monitor = GPUMonitor(cfg.gpu_monitor_interval, run_clock.now, enabled=cfg.enable_gpu_monitor)
    writer.gpu_info = {"available": monitor.available, "reason": monitor.reason or None,
                       "gpus": {str(i): n for i, n in monitor.names.items()}}
    monitor.start()
    exit_code = 0
    try:
        for engine_name, method in pairs:
            result = run_mode(engine_name, method, cfg, models, requests, writer, monitor, run_clock, console)
            exit_code = exit_code or (1 if result["status"] == "failed" else 0)
    except KeyboardInterrupt:
        console.print("[yellow]Interrupted: results of finished requests are saved.[/yellow]")
        exit_code = 130
    finally:
        monitor.stop()
        writer.comparisons = comparisons_of(writer.modes)
        writer.save_results()
        writer.save_run(finished=time.strftime("%Y-%m-%dT%H:%M:%S"), exit_code=exit_code,
                        engines={mode: res["engine"] for mode, res in writer.modes.items()})  # placement included
        writer.close()
    print_summary(writer.modes, writer.comparisons, writer.dir, console)
    return exit_code


if __name__ == "__main__":
    sys.exit(main())
