"""Triton products for decode steps of 1 to MAX_ROWS rows (y = x @ w.T), at the copy bandwidth.

A decode step's products read each weight once and do little arithmetic: the time is the weight's bytes over
memory bandwidth, and what decides it is how many loads are in flight. For one row, one program owns BLOCK_N rows
of w and walks K in BLOCK_K chunks, accumulating products elementwise in float32 and reducing once at the end. For
2 to MAX_ROWS rows (a verify step, a batch of rows) a program does the same on the tensor cores: its tile of w
is the product's left operand and x's rows, padded to 16, the right one (w @ x.T), so the tile's long side runs
along w's rows and each program walks all of K (split-K was slower). The block shapes are fixed per matrix shape
rather than autotuned, so every process runs the same kernels (torch.compile's tuning of its own matrix-vector
kernels picked differently in each process: 75-83 % of the floor for one build).

A gated MLP's gate/up product can end in SiLU(gate) * up (`silu_gate`): its weight's rows then come in pairs
(row 2i gate i, row 2i + 1 up i), so each program holds both halves of the outputs it writes and the MLP's
elementwise kernel is gone.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import torch

from lib.decoding.triton_launch import launch_options

DTYPES = (torch.bfloat16, torch.float16)  # what the kernels read and write
MAX_ROWS = 16  # one tensor-core tile of x's rows (timed at 5 and 16 on the H200: docs/performance.md); more: cuBLAS


class Blocks(NamedTuple):
    block_n: int
    block_k: int
    warps: int
    stages: int


# Shapes whose best block on the H200 beat the rule in `blocks_for` by 4-12 points of the floor: the 1B Llama
# shape's products, whose K of 2048 (8192 for down) leaves each program few chunks to overlap
# (benchmarks/gpu_step_profile.py --shape 1b --matrix-rows 1, docs/performance.md).
MEASURED = {(3072, 2048): Blocks(4, 1024, 4, 3), (2048, 2048): Blocks(8, 1024, 8, 3),
            (16384, 2048): Blocks(4, 256, 4, 4), (2048, 8192): Blocks(2, 2048, 8, 2)}


def blocks_for(n: int, k: int, rows: int = 1) -> Blocks:
    """Measured on an H200 (benchmarks/gpu_step_profile.py, docs/performance.md). One row: wide matrices (the
    MLP's gate/up, the head) want more rows per program, narrow ones more columns per load; `MEASURED` overrides.
    Several rows: 64 rows of w per program in chunks of 128 columns, 6 stages deep on the narrow matrices; 32 rows
    in chunks of 256 for a long K (the MLP's down)."""
    if rows > 1:
        if n < 16384 and k >= 8192 and k % 256 == 0:
            return Blocks(32, 256, 4, 6)
        return Blocks(64, 128 if k % 128 == 0 else 64, 4, 4 if n >= 16384 else 6)
    if (n, k) in MEASURED:
        return MEASURED[(n, k)]
    block_k = next(b for b in (512, 256, 128, 64) if k % b == 0)
    if n >= 16384:
        return Blocks(16, min(block_k, 256), 4, 4)
    return Blocks(8, block_k, 4, 3) if n >= 6144 else Blocks(4, block_k, 4, 4)


def supports(x: torch.Tensor, w: torch.Tensor, max_rows: int = MAX_ROWS) -> bool:
    """1 to max_rows rows of x (larger products go to cuBLAS), 16-bit, K a multiple of 64 (the kernels do not mask
    K; Qwen2.5-0.5B's 896 takes chunks of 128)."""
    return (x.is_cuda and x.dtype in DTYPES and w.dtype == x.dtype and w.is_contiguous()
            and w.shape[1] == x.shape[-1] and w.shape[1] % 64 == 0 and 0 < x.numel() <= max_rows * x.shape[-1])


@functools.cache
def _kernels():
    import triton

    from lib.decoding import gemv_kernels
    return triton, gemv_kernels.gemv_one_row, gemv_kernels.gemv_few_rows


def launch(x: torch.Tensor, w: torch.Tensor, blocks: Blocks | None = None, pdl: bool = False,
           gated: bool = False) -> torch.Tensor:
    """x [M, K] with M <= MAX_ROWS, w [N, K] contiguous -> [M, N]; pdl: a programmatic dependent launch where the
    GPU has it (lib/decoding/triton_launch.py); gated: w's rows are (gate, up) pairs -> SiLU(gate) * up [M, N / 2]."""
    rows, (n, k) = x.shape[0], w.shape
    if gated and n % 2:
        raise ValueError(f"a gated product needs (gate, up) pairs of rows; w has {n} rows")
    triton, one_row, few_rows = _kernels()
    x = x.contiguous()
    b = blocks or blocks_for(n, k, rows)
    y = torch.empty(rows, n // 2 if gated else n, dtype=x.dtype, device=x.device)
    grid, tuning = (triton.cdiv(n, b.block_n),), {"num_warps": b.warps, "num_stages": b.stages,
                                                  **launch_options(x.device, pdl)}
    if rows == 1:
        one_row[grid](x, w, y, n, k, BLOCK_N=b.block_n, BLOCK_K=b.block_k, GATED=gated, **tuning)
    else:
        few_rows[grid](x, w, y, rows, n, k, BLOCK_M=max(16, triton.next_power_of_2(rows)), BLOCK_N=b.block_n,
                       BLOCK_K=b.block_k, GATED=gated, **tuning)
    return y


@torch.library.custom_op("speclab::gemv", mutates_args=())
def _gemv_op(x: torch.Tensor, w: torch.Tensor, pdl: bool) -> torch.Tensor:
    return launch(x, w, pdl=pdl)


@_gemv_op.register_fake
def _(x: torch.Tensor, w: torch.Tensor, pdl: bool) -> torch.Tensor:
    return x.new_empty(x.shape[0], w.shape[0])


@torch.library.custom_op("speclab::gemv_silu_gate", mutates_args=())
def _silu_gate_op(x: torch.Tensor, w: torch.Tensor, pdl: bool) -> torch.Tensor:
    return launch(x, w, pdl=pdl, gated=True)


@_silu_gate_op.register_fake
def _(x: torch.Tensor, w: torch.Tensor, pdl: bool) -> torch.Tensor:
    return x.new_empty(x.shape[0], w.shape[0] // 2)


def silu_gate(x: torch.Tensor, w: torch.Tensor, pdl: bool = False) -> torch.Tensor:
    """SiLU(gate) * up of a gate/up product whose weight rows are (gate, up) pairs (the caller checked `supports`)."""
    return _silu_gate_op(x.reshape(-1, x.shape[-1]), w, pdl).view(*x.shape[:-1], w.shape[0] // 2)


def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None, pdl: bool = False) -> torch.Tensor:
    """F.linear through the Triton kernel (the caller checked `supports`)."""
    y = _gemv_op(x.reshape(-1, x.shape[-1]), w, pdl).view(*x.shape[:-1], w.shape[0])
    return y if b is None else y + b
