"""GPU decode speed of the PyTorch engine's fast path against the memory-bandwidth floor and HF's own loops.

One run: measures device copy bandwidth; builds random-init 8B-class shapes of one family in bf16 (--arch: llama,
mistral, qwen2, qwen3; no downloads) and a small draft of the same family; times AR on the
fast path (lib/decoding/fast_path.py) at several batch sizes (tok/s and % of the bandwidth floor = copy bandwidth /
weight bytes read per step); times chain SD with drafts of known acceptance and compares the measured speedup
with Leviathan's prediction from the measured acceptance and draft/target cost ratio (the draft steps timed inside
the SD loop, as the runner's SD cost model times them; the verify step's cost beside it); times HF `generate` and
HF assisted generation on the same models; GPU energy per token from NVML's total-energy counter.

tok/s is the decode rate: tokens after each row's first (which prefill gives) over the time from the first token
to the last, the same measure for AR and SD; for HF's generate() calls, the time of a 1-token call (its prefill)
is subtracted. The whole-call seconds, prefill included, are in the JSON too.

Acceptance dial (random weights give none): every o_proj and down_proj weight of the target is scaled by eps (the
head is left as it is); a self-draft made of the target's first k layers (+ final norm and head) then agrees with the
target more often the smaller eps is, while the target still reads all of its weights every step.

    python benchmarks/gpu_decode.py --out docs/perf/h100_<date>.json   # on a GPU (about 4 minutes on an H100)
    python benchmarks/gpu_decode.py --arch qwen3 --out docs/perf/h100_qwen3_<date>.json   # Qwen3-8B, Qwen3-0.6B
    python benchmarks/gpu_decode.py --tiny --arch qwen3 --check        # CPU smoke test with tiny shapes
"""
from __future__ import annotations

import argparse
import datetime
import math
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import lib.environment  # noqa: E402,F401  (first: a package this Python lacks is one line, not a traceback)

# isort: split

import torch  # noqa: E402

from lib.bandwidth import copy_bandwidth, sync  # noqa: E402
from lib.decoding.fast_path import (  # noqa: E402
    StaticDecoder,
    ar_step_then,
    max_len_for,
    static_autoregressive_generate,
    static_speculative_generate,
    weights_from_hf,
)
from lib.decoding.timing import mid_position, step_seconds  # noqa: E402
from lib.errors import exit_on_usage_error  # noqa: E402
from lib.files import output_file, write_json  # noqa: E402
from lib.sd_model import alpha_for, predicted_speedup  # noqa: E402


@dataclass(frozen=True)
class Shape:
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    head_dim: int | None = None  # None: hidden / heads
    tied: bool = False  # lm_head is the embedding


@dataclass(frozen=True)
class Family:
    """One --arch: its transformers config class, what its configs share, its shapes and default runs."""
    config: str
    settings: dict
    shapes: dict[str, Shape]
    targets: str  # default --shapes
    small_draft: str  # default --small-draft


