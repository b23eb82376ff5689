"""GPU_STRATEGY -> where the target and the draft go (the benchmark guide's GPU layouts).

`plan_placement` turns the strategy and the number of visible GPUs into a `Placement`: for each model either
one device ("cuda:0", "cpu") or a transformers device_map that splits its decoder layers evenly over a list of
GPUs (embeddings with the first layers, final norm and head with the last). It needs no GPU (the count is passed
in), so every layout is unit-tested on CPU. Asking for more GPUs than are visible is a UsageError; with no GPU at
all every strategy falls back to the CPU and says so.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from lib.errors import UsageError

STRATEGIES = ("multi_gpu_ratio", "separate", "same", "auto", "shared_all")


@dataclass
class Placement:
    strategy: str
    gpus_visible: int
    target: str | dict  # a device ("cuda:1", "cpu"), "auto", or a device_map {module name: GPU index}
    draft: str | dict | None
    target_gpus: list[int]
    draft_gpus: list[int]
    note: str = ""

    def as_dict(self) -> dict:
        """For run.json."""
        return asdict(self)

    def single_device(self, which: str) -> str | None:
        """The one device a model sits on, or None when it is spread (the fast path needs one device)."""
        where = getattr(self, which)
        return where if isinstance(where, str) and where != "auto" else None

    def summary(self) -> str:
        def part(name, where, gpus):
            if where is None:
                return f"{name}: none"
            return f"{name}: {where}" if isinstance(where, str) else f"{name}: layers over GPUs {gpus}"
        text = (f"placement ({self.strategy}, {self.gpus_visible} GPU(s) visible): "
                f"{part('target', self.target, self.target_gpus)}; {part('draft', self.draft, self.draft_gpus)}")
        return text + (f" ({self.note})" if self.note else "")


def split_layers(n_layers: int, gpus: list[int]) -> dict[str, int]:
    """A transformers device_map for a Llama-style model: decoder layers split evenly (earlier GPUs take the
    remainder), embeddings on the first GPU, final norm, rotary table and head on the last."""
    if not gpus:
        raise ValueError("split_layers needs at least one GPU")
    per, extra = divmod(n_layers, len(gpus))
    device_map, layer = {"model.embed_tokens": gpus[0]}, 0
    for i, gpu in enumerate(gpus):
        for _ in range(per + (1 if i < extra else 0)):
            device_map[f"model.layers.{layer}"] = gpu
            layer += 1
    device_map.update({"model.norm": gpus[-1], "model.rotary_emb": gpus[-1], "lm_head": gpus[-1]})
    return device_map


def plan_placement(strategy: str, gpus_visible: int, target_layers: int, draft_layers: int | None,
                   target_ratio: int = 6, drafter_ratio: int = 2) -> Placement:
    """Where each model goes. draft_layers None: no draft (AR only)."""
    if strategy not in STRATEGIES:
        raise UsageError(f"GPU_STRATEGY={strategy!r}: accepted values are {', '.join(STRATEGIES)}")
    has_draft = draft_layers is not None
    if gpus_visible == 0:
        return Placement(strategy, 0, "cpu", "cpu" if has_draft else None, [], [],
                         note="no GPU visible: everything on the CPU")
    if strategy == "multi_gpu_ratio":
        needed = target_ratio + (drafter_ratio if has_draft else 0)
    else:
        needed = 2 if strategy == "separate" and has_draft else 1
    if needed > gpus_visible:
        detail = (f"TARGET_GPU_RATIO={target_ratio} + DRAFTER_GPU_RATIO={drafter_ratio}"
                  if strategy == "multi_gpu_ratio" else "target on GPU 0, draft on GPU 1")
        raise UsageError(f"GPU_STRATEGY={strategy} needs {needed} GPUs ({detail}) but {gpus_visible} "
                         f"{'is' if gpus_visible == 1 else 'are'} visible (CUDA_VISIBLE_DEVICES); use fewer "
                         f"GPUs in the layout or GPU_STRATEGY=same")
    everything = list(range(gpus_visible))
    if strategy == "same":
        return Placement(strategy, gpus_visible, "cuda:0", "cuda:0" if has_draft else None, [0],
                         [0] if has_draft else [])
    if strategy == "separate":
        return Placement(strategy, gpus_visible, "cuda:0", "cuda:1" if has_draft else None, [0],
                         [1] if has_draft else [])
    if strategy == "auto":
        return Placement(strategy, gpus_visible, "auto", "auto" if has_draft else None, everything,
                         everything if has_draft else [], note="transformers' device_map='auto'")
    if strategy == "shared_all":
        return Placement(strategy, gpus_visible, _spread(target_layers, everything),
                         _spread(draft_layers, everything) if has_draft else None, everything,
                         everything if has_draft else [])
    target_gpus = everything[:target_ratio]
    draft_gpus = everything[target_ratio:target_ratio + drafter_ratio] if has_draft else []
    return Placement(strategy, gpus_visible, _spread(target_layers, target_gpus),
                     _spread(draft_layers, draft_gpus) if has_draft else None, target_gpus, draft_gpus)


def _spread(n_layers: int, gpus: list[int]) -> str | dict:
    """One GPU: a plain device (keeps the fast path); several: a layer-split device_map."""
    return f"cuda:{gpus[0]}" if len(gpus) == 1 else split_layers(n_layers, gpus)


def placement_from_config(cfg, target_layers: int, draft_layers: int | None, gpus_visible: int | None = None):
    """The placement for a resolved Config (GPU count from torch unless given)."""
    if gpus_visible is None:
        import torch
        gpus_visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return plan_placement(cfg.gpu_strategy, gpus_visible, target_layers, draft_layers, cfg.target_gpu_ratio,
                          cfg.drafter_gpu_ratio)
