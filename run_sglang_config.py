#!/usr/bin/env python3
"""SGLang EAGLE run of one configuration with capture -> <output-dir>/sglang_capture_<config>.json + .safetensors.

The mapping: spec_num_iter -> speculative_num_steps, spec_tree_size -> speculative_num_draft_tokens,
get_topk_per_iter() -> speculative_eagle_topk (algorithm EAGLE; STANDALONE with --draft-type model); greedy,
return_logprob with top_logprobs_num = --capture-topk; acceptance length from meta_info. Needs an NVIDIA GPU and
sglang (requirements/sglang.txt); it cannot run on CPU-only machines.

  python run_sglang_config.py --config-name config1 --save-results --verbose
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
    capture_cli(RUNNERS["sglang"], __doc__, argv)


if __name__ == "__main__":
    main()
