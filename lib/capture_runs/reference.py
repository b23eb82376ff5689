"""Reference run: the project's PyTorch tree speculative decoding, every step's logits captured."""
from __future__ import annotations

import time

from lib.capture import Capture, PromptCapture, topk_from_logits
from lib.comparison_config import read_prompts, resolve_comparison_models
from lib.log import get_logger

logger = get_logger(__name__)


def load_drafter(cfg, draft_path, target):
    """A factory of fresh drafters (one per prompt): an EAGLE head over the target, or a separate draft model."""
    from lib.decoding.eagle import load_eagle_head
    from lib.decoding.tree import EagleDrafter, ModelDrafter
    from lib.models import load_model
    if cfg.draft_type == "eagle":
        head = load_eagle_head(draft_path, target)
        return lambda: EagleDrafter(head, target)
    draft = load_model(draft_path, target.dtype, target.device)
    return lambda: ModelDrafter(draft)


def spec_counts(cfg, gen) -> dict:
    """Acceptance of one prompt's rounds: every round verifies spec_tree_size - 1 drafted nodes."""
    accepted = [r.accept_length for r in gen.rounds]
    per_pos = [sum(a > i for a in accepted) for i in range(cfg.spec_num_iter)]
    return {"num_drafts": len(gen.rounds), "draft_tokens": len(gen.rounds) * (cfg.spec_tree_size - 1),
            "accepted_tokens": sum(accepted), "accepted_per_position": per_pos}


def prompt_capture(cfg, prompt: str, ids: list[int], gen, seconds: float, tokenizer) -> PromptCapture:
    import torch
    logits = torch.stack([s.logits for s in gen.steps]).cpu()
    top_ids, top_logprobs, top_logits = topk_from_logits(logits, cfg.capture_topk)
    rounds = [{"tree_tokens": r.tree_tokens, "tree_parents": r.tree_parents, "accepted_path": r.accepted_path,
               "accept_length": r.accept_length + 1, "seconds": r.seconds} for r in gen.rounds]
    return PromptCapture(prompt, ids, gen.tokens, top_ids, top_logprobs, top_logits,
                         logits.numpy() if cfg.save_full_logits else None,
                         tokenizer.decode(gen.tokens, skip_special_tokens=True), [s.round for s in gen.steps],
                         rounds, [r.accept_length + 1 for r in gen.rounds], spec_counts(cfg, gen), seconds)


def describe_prompt(capture: PromptCapture) -> str:
    lengths = capture.accept_lengths
    mean = sum(lengths) / len(lengths) if lengths else float("nan")
    return (f"  {len(capture.token_ids)} tokens in {len(capture.rounds)} rounds (acceptance length {mean:.2f}): "
            f"{capture.text!r}")


def run(cfg) -> Capture:
    """Tree SD over every prompt; one PromptCapture each."""
    import torch
    from rich.progress import track

    from lib.decoding.tree import tree_speculative_generate
    from lib.models import eos_ids_of, load_model, load_tokenizer

    target_path, draft_path = resolve_comparison_models(cfg)
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
        prompts.append(prompt_capture(cfg, prompt, ids, gen, time.perf_counter() - t0, tokenizer))
        if cfg.verbose:
            logger.info(describe_prompt(prompts[-1]))
    models = {"target": str(target_path), "draft": str(draft_path), "draft_type": cfg.draft_type,
              "dtype": dtype, "device": device}
    return Capture("reference", cfg.name, cfg.to_dict(), models, prompts,
                   {"torch": torch.__version__, "tree_topk_per_iter": topk})
