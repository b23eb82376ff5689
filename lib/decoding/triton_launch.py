"""Programmatic dependent launch (PDL) for the fast path's Triton kernels on Hopper and later GPUs.

A CUDA graph of a decode step is a chain of a few hundred short kernels, each waiting for the one before to finish
and flush before its own blocks start. Launched with PDL, a kernel's blocks start while the previous kernel is
still finishing; each waits (`gdc_wait`) where it first reads what that kernel wrote. Weights do not depend on the
previous kernel, so a matrix-vector product loads its first weight tile before it waits.

The order matters: a kernel lets the next one launch (`gdc_launch_dependents`) only after its own wait. torch
inductor's PDL kernels wait only for what the kernel just before them wrote and read older buffers without
waiting; that is safe only while every kernel before them has waited for its own predecessor before letting
them start.
"""
from __future__ import annotations

import functools

import torch


@functools.cache
def _triton_has_pdl() -> bool:
    try:
        import triton.language.extra.cuda as cuda_extra
    except ImportError:
        return False
    return hasattr(cuda_extra, "gdc_wait") and hasattr(cuda_extra, "gdc_launch_dependents")


def pdl_available(device: torch.device) -> bool:
    """PDL needs compute capability 9.0 (Hopper) or later and a Triton that emits griddepcontrol."""
    return (device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9 and _triton_has_pdl())


def launch_options(device: torch.device, wanted: bool) -> dict:
    """The kernel's PDL constexpr and, when on, Triton's launch option."""
    on = wanted and pdl_available(device)
    return {"PDL": on, "launch_pdl": True} if on else {"PDL": False}


MERGE_COUNTS = 4096  # the most rows (or row x head pairs) a launch of a merging kernel may count for


@functools.cache
def merge_counts(device: torch.device) -> torch.Tensor:
    """Counts for the kernels whose last program of a row merges the others' partials (decode_attention.py's
    split, pick.py): one per row, zero between launches (each merging program resets its own). One buffer per GPU:
    the fast path's kernels run one after another on one stream, and each waits for the one before (with PDL, at
    its start), so no two launches count in it at once."""
    return torch.zeros(MERGE_COUNTS, dtype=torch.int32, device=device)
