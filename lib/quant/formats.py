"""The weight formats a MixedPrecisionLinear can hold, one small class each, behind one shape:
dequantize(dtype) -> float [out, in]; shape (out, in); tensors() -> what is stored; to(device);
quantize(...) from a float weight.

  fp16 / bf16   FloatWeight   the weight in that dtype
  fp8           FP8Weight     float8_e4m3fn [out, in] + fp32 scale, per tensor [] or per channel [out, 1]
  int8          Int8Weight    int8 [out, in] + fp32 per-channel scale [out, 1], symmetric (-127..127)
  int4 (gptq)   GPTQWeight    lib/quant/gptq.py (2/3/4/8 bits)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from lib.quant.gptq import GPTQWeight, quantize_gptq, quantize_rtn, unpacked_shape

PRECISIONS = ("fp16", "bf16", "fp8", "int8", "int4")
FP8_MAX = float(torch.finfo(torch.float8_e4m3fn).max)  # 448


@dataclass
class FloatWeight:
    weight: torch.Tensor

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.weight.shape)

    def dequantize(self, dtype=torch.float32) -> torch.Tensor:
        return self.weight.to(dtype)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"weight": self.weight}

    def to(self, device) -> FloatWeight:
        return FloatWeight(self.weight.to(device))


@dataclass
class _ScaledWeight:
    """An integer/fp8 weight [out, in] times a float32 scale (fp8 and int8 differ only in dtype and scale shape)."""
    weight: torch.Tensor
    scale: torch.Tensor

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.weight.shape)

    def dequantize(self, dtype=torch.float32) -> torch.Tensor:
        return (self.weight.to(torch.float32) * self.scale).to(dtype)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"weight": self.weight, "weight_scale": self.scale}

    def to(self, device):
        return type(self)(self.weight.to(device), self.scale.to(device))


class FP8Weight(_ScaledWeight):
    """weight float8_e4m3fn [out, in]; scale float32 [] (per tensor) or [out, 1] (per channel)."""

    @property
    def per_channel(self) -> bool:
        return self.scale.dim() == 2


class Int8Weight(_ScaledWeight):
    """weight int8 [out, in]; scale float32 [out, 1]."""


def _absmax_scale(w: torch.Tensor, qmax: float, per_channel: bool) -> torch.Tensor:
    amax = w.abs().amax(dim=1, keepdim=True) if per_channel else w.abs().amax()
    return torch.clamp(amax, min=1e-12) / qmax


def quantize_fp8(weight: torch.Tensor, per_channel: bool = False) -> FP8Weight:
    """Also quantizes activations (per tensor) for the fp8 matmul; per channel = per row of a 2-D tensor."""
    w = weight.detach().to(torch.float32)
    scale = _absmax_scale(w, FP8_MAX, per_channel)
    return FP8Weight((w / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scale)


def quantize_int8(weight: torch.Tensor) -> Int8Weight:
    """Symmetric, one scale per row (per output channel of a weight, per token of an activation)."""
    w = weight.detach().to(torch.float32)
    scale = _absmax_scale(w, 127.0, per_channel=True)
    return Int8Weight(torch.round(w / scale).clamp(-127, 127).to(torch.int8), scale)


@dataclass(frozen=True)
class QuantOptions:
    """How quantize_weight makes each format (also the metadata saved next to a source)."""
    fp8_per_channel: bool = True
    int4_bits: int = 4
    int4_group_size: int = 128
    int4_zero_format: str = "v1"
    int4_act_order: bool = False
    int4_symmetric: bool = False  # zero fixed at 2**(bits-1) (what most GPU int4 kernels want)
    int4_method: str = "rtn"  # rtn | gptq (needs a Hessian from calibration inputs)


def quantize_weight(weight: torch.Tensor, precision: str, opts: QuantOptions = QuantOptions(),
                    hessian: torch.Tensor | None = None):
    if precision == "fp16":
        return FloatWeight(weight.detach().to(torch.float16))
    if precision == "bf16":
        return FloatWeight(weight.detach().to(torch.bfloat16))
    if precision == "fp8":
        return quantize_fp8(weight, opts.fp8_per_channel)
    if precision == "int8":
        return quantize_int8(weight)
    if precision == "int4":
        kw = dict(bits=opts.int4_bits, group_size=opts.int4_group_size, zero_format=opts.int4_zero_format,
                  symmetric=opts.int4_symmetric)
        if opts.int4_method == "gptq":
            if hessian is None:
                raise ValueError("GPTQ quantization needs calibration inputs (a Hessian)")
            return quantize_gptq(weight, hessian, act_order=opts.int4_act_order, **kw)
        order = None
        if opts.int4_act_order:  # without calibration data, rank input rows by weight magnitude
            order = torch.argsort(weight.detach().float().abs().sum(dim=0), descending=True)
        return quantize_rtn(weight, act_order=order, **kw)
    raise ValueError(f"unknown precision {precision!r}: expected one of {', '.join(PRECISIONS)}")


def format_from_tensors(precision: str, tensors: dict[str, torch.Tensor], meta: dict):
    """Rebuild a format object from the tensors of one weight in a per-precision source."""
    if precision in ("fp16", "bf16"):
        return FloatWeight(tensors["weight"])
    if precision == "fp8":
        return FP8Weight(tensors["weight"], tensors["weight_scale"])
    if precision == "int8":
        return Int8Weight(tensors["weight"], tensors["weight_scale"])
    if precision == "int4":
        return GPTQWeight(tensors["qweight"], tensors["qzeros"], tensors["scales"], tensors["g_idx"],
                          bits=int(meta.get("bits", 4)), group_size=int(meta.get("group_size", 128)),
                          zero_format="v2" if meta.get("checkpoint_format") == "gptq_v2" else "v1")
    raise ValueError(f"unknown precision {precision!r}")


def tensor_names(precision: str) -> tuple[str, ...]:
    if precision in ("fp16", "bf16"):
        return ("weight",)
    if precision in ("fp8", "int8"):
        return ("weight", "weight_scale")
    return ("qweight", "qzeros", "scales", "g_idx")


def weight_shape(precision: str, tensor_shapes: dict[str, tuple[int, ...]], bits: int) -> tuple[int, ...]:
    """The [out, in] shape of the weight whose stored tensors (tensor_names(precision)) have these shapes, as
    format_from_tensors would rebuild it: read from a source's headers before any tensor is loaded."""
    if precision == "int4":
        return unpacked_shape(tensor_shapes["qweight"], bits)
    return tuple(tensor_shapes["weight"])
