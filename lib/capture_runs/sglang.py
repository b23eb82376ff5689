"""SGLang run: EAGLE / STANDALONE tree speculative decoding through `sglang.Engine`, top-k logprobs per token.

Engine.generate(..., return_logprob=True, top_logprobs_num=K) gives meta_info output_token_logprobs and
output_top_logprobs as (logprob, token_id, text) tuples (sglang 0.5.x), and spec_verify_ct for the acceptance.
"""
from __future__ import annotations

from dataclasses import asdict

from lib.capture import Capture, PromptCapture
from lib.capture_runs import top_k_arrays
from lib.comparison_config import read_prompts, resolve_comparison_models
from lib.errors import UsageError
from lib.log import get_logger
from lib.sglang_support import import_sglang, spec_counters_from_meta

logger = get_logger(__name__)


def comparison_engine_args(cfg, target_path, draft_path) -> dict:
    """spec_num_iter -> speculative_num_steps, spec_tree_size -> speculative_num_draft_tokens,
    get_topk_per_iter() -> speculative_eagle_topk; EAGLE for an EAGLE head, STANDALONE for a draft model."""
    return {
        "model_path": str(target_path),
        "speculative_algorithm": "EAGLE" if cfg.draft_type == "eagle" else "STANDALONE",
        "speculative_draft_model_path": str(draft_path),
        "speculative_num_steps": cfg.spec_num_iter,
        "speculative_eagle_topk": cfg.get_topk_per_iter(),
        "speculative_num_draft_tokens": cfg.spec_tree_size,
        "mem_fraction_static": cfg.memory_limit,
        "chunked_prefill_size": cfg.chunk_length,
        "disable_cuda_graph": not cfg.cuda_graph,
        "random_seed": 0,
    }


def comparison_sampling(cfg) -> dict:
    """Keyword arguments of Engine.generate for one comparison prompt (greedy, top-k logprobs per token)."""
    return {"sampling_params": {"temperature": 0.0, "max_new_tokens": cfg.comparison_steps},
            "return_logprob": True, "top_logprobs_num": cfg.capture_topk}


def _spec_dict(meta: dict, num_draft_tokens: int, emitted: int) -> dict:
    counters = spec_counters_from_meta(meta, num_draft_tokens, emitted)
    if counters is None:
        return {}
    return {**asdict(counters), "spec_accept_length": meta.get("spec_accept_length")}


def prompt_capture_from_output(prompt: str, prompt_ids: list[int], output: dict, k: int,
                               num_draft_tokens: int) -> PromptCapture:
    """One Engine.generate result (dict with output_ids / text / meta_info) -> a PromptCapture.
    num_draft_tokens: the engine's speculative_num_draft_tokens (for the acceptance counters)."""
    try:
        meta = output["meta_info"]
        token_logprobs = meta["output_token_logprobs"]
        top = meta["output_top_logprobs"]
    except (KeyError, TypeError) as exc:
        raise UsageError(f"SGLang output lacks {exc} (generate with return_logprob=True, top_logprobs_num=K)") \
            from None
    tokens = [int(entry[1]) for entry in token_logprobs]
    if output.get("output_ids") is not None and list(output["output_ids"])[-len(tokens):] != tokens:
        raise UsageError("SGLang output: output_ids and output_token_logprobs disagree")
    if len(top) != len(tokens):
        raise UsageError(f"SGLang output: {len(top)} top-logprob rows for {len(tokens)} tokens")
    ids, values = top_k_arrays([[(int(e[1]), float(e[0])) for e in entries or [] if e[0] is not None]
                                for entries in top], k)
    return PromptCapture(prompt, list(prompt_ids), tokens, ids, values, text=output.get("text", ""),
                         spec=_spec_dict(meta, num_draft_tokens, len(tokens)),
                         seconds=float(meta.get("e2e_latency", 0.0) or 0.0))


def run(cfg) -> Capture:
    sglang = import_sglang()
    from lib.models import load_tokenizer
    target_path, draft_path = resolve_comparison_models(cfg)
    args = comparison_engine_args(cfg, target_path, draft_path)
    tokenizer = load_tokenizer(target_path)
    engine = sglang.Engine(**args)
    prompts = []
    try:
        for prompt in read_prompts(cfg):
            ids = tokenizer.encode(prompt)
            out = engine.generate(input_ids=ids, **comparison_sampling(cfg))
            prompts.append(prompt_capture_from_output(prompt, ids, out, cfg.capture_topk,
                                                      args["speculative_num_draft_tokens"]))
            if cfg.verbose:
                logger.info(f"  {len(prompts[-1].token_ids)} tokens, accept length "
                            f"{out['meta_info'].get('spec_accept_length')}: {prompts[-1].text!r}")
    finally:
        engine.shutdown()
    models = {"target": str(target_path), "draft": str(draft_path), "draft_type": cfg.draft_type}
    return Capture("sglang", cfg.name, cfg.to_dict(), models, prompts,
                   {"sglang": sglang.__version__, "engine_args": args})
