"""lib/decoding/gemv.py's Triton kernels (imported only where they run: Triton is needed to import this)."""
import os

import triton
import triton.language as tl
from triton.language.extra import libdevice

EXACT_EXP = tl.constexpr(os.environ.get("TRITON_INTERPRET") != "1")  # Triton's interpreter has no libdevice


@triton.jit
def store_silu_gate(acc, rows, y_ptr, N, M, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr):
    """acc [BLOCK_N, BLOCK_M]: the products of BLOCK_N // 2 (gate, up) row pairs; stores SiLU(gate) * up of
    each (the pair's two products rounded to y's type first, as an unfused product would leave them). SiLU is
    gate / (1 + exp(-gate)) with libdevice's exp: the operations of torch.compile's kernel of the unfused MLP,
    whose bits it gives (tests/test_gpu.py)."""
    acc = acc.to(y_ptr.dtype.element_ty).to(tl.float32)
    gate, up = tl.split(tl.permute(tl.reshape(acc, [BLOCK_N // 2, 2, BLOCK_M]), (0, 2, 1)))
    if EXACT_EXP:
        e = libdevice.exp(-gate)
    else:
        e = tl.exp(-gate)
    rh = tl.program_id(0) * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2)
    tl.store(y_ptr + rows[None, :] * (N // 2) + rh[:, None], (gate / (1 + e) * up).to(
        y_ptr.dtype.element_ty), mask=(rh[:, None] < N // 2) & (rows[None, :] < M))


@triton.jit
def gemv_one_row(x_ptr, w_ptr, y_ptr, N, K, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr,
                 GATED: tl.constexpr):
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    n_mask = rn < N
    w_ptrs = w_ptr + rn[:, None].to(tl.int64) * K + rk[None, :]
    w = tl.load(w_ptrs, mask=n_mask[:, None], other=0.0, eviction_policy="evict_first")  # K >= BLOCK_K
    if PDL:  # x is the previous kernel's output, the weights are not; see triton_launch.py for the order
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    acc = w.to(tl.float32) * tl.load(x_ptr + rk).to(tl.float32)[None, :]
    for k0 in range(BLOCK_K, K, BLOCK_K):
        w = tl.load(w_ptrs + k0, mask=n_mask[:, None], other=0.0, eviction_policy="evict_first")
        x = tl.load(x_ptr + k0 + rk)
        acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
    if GATED:
        store_silu_gate(tl.sum(acc, axis=1, keep_dims=True), tl.arange(0, 1), y_ptr, N, 1, BLOCK_N, 1)
    else:
        tl.store(y_ptr + rn, tl.sum(acc, axis=1).to(y_ptr.dtype.element_ty), mask=n_mask)


@triton.jit
def gemv_few_rows(x_ptr, w_ptr, y_ptr, M, N, K, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_K: tl.constexpr, PDL: tl.constexpr, GATED: tl.constexpr):
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    rm = tl.arange(0, BLOCK_M)
    n_mask, m_mask = rn < N, rm < M
    w_ptrs = w_ptr + rn[:, None].to(tl.int64) * K + rk[None, :]
    x_ptrs = x_ptr + rm[None, :] * K + rk[:, None]  # x.T's tile [BLOCK_K, BLOCK_M]
    if PDL:  # everything before the loop is addresses; see triton_launch.py for the order
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    acc = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        w = tl.load(w_ptrs + k0, mask=n_mask[:, None], other=0.0, eviction_policy="evict_first")
        x = tl.load(x_ptrs + k0, mask=m_mask[None, :], other=0.0)
        acc = tl.dot(w, x, acc)
    if GATED:
        store_silu_gate(acc, rm, y_ptr, N, M, BLOCK_N, BLOCK_M)
    else:
        tl.store(y_ptr + rm[None, :] * N + rn[:, None], acc.to(y_ptr.dtype.element_ty),
                 mask=n_mask[:, None] & m_mask[None, :])
