"""The fast decode path of the PyTorch engine (gpt-fast style): static KV caches and CUDA graphs.

Why a small decoder forward of our own over the HF weights instead of transformers' StaticCache: the decode and
verify steps must be capturable as CUDA graphs with per-row cache positions (rows of a batch accept different
numbers of drafts), and HF's forward rebuilds masks and position tensors on the host every call (measured: HF
generate with a static cache is slower than without). Here a step is a fixed sequence of tensor ops that reads
its inputs from persistent buffers, so one `torch.cuda.CUDAGraph` per step width replays it with no host work.

Cache layout: every row writes token t at cache column t (prompts are not padded into the cache), and
`lengths[b]` is the number of committed tokens of row b. Rolling back rejected drafts is just lowering
`lengths`: attention masks every column >= a query's position, and the next step overwrites those columns.

Families (FAMILIES): the dense RoPE decoders that differ from Llama by a few switches of `Arch` (q/k norms,
post-norms, granite's multipliers) and by what the weights hold (biases, fused projections, partial rotary,
explicit head_dim, tied head). Numerics follow each family's transformers modeling file (RMSNorm in float32,
rotary tables from the model's own rotary module, its activation, its attention scale), so on CPU in float32
the greedy tokens equal lib/decoding/chain.py's plain path. `fast_path_blocker(model)` says why a model cannot
take this path (docs/performance.md lists the families and what the others lack).
"""
from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F

from lib.decoding import decode_attention, gemv, pick
from lib.decoding.chain import _Rows, accept_drafts, accept_greedy, probabilities, sample, split_tops, top2
from lib.decoding.timing import RoundClock, mark
from lib.types import Generation


@dataclass(frozen=True)
class Family:
    """How one model_type differs from Llama in its forward (everything else is read from the weights)."""
    qk_norm: str | None = None  # "head": RMSNorm of each head of q and k (qwen3); "proj": of the whole projection
    post_norms: bool = False  # the layer norms follow attention and MLP (olmo2) instead of preceding them
    norm_weight_in_float: bool = False  # RMSNorm multiplies its weight in float32, then casts (olmo2)


FAMILIES = {
    "llama": Family(),
    "mistral": Family(),
    "qwen2": Family(),
    "qwen3": Family(qk_norm="head"),
    "phi3": Family(),  # fused qkv_proj / gate_up_proj, partial rotary: read from the weights and the rope table
    "granite": Family(),  # embedding, residual, attention and logits multipliers: read from the config
    "olmo2": Family(qk_norm="proj", post_norms=True, norm_weight_in_float=True),
    "seed_oss": Family(),  # Llama with q/k/v and o biases
}
CACHE_ALIGN = 64  # cache columns: an unaligned length sends attention's products to slower kernels (H200: 2x)
MOE_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_intermediate_size")
SEQUENCE_LENGTH_ROPE = ("longrope",)  # rotary tables that switch frequencies past original_max_position_embeddings


@dataclass(frozen=True)
class Arch:
    """The per-model constants of a layer's forward (static under torch.compile: one compilation per Arch)."""
    n_heads: int
    n_kv_heads: int
    head_dim: int
    eps: float
    scale: float  # attention score scale: head_dim ** -0.5, granite's attention_multiplier
    act: Callable  # the model's MLP activation
    qk_norm: str | None = None
    post_norms: bool = False
    norm_weight_in_float: bool = False
    residual_scale: float = 1.0  # granite's residual_multiplier

    def qkv_sizes(self) -> list[int]:
        return [self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim, self.n_kv_heads * self.head_dim]


@dataclass
class LayerWeights:
    wqkv: torch.Tensor  # q, k, v projections stacked along the output dim: one matmul
    wo: torch.Tensor
    w13: torch.Tensor  # gate and up stacked: one matmul (gate_pairs: their rows interleaved)
    w2: torch.Tensor
    attn_norm: torch.Tensor  # before attention (after it under Arch.post_norms)
    mlp_norm: torch.Tensor  # before the MLP (after it under Arch.post_norms)
    bqkv: torch.Tensor | None = None  # biases where the model has them (qwen2's q/k/v, Llama's attention_bias...)
    bo: torch.Tensor | None = None
    b13: torch.Tensor | None = None
    b2: torch.Tensor | None = None
    q_norm: torch.Tensor | None = None  # Arch.qk_norm
    k_norm: torch.Tensor | None = None
    gate_pairs: bool = False  # w13's rows are (gate i, up i) pairs: its product can end in SiLU(gate) * up

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (getattr(self, f.name) for f in fields(self)) if isinstance(t, torch.Tensor)]


