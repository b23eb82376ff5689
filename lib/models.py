"""Model and tokenizer loading, and the builder of the tiny local models.

The tiny models are real Hugging Face folders (Llama architecture, byte-level BPE tokenizer, safetensors) that
the project trains itself in a couple of minutes on a CPU, so every engine can be run for real without
downloading anything. They are cached outside the repository under a key made of their inputs.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from lib import files
from lib.errors import UsageError
from lib.log import get_logger

logger = get_logger(__name__)

BUILDER_VERSION = 1  # bump when the builder changes in a way the cache key would not see
SPECIAL_TOKENS = ["<|endoftext|>", "<|user|>", "<|assistant|>", "<|pad|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}<|user|>{{ message['content'] }}"
    "{% elif message['role'] == 'assistant' %}<|assistant|>{{ message['content'] }}<|endoftext|>"
    "{% else %}{{ message['content'] }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def cache_root() -> Path:
    """SPECLAB_CACHE_DIR (empty = unset), else ~/.cache/speclab: a folder that exists or can be made."""
    raw = os.environ.get("SPECLAB_CACHE_DIR", "").strip()
    return files.output_dir(Path(raw) if raw else Path.home() / ".cache" / "speclab",
                            f"SPECLAB_CACHE_DIR={raw}" if raw else "the cache folder ~/.cache/speclab")


@dataclass(frozen=True)
class LlamaShape:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int


@dataclass(frozen=True)
class TinySpec:
    """Everything that determines the tiny models; its hash is the cache key."""
    seed: int = 1234
    vocab_size: int = 1024
    num_docs: int = 6000
    seq_len: int = 128
    batch_size: int = 16
    target: LlamaShape = LlamaShape(128, 384, 4, 2, 1)
    draft: LlamaShape = LlamaShape(64, 192, 2, 1, 1)
    target_steps: int = 250
    draft_steps: int = 250
    lr: float = 3e-3
    max_position_embeddings: int = 2048

    def key(self) -> str:
        blob = json.dumps({"spec": asdict(self), "version": BUILDER_VERSION}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass
class TinyModels:
    root: Path
    tokenizer: Path = field(init=False)
    target: Path = field(init=False)
    draft: Path = field(init=False)

    def __post_init__(self):
        self.tokenizer = self.root / "tokenizer"
        self.target = self.root / "target"
        self.draft = self.root / "draft"


# ---------------------------------------------------------------------------------------------- loading

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model")
EMBEDDING_NAMES = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight")
EMBEDDING_WIDTH_KEYS = {"word_embed_proj_dim", "embedding_size"}  # models whose embedding is narrower (OPT, ALBERT)
SAFETENSORS_ONLY = ("SpecLab loads *.safetensors weights only (a .bin file is a pickle, never unpickled); convert "
                    "the folder, e.g. AutoModelForCausalLM.from_pretrained(folder).save_pretrained(out)")


def check_model_dir(path: str | Path, what: str, tokenizer: bool = False, known_type: bool = True) -> Path:
    """A local Hugging Face model folder that loads, or a UsageError naming `what` (e.g. TARGET_MODEL): config.json
    a JSON object, safetensors weights whose headers parse and cover their files, the config's vocab_size equal to
    the embedding's rows, (with `tokenizer`) a tokenizer, and (with `known_type`) a model_type transformers knows.
    Reads headers only, so it runs before any mode."""
    p = Path(path).expanduser()
    label = f"{what}={path}"
    if not p.is_dir():
        raise UsageError(f"{label}: {files.not_a_folder(p)} (expected a local Hugging Face model folder)")
    config = model_config(p, label)
    weights = sorted(p.glob("*.safetensors"))
    if not weights:
        found = "only PyTorch .bin weights" if any(p.glob("*.bin")) or any(p.glob("*.pt")) else "no weights"
        raise UsageError(f"{label}: {found} in the folder; {SAFETENSORS_ONLY}")
    _check_shards(p, label)
    shape = _embedding_shape(weights, label)
    width = shape[1] if shape and len(shape) == 2 and not EMBEDDING_WIDTH_KEYS & set(config) else None
    for key, size, what_of in (("vocab_size", shape[0] if shape else None, "rows"), ("hidden_size", width, "columns")):
        value = config.get(key)
        if isinstance(value, int) and size is not None and size != value:
            raise UsageError(f"{label}: config.json says {key} {value} but the weights' embedding has {size} "
                             f"{what_of}; the folder's config and weights do not belong together")
    if tokenizer and not any((p / name).is_file() for name in TOKENIZER_FILES):
        raise UsageError(f"{label}: no tokenizer in the folder (expected one of {', '.join(TOKENIZER_FILES)})")
    if known_type:
        check_model_type(p, what)
    return p


def model_config(folder: Path, label: str) -> dict:
    """config.json of a model folder as a dict, or one line naming `label`."""
    accepted = "a JSON object with model_type (a Hugging Face config)"
    if not (folder / "config.json").is_file():
        raise UsageError(f"{label}: not a Hugging Face model folder (no config.json)")
    text = files.read_text(folder / "config.json", f"{label}: config.json", accepted)
    try:
        config = files.loads_json(text)
    except (ValueError, RecursionError) as exc:
        raise UsageError(f"{label}: config.json is not valid JSON ({str(exc)[:80]}); expected {accepted}") from None
    if not isinstance(config, dict) or not isinstance(config.get("model_type"), str):
        found = "has no model_type" if isinstance(config, dict) else f"holds a {type(config).__name__}"
        raise UsageError(f"{label}: config.json {found}; expected {accepted}")
    return config


def check_model_type(folder: Path, what: str) -> None:
    """config.json is one transformers reads: a model_type it knows, fields of the types it expects (it imports
    transformers: the check that comes last)."""
    config = model_config(folder, f"{what}={folder}")
    if "auto_map" in config:  # a model with its own code is left to transformers
        return
    from transformers import CONFIG_MAPPING
    if config["model_type"] not in CONFIG_MAPPING:
        raise UsageError(f"{what}={folder}: config.json's model_type {config['model_type']!r} is not one this "
                         "transformers version knows")
    try:
        CONFIG_MAPPING[config["model_type"]].from_dict(config)
    except Exception as exc:  # noqa: BLE001 - transformers' config classes raise many types for a bad field
        reason = " ".join(str(exc).split())[:200] or exc.__class__.__name__
        raise UsageError(f"{what}={folder}: config.json is not a {config['model_type']} config transformers reads "
                         f"({reason})") from None


def _check_shards(folder: Path, label: str) -> None:
    """A sharded checkpoint's index names files that are all there."""
    index = folder / "model.safetensors.index.json"
    if not index.is_file():
        return
    try:
        weight_map = files.loads_json(index.read_text(encoding="utf-8")).get("weight_map")
        shards = set(weight_map.values())
    except (ValueError, AttributeError, TypeError, RecursionError):
        raise UsageError(f"{label}: {index.name} is not a safetensors index (a JSON object with a weight_map of "
                         "tensor name to file)") from None
    missing = sorted(str(s) for s in shards if not (folder / str(s)).is_file())
    if missing:
        raise UsageError(f"{label}: {index.name} names {len(missing)} shard(s) not in the folder, e.g. {missing[0]}")


