"""MixedPrecisionLinear: an nn.Linear replacement that keeps its weight compressed and computes from it.

Compute paths, fastest available first:
  fp8  on CUDA with compute capability >= 8.9: torch._scaled_mm (activations quantized per tensor on the fly)
  int8 on CUDA: torch._int_mm (activations quantized per row on the fly)
  everything else (and CPU): dequantize to the activation dtype, then F.linear; with cache_dequantized=True the
  dequantized weight is kept (faster, but then the layer holds that copy too, and memory_stats says so).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from lib.quant.formats import FP8Weight, Int8Weight, quantize_fp8, quantize_int8


@dataclass
class LayerMemory:
    name: str
    precision: str
    stored_bytes: int   # compressed weight + bias, as held now
    cache_bytes: int    # dequantized copy, if cached
    fp16_bytes: int     # what the same weight + bias take in fp16

    @property
    def memory_saved_mb(self) -> float:
        return (self.fp16_bytes - self.stored_bytes - self.cache_bytes) / 2**20

    @property
    def compression_ratio(self) -> float:
        return self.fp16_bytes / max(1, self.stored_bytes + self.cache_bytes)

    def as_dict(self) -> dict:
        return {**asdict(self), "memory_saved_mb": round(self.memory_saved_mb, 6),
                "compression_ratio": round(self.compression_ratio, 4)}


def _fp8_matmul_ok(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


class MixedPrecisionLinear(nn.Module):
    def __init__(self, fmt, precision: str, bias: torch.Tensor | None = None, cache_dequantized: bool = False,
                 fast_kernels: bool = True):
        super().__init__()
        self.precision = precision
        self.format_cls = type(fmt)
        # the format's tensors become buffers (so .to() moves them); its other fields (GPTQ bits...) stay as meta
        values = {f.name: getattr(fmt, f.name) for f in fields(fmt)}
        self.buffer_names = tuple(k for k, v in values.items() if isinstance(v, torch.Tensor))
        self.meta = {k: v for k, v in values.items() if k not in self.buffer_names}
        for name in self.buffer_names:
            self.register_buffer(name, values[name])
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.out_features, self.in_features = fmt.shape
        self.cache_dequantized = cache_dequantized
        self.fast_kernels = fast_kernels
        self._cache: torch.Tensor | None = None
        self.last_path = ""

    @property
    def fmt(self):
        return self.format_cls(**{f: getattr(self, f) for f in self.buffer_names}, **self.meta)

    def dequantized_weight(self, dtype) -> torch.Tensor:
        if self._cache is not None and self._cache.dtype == dtype:
            return self._cache
        w = self.fmt.dequantize(dtype)
        if self.cache_dequantized:
            self._cache = w
        return w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fast_kernels and self._cache is None:
            if self.format_cls is FP8Weight and _fp8_matmul_ok(x.device):
                return self._fp8_forward(x)
            if self.format_cls is Int8Weight and x.device.type == "cuda" and x.numel() > 16 * self.in_features:
                return self._int8_forward(x)  # _int_mm needs more than 16 rows
        self.last_path = "dequantize"
        return F.linear(x, self.dequantized_weight(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def _finish(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """[rows, out] product -> x's dtype and leading shape, plus the bias."""
        out = out.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        return out if self.bias is None else out + self.bias.to(x.dtype)

    def _fp8_forward(self, x):
        self.last_path = "scaled_mm"
        xq = quantize_fp8(x.reshape(-1, self.in_features))  # per tensor, on the fly
        a_scale, b_scale = xq.scale, self.scale.float()
        if b_scale.dim() == 2:  # per channel: _scaled_mm wants a row scale for A with a column scale for B
            a_scale = a_scale.expand(xq.weight.shape[0], 1).contiguous()
            b_scale = b_scale.reshape(1, -1).contiguous()
        out = torch._scaled_mm(xq.weight, self.weight.t(), scale_a=a_scale, scale_b=b_scale,
                               out_dtype=x.dtype if x.dtype != torch.float32 else torch.bfloat16)
        return self._finish(out, x)

    def _int8_forward(self, x):
        self.last_path = "int_mm"
        xq = quantize_int8(x.reshape(-1, self.in_features))  # per row, on the fly
        acc = torch._int_mm(xq.weight, self.weight.t())
        return self._finish(acc.float() * xq.scale * self.scale.float().reshape(1, -1), x)

    def memory(self, name: str = "") -> LayerMemory:
        stored = sum(b.numel() * b.element_size() for b in self.buffers())
        bias = 0 if self.bias is None else self.bias.numel() * self.bias.element_size()
        cache = 0 if self._cache is None else self._cache.numel() * self._cache.element_size()
        fp16 = 2 * (self.out_features * self.in_features + (0 if self.bias is None else self.out_features))
        return LayerMemory(name, self.precision, stored + bias, cache, fp16)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, precision={self.precision}"


@dataclass
class ModelMemory:
    layers: list[LayerMemory]
    other_bytes: int  # every parameter/buffer outside MixedPrecisionLinear layers (embeddings, norms, head)
    other_fp16_bytes: int

    @property
    def stored_bytes(self) -> int:
        return sum(layer.stored_bytes + layer.cache_bytes for layer in self.layers) + self.other_bytes

    @property
    def fp16_bytes(self) -> int:
        return sum(layer.fp16_bytes for layer in self.layers) + self.other_fp16_bytes

    @property
    def memory_saved_mb(self) -> float:
        return (self.fp16_bytes - self.stored_bytes) / 2**20

    @property
    def compression_ratio(self) -> float:
        return self.fp16_bytes / max(1, self.stored_bytes)

    def by_precision(self) -> dict[str, dict]:
        out: dict[str, dict] = {}
        for layer in self.layers:
            row = out.setdefault(layer.precision, {"layers": 0, "stored_bytes": 0, "fp16_bytes": 0})
            row["layers"] += 1
            row["stored_bytes"] += layer.stored_bytes + layer.cache_bytes
            row["fp16_bytes"] += layer.fp16_bytes
        return out

    def as_dict(self) -> dict:
        return {"stored_bytes": self.stored_bytes, "fp16_bytes": self.fp16_bytes,
                "memory_saved_mb": round(self.memory_saved_mb, 6),
                "compression_ratio": round(self.compression_ratio, 4), "other_bytes": self.other_bytes,
                "by_precision": self.by_precision(), "layers": [layer.as_dict() for layer in self.layers]}


def model_memory(model: nn.Module) -> ModelMemory:
    layers, seen = [], set()
    for name, module in model.named_modules():
        if isinstance(module, MixedPrecisionLinear):
            layers.append(module.memory(name))
            seen.update(id(t) for t in list(module.buffers()) + list(module.parameters()))
    other = other_fp16 = 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) in seen or not t.is_floating_point():
            continue
        seen.add(id(t))
        other += t.numel() * t.element_size()
        other_fp16 += t.numel() * 2
    return ModelMemory(layers, other, other_fp16)
