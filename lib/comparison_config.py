"""ComparisonConfig: the settings of one logits-comparison run (spec_num_iter, spec_tree_size, ...), its parser
and presets.

Presets live in configs/<name>.yaml (config1: iter 5, tree 32; config2: iter 2, tree 12). A preset fills the
speculative settings; flags given on the command line win over it.
"""
from __future__ import annotations

import argparse
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Annotated, get_type_hints

from pydantic import Field, create_model

from lib import files
from lib.config_models import ConfigModel, choice, read_config
from lib.errors import UsageError
from lib.files import ROOT

PRESET_DIR = ROOT / "configs"
DRAFT_TYPES = ("eagle", "model")
INT_LIMITS = {"spec_num_iter": (1, 64), "spec_tree_size": (2, 1024), "spec_topk_per_iter": (0, 256),
              "comparison_steps": (1, 100000), "chunk_length": (1, 1 << 20), "capture_topk": (1, 1000),
              "num_prompts": (0, 1 << 20)}  # inclusive


@dataclass
class ComparisonConfig:
    spec_num_iter: int = 5
    spec_tree_size: int = 32
    spec_topk_per_iter: int = 0  # 0 = get_topk_per_iter()'s rule
    comparison_steps: int = 20
    model_path: str = ""  # empty = the tiny local target
    draft_model_path: str = ""  # empty = the tiny EAGLE head (draft_type eagle) or tiny draft (model)
    draft_type: str = "eagle"
    prompt_file: str = "prompts/prompt_small.txt"
    num_prompts: int = 0  # 0 = every prompt of the file
    memory_limit: float = 0.7
    chunk_length: int = 1024
    cuda_graph: bool = False
    capture_topk: int = 20
    save_full_logits: bool = False
    save_results: bool = False
    verbose: bool = False
    config_name: str = ""
    output_dir: str = "results/captures"

    def get_topk_per_iter(self) -> int:
        """Children kept per expanded node and per iteration.

        Rule: the smallest k with spec_num_iter * k + 1 >= spec_tree_size, i.e. ceil((tree_size - 1) / num_iter),
        so the tree (root + tree_size - 1 drafts) can be filled from num_iter levels of k nodes (a chain when the
        tree is no wider than its depth). config1 (5, 32) -> 7; config2 (2, 12) -> 6. It also keeps SGLang's
        constraint num_draft_tokens <= num_steps * eagle_topk + 1. --spec-topk-per-iter overrides it.
        """
        if self.spec_topk_per_iter > 0:
            return self.spec_topk_per_iter
        return max(1, math.ceil((self.spec_tree_size - 1) / self.spec_num_iter))

    @property
    def name(self) -> str:
        return self.config_name or f"iter{self.spec_num_iter}_tree{self.spec_tree_size}"

    def to_dict(self) -> dict:
        return {**asdict(self), "topk_per_iter": self.get_topk_per_iter(), "name": self.name}

    def validate(self, flags: dict[str, str] | None = None) -> ComparisonConfig:
        """`flags` names the option a setting came from where it is not --<setting> (workflow.py's --config1-iter)."""
        flags = flags or {}
        for name, (low, high) in INT_LIMITS.items():
            value = getattr(self, name)
            if not low <= value <= high:
                flag = flags.get(name, f"--{name.replace('_', '-')}")
                raise UsageError(f"{flag}={value}: expected an integer from {low} to {high}")
        if not 0 < self.memory_limit <= 1:
            raise UsageError(f"--memory-limit={self.memory_limit}: expected a fraction in (0, 1]")
        if self.config_name:  # names the capture files
            files.path_component(self.config_name, f"--config-name={self.config_name!r}")
        if self.draft_type not in DRAFT_TYPES:
            raise UsageError(f"--draft-type={self.draft_type}: expected one of {', '.join(DRAFT_TYPES)}")
        files.read_prompt_file(self.prompt_file, f"--prompt-file={self.prompt_file}")
        return self


def _preset_model() -> type[ConfigModel]:
    """A preset: any subset of ComparisonConfig's settings, each with the type and bounds the flags have."""
    types = get_type_hints(ComparisonConfig)
    types.update({name: Annotated[int, Field(ge=low, le=high)] for name, (low, high) in INT_LIMITS.items()},
                 memory_limit=Annotated[float, Field(gt=0, le=1)], draft_type=choice("draft type", DRAFT_TYPES))
    return create_model("Preset", __base__=ConfigModel, **{f.name: (types[f.name], f.default)
                                                           for f in fields(ComparisonConfig)})


Preset = _preset_model()


def load_preset(name: str) -> dict:
    path = PRESET_DIR / f"{files.path_component(name, f'--config-name={name!r}')}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in PRESET_DIR.glob("config*.yaml")))
        raise UsageError(f"--config-name={name}: no preset configs/{name}.yaml (presets: {known})")
    preset = read_config(Preset, path, f"configs/{name}.yaml", "a mapping of settings (spec_num_iter: 5, ...)")
    return preset.model_dump(exclude_unset=True)


