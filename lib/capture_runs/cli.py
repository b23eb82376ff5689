"""The command line every capture script shares: the comparison flags -> a runner -> summary -> saved capture."""
from __future__ import annotations

import argparse

from lib.capture import Capture, capture_stem, save_capture
from lib.capture_runs import CaptureRunner
from lib.comparison_config import add_comparison_arguments, config_from_args
from lib.files import output_dir
from lib.log import get_logger

logger = get_logger(__name__)


def summarize(capture: Capture) -> str:
    totals = capture.spec_totals()
    tokens = sum(len(p.token_ids) for p in capture.prompts)
    seconds = sum(p.seconds for p in capture.prompts)
    length = 1 + totals["accepted_tokens"] / totals["num_drafts"] if totals["num_drafts"] else float("nan")
    return (f"{capture.engine} {capture.config_name}: {len(capture.prompts)} prompts, {tokens} tokens in "
            f"{seconds:.2f} s, {totals['num_drafts']} verification rounds, acceptance length {length:.3f}")


def save_if_asked(capture: Capture, cfg):
    if cfg.save_results:
        path = save_capture(capture, cfg.output_dir, capture_stem(capture.engine, capture.config_name))
        logger.info(f"capture written: {path} (+ {path.with_suffix('.safetensors').name})")
        return path
    logger.info("capture not saved (add --save-results)")
    return None


def capture_cli(run: CaptureRunner, description: str, argv=None):
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    cfg = config_from_args(add_comparison_arguments(parser).parse_args(argv))
    if cfg.save_results:  # before the run, so a capture is never computed and then lost
        output_dir(cfg.output_dir, f"--output-dir={cfg.output_dir}")
    capture = run(cfg)
    logger.info(summarize(capture))
    save_if_asked(capture, cfg)
