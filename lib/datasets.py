"""The datasets of `vllm bench serve` besides ShareGPT (DATASET): random, custom JSONL, Spec-Bench, prefix
repetition. random and prefix_repetition draw as vLLM's RandomDataset and PrefixRepetitionRandomDataset do
(vllm/benchmarks/datasets), so a seed gives vLLM's prompts; custom and spec_bench read the same files as vLLM's
CustomDataset and SpecBench (prompts are sent as plain text, as vLLM's --skip-chat-template sends them).
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lib import files
from lib.config import counted
from lib.errors import UsageError

MAX_RETRY = 10  # vLLM's decode-to-length rounds


@dataclass
class Prompt:
    text: str
    reference_output_len: int | None = None
    max_tokens: int | None = None  # the dataset's own max tokens for it (None: GENERATION_LENGTH)
    category: str | None = None


@dataclass
class LoadStats:
    source: str
    files: list[str] = field(default_factory=list)
    entries: int = 0
    malformed: int = 0
    filtered: int = 0
    kept: int = 0


MALFORMED = object()  # an entry that is not JSON
JSON_NAMES = {dict: "object", str: "string", int: "number", float: "number", bool: "boolean"}
JSON_ACCEPTED = "UTF-8 JSON: one object per line (.jsonl) or one array of them (.json)"


def json_entries(path: Path, label: str, array_of: str = "objects"):
    """The entries of a .jsonl file (one JSON value per line; MALFORMED for a line that is not JSON) or a .json
    file (one array; MALFORMED for the whole file when it is not JSON). A file that is not UTF-8, JSON nested too
    deeply, or a .json holding something other than an array is one UsageError naming the file (label)."""
    text = files.read_text(path, label, JSON_ACCEPTED, files.MAX_PROMPT_FILE_BYTES)
    if path.suffix == ".json" or text.lstrip().startswith("["):
        try:
            data = _json(text, label)
        except ValueError:  # not JSON, NaN, an integer past Python's digit limit
            yield MALFORMED
            return
        if not isinstance(data, list):
            found = JSON_NAMES.get(type(data), type(data).__name__)
            raise UsageError(f"{label}: holds a JSON {found}; expected an array of {array_of}")
        yield from data
        return
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield _json(line, f"{label}, line {number}")
        except ValueError:
            yield MALFORMED


def _json(text: str, label: str):
    try:
        return files.loads_json(text)
    except RecursionError:
        raise UsageError(f"{label}: JSON nested too deeply; expected {JSON_ACCEPTED}") from None


def decode_to_length(tokenizer, ids: list[int], target: int, draw_ints) -> tuple[str, list[int]]:
    """vLLM's gen_prompt_decode_to_target_len: decode, re-encode, pad with random ids or cut, until the text
    re-encodes to `target` tokens (at most MAX_RETRY rounds). draw_ints(high, size) draws the padding."""
    tries = MAX_RETRY
    while True:
        prompt = tokenizer.decode(ids)
        ids = tokenizer.encode(prompt, add_special_tokens=False)
        if tries <= 0 or len(ids) == target:
            return prompt, ids
        if len(ids) < target:
            ids.extend(draw_ints(tokenizer.vocab_size, target - len(ids)).tolist())
        else:
            ids = ids[:target]
        tries -= 1


def random_prompts(cfg, tokenizer, num: int) -> list[Prompt]:
    """vLLM's RandomDataset.sample: lengths uniform in [mean x (1 - r), mean x (1 + r)] (the input's mean less
    the tokenizer's special tokens), a shared random prefix, then allowed ids in sequence from a random offset."""
    rng = np.random.default_rng(cfg.seed)
    ratio, output_len = cfg.random_range_ratio, cfg.random_output_len or cfg.generation_length
    real_input = max(0, cfg.random_input_len - int(tokenizer.num_special_tokens_to_add()))
    in_low, in_high = math.floor(real_input * (1 - ratio)), math.ceil(real_input * (1 + ratio))
    out_low, out_high = max(math.floor(output_len * (1 - ratio)), 1), max(math.ceil(output_len * (1 + ratio)), 1)
    if cfg.random_prefix_len + in_low < 1:
        raise UsageError(f"RANDOM_INPUT_LEN={cfg.random_input_len}: with RANDOM_RANGE_RATIO={ratio:g} a prompt could "
                         "have no token; raise RANDOM_INPUT_LEN or RANDOM_PREFIX_LEN")
    input_lens = rng.integers(in_low, in_high + 1, size=num)
    output_lens = rng.integers(out_low, out_high + 1, size=num)
    offsets = rng.integers(0, tokenizer.vocab_size, size=num)
    allowed = np.array(sorted(set(range(tokenizer.vocab_size)) - set(tokenizer.all_special_ids)))

    def draw(high, size):
        return rng.integers(0, high, size=size)

    prefix: list[int] = []
    if cfg.random_prefix_len > 0:
        ids = allowed[rng.integers(0, len(allowed), size=cfg.random_prefix_len)].tolist()
        _, prefix = decode_to_length(tokenizer, ids, cfg.random_prefix_len, draw)
    prompts = []
    for i in range(num):
        inner = allowed[(int(offsets[i]) + i + np.arange(int(input_lens[i]))) % len(allowed)].tolist()
        text, _ = decode_to_length(tokenizer, prefix + inner, cfg.random_prefix_len + int(input_lens[i]), draw)
        prompts.append(Prompt(text, max_tokens=int(output_lens[i])))
    return prompts


