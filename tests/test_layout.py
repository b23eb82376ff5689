"""GPU layouts (lib/layout.py), planned on CPU with the GPU count passed in."""
import pytest

from lib.errors import UsageError
from lib.layout import STRATEGIES, plan_placement, split_layers


def layers_of(device_map):
    return {k: v for k, v in device_map.items() if k.startswith("model.layers.")}


def test_split_layers_even_and_complete():
    device_map = split_layers(32, [2, 3, 4, 5, 6, 7])
    layers = layers_of(device_map)
    assert sorted(int(k.rsplit(".", 1)[1]) for k in layers) == list(range(32))
    counts = [list(layers.values()).count(g) for g in range(2, 8)]
    assert counts == [6, 6, 5, 5, 5, 5]
    # layers stay in order across GPUs; embeddings first, head last
    assert list(layers.values()) == sorted(layers.values())
    assert device_map["model.embed_tokens"] == 2 and device_map["lm_head"] == 7 and device_map["model.norm"] == 7


def test_multi_gpu_ratio_6_2_on_eight():
    p = plan_placement("multi_gpu_ratio", 8, 32, 16, target_ratio=6, drafter_ratio=2)
    assert p.target_gpus == [0, 1, 2, 3, 4, 5] and p.draft_gpus == [6, 7]
    assert set(layers_of(p.target).values()) == set(range(6))
    assert set(layers_of(p.draft).values()) == {6, 7}
    assert p.single_device("target") is None


def test_multi_gpu_ratio_needs_enough_gpus():
    with pytest.raises(UsageError, match=r"needs 8 GPUs .* but 2 are visible"):
        plan_placement("multi_gpu_ratio", 2, 32, 16, target_ratio=6, drafter_ratio=2)


def test_multi_gpu_ratio_one_each_keeps_single_devices():
    p = plan_placement("multi_gpu_ratio", 2, 32, 16, target_ratio=1, drafter_ratio=1)
    assert (p.target, p.draft) == ("cuda:0", "cuda:1")


def test_separate_and_same():
    p = plan_placement("separate", 2, 32, 16)
    assert (p.target, p.draft) == ("cuda:0", "cuda:1") and p.single_device("draft") == "cuda:1"
    with pytest.raises(UsageError, match="GPU_STRATEGY=separate needs 2 GPUs"):
        plan_placement("separate", 1, 32, 16)
    assert plan_placement("separate", 1, 32, None).target == "cuda:0"  # AR only: one GPU is enough
    p = plan_placement("same", 1, 32, 16)
    assert (p.target, p.draft) == ("cuda:0", "cuda:0")


def test_auto_and_shared_all():
    p = plan_placement("auto", 4, 32, 16)
    assert (p.target, p.draft) == ("auto", "auto") and p.single_device("target") is None
    p = plan_placement("shared_all", 4, 32, 16)
    assert set(layers_of(p.target).values()) == {0, 1, 2, 3} == set(layers_of(p.draft).values())


def test_cpu_fallback_for_every_strategy():
    assert len(STRATEGIES) == 5
    for strategy in STRATEGIES:
        p = plan_placement(strategy, 0, 4, 2)
        assert (p.target, p.draft) == ("cpu", "cpu") and "no GPU" in p.summary()


def test_unknown_strategy_and_run_json_shape():
    with pytest.raises(UsageError, match="accepted values are multi_gpu_ratio"):
        plan_placement("diagonal", 2, 4, 2)
    d = plan_placement("separate", 2, 4, 2).as_dict()
    assert d["strategy"] == "separate" and d["target"] == "cuda:0" and d["draft_gpus"] == [1]
