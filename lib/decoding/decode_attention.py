"""A Triton decode attention for the fast path's decode, draft and verify steps on CUDA: one kernel reads one layer's
cache once.

The eager attention of lib/decoding/fast_path.py is two batched products and a softmax: three kernels, and the
scores go through memory between them. At decode widths that is latency, not bytes. Here one program owns one
(row, kv head): it loads the query heads of that kv head once (they share its keys: GQA of any ratio), walks the
cache in BLOCK_L-column tiles with an online softmax in float32, and reads only the columns some query may see (up
to the row's last position). Measured on an H200 (docs/performance.md): attention per 8B step 231 -> 178 µs at
batch 1, 443 -> 229 µs at batch 16; a 5-token verify step 4.79 -> 4.68 ms.

Under SPLIT_BELOW (row, kv head) pairs (8 at batch 1 of an 8B model: most SMs idle) each pair's columns are split
over SPLITS programs (flash-decoding); each leaves its partial max, sum and output, and the last to finish (a count
per pair, which it resets) merges them, so no merge kernel is launched. With a separate merge kernel the splits
had been slower; merged in the kernel, an 8B 256-token call at batch 1 went 85.5 -> 87.0 % of the floor and a 1B
one 61.7 -> 63.3 %. Doing the step's rotary and cache write in here was slower (8 programs at batch 1 then carry
that work serially: 85.0 -> 82.1 % of the floor).
"""
from __future__ import annotations

import functools

import torch

from lib.decoding.triton_launch import launch_options, merge_counts

BLOCK_L = 64  # cache columns per tile
SPLITS = 4  # programs per (row, kv head) when the rows' kv heads alone would leave most of the GPU idle
SPLIT_BELOW = 64  # ... that is, when batch x kv heads is under this


def supports(q: torch.Tensor, k_cache: torch.Tensor, max_width: int = 1) -> bool:
    """CUDA, 16-bit, at most max_width tokens per row (the fast path's choice: docs/performance.md), a power-of-two
    head_dim from 16 to 256, at most 64 query rows (query heads per kv head x tokens) per program, a cache
    [B, Hkv, L, D] contiguous in its last two dims."""
    _, n, n_heads, head_dim = q.shape
    return (q.is_cuda and q.dtype in (torch.bfloat16, torch.float16) and k_cache.dtype == q.dtype and n <= max_width
            and 16 <= head_dim <= 256 and head_dim & (head_dim - 1) == 0 and n * n_heads // k_cache.shape[1] <= 64
            and k_cache.stride(3) == 1 and k_cache.stride(2) == head_dim)


