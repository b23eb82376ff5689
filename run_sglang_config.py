#!/usr/bin/env python3
"""SGLang EAGLE run of one configuration with capture -> <output-dir>/sglang_capture_<config>.json + .safetensors.

The seed's mapping: spec_num_iter -> speculative_num_steps, spec_tree_size -> speculative_num_draft_tokens,
get_topk_per_iter() -> speculative_eagle_topk (algorithm EAGLE; STANDALONE with --draft-type model); greedy,
return_logprob with top_logprobs_num = --capture-topk; acceptance length from meta_info. Needs an NVIDIA GPU and
sglang (requirements/sglang.txt); it cannot run on CPU-only machines.

  python run_sglang_config.py --config-name config1 --save-results --verbose
"""
from __future__ import annotations


from lib.capture import Capture
from lib.comparison_config import read_prompts, resolve_comparison_models
from lib.engines.sglang_engine import (comparison_engine_args, comparison_sampling, import_sglang,
                                       prompt_capture_from_output)
from lib.errors import exit_on_usage_error


def run_sglang(cfg, log=print) -> Capture:
    sglang = import_sglang()
    from lib.models import load_tokenizer
    target_path, draft_path = resolve_comparison_models(cfg, log=log)
    args = comparison_engine_args(cfg, target_path, draft_path)
    tokenizer = load_tokenizer(target_path)
    engine = sglang.Engine(**args)
    prompts = []
    try:
        for prompt in read_prompts(cfg):
            ids = tokenizer.encode(prompt)
            out = engine.generate(input_ids=ids, **comparison_sampling(cfg))
            prompts.append(prompt_capture_from_output(prompt, ids, out, cfg.capture_topk))
            if cfg.verbose:
                log(f"  {len(prompts[-1].token_ids)} tokens, accept length "
                    f"{out['meta_info'].get('spec_accept_length')}: {prompts[-1].text!r}")
    finally:
        engine.shutdown()
    models = {"target": str(target_path), "draft": str(draft_path), "draft_type": cfg.draft_type}
    return Capture("sglang", cfg.name, cfg.to_dict(), models, prompts,
                   {"sglang": sglang.__version__, "engine_args": args})


@exit_on_usage_error
def main(argv=None):
    from run_single_config import capture_cli
    capture_cli(run_sglang, __doc__, argv)


if __name__ == "__main__":
    main()
