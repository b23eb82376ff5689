"""MoE expert tracking: forward hooks on the routers record which experts each token is sent to.

    tracker = track_experts(model)        # None when the model has no MoE routers
    with tracker.request("req-1"): model.generate(...)
    tracker.stats(layer_id=0, expert_id=1); tracker.top_experts(5); tracker.load_balance()
    tracker.export("expert_stats.json"); tracker.reset(); tracker.remove()

Per (layer, expert): activation_count = forward calls in which the expert got at least one token,
total_tokens_processed = tokens routed to it (each token goes to top_k experts), last_activation_time.
So per layer, the tokens processed by all experts sum to tokens x top_k.

Steps: a forward over a filled KV cache of t tokens per row (t = 1: a decode step; t = k + 1: the verify of k
drafts) reads every expert its tokens are routed to once. Per layer and per prefix length j = 1..t the tracker sums
the distinct experts the first j tokens of every row touched. Attention is causal, so the first k + 1 tokens of a
verify route exactly as a verify of k drafts would: one SD run with GAMMA_VALUE = K gives the curve for k = 0..K
(`verify_table`, next to the acceptance the run measured at each k). Prefill (an empty cache) is not a step.
"""
from __future__ import annotations

import contextlib
import re
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from lib.files import write_json
from lib.types import SpecCounters

SCHEMA = "speclab.expert_stats/1"


@dataclass
class StepShape:
    """The forward in progress: rows, tokens per row, and whether it runs over a filled KV cache (a step)."""
    rows: int
    tokens: int
    cached: bool


@dataclass
class PrefixCounter:
    """Over the steps of one layer whose rows fed at least `j` tokens: the distinct experts the first j tokens of
    every row touched (summed and the largest), the steps and their rows."""
    distinct_sum: int = 0
    distinct_max: int = 0
    steps: int = 0
    rows: int = 0


@dataclass
class ExpertCounter:
    activation_count: int = 0
    total_tokens_processed: int = 0
    last_activation_time: float = 0.0


def find_routers(model: nn.Module) -> list[tuple[int, nn.Module, int, int]]:
    """(layer id, router module, num experts, top_k) for each sparse MoE block (Mixtral, Qwen-MoE, ...)."""
    found = []
    for name, block in model.named_modules():
        gate = getattr(block, "gate", None)
        top_k = getattr(block, "top_k", None) or getattr(gate, "top_k", None)
        if gate is None or top_k is None or "moe" not in type(block).__name__.lower():
            continue
        num_experts = (getattr(block, "num_experts", None) or getattr(gate, "num_experts", None)
                       or getattr(gate, "out_features", None) or gate.weight.shape[0])
        match = re.search(r"layers\.(\d+)\.", name + ".")
        found.append((int(match.group(1)) if match else len(found), gate, int(num_experts), int(top_k)))
    return found


def _cache_filled(cache) -> bool:
    if cache is None:
        return False
    length = getattr(cache, "get_seq_length", None)
    return bool(length() if length else cache)


