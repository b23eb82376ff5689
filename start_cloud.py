#!/usr/bin/env python3
"""Start the cloud server: verifies edge drafts with the PyTorch/transformers target, FastAPI on uvicorn.

  python start_cloud.py [--config configs/edge_cloud.yaml] [--host 127.0.0.1] [--port 8081] [--auth-token T]
"""
import lib.environment  # noqa: F401  (first: a package this Python lacks is one line, not a traceback)

# isort: split

import sys

from lib.errors import exit_on_usage_error
from lib.log import setup_logging
from start_edge import serve


@exit_on_usage_error
def main() -> int:
    setup_logging()
    return serve("cloud", 8081, __doc__.splitlines()[0])


if __name__ == "__main__":
    sys.exit(main())
