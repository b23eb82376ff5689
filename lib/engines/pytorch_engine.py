"""PyTorch/transformers engine: the project's own AR and speculative decoding loops (lib/decoding/chain.py, their static
cache and CUDA graph versions in lib/decoding/fast_path.py) and transformers' assisted generation.

METHODS maps each method this engine runs (the engine table in lib/engines/__init__.py lists the same names) to its
decode functions: each takes the started engine and a batch (prompt ids, max new tokens) and returns a Generation.
The engine picks one at start, the fast version where the models allow it (lib/decoding/fast_path.py's
FAMILIES, each model on one device); otherwise one warning line says why and what to expect, and describe()
carries fast_path and fast_path_reason into run.json.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from lib.decoding import fast_path
from lib.decoding.chain import autoregressive_generate, speculative_generate, top2
from lib.decoding.timing import STEP_REPEATS, mid_position, plain_step_seconds, step_seconds
from lib.engines import METHOD_BY_NAME
from lib.engines.base import Engine, record_from_tokens
from lib.layout import placement_from_config
from lib.log import get_logger
from lib.models import eos_ids_of, load_model, load_tokenizer, model_config
from lib.types import Clock, Generation, Request, RequestRecord, SpecCounters, StepTimes

POSITION_KEYS = ("max_position_embeddings", "n_positions")  # where HF configs keep the context length
Decode = Callable[["PyTorchEngine", list[list[int]], int], Generation]
logger = get_logger(__name__)


def pick_device_and_dtype(dtype: str) -> tuple[str, str]:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype == "auto":
        dtype = "bfloat16" if device == "cuda" else "float32"
    return device, dtype


@dataclass(frozen=True)
class Method:
    """How this engine runs one method."""
    plain: Decode  # on the transformers models
    fast: Decode | None = None  # lib/decoding/fast_path.py's decoders (HF_FAST_PATH, models each on one device)
    counts_weight_reads: bool = True  # its forward passes are known, so the run reports bandwidth efficiency
    token_times: str = "per token"  # how token times are taken (run.json)


def _target_plain(engine: PyTorchEngine, prompts: list[list[int]], max_new: int) -> Generation:
    return autoregressive_generate(engine.target, prompts, max_new, **engine.sampling)


def _target_fast(engine: PyTorchEngine, prompts: list[list[int]], max_new: int) -> Generation:
    target, = engine.static_decoders(prompts, max_new)
    return fast_path.static_autoregressive_generate(target, prompts, max_new, **engine.sampling)


def _chain_plain(engine: PyTorchEngine, prompts: list[list[int]], max_new: int) -> Generation:
    return speculative_generate(engine.target, engine.draft, prompts, max_new, engine.cfg.gamma_value,
                                **engine.sampling)


def _chain_fast(engine: PyTorchEngine, prompts: list[list[int]], max_new: int) -> Generation:
    target, draft = engine.static_decoders(prompts, max_new)
    return fast_path.static_speculative_generate(target, draft, prompts, max_new, engine.cfg.gamma_value,
                                              **engine.sampling)


def _assisted(engine: PyTorchEngine, prompts: list[list[int]], max_new: int) -> Generation:
    """transformers' assisted generation, one request at a time (it supports batch 1 only). Token times are those
    of the streamer callbacks: tokens of one assisted round share a time; the first is real TTFT."""
    cfg, gen = engine.cfg, Generation([], [], [])
    for prompt in prompts:
        streamer = _TimesStreamer()
        sampled = cfg.temperature > 0
        engine.draft.generation_config.num_assistant_tokens = cfg.gamma_value
        engine.draft.generation_config.num_assistant_tokens_schedule = "constant"
        with torch.inference_mode():
            out = engine.target.generate(
                torch.tensor([prompt], device=engine.target.device), assistant_model=engine.draft,
                max_new_tokens=max_new, do_sample=sampled, temperature=cfg.temperature if sampled else None,
                top_k=0 if sampled else None, streamer=streamer, pad_token_id=engine.pad_id,
                eos_token_id=sorted(engine.eos_ids) or None, return_dict_in_generate=True, output_logits=True)
        ids = out.sequences[0, len(prompt):].tolist()
        tops = top2(torch.stack(out.logits)[:, 0]).tolist()  # the target's logits of each new token, one copy
        gen.top2_margins.append([t[0] for t in tops])
        gen.top_logits.append([t[1] for t in tops])
        stop = bool(ids) and ids[-1] in engine.eos_ids
        gen.tokens.append(ids)
        gen.token_times.append(streamer.times[: len(ids)])
        gen.finish_reasons.append("stop" if stop else "length")
    return gen


METHODS: dict[str, Method] = {
    "target": Method(_target_plain, _target_fast),
    "speculative": Method(_chain_plain, _chain_fast),
    # transformers' assisted loop does not say how many passes it ran, so its weight reads are not counted
    "assisted": Method(_assisted, counts_weight_reads=False,
                       token_times="per assisted round (transformers streams a round's tokens together)"),
}


class PyTorchEngine(Engine):
    name = "hf"

    @classmethod
    def context_length(cls, cfg, method: str, models) -> tuple[int, str] | None:
        """The positions (max_position_embeddings, or GPT-2's n_positions) of the target, and of the draft where
        the method uses one."""
        roles = [("TARGET_MODEL", models.target)]
        if METHOD_BY_NAME[method].needs_draft and models.draft is not None:
            roles.append(("DRAFTER_MODEL", models.draft))
        limits = []
        for role, folder in roles:
            config = model_config(Path(folder), role)
            key = next((k for k in POSITION_KEYS if isinstance(config.get(k), int)), None)
            if key:
                limits.append((config[key], f"{role}'s {key}"))
        return min(limits) if limits else None

    def start(self):
        self.decoding = METHODS[self.method]
        self.needs_draft = METHOD_BY_NAME[self.method].needs_draft
        self.device, self.dtype = pick_device_and_dtype(self.cfg.dtype)
        self.tokenizer = load_tokenizer(self.models.target)
        self.placement = self._plan()
        if self.cfg.mixed_precision_config:
            from lib.quant.loader import load_mixed_model
            self.target, _, _ = load_mixed_model(self.cfg.mixed_precision_config, self.models.target,
                                                 self.device, self.dtype)
        else:
            self.target = self._load(self.models.target, "target")
        self.draft = None
        if self.needs_draft:
            self.draft = self._load(self.models.draft, "draft")
            if self.draft.config.vocab_size != self.target.config.vocab_size:
                from lib.errors import UsageError
                raise UsageError(f"DRAFTER_MODEL={self.models.draft}: vocabulary size "
                                 f"{self.draft.config.vocab_size} differs from the target's "
                                 f"{self.target.config.vocab_size}; the draft must share the target's tokenizer")
        self.generator = torch.Generator(device=self.device).manual_seed(self.cfg.seed)
        self.eos_ids = eos_ids_of(self.target)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.sampling = dict(temperature=self.cfg.temperature, eos_ids=self.eos_ids, pad_id=self.pad_id,
                             generator=self.generator)
        self.decoders: dict = {}
        self.cache_len = 0  # static cache length the workload needs (the whole workload's once warmup has run)
        self._choose_path()
        (held_t, read_t), (held_d, read_d) = (weight_bytes_of(m) for m in (self.target, self.draft))
        self._held_bytes, self._read_bytes = held_t + held_d, (read_t, read_d)
        # bytes of weights read so far; the runner turns it into bandwidth_efficiency (lib/bandwidth.py)
        self.weight_bytes_read = 0 if self.decoding.counts_weight_reads else None
        from lib.quant.moe_tracker import track_experts
        self.expert_tracker = track_experts(self.target)  # None unless the target is a MoE model
        self.expert_spec: SpecCounters | None = None  # the acceptance of the steps the tracker saw
        self.reset_counters()

    def _plan(self):
        """GPU_STRATEGY -> placement (lib/layout.py), printed at start and kept for run.json."""
        from transformers import AutoConfig
        layers = AutoConfig.from_pretrained(str(self.models.target)).num_hidden_layers
        draft_layers = (AutoConfig.from_pretrained(str(self.models.draft)).num_hidden_layers
                        if self.needs_draft else None)
        placement = placement_from_config(self.cfg, layers, draft_layers)
        logger.info(placement.summary())
        return placement

    def _load(self, path, which: str):
        """Load one model where the placement puts it."""
        where = getattr(self.placement, which)
        if isinstance(where, str) and where != "auto":
            return load_model(path, self.dtype, where)
        return load_model(path, self.dtype, device_map=where)

    def _models(self) -> list[tuple[str, object]]:
        return [("target", self.target)] + ([("draft", self.draft)] if self.draft is not None else [])

    def _choose_path(self):
        """The fast path's (target, draft) weights in self.fast, or None and the reason in self.fast_reason. A
        plain loop asked for (HF_FAST_PATH=false, a method without a fast version) is silent; any other reason is
        one warning line."""
        self.fast, self.fast_reason = None, self._plain_asked_for()
        if self.fast_reason is None:
            self.fast_reason = self._fast_path_blocker()
            if self.fast_reason is None:
                self.fast = tuple(fast_path.weights_from_hf(m, m.config.max_position_embeddings)
                                  for _, m in self._models())
            else:
                self._warn_plain()
        self.decode = self.decoding.fast if self.fast is not None else self.decoding.plain

    def _plain_asked_for(self) -> str | None:
        if self.decoding.fast is None:
            return f"the {self.method} method is transformers' own loop"
        return None if self.cfg.hf_fast_path else "HF_FAST_PATH=false"

    def _fast_path_blocker(self, max_len: int | None = None) -> str | None:
        """What keeps these models off the fast path (max_len: see fast_path.fast_path_blocker)."""
        if self.cfg.mixed_precision_config:
            return "MIXED_PRECISION_CONFIG's layers are not covered by the fast path"
        for role, model in self._models():
            if self.placement.single_device(role) is None:
                return f"the {role} is spread over several devices (GPU_STRATEGY={self.cfg.gpu_strategy})"
            reason = fast_path.fast_path_blocker(model, max_len)
            if reason:
                return f"{role} {reason}"
        return None

    def _warn_plain(self):
        logger.warning(f"{self.name}:{self.method}: plain transformers loop ({self.fast_reason}: expect a few % of "
                       "the bandwidth floor on a GPU; HF_FAST_PATH=false silences this)")

    def _fit_caches(self, need: int):
        """Note the static cache length this workload needs; past a model's window (sliding attention, a
        length-dependent rope) the fast path would differ from the model, so the engine falls back to the plain
        loop, with the warning line (before any timed batch when warmup has seen the workload)."""
        self.cache_len = max(self.cache_len, need)
        reason = self.fast is not None and self._fast_path_blocker(self.cache_len)
        if reason:
            self.fast, self.fast_reason, self.decode = None, reason, self.decoding.plain
            self.decoders.clear()
            self._warn_plain()

    def describe(self) -> dict:
        return {"engine": self.name, "method": self.method, "device": self.device, "dtype": self.dtype,
                "torch": torch.__version__, "gamma": self.cfg.gamma_value if self.draft is not None else None,
                "placement": self.placement.as_dict(), "fast_path": self.fast is not None,
                "fast_path_reason": self.fast_reason, "token_times": self.decoding.token_times}

    def weight_bytes(self) -> int:
        return self._held_bytes  # buffers too: mixed-precision layers hold their compressed weights there

    def reset_counters(self):
        if self.weight_bytes_read is not None:
            self.weight_bytes_read = 0
        if self.expert_tracker is not None:
            self.expert_tracker.reset()
            self.expert_spec = None
        # the SD loop's step times; its largest batch and the middle of that batch's positions
        self.step_times, self.step_prompts, self.step_position = StepTimes(), None, 0

    def cost_inputs(self) -> dict | None:
        """SD modes: c = draft step / target 1-token step and v = verify step / target 1-token step. Draft and
        verify steps are timed inside the SD loop (lib/decoding/timing.py); the target's 1-token step is timed
        once the run is over, at the batch size and the middle position of the run's largest batch."""
        t = self.step_times
        if not t.verify_rounds:
            return None
        target_s, where = self._target_step_seconds()
        draft_s, verify_s = t.draft_s / t.draft_steps, t.verify_s / t.verify_rounds
        timer = "CUDA events" if self.device == "cuda" else "perf_counter"
        return {"cost_ratio": draft_s / target_s, "cost_ratio_source": "timed",
                "verify_cost": verify_s / target_s, "verify_cost_source": "timed",
                "timing": {"draft_step_ms": draft_s * 1e3, "verify_step_ms": verify_s * 1e3,
                           "target_step_ms": target_s * 1e3, "batch_size": len(self.step_prompts),
                           "draft_steps": t.draft_steps, "verify_rounds": t.verify_rounds,
                           "how": f"draft and verify steps timed inside the SD loop ({timer}); the target's 1-token "
                                  f"step timed after the run, {STEP_REPEATS} steps at the same batch size, {where}"}}

    def _target_step_seconds(self) -> tuple[float, str]:
        """The target's 1-token step at the batch size of self.step_prompts, and where it was timed: on the fast
        path with the run's own decoder of that batch size at the middle of the batch's positions, else a plain
        forward after those prompts."""
        batch = len(self.step_prompts)
        decoder = next((d[0] for (size, _), d in self.decoders.items() if size == batch), None)
        if self.fast is not None and decoder is not None:
            ar_step = fast_path.ar_step_then(self.cfg.temperature)
            return (step_seconds(decoder, 1, position=self.step_position, then=ar_step),
                    f"at column {self.step_position} (the middle of that batch's positions), as the AR loop runs it")
        return plain_step_seconds(self.target, self.step_prompts, self.pad_id), "after that batch's prompts"

    def extra_results(self) -> dict:
        """MoE targets: which experts fired, per layer and per request, and per k drafts verified the distinct
        experts per layer per step next to the acceptance at k (lib/quant/moe_tracker.py)."""
        if self.expert_tracker is None:
            return {}
        from lib.quant.moe_tracker import verify_table
        return {"moe_experts": self.expert_tracker.export_dict(),
                "moe_verify": verify_table(self.expert_tracker, self.expert_spec)}

    def generate_batch(self, requests: list[Request], clock: Clock) -> list[RequestRecord]:
        if self.expert_tracker is None:
            return self._generate_batch(requests, clock)
        with self.expert_tracker.request(",".join(str(r.request_id) for r in requests)):
            records = self._generate_batch(requests, clock)
        for spec in (r.spec for r in records if r.spec is not None):
            self.expert_spec = spec if self.expert_spec is None else self.expert_spec.add(spec)
        return records

    def _generate_batch(self, requests: list[Request], clock: Clock) -> list[RequestRecord]:
        start = clock.now()
        prompts, max_new = [r.prompt_ids for r in requests], max(r.max_new_tokens for r in requests)
        if self.fast is not None:
            self._fit_caches(fast_path.max_len_for(prompts, max_new, self.cfg.gamma_value))
        gen = self.decode(self, prompts, max_new)
        self._count_weight_reads(gen)
        if gen.step_times is not None:
            self.step_times = self.step_times.add(gen.step_times)
            if self.step_prompts is None or len(prompts) > len(self.step_prompts):
                self.step_prompts, self.step_position = prompts, mid_position(prompts, max_new)
        records = []
        for row, request in enumerate(requests):
            ids = gen.tokens[row][: request.max_new_tokens]
            times = [t - clock.t0 for t in gen.token_times[row][: len(ids)]]
            reason = gen.finish_reasons[row] if len(ids) == len(gen.tokens[row]) else "length"
            spec = None
            if gen.num_drafts:
                spec = SpecCounters(gen.num_drafts[row], gen.draft_tokens[row], gen.accepted_tokens[row],
                                    gen.accepted_per_position[row])
            record = record_from_tokens(request, ids, times, start, reason, self.tokenizer, spec)
            if gen.top2_margins:
                record.top2_margin = gen.top2_margins[row][: len(ids)]
                record.top_logit = gen.top_logits[row][: len(ids)]
            records.append(record)
        return records

    def _count_weight_reads(self, gen: Generation):
        """Weights read by this batch: one full read per forward pass (prefill, each decode/verify step, each
        draft step); rows of a batch step together."""
        if self.weight_bytes_read is None:
            return
        target, draft = self._read_bytes
        if gen.num_drafts:
            self.weight_bytes_read += target * (1 + max(gen.num_drafts)) + draft * (1 + max(gen.draft_tokens))
        else:
            self.weight_bytes_read += target * max((len(t) for t in gen.tokens), default=0)

    def warmup(self, requests):
        """Size the static caches for the whole workload first, so no timed batch meets a new cache length."""
        if self.fast is not None:
            self._fit_caches(fast_path.max_len_for([r.prompt_ids for r in requests],
                                                   max(r.max_new_tokens for r in requests), self.cfg.gamma_value))
        super().warmup(requests)

    def static_decoders(self, prompts, max_new):
        """Static decoders for this batch size. The cache length is rounded up (and at least the workload's, set by
        warmup) so later batches reuse the compiled steps and graphs; one decoder set per batch size."""
        need = max(fast_path.max_len_for(prompts, max_new, self.cfg.gamma_value), self.cache_len)
        max_len = -(-need // 256) * 256
        if any(length != max_len for _, length in self.decoders):
            self.decoders.clear()  # a longer cache: free the shorter caches and their graphs
        key = (len(prompts), max_len)
        if key not in self.decoders:
            self.decoders[key] = tuple(fast_path.StaticDecoder(w, len(prompts), max_len) for w in self.fast)
        return self.decoders[key]


def weight_bytes_of(model) -> tuple[int, int]:
    """(bytes of weights held, bytes a forward pass reads): an untied input embedding is held but only indexed."""
    if model is None:
        return 0, 0
    tensors = {t.data_ptr(): t for t in model.state_dict().values()}  # weights and persistent buffers, tied once
    held = sum(t.numel() * t.element_size() for t in tensors.values())
    embed, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    untied_embed = embed.numel() * embed.element_size() if embed.data_ptr() != head.data_ptr() else 0
    return held, held - untied_embed


class _TimesStreamer:
    """A transformers streamer that only notes when tokens arrive (the first put() is the prompt)."""

    def __init__(self):
        self.times: list[float] = []
        self.seen_prompt = False

    def put(self, value):
        if not self.seen_prompt:
            self.seen_prompt = True
            return
        now = time.perf_counter()
        self.times.extend([now] * value.numel())

    def end(self):
        pass