@dataclass
class DecoderWeights:
    embed: torch.Tensor
    layers: list[LayerWeights]
    norm: torch.Tensor
    lm_head: torch.Tensor
    arch: Arch
    cos: torch.Tensor  # [max_positions, rotary dim], model dtype (as HF applies it)
    sin: torch.Tensor
    embed_scale: float = 1.0  # granite's embedding_multiplier
    logits_scale: float = 1.0  # granite's logits_scaling (logits are divided by it)

    def first_layers(self, k: int) -> DecoderWeights:
        """A self-draft: the first k layers with the final norm and head (shares the tensors)."""
        return DecoderWeights(**{**self.__dict__, "layers": self.layers[:k]})

    def nbytes(self) -> int:
        """Bytes of weights read per decode step (embedding rows read are negligible)."""
        tensors = [self.norm, self.lm_head] + [t for layer in self.layers for t in layer.tensors()]
        return sum(t.numel() * t.element_size() for t in tensors)


# ---------------------------------------------------------------- which models

def fast_path_blocker(model, max_len: int | None = None) -> str | None:
    """Why this model cannot take the fast path (a phrase that starts with its model_type), or None. max_len: the
    longest cache the run needs, once known; past it a sliding window or a length-dependent rope would change
    what attention sees, which this path does not follow (None: not known yet, those limits are not checked)."""
    config = model.config
    family = getattr(config, "model_type", None) or type(model).__name__
    if any(getattr(config, key, None) for key in MOE_KEYS):
        return f"{family} is a mixture-of-experts model, which the fast path does not cover"
    if family not in FAMILIES:
        return f"{family} is not covered by the fast path"
    quantization = getattr(config, "quantization_config", None)
    if quantization:
        method = quantization.get("quant_method", "?") if isinstance(quantization, dict) else "?"
        return f"{family} has quantized weights ({method}), which the fast path does not read"
    reason = _layout_blocker(model)
    if reason:
        return f"{family} {reason}"
    for limit, what in _cache_limits(config) if max_len is not None else ():
        if max_len > limit:
            return f"{family}: {what} is {limit} tokens, shorter than this run's {max_len}-token cache"
    return None


def _layout_blocker(model) -> str | None:
    """The layers must hold plain linear projections, each fused group biased all or none."""
    for layer in model.model.layers:
        for group in (_attention_linears(layer.self_attn), _mlp_linears(layer.mlp)):
            for linears in group:
                if not all(type(linear) is torch.nn.Linear for linear in linears):
                    return f"has {type(linears[0]).__name__} projections, not plain linear layers"
                if len({linear.bias is None for linear in linears}) > 1:
                    return "has biases on some of the projections it fuses only"
    return None


def _cache_limits(config) -> list[tuple[int, str]]:
    """(longest cache the fast path equals the model for, what sets it)."""
    limits = [(config.max_position_embeddings, "its max_position_embeddings (the rope table)")]
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if window and (layer_types is None or "sliding_attention" in layer_types):
        limits.append((window, "its sliding attention window"))
    rope = getattr(config, "rope_parameters", None) or {}
    if rope.get("rope_type") in SEQUENCE_LENGTH_ROPE:
        limits.append((rope["original_max_position_embeddings"], f"its {rope['rope_type']} rope's "
                       "original_max_position_embeddings (past it the frequencies switch)"))
    return limits


def _attention_linears(attn) -> list[list]:
    """The projections fused into wqkv, then o_proj: [[q, k, v] or [qkv_proj], [o_proj]]."""
    qkv = [attn.qkv_proj] if hasattr(attn, "qkv_proj") else [attn.q_proj, attn.k_proj, attn.v_proj]
    return [qkv, [attn.o_proj]]


def _mlp_linears(mlp) -> list[list]:
    gate_up = [mlp.gate_up_proj] if hasattr(mlp, "gate_up_proj") else [mlp.gate_proj, mlp.up_proj]
    return [gate_up, [mlp.down_proj]]


# ---------------------------------------------------------------- weights

@torch.no_grad()
def weights_from_hf(model, max_positions: int) -> DecoderWeights:
    """Take a transformers model's weights (shared; the fused qkv/gate-up matrices become the storage of the HF
    projections, see `_fuse`). The model must pass fast_path_blocker."""
    inner, config = model.model, model.config
    family = FAMILIES[config.model_type]
    pairs = _gate_pairs(model)
    layers = [_layer_weights(layer, family, pairs) for layer in inner.layers]
    attn = inner.layers[0].self_attn
    arch = Arch(n_heads=config.num_attention_heads, n_kv_heads=config.num_key_value_heads,
                head_dim=attn.head_dim, eps=config.rms_norm_eps, scale=attn.scaling,
                act=_activation(config.hidden_act), qk_norm=family.qk_norm, post_norms=family.post_norms,
                norm_weight_in_float=family.norm_weight_in_float,
                residual_scale=float(getattr(config, "residual_multiplier", 1.0)))
    embed = inner.embed_tokens.weight
    max_positions = min([max_positions] + [limit for limit, _ in _cache_limits(config)])  # longrope: short factors
    positions = torch.arange(max_positions, device=embed.device)[None]
    cos, sin = inner.rotary_emb(embed[:1, None], positions)  # the model's own rope (scaling, partial rotary)
    return DecoderWeights(embed=embed, layers=layers, norm=inner.norm.weight, lm_head=model.lm_head.weight,
                          arch=arch, cos=cos[0], sin=sin[0],
                          embed_scale=float(getattr(config, "embedding_multiplier", 1.0)),
                          logits_scale=float(getattr(config, "logits_scaling", 1.0)))


