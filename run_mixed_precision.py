#!/usr/bin/env python3
"""Load a mixed-precision model (fp16/bf16, fp8, int8, GPTQ int4 per layer), report memory, generate, compare
perplexity and speed with the unquantized model; optionally make per-precision sources, export a
compressed-tensors checkpoint, or demo MoE expert tracking.  See docs/mixed_precision.md.

  python run_mixed_precision.py                                   # shipped config on the tiny target
  python run_mixed_precision.py --make-sources sources/ --gptq    # per-precision safetensors sources
  python run_mixed_precision.py --export exported/                # compressed-tensors checkpoint (vLLM/SGLang)
  python run_mixed_precision.py --moe --output moe.json           # expert tracking on the tiny MoE
"""
from __future__ import annotations

import lib.environment  # noqa: F401  (first: a package this Python lacks is one line, not a traceback)

# isort: split

import argparse
import math
import os
import sys
import time
from pathlib import Path

from lib.errors import UsageError, exit_on_usage_error
from lib.files import output_dir, output_file, read_prompt_file, shipped
from lib.log import setup_logging

DEFAULT_CONFIG = "configs/mixed_precision_config.yaml"  # shipped: resolved against the repository


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("--config", default=os.environ.get("MIXED_PRECISION_CONFIG") or str(shipped(DEFAULT_CONFIG)),
                   help=f"mixed-precision YAML [env MIXED_PRECISION_CONFIG; default: the project's {DEFAULT_CONFIG}]")
    g.add_argument("--base", default="", help="base HF model folder when the config's base_path is empty "
                   "(default: the tiny local target)")
    g.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    g.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                   help="activation dtype (auto = bfloat16 on GPU, float32 on CPU)")
    g = p.add_argument_group("evaluation")
    g.add_argument("--prompt", default="Once upon a time", help="prompt for the generation sample")
    g.add_argument("--max-new-tokens", type=int, default=48)
    g.add_argument("--ppl-docs", type=int, default=32, help="held-out corpus documents for perplexity (0 = skip)")
    g.add_argument("--output", default="", help="write the report as JSON here")
    g = p.add_argument_group("sources (--make-sources)")
    g.add_argument("--make-sources", metavar="DIR", default="",
                   help="quantize the base model into DIR/<precision>/model.safetensors and exit")
    g.add_argument("--bits", type=int, default=4, choices=(2, 3, 4, 8), help="GPTQ bits for the int4 source")
    g.add_argument("--group-size", type=int, default=128, help="GPTQ group size (-1 = one group per row)")
    g.add_argument("--act-order", action="store_true", help="GPTQ act-order (desc_act)")
    g.add_argument("--sym", action="store_true", help="symmetric int4 (zero = 2**(bits-1))")
    g.add_argument("--zero-format", default="v1", choices=("v1", "v2"), help="v1 = gptq (zero-1 stored), v2 = gptq_v2")
    g.add_argument("--gptq", action="store_true", help="GPTQ error correction on a calibration slice of the corpus "
                   "(default: round to nearest)")
    g = p.add_argument_group("export (--export)")
    g.add_argument("--export", metavar="DIR", default="", help="write a compressed-tensors checkpoint to DIR")
    g.add_argument("--int8-scheme", default="w8a8", choices=("w8a8", "w8a16"))
    g.add_argument("--fp8-scheme", default="w8a16", choices=("w8a16", "w8a8"))
    g = p.add_argument_group("MoE (--moe)")
    g.add_argument("--moe", action="store_true", help="run the tiny MoE model with expert tracking instead")
    g.add_argument("--moe-plot", default="", help="with --moe: save the per-layer load-balance chart here (png)")
    args = p.parse_args(argv)
    if args.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens={args.max_new_tokens}: expected an integer >= 1")
    if args.ppl_docs < 0:
        raise UsageError(f"--ppl-docs={args.ppl_docs}: expected an integer >= 0")
    if not args.prompt.strip():
        raise UsageError(f"--prompt={args.prompt!r}: expected a text with at least one non-blank character")
    check_group_size_flag(args.group_size)
    return args


def check_group_size_flag(size: int) -> None:
    """--group-size through the config's own group-size check."""
    from lib.quant.loader import GROUP_SIZE_ACCEPTS, valid_group_size
    try:
        valid_group_size(size)
    except ValueError as exc:
        raise UsageError(f"--group-size={size}: {exc}; accepted: {GROUP_SIZE_ACCEPTS}") from None


