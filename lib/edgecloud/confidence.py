"""How confident the edge draft is in a token, from its probability distribution.

Every strategy maps a distribution to [0, 1] (1 = certain). The edge stops drafting when a token's confidence
falls below the threshold, and (lossy, only when the feature is on) commits drafts above an accept threshold
without asking the cloud.
"""
from __future__ import annotations

import math
from enum import Enum

import numpy as np


class ConfidenceStrategy(str, Enum):
    MAX_PROB = "max_prob"  # probability of the most likely token
    ENTROPY = "entropy"  # 1 - H(p) / log(V): low entropy = confident
    TEMPERATURE = "temperature"  # max probability after sharpening/flattening by a calibration temperature
    TOP_K_AGG = "top_k_agg"  # probability mass of the k most likely tokens


def _entropy(probs: np.ndarray) -> float:
    p = probs[probs > 0]
    return float(-(p * np.log(p)).sum())


class ConfidenceCalculator:
    def __init__(self, strategy: ConfidenceStrategy | str = ConfidenceStrategy.MAX_PROB, top_k: int = 5,
                 calibration_temperature: float = 1.5):
        self.strategy = ConfidenceStrategy(strategy)
        self.top_k, self.calibration_temperature = top_k, calibration_temperature

    def score(self, probs: np.ndarray) -> float:
        probs = np.asarray(probs, dtype=np.float64)
        if self.strategy is ConfidenceStrategy.MAX_PROB:
            return float(probs.max())
        if self.strategy is ConfidenceStrategy.ENTROPY:
            return float(1.0 - _entropy(probs) / math.log(len(probs)))
        if self.strategy is ConfidenceStrategy.TEMPERATURE:
            logp = np.log(np.clip(probs, 1e-30, None)) / self.calibration_temperature
            scaled = np.exp(logp - logp.max())
            return float(scaled.max() / scaled.sum())
        return float(np.sort(probs)[-self.top_k:].sum())


class ConfidenceEnsemble(ConfidenceCalculator):
    """Weighted mean of several strategies' scores (weights normalised to sum 1)."""

    def __init__(self, strategies, weights=None, **kwargs):
        self.members = [ConfidenceCalculator(s, **kwargs) for s in strategies]
        weights = list(weights) if weights is not None else [1.0] * len(self.members)
        if len(weights) != len(self.members) or min(weights) < 0 or sum(weights) <= 0:
            raise ValueError(f"ensemble weights {weights}: need one non-negative weight per strategy, sum > 0")
        self.weights = [w / sum(weights) for w in weights]
        self.strategy = "ensemble"

    def ensemble_confidence(self, probs: np.ndarray) -> tuple[float, list[float]]:
        individual = [m.score(probs) for m in self.members]
        return float(sum(w * s for w, s in zip(self.weights, individual))), individual

    def score(self, probs: np.ndarray) -> float:
        return self.ensemble_confidence(probs)[0]


class AblatedConfidenceCalculator(ConfidenceCalculator):
    """Confidence switched off: every token counts as certain, so drafting runs to its length limit."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.strategy = "ablated"

    def score(self, probs: np.ndarray) -> float:
        return 1.0


def make_calculator(strategy: str, weights=None, **kwargs) -> ConfidenceCalculator:
    """From config words: max_prob | entropy | temperature | top_k_agg | ensemble (all four, `weights`)."""
    if strategy == "ensemble":
        return ConfidenceEnsemble(list(ConfidenceStrategy), weights, **kwargs)
    return ConfidenceCalculator(strategy, **kwargs)
