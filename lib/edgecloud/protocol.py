"""The HTTP messages between client, edge and cloud (pydantic models with size limits)."""
from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StrictInt

from lib.errors import UsageError

MAX_CONTEXT = 8192  # token ids per request
MAX_DRAFT = 64
MAX_TOKENS = 4096  # per /v1/generate request
MAX_TEMPERATURE = 10
MAX_SEED = 2**32 - 1
TokenId = Annotated[StrictInt, Field(ge=0)]  # strict: true and "5" are not ids
TokenIds = Annotated[list[TokenId], Field(max_length=MAX_CONTEXT)]
Probability = Annotated[float, Field(ge=0.0, le=1.0)]
Seed = Annotated[int, Field(ge=0, le=MAX_SEED)]


def check_vocab(ids, vocab: int, what: str, side: str = "target"):
    """Token ids past the model's vocabulary are a UsageError (HTTP 422) naming the field and the first bad id."""
    bad = next((t for t in ids if t >= vocab), None)
    if bad is not None:
        raise UsageError(f"{what}: token id {bad} is outside the {side} vocabulary (0..{vocab - 1})")


def check_length(tokens: int, limit: int | None, what: str, side: str):
    """A request that would not fit the model's context is a UsageError (HTTP 422), not the engine's crash."""
    if limit is not None and tokens > limit:
        raise UsageError(f"{what}: {tokens} tokens is more than the {side} context of {limit} tokens")


class _Strict(BaseModel):
    """Requests take JSON's types as sent: no true for 1, no "5" for 5, no NaN or Infinity, no unknown fields."""
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class DraftRequest(_Strict):
    context_ids: Annotated[TokenIds, Field(min_length=1)]
    max_draft: int = Field(4, ge=0, le=MAX_DRAFT)
    temperature: float = Field(0.0, ge=0.0, le=MAX_TEMPERATURE)
    confidence_threshold: float | None = Field(None, ge=0.0, le=1.0)  # None: no early stop
    use_cache: bool = True
    return_dists: bool = False  # full draft distributions, needed by the cloud's rejection sampling at T > 0
    seed: Seed | None = None


class DraftResponse(BaseModel):
    draft_ids: list[int]
    draft_probs: list[float]  # draft probability of each drafted token (at the request's temperature)
    confidences: list[float]  # the edge's confidence score of each drafted token
    draft_dists: list[list[float]] | None = None
    stopped_low_confidence: bool = False
    reused_tokens: int = 0
    compute_ms: float = 0.0


class GenerateRequest(_Strict):
    context_ids: Annotated[TokenIds, Field(min_length=1)]
    max_tokens: int = Field(64, ge=1, le=MAX_TOKENS)
    temperature: float = Field(0.0, ge=0.0, le=MAX_TEMPERATURE)
    seed: Seed | None = None


class GenerateResponse(BaseModel):
    token_ids: list[int]
    confidences: list[float] = []
    compute_ms: float = 0.0


class VerifyRequest(_Strict):
    context_ids: Annotated[TokenIds, Field(min_length=1)]  # committed tokens (prompt + output so far)
    draft_ids: Annotated[list[TokenId], Field(max_length=MAX_DRAFT)] = []
    draft_probs: Annotated[list[Probability], Field(max_length=MAX_DRAFT)] = []
    draft_dists: list[list[Probability]] | None = Field(None, max_length=MAX_DRAFT)
    temperature: float = Field(0.0, ge=0.0, le=MAX_TEMPERATURE)
    use_cache: bool = True


class VerifyResponse(BaseModel):
    accepted: int  # drafts accepted (a prefix of draft_ids)
    next_token: int  # the cloud's token after the accepted drafts (correction or bonus)
    reused_tokens: int = 0  # context tokens taken from the prefix cache
    fed_tokens: int = 0  # tokens the target actually computed
    compute_ms: float = 0.0
