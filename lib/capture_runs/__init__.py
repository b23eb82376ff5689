"""Capture runners: one comparison configuration run on one engine, every emitted token captured -> a Capture.

Every runner module (reference, vllm, sglang) has `run(cfg) -> Capture`. RUNNERS maps the engine name
(the one capture files carry, lib/capture.PREFIXES) to a runner; a runner imports its module on first call, so a
missing vllm or sglang only matters when that runner is asked for.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

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
