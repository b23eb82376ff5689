"""Prompts (prompt files, ShareGPT, the datasets of lib/datasets.py) and requests (arrivals from lib/arrivals.py,
max tokens, batching)."""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np

from lib import datasets, files
from lib.arrivals import arrivals
from lib.config import rate_mode
from lib.datasets import MALFORMED, LoadStats, Prompt, json_entries
from lib.errors import UsageError
from lib.types import Request

SHAREGPT_FILES = ("sharegpt_gpt4.jsonl", "sharegpt_V3_format.jsonl", "sharegpt_zh_38K_format.jsonl")
CONVERSATIONS = 'conversations ([{"conversations": [{"from": ..., "value": ...}, ...]}, ...])'


def read_prompt_file(path: str | Path) -> list[Prompt]:
    return [Prompt(text) for text in files.read_prompt_file(path, f"PROMPT_FILE={path}")]


def _turns(entry) -> list[str] | None:
    turns = entry.get("conversations") if isinstance(entry, dict) else None
    if not isinstance(turns, list):
        return None
    values = [t.get("value") for t in turns if isinstance(t, dict)]
    if len(values) != len(turns) or not all(isinstance(v, str) for v in values):
        return None
    return values


def token_count(tokenizer, text: str) -> int:
    """Tokens as vLLM's bench counts them: `tokenizer(text).input_ids`, special tokens (BOS) included, which is
    also what a request's prompt_ids hold."""
    return len(tokenizer(text).input_ids)


def valid_lengths(prompt_len: int, output_len: int, skip_min_output: bool = False) -> bool:
    """vLLM bench's is_valid_sequence: prompt and output >= 4 tokens (output unchecked when the output length is
    fixed), prompt <= 1024, prompt + output <= 2048."""
    return not (prompt_len < 4 or (not skip_min_output and output_len < 4) or prompt_len > 1024
                or prompt_len + output_len > 2048)


def load_sharegpt(folder: str | Path, tokenizer, fixed_output_len: int | None = None
                  ) -> tuple[list[Prompt], LoadStats]:
    """vLLM bench's ShareGPT rules: >= 2 turns; prompt = turn 0, reference output = turn 1; valid_lengths() on
    the prompt and the request's output length (the reference's, or fixed_output_len, as vLLM's
    --sharegpt-output-len). Malformed entries are skipped and counted: entries = malformed + filtered + kept."""
    d = Path(folder)
    if not d.is_dir():
        raise UsageError(f"SHAREGPT_DIR={folder}: {files.not_a_folder(d)} (expected a folder with "
                         f"{', '.join(SHAREGPT_FILES)} or *.json arrays)")
    paths = [d / f for f in SHAREGPT_FILES if (d / f).is_file()] or sorted(d.glob("*.json")) + sorted(
        d.glob("*.jsonl"))
    if not paths:
        raise UsageError(f"SHAREGPT_DIR={folder}: none of {', '.join(SHAREGPT_FILES)} (or any *.json/*.jsonl) "
                         "is in the folder")
    stats, prompts = LoadStats("sharegpt", [f.name for f in paths]), []
    for f in paths:
        for entry in json_entries(f, f"SHAREGPT_DIR file {f}", CONVERSATIONS):
            stats.entries += 1
            turns = None if entry is MALFORMED else _turns(entry)
            if turns is None:
                stats.malformed += 1
                continue
            if len(turns) < 2:
                stats.filtered += 1
                continue
            prompt_len, reference_len = token_count(tokenizer, turns[0]), token_count(tokenizer, turns[1])
            output_len = reference_len if fixed_output_len is None else fixed_output_len
            if not valid_lengths(prompt_len, output_len, skip_min_output=fixed_output_len is not None):
                stats.filtered += 1
                continue
            prompts.append(Prompt(turns[0], reference_len, max_tokens=reference_len if fixed_output_len is None
                                  else None))
    stats.kept = len(prompts)
    if not prompts:
        raise UsageError(f"SHAREGPT_DIR={folder}: no usable conversations in {', '.join(stats.files)} "
                         f"({stats.entries} entries, {stats.malformed} malformed, {stats.filtered} filtered out by "
                         "length/turn rules)")
    return prompts, stats


def dataset_of(cfg) -> str:
    if cfg.dataset != "auto":
        return cfg.dataset
    return "sharegpt" if cfg.sharegpt_dir else "prompt_file"


