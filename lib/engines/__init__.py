"""Engine registry: name -> class, imported on first use so a missing package only matters when asked for."""
import importlib

from lib.errors import EngineUnavailable

REGISTRY = {
    "hf": ("lib.engines.hf_engine", "HFEngine"),
    "vllm": ("lib.engines.vllm_engine", "VLLMEngine"),
    "sglang": ("lib.engines.sglang_engine", "SGLangEngine"),
    "llamacpp": ("lib.engines.llamacpp_engine", "LlamaCppEngine"),
}


def engine_class(name: str):
    module_name, class_name = REGISTRY[name]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.startswith("lib."):
            raise EngineUnavailable(f"INFERENCE_ENGINE={name}: not built into this version of SpecLab") from None
        raise
    return getattr(module, class_name)


def create_engine(name: str, cfg, method: str, models):
    return engine_class(name)(cfg, method, models)
