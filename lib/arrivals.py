"""Arrival schedules: SpecLab's (arrivals until AUTO_DURATION) and `vllm bench serve`'s own (NUM_PROMPTS arrivals).

Both draw gamma inter-arrival gaps of shape BURSTINESS and mean 1 / rate (shape 1 is a Poisson process; infinite
burstiness gives constant gaps), at a rate that is AUTO_RATE or follows a linear or exponential ramp-up.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from lib.config import counted, rate_mode


def _gap(draw_gamma: Callable[..., float], rate: float, burstiness: float) -> float:
    if math.isinf(rate):
        return 0.0
    if math.isinf(burstiness):
        return 1.0 / rate
    return float(draw_gamma(shape=burstiness, scale=1.0 / (rate * burstiness)))


def ramp_rate(strategy: str, start: float, end: float, progress: float) -> float:
    """The rate at progress in [0, 1] of a ramp-up (vLLM's formulas)."""
    if strategy == "linear":
        return start + (end - start) * progress
    return start * (end / start) ** progress


def speclab_arrivals(rate: float, duration: float, seed: int, burstiness: float = 1.0,
                     ramp: tuple[str, float, float] | None = None) -> list[float]:
    """Arrival offsets in [0, duration), drawn from numpy's default_rng(seed) until the duration is over. With a
    ramp (strategy, start, end), the rate at time t is the ramp's at t / duration. This is SpecLab's schedule,
    not vLLM's (ARRIVAL_SCHEDULE=vllm gives vLLM's: see vllm_arrivals)."""
    rng = np.random.default_rng(seed)
    times, t = [], 0.0
    while True:
        current = ramp_rate(ramp[0], ramp[1], ramp[2], t / duration) if ramp else rate
        t += _gap(rng.gamma, current, burstiness)
        if t >= duration:
            return times
        times.append(float(t))


def vllm_arrivals(num_requests: int, rate: float, seed: int, burstiness: float = 1.0,
                  ramp: tuple[str, float, float] | None = None) -> list[float]:
    """vLLM's `get_request` schedule (vllm/benchmarks/serve.py) for `vllm bench serve --seed SEED`: vLLM calls
    np.random.seed(SEED), then draws from numpy's global generator one gap per request at the request's rate (a
    ramp goes over the request index); without a ramp the cumulative times are rescaled so the last one is
    num_requests / rate. A rate of 0 means vLLM's inf: every request at 0."""
    rate = math.inf if rate <= 0 else rate
    draw = np.random.RandomState(seed)  # the legacy generator np.random.seed(seed) seeds
    delays = []
    for i in range(num_requests):
        current = ramp_rate(ramp[0], ramp[1], ramp[2], i / max(num_requests - 1, 1)) if ramp else rate
        delays.append(_gap(draw.gamma, current, burstiness))
    for i in range(1, len(delays)):
        delays[i] += delays[i - 1]
    if ramp is None and delays and delays[-1] != 0:
        factor = (num_requests / rate) / delays[-1]
        delays = [d * factor for d in delays]
    return delays


def arrivals(cfg) -> list[float]:
    """The run's arrival offsets (fixed-count mode: NUM_PROMPTS zeros)."""
    ramp = (cfg.ramp_up_strategy, cfg.ramp_up_start_rps, cfg.ramp_up_end_rps) \
        if cfg.ramp_up_strategy != "none" else None
    if not rate_mode(cfg):
        return [0.0] * cfg.num_prompts
    if counted(cfg):
        return vllm_arrivals(cfg.num_prompts, cfg.auto_rate, cfg.seed, cfg.burstiness, ramp)
    return speclab_arrivals(cfg.auto_rate, cfg.auto_duration, cfg.seed, cfg.burstiness, ramp)