TINY = Shape(4, 128, 384, 4, 2, 512)
TINY_DRAFT = Shape(2, 64, 192, 2, 1, 512)
ARCHS = {
    "llama": Family("LlamaConfig", {"rope_theta": 500000.0}, {
        "8b": Shape(32, 4096, 14336, 32, 8, 128256), "1b": Shape(16, 2048, 8192, 32, 8, 128256),
        "tiny": TINY, "tiny-draft": TINY_DRAFT}, "8b,1b", "1b"),
    "mistral": Family("MistralConfig", {"rope_theta": 1e6, "sliding_window": None}, {  # Mistral-7B v0.3
        "7b": Shape(32, 4096, 14336, 32, 8, 32768),
        "1b": Shape(16, 2048, 7168, 16, 8, 32768, head_dim=128),  # a small Mistral of our own: no such release
        "tiny": TINY, "tiny-draft": TINY_DRAFT}, "7b", "1b"),
    "qwen2": Family("Qwen2Config", {"rope_theta": 1e6, "rms_norm_eps": 1e-6}, {  # q/k/v biases
        "7b": Shape(28, 3584, 18944, 28, 4, 152064),  # Qwen2.5-7B
        "0.5b": Shape(24, 896, 4864, 14, 2, 152064, tied=True),  # Qwen2.5-0.5B (its vocab padded to the 7B's)
        "tiny": TINY, "tiny-draft": replace(TINY_DRAFT, tied=True)}, "7b", "0.5b"),
    "qwen3": Family("Qwen3Config", {"rope_theta": 1e6, "rms_norm_eps": 1e-6}, {  # q/k norms, explicit head_dim
        "8b": Shape(36, 4096, 12288, 32, 8, 151936, head_dim=128),  # Qwen3-8B
        "0.6b": Shape(28, 1024, 3072, 16, 8, 151936, head_dim=128, tied=True),  # Qwen3-0.6B
        "tiny": replace(TINY, head_dim=64), "tiny-draft": replace(TINY_DRAFT, head_dim=64, tied=True)},
        "8b", "0.6b"),
}


@dataclass
class Row:
    shape: str
    method: str  # ar | sd | hf_generate | hf_assisted
    draft: str = ""
    batch: int = 1
    gamma: int = 0
    tokens: int = 0
    seconds: float = 0.0  # the whole call, prefill included
    tok_s: float = 0.0  # decode rate: tokens after the first / time from the first token to the last
    pct_floor: float | None = None
    acceptance_rate: float | None = None  # accepted / drafted (docs/design.md)
    acceptance_length: float | None = None  # 1 + accepted / rounds
    alpha: float | None = None  # Leviathan's per-token acceptance that gives this acceptance length
    # c: draft step / target 1-token step. The draft steps are timed inside the SD loop (as the runner's SD cost
    # model times them: its argmax and its first step of 2 tokens included); the target's step alone
    cost_ratio: float | None = None
    cost_ratio_alone: float | None = None  # c from the draft's 1-token step alone (graph replays back to back)
    verify_cost: float | None = None  # verify step (gamma + 1 tokens) inside the loop / target 1-token step
    verify_cost_alone: float | None = None  # the verify step alone / target 1-token step
    speedup: float | None = None  # tok/s over fast-path AR at the same batch
    predicted: float | None = None  # acceptance_length / (gamma c + 1) = Leviathan's formula at alpha (lib/sd_model.py)
    ratio: float | None = None  # speedup / predicted
    predicted_with_verify: float | None = None  # acceptance_length / (gamma c + verify_cost)
    ratio_with_verify: float | None = None
    joules_per_token: float | None = None
    note: str = ""


# ---------------------------------------------------------------- measurement helpers
class Energy:
    """NVML's total-energy counter (mJ) of the GPU in use; None on CPU or without the counter."""

    def __init__(self, device):
        self.handle = None
        if device.type != "cuda":
            return
        try:
            import pynvml
            pynvml.nvmlInit()
            self.nvml = pynvml
            self.handle = pynvml.nvmlDeviceGetHandleByIndex(device.index or 0)
            pynvml.nvmlDeviceGetTotalEnergyConsumption(self.handle)
        except Exception as exc:  # noqa: BLE001 - no NVML or no counter: report energy as unknown
            print(f"energy: unavailable ({exc})")
            self.handle = None

    def read_j(self) -> float | None:
        return None if self.handle is None else self.nvml.nvmlDeviceGetTotalEnergyConsumption(self.handle) / 1e3


def timed(device, energy: Energy, fn):
    """(result, seconds, joules) of fn()."""
    sync(device)
    e0, t0 = energy.read_j(), time.perf_counter()
    result = fn()
    sync(device)
    seconds, e1 = time.perf_counter() - t0, energy.read_j()
    return result, seconds, (None if e0 is None else e1 - e0)


