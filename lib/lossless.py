"""The losslessness verdict: does each SD mode emit what the target-only AR mode of the same run emits (the same
engine's, else the run's first)?

It reads only RequestRecords, so every engine whose records carry output_ids gets it; the top-2 figures
(RequestRecord.top2_margin, .top_logit) tell a rounding tie from a bug where the engine gives them.

Greedy runs (TEMPERATURE=0), request by request:
- `exact`: every request finished on both sides has the same tokens;
- otherwise, per differing request, the first differing position and the target's top-1 minus top-2 margin there,
  from the AR run and from the SD run (both runs have the same context up to that position, so only rounding
  separates them). A difference is a `numerical tie` when every margin known there is within the bound, a
  `MISMATCH` when one is above it, and `unexplained` when the engine gave no margins (the tokens differ and
  nothing says why). The mode's verdict is the worst of its requests: MISMATCH > unexplained > numerical tie.
- The bound is lib/numerics.tie_bound: u units in the last place of the dtype at the magnitude of the target's top
  logit there, u the larger of TIE_ULPS and DRIFT_FACTOR x the drift measured in this run: the largest difference
  between the AR and the SD run's margin, in ulps, over the positions where they agree (the same context computed
  two ways, so what rounding alone does here; the tiny float32 pair drifts by up to 8 ulps between a 5-token
  verify and a 1-token step). Float32 at a top logit of 10 and 4 ulps: 4 x 2**-20 ~ 3.8e-6; bfloat16: 0.25. Where
  the engine gives log-probabilities only, the magnitude is taken as ASSUMED_LOGIT_SCALE, and the verdict says so.
Requests that did not finish on both sides are `not_compared` (a count).

Sampled runs (TEMPERATURE > 0) cannot be compared token by token; the check is distributional, the idea of the
chi-square test of the shipped sampler (tests/test_spec_chain.py): the two-sample chi-square statistic of the
emitted-token frequencies of SD against AR, sum over tokens of (SD count - AR count)**2 / (SD + AR count). Tokens
of one request depend on each other, so its p-value comes from swapping the AR and SD outputs of random requests
(a paired permutation test), not from the chi-square table. `consistent` when p >= ALPHA, `DIFFERENT` below,
`inconclusive` when the run has too few requests to ever reach ALPHA (n pairs give at best p = 2**-n). A small
run tells little: `consistent` means no large change of the token distribution, not that there is none.
"""
from __future__ import annotations

import numpy as np

from lib.engines import METHOD_BY_NAME
from lib.numerics import EPSILON, TIE_ULPS, tie_bound, ulp
from lib.types import RequestRecord

EXIT_CODE = 3  # LOSSLESS_CHECK=fail and a MISMATCH or DIFFERENT verdict (only when the run would exit 0)
FAILING = ("MISMATCH", "DIFFERENT")
SEVERITY = ("exact", "numerical tie", "unexplained", "MISMATCH")  # a mode's greedy verdict: its worst request
ASSUMED_LOGIT_SCALE = 32.0  # an LLM's top logits are mostly 10-30; the scale where an engine gives logprobs only
ASSUMED_DTYPE = "bfloat16"  # the coarsest dtype logits are served in: the bound where the engine's dtype is unknown
DTYPE_NAMES = {"float32": "float32", "float": "float32", "fp32": "float32", "float16": "float16",
               "half": "float16", "fp16": "float16", "bfloat16": "bfloat16", "bf16": "bfloat16"}
DRIFT_FACTOR = 2.0  # the bound's ulps: at least twice the margin drift measured where the two runs agree
ALPHA = 1e-3  # sampled runs: p below this is DIFFERENT
PERMUTATIONS = 4000
MIN_TOKEN_COUNT = 10  # a token is its own category of the chi-square when both runs emitted it this often together
MAX_CATEGORIES = 50
SHOWN_DIFFERENCES = 5  # console lines per mode


def finished(records: list[RequestRecord]) -> dict[int, RequestRecord]:
    return {r.request_id: r for r in records if r.finish_reason in ("stop", "length")}


def paired(ar: list[RequestRecord], sd: list[RequestRecord]) -> tuple[list[tuple], int]:
    """([(AR record, SD record)] of the requests finished on both sides, in request order; how many others)."""
    done_ar, done_sd = finished(ar), finished(sd)
    both = sorted(done_ar.keys() & done_sd.keys())
    seen = {r.request_id for r in ar} | {r.request_id for r in sd}
    return [(done_ar[i], done_sd[i]) for i in both], len(seen) - len(both)


