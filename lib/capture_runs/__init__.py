"""Capture runners: one comparison configuration run on one engine, every emitted token captured -> a Capture.

Every runner module (reference, vllm, sglang) has `run(cfg) -> Capture`. RUNNERS maps the engine name
(the one capture files carry, lib/capture.PREFIXES) to a runner; a runner imports its module on first call, so a
missing vllm or sglang only matters when that runner is asked for.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np

if TYPE_CHECKING:
    from lib.capture import Capture
    from lib.comparison_config import ComparisonConfig


class CaptureRunner(Protocol):
    def __call__(self, cfg: ComparisonConfig) -> Capture: ...


@dataclass(frozen=True)
class LazyRunner:
    """The `run` of lib.capture_runs.<name>, imported when first called."""
    name: str

    def __call__(self, cfg: ComparisonConfig) -> Capture:
        return importlib.import_module(f"{__name__}.{self.name}").run(cfg)


RUNNERS: dict[str, CaptureRunner] = {name: LazyRunner(name) for name in ("reference", "vllm", "sglang")}


def top_k_arrays(steps: list[list[tuple[int, float]]], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per emitted token, the engine's (token id, logprob) candidates -> [N, k] ids and logprobs, best first
    (-inf pads a token that came with fewer than k)."""
    ids = np.zeros((len(steps), k), dtype=np.int64)
    values = np.full((len(steps), k), -np.inf, dtype=np.float32)
    for row, candidates in enumerate(steps):
        for col, (token, logprob) in enumerate(sorted(candidates, key=lambda c: -c[1])[:k]):
            ids[row, col], values[row, col] = token, logprob
    return ids, values
