#!/usr/bin/env python3
"""The whole logits comparison in one go: run two configurations (on one engine or two), capture both, compare.
Everything goes to one folder: <results-dir>/<run-id>/ with both captures, detailed_logits_comparison_results.json,
the PNG plots and workflow.json.

  python workflow.py --config1-iter 5 --config1-tree-size 32 --config2-iter 2 --config2-tree-size 12
  python workflow.py --engine2 vllm --config2-iter 5 --config2-tree-size 32     # same config, two engines
"""
from __future__ import annotations

import lib.environment  # noqa: F401  (first: a package this Python lacks is one line, not a traceback)

# isort: split

import argparse
import time
from dataclasses import replace
from pathlib import Path

from lib.capture import capture_stem, save_capture
from lib.capture_runs import RUNNERS
from lib.comparison_config import DRAFT_TYPES, ComparisonConfig
from lib.errors import exit_on_usage_error
from lib.files import output_dir, path_component, shipped, write_json
from lib.log import setup_logging


def build_parser() -> argparse.ArgumentParser:
    d = ComparisonConfig()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for n, (it, size) in ((1, (5, 32)), (2, (2, 12))):
        group = parser.add_argument_group(f"configuration {n}")
        group.add_argument(f"--config{n}-iter", type=int, default=it, help=f"spec_num_iter (default {it})")
        group.add_argument(f"--config{n}-tree-size", type=int, default=size, help=f"spec_tree_size (default {size})")
        group.add_argument(f"--engine{n}", choices=tuple(RUNNERS), default="reference",
                           help="reference (PyTorch tree SD), vllm, or sglang (GPU only); default reference")
    shared = parser.add_argument_group("shared by both runs")
    shared.add_argument("--comparison-steps", type=int, default=d.comparison_steps,
                        help=f"tokens per prompt (default {d.comparison_steps})")
    shared.add_argument("--model-path", default="", help="target folder (default: the tiny local target)")
    shared.add_argument("--draft-model-path", default="", help="EAGLE head or draft model folder (default: tiny)")
    shared.add_argument("--draft-type", choices=DRAFT_TYPES, default=d.draft_type,
                        help=f"eagle or model (default {d.draft_type})")
    shared.add_argument("--prompt-file", default=None, help=f"default: the project's {d.prompt_file}")
    shared.add_argument("--num-prompts", type=int, default=0, help="first N prompts (default: all)")
    shared.add_argument("--capture-topk", type=int, default=d.capture_topk, help=f"default {d.capture_topk}")
    shared.add_argument("--memory-limit", type=float, default=d.memory_limit, help=f"default {d.memory_limit}")
    shared.add_argument("--chunk-length", type=int, default=d.chunk_length, help=f"default {d.chunk_length}")
    shared.add_argument("--cuda-graph", action="store_true", help="SGLang/vLLM: capture CUDA graphs")
    shared.add_argument("--results-dir", default="results", help="default results")
    shared.add_argument("--run-id", default="", help="folder name (default: logits_comparison_<date-time>)")
    shared.add_argument("--verbose", action="store_true")
    return parser


def configs_from_args(args) -> tuple[ComparisonConfig, ComparisonConfig]:
    d = ComparisonConfig()
    base = ComparisonConfig(comparison_steps=args.comparison_steps, model_path=args.model_path,
                            draft_model_path=args.draft_model_path, draft_type=args.draft_type,
                            prompt_file=args.prompt_file or str(shipped(d.prompt_file)), num_prompts=args.num_prompts,
                            capture_topk=args.capture_topk,
                            memory_limit=args.memory_limit, chunk_length=args.chunk_length,
                            cuda_graph=args.cuda_graph, verbose=args.verbose, save_results=True)
    one, two = (replace(base, spec_num_iter=getattr(args, f"config{n}_iter"),
                        spec_tree_size=getattr(args, f"config{n}_tree_size"), config_name=f"config{n}")
                .validate({"spec_num_iter": f"--config{n}-iter", "spec_tree_size": f"--config{n}-tree-size"})
                for n in (1, 2))
    return one, two


def run_workflow(args) -> Path:
    from analyze_saved_data import analyze
    if args.run_id:
        path_component(args.run_id, f"--run-id={args.run_id!r}")
    cfg1, cfg2 = configs_from_args(args)
    out = output_dir(Path(args.results_dir) / (args.run_id or time.strftime("logits_comparison_%Y%m%d-%H%M%S")),
                     f"--results-dir={args.results_dir}" + (f" --run-id={args.run_id}" if args.run_id else ""))
    files = []
    for engine, cfg in ((args.engine1, cfg1), (args.engine2, cfg2)):
        print(f"== {engine} {cfg.name}: spec_num_iter {cfg.spec_num_iter}, spec_tree_size {cfg.spec_tree_size}, "
              f"topk_per_iter {cfg.get_topk_per_iter()}")
        capture = RUNNERS[engine](cfg)
        files.append(save_capture(capture, out, capture_stem(engine, cfg.name)))
        print(f"   capture: {files[-1]}")
    results = analyze(str(files[0]), str(files[1]), str(out))
    write_json(out / "workflow.json", {
        "schema": "speclab.logits_workflow/1", "engines": [args.engine1, args.engine2],
        "configs": [cfg1.to_dict(), cfg2.to_dict()], "captures": [f.name for f in files],
        "all_tokens_equal": results["summary"]["all_tokens_equal"]})
    print(f"everything in {out}")
    return out


@exit_on_usage_error
def main(argv=None):
    setup_logging()
    run_workflow(build_parser().parse_args(argv))


if __name__ == "__main__":
    main()
