#!/usr/bin/env python3
"""Edge/cloud collaborative decoding: servers, an interactive prompt, one client request, or the ablations.

  --mode server       start the edge (8080) and cloud (8081) servers in this process until Ctrl-C
  --mode interactive  type prompts; also `stats`, `config`, `quit`/`exit` (servers must be running)
  --mode client       one request: --prompt, --max-tokens, --temperature, --no-draft-verify, --no-confidence-check
  --mode ablation     every experiment on the same prompts -> ablation_report.json, a table and a plot
                      (starts the servers in this process unless --external-servers)

Ctrl-C or SIGTERM prints what was committed (client), keeps the finished requests in the report (ablation) and
exits 130 / 143; in interactive mode Ctrl-C cancels the request under way and SIGTERM ends the session.
"""
from __future__ import annotations

import lib.environment  # noqa: F401  (first: a package this Python lacks is one line, not a traceback)

# isort: split

import argparse
import asyncio
import json
import math
import signal
import sys
from contextlib import contextmanager

from lib.errors import UsageError, exit_on_usage_error
from lib.files import output_dir
from lib.interrupts import Interrupted, StopSignals
from lib.log import setup_logging

KEPT_ON_STOP = {"client": "what was committed is printed above", "interactive": "session ended",
                "ablation": "the report keeps every finished request", "server": "servers stopped"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog="\n".join(__doc__.splitlines()[2:]),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=("server", "interactive", "client", "ablation"), default="client")
    p.add_argument("--config", default=None, help="YAML merged over configs/edge_cloud.yaml")
    g = p.add_argument_group("client")
    g.add_argument("--prompt", default=None, help="prompt text (client mode)")
    g.add_argument("--max-tokens", type=int, default=None, help="tokens to generate (default: inference.max_tokens)")
    g.add_argument("--temperature", type=float, default=None, help="0 = greedy (default: inference.temperature)")
    g.add_argument("--no-draft-verify", action="store_true",
                   help="no cloud verification: confident drafts are final (lossy)")
    g.add_argument("--no-confidence-check", action="store_true",
                   help="no confidence check: always draft max_draft_tokens")
    g.add_argument("--no-kv-cache", action="store_true", help="no KV cache reuse: recompute the context every round")
    g.add_argument("--pipeline", choices=("collaborative", "edge_only", "cloud_only"), default="collaborative")
    g.add_argument("--network-delay-ms", type=float, default=None, help="added to every cloud round trip")
    g.add_argument("--json", action="store_true", help="print the full result as JSON")
    a = p.add_argument_group("ablation")
    a.add_argument("--prompts", default=None, help="prompt file (default: experiments.prompts_file)")
    a.add_argument("--num-prompts", type=int, default=None, help="default: experiments.num_prompts")
    a.add_argument("--output-dir", default=None, help="default: experiments.output_dir")
    a.add_argument("--experiments", default=None, help="comma-separated names to run (cloud_only always runs)")
    a.add_argument("--external-servers", action="store_true", help="use running servers at the config's endpoints")
    args = p.parse_args(argv)
    for name in ("max_tokens", "num_prompts"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    for name in ("temperature", "network_delay_ms"):
        value = getattr(args, name)
        if value is not None and not (math.isfinite(value) and value >= 0):
            p.error(f"--{name.replace('_', '-')}={value}: expected a finite number >= 0")
    return args


def load(args) -> dict:
    from lib.edgecloud.settings import apply_overrides, load_config
    cfg = load_config(args.config)
    given = {("communication", "network_delay_ms"): args.network_delay_ms,  # checked like the file's values
             ("inference", "max_tokens"): args.max_tokens, ("inference", "temperature"): args.temperature}
    over, flags = {}, []
    for (section, key), value in given.items():
        if value is not None:
            over.setdefault(section, {})[key] = value
            flags.append(f"--{key.replace('_', '-')} {value}")
    return apply_overrides(cfg, over, ", ".join(flags)) if over else cfg


def print_result(res, as_json: bool):
    """The result on stdout (text and a summary line, or JSON); a note and the error on stderr."""
    if as_json:
        print(json.dumps(res.to_json(), indent=2))
    else:
        print(res.text)
        print(f"-- {len(res.token_ids)} tokens, {res.total_latency_ms:.0f} ms total (edge {res.edge_latency_ms:.0f}, "
              f"cloud {res.cloud_latency_ms:.0f}, network {res.network_latency_ms:.0f}), {res.rounds} rounds, "
              f"{res.cloud_calls} cloud calls, acceptance {res.acceptance_rate:.0%}, confidence "
              f"{res.confidence_score:.2f}" + (" [edge_fallback]" if res.edge_fallback else ""))
    if res.dropped_tokens:
        print(f"note: the servers sent {res.dropped_tokens} tokens past max_tokens or EOS; they were dropped",
              file=sys.stderr)
    if res.error and not res.interrupted:  # an interruption gets its own line at the end
        print(f"error: {res.error}", file=sys.stderr)


async def infer(client, prompt: str, args):
    """One request with the client options of the command line, printed; cut short by a stop signal, what it
    committed is printed before the signal goes on."""
    try:
        res = await client.full_inference_pipeline(
            prompt, args.max_tokens, use_draft_verify=not args.no_draft_verify,
            use_confidence_check=not args.no_confidence_check, use_kv_cache=not args.no_kv_cache,
            mode=args.pipeline, temperature=args.temperature)
    except (KeyboardInterrupt, asyncio.CancelledError):
        if client.last_result is not None:
            print_result(client.last_result, args.json)
        raise
    print_result(res, args.json)
    return res


@contextmanager
def event_loop():
    loop = asyncio.new_event_loop()
    try:
        yield loop
    finally:
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()


def run_to_end(loop, coro):
    """Run `coro` on `loop`. A stop signal raised in the loop rather than in `coro` cancels `coro` (which prints or
    saves what it finished) before the signal goes on."""
    task = loop.create_task(coro)
    try:
        return loop.run_until_complete(task)
    except KeyboardInterrupt:
        task.cancel()
        loop.run_until_complete(asyncio.wait([task]))
        if not task.cancelled():
            task.exception()  # retrieved: the signal itself is what goes on
        raise


async def client_mode(cfg, args) -> int:
    from lib.edgecloud.client import EdgeCloudHTTPClient
    if not args.prompt:
        raise UsageError("--mode client needs --prompt TEXT")
    async with EdgeCloudHTTPClient(cfg) as client:
        res = await infer(client, args.prompt, args)
    return 1 if res.error and not res.edge_fallback else 0


async def interactive_command(client, line: str, args):
    if line == "stats":
        for side, stats in (await client.server_stats()).items():
            print(side, stats.get("error") or json.dumps(stats, indent=2))
    else:
        await infer(client, line, args)


def interactive_mode(cfg, args) -> int:
    """Prompts read in the main thread, so a stop signal at the prompt ends the session; during a request, Ctrl-C
    cancels that request only."""
    from lib.edgecloud.client import EdgeCloudHTTPClient
    print("edge/cloud interactive: type a prompt, or `stats`, `config`, `quit`")
    client = EdgeCloudHTTPClient(cfg)
    with event_loop() as loop:
        loop.run_until_complete(client.__aenter__())
        try:
            while True:
                try:
                    line = input("> ").strip()
                except EOFError:
                    return 0
                if line in ("quit", "exit"):
                    return 0
                if line == "config":
                    print(json.dumps({k: cfg[k] for k in ("edge", "cloud", "communication", "inference")}, indent=2))
                elif line:
                    try:
                        with StopSignals():  # one of its own per request: the session's handlers are back after
                            run_to_end(loop, interactive_command(client, line, args))
                    except Interrupted as exc:
                        if exc.signum != signal.SIGINT:
                            raise
                        print("request cancelled (SIGINT)", file=sys.stderr)
        finally:
            loop.run_until_complete(client.__aexit__(None, None, None))


def read_prompts(path: str, n: int) -> list[str]:
    from lib.files import read_prompt_file
    prompts = read_prompt_file(path, f"--prompts {path}")
    return (prompts * (n // len(prompts) + 1))[:n]


async def ablation_mode(cfg, args) -> int:
    from rich.console import Console

    from lib.edgecloud.ablation import experiments, run_ablations, table
    from lib.edgecloud.client import EdgeCloudHTTPClient
    from lib.edgecloud.settings import apply_overrides, tokenizer_dir
    from lib.models import load_tokenizer
    exp_cfg = cfg["experiments"]
    exps = experiments(cfg)
    for exp in exps:  # bad overrides fail before any work
        apply_overrides(cfg, exp["config_overrides"], f"experiment {exp['name']}")
    only = args.experiments.split(",") if args.experiments else None
    known = {e["name"] for e in exps}
    if only and set(only) - known:
        raise UsageError(f"--experiments: unknown {', '.join(sorted(set(only) - known))} (known: {', '.join(known)})")
    prompts = read_prompts(args.prompts or exp_cfg["prompts_file"], args.num_prompts or exp_cfg["num_prompts"])
    if args.max_tokens:
        cfg = apply_overrides(cfg, {"inference": {"max_tokens": args.max_tokens}}, "command line")
    out = args.output_dir or exp_cfg["output_dir"]
    out_dir = output_dir(out, f"--output-dir={out}" if args.output_dir else f"experiments.output_dir={out}")
    threads = []
    if not args.external_servers:
        from lib.edgecloud.launch import start_in_threads
        threads = start_in_threads(cfg)
    tokenizer = load_tokenizer(tokenizer_dir(cfg))

    async def stats():
        async with EdgeCloudHTTPClient(cfg, tokenizer) as c:
            return await c.server_stats()
    try:
        report = await run_ablations(cfg, prompts, tokenizer, out_dir, only, stats)
    except (KeyboardInterrupt, asyncio.CancelledError):
        print(f"report (stopped early): {out_dir / 'ablation_report.json'}")
        raise
    finally:
        for t in threads:
            t.stop()
    Console(width=120).print(table(report))
    print(f"report: {out_dir / 'ablation_report.json'}, plot: {out_dir / 'ablation_report.png'}")
    down = [s["error"] for s in report["server_stats"].values() if "error" in s]
    if down:
        print(f"error: {down[0]} (the report holds the experiments that ran)", file=sys.stderr)
    return 1 if down else 0


def server_mode(cfg) -> int:
    import time

    from lib.edgecloud.launch import start_in_threads
    threads = start_in_threads(cfg)
    for role in ("edge", "cloud"):
        s = cfg[role]["server"]
        print(f"{role} server on http://{s['host']}:{s['port']}", flush=True)
    try:
        while all(t.thread.is_alive() for t in threads):
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        for t in threads:
            t.stop()
    return 0


def run_mode(cfg, args) -> int:
    if args.mode == "server":
        return server_mode(cfg)
    if args.mode == "interactive":
        return interactive_mode(cfg, args)
    with event_loop() as loop:
        return run_to_end(loop, {"client": client_mode, "ablation": ablation_mode}[args.mode](cfg, args))


@exit_on_usage_error
def main(argv=None) -> int:
    setup_logging()
    args = parse_args(argv)
    with StopSignals():
        try:
            return run_mode(load(args), args)
        except Interrupted as exc:
            print(f"interrupted ({signal.Signals(exc.signum).name}): {KEPT_ON_STOP[args.mode]}", file=sys.stderr)
            return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
