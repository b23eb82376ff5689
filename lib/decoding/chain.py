"""Chain speculative decoding (Leviathan et al. 2023) and plain AR decoding over Hugging Face causal LMs.

Batches of any size: rows accept different numbers of drafts, so each row's KV cache gets holes where its
rejected drafts were written. `KVState` keeps a validity mask over cache columns and each row's next position;
rejected entries are masked out, and tail columns that no row needs are cropped, so batch 1 is a plain rollback.
Greedy decoding is the temperature-0 case of the same rejection rule (one-hot distributions), so there is one
code path, and greedy SD emits exactly the AR tokens.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from lib.decoding.timing import RoundClock, mark
from lib.types import Generation


@dataclass
class KVState:
    """One model's KV cache for a batch, with per-row validity of cache columns."""
    cache: object
    mask: torch.Tensor  # [B, L] bool: column holds a committed token for that row
    next_pos: torch.Tensor  # [B] position id of the next token fed

    @classmethod
    def empty(cls, batch: int, device) -> KVState:
        from transformers import DynamicCache
        return cls(DynamicCache(), torch.zeros(batch, 0, dtype=torch.bool, device=device),
                   torch.zeros(batch, dtype=torch.long, device=device))


def forward(model, state: KVState, tokens: torch.Tensor, valid: torch.Tensor | None = None):
    """Feed tokens [B, n] (valid [B, n]: False for padding) and return logits [B, n, V] as float32."""
    batch, n = tokens.shape
    valid = torch.ones_like(tokens, dtype=torch.bool) if valid is None else valid
    positions = state.next_pos[:, None] + valid.long().cumsum(1) - 1
    state.mask = torch.cat([state.mask, valid], dim=1)
    out = model(input_ids=tokens, attention_mask=state.mask.long(), position_ids=positions.clamp(min=0),
                past_key_values=state.cache, use_cache=True)
    state.cache = out.past_key_values
    state.next_pos = state.next_pos + valid.long().sum(1)
    return out.logits.float()


def commit(state: KVState, fed: int, keep: torch.Tensor):
    """Of the last `fed` columns, keep the first keep[b] for row b; crop columns no row needs."""
    arange = torch.arange(fed, device=keep.device)
    state.mask[:, -fed:] &= arange[None, :] < keep[:, None]
    state.next_pos = state.next_pos - fed + keep
    used = state.mask.any(0).nonzero()
    length = int(used[-1]) + 1 if len(used) else 0
    if length < state.mask.shape[1]:
        state.cache.crop(length - state.mask.shape[1])  # negative: remove that many (all versions)
        state.mask = state.mask[:, :length]


def probabilities(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Sampling distribution; one-hot argmax for greedy."""
    if temperature <= 0:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    return torch.softmax(logits / temperature, dim=-1)


def sample(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    flat = probs.reshape(-1, probs.shape[-1])
    return torch.multinomial(flat, 1, generator=generator).view(probs.shape[:-1])


def accept_drafts(target_logits: torch.Tensor, drafts: torch.Tensor, draft_probs: torch.Tensor | None,
                  temperature: float, generator=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Leviathan's rule on device: (accepted count [B], next token [B]) from the target's logits [B, gamma + 1, V]
    over drafts [B, gamma]. Each draft is kept with min(1, p/q) until the first rejection; the next token comes
    from max(0, p - q) after a rejection, from p after a full accept. Greedy compares argmaxes directly (the
    temperature-0 case of the same rule, without building one-hot distributions; draft_probs may be None)."""
    if temperature <= 0:
        return accept_greedy(target_logits.argmax(-1), drafts)
    batch, gamma = drafts.shape
    rows = torch.arange(batch, device=drafts.device)
    p = probabilities(target_logits.float(), temperature)
    q = draft_probs
    p_draft = p[:, :gamma].gather(-1, drafts[..., None])[..., 0]
    q_draft = q.gather(-1, drafts[..., None])[..., 0]
    uniform = torch.rand(p_draft.shape, generator=generator, device=p_draft.device)
    n_accepted = (uniform < (p_draft / q_draft).clamp(max=1.0)).long().cumprod(1).sum(1)
    p_next = p[rows, n_accepted]
    q_next = torch.cat([q, torch.zeros_like(q[:, :1])], 1)[rows, n_accepted]
    residual = (p_next - q_next).clamp(min=0)
    residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, p_next)
    return n_accepted, sample(residual / residual.sum(-1, keepdim=True), generator)


