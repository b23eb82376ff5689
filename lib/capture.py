"""Capture files: what the target saw at every emitted token of an SD run, for one engine and configuration.

A capture is two files with one stem (logits_capture_<config>, vllm_capture_<config>, sglang_capture_<config>):
  <stem>.json         {"schema": "speclab.capture/1", engine, config, models, spec counters, and per prompt: the
                      prompt, its ids, the emitted token ids, text, per-round trees and acceptance}
  <stem>.safetensors  per prompt i: "i.topk_ids" [N, K] int64, "i.topk_logprobs" [N, K] float32 and, where the
                      engine exposes them, "i.topk_logits" [N, K] and "i.full_logits" [N, V]
Row n describes the distribution the n-th emitted token was chosen from. accept_lengths are tokens emitted per
target verification round, bonus token included (so their mean is acceptance_length as docs/design.md defines it).
A legacy pickle (.pkl) is read only through RestrictedUnpickler: plain containers, numbers, strings and numpy
arrays; anything else (functions, classes, os.system...) is refused before it can run.
"""
from __future__ import annotations

import io
import json
import pickle
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import ConfigDict, Field

from lib.config_models import Accepts, ConfigModel, validate_model
from lib.errors import UsageError
from lib.files import not_a_file, output_dir, write_json
from lib.types import SpecCounters

SCHEMA = "speclab.capture/1"
PREFIXES = {"reference": "logits_capture", "vllm": "vllm_capture", "sglang": "sglang_capture"}


@dataclass
class PromptCapture:
    prompt: str
    prompt_ids: list[int]
    token_ids: list[int]
    topk_ids: np.ndarray  # [N, K] int64
    topk_logprobs: np.ndarray  # [N, K] float32
    topk_logits: np.ndarray | None = None  # [N, K]
    full_logits: np.ndarray | None = None  # [N, V]
    text: str = ""
    step_round: list[int] = field(default_factory=list)  # round that emitted each token (0 = prefill)
    rounds: list[dict] = field(default_factory=list)  # tree_tokens, tree_parents, accepted_path, accept_length...
    accept_lengths: list[int] = field(default_factory=list)
    spec: dict = field(default_factory=dict)  # num_drafts, draft_tokens, accepted_tokens, accepted_per_position
    seconds: float = 0.0


@dataclass
class Capture:
    engine: str
    config_name: str
    config: dict
    models: dict
    prompts: list[PromptCapture]
    extra: dict = field(default_factory=dict)
    source: str = ""  # the file it was read from

    def spec_totals(self) -> dict:
        total = SpecCounters()
        for p in self.prompts:
            total = total.add(SpecCounters(*(int(p.spec.get(key, 0)) for key in ("num_drafts", "draft_tokens",
                                                                                  "accepted_tokens")),
                                           p.spec.get("accepted_per_position", [])))
        return asdict(total)


