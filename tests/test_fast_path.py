"""The fast decode path (lib/decoding/fast_path.py) against the plain path (lib/decoding/chain.py), on CPU, tiny
models."""
import importlib
import json
import time

import pytest
import torch

from lib.decoding import fast_path
from lib.decoding.chain import autoregressive_generate, speculative_generate
from lib.decoding.fast_path import (
    StaticDecoder,
    fast_path_blocker,
    max_len_for,
    static_autoregressive_generate,
    static_speculative_generate,
    weights_from_hf,
)
from lib.models import load_model, load_tokenizer

NEW = 32


@pytest.fixture(scope="module")
def pair(tiny_models):
    return load_model(tiny_models.target), load_model(tiny_models.draft), load_tokenizer(tiny_models.target)


@pytest.fixture(scope="module")
def prompts(pair, shipped_prompts):
    tokenizer = pair[2]
    return [tokenizer.encode(p)[:24] for p in shipped_prompts[:3]]  # different lengths


def decoders(target, draft, batch, gamma=0):
    max_len = max_len_for(batch, NEW, gamma)
    t = StaticDecoder(weights_from_hf(target, max_len), len(batch), max_len)
    d = None if draft is None else StaticDecoder(weights_from_hf(draft, max_len), len(batch), max_len)
    return t, d


@pytest.mark.parametrize("rows,ahead", [(1, None), (3, None), (3, True)])
def test_greedy_ar_equals_plain_path(pair, prompts, rows, ahead):
    """ahead=True runs the loop CUDA runs (the next step queued before the current one is read) on the CPU."""
    target, _, _ = pair
    batch = prompts[:rows]
    plain = autoregressive_generate(target, batch, NEW)
    fast = static_autoregressive_generate(decoders(target, None, batch)[0], batch, NEW, ahead=ahead)
    assert fast.tokens == plain.tokens
    assert all(len(t) == NEW for t in fast.tokens)
    assert all(len(times) == NEW and times == sorted(times) for times in fast.token_times)


@pytest.mark.parametrize("rows,gamma", [(1, 4), (3, 3)])
def test_greedy_sd_equals_plain_ar_and_counts_match_chain(pair, prompts, rows, gamma):
    target, draft, _ = pair
    batch = prompts[:rows]
    plain = autoregressive_generate(target, batch, NEW)
    chain = speculative_generate(target, draft, batch, NEW, gamma)
    t, d = decoders(target, draft, batch, gamma)
    fast = static_speculative_generate(t, d, batch, NEW, gamma)
    assert fast.tokens == plain.tokens
    # same acceptance as the plain SD loop: the drafts are the same tokens
    assert fast.accepted_tokens == chain.accepted_tokens
    assert fast.num_drafts == chain.num_drafts
    assert all(sum(per_pos) == acc for per_pos, acc in zip(fast.accepted_per_position, fast.accepted_tokens))


def test_self_draft_of_first_layers_is_lossless(pair, prompts):
    target, _, _ = pair
    batch = prompts[:2]
    max_len = max_len_for(batch, NEW, 3)
    weights = weights_from_hf(target, max_len)
    fast = static_speculative_generate(StaticDecoder(weights, 2, max_len),
                                       StaticDecoder(weights.first_layers(2), 2, max_len), batch, NEW, 3)
    assert fast.tokens == autoregressive_generate(target, batch, NEW).tokens
    assert sum(fast.accepted_tokens) > 0


def test_eos_stops_a_row_and_others_go_on(pair, prompts):
    target, draft, _ = pair
    batch = prompts[:2]
    plain = autoregressive_generate(target, batch, NEW)
    eos = plain.tokens[0][5]  # a token row 0 emits early: treat it as EOS
    want = autoregressive_generate(target, batch, NEW, eos_ids={eos})
    t, d = decoders(target, draft, batch, 4)
    fast = static_speculative_generate(t, d, batch, NEW, 4, eos_ids={eos})
    assert fast.tokens == want.tokens
    assert fast.finish_reasons == want.finish_reasons and fast.finish_reasons[0] == "stop"