def _embedding_shape(weights: list[Path], label: str) -> list[int] | None:
    """Parse every safetensors header (a truncated or corrupt file fails here, before any weight is read); the shape
    of the token embedding if one is found."""
    from safetensors import SafetensorError, safe_open
    shape = None
    for file in weights:
        try:
            with safe_open(str(file), "np") as fh:
                for name in fh.keys():
                    if shape is None and name.endswith(EMBEDDING_NAMES):
                        shape = list(fh.get_slice(name).get_shape())
        except (SafetensorError, OSError, ValueError) as exc:
            reason = str(exc).splitlines()[0][:120] if str(exc) else exc.__class__.__name__
            raise UsageError(f"{label}: {file.name} is not a complete safetensors file ({reason}); "
                             "download or save it again") from None
    return shape


def vocab_size_of(folder: Path) -> int | None:
    vocab = model_config(folder, str(folder)).get("vocab_size")
    return vocab if isinstance(vocab, int) else None


def check_same_vocab(target: Path, draft: Path, what: str = "DRAFTER_MODEL") -> None:
    """The draft proposes ids of the target's tokenizer: both vocabularies must have one size."""
    t, d = vocab_size_of(target), vocab_size_of(draft)
    if t is not None and d is not None and t != d:
        raise UsageError(f"{what}={draft}: vocabulary size {d} differs from the target's {t}; the draft must share "
                         "the target's tokenizer")


