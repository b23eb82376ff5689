"""The SD cost model: why speculative decoding paid off or not (docs/design.md, "The SD cost model").

Pure formulas at the bottom of the import graph (this module imports nothing of the project). One SD round drafts
k tokens (k draft steps) and verifies them in one target step of k + 1 tokens; in target 1-token steps it costs

    k c + v      c = draft step time / target 1-token step time (the draft's cost ratio, at the run's batch size)
                 v = target (k+1)-token step time / target 1-token step time (the verify cost; 1.0 when unknown)

and emits 1 + (accepted drafts) tokens. AR emits one token per target 1-token step, so the predicted speedup over
AR is tokens per round / (k c + v). Everything else here follows from that line.
"""
from __future__ import annotations

EXTRAPOLATE_TO = 2  # best k: k' is tried up to this many times the measured k (at least MIN_K_TRIED)
MIN_K_TRIED = 8
VERIFY_UNKNOWN = 1.0  # v when the engine cannot time its verify step (Leviathan's assumption)


def tokens_per_round(per_position_rates: list[float]) -> float:
    """Expected tokens per round from the measured per-position acceptance: 1 + sum_i rate[i], where rate[i] =
    accepted_per_position[i] / num_drafts is the share of rounds whose draft i was accepted (the bonus token is the
    1). It equals the measured acceptance length."""
    return 1.0 + sum(per_position_rates)


def tokens_per_round_alpha(alpha: float, k: int) -> float:
    """Leviathan's expected tokens per round when every draft is accepted with the same probability alpha,
    independently: (1 - alpha^(k+1)) / (1 - alpha); k + 1 at alpha = 1."""
    if alpha >= 1.0:
        return float(k + 1)
    return (1.0 - alpha ** (k + 1)) / (1.0 - alpha)


def alpha_for(length: float, k: int) -> float:
    """The alpha whose Leviathan tokens per round is `length` (solves (1 - a^(k+1)) / (1 - a) = length for a in
    [0, 1] by bisection; the left side grows with a). Lengths outside [1, k + 1] give 0 or 1."""
    if length >= k + 1:
        return 1.0
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if tokens_per_round_alpha(mid, k) < length else (lo, mid)
    return lo


def round_cost(k: int, c: float, v: float | None = None) -> float:
    """One round's cost in target 1-token steps: k c + v (v None: unknown, VERIFY_UNKNOWN)."""
    return k * c + (VERIFY_UNKNOWN if v is None else v)


def predicted_speedup(tokens: float, k: int, c: float, v: float | None = None) -> float:
    """Speedup over AR: tokens per round / (k c + v)."""
    return tokens / round_cost(k, c, v)


def break_even_acceptance(k: int, c: float, v: float | None = None) -> float | None:
    """The alpha at which SD only matches AR: (1 - a^(k+1)) / (1 - a) = k c + v for a in [0, 1). 0.0 when a round
    costs at most one target step (SD pays off at any acceptance); None when even a = 1 (k + 1 tokens a round) does
    not beat the round's cost: SD cannot pay off at this c, k and v."""
    cost = round_cost(k, c, v)
    if cost <= 1.0:
        return 0.0
    if cost >= k + 1:
        return None
    return alpha_for(cost, k)


def extrapolated_rates(per_position_rates: list[float], k_max: int) -> list[float]:
    """Per-position acceptance for positions 1..k_max: the measured ones, then each further position keeps the
    conditional acceptance of the last measured position, r = rate[k-1] / rate[k-2] (rate[0] for k = 1; capped
    at 1): rate[j] = rate[j-1] r."""
    rates = list(per_position_rates)
    if not rates:
        return []
    last = rates[-1]
    before = rates[-2] if len(rates) > 1 else 1.0
    r = min(1.0, last / before) if before > 0 else 0.0
    while len(rates) < k_max:
        rates.append(rates[-1] * r)
    return rates[:k_max]


def verify_cost_at(k_new: int, k: int, v: float | None) -> float | None:
    """v at another k: linear in the tokens verified between the 1-token step (1.0) and the measured (k+1)-token
    step, 1 + (v - 1) k_new / k; None stays unknown."""
    return None if v is None else 1.0 + (v - 1.0) * k_new / k


