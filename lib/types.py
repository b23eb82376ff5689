"""The shared record types, at the bottom of the import graph: this module imports nothing of the project.

Request -> engine -> RequestRecord (with SpecCounters) -> metrics and result files; Generation is what one batch
decode of the PyTorch engine's methods returns.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field


@dataclass
class Request:
    request_id: int
    prompt: str
    prompt_ids: list[int]
    max_new_tokens: int
    arrival: float = 0.0  # seconds after the run's start
    reference_output_len: int | None = None  # from ShareGPT's answer, when known
    category: str | None = None  # the dataset's category (Spec-Bench, custom JSONL), when it has one


@dataclass
class SpecCounters:
    """Acceptance counters, one shape for every engine (docs/design.md, metric definitions)."""
    num_drafts: int = 0
    draft_tokens: int = 0
    accepted_tokens: int = 0
    accepted_per_position: list[int] = field(default_factory=list)

    def add(self, other: SpecCounters) -> SpecCounters:
        width = max(len(self.accepted_per_position), len(other.accepted_per_position))
        per_pos = [0] * width
        for counts in (self.accepted_per_position, other.accepted_per_position):
            for i, c in enumerate(counts):
                per_pos[i] += c
        return SpecCounters(self.num_drafts + other.num_drafts, self.draft_tokens + other.draft_tokens,
                            self.accepted_tokens + other.accepted_tokens, per_pos)


@dataclass
class RequestRecord:
    """One finished request. Times are seconds since the run's start (time.perf_counter() - run start)."""
    request_id: int
    prompt_tokens: int
    output_ids: list[int]
    text: str
    arrival: float  # when it was scheduled to arrive
    start: float  # when the engine began work on it (>= arrival)
    token_times: list[float]  # when each output token became available (first = TTFT point)
    finish_reason: str  # stop | length | error | cancelled
    error: str | None = None
    spec: SpecCounters | None = None
    # per output token, the target's top-1 minus top-2 log-probability where that token was chosen (equal to the
    # logit margin); None where the engine does not give it. The losslessness verdict reads it.
    top2_margin: list[float] | None = None
    # per output token, the target's largest logit there: the scale of the rounding bound that tells a tie from a
    # bug; None where the engine gives log-probabilities only
    top_logit: list[float] | None = None

    def to_json(self) -> dict:
        return asdict(self)


class Clock:
    """The run's time origin, shared by runner and engine."""

    def __init__(self):
        self.t0 = time.perf_counter()

    def now(self) -> float:
        return time.perf_counter() - self.t0

    def sleep_until(self, offset: float):
        delay = offset - self.now()
        if delay > 0:
            time.sleep(delay)


@dataclass
class StepTimes:
    """Seconds an SD loop spent in its draft steps and its target verify steps, and how many it ran: the inputs of
    the SD cost model's cost ratio c and verify cost v (lib/sd_model.py)."""
    draft_s: float = 0.0
    draft_steps: int = 0
    verify_s: float = 0.0
    verify_rounds: int = 0

    def add(self, other: StepTimes) -> StepTimes:
        return StepTimes(self.draft_s + other.draft_s, self.draft_steps + other.draft_steps,
                         self.verify_s + other.verify_s, self.verify_rounds + other.verify_rounds)


@dataclass
class Generation:
    """What a batch decode returns: tokens per row and, for SD, acceptance counters per row."""
    tokens: list[list[int]]
    token_times: list[list[float]]
    finish_reasons: list[str]
    num_drafts: list[int] = field(default_factory=list)
    draft_tokens: list[int] = field(default_factory=list)
    accepted_tokens: list[int] = field(default_factory=list)
    accepted_per_position: list[list[int]] = field(default_factory=list)
    # per row and output token, the target's top-2 logit margin and top logit where it was emitted (empty: not kept)
    top2_margins: list[list[float]] = field(default_factory=list)
    top_logits: list[list[float]] = field(default_factory=list)
    step_times: StepTimes | None = None  # SD loops: time in draft and verify steps

    @classmethod
    def for_speculation(cls, batch: int, gamma: int) -> Generation:
        """Zeroed acceptance counters for each row (the tokens are filled in at the end)."""
        return cls([], [], [], [0] * batch, [0] * batch, [0] * batch, [[0] * gamma for _ in range(batch)])

    def count_round(self, row: int, gamma: int, accepted: int):
        """One verify round of a row: gamma drafts, of which the first `accepted` were kept."""
        self.num_drafts[row] += 1
        self.draft_tokens[row] += gamma
        self.accepted_tokens[row] += accepted
        for pos in range(accepted):
            self.accepted_per_position[row][pos] += 1
