"""The SD cost model of each SD mode of a run: lib/sd_model.py's formulas over the modes' result dicts.

A mode gets an "sd_model" block when it counted drafts and its engine gave cost inputs (Engine.cost_inputs). c comes
from the engine's own step timing (hf), or from the run's <engine>:draft mode (the draft run as an AR target:
draft mean TPOT / target mean TPOT), or is unknown with the reason. The measured speedup is the TPOT ratio against
the AR mode of the same engine (the run's first AR mode when that engine has none): the model predicts time per
token, and TPOT leaves out TTFT's queueing and prefill.
"""
from __future__ import annotations

from lib import sd_model
from lib.metrics import compare

MEASURED_AS = "tpot_speedup: mean TPOT of the baseline / mean TPOT of this mode (lib/metrics.compare)"


def _tpot(result: dict | None) -> float | None:
    return (((result or {}).get("metrics") or {}).get("latency") or {}).get("mean_tpot_ms")


def _energy_per_token(result: dict | None) -> float | None:
    energy = (result or {}).get("energy") or {}
    return energy.get("energy_per_output_token_j") if energy.get("available") else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _complete(modes: dict, mode: str) -> dict | None:
    result = modes.get(mode)
    return result if result is not None and result.get("status") == "complete" else None


def baseline_of(mode: str, modes: dict) -> str | None:
    """The AR mode the SD mode is measured against: its engine's, else the run's first."""
    same = f"{mode.partition(':')[0]}:target"
    if _complete(modes, same):
        return same
    return next((m for m in modes if m.endswith(":target") and _complete(modes, m)), None)


def draft_cost(mode: str, draft_mode: str, modes: dict) -> tuple[float | None, str]:
    """(c, its source) from the draft-as-target mode: its mean TPOT over its engine's AR mode's."""
    target_mode = f"{mode.partition(':')[0]}:target"
    draft, target = _complete(modes, draft_mode), _complete(modes, target_mode)
    c = _ratio(_tpot(draft), _tpot(target))
    if c is None:
        return None, (f"unknown: this run has no complete {draft_mode} and {target_mode} modes (SD_DRAFT_COST=false, "
                      "or the drafter is not a model)")
    return c, "draft-as-target TPOT ratio"


def mode_model(mode: str, modes: dict) -> dict | None:
    """The mode's "sd_model" block, or None for a mode without drafts or cost inputs."""
    result = modes[mode]
    acceptance = (result.get("metrics") or {}).get("acceptance") or {}
    inputs = result.get("cost_inputs")
    if not acceptance.get("num_drafts") or not acceptance.get("per_position_acceptance_rate") or inputs is None:
        return None
    c, c_source = inputs["cost_ratio"], inputs["cost_ratio_source"]
    if c is None and inputs.get("draft_mode"):
        c, c_source = draft_cost(mode, inputs["draft_mode"], modes)
    baseline = baseline_of(mode, modes)
    base = modes[baseline] if baseline else None
    measured = compare(base, result)["tpot_speedup"] if base else None
    model = sd_model.analyse(acceptance["per_position_acceptance_rate"], c, c_source, inputs["verify_cost"],
                             inputs["verify_cost_source"], measured, _energy_per_token(base),
                             _energy_per_token(result))
    model.update(baseline=baseline, measured_speedup_is=MEASURED_AS)
    if inputs.get("timing"):
        model["timing"] = inputs["timing"]
    return model


def attach(modes: dict) -> None:
    """Put each SD mode's "sd_model" block into its result dict (the others are left as they are)."""
    for mode in modes:
        model = mode_model(mode, modes)
        if model is not None:
            modes[mode]["sd_model"] = model


def summary_lines(modes: dict) -> list[str]:
    return [sd_model.summary_line(mode, result["sd_model"]) for mode, result in modes.items()
            if result.get("sd_model")]