def prefix_repetition_prompts(cfg, tokenizer, num: int) -> list[Prompt]:
    """vLLM's PrefixRepetitionRandomDataset.sample: PREFIX_REPETITION_NUM_PREFIXES random prefixes, each followed
    by num // prefixes random suffixes, shuffled; numpy's and Python's global generators seeded with SEED."""
    draw = np.random.RandomState(cfg.seed)
    shuffle = random.Random(cfg.seed)

    def tokens(length: int) -> list[int]:
        ids = draw.randint(0, tokenizer.vocab_size, size=length).tolist()
        return decode_to_length(tokenizer, ids, length, lambda high, size: draw.randint(0, high, size=size))[1]

    prompts = []
    for _ in range(cfg.prefix_repetition_num_prefixes):
        prefix = tokens(cfg.prefix_repetition_prefix_len)
        for _ in range(num // cfg.prefix_repetition_num_prefixes):
            prompts.append(Prompt(tokenizer.decode(prefix + tokens(cfg.prefix_repetition_suffix_len))))
    shuffle.shuffle(prompts)
    return prompts


def _count(value) -> int | None:
    """output_tokens of a JSONL entry: a positive integer, else None (the entry is malformed)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value != int(value) or value < 1:
        return None
    return int(value)


def custom_entry(entry) -> Prompt | None:
    """{"prompt": str, "output_tokens": int (optional), "category": str (optional)}; None when malformed."""
    if not isinstance(entry, dict) or not isinstance(entry.get("prompt"), str) or not entry["prompt"].strip():
        return None
    tokens = entry.get("output_tokens")
    category = entry.get("category")
    if (tokens is not None and _count(tokens) is None) or (category is not None and not isinstance(category, str)):
        return None
    return Prompt(entry["prompt"], max_tokens=_count(tokens) if tokens is not None else None, category=category)


def spec_bench_entry(entry) -> Prompt | None:
    """Spec-Bench's question.jsonl: {"question_id", "category": str, "turns": [str, ...]}; the prompt is the first
    turn (as vLLM's SpecBench dataset sends it)."""
    if not isinstance(entry, dict) or not isinstance(entry.get("category"), str):
        return None
    turns = entry.get("turns")
    if not isinstance(turns, list) or not turns or not all(isinstance(t, str) for t in turns) or not turns[0]:
        return None
    return Prompt(turns[0], category=entry["category"])


FILE_LAYOUTS = {"custom": (custom_entry, "JSON objects with a string 'prompt' (optional: a positive integer "
                                         "'output_tokens', a string 'category')"),
                "spec_bench": (spec_bench_entry, "JSON objects with a string 'category' and 'turns', a list of "
                                                 "strings (Spec-Bench's question.jsonl)")}


def load_file(kind: str, path: str) -> tuple[list[Prompt], LoadStats]:
    parse, expected = FILE_LAYOUTS[kind]
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"DATASET_PATH={path}: {files.not_a_file(p)} (DATASET={kind} reads one JSONL file of "
                         f"{expected})")
    stats, prompts = LoadStats(kind, [p.name]), []
    for entry in json_entries(p, f"DATASET_PATH={path}"):
        stats.entries += 1
        prompt = None if entry is MALFORMED else parse(entry)
        if prompt is None:
            stats.malformed += 1
        else:
            prompts.append(prompt)
    stats.kept = len(prompts)
    if not prompts:
        raise UsageError(f"DATASET_PATH={path}: no usable entry ({stats.entries} entries, {stats.malformed} "
                         f"malformed); DATASET={kind} expects one JSON object per line: {expected}")
    return prompts, stats


def load(kind: str, cfg, tokenizer) -> tuple[list[Prompt], LoadStats]:
    if kind in FILE_LAYOUTS:
        return load_file(kind, cfg.dataset_path)
    num = cfg.num_prompts if counted(cfg) else max(1, math.ceil(cfg.auto_rate * cfg.auto_duration))
    prompts = random_prompts(cfg, tokenizer, num) if kind == "random" else \
        prefix_repetition_prompts(cfg, tokenizer, max(num, cfg.prefix_repetition_num_prefixes))
    return prompts, LoadStats(kind, [], len(prompts), 0, 0, len(prompts))