def pick(device: str, dtype: str) -> tuple[str, str]:
    import torch
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device=cuda: no CUDA device is visible; use --device cpu")
    if dtype == "auto":
        dtype = "bfloat16" if device == "cuda" else "float32"
    return device, dtype


def perplexity(model, tokenizer, texts: list[str], device: str, max_len: int = 256) -> float:
    import torch
    nll, count = 0.0, 0
    with torch.no_grad():
        for text in texts:
            ids = tokenizer(text, return_tensors="pt").input_ids[:, :max_len].to(device)
            if ids.shape[1] < 2:
                continue
            loss = model(input_ids=ids, labels=ids).loss.float().item()
            nll += loss * (ids.shape[1] - 1)
            count += ids.shape[1] - 1
    return math.exp(nll / max(1, count))


def prompt_ids(tokenizer, prompt: str, device: str):
    """The prompt's token ids [1, n]; generation needs at least one."""
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    if ids.shape[1] == 0:
        raise UsageError(f"--prompt={prompt!r}: the tokenizer makes no token of it; expected a prompt of at least "
                         "one token")
    return ids.to(device)


def generate(model, tokenizer, ids, max_new: int, device: str) -> dict:
    from lib.bandwidth import sync
    model.generate(ids, max_new_tokens=2, do_sample=False)  # warm-up
    sync(device)
    t0 = time.perf_counter()
    out = model.generate(ids, max_new_tokens=max_new, min_new_tokens=max_new, do_sample=False)
    sync(device)
    seconds = time.perf_counter() - t0
    new = out[0, ids.shape[1]:].tolist()
    return {"output_ids": new, "text": tokenizer.decode(new, skip_special_tokens=True),
            "tokens_per_s": round(len(new) / seconds, 2)}


def held_out_texts(n: int) -> list[str]:
    from lib.corpus import generate_corpus
    return generate_corpus(2026, n)  # a seed the tiny models were not trained on


def make_sources(args, base: Path) -> dict:
    from lib.models import load_model
    from lib.quant.formats import QuantOptions
    from lib.quant.loader import calibration_hessians, check_group_size, linear_weight_names, write_sources
    opts = QuantOptions(int4_bits=args.bits, int4_group_size=args.group_size, int4_zero_format=args.zero_format,
                        int4_act_order=args.act_order, int4_symmetric=args.sym,
                        int4_method="gptq" if args.gptq else "rtn")
    model = load_model(base, "float32", "cpu")
    check_group_size(args.group_size, linear_weight_names(model), f"--group-size={args.group_size}")
    hessians = calibration_hessians(model, base) if args.gptq else None
    out = Path(args.make_sources)
    folders = write_sources(model, out, opts, hessians)
    print(f"sources written under {out}: " + ", ".join(f"{p}_path: {f}" for p, f in folders.items()))
    return {"sources": {p: str(f) for p, f in folders.items()}}


def memory_table(mem):
    from rich.table import Table
    t = Table(title="weights by precision")
    for col in ("precision", "layers", "stored MB", "fp16 MB", "ratio"):
        t.add_column(col, justify="right")
    for prec, row in sorted(mem.by_precision().items()):
        t.add_row(prec, str(row["layers"]), f"{row['stored_bytes'] / 2**20:.3f}", f"{row['fp16_bytes'] / 2**20:.3f}",
                  f"{row['fp16_bytes'] / max(1, row['stored_bytes']):.2f}x")
    t.add_row("other", "", f"{mem.other_bytes / 2**20:.3f}", "", "")
    t.add_row("model", "", f"{mem.stored_bytes / 2**20:.3f}", f"{mem.fp16_bytes / 2**20:.3f}",
              f"{mem.compression_ratio:.2f}x")
    return t


