"""EAGLE(-1) draft head over a Llama target, in the weight layout vLLM and SGLang load.

Layout (vLLM's llama_eagle.py / SGLang's llama_eagle.py, the original EAGLE checkpoints):
  embed_tokens.weight            [V, H]   (a copy of the target's; engines may share the target's instead)
  fc.weight                      [H, 2H]  over concat([embed(token t+1), target feature t])
  layers.0.*                     one Llama decoder layer without input_layernorm (the first layer skips it)
and config.json is a LlamaConfig with num_hidden_layers = 1 and architectures ["LlamaForCausalLM"] (vLLM renames it
EagleLlamaForCausalLM for method "eagle", SGLang LlamaForCausalLMEagle for a draft). No
lm_head and no final norm: logits are the target's lm_head over the head's output. The target feature is the
target's last hidden state after its final norm (what HF's LlamaModel and vLLM's Llama return).
"""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import torch
from torch import nn

from lib.errors import UsageError
from lib.log import get_logger

logger = get_logger(__name__)

EAGLE_BUILDER_VERSION = 2
EAGLE_ARCHITECTURE = "LlamaForCausalLM"


def causal_mask(n: int, past: int, dtype, device) -> torch.Tensor:
    allowed = torch.ones(n, past + n, dtype=torch.bool, device=device).tril(past)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)[None, None]


