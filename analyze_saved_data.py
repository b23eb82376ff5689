#!/usr/bin/env python3
"""Compare two saved captures: token agreement, first divergent step, per-step KL/JS over the shared top-k, top-k
overlap, logit differences, ranks, acceptance length distributions.
Writes <output-dir>/detailed_logits_comparison_results.json and PNG plots, and prints a short report.

  python analyze_saved_data.py --data1 results/captures/logits_capture_config1.json \\
                               --data2 results/captures/vllm_capture_config1.json
A capture is named by its .json, its .safetensors or its stem; a legacy .pkl is read with a restricted loader
(plain data and numpy arrays only).
"""
from __future__ import annotations

import lib.environment  # noqa: F401  (first: a package this Python lacks is one line, not a traceback)

# isort: split

import argparse

from lib.capture import load_capture
from lib.errors import exit_on_usage_error
from lib.log import setup_logging
from lib.logits_compare import check_outputs, compare_captures, console_report, write_outputs


def analyze(data1: str, data2: str, output_dir: str, plots: bool = True) -> dict:
    check_outputs(output_dir, plots)
    results = compare_captures(load_capture(data1), load_capture(data2))
    path, *pngs = write_outputs(results, output_dir, plots)
    print(console_report(results))
    print(f"results: {path}" + (f"; plots: {', '.join(p.name for p in pngs)}" if pngs else ""))
    return results


@exit_on_usage_error
def main(argv=None):
    setup_logging()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data1", required=True, help="first capture (A)")
    parser.add_argument("--data2", required=True, help="second capture (B)")
    parser.add_argument("--output-dir", default=".", help="where the JSON and PNGs go (default: current folder)")
    parser.add_argument("--no-plots", action="store_true",
                        help="skip the PNG plots (an earlier comparison's plots in --output-dir are removed)")
    args = parser.parse_args(argv)
    analyze(args.data1, args.data2, args.output_dir, plots=not args.no_plots)


if __name__ == "__main__":
    main()
