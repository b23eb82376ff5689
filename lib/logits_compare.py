"""Compare two captures step by step: tokens, distributions over the shared top-k, logits, ranks, acceptance.

Per emitted token n of each prompt (the two runs saw the same context up to and including the first divergent
step, so "aligned" statistics stop there):
- KL(A||B) and JS over the shared top-k ids, each side's log-probabilities renormalised over those ids;
- top-k overlap = |ids_A & ids_B| / min(K_A, K_B);
- max and mean |difference| over the shared ids, of logits where both captures have them, else of log-probs;
- rank of A's token in B's list and of B's token in A's (0 = top; -1 = beyond the captured top-k).
"""
from __future__ import annotations

import contextlib
import math
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from lib.capture import Capture
from lib.errors import UsageError
from lib.files import atomic_path, json_text, output_dir, output_file

RESULT_SCHEMA = "speclab.logits_comparison/1"
RESULTS_NAME = "detailed_logits_comparison_results.json"
DIVERGENCE_PLOT, ACCEPTANCE_PLOT = "logits_divergence_per_step.png", "acceptance_length_distribution.png"
PLOTS = (DIVERGENCE_PLOT, ACCEPTANCE_PLOT)


@dataclass
class StepStats:
    step: int
    token_a: int
    token_b: int
    same_token: bool
    kl: float
    js: float
    topk_overlap: float
    max_abs_diff: float
    mean_abs_diff: float
    rank_a_in_b: int
    rank_b_in_a: int


@dataclass
class PromptComparison:
    prompt_index: int
    steps_a: int
    steps_b: int
    compared_steps: int
    token_agreement: float
    first_divergent_step: int | None
    steps: list[StepStats] = field(default_factory=list)


def _renormalised(logprobs: np.ndarray) -> np.ndarray:
    shifted = logprobs - logprobs.max()
    return shifted - np.log(np.exp(shifted).sum())


def _kl(lp: np.ndarray, lq: np.ndarray) -> float:
    return max(0.0, float(np.sum(np.exp(lp) * (lp - lq))))  # >= 0; clamp float noise


def _js(lp: np.ndarray, lq: np.ndarray) -> float:
    m = np.log(0.5 * (np.exp(lp) + np.exp(lq)))
    return 0.5 * _kl(lp, m) + 0.5 * _kl(lq, m)


def _rank(token: int, ids: np.ndarray, full_logits: np.ndarray | None) -> int:
    if full_logits is not None:
        return int((full_logits > full_logits[token]).sum())
    where = np.nonzero(ids == token)[0]
    return int(where[0]) if len(where) else -1


def compare_step(i: int, a, b) -> StepStats:
    ids_a, ids_b = a.topk_ids[i], b.topk_ids[i]
    shared, ia, ib = np.intersect1d(ids_a, ids_b, return_indices=True)
    use_logits = a.topk_logits is not None and b.topk_logits is not None
    va = (a.topk_logits if use_logits else a.topk_logprobs)[i][ia]
    vb = (b.topk_logits if use_logits else b.topk_logprobs)[i][ib]
    if len(shared):
        lp = _renormalised(a.topk_logprobs[i][ia].astype(np.float64))
        lq = _renormalised(b.topk_logprobs[i][ib].astype(np.float64))
        kl, js = _kl(lp, lq), _js(lp, lq)
        diff = np.abs(va.astype(np.float64) - vb)
        max_diff, mean_diff = float(diff.max()), float(diff.mean())
    else:
        kl = js = max_diff = mean_diff = math.nan
    ta, tb = a.token_ids[i], b.token_ids[i]
    full_a = a.full_logits[i] if a.full_logits is not None else None
    full_b = b.full_logits[i] if b.full_logits is not None else None
    return StepStats(i, ta, tb, ta == tb, kl, js, len(shared) / min(len(ids_a), len(ids_b)), max_diff, mean_diff,
                     _rank(ta, ids_b, full_b), _rank(tb, ids_a, full_a))


def compare_prompts(index: int, a, b) -> PromptComparison:
    if list(a.prompt_ids) and list(b.prompt_ids) and list(a.prompt_ids) != list(b.prompt_ids):
        raise UsageError(f"prompt {index}: the captures were made from different prompts (or tokenizers); "
                         "compare captures of the same prompt file and model")
    n = min(len(a.token_ids), len(b.token_ids))
    steps = [compare_step(i, a, b) for i in range(n)]
    first = next((s.step for s in steps if not s.same_token), None)
    agreement = sum(s.same_token for s in steps) / n if n else math.nan
    return PromptComparison(index, len(a.token_ids), len(b.token_ids), n, agreement, first, steps)