# ---------------------------------------------------------------- models
def build_model(arch: str, shape: str, dtype, device, seed: int):
    import transformers
    from transformers import AutoModelForCausalLM
    family = ARCHS[arch]
    s = family.shapes[shape]
    extra = {"head_dim": s.head_dim} if s.head_dim else {}
    config = getattr(transformers, family.config)(
        hidden_size=s.hidden, intermediate_size=s.intermediate, num_hidden_layers=s.layers,
        num_attention_heads=s.heads, num_key_value_heads=s.kv_heads, vocab_size=s.vocab, tie_word_embeddings=s.tied,
        max_position_embeddings=4096, bos_token_id=None, eos_token_id=None, pad_token_id=0, **family.settings,
        **extra)
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config).to(dtype)
    model.eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


@torch.no_grad()
def set_eps(model, old_eps: float, new_eps: float):
    """Scale o_proj and down_proj from old_eps to new_eps (in place: the fast path shares these tensors)."""
    for layer in model.model.layers:
        layer.self_attn.o_proj.weight.mul_(new_eps / old_eps)
        layer.mlp.down_proj.weight.mul_(new_eps / old_eps)


def hf_self_draft(target, k: int):
    """An HF model made of the target's first k layers, norm and head (shared modules, no copy)."""
    settings = {key: value for key, value in target.config.to_dict().items() if key != "layer_types"}
    config = type(target.config)(**{**settings, "num_hidden_layers": k})
    with torch.device("meta"):
        draft = type(target)(config)
    draft.model.embed_tokens = target.model.embed_tokens
    draft.model.layers = torch.nn.ModuleList(target.model.layers[:k])
    draft.model.norm, draft.model.rotary_emb, draft.lm_head = target.model.norm, target.model.rotary_emb, target.lm_head
    draft.generation_config = target.generation_config
    return draft.eval()


@torch.no_grad()
def small_draft_for(target, arch: str, shape: str, eps: float, seed: int):
    """A separate smaller model whose embeddings/head are slices of the target's, its layers eps-scaled:
    acceptance is whatever that gives (measured, not set)."""
    draft = build_model(arch, shape, target.dtype, target.device, seed + 1)
    hidden = draft.config.hidden_size
    draft.model.embed_tokens.weight.copy_(target.model.embed_tokens.weight[:, :hidden])
    draft.lm_head.weight.copy_(target.lm_head.weight[:, :hidden])
    draft.model.norm.weight.copy_(target.model.norm.weight[:hidden])
    set_eps(draft, 1.0, eps)
    return draft


# ---------------------------------------------------------------- runs
def decode_rate(gen) -> float:
    """Tokens after each row's first (which prefill gives) per second from the first token to the last: the
    steady decode speed that the bandwidth floor bounds, the same measure for AR and SD."""
    first = min(times[0] for times in gen.token_times)
    last = max(times[-1] for times in gen.token_times)
    return sum(len(t) - 1 for t in gen.tokens) / (last - first)


def run_ar(args, shape, weights, prompt, batch, floor_steps, device, energy, decoder_kw):
    prompts = [prompt] * batch
    decoder = StaticDecoder(weights, batch, max_len_for(prompts, args.new_tokens, args.gamma), **decoder_kw)
    static_autoregressive_generate(decoder, prompts, args.new_tokens)  # warm-up: graph capture
    gen, seconds, joules = timed(device, energy,
                                 lambda: static_autoregressive_generate(decoder, prompts, args.new_tokens))
    tokens, tok_s = sum(len(t) for t in gen.tokens), decode_rate(gen)
    return Row(shape, "ar", batch=batch, tokens=tokens, seconds=seconds, tok_s=tok_s,
               pct_floor=100 * tok_s / batch / floor_steps, joules_per_token=per_token(joules, tokens))


