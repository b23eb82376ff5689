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
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import torch
from pydantic import AfterValidator, ConfigDict, Field
from torch import nn

from lib.config_models import Accepts, ConfigModel, choice, read_config, validate_model
from lib.errors import UsageError
from lib.files import read_text, write_json
from lib.log import get_logger
from lib.quant.formats import PRECISIONS, QuantOptions, format_from_tensors, quantize_weight, tensor_names, weight_shape
from lib.quant.gptq import SUPPORTED_BITS
from lib.quant.linear import MixedPrecisionLinear

SOURCE_META = "quant_meta.json"
GPTQ_META = "quantize_config.json"  # what GPTQ checkpoints name their metadata
GROUP_SIZE_ACCEPTS = "a whole number >= 1, or -1 (one group over the whole input)"
logger = get_logger(__name__)


def _regex(text: str) -> str:
    try:
        re.compile(text)
    except re.error as exc:
        raise ValueError(f"not a valid regex ({exc})") from None
    return text


def valid_group_size(size: int) -> int:
    """An int4 group size: the one check of the config's int4.group_size and run_mixed_precision.py --group-size
    (whether it fits the layers' widths is check_group_size's)."""
    if size != -1 and size < 1:
        raise ValueError(f"{size} is not a group size")
    return size


Precision = choice("precision", PRECISIONS)
Regex = Annotated[str, AfterValidator(_regex), Accepts("a regular expression (full match on the weight name)")]
Bits = choice("bit width", SUPPORTED_BITS)
GroupSize = Annotated[int, AfterValidator(valid_group_size), Accepts(GROUP_SIZE_ACCEPTS)]
CheckpointFormat = choice("checkpoint format", ("gptq", "gptq_v2"))


class Int4Section(ConfigModel):
    bits: Bits = 4
    group_size: GroupSize = 128
    checkpoint_format: CheckpointFormat = "gptq"
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


class SourceMeta(ConfigModel):
    """A source folder's quant_meta.json (written with it) or a GPTQ checkpoint's quantize_config.json: the keys the
    loader reads; the other keys are left to the tools that wrote them."""
    model_config = ConfigDict(extra="ignore")
    precision: Precision | None = None
    bits: Bits = 4
    group_size: GroupSize = 128
    checkpoint_format: CheckpointFormat = "gptq"


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

    @property
    def quantizes_at_load(self) -> bool:
        """No *_path given: the loader quantizes the base model with `options` (the int4 and fp8 sections)."""
        return not any(self.paths.values())

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
    """weight name -> precision for every Linear weight, after checking every mapped name exists and, when the
    loader quantizes, that the int4 group size fits every int4 layer."""
    linears = linear_weight_names(model)
    params = dict(model.named_parameters())
    for name in cfg.weight_mapping:
        if name not in linears:
            what = "is not a Linear weight (only Linear weights can change precision)" if name in params else \
                "is not a weight of this model"
            raise UsageError(f"{cfg.source}: mixed_precision.weight_mapping[{name!r}]: {what}")
    assignment = {name: cfg.precision_of(name) for name in linears}
    if cfg.quantizes_at_load:
        check_group_size(cfg.options.int4_group_size, {n: linears[n] for n, p in assignment.items() if p == "int4"},
                         f"{cfg.source}: mixed_precision.int4.group_size")
    return assignment


def check_group_size(group_size: int, linears: dict[str, nn.Linear], label: str) -> None:
    """int4 quantization cuts each layer's input width into groups of `group_size` (-1: one group, any width fits):
    every width must be a multiple of it, else one UsageError naming `label` (the config key or the flag)."""
    if group_size == -1 or not linears:
        return
    widths = {name: layer.in_features for name, layer in linears.items()}
    name = next((n for n, width in widths.items() if width % group_size), None)
    if name is not None:
        raise UsageError(f"{label}: {group_size} does not divide the input width {widths[name]} of {name}; accepted: "
                         f"-1, or a whole number >= 1 dividing every int4 layer's input width (here a divisor of "
                         f"{math.gcd(*widths.values())})")


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


