"""GPTQ weights in vLLM's layout: pack/unpack, dequantize, round-to-nearest and GPTQ quantizers.

Layout (weight W is [out, in]; everything below is indexed by input row i and output column o):
  qweight int32 [in * bits / 32, out]    packed along the input dimension, LSB first
  qzeros  int32 [groups, out * bits / 32] packed along the output dimension, LSB first
  scales  fp16  [groups, out]
  g_idx   int32 [in]                      group of input row i (i // group_size, or permuted with act-order)
  W[o, i] = (q[i, o] - zero[g_idx[i], o]) * scales[g_idx[i], o]
"v1" checkpoints ("gptq") store zero - 1 in qzeros; "v2" ("gptq_v2") store the true zero.
Packing is one continuous little-endian bit stream, so 3-bit weights (32 values in 3 words) use the same code.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

SUPPORTED_BITS = (2, 3, 4, 8)
ZERO_FORMATS = ("v1", "v2")


def pack_bits(values: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Pack unsigned integers (< 2**bits) along `dim` into int32 words, LSB first."""
    v = values.movedim(dim, 0).to(torch.int64)
    n = v.shape[0]
    if (n * bits) % 32:
        raise ValueError(f"cannot pack {n} values of {bits} bits into whole int32 words")
    shifts = torch.arange(bits, dtype=torch.int64, device=v.device)
    stream = ((v.unsqueeze(1) >> shifts.view(1, -1, *[1] * (v.dim() - 1))) & 1).reshape(n * bits, *v.shape[1:])
    words = stream.reshape(n * bits // 32, 32, *v.shape[1:])
    weights = torch.ones(32, dtype=torch.int64, device=v.device) << torch.arange(32, device=v.device)
    weights = weights.view(1, 32, *[1] * (v.dim() - 1))
    packed = (words * weights).sum(dim=1)
    packed = torch.where(packed >= 2**31, packed - 2**32, packed)  # reinterpret as signed int32
    return packed.to(torch.int32).movedim(0, dim).contiguous()


def unpack_bits(packed: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Inverse of pack_bits: int32 words -> unsigned integers (int32) along `dim`."""
    w = packed.movedim(dim, 0).to(torch.int64) & 0xFFFFFFFF
    if 32 % bits == 0:  # whole values per word (2/4/8 bits): one shift per value instead of per bit
        per_word = 32 // bits
        shifts = torch.arange(per_word, dtype=torch.int64, device=w.device) * bits
        shifts = shifts.view(1, per_word, *[1] * (w.dim() - 1))
        values = (w.unsqueeze(1) >> shifts) & ((1 << bits) - 1)
        return values.reshape(w.shape[0] * per_word, *w.shape[1:]).to(torch.int32).movedim(0, dim).contiguous()
    stream = (w.unsqueeze(1) >> torch.arange(32, device=w.device).view(1, 32, *[1] * (w.dim() - 1))) & 1
    stream = stream.reshape(w.shape[0] * 32, *w.shape[1:])
    n = stream.shape[0] // bits
    chunks = stream[: n * bits].reshape(n, bits, *w.shape[1:])
    weights = torch.ones(bits, dtype=torch.int64, device=w.device) << torch.arange(bits, device=w.device)
    weights = weights.view(1, bits, *[1] * (w.dim() - 1))
    return (chunks * weights).sum(dim=1).to(torch.int32).movedim(0, dim).contiguous()


def unpacked_shape(qweight_shape, bits: int) -> tuple[int, int]:
    """(out, in) of the weight that a qweight of this shape ([in * bits / 32, out]) packs."""
    if len(qweight_shape) != 2:
        raise ValueError(f"qweight has shape {list(qweight_shape)}; expected [in * bits / 32, out]")
    rows, out = qweight_shape
    return out, rows * 32 // bits


@dataclass
class GPTQWeight:
    qweight: torch.Tensor
    qzeros: torch.Tensor
    scales: torch.Tensor
    g_idx: torch.Tensor
    bits: int = 4
    group_size: int = 128  # -1 = one group over the whole input
    zero_format: str = "v1"

    def __post_init__(self):
        if self.bits not in SUPPORTED_BITS:
            raise ValueError(f"GPTQ bits={self.bits}: expected one of {SUPPORTED_BITS}")
        if self.zero_format not in ZERO_FORMATS:
            raise ValueError(f"GPTQ zero format {self.zero_format!r}: expected v1 or v2")
        out, in_features = self.shape
        groups = self.scales.shape[0]
        problems = []
        if self.scales.shape[1] != out:
            problems.append(f"scales {list(self.scales.shape)} has {self.scales.shape[1]} columns, qweight has {out}")
        if self.qzeros.shape != (groups, out * self.bits // 32):
            problems.append(f"qzeros {list(self.qzeros.shape)} should be [{groups}, {out * self.bits // 32}] "
                            f"(output {out} packed {self.bits}-bit)")
        if self.g_idx.shape != (in_features,):
            problems.append(f"g_idx {list(self.g_idx.shape)} should be [{in_features}]")
        elif self.g_idx.numel() and (int(self.g_idx.min()) < 0 or int(self.g_idx.max()) >= groups):
            problems.append(f"g_idx values must lie in [0, {groups})")
        if problems:
            raise ValueError("inconsistent GPTQ tensors: " + "; ".join(problems))

    @property
    def in_features(self) -> int:
        return self.shape[1]

    @property
    def out_features(self) -> int:
        return self.shape[0]

    @property
    def shape(self) -> tuple[int, int]:
        return unpacked_shape(self.qweight.shape, self.bits)

    def int_weight(self) -> torch.Tensor:
        """Unsigned quantized values q[i, o], int32 [in, out]."""
        return unpack_bits(self.qweight, self.bits, dim=0)

    def zeros(self) -> torch.Tensor:
        """True zero points, int32 [groups, out] (v1 adds back the 1 it subtracted)."""
        z = unpack_bits(self.qzeros, self.bits, dim=1)
        if self.zero_format == "v1":
            z = (z + 1) & ((1 << self.bits) - 1)
        return z

    def dequantize(self, dtype=torch.float32) -> torch.Tensor:
        """Float weight [out, in]; correct for any group size because it goes through g_idx."""
        g = self.g_idx.long()
        q = self.int_weight().to(torch.float32)
        w = (q - self.zeros()[g].to(torch.float32)) * self.scales[g].to(torch.float32)
        return w.t().contiguous().to(dtype)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"qweight": self.qweight, "qzeros": self.qzeros, "scales": self.scales, "g_idx": self.g_idx}

    def to(self, device) -> GPTQWeight:
        moved = {k: v.to(device) for k, v in self.tensors().items()}
        return GPTQWeight(**moved, bits=self.bits, group_size=self.group_size, zero_format=self.zero_format)


def _group_params(w: torch.Tensor, bits: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and integer zero per output row of w [out, cols] (GPTQ's min/max quantizer)."""
    maxq = (1 << bits) - 1
    lo = torch.minimum(w.min(dim=1).values, torch.zeros(()))
    hi = torch.maximum(w.max(dim=1).values, torch.zeros(()))
    if symmetric:
        hi = torch.maximum(lo.abs(), hi)
        lo = -hi
    scale = (hi - lo) / maxq
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    # scales are stored in fp16: round up to the next fp16 so the group's range still fits in [0, maxq]
    s16 = scale.to(torch.float16)
    scale = torch.where(s16.float() < scale, torch.nextafter(s16, torch.tensor(float("inf"), dtype=torch.float16)),
                        s16).float()
    zero = torch.full_like(scale, (maxq + 1) // 2) if symmetric else torch.round(-lo / scale)
    return scale, zero


def _order_and_groups(in_features: int, group_size: int, order: torch.Tensor | None):
    """g_idx for each input row: groups follow `order` (act-order) or the natural order."""
    size = in_features if group_size == -1 else group_size
    if in_features % size:
        raise ValueError(f"group size {group_size} does not divide the input size {in_features}")
    perm = order if order is not None else torch.arange(in_features)
    g_idx = torch.empty(in_features, dtype=torch.int32)
    g_idx[perm] = (torch.arange(in_features) // size).to(torch.int32)
    return perm, g_idx, in_features // size, size


def _pack(q_in_out, zeros, scales, g_idx, bits, group_size, zero_format) -> GPTQWeight:
    stored_zeros = zeros.to(torch.int32)
    if zero_format == "v1":
        stored_zeros = (stored_zeros - 1) & ((1 << bits) - 1)
    return GPTQWeight(qweight=pack_bits(q_in_out.to(torch.int32), bits, dim=0),
                      qzeros=pack_bits(stored_zeros, bits, dim=1),
                      scales=scales.to(torch.float16), g_idx=g_idx, bits=bits, group_size=group_size,
                      zero_format=zero_format)


def quantize_rtn(weight: torch.Tensor, bits: int = 4, group_size: int = 128, zero_format: str = "v1",
                 act_order: torch.Tensor | None = None, symmetric: bool = False) -> GPTQWeight:
    """Round-to-nearest GPTQ-format quantization of a float weight [out, in].

    act_order: optional permutation of the input rows (most important first); groups follow it.
    """
    w = weight.detach().to(torch.float32).cpu()
    out_f, in_f = w.shape
    perm, g_idx, groups, size = _order_and_groups(in_f, group_size, act_order)
    scales = torch.empty(groups, out_f)
    zeros = torch.empty(groups, out_f)
    for g in range(groups):
        cols = perm[g * size:(g + 1) * size]
        scales[g], zeros[g] = _group_params(w[:, cols], bits, symmetric)
    gi = g_idx.long()
    q = torch.clamp(torch.round(w / scales[gi].t()) + zeros[gi].t(), 0, (1 << bits) - 1)
    return _pack(q.t(), zeros, scales, g_idx, bits, group_size, zero_format)


def quantize_gptq(weight: torch.Tensor, hessian: torch.Tensor, bits: int = 4, group_size: int = 128,
                  zero_format: str = "v1", act_order: bool = False, symmetric: bool = False,
                  damp: float = 0.01, block_size: int = 128) -> GPTQWeight:
    """GPTQ (Frantar et al. 2022): quantize column by column and push each error onto the columns not yet done.

    hessian: 2/n * X^T X of the layer inputs X [n, in] (see hessian_from_inputs).
    """
    w = weight.detach().to(torch.float32).cpu().clone()
    h = hessian.detach().to(torch.float32).cpu().clone()
    out_f, in_f = w.shape
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    order = torch.argsort(torch.diag(h), descending=True) if act_order else torch.arange(in_f)
    _, g_idx, groups, size = _order_and_groups(in_f, group_size, order)
    w = w[:, order]
    h = h[order][:, order]
    h += damp * torch.mean(torch.diag(h)) * torch.eye(in_f)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    maxq = (1 << bits) - 1
    q_perm = torch.zeros_like(w)
    scales = torch.empty(groups, out_f)
    zeros = torch.empty(groups, out_f)
    for b0 in range(0, in_f, block_size):
        b1 = min(b0 + block_size, in_f)
        wb = w[:, b0:b1].clone()
        err = torch.zeros_like(wb)
        hb = hinv[b0:b1, b0:b1]
        for j in range(b1 - b0):
            col = b0 + j
            g = col // size
            if col % size == 0:  # a new group starts: fit its scale/zero on the current (error-updated) weights
                upcoming = torch.cat([wb[:, j:j + size], w[:, b1:b1 + size]], dim=1)[:, :size]
                scales[g], zeros[g] = _group_params(upcoming, bits, symmetric)
            qc = torch.clamp(torch.round(wb[:, j] / scales[g]) + zeros[g], 0, maxq)
            q_perm[:, col] = qc
            deq = (qc - zeros[g]) * scales[g]
            e = (wb[:, j] - deq) / hb[j, j]
            wb[:, j:] -= e.unsqueeze(1) * hb[j, j:].unsqueeze(0)
            err[:, j] = e
        w[:, b1:] -= err @ hinv[b0:b1, b1:]
    q = torch.empty_like(q_perm)
    q[:, order] = q_perm
    return _pack(q.t(), zeros, scales, g_idx, bits, group_size, zero_format)


def hessian_from_inputs(inputs: torch.Tensor) -> torch.Tensor:
    x = inputs.reshape(-1, inputs.shape[-1]).to(torch.float32)
    return 2.0 / max(1, x.shape[0]) * x.t() @ x