def acceptance_distribution(capture: Capture) -> dict:
    """Tokens per verification round (bonus included): from per-round lengths, else from per-position counters."""
    lengths = [length for p in capture.prompts for length in p.accept_lengths]
    if lengths:
        counts = Counter(lengths)
        return {"source": "rounds", "rounds": len(lengths), "mean": float(np.mean(lengths)),
                "histogram": {str(k): counts[k] for k in sorted(counts)}}
    totals = capture.spec_totals()
    drafts, per_pos = totals["num_drafts"], totals["accepted_per_position"]
    if drafts and per_pos:
        at_least = [drafts] + per_pos + [0]  # rounds with >= j accepted drafts
        hist = {str(j + 1): at_least[j] - at_least[j + 1] for j in range(len(per_pos) + 1)}
        return {"source": "per_position_counters", "rounds": drafts,
                "mean": 1 + totals["accepted_tokens"] / drafts, "histogram": hist}
    if drafts:
        return {"source": "counters", "rounds": drafts, "mean": 1 + totals["accepted_tokens"] / drafts,
                "histogram": {}}
    return {"source": "none", "rounds": 0, "mean": math.nan, "histogram": {}}


def _mean(values) -> float:
    values = [v for v in values if not math.isnan(v)]
    return float(np.mean(values)) if values else math.nan


def _aggregate(steps: list[StepStats]) -> dict:
    return {"steps": len(steps),
            "token_agreement": _mean([float(s.same_token) for s in steps]),
            "mean_kl": _mean([s.kl for s in steps]), "max_kl": max((s.kl for s in steps), default=math.nan),
            "mean_js": _mean([s.js for s in steps]),
            "mean_topk_overlap": _mean([s.topk_overlap for s in steps]),
            "max_abs_diff": max((s.max_abs_diff for s in steps), default=math.nan),
            "mean_abs_diff": _mean([s.mean_abs_diff for s in steps]),
            "rank_a_in_b_top1_rate": _mean([float(s.rank_a_in_b == 0) for s in steps]),
            "rank_b_in_a_top1_rate": _mean([float(s.rank_b_in_a == 0) for s in steps])}


def full_vocab(capture: Capture) -> int | None:
    """The width of the capture's full logits (its vocabulary), None without them."""
    widths = {p.full_logits.shape[1] for p in capture.prompts if p.full_logits is not None}
    if len(widths) > 1:
        raise UsageError(f"capture {capture.source}: full logits of different widths {sorted(widths)} across prompts")
    return widths.pop() if widths else None


def compare_captures(a: Capture, b: Capture) -> dict:
    if len(a.prompts) != len(b.prompts):
        raise UsageError(f"captures {a.source} and {b.source} hold {len(a.prompts)} and {len(b.prompts)} prompts; "
                         "compare runs over the same prompt file")
    vocab_a, vocab_b = full_vocab(a), full_vocab(b)
    if vocab_a and vocab_b and vocab_a != vocab_b:
        raise UsageError(f"captures {a.source} and {b.source}: full logits over {vocab_a} and {vocab_b} tokens; the "
                         "captures come from models of different vocabularies (compare captures of one model)")
    prompts = [compare_prompts(i, pa, pb) for i, (pa, pb) in enumerate(zip(a.prompts, b.prompts))]
    every = [s for p in prompts for s in p.steps]
    aligned = [s for p in prompts for s in p.steps
               if p.first_divergent_step is None or s.step <= p.first_divergent_step]
    diff_kind = "logits" if all(x.topk_logits is not None for c in (a, b) for x in c.prompts) else "logprobs"
    return {
        "schema": RESULT_SCHEMA,
        "data1": {"file": a.source, "engine": a.engine, "config": a.config_name},
        "data2": {"file": b.source, "engine": b.engine, "config": b.config_name},
        "abs_diff_of": diff_kind,
        "summary": {
            "prompts": len(prompts), "all_tokens_equal": all(p.first_divergent_step is None
                                                            and p.steps_a == p.steps_b for p in prompts),
            "first_divergent_step": [p.first_divergent_step for p in prompts],
            "aligned": _aggregate(aligned), "all_steps": _aggregate(every),
        },
        "acceptance": {"data1": acceptance_distribution(a), "data2": acceptance_distribution(b)},
        "prompts": [asdict(p) for p in prompts],
    }


def _json_safe(value):
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def check_outputs(out_dir: str | Path, plots: bool) -> Path:
    """The output folder, and every file the comparison writes there can be written (checked before the work)."""
    out = output_dir(out_dir, f"--output-dir={out_dir}")
    for name in (RESULTS_NAME, *(PLOTS if plots else ())):
        output_file(out / name, str(out / name))
    return out


