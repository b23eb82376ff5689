#!/usr/bin/env python3
"""Reference engine run of one configuration: the project's PyTorch tree speculative decoding with logits
capture -> <output-dir>/logits_capture_<config>.json + .safetensors (with --save-results).

  python run_single_config.py --config-name config1 --save-results
  python run_single_config.py --spec-num-iter 3 --spec-tree-size 16 --comparison-steps 15 --draft-type model
"""
import lib.environment  # noqa: F401  (first: a package this Python lacks is one line, not a traceback)

# isort: split

from lib.capture_runs import RUNNERS
from lib.capture_runs.cli import capture_cli
from lib.errors import exit_on_usage_error
from lib.log import setup_logging


@exit_on_usage_error
def main(argv=None):
    setup_logging()
    capture_cli(RUNNERS["reference"], __doc__, argv)


if __name__ == "__main__":
    main()