def run_sd(args, shape, weights, draft_weights, draft_name, prompt, ar_row, device, energy, decoder_kw):
    prompts, gamma = [prompt], args.gamma
    max_len = max_len_for(prompts, args.new_tokens, gamma)
    target = StaticDecoder(weights, 1, max_len, **decoder_kw)
    draft = StaticDecoder(draft_weights, 1, max_len, **decoder_kw)
    run = lambda: static_speculative_generate(target, draft, prompts, args.new_tokens, gamma)  # noqa: E731
    run()
    gen, seconds, joules = timed(device, energy, run)
    at = mid_position(prompts, args.new_tokens)  # where the loop's steps were, on average

    def alone(decoder, width):  # a step timed outside the loop; one token wide, AR's own step with its pick
        return step_seconds(decoder, width, args.step_repeats, at, ar_step_then(width=width))

    target_step, loop = alone(target, 1), gen.step_times
    cost = loop.draft_s / loop.draft_steps / target_step
    verify_cost = loop.verify_s / loop.verify_rounds / target_step
    tokens, tok_s = len(gen.tokens[0]), decode_rate(gen)
    rate = gen.accepted_tokens[0] / max(gen.draft_tokens[0], 1)
    length = 1 + gen.accepted_tokens[0] / max(gen.num_drafts[0], 1)
    predicted = predicted_speedup(length, gamma, cost)  # Leviathan's: verify cost 1
    with_verify = predicted_speedup(length, gamma, cost, verify_cost)
    speedup = tok_s / ar_row.tok_s
    return Row(shape, "sd", draft=draft_name, gamma=gamma, tokens=tokens, seconds=seconds, tok_s=tok_s,
               acceptance_rate=rate, acceptance_length=length, alpha=alpha_for(length, gamma), cost_ratio=cost,
               cost_ratio_alone=alone(draft, 1) / target_step, verify_cost=verify_cost,
               verify_cost_alone=alone(target, gamma + 1) / target_step,
               speedup=speedup, predicted=predicted, ratio=speedup / predicted, predicted_with_verify=with_verify,
               ratio_with_verify=speedup / with_verify, joules_per_token=per_token(joules, tokens))


def run_hf(shape, model, prompt, new_tokens, device, energy, gamma=0, assistant=None, draft_name=""):
    ids = torch.tensor([prompt], device=device)
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    if assistant is not None:
        assistant.generation_config.num_assistant_tokens = gamma
        assistant.generation_config.num_assistant_tokens_schedule = "constant"
        assistant.generation_config.assistant_confidence_threshold = 0.0
        kwargs["assistant_model"] = assistant
    with torch.inference_mode():
        model.generate(ids, **{**kwargs, "max_new_tokens": 8, "min_new_tokens": 8})  # warm-up
        first = min(timed(device, energy, lambda: model.generate(
            ids, **{**kwargs, "max_new_tokens": 1, "min_new_tokens": 1}))[1] for _ in range(3))
        out, seconds, joules = timed(device, energy, lambda: model.generate(ids, **kwargs))
    tokens = out.shape[1] - ids.shape[1]
    return Row(shape, "hf_assisted" if assistant is not None else "hf_generate", draft=draft_name, gamma=gamma,
               tokens=tokens, seconds=seconds, tok_s=(tokens - 1) / (seconds - first),
               joules_per_token=per_token(joules, tokens),
               note=f"decode rate: (generate() time - {first * 1e3:.1f} ms for its first token)")


def decoder_options(args) -> dict:
    """StaticDecoder keywords; None keeps the fast path's default (compile the layers on CUDA)."""
    return {"compile_layers": False if args.no_compile else None}


def per_token(joules, tokens):
    return None if joules is None else joules / tokens


