"""vLLM run: vLLM's chain speculative decoding (EAGLE head or draft model), top-k logprobs of every emitted token.

spec_num_iter -> num_speculative_tokens (tree drafting needs vLLM's GPU tree-attention backend); acceptance comes
from vLLM's counters, read before and after each prompt.
"""
from __future__ import annotations

import time
from dataclasses import asdict

from lib.capture import Capture, PromptCapture
from lib.capture_runs import top_k_arrays
from lib.comparison_config import read_prompts, resolve_comparison_models
from lib.log import get_logger
from lib.vllm_support import (
    import_vllm,
    metrics_difference,
    prepare_cpu_environment,
    read_spec_metrics,
    spec_counters_from,
)

logger = get_logger(__name__)


def speculative_config(cfg, draft_path) -> dict:
    method = "eagle" if cfg.draft_type == "eagle" else "draft_model"
    return {"method": method, "model": str(draft_path), "num_speculative_tokens": cfg.spec_num_iter}


def llm_kwargs(cfg, target_path, speculative: dict, on_gpu: bool) -> dict:
    """vllm.LLM arguments; on CPU float32 and enforce_eager, which vLLM's CPU backend needs here."""
    kwargs = dict(model=str(target_path), dtype="auto" if on_gpu else "float32", enforce_eager=not cfg.cuda_graph,
                  speculative_config=speculative, disable_log_stats=False, max_logprobs=cfg.capture_topk,
                  max_model_len=2048, seed=0)
    if on_gpu:
        kwargs["gpu_memory_utilization"] = cfg.memory_limit
    return kwargs


def run(cfg) -> Capture:
    on_gpu = not prepare_cpu_environment()
    vllm = import_vllm()
    target_path, draft_path = resolve_comparison_models(cfg)
    speculative = speculative_config(cfg, draft_path)
    llm = vllm.LLM(**llm_kwargs(cfg, target_path, speculative, on_gpu))
    tokenizer = llm.get_tokenizer()
    params = vllm.SamplingParams(temperature=0.0, max_tokens=cfg.comparison_steps, logprobs=cfg.capture_topk)
    prompts = []
    for prompt in read_prompts(cfg):
        ids = tokenizer.encode(prompt)
        before, t0 = read_spec_metrics(), time.perf_counter()
        out = llm.generate([{"prompt_token_ids": ids}], params, use_tqdm=False)[0].outputs[0]
        seconds = time.perf_counter() - t0
        top_ids, top_logprobs = top_k_arrays([[(token, lp.logprob) for token, lp in step.items()]
                                                  for step in out.logprobs], cfg.capture_topk)
        spec = asdict(spec_counters_from(metrics_difference(before, read_spec_metrics())))
        prompts.append(PromptCapture(prompt, ids, list(out.token_ids), top_ids, top_logprobs, text=out.text,
                                     spec=spec, seconds=seconds))
        if cfg.verbose:
            logger.info(f"  {len(out.token_ids)} tokens, {spec['num_drafts']} drafts, "
                        f"{spec['accepted_tokens']} accepted: {out.text!r}")
    models = {"target": str(target_path), "draft": str(draft_path), "draft_type": cfg.draft_type}
    return Capture("vllm", cfg.name, cfg.to_dict(), models, prompts,
                   {"vllm": vllm.__version__, "speculative_config": speculative,
                    "note": "vLLM drafts a chain of spec_num_iter tokens; the tree size does not apply"})
