"""The fast path across model families (lib/decoding/fast_path.py FAMILIES), through the benchmark runner: tiny
random models of each family (with the project's tiny tokenizer) decode the same greedy tokens on the fast path as
on the plain transformers loop, AR and SD, batch 1 and 4; a model the fast path does not cover falls back with one
line and says why in run.json."""
import json
import shutil

import pytest
import torch

import benchmark

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=512, initializer_range=0.1)  # wide enough weights: no near-ties in the logits
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64, "rope_theta": 10000.0}
YARN_ROPE = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128, "rope_theta": 10000.0}

# family: (its config class, target settings, draft: "first layer" of the target, or (config class, settings))
FAMILIES = {
    "llama": ("LlamaConfig", dict(attention_bias=True, mlp_bias=True, rope_scaling=LLAMA3_ROPE), "first layer"),
    "mistral": ("MistralConfig", dict(head_dim=32),  # sliding_window 4096: on, but no cache here reaches it
                ("LlamaConfig", dict(hidden_size=32, num_attention_heads=2, num_key_value_heads=1))),
    "qwen2": ("Qwen2Config", dict(tie_word_embeddings=True, rope_scaling=YARN_ROPE), "first layer"),
    "qwen3": ("Qwen3Config", dict(head_dim=32, num_key_value_heads=1),
              ("Qwen3Config", dict(head_dim=16, num_hidden_layers=1, tie_word_embeddings=True))),
    "phi3": ("Phi3Config", dict(num_key_value_heads=4, partial_rotary_factor=0.5), "first layer"),
    "granite": ("GraniteConfig", dict(embedding_multiplier=6.0, residual_multiplier=0.3,
                                      attention_multiplier=0.1, logits_scaling=4.0,
                                      rope_scaling={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}),
                "first layer"),
    "olmo2": ("Olmo2Config", {}, "first layer"),
    "seed_oss": ("SeedOssConfig", dict(attention_bias=True, attention_out_bias=True), "first layer"),
}


def save_model(folder, class_name: str, settings: dict, tokenizer_dir, seed: int, first_layer_of=None):
    """A random-init HF folder with the tiny tokenizer's files; first_layer_of: a model whose embeddings, first
    layer, norm and head it takes (a self-draft that agrees with the target part of the time)."""
    import transformers
    from transformers import AutoModelForCausalLM

    from lib.models import load_tokenizer
    tokenizer = load_tokenizer(tokenizer_dir)
    config = getattr(transformers, class_name)(**{**TINY, **settings, "vocab_size": len(tokenizer),
                                                  "eos_token_id": tokenizer.eos_token_id,
                                                  "pad_token_id": tokenizer.pad_token_id, "bos_token_id": None})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    if first_layer_of is not None:
        model.load_state_dict(first_layer_of.state_dict(), strict=False)  # layers past the first are left out
    model.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(tokenizer_dir / name, folder / name)
    return model


@pytest.fixture(scope="module")
def family_models(tiny_models, tmp_path_factory):
    """family -> (target folder, draft folder)."""
    root = tmp_path_factory.mktemp("families")
    out = {}
    for i, (family, (class_name, settings, draft)) in enumerate(FAMILIES.items()):
        target = save_model(root / family / "target", class_name, settings, tiny_models.target, seed=i)
        if draft == "first layer":
            save_model(root / family / "draft", class_name, {**settings, "num_hidden_layers": 1}, tiny_models.target,
                       seed=100 + i, first_layer_of=target)
        else:
            save_model(root / family / "draft", draft[0], draft[1], tiny_models.target, seed=100 + i)
        out[family] = root / family / "target", root / family / "draft"
    return out


def run(tmp_path, name, target, draft, batch=1, **flags):
    argv = ["--target-model", str(target), "--drafter-model", str(draft), "--enable-gpu-monitor", "false",
            "--num-prompts", "4", "--generation-length", "12", "--results-dir", str(tmp_path / "runs"),
            "--run-id", name]
    if batch > 1:
        argv += ["--enable-batch", "true", "--batch-size", str(batch)]
    for flag, value in flags.items():
        argv += [f"--{flag.replace('_', '-')}", str(value)]
    assert benchmark.main(argv) == 0
    run_dir = tmp_path / "runs" / name
    tokens = {}
    for path in run_dir.glob("requests_hf_*.jsonl"):
        lines = [json.loads(ln) for ln in path.read_text().splitlines()]
        tokens[path.stem.removeprefix("requests_hf_")] = {line["request_id"]: line["output_ids"] for line in lines}
    return json.loads((run_dir / "run.json").read_text()), json.loads(
        (run_dir / "benchmark_results.json").read_text()), tokens


