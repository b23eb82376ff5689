"""When two greedy choices differ only by rounding: the tie bound used wherever tokens of two numerically different
runs (another engine, another dtype, a (k+1)-token verify against a 1-token step) are compared."""
from __future__ import annotations

import math

# machine epsilon (2**-mantissa bits) per dtype name
EPSILON = {"float32": 2.0 ** -23, "float16": 2.0 ** -10, "bfloat16": 2.0 ** -7}
TIE_ULPS = 4  # two implementations of one model in a dtype drift by a few units in the last place of the logits


def ulp(magnitude: float, dtype: str) -> float:
    """The spacing of representable numbers of `dtype` at `magnitude`."""
    return EPSILON[dtype] * 2.0 ** math.floor(math.log2(max(abs(magnitude), 1e-30)))


def tie_bound(top_logit: float, dtype: str, ulps: int = TIE_ULPS) -> float:
    """Logits within this of the top logit are a tie in `dtype`: which one wins depends on rounding alone."""
    return ulps * ulp(max(abs(top_logit), 1.0), dtype)
