"""Export a mixed-precision model as a compressed-tensors checkpoint (what vLLM and SGLang load natively).

Layers with the same scheme form one config group whose targets are their module names:
  int4 (GPTQ)  W{bits}A16, format pack-quantized: weight_packed int32 [out, in/pack], weight_scale [out, groups],
               weight_zero_point (packed along out) when asymmetric, weight_g_idx with act-order, weight_shape
  int8         W8A8 (int-quantized, dynamic per-token int8 activations) or W8A16 (pack-quantized) per int8_scheme
  fp8          FP8 weights (float-quantized), scale per tensor or per channel; activations stay float (W8A16)
               or, with fp8_scheme="w8a8", dynamic per-token fp8
  fp16 / bf16  listed in `ignore`, weight kept in its dtype
Embeddings, norms and the head are written in the base model's dtype.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from torch import nn

from lib.errors import UsageError
from lib.files import write_json
from lib.quant.formats import FloatWeight, FP8Weight, Int8Weight
from lib.quant.gptq import GPTQWeight
from lib.quant.linear import MixedPrecisionLinear


def _quant_args(bits, strategy, kind="int", group_size=None, symmetric=True, actorder=None, dynamic=False):
    """One compressed-tensors QuantizationArgs (weights, or with dynamic=True per-token activations)."""
    args = {"num_bits": bits, "type": kind, "symmetric": symmetric, "strategy": strategy, "dynamic": dynamic}
    if group_size:
        args["group_size"] = group_size
    if actorder:
        args["actorder"] = actorder
    return args


def _gptq_tensors(fmt: GPTQWeight, prefix: str):
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
    if fmt.bits not in (4, 8):
        raise UsageError(f"{prefix}: the compressed-tensors export supports 4- and 8-bit GPTQ, not {fmt.bits}-bit")
    offset = 1 << (fmt.bits - 1)
    q = (fmt.int_weight().t() - offset).to(torch.int8)               # signed, [out, in]
    zeros = (fmt.zeros().t() - offset).to(torch.int8)                 # signed, [out, groups]
    natural = torch.arange(fmt.in_features) // (fmt.in_features if fmt.group_size == -1 else fmt.group_size)
    act_order = not torch.equal(fmt.g_idx.long().cpu(), natural)
    strategy = "channel" if fmt.group_size == -1 else "group"
    symmetric = bool((zeros == 0).all())
    tensors = {"weight_packed": pack_to_int32(q, fmt.bits), "weight_scale": fmt.scales.t().contiguous(),
               "weight_shape": torch.tensor([fmt.out_features, fmt.in_features], dtype=torch.int64)}
    if not symmetric:
        tensors["weight_zero_point"] = pack_to_int32(zeros, fmt.bits, packed_dim=0).contiguous()
    if act_order:
        tensors["weight_g_idx"] = fmt.g_idx.to(torch.int32)
    scheme = {"weights": _quant_args(fmt.bits, strategy, "int", None if strategy == "channel" else fmt.group_size,
                                     symmetric, "group" if act_order else None),
              "format": "pack-quantized"}
    return tensors, scheme


def _int8_tensors(fmt: Int8Weight, int8_scheme: str):
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
    if int8_scheme == "w8a16":
        tensors = {"weight_packed": pack_to_int32(fmt.weight, 8), "weight_scale": fmt.scale.to(torch.float16),
                   "weight_shape": torch.tensor(list(fmt.weight.shape), dtype=torch.int64)}
        return tensors, {"weights": _quant_args(8, "channel"), "format": "pack-quantized"}
    tensors = {"weight": fmt.weight, "weight_scale": fmt.scale.to(torch.float32)}
    return tensors, {"weights": _quant_args(8, "channel"), "input_activations": _quant_args(8, "token", dynamic=True),
                     "format": "int-quantized"}


def _fp8_tensors(fmt: FP8Weight, fp8_scheme: str):
    strategy = "channel" if fmt.per_channel else "tensor"
    scale = fmt.scale.reshape(-1, 1) if fmt.per_channel else fmt.scale.reshape(1)
    scheme = {"weights": _quant_args(8, strategy, "float"), "format": "float-quantized"}
    if fp8_scheme == "w8a8":
        scheme["input_activations"] = _quant_args(8, "token", "float", dynamic=True)
    return {"weight": fmt.weight, "weight_scale": scale.to(torch.float32)}, scheme


def export_compressed_tensors(model: nn.Module, out: str | Path, tokenizer_dir: str | Path | None = None,
                              int8_scheme: str = "w8a8", fp8_scheme: str = "w8a16") -> dict:
    """Write config.json (+ quantization_config), model.safetensors and the tokenizer; returns the config."""
    from compressed_tensors.quantization import QuantizationConfig
    from safetensors.torch import save_file
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    groups: dict[str, dict] = {}  # scheme json -> {"scheme", "targets"}
    ignore = []
    handled = set()
    for name, module in model.named_modules():
        if not isinstance(module, MixedPrecisionLinear):
            continue
        handled.update(f"{name}.{n}" for n, _ in module.named_buffers())
        fmt = module.fmt
        if isinstance(fmt, FloatWeight):
            ignore.append(name)
            layer_tensors, scheme = {"weight": fmt.weight}, None
        elif isinstance(fmt, GPTQWeight):
            layer_tensors, scheme = _gptq_tensors(fmt, name)
        elif isinstance(fmt, Int8Weight):
            layer_tensors, scheme = _int8_tensors(fmt, int8_scheme)
        else:
            layer_tensors, scheme = _fp8_tensors(fmt, fp8_scheme)
        tensors.update({f"{name}.{k}": v.detach().cpu().contiguous() for k, v in layer_tensors.items()})
        if module.bias is not None:
            tensors[f"{name}.bias"] = module.bias.detach().cpu().contiguous()
            handled.add(f"{name}.bias")
        if scheme is not None:
            group = groups.setdefault(json.dumps(scheme, sort_keys=True), {"scheme": scheme, "targets": []})
            group["targets"].append(name)
    for name, t in model.state_dict().items():
        if name not in handled and not name.endswith("inv_freq"):
            tensors[name] = t.detach().cpu().contiguous()
    head = model.get_output_embeddings()
    if head is not None and not isinstance(head, MixedPrecisionLinear):
        ignore.append("lm_head")
    config_groups = {f"group_{i}": {"targets": g["targets"], **g["scheme"]} for i, g in enumerate(groups.values())}
    formats = {g["scheme"]["format"] for g in groups.values()}
    qcfg = QuantizationConfig.model_validate({
        "config_groups": config_groups, "quant_method": "compressed-tensors",
        "format": formats.pop() if len(formats) == 1 else "mixed-precision",
        "quantization_status": "compressed", "ignore": ignore})
    qdict = qcfg.model_dump(mode="json", exclude_none=True)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    model.config.save_pretrained(str(out))
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"] = qdict
    write_json(out / "config.json", config)
    if tokenizer_dir:
        for f in Path(tokenizer_dir).iterdir():
            if f.name.startswith(("tokenizer", "special_tokens", "chat_template", "generation_config")):
                shutil.copy(f, out / f.name)
    return qdict
