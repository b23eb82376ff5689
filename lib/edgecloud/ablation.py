"""Ablations: the same prompts under each experiment, one report (ablation_report.json), a table and a plot.

Built in: baseline (every feature on), no_confidence, no_draft_verify, no_kv_cache, edge_only, cloud_only; then
the experiments of the config (experiments.ablations, each with config_overrides). cloud_only's greedy output is
the reference every experiment is compared with ("matches_cloud_only").
"""
from __future__ import annotations

import statistics
import time
from pathlib import Path

from lib.edgecloud.client import EdgeCloudHTTPClient
from lib.edgecloud.settings import apply_overrides
from lib.files import output_dir, write_json

SCHEMA = "speclab.edge_cloud_ablation/1"
BUILT_IN = [
    ("cloud_only", "the cloud target decodes alone (reference output)", {}, "cloud_only"),
    ("baseline", "every feature on: confidence, draft/verify, KV caches", {}, "collaborative"),
    ("no_confidence", "drafts always run to max_draft_tokens",
     {"inference": {"features": {"use_confidence_check": False}}}, "collaborative"),
    ("no_draft_verify", "confident drafts are final; the cloud only decides low-confidence positions (lossy)",
     {"inference": {"features": {"use_draft_verify": False}}}, "collaborative"),
    ("no_kv_cache", "edge and cloud recompute the whole context every round",
     {"inference": {"features": {"use_kv_cache": False}}}, "collaborative"),
    ("edge_only", "the edge draft decodes alone (no cloud)", {}, "edge_only"),
]


def experiments(cfg: dict) -> list[dict]:
    out = [{"name": n, "description": d, "config_overrides": o, "mode": m} for n, d, o, m in BUILT_IN]
    for exp in cfg["experiments"]["ablations"] or []:
        out.append({"name": exp["name"], "description": exp.get("description", ""),
                    "config_overrides": exp.get("config_overrides") or {}, "mode": exp.get("mode", "collaborative")})
    return out


def _mean(values):
    return round(statistics.fmean(values), 3) if values else 0.0


async def run_experiment(exp: dict, cfg: dict, prompts: list[str], tokenizer, runs: list, progress):
    """Every prompt under `exp`, each finished request appended to `runs` as it ends (kept if a later one fails)."""
    exp_cfg = apply_overrides(cfg, exp["config_overrides"], f"experiment {exp['name']}")
    max_tokens = exp_cfg["inference"]["max_tokens"]
    async with EdgeCloudHTTPClient(exp_cfg, tokenizer) as client:
        for prompt in prompts:
            runs.append(await client.full_inference_pipeline(prompt, max_tokens, mode=exp["mode"]))
            progress()


def summarize(exp: dict, prompts: list[str], runs: list, reference: dict) -> dict:
    """The report entry of an experiment whose requests for prompts[:len(runs)] finished."""
    prompts = prompts[: len(runs)]
    ok = [r for r in runs if r.error is None or r.edge_fallback]
    tokens = sum(len(r.token_ids) for r in ok)
    seconds = sum(r.total_latency_ms for r in ok) / 1000
    drafted, accepted = sum(r.draft_tokens for r in ok), sum(r.accepted_tokens for r in ok)
    matches = [r.token_ids == reference.get(p) for p, r in zip(prompts, runs)] if reference else []
    return {
        "name": exp["name"], "description": exp["description"], "mode": exp["mode"],
        "config_overrides": exp["config_overrides"],
        "requests": len(runs), "success_rate": round(len(ok) / len(runs), 4) if runs else 0.0,
        "output_tokens": tokens, "tokens_per_s": round(tokens / seconds, 2) if seconds else 0.0,
        "mean_latency_ms": _mean([r.total_latency_ms for r in ok]),
        "mean_edge_ms": _mean([r.edge_latency_ms for r in ok]),
        "mean_cloud_ms": _mean([r.cloud_latency_ms for r in ok]),
        "mean_network_ms": _mean([r.network_latency_ms for r in ok]),
        "acceptance_rate": round(accepted / drafted, 4) if drafted else None,
        "draft_tokens": drafted, "accepted_tokens": accepted,
        "cloud_calls": sum(r.cloud_calls for r in runs), "edge_calls": sum(r.edge_calls for r in runs),
        "rounds": sum(r.rounds for r in runs), "unverified_tokens": sum(r.unverified_tokens for r in runs),
        "bytes_sent": sum(r.bytes_sent for r in runs), "bytes_received": sum(r.bytes_received for r in runs),
        "mean_confidence": _mean([r.confidence_score for r in ok]),
        "matches_cloud_only": all(matches) if matches else None,
        "matching_requests": sum(matches),
        "errors": [r.error for r in runs if r.error],
        "requests_detail": [{"prompt": p, **r.to_json()} for p, r in zip(prompts, runs)],
    }