@functools.cache
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def decode_attention(q_ptr, k_ptr, v_ptr, pos_ptr, o_ptr, part_ptr, count_ptr, scale, L, sq_b, sq_t, sq_h,
                         sk_b, sk_h, so_b, so_t, so_h, HKV: tl.constexpr, GROUP: tl.constexpr, N_Q: tl.constexpr,
                         D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_L: tl.constexpr, SPLITS: tl.constexpr,
                         PDL: tl.constexpr):
        if PDL:  # everything it reads comes from the kernels before it; see triton_launch.py for the order
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        bh, split = tl.program_id(0) // SPLITS, tl.program_id(0) % SPLITS
        b, h = bh // HKV, bh % HKV
        r = tl.arange(0, BLOCK_M)  # query row r = g * N_Q + t: query head h * GROUP + g, token t
        row_ok = r < GROUP * N_Q
        t, g = r % N_Q, r // N_Q
        d = tl.arange(0, D)
        pos = tl.load(pos_ptr + b * N_Q + t, mask=row_ok, other=-1)
        q = tl.load(q_ptr + b * sq_b + t[:, None] * sq_t + (h * GROUP + g)[:, None] * sq_h + d[None, :],
                    mask=row_ok[:, None], other=0.0)
        hi = tl.minimum(L, tl.max(pos) + 1)  # columns past every query's position are not read
        share = tl.cdiv(tl.cdiv(hi, BLOCK_L), SPLITS) * BLOCK_L  # this split's columns: a run of whole tiles
        lo = split * share
        hi = tl.minimum(hi, lo + share)
        k_base = k_ptr + b * sk_b + h * sk_h
        v_base = v_ptr + b * sk_b + h * sk_h
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, D], tl.float32)
        for start in range(lo, hi, BLOCK_L):
            cols = start + tl.arange(0, BLOCK_L)
            in_range = cols < hi
            k = tl.load(k_base + cols[:, None] * D + d[None, :], mask=in_range[:, None], other=0.0)
            scores = tl.dot(q, tl.trans(k)) * scale
            scores = tl.where((cols[None, :] <= pos[:, None]) & in_range[None, :], scores, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(scores, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a (padding) row that sees no column
            p = tl.exp(scores - m_safe[:, None])
            alpha = tl.exp(m_i - m_safe)
            v = tl.load(v_base + cols[:, None] * D + d[None, :], mask=in_range[:, None], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            l_i = l_i * alpha + tl.sum(p, 1)
            m_i = m_new
        out = o_ptr + b * so_b + t[:, None] * so_t + (h * GROUP + g)[:, None] * so_h + d[None, :]
        if SPLITS > 1:
            # each split leaves (max, sum, unnormalised output) of its columns; the last split to finish merges
            part = part_ptr + tl.program_id(0) * BLOCK_M * (D + 2)
            tl.store(part + r, m_i)
            tl.store(part + BLOCK_M + r, l_i)
            tl.store(part + 2 * BLOCK_M + r[:, None] * D + d[None, :], acc)
            tl.debug_barrier()  # every thread's partials are written before the count says so (acq_rel, GPU)
            if tl.atomic_add(count_ptr + bh, 1) == SPLITS - 1:
                tl.atomic_xchg(count_ptr + bh, 0)  # the counts are zero again for the next launch
                m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
                for other in tl.static_range(SPLITS):
                    other_part = part_ptr + (bh * SPLITS + other) * BLOCK_M * (D + 2)
                    m_i = tl.maximum(m_i, tl.load(other_part + r, cache_modifier=".cg"))
                m_safe = tl.where(m_i == float("-inf"), 0.0, m_i)
                l_i = tl.zeros([BLOCK_M], tl.float32)
                acc = tl.zeros([BLOCK_M, D], tl.float32)
                for other in tl.static_range(SPLITS):  # L2 reads (.cg): other SMs wrote them
                    other_part = part_ptr + (bh * SPLITS + other) * BLOCK_M * (D + 2)
                    weight = tl.exp(tl.load(other_part + r, cache_modifier=".cg") - m_safe)
                    l_i += weight * tl.load(other_part + BLOCK_M + r, cache_modifier=".cg")
                    acc += weight[:, None] * tl.load(other_part + 2 * BLOCK_M + r[:, None] * D + d[None, :],
                                                     cache_modifier=".cg")
                tl.store(out, (acc / tl.maximum(l_i, 1e-30)[:, None]).to(o_ptr.dtype.element_ty),
                         mask=row_ok[:, None])
        else:
            tl.store(out, (acc / tl.maximum(l_i, 1e-30)[:, None]).to(o_ptr.dtype.element_ty), mask=row_ok[:, None])

    return triton, decode_attention


def launch(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, positions: torch.Tensor,
           scale: float, pdl: bool = False, splits: int = SPLITS) -> torch.Tensor:
    """q [B, n, Hq, D], caches [B, Hkv, L, D], positions [B, n] (query t of row b sees the columns <=
    positions[b, t]) -> [B, n, Hq, D]. Any n whose G * n query rows fit a tile; the fast path sends up to 8.
    pdl: a programmatic dependent launch where the GPU has it (lib/decoding/triton_launch.py); splits: programs
    per (row, kv head) while there are fewer than SPLIT_BELOW of those."""
    triton, kernel = _kernel()
    batch, n, n_heads, head_dim = q.shape
    n_kv = k_cache.shape[1]
    group = n_heads // n_kv
    block_m = max(16, triton.next_power_of_2(group * n))
    splits = splits if batch * n_kv < SPLIT_BELOW else 1
    out = torch.empty_like(q)
    parts = torch.empty(batch * n_kv * splits * block_m * (head_dim + 2) if splits > 1 else 1, dtype=torch.float32,
                        device=q.device)
    kernel[(batch * n_kv * splits,)](q, k_cache, v_cache, positions.contiguous(), out, parts, merge_counts(q.device),
                                     scale, k_cache.shape[2], *q.stride()[:3], k_cache.stride(0), k_cache.stride(1),
                                     *out.stride()[:3], HKV=n_kv, GROUP=group, N_Q=n, D=head_dim, BLOCK_M=block_m,
                                     BLOCK_L=BLOCK_L, SPLITS=splits, num_warps=4, num_stages=2,
                                     **launch_options(q.device, pdl))
    return out


@torch.library.custom_op("speclab::decode_attention", mutates_args=())
def _attention_op(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, positions: torch.Tensor,
                  scale: float, pdl: bool, splits: int) -> torch.Tensor:
    return launch(q, k_cache, v_cache, positions, scale, pdl, splits)


@_attention_op.register_fake
def _(q, k_cache, v_cache, positions, scale, pdl, splits):
    return torch.empty_like(q)


def attend(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, positions: torch.Tensor,
           scale: float, pdl: bool = False, splits: int = SPLITS) -> torch.Tensor:
    """The fast path's attention through the kernel (the caller checked `supports`) -> [B, n, Hq * D]."""
    return _attention_op(q, k_cache, v_cache, positions, scale, pdl, splits).flatten(2)