def _gate_pairs(model) -> bool:
    """Whether the MLP's gate/up product should end in SiLU(gate) * up (lib/decoding/gemv.py's `silu_gate`): on
    CUDA, 16-bit weights, a SiLU MLP with separate gate and up projections and no biases."""
    mlp, weight = model.model.layers[0].mlp, model.model.embed_tokens.weight
    return (weight.is_cuda and weight.dtype in gemv.DTYPES and model.config.hidden_act in ("silu", "swish")
            and hasattr(mlp, "gate_proj") and mlp.gate_proj.bias is None and mlp.up_proj.bias is None)


def _layer_weights(layer, family: Family, gate_pairs: bool = False) -> LayerWeights:
    (qkv, (o,)), (gate_up, (down,)) = _attention_linears(layer.self_attn), _mlp_linears(layer.mlp)
    w13 = _fuse_pairs(*gate_up) if gate_pairs else _fuse(gate_up)
    norms = ((layer.post_attention_layernorm, layer.post_feedforward_layernorm) if family.post_norms
             else (layer.input_layernorm, layer.post_attention_layernorm))
    attn = layer.self_attn
    return LayerWeights(wqkv=_fuse(qkv), bqkv=_fuse(qkv, "bias"), wo=o.weight, bo=o.bias,
                        w13=w13, b13=_fuse(gate_up, "bias"), w2=down.weight, b2=down.bias, gate_pairs=gate_pairs,
                        attn_norm=norms[0].weight, mlp_norm=norms[1].weight,
                        q_norm=attn.q_norm.weight if family.qk_norm else None,
                        k_norm=attn.k_norm.weight if family.qk_norm else None)


def _fuse(linears, name: str = "weight") -> torch.Tensor | None:
    """One tensor stacking these projections' weights (or biases); each projection then holds a view of its rows,
    so the model keeps working and the weights are not held twice (an 8B model would otherwise need ~1.7x its
    size). A projection fused already (phi3's qkv_proj) is used as it is."""
    parts = [getattr(linear, name) for linear in linears]
    if parts[0] is None or len(parts) == 1:
        return parts[0]
    fused = torch.cat(parts)
    for part, rows in zip(parts, fused.split([part.shape[0] for part in parts])):
        part.data = rows
    return fused


def _fuse_pairs(gate, up) -> torch.Tensor:
    """gate's and up's weights in one tensor whose rows alternate (gate row i, up row i), each projection holding
    a strided view of its rows (as `_fuse`)."""
    fused = torch.stack([gate.weight, up.weight], 1)  # [I, 2, K]
    gate.weight.data, up.weight.data = fused[:, 0], fused[:, 1]
    return fused.view(-1, fused.shape[-1])


@functools.cache
def _activation(name: str):
    """transformers' activation of that name, one object per name (torch.compile guards on its identity)."""
    from transformers.activations import ACT2FN
    return ACT2FN[name]


# ---------------------------------------------------------------- the forward

def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, weight_in_float: bool = False) -> torch.Tensor:
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return (weight * h).to(x.dtype) if weight_in_float else weight * h.to(x.dtype)


