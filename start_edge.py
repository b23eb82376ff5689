#!/usr/bin/env python3
"""Start the edge server: llama.cpp (llama-cpp-python) drafting with a GGUF model, FastAPI on uvicorn.

  python start_edge.py [--config configs/edge_cloud.yaml] [--host 127.0.0.1] [--port 8080] [--auth-token T]
"""
import lib.environment  # noqa: F401  (first: a package this Python lacks is one line, not a traceback)

# isort: split

import argparse
import signal
import sys

from lib.errors import check_bearer_token, exit_on_usage_error
from lib.interrupts import Interrupted, StopSignals
from lib.log import setup_logging


def parse_args(role: str, port: int, description: str):
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", default=None, help="edge/cloud YAML (default: configs/edge_cloud.yaml)")
    parser.add_argument("--host", default=None, help=f"bind address (default: {role}.server.host, 127.0.0.1)")
    parser.add_argument("--port", type=int, default=None, help=f"port (default: {role}.server.port, {port})")
    parser.add_argument("--auth-token", default=None, help="require this bearer token (default: "
                        "communication.auth_token; empty = no auth)")
    return parser.parse_args()


def command_line_overrides(role: str, args) -> tuple[dict, list[str]]:
    """The config overrides of the flags given, and those flags as the source to name in an error."""
    over, flags = {}, []
    for key, value in (("host", args.host), ("port", args.port)):
        if value is not None:
            over.setdefault(role, {}).setdefault("server", {})[key] = value
            flags.append(f"--{key} {value}")
    if args.auth_token is not None:
        over["communication"] = {"auth_token": check_bearer_token(args.auth_token, "--auth-token")}
        flags.append("--auth-token")  # never the token itself
    return over, flags


def serve(role: str, port: int, description: str) -> int:
    """Run the `role` server (its script's first docstring line is `description`) until Ctrl-C or SIGTERM (exit
    130 / 143). The address is bound before the model loads, so a busy port or a bad host is one line and exit 2,
    not a claim that the server runs."""
    import uvicorn

    from lib.edgecloud.http_api import listen_socket
    from lib.edgecloud.launch import build_cloud_app, build_edge_app
    from lib.edgecloud.settings import apply_overrides, load_config
    args = parse_args(role, port, description)
    over, flags = command_line_overrides(role, args)
    cfg = apply_overrides(load_config(args.config), over, ", ".join(flags) or "command line")
    server = cfg[role]["server"]
    address_flags = [flag for flag in flags if flag.startswith(("--host", "--port"))]
    sock = listen_socket(server["host"], int(server["port"]), ", ".join(address_flags) or f"{role}.server.host/port")
    try:
        app, _ = (build_edge_app if role == "edge" else build_cloud_app)(cfg)
        print(f"{role} server on http://{server['host']}:{server['port']} (health: /health, stats: /stats)",
              flush=True)
        config = uvicorn.Config(app, host=server["host"], port=int(server["port"]), log_level="warning")
        with StopSignals():  # uvicorn shuts down on the signal, then raises it again for these handlers
            uvicorn.Server(config).run(sockets=[sock])
    except Interrupted as exc:
        print(f"interrupted ({signal.Signals(exc.signum).name}): {role} server stopped", file=sys.stderr)
        return exc.exit_code
    finally:
        sock.close()
    return 0


@exit_on_usage_error
def main() -> int:
    setup_logging()
    return serve("edge", 8080, __doc__.splitlines()[0])


if __name__ == "__main__":
    sys.exit(main())
