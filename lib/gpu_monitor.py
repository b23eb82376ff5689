"""GPU power/energy/utilization sampling with NVML (nvidia-ml-py), in a background thread.

Energy comes from NVML's total-energy counter (mJ since driver load) where the GPU has one; otherwise power
samples are integrated (trapezoid). Windows are cut per benchmark mode. No GPU or no NVML: the monitor says
"unavailable" and why, and the run goes on.
"""
from __future__ import annotations

import os
import threading
from dataclasses import dataclass


@dataclass
class Sample:
    t: float  # run-clock seconds
    gpu: int
    power_w: float | None
    energy_mj: float | None
    util_pct: float | None
    mem_pct: float | None
    temp_c: float | None


def _visible_indices(count: int) -> list[int]:
    """NVML indices of the GPUs in CUDA_VISIBLE_DEVICES (numeric form), else all."""
    raw = os.environ.get("CUDA_VISIBLE_DEVICES", "").strip()
    if not raw:
        return list(range(count))
    try:
        return [int(x) for x in raw.split(",") if x.strip() != "" and int(x) < count]
    except ValueError:  # UUIDs: NVML can't map them cheaply; monitor all
        return list(range(count))


def _try(fn, *args):
    try:
        return fn(*args)
    except Exception:  # noqa: BLE001 - NVML raises per-query errors on GPUs without that sensor
        return None


class GPUMonitor:
    def __init__(self, interval: float, clock_now, enabled: bool = True):
        self.interval, self.now = interval, clock_now
        self.samples: list[Sample] = []
        self.available, self.reason, self.gpus, self.names = False, "", [], {}
        self._stop = threading.Event()
        self._thread = None
        if not enabled:
            self.reason = "disabled (ENABLE_GPU_MONITOR=false)"
            return
        try:
            import pynvml
            pynvml.nvmlInit()
        except Exception as exc:  # noqa: BLE001 - ImportError, NVMLError_LibraryNotFound, driver errors
            self.reason = f"NVML not usable here: {exc.__class__.__name__}: {exc}".strip()
            return
        self.nvml = pynvml
        count = pynvml.nvmlDeviceGetCount()
        self.gpus = _visible_indices(count)
        if not self.gpus:
            self.reason = "no GPU visible to NVML"
            return
        self.handles = {i: pynvml.nvmlDeviceGetHandleByIndex(i) for i in self.gpus}
        self.names = {i: str(_try(pynvml.nvmlDeviceGetName, h)) for i, h in self.handles.items()}
        self.available = True

    def _sample_once(self, t: float | None = None):
        nv, t = self.nvml, self.now() if t is None else t
        for i, h in self.handles.items():
            power = _try(nv.nvmlDeviceGetPowerUsage, h)
            util = _try(nv.nvmlDeviceGetUtilizationRates, h)
            mem = _try(nv.nvmlDeviceGetMemoryInfo, h)
            self.samples.append(Sample(
                t, i, power / 1000 if power is not None else None,
                _try(nv.nvmlDeviceGetTotalEnergyConsumption, h),
                util.gpu if util is not None else None,
                100 * mem.used / mem.total if mem is not None else None,
                _try(nv.nvmlDeviceGetTemperature, h, nv.NVML_TEMPERATURE_GPU)))

    def _loop(self):
        while not self._stop.is_set():
            self._sample_once()
            self._stop.wait(self.interval)

    def start(self):
        if self.available and self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="gpu-monitor", daemon=True)
            self._thread.start()

    def mark(self) -> float:
        """Take a sample now and return its time: mode boundaries, so each window has a sample at both edges."""
        t = self.now()
        if self.available:
            self._sample_once(t)
        return t

    def stop(self):
        if self._thread is not None:
            self._stop.set()
            self._thread.join(timeout=5)
            self._thread = None
        if self.available:
            _try(self.nvml.nvmlShutdown)

    def window(self, start: float, end: float, output_tokens: int) -> dict:
        """Per-GPU and total figures for samples in [start, end]."""
        if not self.available:
            return {"available": False, "reason": self.reason}
        per_gpu = {}
        for i in self.gpus:
            s = [x for x in self.samples if x.gpu == i and start <= x.t <= end]
            per_gpu[str(i)] = _gpu_window(s, self.names.get(i))
        energies = [g["energy_j"] for g in per_gpu.values() if g["energy_j"] is not None]
        total_energy = sum(energies) if energies else None
        powers = [g["avg_power_w"] for g in per_gpu.values() if g["avg_power_w"] is not None]
        return {
            "available": True, "interval_s": self.interval, "window_s": end - start, "per_gpu": per_gpu,
            "total_energy_j": total_energy, "total_avg_power_w": sum(powers) if powers else None,
            "energy_per_output_token_j": total_energy / output_tokens if output_tokens and energies else None,
        }


def _mean(values):
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def _gpu_window(s: list[Sample], name) -> dict:
    energy, source = None, None
    counters = [x for x in s if x.energy_mj is not None]
    if len(counters) >= 2 and counters[-1].energy_mj > counters[0].energy_mj:
        energy, source = (counters[-1].energy_mj - counters[0].energy_mj) / 1000, "nvml_total_energy_counter"
    else:  # no counter, or a window shorter than the counter's update period: integrate the power samples
        powered = [x for x in s if x.power_w is not None]
        if len(powered) >= 2:
            energy = sum((b.t - a.t) * (a.power_w + b.power_w) / 2 for a, b in zip(powered, powered[1:]))
            source = "integrated_power"
    powers = [x.power_w for x in s if x.power_w is not None]
    temps = [x.temp_c for x in s if x.temp_c is not None]
    return {"name": name, "samples": len(s), "energy_j": energy, "energy_source": source,
            "avg_power_w": _mean(powers), "peak_power_w": max(powers) if powers else None,
            "avg_util_pct": _mean([x.util_pct for x in s]), "avg_mem_pct": _mean([x.mem_pct for x in s]),
            "peak_temp_c": max(temps) if temps else None}

