"""The edge/cloud configuration: configs/edge_cloud.yaml holds the defaults, EdgeCloudConfig the schema. A user's
file and experiment overrides are merged over the defaults, then every key and value is checked (one clear line
on error)."""
from __future__ import annotations

import ipaddress
import re
from pathlib import Path
from typing import Annotated, Any

from pydantic import AfterValidator, Field, field_validator

from lib.config_models import Accepts, ConfigModel, choice, validate_model
from lib.edgecloud.protocol import MAX_SEED, MAX_TEMPERATURE, MAX_TOKENS, MIN_TEMPERATURE, Temperature
from lib.errors import UsageError, check_bearer_token
from lib.files import ROOT, load_yaml, shipped

DEFAULT_CONFIG = ROOT / "configs" / "edge_cloud.yaml"
STRATEGIES = ("max_prob", "entropy", "temperature", "top_k_agg", "ensemble")
MODES = ("collaborative", "edge_only", "cloud_only")

Threads = Annotated[int, Field(ge=0, le=1024)]  # 0 = the library's default
Positive = Annotated[int, Field(ge=1)]
Amount = Annotated[float, Field(ge=0)]
Fraction = Annotated[float, Field(ge=0, le=1)]
Port = Annotated[int, Field(ge=1, le=65535)]
_HOST_LABEL = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_-]*[A-Za-z0-9_])?")


def is_host(host: str) -> bool:
    """An IP address or a host name whose dot-separated labels the socket layer can encode (no empty label)."""
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        pass
    try:
        labels = host.encode("idna").decode().split(".")
    except UnicodeError:
        return False
    return all(_HOST_LABEL.fullmatch(label) for label in labels)


def _host(host: str) -> str:
    if not is_host(host):
        raise ValueError(f"{host!r} is not an IP address or host name")
    return host


def _endpoint(url: str) -> str:
    from urllib.parse import urlsplit
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"{url!r}: {exc}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname or (port is not None and port < 1) or \
            not is_host(parts.hostname):
        raise ValueError(f"{url!r} is not an http(s)://host:port URL")
    return url


def _bearer_token(token: str) -> str:
    try:
        return check_bearer_token(token, "")
    except UsageError as exc:  # its message starts with `what: `; the config's error line names the key itself
        raise ValueError(str(exc).removeprefix(": ")) from None


Host = Annotated[str, AfterValidator(_host),
                 Accepts("an IP address or a host name (letters, digits, hyphens; dot-separated)")]
Endpoint = Annotated[str, AfterValidator(_endpoint), Accepts("an http(s)://host:port URL, port 1 to 65535")]
BearerToken = Annotated[str, AfterValidator(_bearer_token),
                        Accepts("visible ASCII characters (no spaces), or empty for no auth")]


class Server(ConfigModel):
    host: Host
    port: Port


class EdgeModel(ConfigModel):
    path: str
    hf_path: str
    context_length: Annotated[int, Field(ge=0, le=1 << 20)]  # 0 = the model's own
    n_threads: Threads


class Confidence(ConfigModel):
    strategy: str  # checked in validate(), which keeps the error line scripts already print
    weights: Annotated[list[Amount], Field(min_length=4, max_length=4),
                       Accepts("4 numbers >= 0 (max_prob, entropy, temperature, top_k_agg), not all 0")]
    threshold: Fraction
    accept_threshold: Fraction
    top_k: Positive

    @field_validator("weights")
    @classmethod
    def _not_all_zero(cls, weights):
        if not sum(weights):
            raise ValueError("all weights are 0")
        return weights


class Draft(ConfigModel):
    max_draft_tokens: Annotated[int, Field(ge=0, le=64)]


class EdgeCache(ConfigModel):
    enabled: bool
    max_size: Annotated[int, Field(ge=0, le=4096)]


class Edge(ConfigModel):
    model: EdgeModel
    server: Server
    confidence: Confidence
    draft: Draft
    kv_cache: EdgeCache


class CloudModel(ConfigModel):
    path: str
    engine: Annotated[choice("engine", ("hf", "vllm")),
                      Accepts("hf (PyTorch/transformers), vllm (greedy verification only)")]
    dtype: choice("dtype", ("float32", "float16", "bfloat16"))
    n_threads: Threads


class CloudCache(ConfigModel):
    enabled: bool
    block_size: Annotated[int, Field(ge=1, le=4096)]
    max_blocks: Annotated[int, Field(ge=1, le=1 << 24)]


class Cloud(ConfigModel):
    model: CloudModel
    server: Server
    kv_cache: CloudCache


