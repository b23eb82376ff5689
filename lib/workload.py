"""Prompts (prompt files, ShareGPT) and request schedules (fixed count, rate x duration, batching)."""
from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lib import files
from lib.errors import UsageError
from lib.types import Request

SHAREGPT_FILES = ("sharegpt_gpt4.jsonl", "sharegpt_V3_format.jsonl", "sharegpt_zh_38K_format.jsonl")
JSON_NAMES = {dict: "object", str: "string", int: "number", float: "number", bool: "boolean"}
SHAREGPT_ACCEPTED = "UTF-8 JSON: one conversation object per line (.jsonl) or one array of them (.json)"


@dataclass
class Prompt:
    text: str
    reference_output_len: int | None = None


@dataclass
class LoadStats:
    source: str
    files: list[str] = field(default_factory=list)
    entries: int = 0
    malformed: int = 0
    filtered: int = 0
    kept: int = 0


def read_prompt_file(path: str | Path) -> list[Prompt]:
    return [Prompt(text) for text in files.read_prompt_file(path, f"PROMPT_FILE={path}")]


def _conversation_entries(path: Path, stats: LoadStats):
    """Yield the entries of a .jsonl file (one JSON object per line) or a .json file (one array)."""
    label = f"SHAREGPT_DIR file {path}"
    text = files.read_text(path, label, SHAREGPT_ACCEPTED, files.MAX_PROMPT_FILE_BYTES)
    if path.suffix == ".json" or text.lstrip().startswith("["):
        try:
            data = _json(text, label)
        except json.JSONDecodeError:  # one entry, malformed: entries = malformed + filtered + kept
            stats.entries += 1
            stats.malformed += 1
            return
        if not isinstance(data, list):
            found = JSON_NAMES.get(type(data), type(data).__name__)
            raise UsageError(f"{label}: holds a JSON {found}; expected an array of conversations "
                             '([{"conversations": [{"from": ..., "value": ...}, ...]}, ...])')
        yield from data
        return
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield _json(line, f"{label}, line {number}")
        except json.JSONDecodeError:
            stats.entries += 1
            stats.malformed += 1


def _json(text: str, label: str):
    try:
        return json.loads(text)
    except RecursionError:
        raise UsageError(f"{label}: JSON nested too deeply; expected {SHAREGPT_ACCEPTED}") from None


def _turns(entry) -> list[str] | None:
    turns = entry.get("conversations") if isinstance(entry, dict) else None
    if not isinstance(turns, list):
        return None
    values = [t.get("value") for t in turns if isinstance(t, dict)]
    if len(values) != len(turns) or not all(isinstance(v, str) for v in values):
        return None
    return values


def load_sharegpt(folder: str | Path, tokenizer) -> tuple[list[Prompt], LoadStats]:
    """vLLM bench's ShareGPT rules: >= 2 turns; prompt = turn 0, reference output = turn 1; drop prompt or
    output < 4 tokens, prompt > 1024, prompt + output > 2048. Malformed lines are skipped and counted."""
    d = Path(folder)
    if not d.is_dir():
        raise UsageError(f"SHAREGPT_DIR={folder}: no such folder (expected a folder with "
                         f"{', '.join(SHAREGPT_FILES)} or *.json arrays)")
    files = [d / f for f in SHAREGPT_FILES if (d / f).is_file()] or sorted(d.glob("*.json")) + sorted(
        d.glob("*.jsonl"))
    if not files:
        raise UsageError(f"SHAREGPT_DIR={folder}: none of {', '.join(SHAREGPT_FILES)} (or any *.json/*.jsonl) "
                         "is in the folder")
    stats, prompts = LoadStats("sharegpt", [f.name for f in files]), []
    for f in files:
        for entry in _conversation_entries(f, stats):
            stats.entries += 1
            turns = _turns(entry)
            if turns is None:
                stats.malformed += 1
                continue
            if len(turns) < 2:
                stats.filtered += 1
                continue
            prompt_len = len(tokenizer.encode(turns[0], add_special_tokens=False))
            output_len = len(tokenizer.encode(turns[1], add_special_tokens=False))
            if prompt_len < 4 or output_len < 4 or prompt_len > 1024 or prompt_len + output_len > 2048:
                stats.filtered += 1
                continue
            prompts.append(Prompt(turns[0], output_len))
    stats.kept = len(prompts)
    if not prompts:
        raise UsageError(f"SHAREGPT_DIR={folder}: no usable conversations in {', '.join(stats.files)} "
                         f"({stats.entries} entries, {stats.malformed} malformed, {stats.filtered} filtered out by "
                         "length/turn rules)")
    return prompts, stats


def load_prompts(cfg, tokenizer) -> tuple[list[Prompt], LoadStats]:
    if cfg.sharegpt_dir:
        return load_sharegpt(cfg.sharegpt_dir, tokenizer)
    prompts = read_prompt_file(cfg.prompt_file)
    return prompts, LoadStats("prompt_file", [str(cfg.prompt_file)], len(prompts), 0, 0, len(prompts))


def poisson_arrivals(rate: float, duration: float, seed: int) -> list[float]:
    """Arrival offsets in [0, duration): exponential inter-arrival times (drawn as gamma with shape 1, the draw
    vLLM's benchmark uses at burstiness 1, so a seed gives the same schedule)."""
    rng = np.random.default_rng(seed)
    times, t = [], 0.0
    while True:
        t += rng.gamma(shape=1.0, scale=1.0 / rate)
        if t >= duration:
            return times
        times.append(float(t))


def truncate_for_batch(ids: list[int], cfg) -> list[int]:
    """Batching rule: a row holds at most MAX_BATCH_LENGTH tokens, so a prompt keeps its last
    MAX_BATCH_LENGTH - GENERATION_LENGTH tokens (the end of a prompt is what the answer continues)."""
    if not cfg.enable_batch:
        return ids
    room = cfg.max_batch_length - cfg.generation_length
    return ids[-room:] if len(ids) > room else ids


def build_requests(cfg, prompts: list[Prompt], tokenizer) -> list[Request]:
    """Fixed count: NUM_PROMPTS requests at t=0. Rate mode: AUTO_RATE x AUTO_DURATION Poisson arrivals.
    Prompts are taken in a seeded shuffled order, cycling when more requests than prompts are needed."""
    if cfg.auto_rate > 0:
        arrivals = poisson_arrivals(cfg.auto_rate, cfg.auto_duration, cfg.seed)
    else:
        arrivals = [0.0] * cfg.num_prompts
    order = list(range(len(prompts)))
    random.Random(cfg.seed).shuffle(order)
    requests = []
    for i, arrival in enumerate(arrivals):
        prompt = prompts[order[i % len(order)]]
        ids = truncate_for_batch(tokenizer.encode(prompt.text), cfg)
        requests.append(Request(i, prompt.text, ids, cfg.generation_length, arrival, prompt.reference_output_len))
    return requests


def describe_workload(cfg, requests: list[Request], stats: LoadStats) -> dict:
    mode = "rate" if cfg.auto_rate > 0 else "fixed_count"
    return {
        "mode": mode, "num_requests": len(requests),
        "rate_per_s": cfg.auto_rate if mode == "rate" else None,
        "duration_s": cfg.auto_duration if mode == "rate" else None,
        "batch_size": cfg.batch_size if cfg.enable_batch else 1,
        "max_batch_length": cfg.max_batch_length if cfg.enable_batch else None,
        "generation_length": cfg.generation_length,
        "prompt_tokens_mean": float(np.mean([len(r.prompt_ids) for r in requests])) if requests else 0.0,
        "source": stats.__dict__,
    }
