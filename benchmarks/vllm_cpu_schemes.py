#!/usr/bin/env python3
"""Which compressed-tensors schemes vLLM's CPU build loads and runs, on this CPU, in float32 and bfloat16.

For each scheme the tiny target is quantized by the project's loader, exported (lib/quant/export.py), loaded by
vLLM (`LLM(dtype=..., enforce_eager=True)`, one fresh process per run) and asked for 12 greedy tokens, which are
compared with the project's loader in the same dtype. vLLM's CPU kernels depend on the instruction set (with AMX
it takes its own int8 GEMM for W8A8 layers, which refuses float32 activations), so the table is per CPU kind:
run it on yours. docs/mixed_precision.md shows the results.

  python benchmarks/vllm_cpu_schemes.py [--dtypes float32 bfloat16] [--schemes int8_w8a8 ...] [--json out.json]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import lib.environment  # noqa: E402,F401  (first: a package this Python lacks is one line, not a traceback)

# isort: split

from lib.errors import exit_on_usage_error  # noqa: E402
from lib.files import output_file, write_json  # noqa: E402
from lib.quant.vllm_run import MIXED_W8A8_CONFIG, cpu_has_amx, run_vllm_greedy  # noqa: E402

PROMPT = [5, 6, 7, 8, 9, 10]
NEW_TOKENS = 12


def everything(precision: str, extra: str = "") -> str:
    return f"mixed_precision:\n  default: {precision}\n{extra}"


# name -> (what it is, config YAML, export options)
SCHEMES = {
    "int8_w8a8": ("int8 W8A8 (channel weights, dynamic token activations)", everything("int8"),
                  {"int8_scheme": "w8a8"}),
    "fp8_w8a8": ("fp8 W8A8 (channel weights, dynamic token activations)", everything("fp8"), {"fp8_scheme": "w8a8"}),
    "mixed_w8a8": ("mixed fp16 (ignored) + fp8 W8A8 + int8 W8A8", MIXED_W8A8_CONFIG,
                   {"int8_scheme": "w8a8", "fp8_scheme": "w8a8"}),
    "int4_sym": ("int4 WNA16, group 128, sym", everything("int4", "  int4: {bits: 4, group_size: 128, sym: true}\n"),
                 {}),
    "int4_asym": ("int4 WNA16, group 128, asym",
                  everything("int4", "  int4: {bits: 4, group_size: 128, sym: false}\n"), {}),
    "int4_act_order": ("int4 WNA16 with act-order",
                       everything("int4", "  int4: {bits: 4, group_size: 128, desc_act: true}\n"), {}),
    "int8_w8a16": ("int8 W8A16 (pack-quantized 8-bit)", everything("int8"), {"int8_scheme": "w8a16"}),
    "fp8_w8a16": ("fp8 W8A16 (channel weights)", everything("fp8"), {"fp8_scheme": "w8a16"}),
}

def ours(config: Path, dtype: str):
    import torch

    from lib.quant.loader import load_mixed_model
    model, _, _ = load_mixed_model(config, None, "cpu", dtype)
    with torch.no_grad():
        out = model.generate(torch.tensor([PROMPT]), max_new_tokens=NEW_TOKENS, do_sample=False)
    return model, out[0, len(PROMPT):].tolist()


def measure(name: str, dtypes: list[str], work: Path) -> dict:
    from lib.models import ensure_tiny_models
    from lib.quant.export import export_compressed_tensors
    what, yaml_text, options = SCHEMES[name]
    folder = work / name
    folder.mkdir(parents=True, exist_ok=True)
    config = folder / "mp.yaml"
    config.write_text(yaml_text)
    model, float32_tokens = ours(config, "float32")
    export_compressed_tensors(model, folder / "ct", ensure_tiny_models().target, **options)
    row = {"scheme": name, "what": what}
    for dtype in dtypes:
        tokens, error, seconds = run_vllm_greedy(folder / "ct", dtype, folder, PROMPT, NEW_TOKENS)
        if tokens is None:
            row[dtype] = {"result": "refused", "error": error, "seconds": round(seconds, 1)}
        else:
            expected = float32_tokens if dtype == "float32" else ours(config, dtype)[1]
            equal = sum(a == b for a, b in zip(tokens, expected))
            row[dtype] = {"result": "loads", "tokens_equal": equal, "of": NEW_TOKENS, "seconds": round(seconds, 1)}
        print(f"{name} {dtype}: {cell(row[dtype])}", flush=True)
    return row


def cell(entry: dict) -> str:
    if entry["result"] == "refused":
        return f"refused: {entry['error']}"
    same = entry["tokens_equal"] == entry["of"]
    return "loads; output identical" if same else f"loads; {entry['tokens_equal']}/{entry['of']} tokens equal"


@exit_on_usage_error
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=("float32", "bfloat16", "float16"))
    p.add_argument("--schemes", nargs="+", default=list(SCHEMES), choices=list(SCHEMES))
    p.add_argument("--json", default="", help="also write the rows as JSON here")
    args = p.parse_args(argv)
    if args.json:
        output_file(args.json, f"--json {args.json}")  # before the measurements
    kind = "AMX" if cpu_has_amx() else "no AMX"
    print(f"CPU kind: {kind}", flush=True)
    with tempfile.TemporaryDirectory(prefix="speclab-schemes-") as tmp:
        rows = [measure(name, args.dtypes, Path(tmp)) for name in args.schemes]
    print("\n| scheme | " + " | ".join(f"{d}, {kind}" for d in args.dtypes) + " |")
    print("|---|" + "---|" * len(args.dtypes))
    for row in rows:
        print(f"| {row['what']} | " + " | ".join(cell(row[d]) for d in args.dtypes) + " |")
    if args.json:
        write_json(Path(args.json), {"schema": "speclab.vllm_cpu_schemes/1", "cpu_kind": kind, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