def run_mixed(args, base: Path | None) -> dict:
    from rich.console import Console

    from lib.models import ensure_tiny_models, load_model, load_tokenizer
    from lib.quant.linear import model_memory
    from lib.quant.loader import load_mixed_model
    console = Console()
    device, dtype = pick(args.device, args.dtype)
    model, cfg, assignment = load_mixed_model(args.config, base, device, dtype)
    base_dir = Path(cfg.base_path or base or ensure_tiny_models().target)
    tok = load_tokenizer(base_dir)
    ids = prompt_ids(tok, args.prompt, device)
    mem = model_memory(model)
    console.print(memory_table(mem))
    console.print(f"memory_saved_mb {mem.memory_saved_mb:.3f}, compression_ratio {mem.compression_ratio:.3f} "
                  f"(against the same model in fp16)")
    report = {"schema": "speclab.mixed_precision/1", "config": cfg.source, "base": str(base_dir), "device": device,
              "dtype": dtype, "plan": assignment, "memory": mem.as_dict()}
    report["mixed"] = generate(model, tok, ids, args.max_new_tokens, device)
    texts = held_out_texts(args.ppl_docs) if args.ppl_docs else []
    if texts:
        report["mixed"]["perplexity"] = round(perplexity(model, tok, texts, device), 4)
    if args.export:
        from lib.quant.export import export_compressed_tensors
        qcfg = export_compressed_tensors(model, args.export, base_dir, args.int8_scheme, args.fp8_scheme)
        report["export"] = {"dir": args.export, "format": qcfg["format"], "groups": len(qcfg["config_groups"])}
        console.print(f"compressed-tensors checkpoint written to {args.export} ({qcfg['format']}, "
                      f"{len(qcfg['config_groups'])} config groups)")
    del model
    plain = load_model(base_dir, dtype, device)
    report["unquantized"] = generate(plain, tok, ids, args.max_new_tokens, device)
    if texts:
        report["unquantized"]["perplexity"] = round(perplexity(plain, tok, texts, device), 4)
    for name in ("unquantized", "mixed"):
        r = report[name]
        console.print(f"[bold]{name:>11}[/]: perplexity {r.get('perplexity', '-')}, {r['tokens_per_s']} tok/s, "
                      f"text: {r['text'][:80]!r}")
    same = report["mixed"]["output_ids"] == report["unquantized"]["output_ids"]
    console.print(f"greedy output identical to the unquantized model: {same}")
    return report


def run_moe(args) -> dict:
    import torch

    from lib.models import load_model, load_tokenizer
    from lib.quant.moe_model import ensure_tiny_moe
    from lib.quant.moe_tracker import plot_load_balance, track_experts
    device, dtype = pick(args.device, args.dtype)
    folder = ensure_tiny_moe()
    model, tok = load_model(folder, dtype, device), load_tokenizer(folder)
    tracker = track_experts(model)
    prompts = read_prompt_file(shipped("prompts/prompt_small.txt"), "prompts/prompt_small.txt")
    for i, prompt in enumerate(prompts[:4]):
        with tracker.request(f"request-{i}"):
            ids = tok(prompt, return_tensors="pt").input_ids.to(device)
            with torch.no_grad():
                model.generate(ids, max_new_tokens=args.max_new_tokens, do_sample=False)
    data = tracker.export()
    for layer, stats in data["layer_stats"].items():
        print(f"layer {layer}: {stats['tokens_routed']} tokens x top-{stats['top_k']} = {stats['total_tokens']} "
              f"expert slots; load balance max/mean {stats['load_balance']['max_over_mean']}, "
              f"cv {stats['load_balance']['cv']}, idle experts {stats['load_balance']['idle_experts']}")
    print("top experts:", ", ".join(f"L{e['layer_id']}E{e['expert_id']}={e['total_tokens_processed']}"
                                    for e in data["top_experts"][:5]))
    if args.moe_plot:
        plot_load_balance(tracker, args.moe_plot)
        print(f"load-balance chart: {args.moe_plot}")
    return data


@exit_on_usage_error
def main(argv=None) -> int:
    setup_logging()
    args = parse_args(argv)
    for flag, path in (("--output", args.output), ("--moe-plot", args.moe_plot)):
        if path:
            output_file(path, f"{flag}={path}")
    for flag, path in (("--export", args.export), ("--make-sources", args.make_sources)):
        if path:
            output_dir(path, f"{flag}={path}")
    base = None
    if args.base:
        from lib.models import check_model_dir
        base = check_model_dir(args.base, "--base", tokenizer=True)
    if args.make_sources:
        from lib.models import ensure_tiny_models
        report = make_sources(args, base or ensure_tiny_models().target)
    elif args.moe:
        report = run_moe(args)
    else:
        report = run_mixed(args, base)
    if args.output:
        from lib.files import write_json
        write_json(Path(args.output), report)
        print(f"report: {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