@pytest.mark.parametrize("choice", [{}, {"pick_in_graph": False}])
def test_ar_stops_rows_at_eos_and_a_second_call_starts_afresh(pair, prompts, choice):
    """Greedy AR with its pick inside the step (`pick_in_graph`, the default) or after it: a row that stops
    freezes its cache, the others go on, and a second call on the same decoder starts from its own prompts."""
    from lib.decoding import fast_path
    target, _, _ = pair
    batch = prompts[:2]
    plain = autoregressive_generate(target, batch, NEW).tokens
    # a token row 0 emits before its last step and row 1 never does (which tokens the tiny model emits depends
    # on the CPU's float kernels: AMX or not)
    eos = next((t for t in plain[0][:NEW - 1] if t not in plain[1]), None)
    assert eos is not None, "every token of row 0 also occurs in row 1: no EOS that stops row 0 alone"
    decoder = decoders(target, None, batch)[0]
    shipped = fast_path.options()
    try:
        fast_path.set_options(**choice)
        for eos_ids, rows in (({eos}, batch), (set(), batch[::-1])):
            want = autoregressive_generate(target, rows, NEW, eos_ids=eos_ids)
            fast = static_autoregressive_generate(decoder, rows, NEW, eos_ids=eos_ids)
            assert fast.tokens == want.tokens and fast.finish_reasons == want.finish_reasons
            assert fast.finish_reasons[0] == ("stop" if eos_ids else "length")
            grown = [n - len(p) for n, p in zip(decoder.lengths.tolist(), rows)]
            assert (grown[0] < grown[1]) == bool(eos_ids)  # the stopped row's cache stopped moving
    finally:
        fast_path.set_options(**shipped)


def test_sampling_keeps_lengths_and_is_seeded(pair, prompts):
    target, draft, _ = pair
    batch = prompts[:2]
    outs = []
    for _ in range(2):
        t, d = decoders(target, draft, batch, 4)
        outs.append(static_speculative_generate(t, d, batch, NEW, 4, temperature=0.8,
                                                generator=torch.Generator().manual_seed(7)).tokens)
    assert outs[0] == outs[1]
    assert all(len(row) == NEW for row in outs[0])


def test_blocker_names_what_the_fast_path_does_not_cover(pair):
    from types import SimpleNamespace

    from transformers import GPT2Config, MixtralConfig
    assert fast_path_blocker(pair[0]) is None
    assert fast_path_blocker(SimpleNamespace(config=GPT2Config())) == "gpt2 is not covered by the fast path"
    assert "mixture-of-experts" in fast_path_blocker(SimpleNamespace(config=MixtralConfig()))
    window = SimpleNamespace(config=type(pair[0].config)(**{**pair[0].config.to_dict(), "sliding_window": 64}))
    window.model = pair[0].model
    assert fast_path_blocker(window) is None and fast_path_blocker(window, 64) is None
    assert "sliding attention window is 64 tokens" in fast_path_blocker(window, 65)