async def run_ablations(cfg: dict, prompts: list[str], tokenizer, out_dir: Path, only: list[str] | None = None,
                        stats_fn=None) -> dict:
    from rich.progress import Progress
    exps = experiments(cfg)
    if only:
        wanted = set(only) | {"cloud_only"}
        exps = [e for e in exps if e["name"] in wanted]
    out_dir = output_dir(out_dir, f"experiments.output_dir={out_dir}")
    report = {"schema": SCHEMA, "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "prompts": prompts,
              "max_tokens": cfg["inference"]["max_tokens"], "temperature": cfg["inference"]["temperature"],
              "experiments": []}
    reference: dict = {}
    with Progress() as bar:
        task = bar.add_task("ablations", total=len(exps) * len(prompts))
        for exp in exps:
            runs: list = []
            try:
                await run_experiment(exp, cfg, prompts, tokenizer, runs, lambda: bar.advance(task))
            except BaseException:  # a stop signal or a crash: the report keeps the requests that finished
                if runs:
                    report["experiments"].append({**summarize(exp, prompts, runs, reference), "stopped_early": True})
                report["stopped_early"] = True
                write_json(out_dir / "ablation_report.json", report)
                raise
            result = summarize(exp, prompts, runs, reference)
            if exp["name"] == "cloud_only":
                reference.update({d["prompt"]: d["token_ids"] for d in result["requests_detail"]})
                result["matches_cloud_only"] = True
            report["experiments"].append(result)
            write_json(out_dir / "ablation_report.json", report)  # finished experiments survive a crash or Ctrl-C
    if stats_fn is not None:
        report["server_stats"] = await stats_fn()
    write_json(out_dir / "ablation_report.json", report)
    plot(report, out_dir / "ablation_report.png")
    return report


def table(report: dict):
    from rich.table import Table
    title = f"edge/cloud ablations ({len(report['prompts'])} prompts, {report['max_tokens']} tokens max)"
    t = Table(min_width=110, title=title)
    for col in ("experiment", "tok/s", "latency ms", "accept", "cloud calls", "tokens", "bytes sent", "success",
                "= cloud_only"):
        t.add_column(col, justify="left" if col == "experiment" else "right")
    for e in report["experiments"]:
        acc = "-" if e["acceptance_rate"] is None else f"{e['acceptance_rate']:.2f}"
        t.add_row(e["name"], f"{e['tokens_per_s']:.1f}", f"{e['mean_latency_ms']:.0f}", acc, str(e["cloud_calls"]),
                  str(e["output_tokens"]), str(e["bytes_sent"]), f"{e['success_rate']:.0%}",
                  {True: "yes", False: "no", None: "-"}[e["matches_cloud_only"]])
    return t


def plot(report: dict, path: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = [e["name"] for e in report["experiments"]]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for ax, key, label in zip(axes, ("tokens_per_s", "mean_latency_ms", "cloud_calls"),
                              ("tokens/s", "mean latency (ms)", "cloud calls")):
        ax.bar(names, [e[key] for e in report["experiments"]],
               color=["tab:green" if e["matches_cloud_only"] else "tab:orange" for e in report["experiments"]])
        ax.set_title(label)
        ax.tick_params(axis="x", rotation=45)
    fig.suptitle("edge/cloud ablations (green: output equals cloud_only)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