def check_gguf(path: str | Path, label: str) -> Path:
    """A file that starts with GGUF's magic, or one line naming `label`."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise UsageError(f"{label}: {files.not_a_file(p)}; expected a GGUF file")
    try:
        with open(p, "rb") as fh:
            magic = fh.read(4)
    except OSError as exc:
        raise UsageError(f"{label}: cannot be read ({exc.strerror}); expected a GGUF file") from None
    if magic != b"GGUF":
        raise UsageError(f"{label}: not a GGUF file (it does not start with GGUF's magic); expected a llama.cpp "
                         "GGUF model file")
    return p


def load_tokenizer(path: str | Path, what: str = ""):
    """The folder's tokenizer, or one line naming `what` (e.g. TARGET_MODEL) and the folder."""
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(str(path))
    except Exception as exc:  # noqa: BLE001 - transformers and tokenizers raise many types for a broken file
        reason = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else exc.__class__.__name__
        label = f"{what}={path}" if what else str(path)
        raise UsageError(f"{label}: the tokenizer cannot be loaded ({exc.__class__.__name__}: {reason})") from None


def load_model(path: str | Path, dtype: str = "float32", device: str = "cpu", device_map=None):
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()
    torch_dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    kwargs = {"dtype": torch_dtype}
    if device_map is not None:
        kwargs["device_map"] = device_map
    model = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
    if device_map is None:
        model.to(device)
    return model.eval()


# ---------------------------------------------------------------------------------------------- building

def eos_ids_of(model) -> set[int]:
    """The model's end-of-sequence ids (generation_config holds one id, a list, or None)."""
    eos = model.generation_config.eos_token_id
    return set(eos if isinstance(eos, list) else [eos]) - {None}


def cached_build(name: str, key: str, build) -> Path:
    """Return cache_root()/name-key, calling build(tmp_dir) once to fill it (atomic, locked across processes)."""
    final = cache_root() / f"{name}-{key}"
    if (final / "DONE").exists():
        return final
    lock = files.FolderLock(cache_root() / f".{name}-{key}.lock")
    lock.acquire(f"pid {os.getpid()} building {final}", wait=True)  # another process may be building it
    try:
        if (final / "DONE").exists():
            return final
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=cache_root()))
        try:
            t0 = time.time()
            build(tmp)
            (tmp / "DONE").write_text(json.dumps({"built_s": round(time.time() - t0, 1)}))
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    finally:
        lock.release()
    return final


def ensure_tiny_models(spec: TinySpec = TinySpec()) -> TinyModels:
    """Build (once) and return the tiny target/draft pair."""
    root = cached_build("tiny-llama", spec.key(), lambda out: _build_tiny(spec, out))
    return TinyModels(root)


