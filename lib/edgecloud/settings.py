"""The edge/cloud configuration: configs/edge_cloud.yaml is the schema and the defaults; a user's file and
experiment overrides are merged over it, and every key and value type is checked (one clear line on error)."""
from __future__ import annotations

import copy
from pathlib import Path

import yaml

from lib.errors import UsageError

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CONFIG = ROOT / "configs" / "edge_cloud.yaml"
FREE_FORM = {"experiments.ablations", "edge.confidence.weights"}  # checked where they are used


def _merge(base: dict, over: dict, where: str, source: str) -> dict:
    out = copy.deepcopy(base)
    for key, value in over.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in base:
            raise UsageError(f"{source}: unknown key {path} (known here: {', '.join(base)})")
        if isinstance(base[key], dict):
            if not isinstance(value, dict):
                raise UsageError(f"{source}: {path} must be a mapping")
            out[key] = _merge(base[key], value, path, source)
        elif path in FREE_FORM or base[key] is None:
            out[key] = value
        else:
            out[key] = _check_type(base[key], value, path, source)
    return out


def _check_type(default, value, path: str, source: str):
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        raise UsageError(f"{source}: {path}={value!r}: expected true or false")
    if isinstance(default, (int, float)):
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0:
            return type(default)(value) if isinstance(default, float) or float(value).is_integer() else value
        raise UsageError(f"{source}: {path}={value!r}: expected a number >= 0")
    if isinstance(default, str):
        if isinstance(value, str):
            return value
        raise UsageError(f"{source}: {path}={value!r}: expected text")
    return value


def read_yaml(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"--config {path}: no such file")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise UsageError(f"--config {path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise UsageError(f"--config {path}: expected a mapping of sections (edge, cloud, communication, ...)")
    return data


def load_config(path: str | Path | None = None) -> dict:
    cfg = read_yaml(DEFAULT_CONFIG)
    if path is not None and Path(path).resolve() != DEFAULT_CONFIG.resolve():
        cfg = _merge(cfg, read_yaml(path), "", f"--config {path}")
    validate(cfg, f"--config {path or DEFAULT_CONFIG.name}")
    return cfg


def apply_overrides(cfg: dict, overrides: dict, source: str) -> dict:
    out = _merge(cfg, overrides or {}, "", source)
    validate(out, source)
    return out


def validate(cfg: dict, source: str):
    conf = cfg["edge"]["confidence"]
    strategies = ("max_prob", "entropy", "temperature", "top_k_agg", "ensemble")
    if conf["strategy"] not in strategies:
        raise UsageError(f"{source}: edge.confidence.strategy={conf['strategy']!r}: expected one of "
                         f"{', '.join(strategies)}")
    for key in ("threshold", "accept_threshold"):
        if not 0 <= conf[key] <= 1:
            raise UsageError(f"{source}: edge.confidence.{key}={conf[key]}: expected a number in [0, 1]")
    weights = conf["weights"]
    if not (isinstance(weights, list) and len(weights) == 4 and all(isinstance(w, (int, float)) and w >= 0
                                                                    for w in weights) and sum(weights) > 0):
        raise UsageError(f"{source}: edge.confidence.weights={weights!r}: expected 4 numbers >= 0 "
                         "(max_prob, entropy, temperature, top_k_agg), not all 0")
    if not 0 <= cfg["edge"]["draft"]["max_draft_tokens"] <= 64:
        raise UsageError(f"{source}: edge.draft.max_draft_tokens: expected 0..64")
    if cfg["cloud"]["model"]["engine"] not in ("hf", "vllm"):
        raise UsageError(f"{source}: cloud.model.engine={cfg['cloud']['model']['engine']!r}: expected hf "
                         "(PyTorch/transformers) or vllm (greedy verification only)")
    if cfg["cloud"]["model"]["engine"] == "vllm" and cfg["inference"]["temperature"] > 0:
        raise UsageError(f"{source}: cloud.model.engine=vllm verifies greedy drafts only: set "
                         "inference.temperature to 0 or use cloud.model.engine: hf")
    for exp in cfg["experiments"]["ablations"] or []:
        if not isinstance(exp, dict) or not isinstance(exp.get("name"), str):
            raise UsageError(f"{source}: experiments.ablations: every entry needs a name and config_overrides")


def cloud_model_dir(cfg: dict) -> Path:
    from lib.models import check_model_dir, ensure_tiny_models
    path = cfg["cloud"]["model"]["path"]
    return check_model_dir(path, "cloud.model.path") if path else ensure_tiny_models(log=lambda *a: None).target


def edge_gguf_path(cfg: dict, log=print) -> Path:
    from lib.gguf_export import ensure_gguf
    from lib.models import ensure_tiny_models
    model = cfg["edge"]["model"]
    if model["path"]:
        if not Path(model["path"]).is_file():
            raise UsageError(f"edge.model.path={model['path']}: no such GGUF file")
        return Path(model["path"])
    return ensure_gguf(model["hf_path"] or ensure_tiny_models(log=log).draft, log=log)


def tokenizer_dir(cfg: dict) -> Path:
    """Edge and cloud share one tokenizer: the cloud target's (the tiny one by default)."""
    return cloud_model_dir(cfg)
