"""Servers the openai engine launches itself (ENDPOINT_LAUNCH=vllm or llamacpp): one per mode, on 127.0.0.1.

The server runs in its own process group (stop() reaches its workers too) and gets SIGTERM when the benchmark
dies, however it dies (PR_SET_PDEATHSIG, set by a two-line wrapper that then execs the server: no preexec_fn in a
process that has threads). It is ready once its health route answers 200; a server that exits or stays unready
past ENDPOINT_STARTUP_TIMEOUT ends the mode with one line that carries the last lines of its log.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from lib.errors import EngineUnavailable
from lib.log import get_logger

logger = get_logger(__name__)
LOG_TAIL_LINES = 8
# prctl(PR_SET_PDEATHSIG, SIGTERM) survives exec; the parent may have died before prctl ran, then no signal comes
DIE_WITH_PARENT = ("import ctypes, os, signal, sys\n"
                   "ctypes.CDLL(None).prctl(1, signal.SIGTERM)\n"
                   "os.getppid() == int(sys.argv[1]) or sys.exit(1)\n"
                   "os.execv(sys.argv[2], sys.argv[2:])\n")


F32 = "0"  # ggml's GGML_TYPE_F32


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def with_api_key(env: dict, name: str, cfg) -> dict:
    """ENDPOINT_API_KEY for the server through its environment (an argument would show in ps)."""
    if cfg.endpoint_api_key:
        env[name] = cfg.endpoint_api_key
    return env


def vllm_command(cfg, method: str, models, port: int) -> tuple[list[str], dict]:
    """vLLM's OpenAI server from the variables the in-process vLLM engine reads; (argv, environment)."""
    from lib.engines.vllm_engine import VLLMEngine, cpu_safe_dtype
    from lib.vllm_support import prepare_cpu_environment
    on_cpu = prepare_cpu_environment()  # the CPU build's settings, into os.environ and so into the child
    spec = VLLMEngine(cfg.replace(VLLM_ENABLE_SPECULATIVE=True), method, models).speculative_config
    argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(models.target),
            "--tokenizer", str(models.target), "--host", "127.0.0.1", "--port", str(port),
            "--tensor-parallel-size", str(cfg.vllm_tensor_parallel_size),
            "--gpu-memory-utilization", str(cfg.vllm_gpu_memory_utilization),
            "--max-model-len", str(cfg.vllm_max_model_len), "--max-num-seqs", str(cfg.vllm_max_num_seqs),
            "--dtype", cpu_safe_dtype(cfg.vllm_dtype, on_cpu), "--seed", str(cfg.seed)]
    if on_cpu:
        argv.append("--enforce-eager")  # as the in-process engine: compiled CPU paths crash on some CPUs
    if spec:
        argv += ["--speculative-config", json.dumps(spec)]
    return argv, with_api_key(dict(os.environ), "VLLM_API_KEY", cfg)


def llamacpp_command(cfg, method: str, models, port: int) -> tuple[list[str], dict]:
    """llama-cpp-python's server over the GGUF export of TARGET_MODEL; its one draft option is prompt lookup."""
    from lib.engines.llamacpp_engine import context_size, default_threads
    from lib.gguf_export import ensure_gguf
    gguf = ensure_gguf(models.target, "TARGET_MODEL")
    threads = cfg.llamacpp_n_threads or default_threads()
    argv = [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--host", "127.0.0.1", "--port",
            str(port), "--n_ctx", str(context_size(cfg)), "--n_threads", str(threads), "--n_threads_batch",
            str(threads), "--seed", str(cfg.seed), "--logits_all", "true",
            "--interrupt_requests", "false",  # its default cuts a stream short when the next request comes
            "--type_k", F32, "--type_v", F32]  # an f32 KV cache, as the llamacpp engine's
    if method == "speculative":
        argv += ["--draft_model", "prompt-lookup-decoding", "--draft_model_num_pred_tokens", str(cfg.gamma_value)]
    return argv, with_api_key(dict(os.environ), "API_KEY", cfg)  # its pydantic settings read API_KEY


LAUNCHERS = {"vllm": (vllm_command, "/health", "vllm.entrypoints.openai.api_server"),
             "llamacpp": (llamacpp_command, "/v1/models", "llama_cpp.server")}  # llama-cpp-python has no /health


class LaunchedServer:
    """One server process group; `url` once healthy."""

    def __init__(self, kind: str, cfg, method: str, models):
        build, self.health_path, self.module = LAUNCHERS[kind]
        self.kind, self.cfg = kind, cfg
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.argv, env = build(cfg, method, models, self.port)
        self.dtype = self.argv[self.argv.index("--dtype") + 1] if "--dtype" in self.argv else "float32"  # GGUF: f32
        self.log_dir = Path(tempfile.mkdtemp(prefix="speclab-endpoint-"))
        self.log_path = self.log_dir / "server.log"
        self.log = open(self.log_path, "wb")  # noqa: SIM115 - open while the server runs, closed by stop()
        logger.info(f"Launching {self.module} on {self.url} (log {self.log_path})")
        self.proc = subprocess.Popen([sys.executable, "-c", DIE_WITH_PARENT, str(os.getpid()), *self.argv],
                                     env=env, stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    @property
    def label(self) -> str:
        return f"ENDPOINT_LAUNCH={self.kind}: {self.module} on {self.url}"

    def log_tail(self) -> str:
        self.log.flush()
        lines = [line.strip() for line in self.log_path.read_text(errors="replace").splitlines() if line.strip()]
        return " | ".join(lines[-LOG_TAIL_LINES:]) or "(empty)"

    def exit_code(self) -> int | None:
        return self.proc.poll()

    def wait_healthy(self, headers: dict) -> None:
        timeout = self.cfg.endpoint_startup_timeout
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.fail(f"exited with code {self.proc.returncode} before it was ready")
            try:
                if httpx.get(self.url + self.health_path, headers=headers, timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.fail(f"did not answer {self.health_path} within ENDPOINT_STARTUP_TIMEOUT={timeout:g} s")

    def fail(self, what: str):
        tail = self.log_tail()
        self.stop()
        raise EngineUnavailable(f"{self.label} {what}; last log lines: {tail}")

    def stop(self) -> None:
        """SIGTERM to the group, SIGKILL if it lingers; the log goes with it."""
        for sig, wait_s in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.proc.wait(timeout=wait_s)
                break
            except subprocess.TimeoutExpired:
                continue
        self.proc.poll()
        self._reap_group()
        if not self.log.closed:
            self.log.close()
            self.log_path.unlink(missing_ok=True)
            self.log_dir.rmdir()

    def _reap_group(self):
        """Workers the server left in its group after it exited (SIGKILL: they cannot outlive the mode)."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
