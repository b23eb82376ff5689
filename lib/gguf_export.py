"""Write a local Hugging Face Llama folder as an f32 GGUF file for llama.cpp (cached, keyed by the folder's hash).

Only what the tiny models need (and any plain Llama with a byte-level BPE tokenizer whose pre-tokenizer is GPT-2's):
gguf.GGUFWriter with llama.cpp's tensor names, Q/K rows permuted the way llama.cpp's converter does (HF stores the
rotary halves split, llama.cpp expects them interleaved), `tokenizer.ggml.pre = "gpt-2"`. For other models use
llama.cpp's own convert_hf_to_gguf.py.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from lib.errors import EngineUnavailable, UsageError
from lib.log import get_logger
from lib.models import cache_root, cached_build, check_gguf, check_model_dir

logger = get_logger(__name__)

GGUF_NAME = "model-f32.gguf"
EXPORT_VERSION = 1


def folder_hash(folder: Path) -> str:
    digest = hashlib.sha256(f"gguf-export-v{EXPORT_VERSION}".encode())
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.suffix in (".json", ".safetensors"):
            digest.update(path.name.encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def ensure_gguf(model_dir: str | Path, what: str = "model folder") -> Path:
    """The GGUF file of this HF folder, written once and cached (cache_root()/gguf-<hash>/model-f32.gguf). `what`
    names the input in errors (e.g. DRAFTER_MODEL)."""
    folder = check_model_dir(model_dir, what, tokenizer=True)
    if not (folder / "tokenizer.json").is_file():
        raise UsageError(f"{what}={model_dir}: no tokenizer.json; this exporter reads a byte-level BPE "
                         "tokenizer.json (use llama.cpp's convert_hf_to_gguf.py for this model)")
    root = cached_build("gguf", folder_hash(folder), lambda out: write_gguf(folder, out / GGUF_NAME))
    return root / GGUF_NAME


def _permute(weight, n_head: int):
    """llama.cpp's converter permutation of Q/K rows (rotary pairs interleaved instead of split in halves)."""
    rows = weight.shape[0]
    return weight.reshape(n_head, 2, rows // n_head // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _tokenizer_fields(folder: Path):
    spec = json.loads((folder / "tokenizer.json").read_text())
    model = spec["model"]
    if model.get("type") != "BPE":
        raise UsageError(f"{folder}: tokenizer model {model.get('type')} is not byte-level BPE; use llama.cpp's "
                         "convert_hf_to_gguf.py for this model")
    vocab = dict(model["vocab"])
    special = {t["content"]: t["id"] for t in spec.get("added_tokens", [])}
    vocab.update(special)
    tokens = [""] * (max(vocab.values()) + 1)
    for text, idx in vocab.items():
        tokens[idx] = text
    types = [3 if t in special else 1 for t in tokens]  # 3 = CONTROL, 1 = NORMAL (gguf.TokenType)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    return tokens, types, merges


class _LlamaWeights(dict):
    """A missing tensor is a folder this exporter cannot write, said in one line (not a KeyError)."""

    def __missing__(self, name):
        raise UsageError(f"model folder {self.folder}: no tensor {name}; this exporter writes Llama checkpoints "
                         "with Hugging Face's tensor names only")


def write_gguf(folder: Path, out: Path):
    import gguf
    import numpy as np
    from safetensors.numpy import load_file

    config = json.loads((folder / "config.json").read_text())
    if config.get("model_type") != "llama":
        raise UsageError(f"{folder}: model_type {config.get('model_type')!r}; this exporter writes Llama only")
    weights = _LlamaWeights()
    weights.folder = folder
    for file in sorted(folder.glob("*.safetensors")):
        weights.update(load_file(str(file)))
    n_head, n_kv = config["num_attention_heads"], config.get("num_key_value_heads", config["num_attention_heads"])
    head_dim = config.get("head_dim") or config["hidden_size"] // n_head
    rope = config.get("rope_parameters") or {}
    rope_theta = rope.get("rope_theta", config.get("rope_theta", 10000.0))
    logger.info(f"writing {out.name} from {folder}")

    writer = gguf.GGUFWriter(str(out), "llama")
    writer.add_name(folder.name)
    writer.add_context_length(config.get("max_position_embeddings", 2048))
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(rope_theta))
    writer.add_layer_norm_rms_eps(config.get("rms_norm_eps", 1e-6))
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)

    tokens, types, merges = _tokenizer_fields(folder)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for key, add in (("bos_token_id", writer.add_bos_token_id), ("eos_token_id", writer.add_eos_token_id),
                     ("pad_token_id", writer.add_pad_token_id)):
        if isinstance(config.get(key), int):
            add(config[key])
    writer.add_add_bos_token(False)

    def tensor(name, array):
        writer.add_tensor(name, np.ascontiguousarray(array, dtype=np.float32))

    tensor("token_embd.weight", weights["model.embed_tokens.weight"])
    tensor("output_norm.weight", weights["model.norm.weight"])
    tensor("output.weight", weights.get("lm_head.weight", weights["model.embed_tokens.weight"]))
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        tensor(f"blk.{i}.attn_norm.weight", weights[p + "input_layernorm.weight"])
        tensor(f"blk.{i}.attn_q.weight", _permute(weights[p + "self_attn.q_proj.weight"], n_head))
        tensor(f"blk.{i}.attn_k.weight", _permute(weights[p + "self_attn.k_proj.weight"], n_kv))
        tensor(f"blk.{i}.attn_v.weight", weights[p + "self_attn.v_proj.weight"])
        tensor(f"blk.{i}.attn_output.weight", weights[p + "self_attn.o_proj.weight"])
        tensor(f"blk.{i}.ffn_norm.weight", weights[p + "post_attention_layernorm.weight"])
        tensor(f"blk.{i}.ffn_gate.weight", weights[p + "mlp.gate_proj.weight"])
        tensor(f"blk.{i}.ffn_up.weight", weights[p + "mlp.up_proj.weight"])
        tensor(f"blk.{i}.ffn_down.weight", weights[p + "mlp.down_proj.weight"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def load_llama(gguf_path: str | Path, n_ctx: int = 2048, n_threads: int = 1, logits_all: bool = True,
               label: str = "", **kwargs):
    """A llama_cpp.Llama over the file with an f32 KV cache (its logits then match transformers to ~1e-5)."""
    try:
        import llama_cpp
    except ModuleNotFoundError:
        raise EngineUnavailable("llama-cpp-python is not installed: scripts/ensure_env.sh edge (builds it from "
                                "source the first time, 7-9 min; export CMAKE_ARGS=-DGGML_NATIVE=OFF for a "
                                "portable build)") from None
    path = check_gguf(gguf_path, label or str(gguf_path))
    try:
        return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_threads=n_threads, n_threads_batch=n_threads,
                               logits_all=logits_all, type_k=llama_cpp.GGML_TYPE_F32,
                               type_v=llama_cpp.GGML_TYPE_F32, verbose=False, **kwargs)
    except ValueError as exc:  # llama.cpp's one word on a file it cannot load: "Failed to load model from file"
        cached = " (a cached export: delete its folder to write it again)" if path.is_relative_to(cache_root()) else ""
        raise UsageError(f"{label or gguf_path}: llama.cpp cannot load this GGUF file ({exc}){cached}") from None
