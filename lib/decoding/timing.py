"""Step timing for the SD cost model (lib/sd_model.py): the draft and verify steps inside an SD loop, and a short
timed measurement of the target's 1-token step at the same batch size.

Inside the loop nothing waits for the device: on CPU the work is done when a call returns, so perf_counter marks
are the step times; on CUDA the marks are events recorded in the device's stream, read only after the round's own
host read has waited for them, so timing adds no synchronisation.
"""
from __future__ import annotations

import time

import torch

from lib.bandwidth import sync
from lib.types import StepTimes

Mark = float | torch.cuda.Event


def mark(device) -> Mark:
    """Now, in the order of the work queued on device."""
    device = torch.device(device)
    if device.type != "cuda":
        return time.perf_counter()
    event = torch.cuda.Event(enable_timing=True)
    event.record(torch.cuda.current_stream(device))
    return event


def seconds_between(start: Mark, end: Mark) -> float:
    """Seconds from start to end (two marks of one device; on CUDA, once the round's host read has passed them)."""
    if isinstance(start, float):
        return end - start
    end.synchronize()  # already complete after the round's read: returns at once
    return start.elapsed_time(end) / 1000


class RoundClock:
    """Adds up the draft and verify time of SD rounds. A round's marks: (draft start, draft end) on the draft's
    device, (verify start, verify end) on the target's."""

    def __init__(self):
        self.times = StepTimes()

    def add_round(self, marks: tuple[Mark, Mark, Mark, Mark], draft_steps: int):
        draft_start, draft_end, verify_start, verify_end = marks
        self.times = self.times.add(StepTimes(seconds_between(draft_start, draft_end), draft_steps,
                                              seconds_between(verify_start, verify_end), 1))


STEP_REPEATS = 20  # timed steps of the target's 1-token measurement (after 2 untimed ones)


@torch.inference_mode()
def step_seconds(decoder, width: int, repeats: int = STEP_REPEATS, position: int = 0, then=None) -> float:
    """Mean time of one step of this width on a fast-path StaticDecoder (graph replays on CUDA), each row fed at
    column `position` (clamped to the cache): on CUDA the decode attention reads a row's columns up to its
    position only, so time the step where the run's steps were (`mid_position`). `then` runs in the step as in
    StaticDecoder.step: fast_path.ar_step_then() times the AR loop's step, its greedy pick included. It writes the
    cache at those columns: call it once a run is over (the next prefill starts the cache anew); the rows' lengths
    are restored."""
    saved = decoder.lengths.clone()
    decoder.lengths.fill_(max(0, min(position, decoder.max_len - width)))
    tokens = torch.randint(1, 100, (decoder.batch, width), device=decoder.device)
    for _ in range(2):
        decoder.step(tokens, then)
    sync(decoder.device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        decoder.step(tokens, then)
    sync(decoder.device)
    seconds = (time.perf_counter() - t0) / repeats
    decoder.lengths.copy_(saved)
    return seconds


def mid_position(prompts: list[list[int]], max_new: int) -> int:
    """The mean column a run's steps fed: the prompts' mean length plus half the new tokens."""
    return round(sum(len(p) for p in prompts) / len(prompts) + max_new / 2)


@torch.inference_mode()
def plain_step_seconds(model, prompts: list[list[int]], pad_id: int = 0, repeats: int = STEP_REPEATS) -> float:
    """Mean time of one 1-token forward of a Hugging Face model after these prompts (the plain loop's step, at
    their batch size and lengths); each step is rolled back so every one sees the same cache length."""
    from lib.decoding.chain import _prefill, commit, forward
    state, _ = _prefill(model, prompts, pad_id, model.device)
    token = torch.full((len(prompts), 1), pad_id, dtype=torch.long, device=model.device)
    keep_none = torch.zeros(len(prompts), dtype=torch.long, device=model.device)
    total = 0.0
    for i in range(repeats + 2):
        sync(model.device)
        t0 = time.perf_counter()
        forward(model, state, token)
        sync(model.device)
        if i >= 2:
            total += time.perf_counter() - t0
        commit(state, 1, keep_none)
    return total / repeats
