"""The HTTP messages between client, edge and cloud (pydantic models with size limits).

Requests are checked by the servers (a 422 naming the field); replies by the client, against the same response
models, with what only the request knows (the vocabulary, the drafts sent, max_draft) passed as validation context.
"""
from __future__ import annotations

import math
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictInt, ValidationInfo, model_validator

from lib.errors import UsageError

MAX_CONTEXT = 8192  # token ids per request
MAX_DRAFT = 64
MAX_TOKENS = 4096  # per /v1/generate request
MAX_TEMPERATURE = 10
MIN_TEMPERATURE = 1e-3  # below it logits / temperature overflow to inf (a NaN distribution)
MAX_SEED = 2**32 - 1
DIST_SUM_TOLERANCE = 1e-3  # a shipped draft distribution sums to 1 within this (float32 rounding)
TokenId = Annotated[StrictInt, Field(ge=0)]  # strict: true and "5" are not ids
TokenIds = Annotated[list[TokenId], Field(max_length=MAX_CONTEXT)]
Probability = Annotated[float, Field(ge=0.0, le=1.0)]
Seed = Annotated[int, Field(ge=0, le=MAX_SEED)]


def _usable_temperature(temperature: float) -> float:
    if 0 < temperature < MIN_TEMPERATURE:
        raise ValueError(f"{temperature:g} is neither 0 (greedy) nor at least {MIN_TEMPERATURE:g}")
    return temperature


Temperature = Annotated[float, Field(ge=0.0, le=MAX_TEMPERATURE), AfterValidator(_usable_temperature)]


def check_vocab(ids, vocab: int, what: str, side: str = "target"):
    """Token ids past the model's vocabulary are a UsageError (HTTP 422) naming the field and the first bad id."""
    bad = next((t for t in ids if t >= vocab), None)
    if bad is not None:
        raise UsageError(f"{what}: token id {bad} is outside the {side} vocabulary (0..{vocab - 1})")


def check_length(tokens: int, limit: int | None, what: str, side: str):
    """A request that would not fit the model's context is a UsageError (HTTP 422), not the engine's crash."""
    if limit is not None and tokens > limit:
        raise UsageError(f"{what}: {tokens} tokens is more than the {side} context of {limit} tokens")


def check_dists(dists: list[list[float]] | None, vocab: int):
    """Every shipped draft distribution has one probability per target token (a UsageError, HTTP 422, if not)."""
    bad = next((i for i, row in enumerate(dists or []) if len(row) != vocab), None)
    if bad is not None:
        raise UsageError(f"draft_dists[{bad}]: {len(dists[bad])} probabilities, expected one per target token "
                         f"({vocab})")


def validation_problem(error: dict) -> str:
    """One of pydantic's errors (of a request or a reply) as `field.path: what is wrong`."""
    where = ".".join(str(p) for p in error.get("loc", ()) if p != "body")
    what = str(error["ctx"]["error"]) if error.get("type") == "value_error" else error.get("msg", "malformed")
    return f"{where}: {what}" if where else what


class _Strict(BaseModel):
    """Requests take JSON's types as sent: no true for 1, no "5" for 5, no NaN or Infinity, no unknown fields."""
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class DraftRequest(_Strict):
    context_ids: Annotated[TokenIds, Field(min_length=1)]
    max_draft: int = Field(4, ge=0, le=MAX_DRAFT)
    temperature: Temperature = 0.0
    confidence_threshold: float | None = Field(None, ge=0.0, le=1.0)  # None: no early stop
    use_cache: bool = True
    return_dists: bool = False  # full draft distributions, needed by the cloud's rejection sampling at T > 0
    seed: Seed | None = None


class GenerateRequest(_Strict):
    context_ids: Annotated[TokenIds, Field(min_length=1)]
    max_tokens: int = Field(64, ge=1, le=MAX_TOKENS)
    temperature: Temperature = 0.0
    seed: Seed | None = None


