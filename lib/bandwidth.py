"""Memory-bandwidth floor: measured copy bandwidth and how close an engine's weight reads come to it.

bandwidth_efficiency = (bytes of weights read per step x steps/s) / measured copy bandwidth (docs/design.md). Decoding
at small batch reads every weight once per step, so 1.0 is the floor no engine beats; vLLM and llama.cpp do not
say how many steps they ran, so only the PyTorch engine reports it.
"""
from __future__ import annotations

import math
import time

import torch


def sync(device):
    """Wait for the device's queued work (a no-op on CPU): bracket timed regions with it."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def copy_bandwidth(device, nbytes: int | None = None) -> float:
    """Bytes/s moved by a device-to-device copy (read + write counted), best of several."""
    if nbytes is None:
        nbytes = (1 << 30) if torch.device(device).type == "cuda" else (256 << 20)
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    best = math.inf
    for _ in range(10):
        sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * src.numel() * src.element_size() / best


def bandwidth_report(weight_bytes_read: int, duration_s: float, copy_bytes_per_s: float) -> dict:
    achieved = weight_bytes_read / max(duration_s, 1e-9)
    return {"weight_bytes_read": weight_bytes_read, "weight_read_gb_s": achieved / 1e9,
            "copy_bandwidth_gb_s": copy_bytes_per_s / 1e9, "bandwidth_efficiency": achieved / copy_bytes_per_s}
