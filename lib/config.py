"""The one table of configuration variables: name, type, default, help, validation.

Every variable can be set in the environment (NAME=value) or with its CLI twin (--name-in-kebab-case value);
the CLI wins. `--help`, `--dry-run` and the README's variable table are all generated from VARS; engine and
method names come from the engine table (lib/engines/__init__.py). `resolve` returns a frozen, typed Config.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
from dataclasses import dataclass
from typing import Any

from lib import engines as E
from lib.engines.endpoints import endpoint_url
from lib.errors import UsageError, check_bearer_token
from lib.files import path_component, shipped

TRUE_WORDS = {"1", "true", "yes", "on"}
FALSE_WORDS = {"0", "false", "no", "off"}
# Upper bounds of the variables that size work or memory: far above any real run, low enough that a typo
# (NUM_PROMPTS=10000000000, GENERATION_LENGTH=10000000) is refused up front instead of exhausting memory.
MAX_REQUESTS = 100_000  # requests per run (NUM_PROMPTS, AUTO_RATE x AUTO_DURATION): building 100000 takes seconds
MAX_NEW_TOKENS = 100_000_000  # requests x GENERATION_LENGTH: a mode keeps every token (id and time) in memory
MAX_GENERATION_LENGTH = 131_072
MAX_BATCH_TOKENS = 1 << 22  # BATCH_SIZE x MAX_BATCH_LENGTH: the token slots a batch's KV caches are sized for
MAX_SEQUENCE_TOKENS = 1 << 24
MAX_SEED = 2**32 - 2  # llama.cpp's seed is 32-bit and 2**32 - 1 means "random" there
MAX_GPUS = 1024  # also caps thread counts
MIN_RATE = 1e-3  # requests/s: one every ~17 minutes; below it gaps and spans overflow the week AUTO_DURATION allows
MIN_TEMPERATURE = 1e-5  # vLLM's sampling epsilon: below it vLLM decodes greedily, and logits / T overflow
MAX_DURATION = 7 * 24 * 3600  # seconds: AUTO_DURATION's bound, and the span of vLLM's schedule


@dataclass(frozen=True)
class Var:
    name: str
    kind: str  # str | int | float | bool | choice | path
    default: Any
    help: str
    group: str
    choices: tuple = ()
    min: float | None = None
    max: float | None = None
    allow_inf: bool = False  # "inf" accepted besides the bounded finite values (BURSTINESS: constant gaps)
    or_zero: bool = False  # 0 ("off") accepted besides [min, max] (AUTO_RATE: fixed-count mode; TEMPERATURE: greedy)
    shipped: bool = False  # the default names a file shipped with the project: resolved against the repository
    aliases: tuple = ()  # (alias, choice) pairs: the alias is accepted and resolves to the choice
    secret: bool = False  # a credential: run.json and --dry-run show *** instead of the value

    @property
    def flag(self) -> str:
        return "--" + self.name.lower().replace("_", "-")

    @property
    def attr(self) -> str:
        return self.name.lower()

    def accepted(self) -> str:
        if self.kind == "bool":
            return "true or false"
        if self.kind == "choice":
            return "one of " + ", ".join(self.choices)
        if self.kind in ("int", "float"):
            noun = "an integer" if self.kind == "int" else "a finite number"
            bounds = []
            if self.min is not None:
                bounds.append(f">= {_number(self.min)}")
            if self.max is not None:
                bounds.append(f"<= {_number(self.max)}")
            return ("0, or " if self.or_zero else "") + noun + (" " + " and ".join(bounds) if bounds else "") + \
                (", or inf" if self.allow_inf else "")
        return "a path" if self.kind == "path" else "UTF-8 text"

    def parse(self, raw: str, source: str) -> Any:
        def bad():
            return UsageError(f"{self.name}={raw!r} ({source}): expected {self.accepted()}")

        text = raw.strip()
        try:
            text.encode("utf-8")  # bytes that are not UTF-8 arrive from the environment as lone surrogates
        except UnicodeEncodeError:
            raise UsageError(f"{self.name}={raw!r} ({source}): not UTF-8 text") from None
        if self.kind in ("str", "path"):
            return text
        if self.kind == "bool":
            if text.lower() in TRUE_WORDS:
                return True
            if text.lower() in FALSE_WORDS:
                return False
            raise bad()
        if self.kind == "choice":
            if text.lower() not in self.choices:
                raise bad()
            return dict(self.aliases).get(text.lower(), text.lower())
        if text == "" and self.default is None:
            return None
        try:
            value = int(text) if self.kind == "int" else float(text)
        except ValueError:
            raise bad() from None
        if (value == math.inf and self.allow_inf) or (value == 0 and self.or_zero):
            return value
        if not math.isfinite(value):  # float("nan"), float("inf"), float("1e400")
            raise bad()
        if (self.min is not None and value < self.min) or (self.max is not None and value > self.max):
            raise bad()
        return value


def _number(bound: float) -> str:
    return str(int(bound)) if float(bound).is_integer() else f"{bound:g}"


G_LAYOUT, G_MODELS, G_ENGINE, G_WORK, G_GEN, G_MON, G_OUT, G_VLLM, G_ENDPOINT = (
    "GPU layout", "Models", "Engine and modes", "Workload", "Generation", "GPU monitor", "Output", "vLLM",
    "Endpoint (openai engine)")


def _or_list(items: list[str]) -> str:
    return ", ".join(items[:-1]) + " or " + items[-1] if len(items) > 1 else items[0]


# INFERENCE_ENGINE and INFERENCE_METHOD from the engine table; the method choices list the methods compared against
# the AR baseline first and the baseline (target) last
COMPARED_METHODS = [m for m in E.METHODS if m.name != "target" and not m.measurement] + [E.METHOD_BY_NAME["target"]]
ENGINE_HELP = "engine: " + ", ".join(e.name + (f" ({e.help})" if e.help else "") for e in E.ENGINES)
METHOD_HELP = "the method compared against target-only AR: " + _or_list([f"{m.name} ({m.help})"
                                                                          for m in COMPARED_METHODS])

VARS: list[Var] = [
    # GPU layout
    Var("CUDA_VISIBLE_DEVICES", "str", "", "GPUs this run may use (CUDA's own variable; empty = all visible)",
        G_LAYOUT),
    Var("GPU_STRATEGY", "choice", "same", "where target and draft go: multi_gpu_ratio (target layers over "
        "TARGET_GPU_RATIO GPUs, draft over the next DRAFTER_GPU_RATIO), separate (target GPU 0, draft GPU 1), "
        "same (both on GPU 0), auto (transformers' device_map=auto), shared_all (both spread over all GPUs)",
        G_LAYOUT, choices=("multi_gpu_ratio", "separate", "same", "auto", "shared_all")),
    Var("TARGET_GPU_RATIO", "int", 6, "GPUs for the target under multi_gpu_ratio", G_LAYOUT, min=1,
        max=MAX_GPUS),
    Var("DRAFTER_GPU_RATIO", "int", 2, "GPUs for the draft under multi_gpu_ratio", G_LAYOUT, min=1,
        max=MAX_GPUS),
    # models
    Var("TARGET_MODEL", "path", "", "target model folder (Hugging Face format); empty = the tiny local target",
        G_MODELS),
    Var("DRAFTER_MODEL", "path", "", "draft model folder (same tokenizer as the target); empty = the tiny "
        "local draft", G_MODELS),
    Var("DTYPE", "choice", "auto", "weights dtype for the PyTorch engine (auto = bfloat16 on GPU, float32 on CPU)",
        G_MODELS, choices=("auto", "float32", "bfloat16", "float16")),
    Var("MIXED_PRECISION_CONFIG", "path", "", "PyTorch engine: load the target with per-layer fp16/bf16/fp8/int8/"
        "GPTQ-int4 weights from this YAML (docs/mixed_precision.md); empty = plain weights", G_MODELS),
    # engine and modes
    Var("INFERENCE_ENGINE", "choice", "hf", ENGINE_HELP, G_ENGINE, choices=E.engine_choices(),
        aliases=tuple(E.ALIASES.items())),
    Var("INFERENCE_METHOD", "choice", "speculative", METHOD_HELP, G_ENGINE,
        choices=tuple(m.name for m in COMPARED_METHODS)),
    Var("HF_FAST_PATH", "bool", True, "PyTorch engine: static KV caches and CUDA graphs "
        "(lib/decoding/fast_path.py) for Llama, Mistral, Qwen2/2.5, Qwen3, Phi-3, Granite, OLMo 2 and Seed-OSS "
        "models that each sit on one device (others fall back with one line saying why); false = the plain "
        "transformers loop, silently", G_ENGINE),
    Var("WARMUP", "bool", True, "before timing a mode, decode one short untimed batch (first-use costs: CUDA graph "
        "capture, torch.compile, vLLM's first step)", G_ENGINE),
    Var("ENABLE_SPECULATIVE", "bool", True, "run the INFERENCE_METHOD mode", G_ENGINE),
    Var("ENABLE_TARGET", "bool", True, "run the target-only AR mode (the baseline)", G_ENGINE),
    Var("SD_DRAFT_COST", "bool", True, "vLLM and llama.cpp: after a speculative mode that drafts with a model, run "
        "that draft as an AR target on the same requests (mode <engine>:draft), so the SD cost model has the draft's "
        "cost ratio c (draft TPOT / target TPOT); false = c unknown", G_ENGINE),
    Var("COMPARE_MODES", "str", "", "space-separated engine:method pairs run on the same prompts, e.g. "
        "'hf:speculative vllm:target vllm:speculative' (overrides the three variables above)", G_ENGINE),
    # workload
    Var("NUM_PROMPTS", "int", 20, "fixed-count mode: number of requests (ignored when AUTO_RATE > 0)", G_WORK,
        min=0, max=MAX_REQUESTS),
    Var("AUTO_RATE", "float", 0.0, "rate mode: requests per second, Poisson arrivals (0 = fixed-count mode); "
        f"AUTO_RATE x AUTO_DURATION at most {MAX_REQUESTS} requests", G_WORK, min=MIN_RATE, max=MAX_REQUESTS,
        or_zero=True),
    Var("AUTO_DURATION", "float", 0.0, "rate mode: seconds over which requests arrive", G_WORK, min=0,
        max=MAX_DURATION),
    Var("ENABLE_BATCH", "bool", False, "decode BATCH_SIZE requests together", G_WORK),
    Var("BATCH_SIZE", "int", 4, "requests per batch when ENABLE_BATCH=true", G_WORK, min=1, max=4096),
    Var("MAX_BATCH_LENGTH", "int", 512, "batching: prompt + generation tokens per row; longer prompts keep "
        "their last MAX_BATCH_LENGTH - GENERATION_LENGTH tokens; BATCH_SIZE x MAX_BATCH_LENGTH at most "
        f"{MAX_BATCH_TOKENS}", G_WORK, min=2, max=2 * MAX_GENERATION_LENGTH),
    Var("SHAREGPT_DIR", "path", "", "folder with sharegpt_gpt4.jsonl / sharegpt_V3_format.jsonl / "
        "sharegpt_zh_38K_format.jsonl (or JSON arrays); empty = PROMPT_FILE", G_WORK),
    Var("PROMPT_FILE", "path", "prompts/benchmark_prompts.txt", "prompt file, one prompt per line "
        "(used when SHAREGPT_DIR is empty; the default is the project's own file)", G_WORK, shipped=True),
    Var("DATASET", "choice", "auto", "workload: auto (sharegpt when SHAREGPT_DIR is set, else prompt_file), "
        "prompt_file, sharegpt, random (seeded synthetic token prompts, vLLM's RandomDataset), custom (DATASET_PATH: "
        "JSONL of prompt, optional output_tokens and category), spec_bench (DATASET_PATH: Spec-Bench's question.jsonl "
        "layout, question_id, category, turns), prefix_repetition (PREFIX_REPETITION_NUM_PREFIXES random prefixes, "
        "each shared by the same number of requests)", G_WORK,
        choices=("auto", "prompt_file", "sharegpt", "random", "custom", "spec_bench", "prefix_repetition")),
    Var("DATASET_PATH", "path", "", "the JSONL file of DATASET=custom or spec_bench", G_WORK),
    Var("SHAREGPT_OUTPUT_LEN", "choice", "reference", "ShareGPT max tokens per request: reference (its reference "
        "answer's length, as vllm bench serve's ShareGPT workload asks) or generation_length (GENERATION_LENGTH "
        "each)", G_WORK, choices=("reference", "generation_length")),
    Var("RANDOM_INPUT_LEN", "int", 128, "DATASET=random: mean prompt tokens (vLLM's --random-input-len, special "
        "tokens included)", G_WORK, min=1, max=MAX_GENERATION_LENGTH),
    Var("RANDOM_OUTPUT_LEN", "int", None, "DATASET=random: mean max tokens per request (empty = GENERATION_LENGTH)",
        G_WORK, min=1, max=MAX_GENERATION_LENGTH),
    Var("RANDOM_RANGE_RATIO", "float", 0.0, "DATASET=random: lengths drawn uniformly from [mean x (1 - r), "
        "mean x (1 + r)]", G_WORK, min=0, max=0.999),
    Var("RANDOM_PREFIX_LEN", "int", 0, "DATASET=random: tokens of one random prefix shared by every prompt", G_WORK,
        min=0, max=MAX_GENERATION_LENGTH),
    Var("PREFIX_REPETITION_PREFIX_LEN", "int", 64, "DATASET=prefix_repetition: tokens of each shared prefix",
        G_WORK, min=1, max=MAX_GENERATION_LENGTH),
    Var("PREFIX_REPETITION_SUFFIX_LEN", "int", 64, "DATASET=prefix_repetition: tokens of each request's own suffix",
        G_WORK, min=1, max=MAX_GENERATION_LENGTH),
    Var("PREFIX_REPETITION_NUM_PREFIXES", "int", 4, "DATASET=prefix_repetition: distinct prefixes (NUM_PROMPTS "
        "must be at least this)", G_WORK, min=1, max=MAX_REQUESTS),
    Var("ARRIVAL_SCHEDULE", "choice", "speclab", "rate mode's schedule: speclab (AUTO_RATE arrivals until "
        "AUTO_DURATION) or vllm (vllm bench serve's own: NUM_PROMPTS requests at AUTO_RATE, rescaled to end at "
        "NUM_PROMPTS / AUTO_RATE; the same times as vLLM for a SEED)", G_WORK, choices=("speclab", "vllm")),
    Var("BURSTINESS", "float", 1.0, "gamma shape of the inter-arrival times (1 = Poisson; < 1 burstier, > 1 more "
        "even; inf = constant gaps)", G_WORK, min=0.001, max=1e6, allow_inf=True),
    Var("RAMP_UP_STRATEGY", "choice", "none", "rate ramp from RAMP_UP_START_RPS to RAMP_UP_END_RPS: none, linear or "
        "exponential (speclab schedule: over AUTO_DURATION; vllm: over the requests, as vLLM)", G_WORK,
        choices=("none", "linear", "exponential")),
    Var("RAMP_UP_START_RPS", "float", 0.0, "ramp-up: requests/s at the start", G_WORK, min=MIN_RATE,
        max=MAX_REQUESTS, or_zero=True),
    Var("RAMP_UP_END_RPS", "float", 0.0, "ramp-up: requests/s at the end", G_WORK, min=MIN_RATE, max=MAX_REQUESTS,
        or_zero=True),
    Var("MAX_CONCURRENCY", "int", 0, "at most this many requests in flight (0 = no limit; batch engines also keep "
        "to BATCH_SIZE)", G_WORK, min=0, max=MAX_REQUESTS),
    Var("NUM_RUNS", "int", 1, "run each mode this many times; the result adds mean and 95 % Student-t interval of "
        "output throughput, TPOT and acceptance", G_WORK, min=1, max=100),
    # generation
    Var("GENERATION_LENGTH", "int", 100, "max new tokens per request", G_GEN, min=1,
        max=MAX_GENERATION_LENGTH),
    Var("GAMMA_VALUE", "int", 4, "draft tokens per speculative round", G_GEN, min=1, max=64),
    Var("TEMPERATURE", "float", 0.0, "0 = greedy (SD output equals AR output); > 0 samples, SD keeps the "
        "target's distribution (below 1e-5 vLLM samples greedily, so SpecLab takes 0 or from 1e-5)", G_GEN,
        min=MIN_TEMPERATURE, max=100, or_zero=True),
    Var("SEED", "int", 42, "seed for sampling, prompt order and arrival times", G_GEN, min=0,
        max=MAX_SEED),
    # GPU monitor
    Var("ENABLE_GPU_MONITOR", "bool", True, "sample power, energy, utilization, memory and temperature with NVML",
        G_MON),
    Var("GPU_MONITOR_INTERVAL", "float", 1.0, "seconds between NVML samples", G_MON, min=0.01, max=3600),
    # output
    Var("RESULTS_DIR", "path", "results", "where run folders (RESULTS_DIR/<run-id>/) are written", G_OUT),
    Var("RUN_ID", "str", "", "name of the run folder, one folder name (default: date-time and engine); a run "
        "folder that already holds a run is refused unless OVERWRITE=true", G_OUT),
    Var("OVERWRITE", "bool", False, "replace the run already in RESULTS_DIR/RUN_ID (its result and request files "
        "are removed once the inputs are checked, before the first save); false = refuse to write into it", G_OUT),
    Var("GOODPUT", "str", "", "SLOs for request_goodput as vllm bench serve's --goodput, e.g. 'ttft:500 "
        "tpot:50 e2el:2000' (ms; empty = no goodput)", G_OUT),
    Var("PERCENTILE_METRICS", "str", "ttft,tpot,itl", "metrics whose statistics bench_serve_<mode>.json carries "
        "(vLLM's --percentile-metrics): comma-separated ttft, tpot, itl, e2el", G_OUT),
    Var("METRIC_PERCENTILES", "str", "99", "percentiles of those metrics (vLLM's --metric-percentiles), e.g. "
        "'25,50,99'", G_OUT),
    Var("LOSSLESS_CHECK", "choice", "fail", "the losslessness verdict of each SD mode against the target-only "
        "mode (its engine's, else the run's first; README, Losslessness verdict): fail (a MISMATCH, or at "
        "TEMPERATURE > 0 a DIFFERENT token distribution, ends the run with exit code 3 once the result files hold "
        "the verdict), warn (the verdict is written and shown; the exit code is unchanged), off (no verdict; engines "
        "skip the top-2 logprobs it reads)", G_OUT, choices=("fail", "warn", "off")),
    Var("METADATA", "str", "", "space-separated KEY=VALUE pairs written into bench_serve_<mode>.json (vLLM's "
        "--metadata)", G_OUT),
    # vLLM
    Var("VLLM_ENABLE_SPECULATIVE", "bool", False, "vLLM: use its native speculative decoding for the "
        "speculative mode (false = fall back to target-only, with a warning)", G_VLLM),
    Var("VLLM_NUM_SPECULATIVE_TOKENS", "int", None, "vLLM: draft tokens per step (empty = GAMMA_VALUE)", G_VLLM,
        min=1, max=64),
    Var("VLLM_USE_V2_BLOCK_MANAGER", "bool", True, "accepted for old scripts; vLLM has one block manager now, "
        "so it has no effect", G_VLLM),
    Var("VLLM_SPEC_METHOD", "choice", "draft_model", "vLLM: draft_model (DRAFTER_MODEL), ngram (prompt lookup), "
        "eagle, eagle3, mtp", G_VLLM, choices=("draft_model", "ngram", "eagle", "eagle3", "mtp")),
    Var("VLLM_NGRAM_PROMPT_LOOKUP_MAX", "int", 4, "vLLM ngram: longest n-gram matched in the prompt", G_VLLM,
        min=1, max=1024),
    Var("VLLM_NGRAM_PROMPT_LOOKUP_MIN", "int", 2, "vLLM ngram: shortest n-gram matched in the prompt", G_VLLM,
        min=1, max=1024),
    Var("VLLM_TENSOR_PARALLEL_SIZE", "int", 1, "vLLM: GPUs per model (tensor parallel)", G_VLLM, min=1,
        max=MAX_GPUS),
    Var("VLLM_GPU_MEMORY_UTILIZATION", "float", 0.9, "vLLM: fraction of GPU memory it may take", G_VLLM,
        min=0.05, max=1.0),
    Var("VLLM_MAX_MODEL_LEN", "int", 2048, "vLLM: max tokens per sequence", G_VLLM, min=16,
        max=MAX_SEQUENCE_TOKENS),
    Var("VLLM_MAX_NUM_SEQS", "int", 128, "vLLM: max sequences scheduled together", G_VLLM, min=1,
        max=65536),
    Var("VLLM_DTYPE", "choice", "auto", "vLLM: weights dtype (auto = float32 on CPU, the model's dtype on GPU)",
        G_VLLM, choices=("auto", "half", "float16", "bfloat16", "float", "float32")),
    Var("LLAMACPP_N_THREADS", "int", 0, "llama.cpp engine: CPU threads for decoding and prompt batches (0 = 1 on "
        "machines with up to 2 cores, else half the cores)", G_ENGINE, min=0,
        max=MAX_GPUS),
    # endpoint (openai engine)
    Var("TARGET_ENDPOINT", "str", "", "base URL of the running server the openai:target mode benchmarks (plain AR), "
        "e.g. http://10.0.0.5:8000 (a trailing /v1 is dropped); needed unless ENDPOINT_LAUNCH starts one",
        G_ENDPOINT),
    Var("SPECULATIVE_ENDPOINT", "str", "", "base URL of the running server the openai:speculative mode benchmarks "
        "(SD configured at its launch); needed unless ENDPOINT_LAUNCH starts one", G_ENDPOINT),
    Var("ENDPOINT_API", "choice", "completions", "completions (/v1/completions; the prompt's token ids where the "
        "server takes them), chat (/v1/chat/completions; the prompt as one user message through the server's "
        "chat template) or sglang (SGLang's native /generate: token ids in and out, its per-request SD counters)",
        G_ENDPOINT, choices=("completions", "chat", "sglang")),
    Var("ENDPOINT_LAUNCH", "choice", "none", "none (benchmark the endpoints as they run), vllm (start vLLM's OpenAI "
        "server for each mode from TARGET_MODEL, DRAFTER_MODEL, GAMMA_VALUE and the VLLM_* variables, the "
        "speculative one with --speculative-config) or llamacpp (llama-cpp-python's server on TARGET_MODEL's GGUF "
        "export; its speculative draft is prompt lookup); a launched server binds 127.0.0.1 and stops after its "
        "mode", G_ENDPOINT, choices=("none", "vllm", "llamacpp")),
    Var("ENDPOINT_MODEL", "str", "", "model name sent with each request (empty = the first of the server's "
        "/v1/models)", G_ENDPOINT),
    Var("ENDPOINT_API_KEY", "str", "", "bearer token sent to the endpoints (and given to a launched server); "
        "run.json and --dry-run show it masked", G_ENDPOINT, secret=True),
    Var("ENDPOINT_TIMEOUT", "float", 600.0, "seconds one request may take; past it the request is recorded as an "
        "error", G_ENDPOINT, min=0.1, max=7 * 24 * 3600),
    Var("ENDPOINT_STARTUP_TIMEOUT", "float", 900.0, "seconds a launched server may take to become ready (vLLM "
        "loads and profiles its models first)", G_ENDPOINT, min=1, max=7 * 24 * 3600),
]
VAR_BY_NAME = {v.name: v for v in VARS}
EMPTY_MEANS = {"VLLM_NUM_SPECULATIVE_TOKENS": "GAMMA_VALUE", "RANDOM_OUTPUT_LEN": "GENERATION_LENGTH"}  # None defaults


class _ConfigMethods:
    """What a Config offers besides its attributes."""

    @classmethod
    def from_values(cls, values: dict, sources: dict) -> Config:
        """From {VAR_NAME: value} and {VAR_NAME: default | env | cli}."""
        return cls(**{VAR_BY_NAME[name].attr: value for name, value in values.items()}, sources=dict(sources))

    def as_dict(self) -> dict:
        """{VAR_NAME: value} in the table's order (run.json's "config"); credentials as ***."""
        return {var.name: "***" if var.secret and getattr(self, var.attr) else getattr(self, var.attr)
                for var in VARS}

    def replace(self, **changes) -> Config:
        """A new Config with these values (keyword: attribute or variable name), their source "override"."""
        sources = {**self.sources, **{name.upper(): "override" for name in changes}}
        return dataclasses.replace(self, **{name.lower(): v for name, v in changes.items()}, sources=sources)


_TYPES = {"str": str, "path": str, "choice": str, "int": int, "float": float, "bool": bool}

Config = dataclasses.make_dataclass(
    "Config", [(var.attr, _TYPES[var.kind] if var.default is not None else _TYPES[var.kind] | None)
               for var in VARS] + [("sources", dict, dataclasses.field(default_factory=dict, compare=False))],
    bases=(_ConfigMethods,), frozen=True)
Config.__module__ = __name__  # so a Config pickles (vLLM's worker processes)
Config.__doc__ = """The resolved configuration, read-only: one typed attribute per variable (cfg.gamma_value) and
`sources`, {VAR_NAME: default | env | cli | override}, saying where each value came from."""


def add_arguments(parser: argparse.ArgumentParser, vars_: list[Var] = VARS):
    """One flag per variable, grouped as in the table; values stay strings so env and CLI parse alike."""
    groups: dict[str, argparse._ArgumentGroup] = {}
    for var in vars_:
        group = groups.setdefault(var.group, parser.add_argument_group(var.group))
        default = EMPTY_MEANS.get(var.name, var.default)
        shown = {True: "true", False: "false"}.get(default, default) if not isinstance(default, (int, float)) \
            or isinstance(default, bool) else default
        group.add_argument(var.flag, dest=var.attr, metavar=var.name, default=None,
                           help=f"{var.help} [env {var.name}; {var.accepted()}; default: {shown!s}]".replace("%", "%%"))


def resolve(args: argparse.Namespace | None = None, environ: dict | None = None,
            env_source: str = "from the environment") -> Config:
    """Defaults < environment < CLI; then cross-variable checks. `env_source` says where `environ`'s values come
    from, in errors (a sweep names its file and combination)."""
    environ = os.environ if environ is None else environ
    values, sources = {}, {}
    for var in VARS:
        cli = getattr(args, var.attr, None) if args is not None else None
        if cli is not None and cli.strip() != "":
            values[var.name], sources[var.name] = var.parse(cli, f"from {var.flag}"), "cli"
        elif cli is None and environ.get(var.name, "").strip() != "":
            values[var.name], sources[var.name] = var.parse(environ[var.name], env_source), "env"
        else:  # unset, or empty: as an empty variable, an empty flag means the default (and overrides the variable)
            default = str(shipped(var.default)) if var.shipped else var.default
            values[var.name], sources[var.name] = default, "default" if cli is None else "cli"
    cfg = Config.from_values(values, sources)
    validate(cfg)
    if sources["CUDA_VISIBLE_DEVICES"] == "cli":  # the flag sets CUDA's own variable, read when CUDA starts
        os.environ["CUDA_VISIBLE_DEVICES"] = cfg.cuda_visible_devices
    return cfg


def validate(cfg: Config):
    """Checks across variables; raises UsageError, changes nothing."""
    if rate_mode(cfg) and cfg.arrival_schedule == "speclab" and cfg.auto_duration <= 0:
        raise UsageError(f"AUTO_DURATION={cfg.auto_duration:g}: rate mode (AUTO_RATE={cfg.auto_rate:g}) needs "
                         "AUTO_DURATION > 0 seconds")
    _check_workload_size(cfg)
    if counted(cfg) and cfg.num_prompts <= 0:
        if rate_mode(cfg):
            raise UsageError("NUM_PROMPTS=0 with ARRIVAL_SCHEDULE=vllm: vLLM's schedule sends NUM_PROMPTS requests; "
                             "set NUM_PROMPTS > 0")
        raise UsageError("NUM_PROMPTS=0 and AUTO_RATE=0: set NUM_PROMPTS > 0 (fixed count) or AUTO_RATE and "
                         "AUTO_DURATION > 0 (rate mode)")
    if cfg.enable_batch and cfg.generation_length >= cfg.max_batch_length:
        raise UsageError(f"MAX_BATCH_LENGTH={cfg.max_batch_length}: must be greater than GENERATION_LENGTH="
                         f"{cfg.generation_length} so a prompt token fits")
    if cfg.vllm_ngram_prompt_lookup_min > cfg.vllm_ngram_prompt_lookup_max:
        raise UsageError(f"VLLM_NGRAM_PROMPT_LOOKUP_MIN={cfg.vllm_ngram_prompt_lookup_min}: must be <= "
                         f"VLLM_NGRAM_PROMPT_LOOKUP_MAX={cfg.vllm_ngram_prompt_lookup_max}")
    _check_traffic(cfg)
    goodput_slos(cfg)
    percentile_selection(cfg)
    metadata_pairs(cfg)
    if cfg.run_id:
        path_component(cfg.run_id, f"RUN_ID={cfg.run_id!r}")
    check_bearer_token(cfg.endpoint_api_key, "ENDPOINT_API_KEY")
    for engine, method in modes(cfg):  # raises on a bad COMPARE_MODES
        if engine == "openai":
            endpoint_url(cfg, method)


def rate_mode(cfg: Config) -> bool:
    """Requests arrive over time (AUTO_RATE or a ramp-up) rather than all at t=0."""
    return cfg.auto_rate > 0 or cfg.ramp_up_strategy != "none"


def counted(cfg: Config) -> bool:
    """NUM_PROMPTS sets the number of requests (fixed count, or vLLM's schedule of NUM_PROMPTS arrivals)."""
    return not rate_mode(cfg) or cfg.arrival_schedule == "vllm"


def _check_traffic(cfg: Config):
    if cfg.auto_rate > 0 and cfg.ramp_up_strategy != "none":
        raise UsageError(f"AUTO_RATE={cfg.auto_rate:g} with RAMP_UP_STRATEGY={cfg.ramp_up_strategy}: the ramp-up sets "
                         "the rate (RAMP_UP_START_RPS to RAMP_UP_END_RPS); set one of the two")
    if cfg.auto_rate > 0 and cfg.arrival_schedule == "vllm" and cfg.num_prompts / cfg.auto_rate > MAX_DURATION:
        raise UsageError(f"NUM_PROMPTS={cfg.num_prompts} at AUTO_RATE={cfg.auto_rate:g} (ARRIVAL_SCHEDULE=vllm): "
                         f"arrivals over {cfg.num_prompts / cfg.auto_rate:.3g} s; at most {MAX_DURATION} s (a week)")
    if cfg.ramp_up_strategy != "none" and (cfg.ramp_up_start_rps <= 0 or cfg.ramp_up_end_rps <= 0):
        raise UsageError(f"RAMP_UP_STRATEGY={cfg.ramp_up_strategy}: needs RAMP_UP_START_RPS and RAMP_UP_END_RPS > 0 "
                         f"(got {cfg.ramp_up_start_rps:g} and {cfg.ramp_up_end_rps:g})")
    if cfg.dataset in ("custom", "spec_bench") and not cfg.dataset_path:
        raise UsageError(f"DATASET={cfg.dataset}: needs DATASET_PATH, the JSONL file to read")
    if cfg.dataset_path and cfg.dataset == "auto":  # the default would read PROMPT_FILE and pass the file over
        raise UsageError(f"DATASET_PATH={cfg.dataset_path}: read only with DATASET=custom or spec_bench (DATASET=auto "
                         "reads SHAREGPT_DIR or PROMPT_FILE); set DATASET, or leave DATASET_PATH empty")
    if cfg.dataset == "sharegpt" and not cfg.sharegpt_dir:
        raise UsageError("DATASET=sharegpt: needs SHAREGPT_DIR, the folder of ShareGPT files")
    if cfg.dataset == "prefix_repetition" and counted(cfg) and cfg.num_prompts < cfg.prefix_repetition_num_prefixes:
        raise UsageError(f"NUM_PROMPTS={cfg.num_prompts}: DATASET=prefix_repetition needs at least "
                         f"PREFIX_REPETITION_NUM_PREFIXES={cfg.prefix_repetition_num_prefixes} requests")


def goodput_slos(cfg: Config) -> dict[str, float]:
    """GOODPUT as {ttft|tpot|e2el: ms}, as vLLM's --goodput reads it."""
    slos = {}
    for pair in cfg.goodput.split():
        name, _, value = pair.partition(":")
        try:
            ms = float(value)
        except ValueError:
            ms = -1.0
        if name not in ("ttft", "tpot", "e2el") or not ms >= 0:
            raise UsageError(f"GOODPUT={cfg.goodput!r}: {pair!r} is not NAME:MS with NAME one of ttft, tpot, e2el "
                             "and MS a number >= 0 (milliseconds)")
        slos[name] = ms
    return slos


PERCENTILE_METRIC_NAMES = ("ttft", "tpot", "itl", "e2el")


def percentile_selection(cfg: Config) -> tuple[list[str], list[float]]:
    """(PERCENTILE_METRICS, METRIC_PERCENTILES) as lists."""
    metrics = [m.strip() for m in cfg.percentile_metrics.split(",") if m.strip()]
    bad = [m for m in metrics if m not in PERCENTILE_METRIC_NAMES]
    if bad or not metrics:
        raise UsageError(f"PERCENTILE_METRICS={cfg.percentile_metrics!r}: expected comma-separated names from "
                         f"{', '.join(PERCENTILE_METRIC_NAMES)}")
    try:
        percentiles = [float(p) for p in cfg.metric_percentiles.split(",") if p.strip()]
    except ValueError:
        percentiles = []
    if not percentiles or not all(0 <= p <= 100 for p in percentiles):
        raise UsageError(f"METRIC_PERCENTILES={cfg.metric_percentiles!r}: expected comma-separated numbers from 0 "
                         "to 100, e.g. 25,50,99")
    return metrics, percentiles


def metadata_pairs(cfg: Config) -> dict[str, str]:
    pairs = {}
    for item in cfg.metadata.split():
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise UsageError(f"METADATA={cfg.metadata!r}: {item!r} is not KEY=VALUE")
        pairs[key.strip()] = value.strip()
    return pairs


def _check_workload_size(cfg: Config):
    """Requests and new tokens within the bounds, however they multiply."""
    if counted(cfg):
        requests, which = cfg.num_prompts, f"NUM_PROMPTS={cfg.num_prompts}"
    else:  # arrivals until AUTO_DURATION, at AUTO_RATE or a ramp-up's highest rate
        rate = max(cfg.auto_rate, cfg.ramp_up_start_rps, cfg.ramp_up_end_rps)
        source = "AUTO_RATE" if rate == cfg.auto_rate else "the ramp-up's top rate"
        requests, which = rate * cfg.auto_duration, f"{source}={rate:g} x AUTO_DURATION={cfg.auto_duration:g}"
        if requests > MAX_REQUESTS:
            raise UsageError(f"{which}: about {requests:.3g} requests; at most {MAX_REQUESTS} per run")
    if requests * cfg.generation_length > MAX_NEW_TOKENS:
        raise UsageError(f"{which} x GENERATION_LENGTH={cfg.generation_length}: "
                         f"{requests * cfg.generation_length:.3g} new tokens per mode; at most {MAX_NEW_TOKENS} "
                         "(a mode keeps every token in memory)")
    if cfg.enable_batch and cfg.batch_size * cfg.max_batch_length > MAX_BATCH_TOKENS:
        raise UsageError(f"BATCH_SIZE={cfg.batch_size} x MAX_BATCH_LENGTH={cfg.max_batch_length}: "
                         f"{cfg.batch_size * cfg.max_batch_length} token slots per batch; at most {MAX_BATCH_TOKENS}")


def modes(cfg: Config) -> list[tuple[str, str]]:
    """The (engine, method) pairs this run executes, in order."""
    if cfg.compare_modes.strip():
        pairs = []
        for item in cfg.compare_modes.split():
            engine, _, method = item.partition(":")
            engine = E.canonical(engine)
            if engine not in E.ENGINE_BY_NAME or method not in E.METHOD_BY_NAME:
                raise UsageError(f"COMPARE_MODES={cfg.compare_modes!r}: {item!r} is not engine:method with engine "
                                 f"in {', '.join(E.ENGINE_BY_NAME)} and method in {', '.join(E.METHOD_BY_NAME)}")
            if (engine, method) in pairs:
                raise UsageError(f"COMPARE_MODES={cfg.compare_modes!r}: {item} is listed twice")
            pairs.append((engine, method))
        _check_methods(pairs)
        return with_draft_modes(cfg, pairs)
    pairs = []
    if cfg.enable_target:
        pairs.append((cfg.inference_engine, "target"))
    if cfg.enable_speculative and cfg.inference_method != "target":
        pairs.append((cfg.inference_engine, cfg.inference_method))
    if not pairs:
        raise UsageError("ENABLE_TARGET=false and ENABLE_SPECULATIVE=false (or INFERENCE_METHOD=target): "
                         "nothing to run; enable at least one mode")
    _check_methods(pairs)
    return with_draft_modes(cfg, pairs)


def draft_runs_as_target(cfg: Config, engine: str, method: str) -> bool:
    """Whether the SD mode engine:method is followed by engine:draft (its draft model run as an AR target, for the
    SD cost model's c): SD_DRAFT_COST, an engine that runs the draft method, and a draft that is a model (not
    vLLM's ngram, mtp or EAGLE heads)."""
    if not cfg.sd_draft_cost or method != "speculative" or "draft" not in E.ENGINE_BY_NAME[engine].methods:
        return False
    return engine != "vllm" or (cfg.vllm_enable_speculative and cfg.vllm_spec_method == "draft_model")


def with_draft_modes(cfg: Config, pairs: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """The pairs with engine:draft after each SD mode that draft_runs_as_target (unless already listed)."""
    out = []
    for engine, method in pairs:
        out.append((engine, method))
        if draft_runs_as_target(cfg, engine, method) and (engine, "draft") not in pairs:
            out.append((engine, "draft"))
    return out


LAUNCH_SETS = {"vllm": "vllm", "llamacpp": "edge"}  # ENDPOINT_LAUNCH -> the requirement set of its server


def mode_needs_draft(cfg: Config, engine: str, method: str) -> bool:
    """Whether a mode reads DRAFTER_MODEL: vLLM's ngram and mtp draft from the prompt or the target itself, and
    vLLM without VLLM_ENABLE_SPECULATIVE falls back to target-only; an openai mode only when it launches vLLM."""
    if not E.METHOD_BY_NAME[method].needs_draft:
        return False
    if engine == "vllm" and method != "draft":
        return cfg.vllm_enable_speculative and cfg.vllm_spec_method not in ("ngram", "mtp")
    if engine == "openai":
        return cfg.endpoint_launch == "vllm" and cfg.vllm_spec_method not in ("ngram", "mtp")
    return True


def requirement_sets(cfg: Config) -> list[str]:
    """The requirement sets (requirements/<set>.txt) this run needs: core, each mode's engine's, and quant for
    MIXED_PRECISION_CONFIG."""
    sets = ["core"] + [E.ENGINE_BY_NAME[engine].requirements for engine, _ in modes(cfg)]
    if "endpoint" in sets and cfg.endpoint_launch != "none":
        sets.append(LAUNCH_SETS[cfg.endpoint_launch])
    if cfg.mixed_precision_config:
        sets.append("quant")
    return list(dict.fromkeys(sets))


def _check_methods(pairs: list[tuple[str, str]]):
    for engine, method in pairs:
        if method not in E.ENGINE_BY_NAME[engine].methods:
            why = E.METHOD_BY_NAME[method].only_because or f"{engine} does not run it"
            raise UsageError(f"INFERENCE_METHOD={method} with engine {engine}: {why}; accepted only with "
                             f"INFERENCE_ENGINE={' or '.join(E.engines_running(method))}")


def markdown_table(vars_: list[Var] = VARS) -> str:
    """The README's variable table."""
    rows = ["| variable | flag | default | accepted | meaning |", "|---|---|---|---|---|"]
    for var in vars_:
        default = {True: "true", False: "false", None: f"({EMPTY_MEANS.get(var.name)})", "": "(empty)"}.get(
            var.default, var.default) \
            if not isinstance(var.default, (int, float)) or isinstance(var.default, bool) or var.default is None \
            else var.default
        rows.append(f"| `{var.name}` | `{var.flag}` | {default} | {var.accepted()} | {var.help} |")
    return "\n".join(rows)
