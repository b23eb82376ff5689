"""Greedy AR's pick in one Triton kernel: each row's argmax and chain.top2's (top-1 minus top-2, top-1) figures.

Eager PyTorch spends a one-token step's last 0.1 ms on these (an 8B or 1B Llama's 128256 logits per row): argmax
and topk(2) each walk the row in kernels of their own, topk in several radix passes, then the figures are cast
and stacked. Here programs split each row into BLOCK-wide parts; each keeps its part's largest logit, its first
index and the second largest (the part with that one element left out), and the last program of a row to finish
(a count, as in decode_attention.py) merges the parts in a fixed order. Results are torch's to the bit: the first
index of the largest logit, as torch.argmax returns it (NaN ranks above every number, as in torch), and topk's
two values, exact in float32.
"""
from __future__ import annotations

import functools

import torch

from lib.decoding.triton_launch import MERGE_COUNTS, launch_options, merge_counts

BLOCK = 2048  # logits per program: 63 programs a row for a 128256-token vocabulary
MAX_ROWS = MERGE_COUNTS  # rows per launch (one count each); more rows keep torch's ops


def supports(logits: torch.Tensor) -> bool:
    """Logits [B, V] on CUDA, the vocabulary contiguous, B up to MAX_ROWS."""
    return (logits.is_cuda and logits.dim() == 2 and logits.dtype in (torch.bfloat16, torch.float16, torch.float32)
            and logits.stride(1) == 1 and 0 < logits.shape[0] <= MAX_ROWS and 0 < logits.shape[1] < 2 ** 31 - BLOCK)


@functools.cache
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def greedy_top2(x_ptr, stride, V, top_ptr, index_ptr, count_ptr, token_ptr, tops_ptr, PARTS: tl.constexpr,
                    PARTS_P2: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
        if PDL:  # the logits come from the kernel before it; see triton_launch.py for the order
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        row, part = tl.program_id(0), tl.program_id(1)
        cols = part * BLOCK + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + row * stride + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
        is_nan = x != x
        first = tl.max(tl.where(is_nan, float("-inf"), x), 0)
        index = tl.min(tl.where(x == first, cols, V), 0)
        second = tl.max(tl.where((cols == index) | is_nan, float("-inf"), x), 0)
        nan_index = tl.min(tl.where(is_nan, cols, V), 0)  # a NaN ranks first, as in torch
        slot = row * PARTS + part
        tl.store(top_ptr + 2 * slot, tl.where(nan_index < V, float("nan"), first))
        tl.store(top_ptr + 2 * slot + 1, second)
        tl.store(index_ptr + slot, tl.minimum(index, nan_index))
        tl.debug_barrier()  # every thread's partials are written before the count says so (acq_rel, GPU)
        if tl.atomic_add(count_ptr + row, 1) == PARTS - 1:
            tl.atomic_xchg(count_ptr + row, 0)  # zero again for the next launch
            p = tl.arange(0, PARTS_P2)
            ok = p < PARTS
            slots = row * PARTS + p  # L2 reads (.cg): other SMs wrote them
            firsts = tl.load(top_ptr + 2 * slots, mask=ok, other=float("-inf"), cache_modifier=".cg")
            seconds = tl.load(top_ptr + 2 * slots + 1, mask=ok, other=float("-inf"), cache_modifier=".cg")
            indices = tl.load(index_ptr + slots, mask=ok, other=V, cache_modifier=".cg")
            part_nan = firsts != firsts
            nan_token = tl.min(tl.where(part_nan, indices, V), 0)
            best = tl.max(tl.where(part_nan, float("-inf"), firsts), 0)
            token = tl.min(tl.where(firsts == best, indices, V), 0)
            runner_up = tl.max(tl.where(indices == token, seconds, firsts), 0)
            has_nan = nan_token < V  # then topk's values are NaN, and so are both figures
            tl.store(token_ptr + row, tl.where(has_nan, nan_token, token).to(tl.int64))
            tl.store(tops_ptr + 2 * row, tl.where(has_nan, float("nan"), best - runner_up))
            tl.store(tops_ptr + 2 * row + 1, tl.where(has_nan, float("nan"), best))

    return triton, greedy_top2


def greedy_top2(logits: torch.Tensor, pdl: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(argmax [B] int64, chain.top2 [B, 2] float32) of logits [B, V] (the caller checked `supports`); pdl: a
    programmatic dependent launch where the GPU has it (lib/decoding/triton_launch.py)."""
    triton, kernel = _kernel()
    rows, vocab = logits.shape
    parts = triton.cdiv(vocab, BLOCK)
    tops_of_parts = torch.empty(rows, parts, 2, dtype=torch.float32, device=logits.device)
    index_of_parts = torch.empty(rows, parts, dtype=torch.int32, device=logits.device)
    token = torch.empty(rows, dtype=torch.long, device=logits.device)
    tops = torch.empty(rows, 2, dtype=torch.float32, device=logits.device)
    kernel[(rows, parts)](logits, logits.stride(0), vocab, tops_of_parts, index_of_parts, merge_counts(logits.device),
                          token, tops, PARTS=parts, PARTS_P2=triton.next_power_of_2(parts), BLOCK=BLOCK,
                          num_warps=8, **launch_options(logits.device, pdl))
    return token, tops