# ---------------------------------------------------------------- table
def print_table(rows: list[Row]):
    header = ("shape", "method", "draft", "B", "k", "tok/s", "%floor", "a", "alpha", "c", "c alone", "verify",
              "speedup", "pred", "ratio", "ratio (verify)", "J/tok")
    fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
    lines = [header]
    for r in rows:
        lines.append((r.shape, r.method, r.draft or "-", str(r.batch), str(r.gamma or "-"), fmt(r.tok_s, ".1f"),
                      fmt(r.pct_floor, ".1f"), fmt(r.acceptance_rate, ".2f"), fmt(r.alpha, ".2f"),
                      fmt(r.cost_ratio, ".3f"), fmt(r.cost_ratio_alone, ".3f"), fmt(r.verify_cost, ".2f"),
                      fmt(r.speedup, ".2f"), fmt(r.predicted, ".2f"), fmt(r.ratio, ".2f"),
                      fmt(r.ratio_with_verify, ".2f"), fmt(r.joules_per_token, ".3f")))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    for i, line in enumerate(lines):
        print("| " + " | ".join(c.rjust(w) for c, w in zip(line, widths)) + " |")
        if i == 0:
            print("|" + "|".join("-" * (w + 2) for w in widths) + "|")


def number_list(kind=int, example="1,4,16"):
    """argparse type: a comma list of positive finite numbers, kept as typed (--repeat hands it to its children)."""
    def check(text: str) -> str:
        try:
            ok = all(math.isfinite(number) and number > 0 for number in map(kind, text.split(",")))
        except ValueError:
            ok = False
        if not ok:
            raise argparse.ArgumentTypeError(f"{text!r}: expected a comma list of positive {kind.__name__} values, "
                                             f"e.g. {example}")
        return text
    return check


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    g = p.add_argument_group("what to run")
    g.add_argument("--tiny", action="store_true",
                   help="CPU smoke run with tiny shapes (also the default without a GPU)")
    g.add_argument("--arch", default="llama", choices=sorted(ARCHS), help="model family of target and drafts")
    g.add_argument("--shapes", default="", help="comma-separated target shapes of --arch (default: llama 8b,1b; "
                   "mistral 7b; qwen2 7b; qwen3 8b)")
    g.add_argument("--batches", default="1,4,16", type=number_list(), help="AR batch sizes")
    g.add_argument("--sd-shape", default="", help="shape whose SD, HF generate and HF assisted rows are run "
                   "(default: the first of --shapes; none = skip them)")
    g.add_argument("--eps", default="1e-3,3e-4,1e-4", type=number_list(float, "1e-3,3e-4"),
                   help="acceptance dial values (low, middle, high acceptance)")
    g.add_argument("--draft-layers", type=int, default=4, help="layers of the self-draft")
    g.add_argument("--small-draft", default=None, help="shape of the separate draft of --arch ('' = none; "
                   "default: llama 1b, mistral 1b, qwen2 0.5b, qwen3 0.6b)")
    g.add_argument("--no-hf", action="store_true", help="skip the HF generate / assisted rows")
    g = p.add_argument_group("sizes")
    g.add_argument("--prompt-len", type=int, default=128)
    g.add_argument("--new-tokens", type=int, default=256)
    g.add_argument("--hf-new-tokens", type=int, default=128, help="new tokens for the (slow) HF rows")
    g.add_argument("--gamma", type=int, default=4, help="draft tokens per round (SD and HF assisted)")
    g.add_argument("--step-repeats", type=int, default=50, help="replays per step timing (cost ratio c)")
    g.add_argument("--no-compile", action="store_true", help="capture graphs of the eager ops (no "
                   "torch.compile of the layers)")
    g.add_argument("--check", action="store_true", help="compare fast-path greedy tokens with lib/decoding/chain.py")
    g = p.add_argument_group("output")
    g.add_argument("--out", default="", help="JSON file to write")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--repeat", type=int, default=1, help="run everything in N fresh processes, then print each "
                   "row's median and spread (max - min) and write all runs to --out")
    return p.parse_args(argv)