def _train_tokenizer(spec: TinySpec, docs: list[str], out: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    # exactly GPT-2's pre-tokenizer, so llama.cpp's "gpt-2" pre-tokenizer reproduces it
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=spec.vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(docs, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                   unk_token=None, pad_token="<|pad|>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(out))
    return fast


def _token_blocks(tokenizer, docs: list[str], seq_len: int):
    import torch
    ids: list[int] = []
    for doc in docs:
        ids.extend(tokenizer.encode(doc, add_special_tokens=False))
        ids.append(tokenizer.eos_token_id)
    n = len(ids) // seq_len
    return torch.tensor(ids[: n * seq_len]).view(n, seq_len)


def _llama_config(spec: TinySpec, shape: LlamaShape, tokenizer):
    from transformers import LlamaConfig
    return LlamaConfig(vocab_size=len(tokenizer), hidden_size=shape.hidden_size,
                       intermediate_size=shape.intermediate_size, num_hidden_layers=shape.num_hidden_layers,
                       num_attention_heads=shape.num_attention_heads, num_key_value_heads=shape.num_key_value_heads,
                       max_position_embeddings=spec.max_position_embeddings, rope_theta=10000.0,
                       tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)


def train_causal_lm(model, blocks, steps: int, batch_size: int, lr: float, seed: int, label: str):
    """Plain next-token training with AdamW and a cosine schedule; returns the final loss."""
    import math

    import torch
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    model.train()
    loss_value = float("nan")
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps)) * min(1.0, (step + 1) / 20)
        batch = blocks[torch.randint(len(blocks), (batch_size,), generator=gen)]
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        loss_value = loss.item()
        if step % 100 == 0 or step == steps - 1:
            logger.info(f"  {label}: step {step + 1}/{steps} loss {loss_value:.3f}")
    model.eval()
    return loss_value


def save_hf_folder(model, tokenizer, out: Path, extra_readme: str = ""):
    from transformers import GenerationConfig
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                     pad_token_id=tokenizer.pad_token_id, do_sample=False).save_pretrained(str(out))
    if extra_readme:
        (out / "README.md").write_text(extra_readme)


def _build_tiny(spec: TinySpec, out: Path):
    import torch
    from transformers import LlamaForCausalLM

    from lib.corpus import generate_corpus

    logger.info(f"Building the tiny local models (one time, cached under {out.parent}) ...")
    torch.manual_seed(spec.seed)
    docs = generate_corpus(spec.seed, spec.num_docs)
    tokenizer = _train_tokenizer(spec, docs, out / "tokenizer")
    blocks = _token_blocks(tokenizer, docs, spec.seq_len)
    losses = {}
    for name, shape, steps in (("target", spec.target, spec.target_steps), ("draft", spec.draft, spec.draft_steps)):
        torch.manual_seed(spec.seed + len(name))
        model = LlamaForCausalLM(_llama_config(spec, shape, tokenizer))
        losses[name] = train_causal_lm(model, blocks, steps, spec.batch_size, spec.lr, spec.seed, name)
        save_hf_folder(model, tokenizer, out / name,
                       f"# tiny {name}\nTrained by SpecLab's builder (lib/models.py) for tests and the default run.\n")
    (out / "build_info.json").write_text(json.dumps({"spec": asdict(spec), "final_loss": losses}, indent=2))


# ---------------------------------------------------------------------------------------------- resolving

@dataclass
class ModelPaths:
    """The target and draft folders a run uses (the tiny local ones unless TARGET_MODEL/DRAFTER_MODEL say)."""
    target: Path
    draft: Path | None
    tiny: bool

    def describe(self) -> dict:
        return {"target": str(self.target), "draft": str(self.draft) if self.draft else None, "tiny": self.tiny}


def resolve_models(cfg, need_draft: bool = True) -> ModelPaths:
    if cfg.target_model:
        # both folders' own checks first, then the one that imports transformers
        target = check_model_dir(cfg.target_model, "TARGET_MODEL", tokenizer=True, known_type=False)
        draft = check_model_dir(cfg.drafter_model, "DRAFTER_MODEL", known_type=False) if cfg.drafter_model else None
        if need_draft and draft is None:
            raise UsageError("DRAFTER_MODEL is empty: with TARGET_MODEL set, speculative modes need a draft "
                             "model folder (or use INFERENCE_METHOD=target)")
        if need_draft:
            check_same_vocab(target, draft)
        for folder, what in ((target, "TARGET_MODEL"), (draft, "DRAFTER_MODEL")):
            if folder is not None:
                check_model_type(folder, what)
        return ModelPaths(target, draft, tiny=False)
    if cfg.drafter_model:
        raise UsageError(f"DRAFTER_MODEL={cfg.drafter_model}: set TARGET_MODEL too (the tiny target's tokenizer "
                         "only fits the tiny draft)")
    tiny = ensure_tiny_models()
    return ModelPaths(tiny.target, tiny.draft, tiny=True)