def load_prompts(cfg, tokenizer) -> tuple[list[Prompt], LoadStats]:
    dataset = dataset_of(cfg)
    if dataset == "sharegpt":
        fixed = cfg.generation_length if cfg.sharegpt_output_len == "generation_length" else None
        return load_sharegpt(cfg.sharegpt_dir, tokenizer, fixed)
    if dataset != "prompt_file":
        return datasets.load(dataset, cfg, tokenizer)
    prompts = read_prompt_file(cfg.prompt_file)
    return prompts, LoadStats("prompt_file", [str(cfg.prompt_file)], len(prompts), 0, 0, len(prompts))


def truncate_for_batch(ids: list[int], max_new_tokens: int, cfg) -> list[int]:
    """Batching rule: a row holds at most MAX_BATCH_LENGTH tokens, so a prompt keeps its last
    MAX_BATCH_LENGTH - max new tokens (the end of a prompt is what the answer continues)."""
    if not cfg.enable_batch:
        return ids
    room = cfg.max_batch_length - max_new_tokens
    return ids[-room:] if len(ids) > room else ids


def max_new_tokens(prompt: Prompt, cfg) -> int:
    """The dataset's max tokens for the prompt, else GENERATION_LENGTH; under batching at most
    MAX_BATCH_LENGTH - 1, so one prompt token fits in the row."""
    n = prompt.max_tokens or cfg.generation_length
    return min(n, cfg.max_batch_length - 1) if cfg.enable_batch else n


def max_tokens_rule(cfg) -> str:
    """Where a request's max new tokens come from, in words (the dry run's plan)."""
    dataset = dataset_of(cfg)
    if dataset == "sharegpt" and cfg.sharegpt_output_len == "reference":
        return "each its reference answer's length (SHAREGPT_OUTPUT_LEN=reference)"
    if dataset == "custom":
        return f"each its output_tokens, else GENERATION_LENGTH={cfg.generation_length}"
    if dataset == "random":
        mean = cfg.random_output_len or cfg.generation_length
        return f"{mean} x [1 - {cfg.random_range_ratio:g}, 1 + {cfg.random_range_ratio:g}] (RANDOM_OUTPUT_LEN)"
    return f"GENERATION_LENGTH={cfg.generation_length}"


def build_requests(cfg, prompts: list[Prompt], tokenizer) -> list[Request]:
    """One request per arrival (lib/arrivals.py: NUM_PROMPTS at t=0, or a rate schedule). Prompts are taken in a
    seeded shuffled order, cycling when more requests than prompts are needed."""
    order = list(range(len(prompts)))
    random.Random(cfg.seed).shuffle(order)
    requests = []
    for i, arrival in enumerate(arrivals(cfg)):
        prompt = prompts[order[i % len(order)]]
        max_new = max_new_tokens(prompt, cfg)
        ids = truncate_for_batch(tokenizer.encode(prompt.text), max_new, cfg)
        requests.append(Request(i, prompt.text, ids, max_new, arrival, prompt.reference_output_len,
                                prompt.category))
    return requests


def describe_workload(cfg, requests: list[Request], stats: LoadStats) -> dict:
    mode = "rate" if rate_mode(cfg) else "fixed_count"
    rated = mode == "rate"
    return {
        "mode": mode, "num_requests": len(requests), "dataset": dataset_of(cfg),
        "rate_per_s": cfg.auto_rate if rated else None,
        "duration_s": cfg.auto_duration if rated and cfg.arrival_schedule == "speclab" else None,
        "arrival_schedule": cfg.arrival_schedule if rated else None,
        "burstiness": cfg.burstiness if rated else None,
        "ramp_up": {"strategy": cfg.ramp_up_strategy, "start_rps": cfg.ramp_up_start_rps,
                    "end_rps": cfg.ramp_up_end_rps} if cfg.ramp_up_strategy != "none" else None,
        "max_concurrency": cfg.max_concurrency or None,
        "batch_size": cfg.batch_size if cfg.enable_batch else 1,
        "max_batch_length": cfg.max_batch_length if cfg.enable_batch else None,
        "generation_length": cfg.generation_length,
        "max_new_tokens_mean": float(np.mean([r.max_new_tokens for r in requests])) if requests else 0.0,
        "prompt_tokens_mean": float(np.mean([len(r.prompt_ids) for r in requests])) if requests else 0.0,
        "source": stats.__dict__,
    }
