#!/usr/bin/env python3
"""Reference engine run of one configuration: the project's PyTorch tree speculative decoding (the seed's CPM.cu
role) with logits capture -> <output-dir>/logits_capture_<config>.json + .safetensors (with --save-results).

  python run_single_config.py --config-name config1 --save-results
  python run_single_config.py --spec-num-iter 3 --spec-tree-size 16 --comparison-steps 15 --draft-type model
"""
from __future__ import annotations

import argparse
import time

from lib.capture import Capture, PromptCapture, capture_stem, save_capture, topk_from_logits
from lib.comparison_config import (add_comparison_arguments, config_from_args, read_prompts,
                                   resolve_comparison_models)
from lib.errors import exit_on_usage_error


def load_drafter(cfg, draft_path, target):
    from lib.models import load_model
    from lib.spec.eagle import load_eagle_head
    from lib.spec.tree import EagleDrafter, ModelDrafter
    if cfg.draft_type == "eagle":
        head = load_eagle_head(draft_path, target)
        return lambda: EagleDrafter(head, target)
    draft = load_model(draft_path, target.dtype, target.device)
    return lambda: ModelDrafter(draft)


def run_reference(cfg, log=print) -> Capture:
    """Tree SD over every prompt; one PromptCapture each."""
    import torch
    from rich.progress import track

    from lib.models import eos_ids_of, load_model, load_tokenizer
    from lib.spec.tree import tree_speculative_generate

    target_path, draft_path = resolve_comparison_models(cfg, log=log)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        torch.cuda.set_per_process_memory_fraction(cfg.memory_limit)
    dtype = "bfloat16" if device == "cuda" else "float32"
    tokenizer = load_tokenizer(target_path)
    target = load_model(target_path, dtype, device)
    new_drafter = load_drafter(cfg, draft_path, target)
    eos_ids = eos_ids_of(target)
    topk = cfg.get_topk_per_iter()
    prompts = []
    for prompt in track(read_prompts(cfg), description="reference tree SD", disable=not cfg.verbose):
        ids = tokenizer.encode(prompt)
        t0 = time.perf_counter()
        gen = tree_speculative_generate(target, new_drafter(), ids, cfg.comparison_steps, cfg.spec_num_iter, topk,
                                        cfg.spec_tree_size, eos_ids, prefill_chunk=cfg.chunk_length)
        seconds = time.perf_counter() - t0
        logits = torch.stack([s.logits for s in gen.steps]).cpu()
        top_ids, top_logprobs, top_logits = topk_from_logits(logits, cfg.capture_topk)
        rounds = [{"tree_tokens": r.tree_tokens, "tree_parents": r.tree_parents, "accepted_path": r.accepted_path,
                   "accept_length": r.accept_length + 1, "seconds": r.seconds} for r in gen.rounds]
        accepted = [r.accept_length for r in gen.rounds]
        per_pos = [sum(a > i for a in accepted) for i in range(cfg.spec_num_iter)]
        spec = {"num_drafts": len(gen.rounds), "draft_tokens": len(gen.rounds) * (cfg.spec_tree_size - 1),
                "accepted_tokens": sum(accepted), "accepted_per_position": per_pos}
        prompts.append(PromptCapture(prompt, ids, gen.tokens, top_ids, top_logprobs, top_logits,
                                     logits.numpy() if cfg.save_full_logits else None,
                                     tokenizer.decode(gen.tokens, skip_special_tokens=True),
                                     [s.round for s in gen.steps], rounds, [a + 1 for a in accepted], spec, seconds))
        if cfg.verbose:
            mean = sum(accepted) / len(accepted) + 1 if accepted else float("nan")
            log(f"  {len(gen.tokens)} tokens in {len(gen.rounds)} rounds (acceptance length {mean:.2f}): "
                f"{prompts[-1].text!r}")
    models = {"target": str(target_path), "draft": str(draft_path), "draft_type": cfg.draft_type,
              "dtype": dtype, "device": device}
    return Capture("reference", cfg.name, cfg.to_dict(), models, prompts,
                   {"torch": torch.__version__, "tree_topk_per_iter": topk})


def summarize(capture: Capture) -> str:
    totals = capture.spec_totals()
    tokens = sum(len(p.token_ids) for p in capture.prompts)
    seconds = sum(p.seconds for p in capture.prompts)
    length = 1 + totals["accepted_tokens"] / totals["num_drafts"] if totals["num_drafts"] else float("nan")
    return (f"{capture.engine} {capture.config_name}: {len(capture.prompts)} prompts, {tokens} tokens in "
            f"{seconds:.2f} s, {totals['num_drafts']} verification rounds, acceptance length {length:.3f}")


def save_if_asked(capture: Capture, cfg, log=print):
    if cfg.save_results:
        path = save_capture(capture, cfg.output_dir, capture_stem(capture.engine, capture.config_name))
        log(f"capture written: {path} (+ {path.with_suffix('.safetensors').name})")
        return path
    log("capture not saved (add --save-results)")
    return None


def capture_cli(run, description: str, argv=None):
    """The command line every capture script shares: the comparison flags -> run -> summary -> saved capture."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    cfg = config_from_args(add_comparison_arguments(parser).parse_args(argv))
    capture = run(cfg)
    print(summarize(capture))
    save_if_asked(capture, cfg)


@exit_on_usage_error
def main(argv=None):
    capture_cli(run_reference, __doc__, argv)


if __name__ == "__main__":
    main()