def accept_greedy(best: torch.Tensor, drafts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """accept_drafts at temperature 0 from the target's argmax [B, gamma + 1]: drafts are kept while they equal it."""
    n_accepted = (best[:, :drafts.shape[1]] == drafts).long().cumprod(1).sum(1)
    return n_accepted, best[torch.arange(best.shape[0], device=best.device), n_accepted]


def top2(logits: torch.Tensor) -> torch.Tensor:
    """[..., 2] float32 on the logits' device from logits [..., V]: (top-1 minus top-2 logit, top-1 logit), what the
    losslessness verdict (lib/lossless.py) reads at the position where two runs first differ."""
    values = logits.topk(2, dim=-1).values.float()
    return torch.stack([values[..., 0] - values[..., 1], values[..., 0]], -1)


class _DeviceTops:
    """top2() of every step's target logits, kept on the device and read in one copy when the batch ends, so the
    plain loops add no host sync per step. A row's emitted token refers to its entry by index (see `add`)."""

    def __init__(self):
        self.parts: list[torch.Tensor] = []
        self.size = 0

    def add(self, logits: torch.Tensor) -> tuple[int, int]:
        """Keep top2 of logits [B, P, V] (or [B, V]); (base, P): row b's position p is entry base + b * P + p."""
        tops = top2(logits if logits.dim() == 3 else logits[:, None])
        self.parts.append(tops.reshape(-1, 2))
        base, self.size = self.size, self.size + tops.shape[0] * tops.shape[1]
        return base, tops.shape[1]

    def read(self, handles: list[list[int]]) -> list[list[list[float]]]:
        flat = torch.cat(self.parts).tolist() if self.parts else []
        return [[flat[i] for i in row] for row in handles]


def split_tops(per_row: list[list], gen: Generation) -> Generation:
    """Per-row [margin, top logit] pairs into gen.top2_margins and gen.top_logits."""
    gen.top2_margins = [[float(t[0]) for t in row] for row in per_row]
    gen.top_logits = [[float(t[1]) for t in row] for row in per_row]
    return gen


class _Rows:
    """Per-row output bookkeeping shared by AR and SD: append tokens, stop at EOS or the length limit. Each token
    may bring a handle to the target's top-2 figures where it was emitted (a [margin, top] pair, or an index that
    _DeviceTops resolves), kept in `tops` alongside the tokens."""

    def __init__(self, batch: int, max_new: int, eos_ids: set[int]):
        self.max_new, self.eos_ids = max_new, eos_ids
        self.tokens = [[] for _ in range(batch)]
        self.times = [[] for _ in range(batch)]
        self.tops = [[] for _ in range(batch)]
        self.reasons = [""] * batch

    def add(self, row: int, new: list[int], now: float, tops: list | None = None):
        for i, token in enumerate(new):
            if self.reasons[row]:
                return
            self.tokens[row].append(token)
            self.times[row].append(now)
            if tops is not None:
                self.tops[row].append(tops[i])
            if token in self.eos_ids:
                self.reasons[row] = "stop"
            elif len(self.tokens[row]) >= self.max_new:
                self.reasons[row] = "length"

    def add_each(self, tokens: list[int], now: float, tops: list | None = None):
        """One new token per row (tops: one handle per row)."""
        for row, token in enumerate(tokens):
            self.add(row, [token], now, None if tops is None else [tops[row]])

    def done(self) -> bool:
        return all(self.reasons)


def _prefill(model, prompts: list[list[int]], pad_id: int, device) -> tuple[KVState, torch.Tensor]:
    """Left-padded prompt forward; returns the state and the last position's logits [B, V]."""
    width = max(len(p) for p in prompts)
    tokens = torch.full((len(prompts), width), pad_id, dtype=torch.long, device=device)
    valid = torch.zeros_like(tokens, dtype=torch.bool)
    for row, prompt in enumerate(prompts):
        tokens[row, width - len(prompt):] = torch.tensor(prompt, device=device)
        valid[row, width - len(prompt):] = True
    state = KVState.empty(len(prompts), device)
    return state, forward(model, state, tokens, valid)[:, -1]


@torch.inference_mode()
def autoregressive_generate(target, prompts: list[list[int]], max_new: int, temperature: float = 0.0,
                            eos_ids: set[int] = frozenset(), pad_id: int = 0, generator=None) -> Generation:
    device = target.device
    state, logits = _prefill(target, prompts, pad_id, device)
    rows, tops = _Rows(len(prompts), max_new, set(eos_ids)), _DeviceTops()
    while True:
        token = sample(probabilities(logits, temperature), generator)
        base, _ = tops.add(logits)
        rows.add_each(token.tolist(), time.perf_counter(), [base + row for row in range(len(prompts))])
        if rows.done():
            break
        logits = forward(target, state, token[:, None])[:, -1]
    return split_tops(tops.read(rows.tops), Generation(rows.tokens, rows.times, rows.reasons))


@torch.inference_mode()
def speculative_generate(target, draft, prompts: list[list[int]], max_new: int, gamma: int,
                         temperature: float = 0.0, eos_ids: set[int] = frozenset(), pad_id: int = 0,
                         generator=None) -> Generation:
    """Draft gamma tokens, verify them in one target pass, keep the accepted prefix plus one target token."""
    batch, device = len(prompts), target.device
    target_state, target_logits = _prefill(target, prompts, pad_id, device)
    draft_state, _ = _prefill(draft, prompts, pad_id, draft.device)
    rows, tops = _Rows(batch, max_new, set(eos_ids)), _DeviceTops()
    out = Generation.for_speculation(batch, gamma)
    clock = RoundClock()

    pending = sample(probabilities(target_logits, temperature), generator)  # [B]: emitted, not yet in caches
    base, _ = tops.add(target_logits)
    rows.add_each(pending.tolist(), time.perf_counter(), [base + row for row in range(batch)])
    while not rows.done():
        # 1. draft gamma tokens autoregressively
        draft_start = mark(draft.device)
        draft_tokens, draft_probs, token = [], [], pending.to(draft.device)
        for _ in range(gamma):
            q = probabilities(forward(draft, draft_state, token[:, None])[:, -1], temperature)
            token = sample(q, generator)
            draft_tokens.append(token)
            draft_probs.append(q)
        drafts = torch.stack(draft_tokens, 1).to(device)  # [B, gamma]
        q = torch.stack(draft_probs, 1).to(device)  # [B, gamma, V]
        draft_end = mark(draft.device)

        # 2. verify all drafts in one target pass (logits for gamma + 1 positions); 3-4. accept, pick the next token
        verify_start = mark(device)
        target_logits = forward(target, target_state, torch.cat([pending[:, None], drafts], 1))
        n_accepted, next_token = accept_drafts(target_logits, drafts, q, temperature, generator)
        base, width = tops.add(target_logits)
        verify_end = mark(device)

        # 5. roll back both caches to the accepted prefix (one host sync reads the counts)
        counts = n_accepted.tolist()
        clock.add_round((draft_start, draft_end, verify_start, verify_end), gamma)
        commit(target_state, gamma + 1, n_accepted + 1)
        commit(draft_state, gamma, (n_accepted + 1).clamp(max=gamma).to(draft.device))
        if max(counts) == gamma:  # rows that took every draft still need the last one in the draft cache
            forward(draft, draft_state, drafts[:, -1:].to(draft.device))
            commit(draft_state, 1, (n_accepted == gamma).long().to(draft.device))

        now = time.perf_counter()
        drafts_list, next_list = drafts.tolist(), next_token.tolist()
        for row in range(batch):
            if rows.reasons[row]:
                continue
            n = counts[row]
            out.count_round(row, gamma, n)
            rows.add(row, drafts_list[row][:n] + [next_list[row]], now,
                     [base + row * width + i for i in range(n + 1)])
        pending = next_token
    out.tokens, out.token_times, out.finish_reasons = rows.tokens, rows.times, rows.reasons
    out.step_times = clock.times
    return split_tops(tops.read(rows.tops), out)