def first_difference(a: list[int], b: list[int]) -> int | None:
    """The first position where the two outputs differ (the shorter one's length if it is a prefix), or None."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def logits_dtype(result: dict | None) -> str | None:
    """The dtype an engine computed its logits in, from its engine facts (None: it does not say)."""
    name = str(((result or {}).get("engine") or {}).get("dtype") or "").removeprefix("torch.")
    return DTYPE_NAMES.get(name)


def _at(values: list[float] | None, position: int) -> float | None:
    return values[position] if values is not None and position < len(values) else None


def agreed_length(a: list[int], b: list[int]) -> int:
    position = first_difference(a, b)
    return len(a) if position is None else position


def margin_drift(pairs: list[tuple], dtype: str | None) -> tuple[float | None, int]:
    """(the largest |AR margin - SD margin| in ulps of the top logit, over the positions where the two runs have
    the same context and both gave margins; how many positions that is)."""
    worst, count = None, 0
    for a, b in pairs:
        for i in range(agreed_length(a.output_ids, b.output_ids)):
            m_ar, m_sd = _at(a.top2_margin, i), _at(b.top2_margin, i)
            if m_ar is None or m_sd is None:
                continue
            top = _at(a.top_logit, i)
            spacing = ulp(max(abs(top) if top is not None else ASSUMED_LOGIT_SCALE, 1.0), dtype or ASSUMED_DTYPE)
            drift = abs(m_ar - m_sd) / spacing
            worst, count = drift if worst is None else max(worst, drift), count + 1
    return worst, count


def bound_ulps(drift_ulps: float | None) -> float:
    return max(float(TIE_ULPS), DRIFT_FACTOR * (drift_ulps or 0.0))


def classify(ar: RequestRecord, sd: RequestRecord, position: int, dtype: str | None, ulps: float) -> dict:
    """One differing request: its first difference, the margins there and what they say."""
    margins = {"ar": _at(ar.top2_margin, position), "sd": _at(sd.top2_margin, position)}
    tops = [t for t in (_at(ar.top_logit, position), _at(sd.top_logit, position)) if t is not None]
    scale = max(abs(t) for t in tops) if tops else ASSUMED_LOGIT_SCALE
    bound = tie_bound(scale, dtype or ASSUMED_DTYPE, ulps)
    known = [m for m in margins.values() if m is not None]
    kind = "unexplained" if not known else "numerical tie" if max(known) <= bound else "MISMATCH"
    return {"request_id": ar.request_id, "position": position, "ar_token": _at(ar.output_ids, position),
            "sd_token": _at(sd.output_ids, position), "ar_margin": margins["ar"], "sd_margin": margins["sd"],
            "top_logit": max(tops, key=abs) if tops else None, "bound": bound, "class": kind}


def bound_rule(dtype: str | None, scale_known: bool, drift: tuple[float | None, int]) -> dict:
    return {"dtype": dtype or f"unknown ({ASSUMED_DTYPE} assumed)", "ulps": bound_ulps(drift[0]),
            "floor_ulps": TIE_ULPS, "measured_drift_ulps": drift[0], "positions_measured": drift[1],
            "epsilon": EPSILON[dtype or ASSUMED_DTYPE],
            "scale": "the target's top logit at the difference" if scale_known else
                     f"{ASSUMED_LOGIT_SCALE:g} (assumed: the engine gives log-probabilities, not logits)",
            "rule": "tie when every known top-2 margin there is <= ulps x epsilon x 2**floor(log2(max(|scale|, 1))), "
                    f"ulps = max(floor_ulps, {DRIFT_FACTOR:g} x measured_drift_ulps)"}


def greedy_verdict(ar: list[RequestRecord], sd: list[RequestRecord], dtype: str | None) -> dict:
    pairs, not_compared = paired(ar, sd)
    drift = margin_drift(pairs, dtype)
    differences = []
    for a, b in pairs:
        position = first_difference(a.output_ids, b.output_ids)
        if position is not None:
            differences.append(classify(a, b, position, dtype, bound_ulps(drift[0])))
    verdict = max((d["class"] for d in differences), key=SEVERITY.index, default="exact")
    scale_known = all(d["top_logit"] is not None for d in differences)
    return {"check": "greedy", "verdict": verdict if pairs else "not compared", "compared": len(pairs),
            "equal": len(pairs) - len(differences), "not_compared": not_compared,
            "margins": "known" if any(r.top2_margin is not None for pair in pairs for r in pair) else "unknown",
            "bound": bound_rule(dtype, scale_known, drift), "differences": differences}


def token_categories(pairs: list[tuple]) -> list[int]:
    """The tokens counted on their own: those emitted at least MIN_TOKEN_COUNT times by both runs together."""
    counts: dict[int, int] = {}
    for pair in pairs:
        for record in pair:
            for token in record.output_ids:
                counts[token] = counts.get(token, 0) + 1
    common = sorted((c, t) for t, c in counts.items() if c >= MIN_TOKEN_COUNT)
    return [t for _, t in common[::-1][:MAX_CATEGORIES]]


def count_matrix(records: list[RequestRecord], categories: list[int]) -> np.ndarray:
    """[requests, categories + 1]: how often each request emitted each category's token (last column: the rest)."""
    column = {t: i for i, t in enumerate(categories)}
    out = np.zeros((len(records), len(categories) + 1))
    for row, record in enumerate(records):
        for token in record.output_ids:
            out[row, column.get(token, len(categories))] += 1
    return out