def _open_safetensors(file: Path, label: str):
    """A safetensors file opened lazily: its header is parsed (a truncated or corrupt file fails here), no tensor
    is read."""
    from safetensors import SafetensorError, safe_open
    try:
        return safe_open(str(file), framework="pt")
    except (SafetensorError, OSError, ValueError) as exc:
        reason = str(exc).splitlines()[0][:120] if str(exc) else exc.__class__.__name__
        raise UsageError(f"{label}: {file.name} is not a complete safetensors file ({reason}); write the source "
                         "again") from None


def read_source_meta(folder: Path, precision: str, label: str) -> SourceMeta:
    """The folder's quant_meta.json, else its quantize_config.json, else the defaults; one UsageError naming `label`
    and the file when it is not JSON, has a wrong value or belongs to a source of another precision."""
    file = next((folder / name for name in (SOURCE_META, GPTQ_META) if (folder / name).exists()), None)
    if file is None:
        return SourceMeta()
    where = f"{label}: {file.name}"
    accepted = f"a JSON object with keys {', '.join(SourceMeta.model_fields)}"
    try:
        data = json.loads(read_text(file, where, accepted))
    except (ValueError, RecursionError) as exc:
        raise UsageError(f"{where}: not valid JSON ({exc}); expected {accepted}") from None
    meta = validate_model(SourceMeta, data, where)
    if meta.precision not in (None, precision):
        raise UsageError(f"{where}: precision: found {meta.precision!r}; accepted: {precision} (the precision of "
                         f"{precision}_path)")
    return meta


class SourceReader:
    """Lazy access to the tensors of one per-precision source folder. Opening it parses every safetensors header
    and the metadata, so a damaged folder is refused before any weight is read."""

    def __init__(self, precision: str, folder: str, cfg_source: str):
        self.precision, self.folder, self.cfg_source = precision, Path(folder), cfg_source
        label = f"{cfg_source}: mixed_precision.{precision}_path: {folder}"
        weights = sorted(self.folder.glob("*.safetensors")) if self.folder.is_dir() else []
        if not weights:
            raise UsageError(f"{label} has no .safetensors files")
        self.index = {k: h for h in (_open_safetensors(f, label) for f in weights) for k in h.keys()}
        self.meta = read_source_meta(self.folder, precision, label)

    def refused(self, weight_name: str, problem: str) -> UsageError:
        return UsageError(f"{self.cfg_source}: mixed_precision.weight_mapping[{weight_name!r}]: {self.precision} "
                          f"source {self.folder}{problem}")

    def check(self, weight_name: str, expected: list[int]):
        """The weight's tensors are all here and make a weight of the `expected` shape (headers only)."""
        prefix = weight_name[: -len("weight")]
        names = tensor_names(self.precision)
        missing = [prefix + t for t in names if prefix + t not in self.index]
        if missing:
            raise self.refused(weight_name, f" lacks {missing[0]}")
        shapes = {t: tuple(self.index[prefix + t].get_slice(prefix + t).get_shape()) for t in names}
        try:
            shape = list(weight_shape(self.precision, shapes, self.meta.bits))
        except ValueError as exc:
            raise self.refused(weight_name, f": {exc}") from None
        if shape != expected:
            raise self.refused(weight_name, f" has shape {shape}, the model expects {expected}")

    def read(self, weight_name: str):
        """The weight's format object (after check())."""
        prefix = weight_name[: -len("weight")]
        tensors = {t: self.index[prefix + t].get_tensor(prefix + t) for t in tensor_names(self.precision)}
        try:
            return format_from_tensors(self.precision, tensors, self.meta.model_dump())
        except ValueError as exc:
            raise self.refused(weight_name, f": {exc}") from None


def open_sources(cfg: MixedPrecisionConfig, sources: dict[str, str]) -> dict[str, SourceReader]:
    """A reader per source folder named (headers and metadata checked, no tensor read)."""
    return {prec: SourceReader(prec, folder, cfg.source) for prec, folder in sources.items() if folder}


