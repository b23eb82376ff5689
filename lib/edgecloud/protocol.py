"""The HTTP messages between client, edge and cloud (pydantic models with size limits)."""
from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

from lib.errors import UsageError

MAX_CONTEXT = 8192  # token ids per request
MAX_DRAFT = 64
TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(max_length=MAX_CONTEXT)]


def check_vocab(ids, vocab: int, what: str, side: str = "target"):
    """Token ids past the model's vocabulary are a UsageError (HTTP 422) naming the field and the first bad id."""
    bad = next((t for t in ids if t >= vocab), None)
    if bad is not None:
        raise UsageError(f"{what}: token id {bad} is outside the {side} vocabulary (0..{vocab - 1})")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DraftRequest(_Strict):
    context_ids: Annotated[TokenIds, Field(min_length=1)]
    max_draft: int = Field(4, ge=0, le=MAX_DRAFT)
    temperature: float = Field(0.0, ge=0.0, le=10.0)
    confidence_threshold: float | None = Field(None, ge=0.0, le=1.0)  # None: no early stop
    use_cache: bool = True
    return_dists: bool = False  # full draft distributions, needed by the cloud's rejection sampling at T > 0
    seed: int | None = None


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
    max_tokens: int = Field(64, ge=1, le=4096)
    temperature: float = Field(0.0, ge=0.0, le=10.0)
    seed: int | None = None


class GenerateResponse(BaseModel):
    token_ids: list[int]
    confidences: list[float] = []
    compute_ms: float = 0.0


class VerifyRequest(_Strict):
    context_ids: Annotated[TokenIds, Field(min_length=1)]  # committed tokens (prompt + output so far)
    draft_ids: Annotated[list[Annotated[int, Field(ge=0)]], Field(max_length=MAX_DRAFT)] = []
    draft_probs: Annotated[list[float], Field(max_length=MAX_DRAFT)] = []
    draft_dists: list[list[float]] | None = Field(None, max_length=MAX_DRAFT)
    temperature: float = Field(0.0, ge=0.0, le=10.0)
    use_cache: bool = True


class VerifyResponse(BaseModel):
    accepted: int  # drafts accepted (a prefix of draft_ids)
    next_token: int  # the cloud's token after the accepted drafts (correction or bonus)
    reused_tokens: int = 0  # context tokens taken from the prefix cache
    fed_tokens: int = 0  # tokens the target actually computed
    compute_ms: float = 0.0