class EagleHead(nn.Module):
    def __init__(self, config):
        super().__init__()
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding
        config._attn_implementation = "sdpa"
        self.config = config
        hidden = config.hidden_size
        self.embed_tokens = nn.Embedding(config.vocab_size, hidden)
        self.fc = nn.Linear(2 * hidden, hidden, bias=False)
        self.layers = nn.ModuleList([LlamaDecoderLayer(config, layer_idx=0)])
        self.layers[0].input_layernorm = nn.Identity()
        self.rotary = LlamaRotaryEmbedding(config)

    def forward(self, tokens: torch.Tensor, features: torch.Tensor, positions: torch.Tensor, cache=None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """tokens [n] or [B, n] (token t+1), features [..., n, H] (feature t), positions [n] (t) -> predicted
        features [..., n, H]."""
        single = tokens.dim() == 1
        tokens, features = (tokens[None], features[None]) if single else (tokens, features)
        x = self.fc(torch.cat([self.embed_tokens(tokens), features.to(self.fc.weight.dtype)], -1))
        if mask is None:
            past = cache.get_seq_length() if cache is not None else 0
            mask = causal_mask(tokens.shape[1], past, x.dtype, x.device)
        position_ids = positions[None].expand(tokens.shape[0], -1)
        rope = self.rotary(x, position_ids)
        out = self.layers[0](x, attention_mask=mask, position_ids=position_ids, past_key_values=cache,
                             use_cache=cache is not None, position_embeddings=rope)
        return out[0] if single else out

    def save(self, out: Path):
        from safetensors.torch import save_file
        out.mkdir(parents=True, exist_ok=True)
        config = self.config.to_dict()
        config.update(architectures=[EAGLE_ARCHITECTURE], num_hidden_layers=1)
        config.pop("_attn_implementation", None)
        (out / "config.json").write_text(json.dumps(config, indent=2))
        state = {k: v.contiguous() for k, v in self.state_dict().items() if not k.startswith("rotary")}
        save_file(state, str(out / "model.safetensors"))


def is_eagle_folder(path: str | Path) -> bool:
    """An EAGLE-1 head folder holds an `fc` weight (a plain causal LM does not)."""
    from safetensors import safe_open
    for file in Path(path).glob("*.safetensors"):
        with safe_open(str(file), "pt") as fh:
            if {"fc.weight", "model.fc.weight"} & set(fh.keys()):
                return True
    return False


def load_eagle_head(path: str | Path, target) -> EagleHead:
    """Load an EAGLE-1 Llama head folder; a missing embed_tokens is taken from the target."""
    from safetensors.torch import load_file
    from transformers import LlamaConfig
    folder = Path(path)
    config = LlamaConfig.from_dict(json.loads((folder / "config.json").read_text()))
    if config.hidden_size != target.config.hidden_size:
        raise UsageError(f"--draft-model-path={path}: EAGLE head hidden size {config.hidden_size} differs from the "
                         f"target's {target.config.hidden_size}")
    state = {}
    for file in sorted(folder.glob("*.safetensors")):
        state.update(load_file(str(file)))
    if not state:
        raise UsageError(f"--draft-model-path={path}: no *.safetensors weights in the EAGLE head folder")
    state = {k.removeprefix("model."): v for k, v in state.items()}
    if "embed_tokens.weight" not in state:
        state["embed_tokens.weight"] = target.get_input_embeddings().weight.detach().clone()
    head = EagleHead(config)
    missing, unexpected = head.load_state_dict(state, strict=False)
    missing = [m for m in missing if not m.startswith("rotary")]
    if missing or unexpected:
        raise UsageError(f"--draft-model-path={path}: not an EAGLE-1 Llama head (missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]})")
    return head.to(device=target.device, dtype=target.dtype).eval()


# ---------------------------------------------------------------------------------------------- tiny builder

def _eagle_config(target_config):
    from transformers import LlamaConfig
    cfg = LlamaConfig.from_dict(target_config.to_dict())
    cfg.num_hidden_layers = 1
    return cfg


def train_eagle_head(target, blocks: torch.Tensor, steps: int = 300, batch_size: int = 16, lr: float = 3e-3,
                     seed: int = 0) -> EagleHead:
    """Regress the target's next feature (smooth L1) plus 0.1 x cross-entropy of its logits, as EAGLE trains."""
    torch.manual_seed(seed)
    head = EagleHead(_eagle_config(target.config))
    head.embed_tokens.weight.data.copy_(target.get_input_embeddings().weight.data)
    head.embed_tokens.weight.requires_grad_(False)
    with torch.no_grad():
        features = torch.cat([target.model(input_ids=blocks[i:i + 32]).last_hidden_state
                              for i in range(0, len(blocks), 32)])
    lm_head = target.lm_head
    params = [p for p in head.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    length = blocks.shape[1]
    positions = torch.arange(length - 1)
    mask = causal_mask(length - 1, 0, torch.float32, "cpu")
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
        idx = torch.randint(len(blocks), (batch_size,), generator=gen)
        batch, feats = blocks[idx], features[idx]
        pred = head(batch[:, 1:], feats[:, :-1], positions, None, mask)
        reg = nn.functional.smooth_l1_loss(pred, feats[:, 1:])
        ce = nn.functional.cross_entropy(lm_head(pred[:, :-1]).flatten(0, 1), batch[:, 2:].flatten())
        loss = reg + 0.1 * ce
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            logger.info(f"  eagle head: step {step + 1}/{steps} loss {loss.item():.3f}")
    return head.eval()


def ensure_tiny_eagle(tiny=None, steps: int = 150) -> Path:
    """Build (once, cached) an EAGLE head trained on the tiny target's hidden states; returns its folder."""
    from lib.models import cached_build, ensure_tiny_models
    tiny = tiny or ensure_tiny_models()
    key = hashlib.sha256(f"{Path(tiny.root).name}|{steps}|{EAGLE_BUILDER_VERSION}".encode()).hexdigest()[:16]

    def build(out: Path):
        from lib.corpus import generate_corpus
        from lib.models import _token_blocks, load_model, load_tokenizer
        logger.info("Training a tiny EAGLE head on the tiny target (one time, cached) ...")
        tokenizer = load_tokenizer(tiny.target)
        target = load_model(tiny.target)
        for p in target.parameters():
            p.requires_grad_(False)
        blocks = _token_blocks(tokenizer, generate_corpus(7, 600), 64)[:256]
        head = train_eagle_head(target, blocks, steps=steps, batch_size=16)
        head.save(out)
        tokenizer.save_pretrained(str(out))

    return cached_build("tiny-eagle", key, build)