@exit_on_usage_error
def main(argv=None):
    args = parse_args(argv)
    if args.out:
        output_file(args.out, f"--out {args.out}")  # before minutes of GPU work
    if args.repeat > 1:
        return repeat(args, sys.argv[1:] if argv is None else list(argv))
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    if device.type == "cpu":
        args.tiny = True
        args.shapes, args.sd_shape, args.small_draft = "tiny", "tiny", "tiny-draft"
        args.batches = ",".join(b for b in args.batches.split(",") if int(b) <= 4)
        args.new_tokens, args.hf_new_tokens, args.prompt_len = min(args.new_tokens, 16), 8, 16
        args.draft_layers, args.step_repeats = min(args.draft_layers, 2), 3
    family = ARCHS[args.arch]
    args.shapes = args.shapes or family.targets
    args.sd_shape = args.sd_shape or args.shapes.split(",")[0]
    args.small_draft = family.small_draft if args.small_draft is None else args.small_draft
    dtype = torch.float32 if args.tiny else torch.bfloat16
    energy = Energy(device)
    bandwidth = copy_bandwidth(device, (64 << 20) if args.tiny else (2 << 30))
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device: {gpu}; copy bandwidth {bandwidth / 1e9:.0f} GB/s; torch {torch.__version__}")
    eps_values = [float(e) for e in args.eps.split(",")]
    rows, _checks = Results(args, gpu, bandwidth), {}
    for shape in args.shapes.split(","):
        model = build_model(args.arch, shape, dtype, device, args.seed)
        label = f"{args.arch}-{shape}"
        eps = eps_values[len(eps_values) // 2]
        set_eps(model, 1.0, eps)
        vocab = model.config.vocab_size
        prompt = torch.randint(1, vocab, (args.prompt_len,), generator=torch.Generator().manual_seed(1)).tolist()
        max_pos = args.prompt_len + args.new_tokens + 4 * args.gamma + 8
        weights = weights_from_hf(model, max_pos)
        floor_steps = bandwidth / weights.nbytes()
        print(f"{label}: {weights.nbytes() / 1e9:.2f} GB read per step, floor {floor_steps:.0f} steps/s")
        ar_rows = {}
        for batch in [int(b) for b in args.batches.split(",")]:
            ar_rows[batch] = run_ar(args, label, weights, prompt, batch, floor_steps, device, energy,
                                    decoder_options(args))
            rows.add(ar_rows[batch])
        if args.check:
            rows.checks[label] = check_tokens(model, weights, prompt, args.new_tokens, ar_rows)
        if shape == args.sd_shape:
            sd_rows(rows, args, label, model, weights, prompt, ar_rows[1], eps, eps_values, device, energy)
        del weights, model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print()
    print_table(rows.rows)
    if args.out:
        print(f"wrote {args.out}")
    return rows.to_json()


class Results:
    """Rows so far; the JSON file is rewritten after every row, so a crash or Ctrl-C loses nothing finished."""

    def __init__(self, args, gpu: str, bandwidth: float):
        self.args, self.gpu, self.bandwidth = args, gpu, bandwidth
        self.rows: list[Row] = []
        self.checks: dict = {}
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)

    def add(self, row: Row):
        self.rows.append(row)
        print_table([row])
        if self.args.out:
            write_json(Path(self.args.out), self.to_json())

    def to_json(self) -> dict:
        return {"schema": "speclab.gpu_decode/1", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
                "device": self.gpu, "torch": torch.__version__, "copy_bandwidth_gb_s": self.bandwidth / 1e9,
                "args": vars(self.args), "checks": self.checks, "rows": [asdict(r) for r in self.rows]}


SPREAD_FIELDS = ("tok_s", "pct_floor", "speedup", "ratio", "ratio_with_verify")