def best_k(per_position_rates: list[float], c: float, v: float | None = None) -> dict:
    """The k' with the highest predicted speedup, trying k' = 1 .. max(EXTRAPOLATE_TO k, MIN_K_TRIED): tokens per
    round from the measured per-position acceptance up to the measured k, extrapolated past it
    (extrapolated_rates), the verify cost at k' from verify_cost_at. Returns {"k", "speedup", "extrapolated": k' >
    measured k, "by_k": {k': speedup}}."""
    k = len(per_position_rates)
    k_max = max(EXTRAPOLATE_TO * k, MIN_K_TRIED)
    rates = extrapolated_rates(per_position_rates, k_max)
    by_k = {kk: predicted_speedup(tokens_per_round(rates[:kk]), kk, c, verify_cost_at(kk, k, v))
            for kk in range(1, k_max + 1)}
    best = max(by_k, key=lambda kk: (by_k[kk], -kk))  # ties: the smaller k
    return {"k": best, "speedup": by_k[best], "extrapolated": best > k, "by_k": by_k}


def predicted_energy_per_token(ar_j_per_token: float, tokens: float, k: int, c: float,
                               v: float | None = None) -> float:
    """J/token under SD if draft and target steps draw the same power: a round costs k c + v target steps of
    energy and emits `tokens` tokens, so AR J/token x (k c + v) / tokens per round."""
    return ar_j_per_token * round_cost(k, c, v) / tokens


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def analyse(per_position_rates: list[float], c: float | None, c_source: str, v: float | None, v_source: str,
            measured_speedup: float | None, ar_j_per_token: float | None = None,
            sd_j_per_token: float | None = None) -> dict:
    """The cost model of one SD mode, as its results carry it ("sd_model"). c None: unknown (c_source says why);
    the predictions that need c are then None."""
    k = len(per_position_rates)
    tokens = tokens_per_round(per_position_rates)
    out = {"k": k, "tokens_per_round": tokens, "alpha": alpha_for(tokens, k),
           "cost_ratio": c, "cost_ratio_source": c_source,
           "verify_cost": v, "verify_cost_source": v_source, "verify_cost_used": VERIFY_UNKNOWN if v is None else v,
           "round_cost": None, "predicted_speedup": None, "measured_speedup": measured_speedup,
           "measured_over_predicted": None, "break_even_acceptance": None, "break_even": None, "best_k": None,
           "predicted_energy_per_token_j": None, "measured_energy_per_token_j": sd_j_per_token,
           "energy_assumption": "draft and target steps draw the same power"}
    if c is None or k == 0:
        return out
    predicted = predicted_speedup(tokens, k, c, v)
    even = break_even_acceptance(k, c, v)
    out.update(round_cost=round_cost(k, c, v), predicted_speedup=predicted,
               measured_over_predicted=_ratio(measured_speedup, predicted), break_even_acceptance=even,
               break_even=f"{even:.2f}" if even is not None else "none: SD cannot pay off at this c",
               best_k=best_k(per_position_rates, c, v))
    if ar_j_per_token is not None:
        out["predicted_energy_per_token_j"] = predicted_energy_per_token(ar_j_per_token, tokens, k, c, v)
    return out


def summary_line(mode: str, model: dict) -> str:
    """One console line, e.g. `hf:speculative: c 0.12 (timed ...), verify 1.10 (timed ...), predicted 2.10
    tokens/round -> x1.62, measured x1.50 (0.93 of predicted); break-even acceptance 0.22 at k=4; best k 3
    (x1.70)`."""
    def num(value, digits=2):
        return "-" if value is None else f"{value:.{digits}f}"

    c, v = model["cost_ratio"], model["verify_cost"]
    parts = [f"c {num(c, 3)} ({model['cost_ratio_source']})" if c is not None
             else f"c unknown ({model['cost_ratio_source']})",
             f"verify {num(v)} ({model['verify_cost_source']})" if v is not None
             else f"verify unknown, {VERIFY_UNKNOWN:g} used ({model['verify_cost_source']})"]
    head = f"predicted {num(model['tokens_per_round'])} tokens/round"
    if model["predicted_speedup"] is not None:
        head += f" -> x{num(model['predicted_speedup'])}"
    head += f", measured x{num(model['measured_speedup'])}"
    if model["measured_over_predicted"] is not None:
        head += f" ({num(model['measured_over_predicted'])} of predicted)"
    parts.append(head)
    line = f"{mode}: " + ", ".join(parts)
    if model["break_even"] is not None:
        even = model["break_even"]
        line += f"; break-even acceptance {even}" + (f" at k={model['k']}" if model["break_even_acceptance"]
                                                       is not None else "")
        best = model["best_k"]
        line += f"; best k {best['k']} (x{num(best['speedup'])}{', extrapolated' if best['extrapolated'] else ''})"
    if model["predicted_energy_per_token_j"] is not None:
        line += (f"; J/token predicted {num(model['predicted_energy_per_token_j'], 4)}, measured "
                 f"{num(model['measured_energy_per_token_j'], 4)}")
    return line
