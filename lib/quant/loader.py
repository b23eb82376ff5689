"""Mixed-precision config (YAML), per-precision weight sources (safetensors), and the model loader.

Config shape (configs/mixed_precision_config.yaml):
  mixed_precision:
    base_path: ""          # HF model folder (config, tokenizer, weights not mapped); "" = the engine's target
    fp16_path / bf16_path / fp8_path / int8_path / int4_path: folders of safetensors sources per precision
                           # all empty = quantize the base model at load time (cached for the tiny target)
    default: fp16          # precision of every Linear weight neither mapped nor matched by a pattern
    patterns: {regex: precision}        # full-match on the weight name; two patterns that disagree = error
    weight_mapping: {weight name: precision}   # wins over patterns; a name listed twice = error
    int4: {bits: 4, group_size: 128, checkpoint_format: gptq, desc_act: false, sym: false, method: rtn}
    fp8: {per_channel: true}
    cache_dequantized: false
Relative paths are relative to the config file's folder.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import torch
from pydantic import AfterValidator, Field
from torch import nn

from lib.config_models import Accepts, ConfigModel, choice, read_config
from lib.errors import UsageError
from lib.files import write_json
from lib.log import get_logger
from lib.quant.formats import PRECISIONS, QuantOptions, format_from_tensors, quantize_weight, tensor_names
from lib.quant.gptq import SUPPORTED_BITS
from lib.quant.linear import MixedPrecisionLinear

SOURCE_META = "quant_meta.json"
logger = get_logger(__name__)


def _regex(text: str) -> str:
    try:
        re.compile(text)
    except re.error as exc:
        raise ValueError(f"not a valid regex ({exc})") from None
    return text


def _group_size(size: int) -> int:
    if size != -1 and size < 1:
        raise ValueError(f"{size} is not a group size")
    return size


Precision = choice("precision", PRECISIONS)
Regex = Annotated[str, AfterValidator(_regex), Accepts("a regular expression (full match on the weight name)")]


class Int4Section(ConfigModel):
    bits: choice("bit width", SUPPORTED_BITS) = 4
    group_size: Annotated[int, AfterValidator(_group_size),
                          Accepts("a whole number >= 1, or -1 (one group over the whole input)")] = 128
    checkpoint_format: choice("checkpoint format", ("gptq", "gptq_v2")) = "gptq"
    desc_act: bool = False
    sym: bool = False
    method: choice("method", ("rtn", "gptq")) = "rtn"


class Fp8Section(ConfigModel):
    per_channel: bool = True


class MixedPrecisionSection(ConfigModel):
    base_path: str = ""
    fp16_path: str = ""
    bf16_path: str = ""
    fp8_path: str = ""
    int8_path: str = ""
    int4_path: str = ""
    default: Precision = "fp16"
    patterns: dict[Regex, Precision] = Field(default_factory=dict)
    weight_mapping: Annotated[dict[str, Precision], Accepts(f"a mapping of weight name to precision "
                                                            f"({', '.join(PRECISIONS)})")] = Field(default_factory=dict)
    int4: Int4Section = Field(default_factory=Int4Section)
    fp8: Fp8Section = Field(default_factory=Fp8Section)
    cache_dequantized: bool = False


class MixedPrecisionFile(ConfigModel):
    retired = {
        "inference": "set DTYPE, BATCH_SIZE and MAX_BATCH_LENGTH of the benchmark (./run_benchmark.sh --help) or "
                     "--dtype and --device of run_mixed_precision.py instead",
        "server": "the benchmark and run_mixed_precision.py load the model in-process; remove the section",
    }
    mixed_precision: MixedPrecisionSection


@dataclass
class MixedPrecisionConfig:
    source: str
    base_path: str = ""
    paths: dict[str, str] = field(default_factory=dict)
    default: str = "fp16"
    patterns: dict[str, str] = field(default_factory=dict)
    weight_mapping: dict[str, str] = field(default_factory=dict)
    options: QuantOptions = QuantOptions()
    cache_dequantized: bool = False

    def precision_of(self, name: str) -> str:
        if name in self.weight_mapping:
            return self.weight_mapping[name]
        hits = {(p, prec) for p, prec in self.patterns.items() if re.fullmatch(p, name)}
        if len({prec for _, prec in hits}) > 1:
            listed = ", ".join(f"{p!r} -> {prec}" for p, prec in sorted(hits))
            raise UsageError(f"{self.source}: mixed_precision.patterns: {name} is mapped twice ({listed})")
        return hits.pop()[1] if hits else self.default


def _options(int4: Int4Section, fp8: Fp8Section) -> QuantOptions:
    return QuantOptions(fp8_per_channel=fp8.per_channel, int4_bits=int4.bits, int4_group_size=int4.group_size,
                        int4_zero_format="v2" if int4.checkpoint_format == "gptq_v2" else "v1",
                        int4_act_order=int4.desc_act, int4_method=int4.method, int4_symmetric=int4.sym)


def load_config(path: str | Path) -> MixedPrecisionConfig:
    path = Path(path)
    src = str(path)
    mp = read_config(MixedPrecisionFile, path, src, "a mapping with a 'mixed_precision' section").mixed_precision
    here = path.resolve().parent

    def resolve_path(p: str) -> str:
        return "" if not p else str(p if Path(p).is_absolute() else here / p)

    paths = {prec: resolve_path(getattr(mp, f"{prec}_path")) for prec in PRECISIONS}
    return MixedPrecisionConfig(src, resolve_path(mp.base_path), paths, mp.default, dict(mp.patterns),
                                dict(mp.weight_mapping), _options(mp.int4, mp.fp8), mp.cache_dequantized)


# ------------------------------------------------------------------------------------------ sources

def linear_weight_names(model: nn.Module) -> dict[str, nn.Linear]:
    """Every weight whose precision the config chooses: the Linear layers of the decoder, by parameter name.
    The output head (like the embeddings and norms) keeps the base model's dtype."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return {f"{name}.weight": m for name, m in model.named_modules() if isinstance(m, nn.Linear) and m is not head}


