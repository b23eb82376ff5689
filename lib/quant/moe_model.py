"""A tiny Mixtral-shaped MoE model (transformers' own MixtralForCausalLM), trained briefly on the shipped corpus
so its routers make real, uneven choices; built once and cached next to the tiny Llama pair."""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from lib.log import get_logger
from lib.models import LlamaShape

logger = get_logger(__name__)


@dataclass(frozen=True)
class TinyMoESpec:
    shape: LlamaShape = LlamaShape(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                                   num_key_value_heads=1)
    num_local_experts: int = 8
    num_experts_per_tok: int = 2
    steps: int = 80
    batch_size: int = 8
    lr: float = 3e-3
    seed: int = 99


def ensure_tiny_moe(spec: TinyMoESpec = TinyMoESpec()) -> Path:
    """Folder of the tiny MoE model (HF format, with the tiny models' tokenizer)."""
    from lib.models import cached_build, ensure_tiny_models
    tiny = ensure_tiny_models()
    key = hashlib.sha256(json.dumps({"spec": asdict(spec), "tiny": tiny.root.name, "v": 1},
                                    sort_keys=True).encode()).hexdigest()[:16]
    return cached_build("tiny-moe", key, lambda out: _build(spec, tiny, out)) / "model"


def _build(spec: TinyMoESpec, tiny, out: Path):
    import torch
    from transformers import MixtralConfig, MixtralForCausalLM

    from lib.corpus import generate_corpus
    from lib.models import load_tokenizer, save_hf_folder, train_causal_lm

    logger.info("Building the tiny MoE model (one time, cached) ...")
    tok = load_tokenizer(tiny.target)
    torch.manual_seed(spec.seed)
    config = MixtralConfig(vocab_size=len(tok), **asdict(spec.shape), num_local_experts=spec.num_local_experts,
                           num_experts_per_tok=spec.num_experts_per_tok, max_position_embeddings=2048,
                           bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                           tie_word_embeddings=False)
    model = MixtralForCausalLM(config)
    docs = generate_corpus(spec.seed, 800)
    ids = [tok(d).input_ids[:64] for d in docs]
    blocks = torch.tensor([x + [tok.pad_token_id or 0] * (64 - len(x)) for x in ids])
    train_causal_lm(model, blocks, spec.steps, spec.batch_size, spec.lr, spec.seed, "tiny-moe")
    save_hf_folder(model, tok, out / "model", "# tiny MoE\nMixtral-shaped, built by lib/quant/moe_model.py.\n")