def norm(x: torch.Tensor, weight: torch.Tensor, arch: Arch) -> torch.Tensor:
    return rms_norm(x, weight, arch.eps, arch.norm_weight_in_float)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on the first cos.shape[-1] dims of each head (all of them unless the rotary is partial)."""
    dim = cos.shape[-1]
    if dim < x.shape[-1]:
        return torch.cat([rotate(x[..., :dim], cos, sin), x[..., dim:]], -1)
    half = dim // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], -1) * sin


def attention(q, k_cache, v_cache, positions, arch: Arch):
    """q [B, n, Hq, D] against one layer's cache [B, Hkv, L, D]: query t of row b sees the columns <=
    positions[b, t]. 16-bit steps of up to `_Options.attention_width` tokens on CUDA take
    lib/decoding/decode_attention.py's kernel. Otherwise the query heads of a kv head are folded into the query
    length (q [B, Hkv, g * n, D]), so both products are plain batched matmuls over the cache as it lies (no copy of
    it per query head or per step); softmax in float32 as transformers' eager attention does. (The mask is built
    here, so that compiled it fuses into the softmax.)"""
    if _Options.attention and decode_attention.supports(q, k_cache, _Options.attention_width):
        return decode_attention.attend(q, k_cache, v_cache, positions, arch.scale, _Options.pdl,
                                       _Options.attention_splits)
    batch, n, n_heads, head_dim = q.shape
    n_kv_heads = arch.n_kv_heads
    group, length = n_heads // n_kv_heads, k_cache.shape[2]
    mask = torch.arange(length, device=q.device) <= positions[:, :, None]  # [B, n, L]
    q = q.view(batch, n, n_kv_heads, group, head_dim).permute(0, 2, 3, 1, 4).reshape(batch, n_kv_heads, group * n,
                                                                                    head_dim)
    scores = torch.matmul(q, k_cache.transpose(2, 3)) * arch.scale  # [B, Hkv, g * n, L]
    mask = mask[:, None, None].expand(batch, 1, group, n, length).reshape(batch, 1, group * n, length)
    probs = torch.softmax(scores.float().masked_fill(~mask, float("-inf")), -1).to(q.dtype)
    out = torch.matmul(probs, v_cache)  # [B, Hkv, g * n, D]
    return out.view(batch, n_kv_heads, group, n, head_dim).permute(0, 3, 1, 2, 4).reshape(batch, n, n_heads * head_dim)


def heads(qkv: torch.Tensor, w: LayerWeights, arch: Arch):
    """q [B, n, Hq, D], k and v [B, n, Hkv, D] from the fused projection, q/k-normed as the family does."""
    q, k, v = qkv.split(arch.qkv_sizes(), -1)
    if arch.qk_norm == "proj":
        q, k = norm(q, w.q_norm, arch), norm(k, w.k_norm, arch)
    q, k, v = (t.unflatten(-1, (-1, arch.head_dim)) for t in (q, k, v))
    if arch.qk_norm == "head":
        q, k = norm(q, w.q_norm, arch), norm(k, w.k_norm, arch)
    return q, k, v


def branch(out: torch.Tensor, norm_weight: torch.Tensor, arch: Arch) -> torch.Tensor:
    """What a block (attention or MLP) adds to the residual stream."""
    if arch.post_norms:
        out = norm(out, norm_weight, arch)
    return out * arch.residual_scale if arch.residual_scale != 1.0 else out


def pre_norm(x: torch.Tensor, norm_weight: torch.Tensor, arch: Arch) -> torch.Tensor:
    return x if arch.post_norms else norm(x, norm_weight, arch)


class _Options:
    """Measured on an H200 (docs/performance.md): lib/decoding/gemv.py's fixed kernels for the products of up to
    16 rows and untuned inductor kernels around them give the same kernels in every process; inductor's
    coordinate-descent tuning of its own matrix-vector kernels picked differently per process (75-83 % of the
    floor)."""
    gemv_rows = gemv.MAX_ROWS  # products of up to this many rows take gemv (1: its one-row kernel only)
    gemv = True  # 16-bit products through lib/decoding/gemv.py's Triton kernels (CUDA); the rest on cuBLAS
    attention = True  # decode, draft and verify steps' attention through lib/decoding/decode_attention.py (CUDA)
    attention_width = 8  # the widest step (tokens per row) that takes it
    attention_splits = decode_attention.SPLITS  # its programs per (row, kv head) under decode_attention.SPLIT_BELOW
    tune = False  # torch.compile's coordinate-descent tuning of its own kernels
    pdl = True  # programmatic dependent launch where the GPU and Triton have it (lib/decoding/triton_launch.py)
    combo = True  # inductor's combo kernels: independent small ops (q's and k's rotary) in one launch
    pick_in_graph = True  # greedy AR: the argmax and top2 of each step run inside its CUDA graph
    pick_kernel = True  # greedy argmax and top2 (AR, SD drafts and verify) in one launch of lib/decoding/pick.py (CUDA)
    gate_epilogue = True  # a SiLU MLP's SiLU(gate) * up in its gate/up product's epilogue (LayerWeights.gate_pairs)


def options() -> dict:
    """The current kernel choices (the names of `_Options`)."""
    return {name: value for name, value in vars(_Options).items() if not name.startswith("_")}


def set_options(**choices):
    """Choose kernels and tuning by `_Options` name (benchmarks/gpu_step_profile.py); compiled steps are rebuilt."""
    unknown = set(choices) - set(options())
    if unknown:
        raise TypeError(f"unknown fast-path options {sorted(unknown)}; known: {sorted(options())}")
    for name, value in choices.items():
        setattr(_Options, name, value)
    compiled.cache_clear()
    torch._dynamo.reset()


def project(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    if _Options.gemv and gemv.supports(x, w, _Options.gemv_rows):
        return gemv.linear(x, w, b, _Options.pdl)
    return F.linear(x, w, b)


def layer_forward(x, pending, w: LayerWeights, arch: Arch, k_cache, v_cache, cos, sin, cache_index, positions):
    """One decoder layer over the residual stream x + pending [B, n, H] at positions [B, n]; writes this step's
    keys/values into the cache [B, Hkv, L, D] at cache_index (rows, heads, positions broadcast to [B, n, Hkv]).
    Returns (stream, the MLP's branch): the last add is left to the next layer (or `final_hidden`), where it fuses
    with the norm that reads it instead of being a kernel of its own."""
    x = x if pending is None else x + pending
    q, k, v = heads(project(pre_norm(x, w.attn_norm, arch), w.wqkv, w.bqkv), w, arch)
    q, k = rotate(q, cos, sin), rotate(k, cos, sin)
    k_cache.index_put_(cache_index, k)  # an in-place scatter (index_copy_ made compile copy the whole cache)
    v_cache.index_put_(cache_index, v)
    x = x + branch(project(attention(q, k_cache, v_cache, positions, arch), w.wo, w.bo), w.attn_norm, arch)
    return x, branch(project(gated_mlp_input(pre_norm(x, w.mlp_norm, arch), w, arch), w.w2, w.b2), w.mlp_norm, arch)


def gated_mlp_input(h: torch.Tensor, w: LayerWeights, arch: Arch) -> torch.Tensor:
    """act(gate) * up of the MLP's input h: in the gate/up product's epilogue where the rows are paired and the
    product runs gemv.py's kernels (`_Options.gate_epilogue`)."""
    if not w.gate_pairs:
        gate, up = project(h, w.w13, w.b13).chunk(2, -1)
    elif _Options.gate_epilogue and _Options.gemv and gemv.supports(h, w.w13, _Options.gemv_rows):
        return gemv.silu_gate(h, w.w13, _Options.pdl)
    else:
        gate, up = project(h, w.w13, w.b13).unflatten(-1, (-1, 2)).unbind(-1)
    return arch.act(gate) * up


def step_inputs(tokens, lengths, embed, cos, sin, embed_scale: float):
    """The embeddings [B, n, H], positions [B, n] and rotary rows [B, n, 1, D] of a step at each row's length."""
    positions = lengths[:, None] + torch.arange(tokens.shape[1], device=tokens.device)
    x = F.embedding(tokens, embed)
    x = x * embed_scale if embed_scale != 1.0 else x
    return x, positions, cos[positions][:, :, None], sin[positions][:, :, None]


def final_hidden(x, pending, weight, arch: Arch):
    """The last layer's residual add and the final norm."""
    return norm(x + pending, weight, arch)


@functools.cache
def compiled(fn: Callable) -> Callable:
    """torch.compile of one of this module's step functions: one compilation per input shape (a layer's is
    shared by all layers), under `inductor_settings`."""
    for name in ("recompile_limit", "cache_size_limit"):  # step widths x batch sizes x model shapes
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 256)
    return torch.compile(fn, dynamic=False, fullgraph=True)