class ExpertTracker:
    def __init__(self, routers, model: nn.Module | None = None):
        self.num_experts = {layer: n for layer, _, n, _ in routers}
        self.top_k = {layer: k for layer, _, _, k in routers}
        self.counters: dict[tuple[int, int], ExpertCounter] = defaultdict(ExpertCounter)
        self.tokens_per_layer: dict[int, int] = defaultdict(int)
        self.per_request: dict[str, dict[tuple[int, int], int]] = {}
        self.current_request: str | None = None
        self.prefix: dict[tuple[int, int], PrefixCounter] = defaultdict(PrefixCounter)  # (layer, j) -> counter
        self.step: StepShape | None = None
        self.handles = [gate.register_forward_hook(self._hook(layer, k)) for layer, gate, _, k in routers]
        if model is not None:  # the whole model's input says what kind of forward the routers are in
            self.handles.append(model.register_forward_pre_hook(self._note_step, with_kwargs=True))

    def _note_step(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        self.step = None
        if isinstance(ids, torch.Tensor) and ids.dim() == 2:
            self.step = StepShape(ids.shape[0], ids.shape[1], _cache_filled(kwargs.get("past_key_values")))

    def _hook(self, layer: int, top_k: int):
        def hook(module, args, output):
            if isinstance(output, tuple):  # transformers 5: (logits, scores, indices)
                indices = output[-1]
            else:                          # older: plain router logits
                indices = torch.topk(output, top_k, dim=-1).indices
            self.record(layer, indices.reshape(-1, indices.shape[-1]))
        return hook

    def record(self, layer: int, indices: torch.Tensor):
        """indices [tokens, top_k]: the experts each token was routed to."""
        step = self.step
        if step is not None and step.cached and indices.shape[0] == step.rows * step.tokens:
            self._record_prefixes(layer, indices.reshape(step.rows, step.tokens, -1))
        counts = torch.bincount(indices.reshape(-1).cpu(), minlength=self.num_experts[layer]).tolist()
        now = time.time()
        self.tokens_per_layer[layer] += indices.shape[0]
        req = self.per_request.setdefault(self.current_request, {}) if self.current_request is not None else None
        for expert, n in enumerate(counts):
            if n:
                c = self.counters[(layer, expert)]
                c.activation_count += 1
                c.total_tokens_processed += n
                c.last_activation_time = now
                if req is not None:
                    req[(layer, expert)] = req.get((layer, expert), 0) + n

    def _record_prefixes(self, layer: int, indices: torch.Tensor):
        """indices [rows, tokens, top_k] of one step: distinct experts of the first j tokens, j = 1..tokens."""
        hit = torch.zeros(*indices.shape[:2], self.num_experts[layer], dtype=torch.int8)
        hit.scatter_(2, indices.cpu().long(), 1)
        distinct = hit.amax(0).cummax(0).values.sum(-1).tolist()  # any row, any of the first j tokens
        for j, n in enumerate(distinct, 1):
            c = self.prefix[(layer, j)]
            c.distinct_sum += n
            c.distinct_max = max(c.distinct_max, n)
            c.steps += 1
            c.rows += indices.shape[0]

    @contextlib.contextmanager
    def request(self, request_id: str):
        previous, self.current_request = self.current_request, str(request_id)
        try:
            yield self
        finally:
            self.current_request = previous

    def reset(self):
        self.counters.clear()
        self.tokens_per_layer.clear()
        self.per_request.clear()
        self.prefix.clear()

    def remove(self):
        for h in self.handles:
            h.remove()
        self.handles = []

    # --------------------------------------------------------------------------------- views

    def expert_stats(self, layer_id: int, expert_id: int) -> dict:
        c = self.counters.get((layer_id, expert_id), ExpertCounter())
        return {"layer_id": layer_id, "expert_id": expert_id, "activation_count": c.activation_count,
                "last_activation_time": c.last_activation_time, "total_tokens_processed": c.total_tokens_processed}

    def layer_stats(self, layer_id: int) -> dict:
        n = self.num_experts[layer_id]
        experts = {str(e): {"activation_count": self.counters[(layer_id, e)].activation_count,
                            "total_tokens_processed": self.counters[(layer_id, e)].total_tokens_processed}
                   for e in range(n) if (layer_id, e) in self.counters}
        return {"total_experts": n, "top_k": self.top_k[layer_id],
                "total_activations": sum(e["activation_count"] for e in experts.values()),
                "total_tokens": sum(e["total_tokens_processed"] for e in experts.values()),
                "tokens_routed": self.tokens_per_layer.get(layer_id, 0),
                "load_balance": self.load_balance(layer_id), "experts": experts}

    def expert_loads(self, layer_id: int) -> list[int]:
        """Tokens processed by each expert of the layer, expert 0 first."""
        return [self.counters[(layer_id, e)].total_tokens_processed if (layer_id, e) in self.counters else 0
                for e in range(self.num_experts[layer_id])]

    def load_balance(self, layer_id: int) -> dict:
        """max_over_mean: busiest expert's tokens / the mean (1.0 = perfectly even); cv: std / mean."""
        loads = torch.tensor(self.expert_loads(layer_id), dtype=torch.float32)
        mean = loads.mean().item()
        if mean == 0:
            return {"max_over_mean": None, "cv": None, "idle_experts": int(loads.numel())}
        return {"max_over_mean": round(loads.max().item() / mean, 4), "cv": round(loads.std(unbiased=False).item()
                / mean, 4), "idle_experts": int((loads == 0).sum())}

    def top_experts(self, top_k: int = 10) -> list[dict]:
        ranked = sorted(self.counters.items(), key=lambda kv: (-kv[1].total_tokens_processed, kv[0]))
        return [{"layer_id": layer, "expert_id": e, "activation_count": c.activation_count,
                 "total_tokens_processed": c.total_tokens_processed} for (layer, e), c in ranked[:top_k]]

    def stats(self, layer_id: int | None = None, expert_id: int | None = None) -> dict:
        if layer_id is not None and expert_id is not None:
            return self.expert_stats(layer_id, expert_id)
        if layer_id is not None:
            return self.layer_stats(layer_id)
        return self.export_dict()

    def export_dict(self, top_k: int = 10) -> dict:
        return {"schema": SCHEMA,
                "expert_stats": {f"layer_{layer}_expert_{e}": self.expert_stats(layer, e)
                                 for layer, e in sorted(self.counters)},
                "layer_stats": {str(layer): self.layer_stats(layer) for layer in sorted(self.num_experts)},
                "top_experts": self.top_experts(top_k),
                "per_request": {rid: {f"layer_{layer}_expert_{e}": n for (layer, e), n in sorted(c.items())}
                                for rid, c in self.per_request.items()}}

    def export(self, path: str | Path | None = None, top_k: int = 10) -> dict:
        data = self.export_dict(top_k)
        if path is not None:
            write_json(Path(path), data)
        return data


def track_experts(model: nn.Module) -> ExpertTracker | None:
    """Attach an ExpertTracker to every MoE router of `model`; None when the model has no MoE layers."""
    routers = find_routers(model)
    return ExpertTracker(routers, model) if routers else None


def tokens_per_round(spec: SpecCounters | None, k: int) -> float | None:
    """Tokens a round emits per row when only the first k drafts are verified: 1 + the rate at which positions 1..k
    were accepted (a position counts only when every draft before it was accepted too)."""
    if spec is None or not spec.num_drafts or k > len(spec.accepted_per_position):
        return None if k else 1.0
    return 1 + sum(spec.accepted_per_position[:k]) / spec.num_drafts


def verify_table(tracker: ExpertTracker, spec: SpecCounters | None) -> dict | None:
    """Per k = 0..K drafts verified (k = 0: the one-token step of AR at the same positions): the distinct experts
    per layer that a step over the first k + 1 tokens of each row touched (mean over steps and layers), next to
    the acceptance measured at k. expert_reads_per_token_vs_ar (distinct experts per emitted token over a
    one-token step's) shows when verifying more drafts stops being cheap; cheapest_k is the k where it is lowest
    (0: AR). None when no step ran over a filled cache."""
    layers = sorted({layer for layer, _ in tracker.prefix})
    if not layers:
        return None
    rows = []
    for j in range(1, max(j for _, j in tracker.prefix) + 1):
        counters = {str(layer): tracker.prefix[(layer, j)] for layer in layers if (layer, j) in tracker.prefix}
        if len(counters) == len(layers):
            rows.append(_verify_row(j - 1, counters, spec))
    one_token = rows[0]["mean_distinct_experts"] if rows[0]["k"] == 0 else None
    for row in rows:
        reads = row["mean_distinct_experts"] / one_token if one_token else None
        row["expert_reads_vs_one_token"] = _rounded(reads)
        row["expert_reads_per_token_vs_ar"] = _rounded(reads / row["tokens_per_round"]
                                                       if reads and row["tokens_per_round"] else None)
    priced = [r for r in rows if r["expert_reads_per_token_vs_ar"] is not None]
    cheapest = min(priced, key=lambda r: (r["expert_reads_per_token_vs_ar"], r["k"]))["k"] if priced else None
    return {"num_experts": max(tracker.num_experts.values()), "top_k": max(tracker.top_k.values()),
            "layers": len(layers), "rows": rows, "cheapest_k": cheapest}


def _verify_row(k: int, counters: dict[str, PrefixCounter], spec: SpecCounters | None) -> dict:
    means = {layer: c.distinct_sum / c.steps for layer, c in counters.items()}
    first = next(iter(counters.values()))
    per_round = tokens_per_round(spec, k)
    return {"k": k, "steps": first.steps, "rows_per_step": first.rows / first.steps,
            "distinct_experts_per_layer": {layer: _rounded(m) for layer, m in means.items()},
            "mean_distinct_experts": _rounded(sum(means.values()) / len(means)),
            "max_distinct_experts": max(c.distinct_max for c in counters.values()),
            "tokens_per_round": per_round,
            "acceptance_rate": (per_round - 1) / k if k and per_round is not None else None}


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def plot_load_balance(tracker: ExpertTracker, path: str | Path):
    """Bar chart of tokens per expert, one panel per layer."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    layers = sorted(tracker.num_experts)
    fig, axes = plt.subplots(len(layers), 1, figsize=(6, 2.2 * len(layers)), squeeze=False)
    for ax, layer in zip(axes[:, 0], layers):
        loads = tracker.expert_loads(layer)
        ax.bar(range(len(loads)), loads)
        lb = tracker.load_balance(layer)
        ax.set_title(f"layer {layer}: max/mean {lb['max_over_mean']}, cv {lb['cv']}", fontsize=9)
        ax.set_xlabel("expert")
        ax.set_ylabel("tokens")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
