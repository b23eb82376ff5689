"""The engine table (lib/engines/__init__.py) as configuration, launcher and PyTorch engine read it, and the frozen
Config that resolve() returns."""
import dataclasses

import pytest

import benchmark
from lib import config as C
from lib import engines as E
from lib.errors import UsageError
from lib.files import ROOT


def resolve(**env):
    return C.resolve(None, {k: str(v) for k, v in env.items()})


def test_unknown_engine_in_compare_modes_names_the_table():
    with pytest.raises(UsageError) as err:
        resolve(COMPARE_MODES="hf:target tensorrt:target")
    assert str(err.value) == ("COMPARE_MODES='hf:target tensorrt:target': 'tensorrt:target' is not engine:method "
                              "with engine in hf, vllm, sglang, llamacpp, openai and method in target, speculative, "
                              "assisted, draft")


def test_a_method_an_engine_does_not_run_names_the_engines_that_do():
    with pytest.raises(UsageError) as err:
        resolve(INFERENCE_ENGINE="sglang", INFERENCE_METHOD="assisted")
    assert str(err.value) == ("INFERENCE_METHOD=assisted with engine sglang: assisted generation is transformers' "
                              "own; accepted only with INFERENCE_ENGINE=hf")


def test_choices_and_aliases_come_from_the_table():
    engine = C.VAR_BY_NAME["INFERENCE_ENGINE"]
    assert engine.choices == ("hf", "transformers", "vllm", "sglang", "llamacpp", "openai")
    # the measurement modes (draft: the draft run as an AR target) are added by the plan, not chosen
    assert set(C.VAR_BY_NAME["INFERENCE_METHOD"].choices) == {m.name for m in E.METHODS if not m.measurement}
    assert "draft" in E.METHOD_BY_NAME and "draft" not in C.VAR_BY_NAME["INFERENCE_METHOD"].choices
    assert all(set(e.methods) <= set(E.METHOD_BY_NAME) for e in E.ENGINES)
    assert all((ROOT / "requirements" / f"{e.requirements}.txt").is_file() for e in E.ENGINES)
    cfg = resolve(INFERENCE_ENGINE="Transformers", COMPARE_MODES="transformers:assisted")
    assert cfg.inference_engine == "hf" and C.modes(cfg) == [("hf", "assisted")]


def test_hf_engine_runs_the_methods_the_table_gives_it():
    from lib.engines.pytorch_engine import METHODS
    assert set(METHODS) == set(E.ENGINE_BY_NAME["hf"].methods)
    assert E.engine_class("hf").__name__ == "PyTorchEngine"


@pytest.mark.parametrize("env,argv,printed", [
    ({"COMPARE_MODES": "hf:target vllm:speculative"}, [], "core vllm"),
    ({}, [], "core"),
    ({"INFERENCE_ENGINE": "llamacpp"}, ["--mixed-precision-config", "mp.yaml", "--unknown"], "core edge quant"),
    ({"INFERENCE_ENGINE": "vllm", "GAMMA_VALUE": "abc"}, ["--help"], "core"),
    ({"INFERENCE_ENGINE": "vllm"}, ["--compare-modes", "sglang:target hf:speculative"], "core sglang"),
    ({"COMPARE_MODES": "openai:target", "TARGET_ENDPOINT": "http://127.0.0.1:8000"}, [], "core endpoint"),
    ({"COMPARE_MODES": "openai:target openai:speculative"}, ["--endpoint-launch", "llamacpp"], "core endpoint edge"),
])
def test_print_requirement_sets(monkeypatch, capsys, env, argv, printed):
    for name in ("COMPARE_MODES", "INFERENCE_ENGINE", "MIXED_PRECISION_CONFIG", "GAMMA_VALUE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert benchmark.main([*argv, "--print-requirement-sets"]) == 0
    assert capsys.readouterr().out == printed + "\n"


def test_print_requirement_sets_stops_on_bad_input(monkeypatch, capsys):
    monkeypatch.setenv("GAMMA_VALUE", "abc")
    with pytest.raises(SystemExit) as exit_:
        benchmark.main(["--print-requirement-sets"])
    captured = capsys.readouterr()
    assert exit_.value.code == 2 and captured.out == ""
    assert captured.err == "error: GAMMA_VALUE='abc' (from the environment): expected an integer >= 1 and <= 64\n"


def test_config_is_frozen_and_typed():
    cfg = resolve(GAMMA_VALUE=6)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.gamma_value = 3
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.new_attribute = 1
    types = {f.name: f.type for f in dataclasses.fields(cfg)}
    assert types["gamma_value"] is int and types["temperature"] is float and types["enable_batch"] is bool
    assert list(cfg.as_dict()) == [v.name for v in C.VARS] and cfg.as_dict()["GAMMA_VALUE"] == 6


def test_replace_returns_a_new_config():
    cfg = resolve(GAMMA_VALUE=6)
    other = cfg.replace(gamma_value=2, NUM_PROMPTS=3)
    assert (cfg.gamma_value, cfg.num_prompts, cfg.sources["GAMMA_VALUE"]) == (6, 20, "env")
    assert (other.gamma_value, other.num_prompts) == (2, 3)
    assert other.sources["GAMMA_VALUE"] == other.sources["NUM_PROMPTS"] == "override"
    assert other.sources["SEED"] == "default" and other != cfg and cfg.replace() == cfg