def plan(cfg: MixedPrecisionConfig, model: nn.Module) -> dict[str, str]:
    """weight name -> precision for every Linear weight, after checking every mapped name exists."""
    linears = linear_weight_names(model)
    params = dict(model.named_parameters())
    for name in cfg.weight_mapping:
        if name not in linears:
            what = "is not a Linear weight (only Linear weights can change precision)" if name in params else \
                "is not a weight of this model"
            raise UsageError(f"{cfg.source}: mixed_precision.weight_mapping[{name!r}]: {what}")
    return {name: cfg.precision_of(name) for name in linears}


def write_sources(model: nn.Module, out: Path, opts: QuantOptions | None = None,
                  hessians: dict[str, torch.Tensor] | None = None, precisions=PRECISIONS,
                  names: list[str] | None = None) -> dict[str, Path]:
    """Quantize every Linear weight of `model` into one safetensors source folder per precision."""
    opts = opts or QuantOptions()
    from safetensors.torch import save_file
    linears = linear_weight_names(model)
    names = names or list(linears)
    folders = {}
    for prec in precisions:
        tensors = {}
        for name in names:
            prefix = name[: -len("weight")]
            h = (hessians or {}).get(name)
            fmt = quantize_weight(linears[name].weight, prec, opts, h)
            tensors.update({prefix + k: v.contiguous() for k, v in fmt.tensors().items()})
        folder = out / prec
        folder.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(folder / "model.safetensors"))
        meta = {"precision": prec}
        if prec == "int4":
            meta.update(bits=opts.int4_bits, group_size=opts.int4_group_size, desc_act=opts.int4_act_order,
                        checkpoint_format="gptq_v2" if opts.int4_zero_format == "v2" else "gptq",
                        method=opts.int4_method, sym=opts.int4_symmetric)
        if prec == "fp8":
            meta.update(per_channel=opts.fp8_per_channel)
        write_json(folder / SOURCE_META, meta)
        folders[prec] = folder
        logger.info(f"  wrote {prec} source: {len(names)} weights")
    return folders