def check_sources(cfg: MixedPrecisionConfig, linears: dict[str, nn.Linear], assignment: dict[str, str],
                  readers: dict[str, SourceReader]) -> None:
    """Every weight's precision has a source, holding the weight's tensors in its layer's shape (headers only)."""
    for name, prec in assignment.items():
        if prec not in readers:
            count = sum(1 for p in assignment.values() if p == prec)
            raise UsageError(f"{cfg.source}: mixed_precision.{prec}_path: missing, but {count} weights are mapped "
                             f"to {prec}")
        readers[prec].check(name, list(linears[name].weight.shape))


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
    """Replace each Linear of `model` by a MixedPrecisionLinear read from its precision's source, after checking
    every source before the first weight is read."""
    assignment = plan(cfg, model)
    linears = linear_weight_names(model)
    readers = open_sources(cfg, sources)
    check_sources(cfg, linears, assignment, readers)
    for name, prec in assignment.items():
        fmt = readers[prec].read(name)
        new = MixedPrecisionLinear(fmt.to(device), prec, linears[name].bias, cfg.cache_dequantized)
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


def base_model_dir(cfg: MixedPrecisionConfig, base_path: str | Path | None = None) -> Path:
    """The base HF model folder, checked: the config's base_path, else `base_path` (the engine's target), else the
    tiny target."""
    from lib.models import check_model_dir, ensure_tiny_models
    base = cfg.base_path or (str(base_path) if base_path else "") or str(ensure_tiny_models().target)
    return check_model_dir(base, "mixed_precision.base_path", tokenizer=True)


def model_skeleton(base_dir: Path) -> nn.Module:
    """The base model's modules, with their shapes, on the meta device: no weight is read or allocated."""
    from transformers import AutoConfig, AutoModelForCausalLM
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(base_dir)))


def check_mixed_precision_config(config_path: str | Path, base_path: str | Path | None = None) -> None:
    """What load_mixed_model(config_path, base_path) would refuse, found without reading or quantizing a weight, as
    one UsageError: the file; every source folder's safetensors headers and metadata; against the base model's
    layer shapes, the plan (mapped names, patterns), the int4 group size when the loader quantizes, and each weight's
    tensors and shape in its source. For a benchmark to call before its first mode, so a bad config costs no mode."""
    cfg = load_config(config_path)
    readers = open_sources(cfg, cfg.paths)
    skeleton = model_skeleton(base_model_dir(cfg, base_path))
    assignment = plan(cfg, skeleton)
    if not cfg.quantizes_at_load:
        check_sources(cfg, linear_weight_names(skeleton), assignment, readers)


def load_mixed_model(config_path: str | Path, base_path: str | Path | None = None, device: str = "cpu",
                     dtype: str = "float32"):
    """Load the base HF model, swap in the mixed-precision layers, check placement; returns (model, cfg, plan)."""
    from lib.models import load_model
    cfg = load_config(config_path)
    base_dir = base_model_dir(cfg, base_path)
    model = load_model(base_dir, dtype, "cpu")
    sources = load_time_sources(cfg, model, base_dir) if cfg.quantizes_at_load else cfg.paths
    assignment = apply_mixed_precision(model, cfg, sources, "cpu")
    model.to(device)
    problems = check_placement(model, device, getattr(torch, dtype))
    if problems:
        raise UsageError(f"{cfg.source}: after loading, {len(problems)} tensors are misplaced: {problems[0]}")
    model.eval()
    return model, cfg, assignment


def load_time_sources(cfg: MixedPrecisionConfig, model: nn.Module, base_dir: Path) -> dict[str, str]:
    """With no *_path given: the base model quantized to each precision the plan uses (for the tiny target built
    once and cached); precision -> folder."""
    from lib.models import ensure_tiny_models
    needed = sorted(set(plan(cfg, model).values()))  # the plan's checks come before any quantization
    if base_dir.resolve() == Path(ensure_tiny_models().target).resolve():
        root = tiny_sources(cfg.options)
    else:
        root = _quantize_on_the_fly(model, cfg, needed)
    return {prec: str(root / prec) for prec in needed}


def _quantize_on_the_fly(model: nn.Module, cfg: MixedPrecisionConfig, needed: list[str]) -> Path:
    import tempfile
    out = Path(tempfile.mkdtemp(prefix="speclab-mixed-"))
    logger.info(f"No source paths in {cfg.source}: quantizing the base model to {', '.join(needed)} in {out}")
    write_sources(model, out, cfg.options, precisions=needed)
    return out
