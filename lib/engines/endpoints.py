"""The URL an openai mode talks to, from TARGET_ENDPOINT / SPECULATIVE_ENDPOINT, checked once (lib/config.py's
validate) and read again by the engine. Imports nothing heavy: lib/config.py reads it."""
from __future__ import annotations

import urllib.parse

from lib.errors import UsageError

ENDPOINT_VARS = {"target": "TARGET_ENDPOINT", "speculative": "SPECULATIVE_ENDPOINT"}


def endpoint_url(cfg, method: str) -> str | None:
    """The base URL an openai mode talks to (no trailing / or /v1); None when ENDPOINT_LAUNCH starts the server."""
    name = ENDPOINT_VARS[method]
    raw = getattr(cfg, name.lower())
    if cfg.endpoint_launch != "none":
        return None
    accepted = "an http:// or https:// URL with a host, e.g. http://127.0.0.1:8000 (no query, no user:password@)"
    if not raw:
        raise UsageError(f"{name} is empty: the openai:{method} mode needs its server's URL, e.g. "
                         "http://127.0.0.1:8000 (or ENDPOINT_LAUNCH=vllm or llamacpp to start one)")
    try:
        parts = urllib.parse.urlsplit(raw)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        parts = None
    if (parts is None or parts.scheme not in ("http", "https") or not parts.hostname or parts.query
            or parts.fragment or parts.username or parts.password):
        raise UsageError(f"{name}={raw!r}: expected {accepted}")
    return raw.rstrip("/").removesuffix("/v1").rstrip("/")