class SourceReader:
    """Lazy access to the tensors of one per-precision source folder."""

    def __init__(self, precision: str, folder: str, cfg_source: str):
        from safetensors import safe_open
        self.precision, self.folder = precision, Path(folder)
        files = sorted(self.folder.glob("*.safetensors")) if self.folder.is_dir() else []
        if not files:
            raise UsageError(f"{cfg_source}: mixed_precision.{precision}_path: {folder} has no .safetensors files")
        self.handles = [safe_open(str(f), framework="pt") for f in files]
        self.index = {k: h for h in self.handles for k in h.keys()}
        meta_file = self.folder / SOURCE_META
        if not meta_file.exists():
            meta_file = self.folder / "quantize_config.json"  # GPTQ checkpoints name it so
        self.meta = json.loads(meta_file.read_text()) if meta_file.exists() else {}
        self.cfg_source = cfg_source

    def read(self, weight_name: str):
        prefix = weight_name[: -len("weight")]
        missing = [prefix + t for t in tensor_names(self.precision) if prefix + t not in self.index]
        if missing:
            raise UsageError(f"{self.cfg_source}: mixed_precision.weight_mapping[{weight_name!r}]: "
                             f"{self.precision} source {self.folder} lacks {missing[0]}")
        tensors = {t: self.index[prefix + t].get_tensor(prefix + t) for t in tensor_names(self.precision)}
        try:
            return format_from_tensors(self.precision, tensors, self.meta)
        except ValueError as exc:
            raise UsageError(f"{self.cfg_source}: mixed_precision.weight_mapping[{weight_name!r}]: "
                             f"{self.precision} source {self.folder}: {exc}") from None


def tiny_sources(opts: QuantOptions) -> Path:
    """Per-precision sources of the tiny target, built once and cached (round-to-nearest unless opts say gptq)."""
    import hashlib
    from dataclasses import asdict

    from lib.models import cached_build, ensure_tiny_models, load_model
    tiny = ensure_tiny_models()
    key = hashlib.sha256(json.dumps({"tiny": tiny.root.name, "opts": asdict(opts), "v": 2},
                                    sort_keys=True).encode()).hexdigest()[:16]

    def build(out: Path):
        model = load_model(tiny.target, "float32", "cpu")
        hessians = calibration_hessians(model, tiny.tokenizer) if opts.int4_method == "gptq" else None
        logger.info("Quantizing the tiny target into per-precision sources (one time, cached) ...")
        write_sources(model, out, opts, hessians)

    return cached_build("tiny-mixed-sources", key, build)


def calibration_hessians(model: nn.Module, tokenizer_path, num_docs: int = 64, seq_len: int = 128) -> dict:
    """Hessians (2/n X^T X) of every Linear's inputs on a small slice of the shipped corpus."""
    from lib.corpus import generate_corpus
    from lib.models import load_tokenizer
    from lib.quant.gptq import hessian_from_inputs
    tok = load_tokenizer(tokenizer_path)
    docs = generate_corpus(7, num_docs)
    inputs: dict[str, list] = {}
    hooks = [m.register_forward_hook(lambda mod, args, out, n=name: inputs.setdefault(n, []).append(
        args[0].detach().reshape(-1, args[0].shape[-1]))) for name, m in linear_weight_names(model).items()]
    try:
        with torch.no_grad():
            for doc in docs:
                ids = tok(doc, return_tensors="pt").input_ids[:, :seq_len]
                model(input_ids=ids)
    finally:
        for h in hooks:
            h.remove()
    return {n: hessian_from_inputs(torch.cat(xs)) for n, xs in inputs.items()}


# ------------------------------------------------------------------------------------------ loading