def test_benchmark_smoke_on_cpu(tmp_path):
    from benchmarks.gpu_decode import main
    out = tmp_path / "smoke.json"
    result = main(["--tiny", "--batches", "1", "--eps", "1e-4", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["schema"] == "speclab.gpu_decode/1" and saved["rows"] == result["rows"]
    methods = {row["method"] for row in saved["rows"]}
    assert methods == {"ar", "sd", "hf_generate", "hf_assisted"}
    sd = [row for row in saved["rows"] if row["method"] == "sd"]
    assert all(0 <= row["acceptance_rate"] <= 1 and row["predicted"] > 0 for row in sd)


def _engine_outputs(method, env, tiny_models, shipped_prompts):
    from lib.config import resolve
    from lib.engines.pytorch_engine import PyTorchEngine
    from lib.models import resolve_models
    from lib.types import Clock, Request
    cfg = resolve(None, env)
    engine = PyTorchEngine(cfg, method, resolve_models(cfg, need_draft=method != "target"))
    engine.start()
    requests = [Request(i, p, engine.tokenizer.encode(p), 16) for i, p in enumerate(shipped_prompts[:2])]
    records = engine.generate_batch(requests, Clock())
    return {**engine.describe(), "weight_bytes_read": engine.weight_bytes_read}, records


def test_hf_engine_fast_path_assisted_and_plain_agree(tiny_models, shipped_prompts):
    plain_info, plain = _engine_outputs("target", {"HF_FAST_PATH": "false"}, tiny_models, shipped_prompts)
    fast_info, fast = _engine_outputs("speculative", {}, tiny_models, shipped_prompts)
    assisted_info, assisted = _engine_outputs("assisted", {}, tiny_models, shipped_prompts)
    assert not plain_info["fast_path"] and fast_info["fast_path"] and not assisted_info["fast_path"]
    assert fast_info["placement"]["target"] == "cpu" and fast_info["placement"]["strategy"] == "same"
    want = [r.output_ids for r in plain]
    assert [r.output_ids for r in fast] == want == [r.output_ids for r in assisted]
    assert all(r.spec is not None and r.spec.num_drafts > 0 for r in fast)
    assert all(len(r.token_times) == len(r.output_ids) for r in assisted)
    assert fast_info["token_times"] == plain_info["token_times"] == "per token"
    assert assisted_info["token_times"].startswith("per assisted round")
    assert assisted_info["weight_bytes_read"] is None and fast_info["weight_bytes_read"] > 0
    assert plain_info["gamma"] is None and fast_info["gamma"] == assisted_info["gamma"] == 4


@pytest.mark.parametrize("method,env", [("target", {}), ("speculative", {"HF_FAST_PATH": "false"})])
def test_hf_engine_other_decode_functions_agree(method, env, tiny_models, shipped_prompts):
    """The fast target loop and the plain chain SD loop: the same tokens as plain AR."""
    _, plain = _engine_outputs("target", {"HF_FAST_PATH": "false"}, tiny_models, shipped_prompts)
    info, records = _engine_outputs(method, env, tiny_models, shipped_prompts)
    assert info["fast_path"] == (method == "target")
    assert [r.output_ids for r in records] == [r.output_ids for r in plain]
    assert all((r.spec is not None) == (method == "speculative") for r in records)


def test_assisted_only_with_hf_engine():
    from lib.config import modes, resolve
    from lib.errors import UsageError
    with pytest.raises(UsageError, match="assisted"):
        modes(resolve(None, {"COMPARE_MODES": "vllm:assisted"}))
    assert ("hf", "assisted") in modes(resolve(None, {"INFERENCE_METHOD": "assisted"}))


@pytest.mark.parametrize("new,gamma", [(1, 4), (3, 7), (9, 1)])
def test_rounds_queued_ahead_keep_sd_exact(pair, prompts, new, gamma):
    """The SD loop queues the next round before reading the current one (except when a round may be the
    last): short generations and gamma larger than the remaining tokens still give the AR tokens and the
    plain SD loop's counts."""
    target, draft, _ = pair
    max_len = max_len_for(prompts, new, gamma)
    fast = static_speculative_generate(StaticDecoder(weights_from_hf(target, max_len), len(prompts), max_len),
                                       StaticDecoder(weights_from_hf(draft, max_len), len(prompts), max_len),
                                       prompts, new, gamma, ahead=True)  # the CUDA loop, here on the CPU
    chain = speculative_generate(target, draft, prompts, new, gamma)
    assert fast.tokens == autoregressive_generate(target, prompts, new).tokens
    assert fast.num_drafts == chain.num_drafts and fast.accepted_tokens == chain.accepted_tokens


def timed_steps(decoder: StaticDecoder) -> list[tuple[float, float]]:
    """Wraps decoder.step to note (start, end) of every step; the CPU runs a step as it is called."""
    spans, step = [], decoder.step

    def noted(*args, **kwargs):
        start = time.perf_counter()
        out = step(*args, **kwargs)
        spans.append((start, time.perf_counter()))
        return out

    decoder.step = noted
    return spans


@pytest.mark.parametrize("gamma", [0, 3])
def test_cpu_token_times_are_when_their_step_ended(pair, prompts, gamma):
    """On the CPU a token (an SD round's tokens) is stamped after the target step that made it and before the
    next target step starts: no step is queued ahead to hold it back."""
    target, draft, _ = pair
    batch = prompts[:2]
    t, d = decoders(target, draft if gamma else None, batch, gamma)
    spans = timed_steps(t)
    gen = static_speculative_generate(t, d, batch, NEW, gamma) if gamma else \
        static_autoregressive_generate(t, batch, NEW)
    stamps = sorted({t for times in gen.token_times for t in times[1:]})  # past the prefill's: one per step
    assert len(stamps) == len(spans) >= 2
    for i, stamp in enumerate(stamps):
        assert spans[i][1] <= stamp, f"step {i} ended after its tokens were stamped"
        assert i + 1 == len(spans) or stamp <= spans[i + 1][0], f"step {i + 1} ran before step {i}'s tokens"


def test_fused_weights_share_storage_with_the_model(tiny_models):
    """weights_from_hf must not hold the projections twice: the HF layers read views of the fused matrices."""
    model = load_model(tiny_models.target)
    q_before = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    weights = weights_from_hf(model, 64)
    attn = model.model.layers[0].self_attn
    assert attn.q_proj.weight.untyped_storage().data_ptr() == weights.layers[0].wqkv.untyped_storage().data_ptr()
    assert attn.v_proj.weight.untyped_storage().data_ptr() == weights.layers[0].wqkv.untyped_storage().data_ptr()
    assert torch.equal(attn.q_proj.weight, q_before)
    mlp = model.model.layers[0].mlp
    assert mlp.up_proj.weight.untyped_storage().data_ptr() == weights.layers[0].w13.untyped_storage().data_ptr()


def test_paired_gate_up_rows_change_no_token(tiny_models, prompts, monkeypatch):
    """With w13's rows in (gate, up) pairs (as on CUDA, where the product then ends in SiLU(gate) * up) the greedy
    tokens, AR and SD, are the plain path's, and the HF model, whose projections now read strided views of the
    paired tensor, decodes as before."""
    target, draft = load_model(tiny_models.target), load_model(tiny_models.draft)
    batch = prompts[:2]
    plain = autoregressive_generate(target, batch, NEW).tokens
    monkeypatch.setattr(fast_path, "_gate_pairs", lambda model: True)
    t, d = decoders(target, draft, batch, 3)
    layer, mlp = t.w.layers[0], target.model.layers[0].mlp
    assert layer.gate_pairs and torch.equal(layer.w13[1::2], mlp.up_proj.weight)
    assert mlp.up_proj.weight.untyped_storage().data_ptr() == layer.w13.untyped_storage().data_ptr()
    assert static_autoregressive_generate(t, batch, NEW).tokens == plain
    assert static_speculative_generate(t, d, batch, NEW, 3).tokens == plain
    assert autoregressive_generate(target, batch, NEW).tokens == plain


@pytest.mark.parametrize("script,argv,named", [
    ("gpu_decode", ["--batches", "1,x"], "--batches"), ("gpu_decode", ["--eps", "nan"], "--eps"),
    ("gpu_step_profile", ["--widths", "0"], "--widths"), ("gpu_step_profile", ["--variants", "fast"], "--variants")])
def test_benchmark_flags_with_bad_values_stop_with_one_line(script, argv, named, capsys):
    with pytest.raises(SystemExit) as stop:
        importlib.import_module(f"benchmarks.{script}").main(argv)
    assert stop.value.code == 2
    assert named in capsys.readouterr().err.splitlines()[-1]


def test_inductor_uses_pdl_only_for_steps_whose_products_launch_with_pdl():
    """Inductor's kernels get PDL for one-token steps and for 16-bit steps of up to gemv_rows rows (gemv.py's PDL
    kernels); a verify step on cuBLAS (float32, or more rows than gemv takes) keeps plain launches, and the setting
    is undone when the step has compiled."""
    import torch._inductor.config as inductor_config

    from lib.decoding import fast_path

    def pdl(batch, width, dtype):
        with fast_path.inductor_settings(torch.ones(batch, width, dtype=torch.long), dtype):
            return inductor_config.triton.enable_pdl

    before = inductor_config.triton.enable_pdl
    assert pdl(1, 1, torch.float32) and pdl(16, 1, torch.float32)
    assert pdl(1, 5, torch.bfloat16) and pdl(2, 8, torch.float16) and pdl(16, 1, torch.bfloat16)
    assert not pdl(1, 5, torch.float32)
    assert not pdl(1, 17, torch.bfloat16) and not pdl(3, 6, torch.bfloat16)
    shipped = fast_path.options()
    try:
        fast_path.set_options(pdl=False)
        assert not pdl(1, 1, torch.bfloat16)
    finally:
        fast_path.set_options(**shipped)
    assert inductor_config.triton.enable_pdl == before