def inductor_settings(tokens: torch.Tensor, dtype: torch.dtype):
    """Inductor's settings while a step of these tokens [B, n] of a model in `dtype` compiles (they are read when a
    new shape compiles). PDL for one-token steps, and for steps of up to gemv_rows rows whose products run
    lib/decoding/gemv.py's PDL kernels (16-bit): on the H200 it made a 5-token verify step on cuBLAS slower
    (docs/performance.md)."""
    import torch._inductor.config as inductor_config
    settings = {"coordinate_descent_tuning": _Options.tune, "combo_kernels": _Options.combo}
    if hasattr(inductor_config.triton, "enable_pdl"):  # its kernels wait for their inputs and launch early
        on_gemv = _Options.gemv and dtype in gemv.DTYPES and tokens.numel() <= _Options.gemv_rows
        settings["triton.enable_pdl"] = _Options.pdl and (tokens.shape[1] == 1 or on_gemv)
    return inductor_config.patch(settings)


class StaticDecoder:
    """A model with a preallocated KV cache for `batch` rows of up to `max_len` tokens.

    `step(tokens)` feeds tokens [B, n] at each row's `lengths` and returns logits [B, n, V] without committing
    them; the caller moves `lengths` (a device tensor, changed in place, so graphs see it). On CUDA each step
    width is captured once as a CUDA graph, (compile_layers, default on CUDA) each layer's small ops, the step's
    inputs and its final norm are fused by torch.compile first, 16-bit products of up to 16 rows run
    lib/decoding/gemv.py's kernels (`project`), steps of up to 8 tokens lib/decoding/decode_attention.py's attention
    (`attention`), and one-token steps and 16-bit ones of up to 16 rows launch their kernels with PDL
    (`inductor_settings`, lib/decoding/triton_launch.py). On CPU the same code runs eagerly. The cache is rounded up
    to CACHE_ALIGN columns.
    """

    def __init__(self, weights: DecoderWeights, batch: int, max_len: int, use_graphs: bool | None = None,
                 compile_layers: bool | None = None):
        max_len = -(-max_len // CACHE_ALIGN) * CACHE_ALIGN
        self.w, self.batch, self.max_len = weights, batch, max_len
        device, dtype = weights.embed.device, weights.embed.dtype
        self.device = device
        shape = (len(weights.layers), batch, weights.arch.n_kv_heads, max_len, weights.arch.head_dim)
        self.k_cache = torch.zeros(shape, dtype=dtype, device=device)
        self.v_cache = torch.zeros(shape, dtype=dtype, device=device)
        self.lengths = torch.zeros(batch, dtype=torch.long, device=device)
        self.use_graphs = device.type == "cuda" if use_graphs is None else use_graphs
        compile_layers = device.type == "cuda" if compile_layers is None else compile_layers
        self.compile_layers = compile_layers
        self.heads = torch.arange(weights.arch.n_kv_heads, device=device)
        self.rows = torch.arange(batch, device=device)
        self.graphs: dict[tuple, tuple] = {}  # (width, then) -> (graph, its tokens, its outputs)

    def _forward(self, tokens: torch.Tensor, lengths: torch.Tensor, compile_step: bool) -> torch.Tensor:
        """Hidden states [B, n, H] after the final norm, for tokens at columns lengths[b] onwards."""
        run = compiled if compile_step else (lambda fn: fn)
        w = self.w
        x, positions, cos, sin = run(step_inputs)(tokens, lengths, w.embed, w.cos, w.sin, w.embed_scale)
        cache_index = (self.rows[:, None, None], self.heads[None, None, :], positions[:, :, None])
        pending = None
        for i, layer in enumerate(w.layers):
            x, pending = run(layer_forward)(x, pending, layer, w.arch, self.k_cache[i], self.v_cache[i], cos, sin,
                                            cache_index, positions)
        return run(final_hidden)(x, pending, w.norm, w.arch)

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = project(hidden, self.w.lm_head, None)
        return logits / self.w.logits_scale if self.w.logits_scale != 1.0 else logits

    def _step_eager(self, tokens: torch.Tensor) -> torch.Tensor:
        if not self.compile_layers:
            return self._logits(self._forward(tokens, self.lengths, compile_step=False))
        with inductor_settings(tokens, self.w.embed.dtype):
            return self._logits(self._forward(tokens, self.lengths, compile_step=True))

    @torch.inference_mode()
    def prefill(self, prompts: list[list[int]], pad_id: int = 0) -> torch.Tensor:
        """Write the prompts (right-padded, each at columns 0..len-1) and return last-token logits [B, V]."""
        width = max(len(p) for p in prompts)
        tokens = torch.full((self.batch, width), pad_id, dtype=torch.long)
        for row, prompt in enumerate(prompts):
            tokens[row, :len(prompt)] = torch.tensor(prompt)
        tokens = tokens.to(self.device)
        lens = torch.tensor([len(p) for p in prompts], device=self.device)
        hidden = self._forward(tokens, torch.zeros_like(lens), compile_step=False)[self.rows, lens - 1]
        self.lengths.copy_(lens)
        return self._logits(hidden)

    @torch.inference_mode()
    def step(self, tokens: torch.Tensor, then: Callable | None = None):
        """Logits [B, n, V] of tokens [B, n], or then(logits) where `then` is given: it runs inside the step's
        CUDA graph (AR's greedy pick), so its outputs, like the logits, are overwritten by the next replay."""
        if not self.use_graphs:
            logits = self._step_eager(tokens)
            return logits if then is None else then(logits)
        key = (tokens.shape[1], then)
        with torch.cuda.device(self.device):
            if key not in self.graphs:
                self.graphs[key] = self._capture(*key)
            graph, static_tokens, outputs = self.graphs[key]
            static_tokens.copy_(tokens)
            graph.replay()
        return outputs

    def _capture(self, n: int, then: Callable | None):
        """Capture one step of width n (warm-up runs write only uncommitted columns, which is harmless)."""
        static_tokens = torch.zeros(self.batch, n, dtype=torch.long, device=self.device)
        run = (lambda: self._step_eager(static_tokens)) if then is None else (
            lambda: then(self._step_eager(static_tokens)))
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                run()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        # capture on a stream of this decoder's GPU: torch.cuda.graph's default capture stream is made once per
        # process, on whichever GPU was current then (a draft on its own GPU would capture nothing)
        with torch.cuda.graph(graph, stream=stream):
            outputs = run()
        return graph, static_tokens, outputs


def max_len_for(prompts: list[list[int]], max_new: int, gamma: int = 0) -> int:
    """Finished rows keep stepping (frozen) until the batch ends: room for two rounds past the limit."""
    return max(len(p) for p in prompts) + max_new + 2 * gamma + 2


def _record_event(device: torch.device):
    """A CUDA event after the work queued so far, to wait on later; None on CPU (work is done already)."""
    if device.type != "cuda":
        return None
    event = torch.cuda.Event()
    event.record()
    return event


def queues_ahead(device: torch.device) -> bool:
    """Whether the loops queue the next step before reading the current one. On CUDA the host's read then overlaps
    the GPU's work; on the CPU work runs as it is queued, so queueing ahead would only hold every step's tokens
    back by one step (a later first token, a last one at once)."""
    return device.type == "cuda"


class _HostReader:
    """Per-row bookkeeping plus the device `active` mask (finished rows stop moving their caches)."""

    def __init__(self, batch: int, max_new: int, eos_ids, device):
        self.rows = _Rows(batch, max_new, set(eos_ids))
        self.active = torch.ones(batch, dtype=torch.long, device=device)
        self.finished = 0

    def refresh_active(self):
        """Copy the mask to the device only when a row has finished since the last call (rare)."""
        finished = sum(1 for reason in self.rows.reasons if reason)
        if finished != self.finished:
            self.finished = finished
            self.active.copy_(torch.tensor([0 if reason else 1 for reason in self.rows.reasons]))


def argmax_top2(logits: torch.Tensor, pdl: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """torch's argmax [...] and chain.top2 [..., 2] of logits [..., V]; on CUDA in one launch of
    lib/decoding/pick.py's kernel (the same values), pdl as there."""
    flat = logits.reshape(-1, logits.shape[-1])
    if _Options.pick_kernel and pick.supports(flat):
        token, tops = pick.greedy_top2(flat, pdl)
        return token.view(logits.shape[:-1]), tops.view(*logits.shape[:-1], 2)
    return logits.argmax(-1), top2(logits)


def greedy_pick(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The greedy token [B] and chain.top2 [B, 2] of the last position of logits [B, n, V]."""
    return argmax_top2(logits[:, -1], pdl=_Options.pdl)


def ar_step_then(temperature: float = 0.0, width: int = 1) -> Callable | None:
    """What the AR loop runs inside the graph of a step this wide: greedy AR's pick in its one-token steps; None
    where it picks outside (sampling, pick_in_graph off) or for other widths (no AR step is wider). Timing or
    profiling a step with it times the AR loop's own step (lib/decoding/timing.py)."""
    return greedy_pick if width == 1 and temperature <= 0 and _Options.pick_in_graph else None


@torch.inference_mode()
def static_autoregressive_generate(target: StaticDecoder, prompts: list[list[int]], max_new: int,
                                   temperature: float = 0.0, eos_ids=frozenset(), pad_id: int = 0,
                                   generator=None, ahead: bool | None = None) -> Generation:
    """AR decoding on a StaticDecoder. On CUDA (`ahead`, default `queues_ahead`) the next step is queued before the
    host reads the current tokens (a copy to pinned memory and an event), so the GPU never waits for Python; token
    times are when the host has them. Greedy steps pick their token inside the step's graph (`greedy_pick`), so
    between two replays the GPU runs only the token copy, the length update and the reads. A row that finishes
    moves its cache one step more than needed when queued ahead (max_len_for leaves room)."""
    def pick(logits):
        if temperature > 0:
            return sample(probabilities(logits[:, -1].float(), temperature), generator), top2(logits[:, -1])
        return greedy_pick(logits)

    def next_pick(token):
        if in_graph := ar_step_then(temperature):
            return target.step(token[:, None], then=in_graph)
        return pick(target.step(token[:, None]))

    ahead = queues_ahead(target.device) if ahead is None else ahead
    token, tops = pick(target.prefill(prompts, pad_id)[:, None])
    host = _HostReader(len(prompts), max_new, eos_ids, target.device)
    pinned = torch.empty(len(prompts), dtype=torch.long, pin_memory=target.device.type == "cuda")
    pinned_tops = torch.empty(len(prompts), 2, pin_memory=target.device.type == "cuda")  # chain.top2, same event
    while True:
        pinned.copy_(token, non_blocking=True)
        pinned_tops.copy_(tops, non_blocking=True)
        ready = _record_event(target.device)
        if ahead and not all(len(t) + 1 >= max_new for t in host.rows.tokens):
            token, tops = next_pick(token)
            target.lengths.add_(host.active)
        if ready is not None:
            ready.synchronize()
        host.rows.add_each(pinned.tolist(), time.perf_counter(), pinned_tops.tolist())
        if host.rows.done():
            break
        host.refresh_active()
        if not ahead:
            token, tops = next_pick(token)
            target.lengths.add_(host.active)
    return split_tops(host.rows.tops, Generation(host.rows.tokens, host.rows.times, host.rows.reasons))


class _Round:
    """One speculative round queued on the device; `read()` waits for it and returns its host values."""

    def __init__(self, target: StaticDecoder, draft: StaticDecoder, last, pending, gamma: int, temperature: float,
                 active, generator, pinned):
        device, batch = target.device, target.batch
        draft_start = mark(draft.device)
        token_in, fed, drafted, probs = torch.stack([last, pending], 1), 2, [], []
        for _ in range(gamma):
            draft_logits = draft.step(token_in.to(draft.device))[:, -1].to(device)
            draft.lengths.add_(fed)
            q = probabilities(draft_logits.float(), temperature) if temperature > 0 else None
            token = argmax_top2(draft_logits)[0] if q is None else sample(q, generator)
            drafted.append(token)
            probs.append(q)
            token_in, fed = token[:, None], 1
        drafts = torch.stack(drafted, 1)
        draft_end, verify_start = mark(draft.device), mark(device)
        fed_target = torch.cat([pending[:, None], drafts], 1)  # [B, gamma + 1]
        verify = target.step(fed_target)
        if temperature > 0:
            n_accepted, next_token = accept_drafts(verify, drafts, torch.stack(probs, 1), temperature, generator)
            tops = top2(verify)
        else:
            best, tops = argmax_top2(verify)
            n_accepted, next_token = accept_greedy(best, drafts)
        self.marks = (draft_start, draft_end, verify_start, mark(device))  # read after read(): the SD cost model
        target.lengths.add_((n_accepted + 1) * active)
        draft.lengths.copy_(target.lengths - 1)  # (a cross-device copy when the draft has its own GPU)
        self.last = fed_target[torch.arange(batch, device=device), n_accepted]
        self.pending = next_token
        self.pinned = pinned  # (ids [B, gamma + 2], the verify's chain.top2 [B, gamma + 1, 2]), pinned
        pinned[0].copy_(torch.cat([n_accepted[:, None], drafts, next_token[:, None]], 1), non_blocking=True)
        pinned[1].copy_(tops, non_blocking=True)
        self.ready = _record_event(device)

    def read(self) -> tuple[list[list[int]], list[list[list[float]]]]:
        if self.ready is not None:
            self.ready.synchronize()
        return self.pinned[0].tolist(), self.pinned[1].tolist()


@torch.inference_mode()
def static_speculative_generate(target: StaticDecoder, draft: StaticDecoder, prompts: list[list[int]],
                                max_new: int, gamma: int, temperature: float = 0.0, eos_ids=frozenset(),
                                pad_id: int = 0, generator=None, ahead: bool | None = None) -> Generation:
    """Chain SD on StaticDecoders. A round: the draft's first step feeds 2 tokens (the last committed token
    and the pending one: this also fills the draft cache after a fully accepted round, with no branch), then
    gamma - 1 single-token steps, one target verify of gamma + 1 tokens, acceptance on device, and one host
    read of (accepted counts, drafts, next token). On CUDA (`ahead`, default `queues_ahead`), while the host reads a
    round the next one is already queued (unless every row may finish in the round being read), so the GPU does
    not wait for Python; a row that finishes thus moves its cache one round more (max_len_for leaves room)."""
    batch, device = len(prompts), target.device
    ahead = queues_ahead(device) if ahead is None else ahead
    logits = target.prefill(prompts, pad_id)
    draft.prefill(prompts, pad_id)
    draft.lengths.sub_(1)  # the last prompt token is fed again with the pending one
    host = _HostReader(batch, max_new, eos_ids, device)
    out = Generation.for_speculation(batch, gamma)
    clock = RoundClock()
    pending = sample(probabilities(logits.float(), temperature), generator)
    last = torch.tensor([p[-1] for p in prompts], device=device)
    host.rows.add_each(pending.tolist(), time.perf_counter(), top2(logits).tolist())
    pin = device.type == "cuda"
    pinned = [(torch.empty(batch, gamma + 2, dtype=torch.long, pin_memory=pin),
               torch.empty(batch, gamma + 1, 2, pin_memory=pin)) for _ in range(2)]
    queued = None if host.rows.done() else _Round(target, draft, last, pending, gamma, temperature, host.active,
                                                   generator, pinned[0])
    while queued is not None:
        current, queued = queued, None
        if ahead and any(not reason and len(tokens) + gamma + 1 < max_new
                         for tokens, reason in zip(host.rows.tokens, host.rows.reasons)):
            queued = _Round(target, draft, current.last, current.pending, gamma, temperature, host.active,
                            generator, pinned[1] if current.pinned is pinned[0] else pinned[0])
        counts, tops = current.read()  # the one host sync of the round
        now = time.perf_counter()
        clock.add_round(current.marks, gamma)
        for row, values in enumerate(counts):
            if host.rows.reasons[row]:
                continue
            n = values[0]
            out.count_round(row, gamma, n)
            host.rows.add(row, values[1:1 + n] + [values[-1]], now, tops[row][:n + 1])
        if host.rows.done():
            break
        host.refresh_active()
        if queued is None:
            queued = _Round(target, draft, current.last, current.pending, gamma, temperature, host.active,
                            generator, pinned[0])
    if queued is not None and queued.ready is not None:
        queued.ready.synchronize()  # a round queued past the end: let it finish before the caches are reused
    out.tokens, out.token_times, out.finish_reasons = host.rows.tokens, host.rows.times, host.rows.reasons
    out.step_times = clock.times
    return split_tops(host.rows.tops, out)