class VerifyRequest(_Strict):
    context_ids: Annotated[TokenIds, Field(min_length=1)]  # committed tokens (prompt + output so far)
    draft_ids: Annotated[list[TokenId], Field(max_length=MAX_DRAFT)] = []
    draft_probs: Annotated[list[Probability], Field(max_length=MAX_DRAFT)] = []  # none, or one per draft
    draft_dists: list[list[Probability]] | None = Field(None, max_length=MAX_DRAFT)  # None, or one per draft
    temperature: Temperature = 0.0
    use_cache: bool = True

    @model_validator(mode="after")
    def _one_per_draft(self):
        drafts = len(self.draft_ids)
        if len(self.draft_probs) not in (0, drafts):
            raise ValueError(f"draft_probs: {len(self.draft_probs)} values for {drafts} draft_ids (expected none "
                             "or one per draft)")
        if self.draft_dists is not None and len(self.draft_dists) != drafts:
            raise ValueError(f"draft_dists: {len(self.draft_dists)} distributions for {drafts} draft_ids "
                             "(expected one per draft)")
        for i, (token, row) in enumerate(zip(self.draft_ids, self.draft_dists or [])):
            if abs(math.fsum(row) - 1) > DIST_SUM_TOLERANCE:
                raise ValueError(f"draft_dists[{i}]: sums to {math.fsum(row):g}, not to 1")
            if token >= len(row) or row[token] <= 0:  # p/q for a draft its own q calls impossible is unbounded
                raise ValueError(f"draft_dists[{i}]: gives the draft token {token} no probability")
        return self


# ------------------------------------------------------------------------------------------------- replies

def _expected(info: ValidationInfo, key: str):
    """What the client's request implies about a reply (None on the server side, which passes no context)."""
    return (info.context or {}).get(key)


def _known_token(token: int, info: ValidationInfo) -> int:
    vocab = _expected(info, "vocab")
    if vocab is not None and token >= vocab:
        raise ValueError(f"token id {token} is outside the vocabulary (0..{vocab - 1})")
    return token


def _at_most_max_draft(ids: list[int], info: ValidationInfo) -> list[int]:
    limit = _expected(info, "max_draft")
    if limit is not None and len(ids) > limit:
        raise ValueError(f"{len(ids)} drafts for max_draft {limit}")
    return ids


def _at_most_drafted(accepted: int, info: ValidationInfo) -> int:
    drafted = _expected(info, "drafted")
    if drafted is not None and accepted > drafted:
        raise ValueError(f"{accepted} is more than the {drafted} drafts sent")
    return accepted


class _Reply(BaseModel):
    """Replies as the client reads them: JSON's types as sent, finite numbers; fields a newer server adds are
    ignored."""
    model_config = ConfigDict(strict=True, allow_inf_nan=False)


ReplyToken = Annotated[StrictInt, Field(ge=0), AfterValidator(_known_token)]
Count = Annotated[StrictInt, Field(ge=0)]
Milliseconds = Annotated[float, Field(ge=0.0)]


class DraftResponse(_Reply):
    draft_ids: Annotated[list[ReplyToken], AfterValidator(_at_most_max_draft)]
    draft_probs: list[Probability]  # draft probability of each drafted token (at the request's temperature)
    confidences: list[Probability]  # the edge's confidence score of each drafted token
    draft_dists: list[list[Probability]] | None = None
    stopped_low_confidence: bool = False
    reused_tokens: Count = 0
    compute_ms: Milliseconds = 0.0

    @model_validator(mode="after")
    def _one_per_draft(self):
        drafts = len(self.draft_ids)
        for name in ("draft_probs", "confidences", "draft_dists"):
            values = getattr(self, name)
            if values is not None and len(values) != drafts:
                raise ValueError(f"{name}: {len(values)} values for {drafts} draft_ids")
        return self


class GenerateResponse(_Reply):
    token_ids: list[ReplyToken]
    confidences: list[Probability] = []
    compute_ms: Milliseconds = 0.0


class VerifyResponse(_Reply):
    accepted: Annotated[Count, AfterValidator(_at_most_drafted)]  # drafts accepted (a prefix of draft_ids)
    next_token: ReplyToken  # the cloud's token after the accepted drafts (correction or bonus)
    reused_tokens: Count = 0  # context tokens taken from the prefix cache
    fed_tokens: Count = 0  # tokens the target actually computed
    compute_ms: Milliseconds = 0.0