def write_outputs(results: dict, out_dir: str | Path, plots: bool = True) -> list[Path]:
    """The results JSON and (plots) the PNGs, written together: each into a temporary file first, all renamed into
    place only once every one is written, so a failure on the way (a full disk, an error drawing) leaves the
    previous comparison's files as they were instead of new results beside old plots. Without plots, an earlier
    comparison's plots in that folder are removed, so that they are not read as this one's. Returns the paths, JSON
    first.
    """
    out = output_dir(out_dir, f"--output-dir={out_dir}")
    figures = figures_of(results) if plots else {}
    with contextlib.ExitStack() as stack:
        for fig in figures.values():
            stack.callback(_close, fig)
        # each file is entered just before it is written, so a failing write names its own file
        stack.enter_context(atomic_path(out / RESULTS_NAME)).write_text(json_text(_json_safe(results)),
                                                                        encoding="utf-8")
        for name, fig in figures.items():
            fig.tight_layout()
            fig.savefig(stack.enter_context(atomic_path(out / name)), dpi=100)
    for name in set(PLOTS) - figures.keys():
        if (out / name).is_file():
            (out / name).unlink()
    return [out / RESULTS_NAME, *(out / name for name in figures)]


def _close(fig) -> None:
    import matplotlib.pyplot as plt
    plt.close(fig)


def figures_of(results: dict) -> dict:
    """The PNG plots by file name: per-step divergence and differences (prompt after prompt), acceptance length
    histograms."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    steps = [s for p in results["prompts"] for s in p["steps"]]
    label_a = f"{results['data1']['engine']}:{results['data1']['config']}"
    label_b = f"{results['data2']['engine']}:{results['data2']['config']}"

    fig, axes = plt.subplots(3, 1, figsize=(9, 8), sharex=True)
    x = range(len(steps))
    axes[0].plot(x, [s["kl"] for s in steps], label="KL(A||B)")
    axes[0].plot(x, [s["js"] for s in steps], label="JS")
    axes[0].set_ylabel("divergence (shared top-k)")
    axes[0].legend()
    axes[1].plot(x, [s["max_abs_diff"] for s in steps], label="max")
    axes[1].plot(x, [s["mean_abs_diff"] for s in steps], label="mean")
    axes[1].set_ylabel(f"|diff| of {results['abs_diff_of']}")
    axes[1].legend()
    axes[2].plot(x, [s["topk_overlap"] for s in steps], label="top-k overlap")
    axes[2].plot(x, [float(s["same_token"]) for s in steps], ".", label="same token")
    axes[2].set_ylabel("agreement")
    axes[2].set_xlabel("emitted token (all prompts in order)")
    axes[2].legend()
    fig.suptitle(f"A = {label_a}   B = {label_b}")
    figures = {DIVERGENCE_PLOT: fig}

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, label, shift in (("data1", label_a, -0.2), ("data2", label_b, 0.2)):
        hist = results["acceptance"][name]["histogram"]
        total = sum(hist.values()) or 1
        ax.bar([int(k) + shift for k in hist], [v / total for v in hist.values()], width=0.4, label=label)
    ax.set_xlabel("tokens per verification round (bonus included)")
    ax.set_ylabel("fraction of rounds")
    ax.legend()
    figures[ACCEPTANCE_PLOT] = fig
    return figures


def console_report(results: dict) -> str:
    s = results["summary"]
    aligned, acc = s["aligned"], results["acceptance"]

    def fmt(v, spec=".4g"):
        return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)

    lines = [
        f"A: {results['data1']['engine']} {results['data1']['config']} ({results['data1']['file']})",
        f"B: {results['data2']['engine']} {results['data2']['config']} ({results['data2']['file']})",
        f"prompts {s['prompts']}, steps compared {s['all_steps']['steps']}, token agreement "
        f"{fmt(s['all_steps']['token_agreement'], '.1%')}, all tokens equal: {s['all_tokens_equal']}",
        f"first divergent step per prompt: {['none' if d is None else d for d in s['first_divergent_step']]}",
        f"aligned steps {aligned['steps']}: mean KL {fmt(aligned['mean_kl'])}, max KL {fmt(aligned['max_kl'])}, "
        f"mean JS {fmt(aligned['mean_js'])}, top-k overlap {fmt(aligned['mean_topk_overlap'], '.1%')}",
        f"|diff| of {results['abs_diff_of']}: max {fmt(aligned['max_abs_diff'])}, mean {fmt(aligned['mean_abs_diff'])}",
        f"acceptance length A: mean {fmt(acc['data1']['mean'], '.3f')} over {acc['data1']['rounds']} rounds "
        f"{acc['data1']['histogram']}",
        f"acceptance length B: mean {fmt(acc['data2']['mean'], '.3f')} over {acc['data2']['rounds']} rounds "
        f"{acc['data2']['histogram']}",
    ]
    return "\n".join(lines)