def topk_from_logits(logits, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids, logprobs, logits) of the k largest logits of a [N, V] torch tensor."""
    import torch
    logits = logits.float()
    logprobs = torch.log_softmax(logits, -1)
    values, ids = logits.topk(min(k, logits.shape[-1]), -1)
    return ids.numpy().astype(np.int64), logprobs.gather(-1, ids).numpy(), values.numpy()


def capture_stem(engine: str, config_name: str) -> str:
    return f"{PREFIXES[engine]}_{config_name}"


# ---------------------------------------------------------------------------------------------- writing

def save_capture(capture: Capture, out_dir: str | Path, stem: str | None = None) -> Path:
    """Write <stem>.safetensors and <stem>.json (the JSON last, so a present JSON means a complete capture)."""
    from safetensors.numpy import save_file
    out = output_dir(out_dir, f"capture folder {out_dir}")
    stem = stem or capture_stem(capture.engine, capture.config_name)
    tensors, prompts = {}, []
    for i, p in enumerate(capture.prompts):
        tensors[f"{i}.topk_ids"] = np.ascontiguousarray(p.topk_ids, dtype=np.int64)
        tensors[f"{i}.topk_logprobs"] = np.ascontiguousarray(p.topk_logprobs, dtype=np.float32)
        for name in ("topk_logits", "full_logits"):
            if getattr(p, name) is not None:
                tensors[f"{i}.{name}"] = np.ascontiguousarray(getattr(p, name), dtype=np.float32)
        prompts.append({"prompt": p.prompt, "prompt_ids": list(map(int, p.prompt_ids)),
                        "token_ids": list(map(int, p.token_ids)), "text": p.text, "step_round": p.step_round,
                        "rounds": p.rounds, "accept_lengths": p.accept_lengths, "spec": p.spec,
                        "seconds": p.seconds})
    save_file(tensors, str(out / f"{stem}.safetensors"))
    meta = {"schema": SCHEMA, "engine": capture.engine, "config_name": capture.config_name,
            "config": capture.config, "models": capture.models, "spec_totals": capture.spec_totals(),
            "extra": capture.extra, "tensors": f"{stem}.safetensors", "prompts": prompts}
    write_json(out / f"{stem}.json", meta)
    return out / f"{stem}.json"


# ---------------------------------------------------------------------------------------------- reading

MAX_ACCEPT_LENGTH = 1025  # a round emits at most the tree's nodes (spec_tree_size <= 1024) + the bonus token
TokenId = Annotated[int, Field(ge=0)]


class _CaptureModel(ConfigModel):
    """The JSON half of a capture, as save_capture writes it: strict types, so a field of the wrong type is one line
    naming it. Keys added by a later version are ignored (captures are data, not configs)."""
    model_config = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False)


Count = Annotated[int, Field(ge=0)]


class SpecMeta(_CaptureModel):
    num_drafts: Count = 0
    draft_tokens: Count = 0
    accepted_tokens: Count = 0
    accepted_per_position: list[Count] = []


class PromptMeta(_CaptureModel):
    prompt: str
    prompt_ids: list[TokenId]
    token_ids: list[TokenId]
    text: str = ""
    step_round: list[Annotated[int, Field(ge=0)]] = []
    rounds: list[dict[str, Any]] = []
    accept_lengths: Annotated[list[Annotated[int, Field(ge=1, le=MAX_ACCEPT_LENGTH)]],
                              Accepts(f"a list of whole numbers from 1 to {MAX_ACCEPT_LENGTH} (tokens emitted per "
                                      "verification round, bonus included)")] = []
    spec: SpecMeta = SpecMeta()
    seconds: Annotated[float, Field(ge=0)] = 0.0


class CaptureMeta(_CaptureModel):
    schema_: Literal[SCHEMA] = Field(alias="schema")
    engine: str
    config_name: str
    config: dict[str, Any] = {}
    models: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    tensors: str = ""
    prompts: list[PromptMeta]

def load_capture(path: str | Path) -> Capture:
    """Read a capture from its .json, its .safetensors, its stem, or a legacy .pkl; bad input -> UsageError."""
    p = Path(path)
    if p.suffix == ".pkl":
        return _load_legacy_pickle(p)
    json_path = p.with_suffix(".json") if p.suffix in (".safetensors", "") else p
    if p.suffix == "" and not json_path.exists() and p.with_suffix(".pkl").exists():
        return _load_legacy_pickle(p.with_suffix(".pkl"))
    if not json_path.is_file():
        which = "" if json_path == p else f"{json_path}: "  # a .safetensors or a stem named: its .json is missing
        raise UsageError(f"capture {path}: {which}{not_a_file(json_path)} (expected <stem>.json + <stem>.safetensors "
                         "or a .pkl)")
    try:
        data = json.loads(json_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise UsageError(f"capture {json_path}: not valid JSON ({exc.__class__.__name__}: {exc})") from None
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        raise UsageError(f"capture {json_path}: schema {data.get('schema') if isinstance(data, dict) else None!r}, "
                         f"expected {SCHEMA!r}")
    meta = validate_model(CaptureMeta, data, f"capture {json_path}")
    tensor_path = json_path.parent / (meta.tensors or json_path.stem + ".safetensors")
    tensors = _read_tensors(tensor_path)
    prompts = [_prompt_from(entry, i, tensors, tensor_path) for i, entry in enumerate(meta.prompts)]
    return Capture(meta.engine, meta.config_name, meta.config, meta.models, prompts, meta.extra, str(json_path))


def _read_tensors(path: Path) -> dict:
    from safetensors.numpy import load_file
    if not path.is_file():
        raise UsageError(f"capture {path}: {not_a_file(path)}; the tensor file of a capture (<stem>.json + "
                         "<stem>.safetensors)")
    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors raises its own error type for truncated/corrupt files
        raise UsageError(f"capture {path}: unreadable safetensors file (truncated or corrupt: {exc})") from None


TENSORS = ("topk_ids", "topk_logprobs", "topk_logits", "full_logits")  # the first two are required


def _prompt_from(entry: PromptMeta, i: int, tensors: dict, tensor_path: Path) -> PromptCapture:
    label = f"capture {tensor_path}: prompt {i}"
    arrays = {name: tensors[f"{i}.{name}"] for name in TENSORS if f"{i}.{name}" in tensors}
    missing = next((name for name in TENSORS[:2] if name not in arrays), None)
    if missing:
        raise UsageError(f"capture {tensor_path}: tensor {f'{i}.{missing}'!r} missing")
    _check_arrays(arrays, entry.token_ids, label, "; the files do not match")
    return _prompt_capture(entry, arrays)


def _prompt_capture(entry: PromptMeta, arrays: dict) -> PromptCapture:
    return PromptCapture(entry.prompt, entry.prompt_ids, entry.token_ids, arrays["topk_ids"],
                         arrays["topk_logprobs"], arrays.get("topk_logits"), arrays.get("full_logits"),
                         entry.text, entry.step_round, entry.rounds, entry.accept_lengths,
                         entry.spec.model_dump(exclude_unset=True), entry.seconds)


def _check_arrays(arrays: dict, token_ids: list[int], label: str, mismatch: str):
    """A prompt's arrays fit its tokens, as the comparison indexes them: each [N, >= 1] with one row per emitted
    token, the top-k logits and log-probs of the top-k ids' shape, every token id inside the full logits' columns.
    Else one UsageError naming `label` (mismatch ends the line where the arrays come from a second file)."""
    n = len(token_ids)
    for name, array in arrays.items():
        if array.ndim != 2 or array.shape[0] != n or array.shape[1] == 0:
            raise UsageError(f"{label}: {name} has shape {list(array.shape)}, expected [{n}, K] with K >= 1 (one "
                             f"row per emitted token){mismatch}")
    shape = arrays["topk_ids"].shape
    odd = next((name for name in ("topk_logprobs", "topk_logits") if name in arrays and arrays[name].shape != shape),
               None)
    if odd:
        raise UsageError(f"{label}: topk_ids and {odd} differ in shape ({list(shape)} and "
                         f"{list(arrays[odd].shape)}){mismatch}")
    if "full_logits" in arrays:
        vocab = arrays["full_logits"].shape[1]
        bad = next((t for t in [*token_ids, *arrays["topk_ids"].ravel().tolist()] if t >= vocab), None)
        if bad is not None:
            raise UsageError(f"{label}: token id {bad} is outside the {vocab} columns of its full_logits{mismatch}")


# ---------------------------------------------------------------------------------------------- legacy pickle

class RestrictedUnpickler(pickle.Unpickler):
    """Plain data and numpy arrays only: every global a pickle names must be on this allowlist."""
    ALLOWED = {
        ("builtins", "dict"), ("builtins", "list"), ("builtins", "tuple"), ("builtins", "set"),
        ("builtins", "frozenset"), ("builtins", "int"), ("builtins", "float"), ("builtins", "str"),
        ("builtins", "bytes"), ("builtins", "bool"), ("builtins", "complex"), ("collections", "OrderedDict"),
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refused global {module}.{name} (only plain data and numpy arrays)")
        return super().find_class(module, name)


def restricted_loads(data: bytes):
    return RestrictedUnpickler(io.BytesIO(data)).load()


def _load_legacy_pickle(path: Path) -> Capture:
    """Legacy pickles: a dict (or a list of dicts, one per prompt) with token ids, logits, accept lengths."""
    if not path.is_file():
        raise UsageError(f"capture {path}: {not_a_file(path)}")
    try:
        data = restricted_loads(path.read_bytes())
    except pickle.UnpicklingError as exc:
        raise UsageError(f"capture {path}: unsafe or invalid pickle ({exc}); only plain data and numpy arrays "
                         "are read") from None
    except Exception as exc:
        raise UsageError(f"capture {path}: unreadable pickle ({exc.__class__.__name__}: {exc})") from None
    entries = data if isinstance(data, list) else [data]
    if not entries or not all(isinstance(e, dict) for e in entries):
        raise UsageError(f"capture {path}: expected a dict or a list of dicts in the pickle")
    prompts = [_legacy_prompt(e, f"capture {path}" + (f": entry {i}" if len(entries) > 1 else ""))
               for i, e in enumerate(entries)]
    first = entries[0]
    config_name = str(first.get("config_name", path.stem))
    return Capture(str(first.get("engine", "legacy")), config_name, {}, {}, prompts, {"legacy_pickle": True},
                   str(path))


def _legacy_prompt(entry: dict, label: str) -> PromptCapture:
    """A legacy entry's fields go through PromptMeta, as a JSON capture's do; its logits become the arrays."""
    import torch
    tokens = next((entry[k] for k in ("token_ids", "tokens", "generated_tokens") if k in entry), None)
    logits = next((entry[k] for k in ("logits", "step_logits", "all_logits") if k in entry), None)
    if tokens is None or logits is None:
        raise UsageError(f"{label}: legacy pickle needs 'token_ids' (or 'tokens') and 'logits' "
                         f"(one row per token); found keys {sorted(map(str, entry))}")
    meta = validate_model(PromptMeta, {
        "prompt": _plain(entry.get("prompt", "")), "prompt_ids": _plain(entry.get("prompt_ids", [])),
        "token_ids": _plain(tokens), "accept_lengths": _plain(entry.get("accept_lengths",
                                                                         entry.get("accept_length", [])))}, label)
    try:
        logits = torch.as_tensor(np.asarray(logits, dtype=np.float32)).reshape(len(meta.token_ids), -1)
    except (ValueError, TypeError, RuntimeError) as exc:
        raise UsageError(f"{label}: legacy 'logits' do not fit {len(meta.token_ids)} tokens ({exc})") from None
    if logits.shape[1] == 0:
        raise UsageError(f"{label}: legacy 'logits' have no columns; expected one row of logits per token")
    ids, logprobs, values = topk_from_logits(logits, 20)
    arrays = {"topk_ids": ids, "topk_logprobs": logprobs, "topk_logits": values, "full_logits": logits.numpy()}
    _check_arrays(arrays, meta.token_ids, label, "")
    return _prompt_capture(meta, arrays)


def _plain(value):
    """numpy arrays and scalars, and tuples, as the lists and numbers of a JSON capture (PromptMeta is strict)."""
    if isinstance(value, (np.ndarray, np.generic)):
        return value.tolist()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