def _set_module(model: nn.Module, name: str, new: nn.Module):
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def apply_mixed_precision(model: nn.Module, cfg: MixedPrecisionConfig, sources: dict[str, str],
                          device: str = "cpu") -> dict[str, str]:
    """Replace each Linear of `model` by a MixedPrecisionLinear read from its precision's source."""
    assignment = plan(cfg, model)
    linears = linear_weight_names(model)
    readers: dict[str, SourceReader] = {}
    for name, prec in assignment.items():
        if prec not in readers:
            if not sources.get(prec):
                count = sum(1 for p in assignment.values() if p == prec)
                raise UsageError(f"{cfg.source}: mixed_precision.{prec}_path: missing, but {count} weights "
                                 f"are mapped to {prec}")
            readers[prec] = SourceReader(prec, sources[prec], cfg.source)
        fmt = readers[prec].read(name)
        layer = linears[name]
        shape, expected = list(fmt.shape), list(layer.weight.shape)
        if shape != expected:
            raise UsageError(f"{cfg.source}: mixed_precision.weight_mapping[{name!r}]: {prec} source "
                             f"{sources[prec]} has shape {shape}, the model expects {expected}")
        new = MixedPrecisionLinear(fmt.to(device), prec, layer.bias, cfg.cache_dequantized)
        _set_module(model, name[: -len(".weight")], new)
    return assignment


def check_placement(model: nn.Module, device: str, dtype: torch.dtype) -> list[str]:
    """Every parameter and buffer on `device`; float tensors outside MixedPrecisionLinear storage in `dtype`."""
    want = torch.device(device)
    storage = {id(b) for m in model.modules() if isinstance(m, MixedPrecisionLinear) for b in m.buffers()}
    problems = []
    for kind, items in (("parameter", model.named_parameters()), ("buffer", model.named_buffers())):
        for name, t in items:
            if t.device.type != want.type or (want.index is not None and t.device.index != want.index):
                problems.append(f"{kind} {name} is on {t.device}, expected {want}")
            elif (t.is_floating_point() and id(t) not in storage and t.dtype != dtype
                  and not name.endswith("inv_freq")):
                problems.append(f"{kind} {name} is {t.dtype}, expected {dtype}")
    return problems


def load_mixed_model(config_path: str | Path, base_path: str | Path | None = None, device: str = "cpu",
                     dtype: str = "float32"):
    """Load the base HF model, swap in the mixed-precision layers, check placement; returns (model, cfg, plan)."""
    from lib.models import check_model_dir, ensure_tiny_models, load_model
    cfg = load_config(config_path)
    base = cfg.base_path or (str(base_path) if base_path else "")
    tiny = None
    if not base:
        tiny = ensure_tiny_models()
        base = str(tiny.target)
    base_dir = check_model_dir(base, "mixed_precision.base_path", tokenizer=True)
    model = load_model(base_dir, dtype, "cpu")
    sources = dict(cfg.paths)
    if not any(sources.values()):
        tiny = tiny or ensure_tiny_models()
        if base_dir.resolve() == Path(tiny.target).resolve():
            root = tiny_sources(cfg.options)
        else:
            root = _quantize_on_the_fly(model, cfg)
        sources = {p: str(root / p) for p in PRECISIONS}
    assignment = apply_mixed_precision(model, cfg, sources, "cpu")
    model.to(device)
    problems = check_placement(model, device, getattr(torch, dtype))
    if problems:
        raise UsageError(f"{cfg.source}: after loading, {len(problems)} tensors are misplaced: {problems[0]}")
    model.eval()
    return model, cfg, assignment


def _quantize_on_the_fly(model, cfg) -> Path:
    import tempfile
    out = Path(tempfile.mkdtemp(prefix="speclab-mixed-"))
    needed = sorted(set(plan(cfg, model).values()))
    logger.info(f"No source paths in {cfg.source}: quantizing the base model to {', '.join(needed)} in {out}")
    write_sources(model, out, cfg.options, precisions=needed)
    return out