def chi_square(diff: np.ndarray, total: np.ndarray) -> np.ndarray:
    """Two-sample chi-square statistic of SD vs AR counts from their difference [..., K] and sum [K]."""
    keep = total > 0
    return (diff[..., keep] ** 2 / total[keep]).sum(-1)


def sampled_verdict(ar: list[RequestRecord], sd: list[RequestRecord], seed: int = 0) -> dict:
    pairs, not_compared = paired(ar, sd)
    categories = token_categories(pairs)
    counts_ar = count_matrix([a for a, _ in pairs], categories)
    counts_sd = count_matrix([b for _, b in pairs], categories)
    diff, total = counts_sd - counts_ar, (counts_sd + counts_ar).sum(0)
    observed = float(chi_square(diff.sum(0), total))
    signs = np.random.default_rng(seed).choice([-1.0, 1.0], size=(PERMUTATIONS, len(pairs)))
    null = chi_square(signs @ diff, total)
    p_value = float((1 + np.count_nonzero(null >= observed - 1e-9)) / (PERMUTATIONS + 1))
    best_possible = max(2.0 ** -len(pairs), 1 / (PERMUTATIONS + 1))
    verdict = ("not compared" if not pairs else "inconclusive" if best_possible >= ALPHA
               else "DIFFERENT" if p_value < ALPHA else "consistent")
    return {"check": "distribution", "verdict": verdict, "compared": len(pairs), "not_compared": not_compared,
            "test": "two-sample chi-square of emitted-token frequencies, p-value from swapping the AR and SD "
                    "outputs of random requests", "statistic": observed, "p_value": p_value, "alpha": ALPHA,
            "categories": len(categories) + 1, "tokens": {"ar": int(counts_ar.sum()), "sd": int(counts_sd.sum())},
            "note": f"{len(pairs)} request pairs: the smallest p-value they can give is {best_possible:.2g}; "
                    "'consistent' means no large change of the token distribution was seen, not that there is none"}


def baseline_of(mode: str, modes: dict) -> str | None:
    """The target-only mode of the same engine, else the run's first target-only mode (COMPARE_MODES may pair
    engines), or None."""
    own = f"{mode.partition(':')[0]}:target"
    return own if own in modes else next((m for m in modes if m.endswith(":target")), None)


def attach(modes: dict, records: dict[str, list[RequestRecord]], temperature: float, seed: int = 0) -> list[str]:
    """Put a "lossless" block into each SD mode's result; returns the modes whose verdict fails the run."""
    failing = []
    for mode, result in modes.items():
        method = METHOD_BY_NAME.get(mode.partition(":")[2])
        if mode.endswith(":target") or (method is not None and method.measurement):
            continue  # the baseline, or a measurement mode that runs another model (the draft) as its target
        base = baseline_of(mode, modes)
        if base is None or mode not in records or base not in records:
            result["lossless"] = {"verdict": "not compared", "reason": "no target-only mode ran"}
            continue
        block = (greedy_verdict(records[base], records[mode], logits_dtype(result)) if temperature <= 0
                 else sampled_verdict(records[base], records[mode], seed))
        result["lossless"] = {"baseline": base, **block}
        if block["verdict"] in FAILING:
            failing.append(mode)
    return failing


def failure_line(modes: dict, failing: list[str]) -> str:
    return "losslessness: " + "; ".join(f"{m} {modes[m]['lossless']['verdict']} against "
                                        f"{modes[m]['lossless']['baseline']}" for m in failing)


def _number(value) -> str:
    return "?" if value is None else f"{value:.3g}"


def difference_lines(mode: str, result: dict) -> list[str]:
    """Console lines: one per differing request (the first SHOWN_DIFFERENCES), or the distribution test."""
    block = result.get("lossless") or {}
    if block.get("check") == "distribution":
        return [f"{mode} lossless ({block['verdict']}): chi-square {block['statistic']:.3g}, p = "
                f"{block['p_value']:.3g} over {block['compared']} request pairs ({block['note']})"]
    diffs = block.get("differences") or []
    lines = [f"{mode} vs {block['baseline']}: request {d['request_id']} {d['class']} at token {d['position']} "
             f"(AR {d['ar_token']}, SD {d['sd_token']}; top-2 margin AR {_number(d['ar_margin'])}, SD "
             f"{_number(d['sd_margin'])}; tie bound {d['bound']:.3g})" for d in diffs[:SHOWN_DIFFERENCES]]
    if len(diffs) > SHOWN_DIFFERENCES:
        lines.append(f"{mode}: {len(diffs) - SHOWN_DIFFERENCES} more differing requests in benchmark_results.json")
    if block.get("not_compared"):
        lines.append(f"{mode} lossless: {block['not_compared']} requests not compared (not finished on both sides)")
    return lines
