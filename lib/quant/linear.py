"""MixedPrecisionLinear: an nn.Linear replacement that keeps its weight compressed and computes from it.

Compute paths, fastest available first:
  fp8  on CUDA with compute capability >= 8.9: torch._scaled_mm (activations quantized per tensor on the fly)
  int8 on CUDA: torch._int_mm (activations quantized per row on the fly)
  everything else (and CPU): dequantize to the activation dtype, then F.linear; with cache_dequantized=True the
  dequantized weight is kept (faster, but then the layer holds that copy too, and memory_stats says so).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lib.quant.formats import FloatWeight, FP8Weight, Int8Weight, FP8_MAX
from lib.quant.gptq import GPTQWeight

_FORMAT_FIELDS = {FloatWeight: ("weight",), FP8Weight: ("weight", "scale"), Int8Weight: ("weight", "scale"),
                  GPTQWeight: ("qweight", "qzeros", "scales", "g_idx")}


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
        self.meta = {k: getattr(fmt, k) for k in ("bits", "group_size", "zero_format") if hasattr(fmt, k)}
        for field in _FORMAT_FIELDS[self.format_cls]:
            self.register_buffer(field, getattr(fmt, field))
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        gptq = isinstance(fmt, GPTQWeight)
        self.out_features, self.in_features = (fmt.out_features, fmt.in_features) if gptq else fmt.weight.shape
        self.cache_dequantized = cache_dequantized
        self.fast_kernels = fast_kernels
        self._cache: torch.Tensor | None = None
        self.last_path = ""

    @property
    def fmt(self):
        return self.format_cls(*(getattr(self, f) for f in _FORMAT_FIELDS[self.format_cls]), **self.meta)

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
            if self.format_cls is Int8Weight and x.device.type == "cuda":
                return self._int8_forward(x)
        self.last_path = "dequantize"
        return F.linear(x, self.dequantized_weight(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def _fp8_forward(self, x):
        self.last_path = "scaled_mm"
        flat = x.reshape(-1, self.in_features)
        x_scale = (flat.abs().amax().float().clamp(min=1e-12) / FP8_MAX)
        x_fp8 = (flat.float() / x_scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
        w_scale = self.scale.float()
        if w_scale.dim() == 2:  # per channel: _scaled_mm wants a row scale for A with a column scale for B
            a_scale = x_scale.expand(flat.shape[0], 1).contiguous()
            b_scale = w_scale.reshape(1, -1).contiguous()
        else:
            a_scale, b_scale = x_scale, w_scale
        out = torch._scaled_mm(x_fp8, self.weight.t(), scale_a=a_scale, scale_b=b_scale,
                               out_dtype=x.dtype if x.dtype != torch.float32 else torch.bfloat16)
        out = out.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        return out if self.bias is None else out + self.bias.to(x.dtype)

    def _int8_forward(self, x):
        flat = x.reshape(-1, self.in_features)
        if flat.shape[0] <= 16:  # _int_mm needs more than 16 rows
            self.last_path = "dequantize"
            return F.linear(x, self.dequantized_weight(x.dtype), None if self.bias is None else self.bias.to(x.dtype))
        self.last_path = "int_mm"
        x_scale = flat.abs().amax(dim=1, keepdim=True).float().clamp(min=1e-12) / 127.0
        x_i8 = torch.round(flat.float() / x_scale).clamp(-127, 127).to(torch.int8)
        acc = torch._int_mm(x_i8, self.weight.t())
        out = (acc.float() * x_scale * self.scale.float().reshape(1, -1)).to(x.dtype)
        out = out.reshape(*x.shape[:-1], self.out_features)
        return out if self.bias is None else out + self.bias.to(x.dtype)

    def memory(self, name: str = "") -> LayerMemory:
        stored = sum(b.numel() * b.element_size() for n, b in self.named_buffers())
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
        return sum(l.stored_bytes + l.cache_bytes for l in self.layers) + self.other_bytes

    @property
    def fp16_bytes(self) -> int:
        return sum(l.fp16_bytes for l in self.layers) + self.other_fp16_bytes

    @property
    def memory_saved_mb(self) -> float:
        return (self.fp16_bytes - self.stored_bytes) / 2**20

    @property
    def compression_ratio(self) -> float:
        return self.fp16_bytes / max(1, self.stored_bytes)

    def by_precision(self) -> dict[str, dict]:
        out: dict[str, dict] = {}
        for l in self.layers:
            row = out.setdefault(l.precision, {"layers": 0, "stored_bytes": 0, "fp16_bytes": 0})
            row["layers"] += 1
            row["stored_bytes"] += l.stored_bytes + l.cache_bytes
            row["fp16_bytes"] += l.fp16_bytes
        return out

    def as_dict(self) -> dict:
        return {"stored_bytes": self.stored_bytes, "fp16_bytes": self.fp16_bytes,
                "memory_saved_mb": round(self.memory_saved_mb, 6),
                "compression_ratio": round(self.compression_ratio, 4), "other_bytes": self.other_bytes,
                "by_precision": self.by_precision(), "layers": [l.as_dict() for l in self.layers]}


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