@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_fast_path_equals_the_plain_loop(family_models, tmp_path, family, batch):
    target, draft = family_models[family]
    fast_run, fast_results, fast = run(tmp_path, "fast", target, draft, batch)
    plain_run, _, plain = run(tmp_path, "plain", target, draft, batch, hf_fast_path="false")
    for mode in ("hf:target", "hf:speculative"):
        assert fast_run["engines"][mode]["fast_path"] is True and fast_run["engines"][mode]["fast_path_reason"] is None
        assert fast_results["modes"][mode]["engine"]["fast_path"] is True
        assert plain_run["engines"][mode]["fast_path"] is False
        assert plain_run["engines"][mode]["fast_path_reason"] == "HF_FAST_PATH=false"
    assert len(fast["target"]) == 4 and all(ids for ids in fast["target"].values())
    assert fast["target"] == plain["target"]
    assert fast["speculative"] == fast["target"] == plain["speculative"]
    assert fast_results["modes"]["hf:speculative"]["metrics"]["acceptance"]["num_drafts"] > 0


def test_uncovered_models_fall_back_with_one_line(tiny_models, tmp_path, capsys):
    """gemma2 (not a covered family) as the target; a Mistral whose sliding window the workload's cache passes
    falls back once the cache length is known (at warm-up, before anything is timed)."""
    gemma = tmp_path / "gemma2"
    save_model(gemma, "Gemma2Config", dict(head_dim=16), tiny_models.target, seed=1)
    mistral = tmp_path / "mistral"
    save_model(mistral, "MistralConfig", dict(sliding_window=8), tiny_models.target, seed=2)
    cases = [(gemma, "target gemma2 is not covered by the fast path"),
             (mistral, "target mistral: its sliding attention window is 8 tokens, shorter than this run's")]
    for folder, reason in cases:
        run_json, _, tokens = run(tmp_path, folder.name, folder, folder, inference_method="target")
        assert tokens["target"]
        engine = run_json["engines"]["hf:target"]
        assert engine["fast_path"] is False and engine["fast_path_reason"].startswith(reason)
        out, err = capsys.readouterr()
        lines = [ln for ln in err.splitlines() if "plain transformers loop" in ln]
        assert lines == [f"hf:target: plain transformers loop ({engine['fast_path_reason']}: expect a few % of the "
                         "bandwidth floor on a GPU; HF_FAST_PATH=false silences this)"]
        assert "plain" in out  # the summary's path column


def test_engine_logs_the_fallback_line(tiny_models, tmp_path, caplog):
    """The line goes through the project's logger at warning level (caplog sees it when no script set up logging);
    HF_FAST_PATH=false falls back silently."""
    from lib.config import resolve
    from lib.engines.pytorch_engine import PyTorchEngine
    from lib.models import resolve_models
    folder = tmp_path / "mixtral"
    save_model(folder, "MixtralConfig", dict(num_local_experts=2, num_experts_per_tok=1), tiny_models.target, seed=3)
    for env, want in (({}, "mixtral is a mixture-of-experts model"), ({"HF_FAST_PATH": "false"}, None)):
        caplog.clear()
        cfg = resolve(None, {"TARGET_MODEL": str(folder), **env})
        engine = PyTorchEngine(cfg, "target", resolve_models(cfg, need_draft=False))
        with caplog.at_level("WARNING", logger="speclab"):
            engine.start()
        warnings = [r for r in caplog.records if r.levelname == "WARNING" and "plain transformers loop" in r.message]
        assert engine.describe()["fast_path"] is False
        if want is None:
            assert warnings == [] and engine.describe()["fast_path_reason"] == "HF_FAST_PATH=false"
        else:
            assert len(warnings) == 1 and want in warnings[0].message and warnings[0].name.startswith("speclab")
