"""The PyTorch engine through the benchmark runner on saved 8B-class folders (a GPU check, no downloads).

Saves a random-init target of --arch (gpu_decode.py's shapes, bf16, o_proj/down_proj scaled by --eps so that a
self-draft agrees with it sometimes) and its first --draft-layers layers as a second folder, both with the tokenizer
given, then runs benchmark.py on them (AR and SD, batch 1) and prints each mode's bandwidth_efficiency, tok/s,
acceptance, SD cost model and losslessness verdict from benchmark_results.json.

    python benchmarks/gpu_runner_check.py --arch llama --tokenizer <folder with a tokenizer> --out check.json
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import lib.environment  # noqa: E402,F401  (first: a package this Python lacks is one line, not a traceback)

# isort: split

import torch  # noqa: E402

from benchmarks.gpu_decode import ARCHS, build_model, hf_self_draft, set_eps  # noqa: E402
from lib.files import write_json  # noqa: E402

KEYS = ("bandwidth_efficiency", "output_throughput", "mean_tpot_ms", "acceptance_rate", "acceptance_length",
        "fast_path", "fast_path_reason")


def find(tree, key):
    """The first value under key anywhere in a result's nested dicts."""
    if isinstance(tree, dict):
        if key in tree:
            return tree[key]
        for value in tree.values():
            found = find(value, key)
            if found is not None:
                return found
    return None


def save_folders(args, work: Path) -> tuple[Path, Path]:
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    shape = ARCHS[args.arch].targets.split(",")[0]
    model = build_model(args.arch, shape, torch.bfloat16, torch.device("cuda"), 0)
    set_eps(model, 1.0, args.eps)
    target, draft = work / f"{args.arch}-{shape}", work / f"{args.arch}-{shape}-first{args.draft_layers}"
    for folder, m in ((target, model), (draft, hf_self_draft(model, args.draft_layers))):
        m.save_pretrained(str(folder), safe_serialization=True)
        tokenizer.save_pretrained(str(folder))
    del model
    torch.cuda.empty_cache()
    return target, draft


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="llama", choices=sorted(ARCHS))
    p.add_argument("--tokenizer", required=True, help="folder holding a tokenizer (any; ids past it are random)")
    p.add_argument("--eps", type=float, default=3e-4, help="acceptance dial (gpu_decode.py)")
    p.add_argument("--draft-layers", type=int, default=4)
    p.add_argument("--num-prompts", type=int, default=8)
    p.add_argument("--generation-length", type=int, default=256)
    p.add_argument("--work", default="/tmp/speclab-gpu-models", help="where the folders and results go")
    p.add_argument("--out", default="")
    args = p.parse_args(argv)
    work = Path(args.work)
    target, draft = save_folders(args, work)
    run_id = f"runner-check-{args.arch}"
    env = {**os.environ, "TARGET_MODEL": str(target), "DRAFTER_MODEL": str(draft), "INFERENCE_ENGINE": "hf",
           "DTYPE": "bfloat16", "NUM_PROMPTS": str(args.num_prompts), "GENERATION_LENGTH": str(args.generation_length),
           "ENABLE_BATCH": "false", "RESULTS_DIR": str(work / "results"), "RUN_ID": run_id}
    # a losslessness verdict that fails exits 3 with the results written: they are what this check reports
    code = subprocess.run([sys.executable, str(ROOT / "benchmark.py")], env=env).returncode
    results = json.loads((work / "results" / run_id / "benchmark_results.json").read_text())
    summary = {"arch": args.arch, "eps": args.eps, "exit_code": code, "modes": {}}
    for name, mode in results["modes"].items():
        row = {key: find(mode, key) for key in KEYS}
        row.update({block: mode.get(block) for block in ("sd_model", "lossless") if mode.get(block)})
        summary["modes"][name] = row
        print(f"{args.arch} {name}: {row}")
    if args.out:
        write_json(Path(args.out), summary)
    return summary


if __name__ == "__main__":
    main()