class HttpClient(ConfigModel):
    timeout: Annotated[float, Field(gt=0)]
    max_retries: Annotated[int, Field(ge=0, le=100)]
    backoff_s: Annotated[float, Field(ge=0, le=600)]
    connection_pool_size: Annotated[int, Field(ge=1, le=1024)]


class Communication(ConfigModel):
    edge_endpoint: Endpoint
    cloud_endpoint: Endpoint
    auth_token: BearerToken
    max_body_bytes: Annotated[int, Field(ge=1, le=1 << 30)]
    network_delay_ms: Annotated[float, Field(ge=0, le=600_000)]
    fallback_to_edge: bool
    http_client: HttpClient


class Features(ConfigModel):
    use_draft_verify: bool
    use_confidence_check: bool
    use_kv_cache: bool
    accept_confident_drafts: bool


class Inference(ConfigModel):
    max_tokens: Annotated[int, Field(ge=1, le=MAX_TOKENS)]  # what the servers' /v1/generate accepts
    temperature: Annotated[Temperature, Accepts(f"a number from 0 to {MAX_TEMPERATURE}: 0 (greedy) or at least "
                                                f"{MIN_TEMPERATURE:g}")]
    seed: Annotated[int, Field(ge=0, le=MAX_SEED)]
    features: Features


class Ablation(ConfigModel):
    name: str
    description: str = ""
    config_overrides: Annotated[dict[str, Any], Accepts("a mapping of sections merged over the config (edge, "
                                                        "cloud, communication, inference)")] = {}
    mode: choice("mode", MODES) = "collaborative"


class Experiments(ConfigModel):
    prompts_file: str
    num_prompts: Positive
    output_dir: str
    ablations: list[Ablation] = []


class EdgeCloudConfig(ConfigModel):
    edge: Edge
    cloud: Cloud
    communication: Communication
    inference: Inference
    experiments: Experiments


def _merge(base: dict, over: dict) -> dict:
    """`over` merged into `base`, mapping by mapping; any other value of `over` replaces the one in `base`."""
    out = dict(base)
    for key, value in over.items():
        both = isinstance(value, dict) and isinstance(base.get(key), dict)
        out[key] = _merge(base[key], value) if both else value
    return out


def read_yaml(path: str | Path) -> dict:
    return load_yaml(path, f"--config {path}", "a mapping of sections (edge, cloud, communication, ...)")


def load_config(path: str | Path | None = None) -> dict:
    cfg = read_yaml(DEFAULT_CONFIG)
    cfg["experiments"]["prompts_file"] = str(shipped(cfg["experiments"]["prompts_file"]))  # the shipped prompts
    if path is not None and Path(path).resolve() != DEFAULT_CONFIG.resolve():
        cfg = _merge(cfg, read_yaml(path))
    return validate(cfg, f"--config {path or DEFAULT_CONFIG.name}")


def apply_overrides(cfg: dict, overrides: dict, source: str) -> dict:
    return validate(_merge(cfg, overrides or {}), source)


def validate(cfg: dict, source: str) -> dict:
    """The checked config as plain data, or one line naming `source` and the key."""
    cfg = validate_model(EdgeCloudConfig, cfg, source).model_dump()
    strategy = cfg["edge"]["confidence"]["strategy"]
    if strategy not in STRATEGIES:
        raise UsageError(f"{source}: edge.confidence.strategy={strategy!r}: expected one of {', '.join(STRATEGIES)}")
    if cfg["cloud"]["model"]["engine"] == "vllm" and cfg["inference"]["temperature"] > 0:
        raise UsageError(f"{source}: cloud.model.engine=vllm verifies greedy drafts only: set "
                         "inference.temperature to 0 or use cloud.model.engine: hf")
    return cfg


def cloud_model_dir(cfg: dict) -> Path:
    from lib.models import check_model_dir, ensure_tiny_models
    path = cfg["cloud"]["model"]["path"]
    return check_model_dir(path, "cloud.model.path", tokenizer=True) if path else ensure_tiny_models().target


def edge_gguf_path(cfg: dict) -> Path:
    from lib.gguf_export import ensure_gguf
    from lib.models import check_gguf, ensure_tiny_models
    model = cfg["edge"]["model"]
    if model["path"]:
        return check_gguf(model["path"], f"edge.model.path={model['path']}")
    if model["hf_path"]:
        return ensure_gguf(model["hf_path"], "edge.model.hf_path")
    return ensure_gguf(ensure_tiny_models().draft)


def tokenizer_dir(cfg: dict) -> Path:
    """Edge and cloud share one tokenizer: the cloud target's (the tiny one by default)."""
    return cloud_model_dir(cfg)
