"""Reference tree speculative decoding: greedy output equals AR output, with a draft model and an EAGLE head."""
import pytest
import torch

from lib.comparison_config import ComparisonConfig
from lib.decoding.chain import autoregressive_generate
from lib.decoding.eagle import ensure_tiny_eagle, is_eagle_folder, load_eagle_head
from lib.decoding.tree import EagleDrafter, ModelDrafter, tree_attention_mask, tree_speculative_generate
from lib.files import ROOT
from lib.models import load_model, load_tokenizer

PRESETS = {"config1": (5, 32), "config2": (2, 12)}
STEPS = 24


@pytest.fixture(scope="module")
def loaded(tiny_models):
    target = load_model(tiny_models.target)
    return {"tokenizer": load_tokenizer(tiny_models.target), "target": target,
            "draft": load_model(tiny_models.draft),
            "eagle": load_eagle_head(ensure_tiny_eagle(tiny_models), target)}


@pytest.fixture(scope="module")
def prompts(loaded):
    lines = (ROOT / "prompts" / "prompt_small.txt").read_text().splitlines()[:2]
    return [loaded["tokenizer"].encode(p) for p in lines]


def drafter_for(kind, loaded):
    return ModelDrafter(loaded["draft"]) if kind == "model" else EagleDrafter(loaded["eagle"], loaded["target"])


@pytest.mark.parametrize("kind", ["model", "eagle"])
@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_tree_greedy_equals_autoregressive(loaded, prompts, kind, preset):
    num_iter, tree_size = PRESETS[preset]
    topk = ComparisonConfig(spec_num_iter=num_iter, spec_tree_size=tree_size).get_topk_per_iter()
    for ids in prompts:
        ar = autoregressive_generate(loaded["target"], [ids], STEPS).tokens[0]
        gen = tree_speculative_generate(loaded["target"], drafter_for(kind, loaded), ids, STEPS, num_iter, topk,
                                        tree_size)
        assert gen.tokens == ar and gen.finish_reason == "length"
        assert len(gen.steps) == len(gen.tokens)
        assert [int(s.logits.argmax()) for s in gen.steps] == gen.tokens
        for r in gen.rounds:
            assert len(r.tree_tokens) == tree_size
            assert all(p < i for i, p in enumerate(r.tree_parents) if i)  # parents come first
            assert r.accept_length <= num_iter
        assert sum(r.accept_length + 1 for r in gen.rounds) + 1 >= len(gen.tokens)


def test_trained_drafts_are_accepted(loaded, prompts):
    """The tiny EAGLE head and draft model really predict the target: more than one token per round."""
    for kind in ("model", "eagle"):
        gen = tree_speculative_generate(loaded["target"], drafter_for(kind, loaded), prompts[0], STEPS, 5, 7, 32)
        assert len(gen.tokens) / (len(gen.rounds) + 1) > 1.5


@pytest.mark.parametrize("kind", ["model", "eagle"])
def test_tree_stops_at_eos_like_autoregressive(loaded, prompts, kind):
    """A token emitted mid-round that is an EOS ends the output there, as in AR decoding."""
    ids = prompts[0]
    eos = autoregressive_generate(loaded["target"], [ids], STEPS).tokens[0][6]
    ar = autoregressive_generate(loaded["target"], [ids], STEPS, eos_ids={eos})
    gen = tree_speculative_generate(loaded["target"], drafter_for(kind, loaded), ids, STEPS, 5, 7, 32, eos_ids={eos})
    assert gen.tokens == ar.tokens[0] and gen.finish_reason == ar.finish_reasons[0] == "stop"
    assert len(gen.steps) == len(gen.tokens)


def test_tree_logits_match_plain_forward(loaded, prompts):
    """The target logits captured in tree mode equal those of a plain forward over the same text."""
    ids = prompts[0]
    gen = tree_speculative_generate(loaded["target"], drafter_for("eagle", loaded), ids, 12, 5, 7, 32)
    with torch.no_grad():
        full = loaded["target"](input_ids=torch.tensor([ids + gen.tokens])).logits[0].float()
    for n, step in enumerate(gen.steps):
        assert torch.allclose(step.logits, full[len(ids) - 1 + n], atol=1e-4)


def test_tree_attention_mask_sees_only_ancestors():
    parents = [-1, 0, 0, 1, 2]
    mask = tree_attention_mask(3, parents, [0, 1, 2, 3, 4], [], torch.float32, "cpu")[0, 0]
    visible = (mask == 0).int().tolist()
    assert visible[3] == [1, 1, 1, 1, 1, 0, 1, 0]  # node 3: past, root, node 1, itself
    assert visible[4] == [1, 1, 1, 1, 0, 1, 0, 1]
    assert mask.shape == (5, 8)


def test_eagle_head_folder_layout(tiny_models):
    """The head is saved the way vLLM and SGLang load EAGLE-1 Llama heads."""
    import json

    from safetensors import safe_open
    folder = ensure_tiny_eagle(tiny_models)
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["num_hidden_layers"] == 1
    with safe_open(str(folder / "model.safetensors"), "pt") as fh:
        keys = set(fh.keys())
    assert {"fc.weight", "embed_tokens.weight", "layers.0.self_attn.q_proj.weight",
            "layers.0.post_attention_layernorm.weight"} <= keys
    assert not any("input_layernorm" in k or k.startswith("lm_head") for k in keys)
    assert is_eagle_folder(folder) and not is_eagle_folder(tiny_models.draft)
