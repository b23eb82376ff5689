"""The engines and the decoding methods they accept: the one table that INFERENCE_ENGINE's choices, the
COMPARE_MODES checks, run_benchmark.sh's requirement sets and run.json's package versions are read from.

This module imports nothing heavy (lib/config.py reads it before any optional requirement set is installed);
engine classes are imported on first use, so a missing package only matters when that engine is asked for.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass

from lib.errors import EngineUnavailable


@dataclass(frozen=True)
class MethodSpec:
    name: str
    help: str  # shown in INFERENCE_METHOD's help
    needs_draft: bool = True  # reads DRAFTER_MODEL (lib/config.py's mode_needs_draft refines this per engine)
    only_because: str = ""  # for a method only some engines run: why, in the error for the others
    measurement: bool = False  # a mode the plan adds for the SD cost model, not an INFERENCE_METHOD choice


@dataclass(frozen=True)
class EngineSpec:
    name: str
    module: str
    cls: str
    requirements: str  # requirement set: requirements/<set>.txt, installed by scripts/ensure_env.sh
    package: str  # the Python package whose version run.json records
    methods: tuple[str, ...]
    help: str = ""  # shown after the name in INFERENCE_ENGINE's help
    aliases: tuple[str, ...] = ()  # other names accepted for it


METHODS = (
    MethodSpec("target", "AR only", needs_draft=False),
    MethodSpec("speculative", "draft + verify"),
    MethodSpec("assisted", "transformers' own assisted generation, hf engine, batch 1",
               only_because="assisted generation is transformers' own"),
    MethodSpec("draft", "the draft model run as an AR target on the same requests (the SD cost model's c)",
               only_because="the hf engine times its draft steps inside the SD loop", measurement=True),
)

ENGINES = (
    EngineSpec("hf", "lib.engines.pytorch_engine", "PyTorchEngine", "core", "transformers",
               ("target", "speculative", "assisted"), help="PyTorch/transformers, the project's own SD loop",
               aliases=("transformers",)),
    EngineSpec("vllm", "lib.engines.vllm_engine", "VLLMEngine", "vllm", "vllm", ("target", "speculative", "draft")),
    EngineSpec("sglang", "lib.engines.sglang_engine", "SGLangEngine", "sglang", "sglang", ("target", "speculative")),
    EngineSpec("llamacpp", "lib.engines.llamacpp_engine", "LlamaCppEngine", "edge", "llama_cpp",
               ("target", "speculative", "draft")),
    EngineSpec("openai", "lib.engines.openai_engine", "OpenAIEngine", "endpoint", "httpx", ("target", "speculative"),
               help="a running OpenAI-compatible server: TARGET_ENDPOINT, SPECULATIVE_ENDPOINT or ENDPOINT_LAUNCH"),
)

ENGINE_BY_NAME = {e.name: e for e in ENGINES}
METHOD_BY_NAME = {m.name: m for m in METHODS}
ALIASES = {alias: e.name for e in ENGINES for alias in e.aliases}
PACKAGES = ("torch",) + tuple(e.package for e in ENGINES)  # versions recorded in run.json, where imported


def canonical(name: str) -> str:
    """An engine's own name for an alias (transformers -> hf); other names unchanged."""
    return ALIASES.get(name, name)


def engine_choices() -> tuple[str, ...]:
    """Every accepted engine name, each engine's aliases right after it."""
    return tuple(name for e in ENGINES for name in (e.name, *e.aliases))


def engines_running(method: str) -> list[str]:
    return [e.name for e in ENGINES if method in e.methods]


def engine_class(name: str):
    spec = ENGINE_BY_NAME[name]
    try:
        module = importlib.import_module(spec.module)
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.startswith("lib."):
            raise EngineUnavailable(f"INFERENCE_ENGINE={name}: not built into this version of SpecLab") from None
        raise
    return getattr(module, spec.cls)


def create_engine(name: str, cfg, method: str, models):
    return engine_class(name)(cfg, method, models)
