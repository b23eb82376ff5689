#!/usr/bin/env python3
"""Start the edge server: llama.cpp (llama-cpp-python) drafting with a GGUF model, FastAPI on uvicorn.

  python start_edge.py [--config configs/edge_cloud.yaml] [--host 127.0.0.1] [--port 8080] [--auth-token T]
"""
import argparse

from lib.errors import exit_on_usage_error
from lib.log import setup_logging


def parse_args(role: str, port: int, description: str):
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", default=None, help="edge/cloud YAML (default: configs/edge_cloud.yaml)")
    parser.add_argument("--host", default=None, help=f"bind address (default: {role}.server.host, 127.0.0.1)")
    parser.add_argument("--port", type=int, default=None, help=f"port (default: {role}.server.port, {port})")
    parser.add_argument("--auth-token", default=None, help="require this bearer token (default: "
                        "communication.auth_token; empty = no auth)")
    return parser.parse_args()


def serve(role: str, port: int, description: str):
    """Run the `role` server (its script's first docstring line is `description`) until Ctrl-C."""
    import uvicorn

    from lib.edgecloud.launch import build_cloud_app, build_edge_app
    from lib.edgecloud.settings import apply_overrides, load_config
    args = parse_args(role, port, description)
    cfg = load_config(args.config)
    over = {role: {"server": {k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None}}}
    if args.auth_token is not None:
        over["communication"] = {"auth_token": args.auth_token}
    cfg = apply_overrides(cfg, over, "command line")
    app, _ = (build_edge_app if role == "edge" else build_cloud_app)(cfg)
    server = cfg[role]["server"]
    print(f"{role} server on http://{server['host']}:{server['port']} (health: /health, stats: /stats)", flush=True)
    uvicorn.run(app, host=server["host"], port=int(server["port"]), log_level="warning")


@exit_on_usage_error
def main():
    setup_logging()
    serve("edge", 8080, __doc__.splitlines()[0])


if __name__ == "__main__":
    main()