def add_comparison_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The comparison flags. Defaults are None so a preset can fill what the command line leaves out."""
    d = ComparisonConfig()
    spec = parser.add_argument_group("speculative decoding")
    spec.add_argument("--config-name", help="preset configs/<name>.yaml (config1: iter 5 tree 32; config2: iter 2 "
                      "tree 12); also names the output files (default: iter<N>_tree<M>)")
    spec.add_argument("--spec-num-iter", type=int, help=f"draft tree depth / draft steps (default {d.spec_num_iter})")
    spec.add_argument("--spec-tree-size", type=int,
                      help=f"nodes verified per round, root included (default {d.spec_tree_size})")
    spec.add_argument("--spec-topk-per-iter", type=int,
                      help="children kept per node and iteration (default: ceil((tree_size - 1) / num_iter))")
    spec.add_argument("--comparison-steps", type=int, help=f"tokens generated and captured per prompt "
                      f"(default {d.comparison_steps})")
    models = parser.add_argument_group("models")
    models.add_argument("--model-path", help="target model folder (default: the tiny local target)")
    models.add_argument("--draft-model-path", help="EAGLE head folder or draft model folder (default: the tiny "
                        "EAGLE head, or the tiny draft with --draft-type model)")
    models.add_argument("--draft-type", choices=DRAFT_TYPES,
                        help="eagle (EAGLE-1 head over the target's hidden states) or model (a separate small LM); "
                        "default: eagle, or what --draft-model-path holds")
    models.add_argument("--prompt-file", help=f"one prompt per line (default {d.prompt_file})")
    models.add_argument("--num-prompts", type=int, help="use the first N prompts (default: all)")
    system = parser.add_argument_group("system")
    system.add_argument("--memory-limit", type=float, help=f"fraction of GPU memory (SGLang mem_fraction_static, "
                        f"vLLM gpu_memory_utilization, reference: torch's per-process cap; default {d.memory_limit})")
    system.add_argument("--chunk-length", type=int, help=f"prefill chunk length (reference and SGLang "
                        f"chunked_prefill_size; default {d.chunk_length})")
    system.add_argument("--cuda-graph", action="store_true", default=None,
                        help="let SGLang/vLLM capture CUDA graphs (off: SGLang disable_cuda_graph, vLLM enforce_eager)")
    output = parser.add_argument_group("output")
    output.add_argument("--capture-topk", type=int, help=f"top-k logits/logprobs captured per token "
                        f"(default {d.capture_topk})")
    output.add_argument("--save-full-logits", action="store_true", default=None,
                        help="reference engine: also capture the full vocabulary logits")
    output.add_argument("--save-results", action="store_true", default=None, help="write the capture files")
    output.add_argument("--output-dir", help=f"where captures are written (default {d.output_dir})")
    output.add_argument("--verbose", action="store_true", default=None, help="print every prompt's tokens")
    return parser


def config_from_args(args: argparse.Namespace) -> ComparisonConfig:
    values = load_preset(args.config_name) if args.config_name else {}
    if "prompt_file" in values:  # a preset ships with the project: its paths name shipped files
        values["prompt_file"] = str(files.shipped(values["prompt_file"]))
    for f in fields(ComparisonConfig):
        given = getattr(args, f.name, None)
        if given is not None:
            values[f.name] = given
    values.setdefault("prompt_file", str(files.shipped(ComparisonConfig.prompt_file)))
    if args.draft_type is None and values.get("draft_model_path"):
        from lib.decoding.eagle import is_eagle_folder
        from lib.models import check_model_dir
        draft = check_model_dir(values["draft_model_path"], "--draft-model-path", known_type=False)  # headers first
        values["draft_type"] = "eagle" if is_eagle_folder(draft) else "model"
    return ComparisonConfig(**values).validate()


def read_prompts(cfg: ComparisonConfig) -> list[str]:
    prompts = files.read_prompt_file(cfg.prompt_file, f"--prompt-file={cfg.prompt_file}")
    return prompts[: cfg.num_prompts] if cfg.num_prompts else prompts


def resolve_comparison_models(cfg: ComparisonConfig) -> tuple[Path, Path]:
    """(target folder, draft folder): the tiny local ones unless --model-path / --draft-model-path say."""
    from lib.models import check_model_dir, check_same_vocab, ensure_tiny_models
    if cfg.model_path:
        target = check_model_dir(cfg.model_path, "--model-path", tokenizer=True)
        if not cfg.draft_model_path:
            raise UsageError("--draft-model-path is empty: with --model-path set, give an EAGLE head or draft "
                             "model folder made for that target")
        draft = check_model_dir(cfg.draft_model_path, "--draft-model-path")
        check_same_vocab(target, draft, "--draft-model-path")
        return target, draft
    if cfg.draft_model_path:
        raise UsageError(f"--draft-model-path={cfg.draft_model_path}: set --model-path too (the tiny target only "
                         "fits the tiny drafts)")
    tiny = ensure_tiny_models()
    if cfg.draft_type == "model":
        return tiny.target, tiny.draft
    from lib.decoding.eagle import ensure_tiny_eagle
    return tiny.target, ensure_tiny_eagle(tiny)