def child_argv(argv: list[str], out: str) -> list[str]:
    """argv without --repeat and --out (either spelling), writing to out."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in ("--repeat", "--out"):
            skip = True
        elif not arg.startswith(("--repeat=", "--out=")):
            kept.append(arg)
    return kept + ["--out", out]


def repeat(args, argv: list[str]) -> dict:
    """The whole measurement in args.repeat fresh processes (compilation, graph capture and kernel choices are
    per process); rows are matched by (shape, method, draft, batch) and reported as median and spread."""
    import json
    import statistics
    import subprocess
    import tempfile
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeat):
            # each run is kept beside --out as it finishes, so a run cut short keeps the processes that ended
            out = Path(args.out).with_suffix(f".run{i + 1}.json") if args.out else Path(tmp) / f"run{i + 1}.json"
            print(f"== fresh process {i + 1} of {args.repeat}", flush=True)
            subprocess.run([sys.executable, str(Path(__file__).resolve()), *child_argv(argv, str(out))], check=True)
            runs.append(json.loads(out.read_text()))
    medians, spreads = [], []
    for first in runs[0]["rows"]:
        key = (first["shape"], first["method"], first["draft"], first["batch"])
        same = [row for run in runs for row in run["rows"] if (row["shape"], row["method"], row["draft"],
                                                                row["batch"]) == key]
        median = dict(first)
        spread = {"shape": key[0], "method": key[1], "draft": key[2], "batch": key[3]}
        for field in SPREAD_FIELDS:
            values = [row[field] for row in same if row[field] is not None]
            if values:
                median[field] = statistics.median(values)
                spread[field] = {"median": median[field], "min": min(values), "max": max(values),
                                 "spread": max(values) - min(values), "values": values}
        medians.append(Row(**median))
        spreads.append(spread)
    print(f"\nmedian of {args.repeat} fresh processes:")
    print_table(medians)
    print("\nspread (max - min) across the processes:")
    for spread in spreads:
        parts = [f"{field} {spread[field]['spread']:.2f} ({spread[field]['min']:.2f}-{spread[field]['max']:.2f})"
                 for field in SPREAD_FIELDS if field in spread]
        print(f"  {spread['shape']} {spread['method']} {spread['draft'] or '-'} B={spread['batch']}: "
              + ", ".join(parts))
    result = {"schema": "speclab.gpu_decode_repeat/1", "repeat": args.repeat,
              "median_rows": [asdict(r) for r in medians], "spread": spreads, "runs": runs}
    if args.out:
        write_json(Path(args.out), result)
        print(f"wrote {args.out}")
    return result


def sd_rows(rows, args, shape, model, weights, prompt, ar_row, eps, eps_values, device, energy):
    """SD at each eps with the self-draft, the separate small draft, then HF generate / assisted at mid eps."""
    current = eps
    for value in eps_values:
        set_eps(model, current, value)
        current = value
        rows.add(run_sd(args, shape, weights, weights.first_layers(args.draft_layers),
                        f"self{args.draft_layers}@{value:g}", prompt, ar_row, device, energy, decoder_options(args)))
    set_eps(model, current, eps)
    hf_drafts = [(f"self{args.draft_layers}@{eps:g}", hf_self_draft(model, args.draft_layers))]
    if args.small_draft:
        small = small_draft_for(model, args.arch, args.small_draft, eps, args.seed)
        name = f"{args.small_draft}@{eps:g}"
        rows.add(run_sd(args, shape, weights, weights_from_hf(small, weights.cos.shape[0]), name, prompt, ar_row,
                        device, energy, decoder_options(args)))
        hf_drafts.append((name, small))
    if not args.no_hf:
        rows.add(run_hf(shape, model, prompt, args.hf_new_tokens, device, energy))
        for name, draft in hf_drafts:
            rows.add(run_hf(shape, model, prompt, args.hf_new_tokens, device, energy, args.gamma, draft, name))


def check_tokens(model, weights, prompt, new_tokens, ar_rows) -> dict:
    """Greedy tokens of the fast path vs lib/decoding/chain.py's plain path (same weights, same dtype)."""
    from lib.decoding.chain import autoregressive_generate
    plain = autoregressive_generate(model, [prompt], new_tokens).tokens[0]
    fast = static_autoregressive_generate(StaticDecoder(weights, 1, max_len_for([prompt], new_tokens)),
                                          [prompt], new_tokens).tokens[0]
    same = next((i for i, (a, b) in enumerate(zip(plain, fast)) if a != b), len(plain))
    print(f"check: fast path equals the plain path for the first {same} of {len(plain)} greedy tokens")
    return {"equal_prefix": same, "tokens": len(plain)}


if __name__ == "__main__":
    main()
