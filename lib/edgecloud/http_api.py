"""The edge and cloud HTTP servers (FastAPI on uvicorn).

Both have /health and /stats, an optional bearer token, a request-body size limit, and answer bad input with a
4xx JSON body {"error": ...}: malformed JSON or wrong fields (strict JSON types, no NaN) 422, token ids outside
the vocabulary or a context longer than the model's 422, a body over the limit 413, a missing or wrong token 401
(checked before the body is read), a body that cannot be parsed 400, an unknown path 404; a failure of the server
itself 500 with the same shape. The listening socket is bound before anything claims the server is up: an address
that cannot be had is a UsageError naming it.
"""
from __future__ import annotations

import hmac
import socket
import threading
import time

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from lib.edgecloud.protocol import (
    DraftRequest,
    DraftResponse,
    GenerateRequest,
    GenerateResponse,
    VerifyRequest,
    VerifyResponse,
    check_dists,
    check_length,
    check_vocab,
    validation_problem,
)
from lib.errors import UsageError, check_bearer_token

PUBLIC_PATHS = ("/health",)  # every other path needs the bearer token, when one is set


def _base_app(title: str, role: str, auth_token: str, max_body_bytes: int, describe: dict) -> FastAPI:
    """The app with what both servers share: the bearer token and the body limit (checked before any body is
    read), {"error": ...} answers, /health."""
    check_bearer_token(auth_token, f"{role} server auth_token")
    app = FastAPI(title=title, docs_url=None, redoc_url=None)
    started = time.time()

    @app.middleware("http")
    async def guard(request: Request, call_next):
        if request.url.path not in PUBLIC_PATHS and not _authorized(request, auth_token):
            return JSONResponse({"error": "missing or wrong bearer token"}, status_code=401,
                                headers={"WWW-Authenticate": "Bearer"})
        length = request.headers.get("content-length")
        if request.method == "POST":
            if length is None:
                return JSONResponse({"error": "Content-Length header required"}, status_code=411)
            if not length.isdigit() or int(length) > max_body_bytes:
                return JSONResponse({"error": f"request body of {length} bytes is over the limit of "
                                              f"{max_body_bytes} bytes"}, status_code=413)
        return await call_next(request)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        if first.get("type") == "json_invalid":
            return JSONResponse({"error": f"malformed JSON body ({first.get('ctx', {}).get('error', 'invalid')} "
                                          f"at character {first.get('loc', ('', '?'))[-1]})"}, status_code=422)
        return JSONResponse({"error": f"invalid request: {validation_problem(first)}",
                             "detail": [{"loc": e.get("loc"), "msg": e.get("msg")} for e in exc.errors()][:5]},
                            status_code=422)

    @app.exception_handler(UsageError)
    async def usage(request: Request, exc: UsageError):
        return JSONResponse({"error": str(exc)}, status_code=422)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        """FastAPI's own answers (a body it cannot parse, e.g. nested too deeply; 404; 405) in the one shape."""
        message = exc.detail
        if exc.status_code == 400:
            message = "request body could not be parsed as JSON (not JSON, or nested too deeply)"
        return JSONResponse({"error": message}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def crashed(request: Request, exc: Exception):
        """A failure of the server itself: still the one shape, so the client can say what went wrong."""
        return JSONResponse({"error": f"{role} server failed: {exc.__class__.__name__}: {exc}"}, status_code=500)

    @app.get("/health")
    def health():
        return {"status": "ok", "role": role, "uptime_s": round(time.time() - started, 1), **describe}

    return app


def _authorized(request: Request, token: str) -> bool:
    if not token:
        return True
    given = request.headers.get("authorization", "")
    return hmac.compare_digest(given.encode(), f"Bearer {token}".encode())


def create_edge_app(drafter, auth_token: str = "", max_body_bytes: int = 1 << 20, describe: dict | None = None):
    app = _base_app("SpecLab edge", "edge", auth_token, max_body_bytes, describe or {})
    context = getattr(drafter, "context", None)

    @app.post("/v1/draft", response_model=DraftResponse)
    def draft(req: DraftRequest):
        check_vocab(req.context_ids, drafter.vocab, "context_ids", "edge")
        check_length(len(req.context_ids) + req.max_draft, context, "context_ids + max_draft", "edge")
        return drafter.draft(req)

    @app.post("/v1/generate", response_model=GenerateResponse)
    def generate(req: GenerateRequest):
        check_vocab(req.context_ids, drafter.vocab, "context_ids", "edge")
        check_length(len(req.context_ids) + req.max_tokens, context, "context_ids + max_tokens", "edge")
        out = drafter.draft(DraftRequest.model_construct(context_ids=req.context_ids, max_draft=req.max_tokens,
                                                         temperature=req.temperature, seed=req.seed))
        return GenerateResponse(token_ids=out.draft_ids, confidences=out.confidences, compute_ms=out.compute_ms)

    @app.get("/stats")
    def stats():
        return drafter.stats()

    return app


def create_cloud_app(verifier, auth_token: str = "", max_body_bytes: int = 4 << 20, describe: dict | None = None):
    app = _base_app("SpecLab cloud", "cloud", auth_token, max_body_bytes, describe or {})
    context = getattr(verifier, "context", None)

    @app.post("/v1/verify", response_model=VerifyResponse)
    def verify(req: VerifyRequest):
        check_length(len(req.context_ids) + len(req.draft_ids) + 1, context, "context_ids + draft_ids + 1", "cloud")
        check_dists(req.draft_dists, verifier.vocab)
        return verifier.verify(req)

    @app.post("/v1/generate", response_model=GenerateResponse)
    def generate(req: GenerateRequest):
        check_length(len(req.context_ids) + req.max_tokens, context, "context_ids + max_tokens", "cloud")
        return verifier.generate(req)

    @app.get("/stats")
    def stats():
        return verifier.stats()

    return app


def listen_socket(host: str, port: int, where: str) -> socket.socket:
    """A TCP socket bound to host:port (uvicorn listens on it), or a UsageError naming `where` (the flags or
    config keys that chose the address)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
    except (OSError, UnicodeError) as exc:
        raise UsageError(f"{where}: cannot listen on {host}:{port} ({getattr(exc, 'strerror', None) or exc})") \
            from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: a restart may reuse the port
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise UsageError(f"{where}: cannot listen on {host}:{port} ({exc.strerror or exc})") from None
    return sock


class ServerThread:
    """uvicorn in a background thread (tests, `edge_cloud.py --mode server|ablation`); stop() shuts it down.

    The socket is bound when the object is made (a busy port is a UsageError then, before any thread starts).
    uvicorn installs no signal handlers off the main thread, so Ctrl-C stays with the main thread."""

    def __init__(self, app, host: str, port: int, sock: socket.socket | None = None):
        import uvicorn
        self.sock = sock or listen_socket(host, port, f"server address {host}:{port}")
        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning",
                                                    access_log=False))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def start(self, timeout: float = 30.0) -> ServerThread:
        self.thread.start()
        deadline = time.time() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.time() > deadline:
                raise UsageError(f"server on {self.server.config.host}:{self.server.config.port} did not start")
            time.sleep(0.05)
        return self

    def stop(self):
        self.server.should_exit = True
        if self.thread.is_alive():
            self.thread.join(timeout=10)
        self.sock.close()
