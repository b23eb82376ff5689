#!/usr/bin/env python3
"""vLLM run of one configuration with capture -> <output-dir>/vllm_capture_<config>.json + .safetensors.

vLLM drafts a chain (tree drafting needs its GPU tree-attention backend): spec_num_iter -> num_speculative_tokens,
with method "eagle" for an EAGLE head or "draft_model" for a separate draft model. Per emitted token it returns
the target's top-k log-probabilities (SamplingParams(logprobs=K)); acceptance counters come from its metrics.
On CPU it runs in float32 with enforce_eager (vLLM's CPU backend needs both here).

  python run_vllm_config.py --config-name config1 --save-results
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
    capture_cli(RUNNERS["vllm"], __doc__, argv)


if __name__ == "__main__":
    main()
