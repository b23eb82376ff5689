"""The GGUF export: llama.cpp (f32 KV cache) reproduces transformers' logits and greedy tokens."""
import numpy as np
import pytest
import torch

from lib.decoding.chain import autoregressive_generate
from lib.gguf_export import ensure_gguf, folder_hash, load_llama
from lib.models import load_model


@pytest.mark.parametrize("which", ["draft", "target"])
def test_llamacpp_greedy_equals_transformers(tiny_models, tiny_tokenizer, shipped_prompts, which):
    folder = getattr(tiny_models, which)
    path = ensure_gguf(folder)
    assert path.is_file() and path.name.endswith(".gguf")
    llm = load_llama(path, n_ctx=512)
    hf = load_model(folder)
    for prompt in shipped_prompts[:3]:
        ids = tiny_tokenizer.encode(prompt, add_special_tokens=False)
        assert llm.tokenize(prompt.encode(), add_bos=False) == ids  # the "gpt-2" pre-tokenizer matches HF's
        expected = autoregressive_generate(hf, [ids], 24).tokens[0]
        llm.reset()
        llm.eval(ids)
        with torch.no_grad():
            ref = hf(torch.tensor([ids])).logits[0].numpy()
        assert np.abs(llm.scores[: len(ids)] - ref).max() < 1e-3
        got = []
        for _ in range(len(expected)):
            token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            got.append(token)
            llm.eval([token])
        assert got == expected


def test_export_is_cached_by_folder_hash(tiny_models, tmp_path):
    first = ensure_gguf(tiny_models.draft)
    assert ensure_gguf(tiny_models.draft) == first
    assert folder_hash(tiny_models.draft) != folder_hash(tiny_models.target)
    assert folder_hash(tiny_models.draft) in first.parent.name


def test_export_rejects_a_non_model_folder(tmp_path):
    from lib.errors import UsageError
    with pytest.raises(UsageError, match="no config.json"):
        ensure_gguf(tmp_path)
